//! Images per second of the input pipelines (decode + augmentation + normalisation) on real images, through the
//! prefetching loader. Compare with `bench/pipeline_torchvision.py` on the same machine.
//!
//! usage: cargo run --release -p datasets --example pipeline_bench -- IMAGENET_LIKE_DIR CIFAR_JPEG_DIR [THREADS]
//! (an ImageFolder of large photos, e.g. the ImageNet samples sorted into one class folder; the CIFAR-10 JPEG tree)

use datasets::{
    Augmentation, DataSource, Loader, LoaderConfig, Normalization, Normalize, Pipeline,
};
use std::time::Instant;

fn measure(
    name: &str,
    dir: &str,
    augmentation: Augmentation,
    normalize: Normalize,
    threads: usize,
    min_images: usize,
) {
    let source = DataSource::open(std::path::Path::new(dir)).expect("opening the data folder");
    let split = source.train.or(source.test).expect("images");
    let pipeline = Pipeline::new(augmentation, Normalization::PerChannel(normalize));
    let config = LoaderConfig {
        batch_size: 64,
        threads,
        seed: 1,
        ..Default::default()
    };
    let loader = Loader::new(split, pipeline, config).expect("loader");
    let (mut images, mut epoch) = (0usize, 0u64);
    let start = Instant::now();
    while images < min_images {
        for batch in loader.epoch(epoch, 0) {
            images += batch.expect("batch").len();
        }
        epoch += 1;
    }
    let ips = images as f64 / start.elapsed().as_secs_f64();
    println!("{name}: {ips:.0} img/s ({images} images, {threads} threads)");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: pipeline_bench IMAGENET_LIKE_DIR CIFAR_JPEG_DIR [THREADS]");
        std::process::exit(2);
    }
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    let scale = Augmentation::ScaleAugment {
        min: 256,
        max: 480,
        crop: 224,
        lighting: 0.0,
    };
    measure(
        "imagenet scale-aug (decode, resize [256,480], crop 224, flip)",
        &args[1],
        scale,
        Normalize::IMAGENET,
        threads,
        400,
    );
    let cifar = Augmentation::CifarTrain { padding: 4 };
    measure(
        "cifar (decode, pad 4, crop 32, flip)",
        &args[2],
        cifar,
        Normalize::CIFAR10,
        threads,
        50_000,
    );
}
