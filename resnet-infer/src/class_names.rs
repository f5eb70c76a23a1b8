//! Class names shipped in the binary: ImageNet-1k (torchvision/timm order) and CIFAR-10.

const IMAGENET_TSV: &str = include_str!("../assets/imagenet1k-classes.tsv");

/// The 1000 ImageNet class names, index = torchvision's class index.
pub fn imagenet() -> Vec<String> {
    IMAGENET_TSV
        .lines()
        .skip(1)
        .filter_map(|line| line.split('\t').nth(2).map(str::to_string))
        .collect()
}

pub fn cifar10() -> Vec<String> {
    datasets::cifar_binary::CIFAR10_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Names for a head of `classes` outputs: ImageNet for 1000, CIFAR-10 for 10, indices otherwise.
pub fn for_head(classes: usize) -> Vec<String> {
    match classes {
        1000 => imagenet(),
        10 => cifar10(),
        n => (0..n).map(|i| format!("class {i}")).collect(),
    }
}
