//! Evaluation protocols against an independent computation from the transforms and the unfolded network:
//! ten-crop (softmax averaged over the ten views) and fully-convolutional multi-scale evaluation.

use candle_core::{Device, Tensor, D};
use datasets::transforms::{resize_shorter, ten_crop, to_chw, zero_pad, Normalize};
use datasets::{DataSource, Split};
use resnet_infer::metrics::Accuracy;
use resnet_infer::{evaluate, load_model, EvalOptions};
use tests::{cifar10_jpg_root, shared};

fn first_images(n: usize) -> Split {
    let split = DataSource::open(&cifar10_jpg_root()).unwrap().test.unwrap();
    // Every class: take images spread over the whole test set.
    let step = split.len() / n;
    split.subset(&(0..n).map(|i| i * step).collect::<Vec<_>>())
}

/// Top-1/top-5 error from per-image averaged softmax computed view by view with the unfolded model.
fn expected(
    split: &Split,
    views: impl Fn(&datasets::RgbImage) -> Vec<datasets::RgbImage>,
) -> (f64, f64) {
    let weights = shared("weights/cifar10-resnet20.safetensors");
    let loaded = load_model(Some("resnet20"), weights.to_str().unwrap(), &Device::Cpu).unwrap();
    let mut acc = Accuracy::new(10);
    for i in 0..split.len() {
        let mut sum = vec![0f32; 10];
        let vs = views(&split.image(i).unwrap());
        for v in &vs {
            let (w, h) = (v.width() as usize, v.height() as usize);
            let mut chw = to_chw(v);
            Normalize::IMAGENET.apply(&mut chw, w * h);
            let x = Tensor::from_vec(chw, (1, 3, h, w), &Device::Cpu).unwrap();
            let p = candle_nn::ops::softmax(&loaded.model.forward_t(&x, false).unwrap(), D::Minus1)
                .unwrap();
            let p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            sum.iter_mut()
                .zip(p)
                .for_each(|(s, p)| *s += p / vs.len() as f32);
        }
        acc.add(&sum, &[split.label(i)]);
    }
    let r = acc.report();
    (r.top1_error, r.top5_error)
}

fn ours(split: &Split, options: EvalOptions) -> (f64, f64) {
    let weights = shared("weights/cifar10-resnet20.safetensors");
    let loaded = load_model(Some("resnet20"), weights.to_str().unwrap(), &Device::Cpu).unwrap();
    let r = evaluate(&loaded.model, split.clone(), &options)
        .unwrap()
        .accuracy;
    assert_eq!(r.images, split.len());
    (r.top1_error, r.top5_error)
}

#[test]
fn ten_crop_averages_the_ten_views() {
    let split = first_images(200);
    let want = expected(&split, |img| ten_crop(&zero_pad(img, 4), 32));
    let got = ours(
        &split,
        EvalOptions {
            ten_crop: true,
            ..Default::default()
        },
    );
    println!(
        "ten-crop on 200 images: top-1 {:.2} %, top-5 {:.2} %",
        got.0, got.1
    );
    assert_eq!(got, want);
}

#[test]
fn multi_scale_averages_whole_images_at_each_scale() {
    let split = first_images(100);
    let want = expected(&split, |img| {
        vec![
            resize_shorter(img, 32),
            resize_shorter(img, 40),
            resize_shorter(img, 48),
        ]
    });
    let got = ours(
        &split,
        EvalOptions {
            scales: vec![32, 40, 48],
            ..Default::default()
        },
    );
    println!(
        "multi-scale on 100 images: top-1 {:.2} %, top-5 {:.2} %",
        got.0, got.1
    );
    assert_eq!(got, want);
    let single = ours(&split, EvalOptions::default());
    let single_want = expected(&split, |img| vec![img.clone()]);
    assert_eq!(single, single_want);
}
