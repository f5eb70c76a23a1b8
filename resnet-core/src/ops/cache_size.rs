//! This CPU's per-core L2 cache size, which decides how the blocked convolution orders its tasks (whether a
//! layer's weights stay in L2 beside its input rows).

use std::sync::OnceLock;

/// Assumed where the system does not say (the smallest L2 of the x86 cores these kernels were measured on,
/// AMD Zen 2 and 3).
const DEFAULT_L2_BYTES: usize = 512 * 1024;

/// The L2 cache of the first CPU in bytes: Linux's `/sys/devices/system/cpu/cpu0/cache/index*/` entry of level
/// 2, else [`DEFAULT_L2_BYTES`]. Read once.
pub(crate) fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| read_l2_bytes().unwrap_or(DEFAULT_L2_BYTES))
}

fn read_l2_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.flatten().find_map(|entry| {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        let level = read("level")?;
        let kind = read("type")?;
        match (level.trim(), kind.trim()) {
            ("2", "Unified" | "Data") => parse_size(&read("size")?),
            _ => None,
        }
    })
}

/// `"2048K"`, `"1M"` or a plain byte count, as sysfs writes a cache size.
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        _ => return None,
    };
    digits
        .parse::<usize>()
        .ok()
        .map(|n| n * scale)
        .filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_size("2048K\n"), Some(2 << 20));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("524288"), Some(512 << 10));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("0K"), None);
        assert_eq!(parse_size(""), None);
        assert!(l2_bytes() >= 64 << 10);
    }
}
