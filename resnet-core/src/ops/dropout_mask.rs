//! The scaled keep mask of a dropout as a pure function of a key and each element's index (SplitMix64), so
//! that a mask is the same whatever the thread count, and the same again when recomputation runs a forward
//! a second time within one step.

use crate::ops::parallel::for_each_chunk;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// SplitMix64's finaliser: a well-mixed 64-bit value of `z`.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A key from the parts that make one draw distinct (seed, layer, step).
pub fn key(parts: &[u64]) -> u64 {
    parts.iter().fold(0x9e37_79b9_7f4a_7c15, |k, &p| {
        mix(k ^ p.wrapping_add(0x9e37_79b9_7f4a_7c15))
    })
}

/// `len` values, each 0 with probability `rate` and 1/(1 − rate) otherwise (inverted dropout, as
/// `torch.nn.Dropout`), from `key`.
pub fn keep_mask(len: usize, rate: f64, key: u64) -> Vec<f32> {
    let scale = (1.0 / (1.0 - rate)) as f32;
    // An element is kept when its 53-bit uniform draw is at least `rate`.
    let threshold = (rate * (1u64 << 53) as f64) as u64;
    let mut mask = vec![0f32; len];
    for_each_chunk(&mut mask, CHUNK, |c, chunk| {
        for (i, m) in chunk.iter_mut().enumerate() {
            let index = (c * CHUNK + i) as u64;
            let draw = mix(key ^ mix(index)) >> 11;
            *m = if draw >= threshold { scale } else { 0.0 };
        }
    });
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_minus_rate_of_the_values_scaled_by_its_inverse() {
        for rate in [0.0, 0.25, 0.5, 0.9] {
            let mask = keep_mask(200_000, rate, key(&[3, 1, 4]));
            let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / mask.len() as f64;
            assert!(
                (kept - (1.0 - rate)).abs() < 0.01,
                "rate {rate}: kept {kept}"
            );
            let scale = (1.0 / (1.0 - rate)) as f32;
            assert!(mask.iter().all(|&m| m == 0.0 || m == scale));
        }
    }

    #[test]
    fn the_same_key_gives_the_same_mask_and_another_key_another() {
        let a = keep_mask(50_000, 0.5, key(&[0, 7, 2]));
        assert_eq!(a, keep_mask(50_000, 0.5, key(&[0, 7, 2])));
        let b = keep_mask(50_000, 0.5, key(&[0, 7, 3]));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
        assert!((same - 0.5).abs() < 0.02, "{same}");
    }
}
