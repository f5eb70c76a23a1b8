//! Each transform against hand-computed expectations, the resize against PIL/torchvision, and loader determinism.

use datasets::transforms::{
    center_crop, center_offset, hflip, open_rgb, pad_crop, resize_shorter, ten_crop, to_chw,
    Normalize,
};
use datasets::{Augmentation, DataSource, Loader, LoaderConfig, Normalization, Pipeline};
use image::{Rgb, RgbImage};
use rand::SeedableRng;
use tests::{cifar10_jpg_root, shared};

/// A 6×4 image whose pixel (x, y) is [x, y, 10x + y].
fn coords(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, (10 * x + y) as u8]))
}

#[test]
fn pad_crop_takes_the_window_at_the_offset_of_the_padded_image() {
    let img = coords(6, 4);
    // Padding 2, offset (1, 3), size 3: padded (1..4, 3..6) = source (−1..2, 1..4).
    let out = pad_crop(&img, 2, 1, 3, 3);
    assert_eq!(out.dimensions(), (3, 3));
    assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]); // source x = −1: zero padding
    assert_eq!(out.get_pixel(1, 0).0, [0, 1, 1]); // source (0, 1)
    assert_eq!(out.get_pixel(2, 2).0, [1, 3, 13]); // source (1, 3)
                                                   // Offset (padding, padding) is the identity crop.
    assert_eq!(
        pad_crop(&img, 2, 2, 2, 4),
        image::imageops::crop_imm(&img, 0, 0, 4, 4).to_image()
    );
}

#[test]
fn horizontal_flip_mirrors_columns() {
    let out = hflip(&coords(6, 4));
    assert_eq!(out.get_pixel(0, 1).0, [5, 1, 51]);
    assert_eq!(out.get_pixel(5, 3).0, [0, 3, 3]);
}

#[test]
fn normalization_is_per_channel_on_unit_pixels() {
    let img = RgbImage::from_fn(2, 1, |x, _| Rgb([255, 0, if x == 0 { 51 } else { 102 }]));
    let mut chw = to_chw(&img);
    assert_eq!(chw, vec![1.0, 1.0, 0.0, 0.0, 0.2, 0.4]);
    Normalize::IMAGENET.apply(&mut chw, 2);
    let expect = [
        (1.0 - 0.485) / 0.229,
        (0.0 - 0.456) / 0.224,
        (0.2 - 0.406) / 0.225,
    ];
    for (got, want) in chw.iter().step_by(2).zip(expect) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
    assert!(Normalize::parse("0.5,0.5", "1,1,1").is_err());
    assert!(Normalize::parse("0.5,0.5,0.5", "1,0,1").is_err());
}

#[test]
fn center_and_ten_crop_geometry() {
    assert_eq!(center_offset(256, 224), 16);
    assert_eq!(center_offset(257, 224), 16); // Python's round(16.5) = 16 (ties to even), as torchvision
    assert_eq!(center_offset(259, 224), 18); // round(17.5) = 18
    let img = coords(10, 8);
    let c = center_crop(&img, 4);
    assert_eq!(c.get_pixel(0, 0).0, [3, 2, 32]);
    let crops = ten_crop(&img, 4);
    assert_eq!(crops.len(), 10);
    let corners: Vec<[u8; 2]> = crops
        .iter()
        .map(|c| [c.get_pixel(0, 0)[0], c.get_pixel(0, 0)[1]])
        .collect();
    // top-left, top-right, bottom-left, bottom-right, centre; then the mirrored ones start at their right edge.
    assert_eq!(&corners[..5], &[[0, 0], [6, 0], [0, 4], [6, 4], [3, 2]]);
    assert_eq!(&corners[5..], &[[3, 0], [9, 0], [3, 4], [9, 4], [6, 2]]);
}

#[test]
fn resize_matches_pil_bilinear_as_torchvision_uses_it() {
    // Reference made by tests/fixtures/make_pil_resize.py (PIL 13, Image.BILINEAR). Different but equally
    // valid rounding of the filter weights gives ±1 grey level: mean |diff| ≤ 0.25, max ≤ 1 of 255.
    for (name, sizes) in [
        ("chelsea", &[256u32, 480, 64][..]),
        ("coffee", &[256, 64][..]),
    ] {
        let img = open_rgb(&shared(&format!("data/photos/{name}.png"))).unwrap();
        for &size in sizes {
            let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("fixtures/pil-{name}-{size}.png"));
            let expected = open_rgb(&fixture).unwrap();
            let ours = resize_shorter(&img, size);
            assert_eq!(ours.dimensions(), expected.dimensions(), "{name} → {size}");
            let diffs: Vec<i32> = ours
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .collect();
            let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
            let max = *diffs.iter().max().unwrap();
            println!("{name} → {size}: mean |diff| {mean:.3}, max {max}");
            assert!(
                mean <= 0.25 && max <= 1,
                "{name} → {size}: mean {mean}, max {max}"
            );
        }
    }
}

#[test]
fn cifar_training_augmentation_is_a_padded_crop_maybe_flipped() {
    let img = coords(32, 32);
    let pipeline = Pipeline::new(
        Augmentation::CifarTrain { padding: 4 },
        Normalization::PerChannel(Normalize::IMAGENET),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut flips = 0;
    for _ in 0..200 {
        let out = pipeline.augment(&img, &mut rng);
        assert_eq!(out.dimensions(), (32, 32));
        // Find the source of the output's centre pixel: it must be a shift of at most 4 (and maybe mirrored).
        let p = out.get_pixel(16, 16).0;
        let (sx, sy) = (p[0] as i32, p[1] as i32);
        assert!((sy - 16).abs() <= 4);
        let right = out.get_pixel(17, 16).0[0] as i32;
        if right < sx {
            flips += 1;
            assert!((sx - 15).abs() <= 4, "mirrored centre from x={sx}");
        } else {
            assert!((sx - 16).abs() <= 4, "centre from x={sx}");
        }
    }
    assert!((70..130).contains(&flips), "{flips} flips of 200");
}

#[test]
fn same_seed_gives_identical_batches_whatever_the_thread_count() {
    let split = DataSource::open(&cifar10_jpg_root()).unwrap().test.unwrap();
    let split = split.subset(&(0..600).collect::<Vec<_>>());
    let pipeline = Pipeline::new(
        Augmentation::CifarTrain { padding: 4 },
        Normalization::PerChannel(Normalize::IMAGENET),
    );
    let make = |threads, seed| {
        let config = LoaderConfig {
            batch_size: 64,
            seed,
            threads,
            prefetch: 2,
            ..Default::default()
        };
        Loader::new(split.clone(), pipeline.clone(), config).unwrap()
    };
    let (one, two, other) = (make(1, 7), make(2, 7), make(2, 8));
    for epoch in 0..2 {
        let a: Vec<_> = one.epoch(epoch, 0).map(Result::unwrap).collect();
        let b: Vec<_> = two.epoch(epoch, 0).map(Result::unwrap).collect();
        let c: Vec<_> = other.epoch(epoch, 0).map(Result::unwrap).collect();
        assert_eq!(a.len(), 10);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.indices, y.indices);
            assert_eq!(x.labels, y.labels);
            assert_eq!(x.images, y.images);
        }
        assert_ne!(
            a[0].indices, c[0].indices,
            "another seed shuffles differently"
        );
        // Resuming mid-epoch gives the same remaining batches.
        let resumed: Vec<_> = two.epoch(epoch, 4).map(Result::unwrap).collect();
        assert_eq!(resumed[0].images, a[4].images);
    }
    let (e0, e1) = (one.order(0), one.order(1));
    assert_ne!(e0, e1, "each epoch has its own order");
}

/// A global batch is the same images and pixels whether one loader yields it as micro-batches or ranks take it
/// slice by slice: 2 ranks × 2 micro-batches of 16 = 1 rank × 4 micro-batches = the plain loader's 4 batches.
#[test]
fn shards_of_a_global_batch_are_the_same_images_whatever_the_world_size() {
    use datasets::Shard;
    let split = DataSource::open(&cifar10_jpg_root()).unwrap().test.unwrap();
    let split = split.subset(&(0..200).collect::<Vec<_>>());
    let pipeline = Pipeline::new(
        Augmentation::CifarTrain { padding: 4 },
        Normalization::PerChannel(Normalize::CIFAR10),
    );
    let make = |rank, ranks, micro_batches| {
        let config = LoaderConfig {
            batch_size: 16,
            seed: 3,
            drop_last: true,
            shard: Shard {
                rank,
                ranks,
                micro_batches,
            },
            ..Default::default()
        };
        Loader::new(split.clone(), pipeline.clone(), config).unwrap()
    };
    let plain: Vec<_> = make(0, 1, 1).epoch(1, 0).map(Result::unwrap).collect();
    let alone = make(0, 1, 4);
    let (rank0, rank1) = (make(0, 2, 2), make(1, 2, 2));
    // 200 images: 3 global batches of 64; 12 micro-batches of 16 for one rank, 6 for each of two.
    assert_eq!((plain.len(), alone.steps_per_epoch()), (12, 3));
    assert_eq!((rank0.batches_per_epoch(), rank0.steps_per_epoch()), (6, 3));
    let alone: Vec<_> = alone.epoch(1, 0).map(Result::unwrap).collect();
    let (r0, r1): (Vec<_>, Vec<_>) = (
        rank0.epoch(1, 0).map(Result::unwrap).collect(),
        rank1.epoch(1, 0).map(Result::unwrap).collect(),
    );
    for step in 0..3 {
        for k in 0..4 {
            let global = &plain[step * 4 + k];
            let sharded = if k < 2 {
                &r0[step * 2 + k]
            } else {
                &r1[step * 2 + k - 2]
            };
            for batch in [&alone[step * 4 + k], sharded] {
                assert_eq!(batch.indices, global.indices);
                assert_eq!(batch.images, global.images, "step {step}, micro-batch {k}");
            }
        }
    }
    // A resumed rank starts at its own micro-batch `start`: step 2 of rank 1.
    let resumed: Vec<_> = rank1.epoch(1, 4).map(Result::unwrap).collect();
    assert_eq!(resumed[0].indices, plain[10].indices);
}

#[test]
fn random_resized_crop_boxes_respect_scale_ratio_and_bounds() {
    use datasets::transforms::random_resized_crop_box;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..2000 {
        let (x, y, w, h) =
            random_resized_crop_box((500, 375), (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert!(x + w <= 500 && y + h <= 375 && w > 0 && h > 0);
        let area = (w * h) as f64 / (500.0 * 375.0);
        let ratio = w as f64 / h as f64;
        // Rounding of the sides moves area and ratio slightly off the sampled values.
        assert!((0.075..=1.0).contains(&area), "area {area}");
        assert!((0.74..=1.345).contains(&ratio), "ratio {ratio}");
    }
    // No box fits a 1000×10 strip in 10 tries: torchvision's fallback is a centred crop at the clamped ratio
    // (4/3 here): width round(10 · 4/3) = 13, height 10, at x = (1000 − 13) / 2 = 493.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    assert_eq!(
        random_resized_crop_box((1000, 10), (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng),
        (493, 0, 13, 10)
    );
}

#[test]
fn pca_lighting_adds_one_colour_shift_along_the_eigenvectors() {
    use datasets::transforms::lighting;
    const EIGVAL: [f32; 3] = [0.2175, 0.0188, 0.0045];
    const EIGVEC: [[f32; 3]; 3] = [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut alphas = Vec::new();
    for _ in 0..4000 {
        let mut chw = vec![0.5f32; 3 * 4];
        lighting(&mut chw, 4, 0.1, &mut rng);
        // Every pixel of a channel moves by the same amount …
        let shift: Vec<f32> = (0..3).map(|c| chw[c * 4] - 0.5).collect();
        for c in 0..3 {
            assert!(chw[c * 4..(c + 1) * 4]
                .iter()
                .all(|v| (v - 0.5 - shift[c]).abs() < 1e-6));
        }
        // … and shift = V·(α ⊙ λ): solve for α with Vᵀ (V is orthonormal to 4 decimals).
        let alpha: Vec<f32> = (0..3)
            .map(|k| (0..3).map(|c| EIGVEC[c][k] * shift[c]).sum::<f32>() / EIGVAL[k])
            .collect();
        alphas.push(alpha);
    }
    for k in 0..3 {
        let n = alphas.len() as f32;
        let mean = alphas.iter().map(|a| a[k]).sum::<f32>() / n;
        let std = (alphas.iter().map(|a| (a[k] - mean).powi(2)).sum::<f32>() / n).sqrt();
        assert!(
            mean.abs() < 0.01 && (std - 0.1).abs() < 0.01,
            "α_{k}: mean {mean}, std {std} (expected N(0, 0.1²))"
        );
    }
}
