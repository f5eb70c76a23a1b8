//! Dataset sources on real data: the CIFAR-10 JPEG folders, CIFAR binaries written from known pixels,
//! layout detection and its errors, and unreadable images inside a folder.

use datasets::cifar_binary::{self, CifarKind, CifarRecords, CIFAR10_CLASSES};
use datasets::{
    Augmentation, DataSource, DatasetError, DatasetKind, Loader, LoaderConfig, Normalization,
    Normalize, Pipeline,
};
use tests::{cifar10_jpg_root, temp_dir};

#[test]
fn real_cifar10_jpeg_folders_load_with_the_documented_classes() {
    let source = DataSource::open(&cifar10_jpg_root()).unwrap();
    assert_eq!(source.kind, DatasetKind::ImageFolder);
    let (train, test) = (
        source.train.as_ref().unwrap(),
        source.test.as_ref().unwrap(),
    );
    assert_eq!(train.len(), 50_000);
    assert_eq!(test.len(), 10_000);
    let classes: Vec<&str> = train.classes.iter().map(String::as_str).collect();
    assert_eq!(classes, CIFAR10_CLASSES);
    assert_eq!(train.class_counts(), vec![5_000; 10]);
    assert_eq!(test.class_counts(), vec![1_000; 10]);
    assert!(
        source
            .summary()
            .contains("10 classes, train 50000, test 10000"),
        "{}",
        source.summary()
    );
    let img = test.image(0).unwrap();
    assert_eq!(img.dimensions(), (32, 32));
}

fn known_records(n: usize, classes: u32) -> CifarRecords {
    let mut r = CifarRecords::default();
    for i in 0..n {
        r.labels.push((i as u32 * 7) % classes);
        r.pixels
            .extend((0..cifar_binary::PIXELS).map(|p| ((p * 31 + i * 17) % 256) as u8));
    }
    r
}

#[test]
fn cifar10_binary_written_from_known_pixels_reads_back_exactly() {
    let dir = temp_dir("cifar10-bin").join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let test = known_records(5, 10);
    cifar_binary::write_file(&dir.join("test_batch.bin"), CifarKind::Cifar10, &test).unwrap();
    for k in 1..=5 {
        cifar_binary::write_file(
            &dir.join(format!("data_batch_{k}.bin")),
            CifarKind::Cifar10,
            &known_records(3, 10),
        )
        .unwrap();
    }
    let source = DataSource::open(dir.parent().unwrap()).unwrap();
    assert_eq!(source.kind, DatasetKind::Cifar10);
    assert_eq!(source.train.as_ref().unwrap().len(), 15);
    let split = source.test.unwrap();
    assert_eq!(split.labels(), test.labels);
    // Pixel (x=5, y=2) of image 3: red, green, blue planes at 2·32+5 = 69, +1024, +2048.
    let img = split.image(3).unwrap();
    let p = img.get_pixel(5, 2);
    let expect = |plane: usize| ((plane * 1024 + 69) * 31 + 3 * 17) % 256;
    assert_eq!(p.0, [expect(0) as u8, expect(1) as u8, expect(2) as u8]);
}

#[test]
fn cifar100_binary_uses_the_fine_label() {
    let dir = temp_dir("cifar100-bin").join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    // Hand-made records: coarse label 19, fine label 42, then pixels.
    let mut bytes = Vec::new();
    for i in 0..4u8 {
        bytes.push(19);
        bytes.push(42 + i);
        bytes.extend(std::iter::repeat_n(i * 10, cifar_binary::PIXELS));
    }
    std::fs::write(dir.join("test.bin"), &bytes).unwrap();
    let source = DataSource::open(dir.parent().unwrap()).unwrap();
    assert_eq!(source.kind, DatasetKind::Cifar100);
    assert!(source.train.is_none());
    let split = source.test.unwrap();
    assert_eq!(split.labels(), vec![42, 43, 44, 45]);
    assert_eq!(split.image(2).unwrap().get_pixel(31, 31).0, [20, 20, 20]);
}

#[test]
fn a_cifar_file_of_the_wrong_size_names_the_file_and_the_record_size() {
    let dir = temp_dir("cifar10-bad").join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("test_batch.bin"), vec![0u8; 3073 * 2 + 100]).unwrap();
    let err = DataSource::open(dir.parent().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test_batch.bin") && err.contains("3073"),
        "{err}"
    );
}

#[test]
fn missing_or_empty_directories_say_what_was_looked_for() {
    let err = DataSource::open(&temp_dir("nothing").join("absent")).unwrap_err();
    assert!(matches!(err, DatasetError::NotFound { .. }), "{err}");
    let empty = temp_dir("empty-data");
    let err = DataSource::open(&empty).unwrap_err().to_string();
    assert!(
        err.contains("cifar-10-batches-bin") && err.contains("class folders"),
        "{err}"
    );
    std::fs::create_dir_all(empty.join("cat")).unwrap();
    let err = DataSource::open(&empty).unwrap_err().to_string();
    assert!(err.contains(empty.to_str().unwrap()), "{err}");
}

fn folder_with_bad_files() -> std::path::PathBuf {
    let root = temp_dir("bad-images");
    let good = std::fs::read(cifar10_jpg_root().join("test/cat/0000.jpg")).unwrap();
    for class in ["cat", "dog"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3 {
            std::fs::write(root.join(class).join(format!("{i}.jpg")), &good).unwrap();
        }
    }
    std::fs::write(root.join("cat/truncated.jpg"), &good[..good.len() / 3]).unwrap();
    std::fs::write(root.join("dog/garbage.png"), b"definitely not a png").unwrap();
    root
}

fn eval_pipeline() -> Pipeline {
    Pipeline::new(
        Augmentation::None,
        Normalization::PerChannel(Normalize::IMAGENET),
    )
}

#[test]
fn unreadable_images_are_skipped_and_reported() {
    let source = DataSource::open(&folder_with_bad_files()).unwrap();
    let split = source.test.unwrap();
    assert_eq!(split.len(), 8);
    let loader = Loader::new(
        split,
        eval_pipeline(),
        LoaderConfig {
            batch_size: 4,
            shuffle: false,
            ..Default::default()
        },
    )
    .unwrap();
    let images: usize = loader.epoch(0, 0).map(|b| b.unwrap().len()).sum();
    assert_eq!(images, 6);
    let skipped = loader.skipped();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped.iter().any(|s| s.contains("truncated.jpg")),
        "{skipped:?}"
    );
    assert!(
        skipped.iter().any(|s| s.contains("garbage.png")),
        "{skipped:?}"
    );
}

#[test]
fn strict_mode_stops_on_the_first_unreadable_image() {
    let split = DataSource::open(&folder_with_bad_files())
        .unwrap()
        .test
        .unwrap();
    let config = LoaderConfig {
        batch_size: 4,
        shuffle: false,
        strict: true,
        ..Default::default()
    };
    let loader = Loader::new(split, eval_pipeline(), config).unwrap();
    let err = loader
        .epoch(0, 0)
        .find_map(|b| b.err())
        .expect("strict loader must fail");
    assert!(matches!(err, DatasetError::Strict { .. }), "{err}");
    assert!(
        err.to_string().contains(".jpg") || err.to_string().contains(".png"),
        "{err}"
    );
}
