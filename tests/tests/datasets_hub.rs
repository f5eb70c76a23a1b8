//! CIFAR-10/100 from the Hugging Face hub (`--data hub:OWNER/REPO`), served by a loopback mock hub that the test
//! starts: parquet files laid out like uoft-cs/cifar10 and uoft-cs/cifar100 (made by pyarrow from the 20 original
//! CIFAR-10 test PNGs), the cache on a second call with the server down, offline mode, bad specs and files.
//!
//! One test function: the hub client reads its endpoint and cache from the environment of the process.

use datasets::cifar_binary::CIFAR10_CLASSES;
use datasets::{DataSource, DatasetKind};
use std::path::Path;
use tests::mock_hub::{cifar_dataset_files, MockHub};
use tests::{shared, temp_dir};

/// The 20 PNGs, in name order, as (CHW bytes, label).
fn original_pngs() -> Vec<(Vec<u8>, u32)> {
    let dir = shared("data/cifar10-test-png");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap();
            let label = name.rsplit('-').next().unwrap().parse().unwrap();
            let rgb = image::open(p).unwrap().into_rgb8();
            let mut chw = vec![0u8; 3072];
            for (i, px) in rgb.pixels().enumerate() {
                for c in 0..3 {
                    chw[c * 1024 + i] = px.0[c];
                }
            }
            (chw, label)
        })
        .collect()
}

fn open(spec: &str) -> datasets::Result<DataSource> {
    DataSource::open(Path::new(spec))
}

#[test]
fn cifar_from_a_mock_hub() {
    let home = temp_dir("hub-datasets");
    let mut files = cifar_dataset_files();
    let garbage = home.join("garbage.parquet");
    std::fs::write(&garbage, b"PAR1 this is not parquet").unwrap();
    files.insert(
        "datasets/bad/cifar10/plain_text/test-00000-of-00001.parquet".into(),
        garbage,
    );
    let mut hub = MockHub::start(files);
    std::env::set_var("HF_ENDPOINT", hub.endpoint());
    std::env::set_var("HF_HOME", home.join("hf"));
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_HUB_CACHE");

    let originals = original_pngs();
    let check_cifar10 = |source: &DataSource| {
        assert_eq!(source.kind, DatasetKind::Cifar10);
        assert_eq!(source.classes(), CIFAR10_CLASSES);
        let (train, test) = (
            source.train.as_ref().unwrap(),
            source.test.as_ref().unwrap(),
        );
        assert_eq!((train.len(), test.len()), (12, 8));
        for (split, offset) in [(train, 0), (test, 12)] {
            for i in 0..split.len() {
                let (chw, label) = &originals[offset + i];
                assert_eq!(split.label(i), *label, "label of row {i}");
                let rgb = split.image(i).unwrap();
                let pixels: Vec<u8> = (0..3)
                    .flat_map(|c| rgb.pixels().map(move |p| p.0[c]))
                    .collect();
                assert_eq!(
                    &pixels, chw,
                    "pixels of row {i} differ from the original PNG"
                );
            }
        }
        assert!(
            source
                .summary()
                .starts_with("CIFAR-10 parquet (hub:uoft-cs/cifar10)"),
            "{}",
            source.summary()
        );
    };
    // Evaluation fetches the test split only.
    let test_only = DataSource::open_test(Path::new("hub:uoft-cs/cifar10")).unwrap();
    assert!(test_only.train.is_none());
    assert_eq!(test_only.test.as_ref().unwrap().len(), 8);
    let source = open("hub:uoft-cs/cifar10").unwrap();
    check_cifar10(&source);

    // CIFAR-100: fine labels and their names from the datasets library's schema metadata.
    let c100 = open("hub:uoft-cs/cifar100@main").unwrap();
    assert_eq!(c100.kind, DatasetKind::Cifar100);
    assert_eq!(c100.classes().len(), 100);
    assert_eq!(c100.classes()[37], "fine_37");
    let test = c100.test.as_ref().unwrap();
    assert_eq!(test.label(0), originals[12].1 * 10 + 7);

    // A file that is not parquet, and a repository without the files: errors naming them.
    let err = open("hub:bad/cifar10").unwrap_err().to_string();
    assert!(
        err.contains("test-00000-of-00001.parquet") && err.contains("parquet"),
        "{err}"
    );
    let err = open("hub:nobody/cifar10").unwrap_err().to_string();
    assert!(
        err.contains("nobody/cifar10") && err.contains("plain_text/test-00000-of-00001.parquet"),
        "{err}"
    );
    for bad in ["hub:", "hub:noslash", "hub:a/b/c", "hub:a/b@", "hub:a/b:"] {
        let err = open(bad).unwrap_err().to_string();
        assert!(err.contains("expected hub:OWNER/REPO"), "{bad}: {err}");
    }

    // Server down: the cached files are used, nothing is requested.
    let served = hub.requests();
    hub.shut_down();
    check_cifar10(&open("hub:uoft-cs/cifar10").unwrap());
    assert_eq!(hub.requests(), served);

    // Offline mode: the cache still answers; a repository never fetched is a clear error.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    check_cifar10(&open("hub:uoft-cs/cifar10").unwrap());
    let err = open("hub:other/cifar10").unwrap_err().to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("other/cifar10"),
        "{err}"
    );
    std::env::remove_var("HF_HUB_OFFLINE");
}
