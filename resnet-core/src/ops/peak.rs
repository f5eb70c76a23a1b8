//! This machine's f32 FMA peak for a kernel set: a loop of independent fused multiply-adds on registers only,
//! on every thread of the pool at once. What the convolutions reach is quoted as a share of it
//! (`resnet-infer bench --peak --convs`), a figure that means the same on a core with one FMA unit as on one
//! with two.

use crate::ops::isa::Isa;
use std::time::{Duration, Instant};

/// Independent accumulators: more than FMA latency × FMA units on any current x86 core (4 × 2), and few
/// enough for AVX2's 16 registers with the two operands.
const CHAINS: usize = 12;

/// Loop iterations per timed round.
const ROUND: u64 = 1 << 22;

#[derive(Debug, Clone, Copy)]
pub struct Peak {
    pub isa: Isa,
    pub threads: usize,
    /// FLOP/s over all threads, 2 FLOPs per multiply-add, in units of 10⁹.
    pub gflops: f64,
}

/// The FMA peak of `isa` over all threads of the rayon pool, timed for at least `duration`.
pub fn fma_peak(isa: Isa, duration: Duration) -> Peak {
    let threads = rayon::current_num_threads();
    // Every thread starts together and runs rounds until the time is up; the slowest thread's count is what
    // all of them sustained at once.
    let start = Instant::now();
    let rounds = rayon::broadcast(|_| {
        let mut rounds = 0u64;
        while rounds == 0 || start.elapsed() < duration {
            std::hint::black_box(chains(isa, ROUND));
            rounds += 1;
        }
        (rounds, start.elapsed())
    });
    let flops: f64 = rounds
        .iter()
        .map(|&(r, t)| (r * ROUND) as f64 * (CHAINS * isa.lanes() * 2) as f64 / t.as_secs_f64())
        .sum();
    Peak {
        isa,
        threads,
        gflops: flops / 1e9,
    }
}

/// `iterations` rounds of `CHAINS` dependent multiply-add chains of one vector each; returns a value that
/// depends on all of them.
fn chains(isa: Isa, iterations: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa::current`/`select` never name a kernel set the CPU lacks; checked again here.
        Isa::Avx512 if std::arch::is_x86_feature_detected!("avx512f") => unsafe {
            return x86::avx512(iterations);
        },
        Isa::Avx2 if std::arch::is_x86_feature_detected!("fma") => unsafe {
            return x86::avx2(iterations);
        },
        _ => {}
    }
    let _ = isa;
    generic(iterations)
}

/// Portable code: a multiply and an add per element (no `target_feature`, so no fused instruction), counted
/// as the two FLOPs they are.
fn generic(iterations: u64) -> f32 {
    let mut acc = [1f32; CHAINS];
    let (a, b) = (
        std::hint::black_box(0.999_999f32),
        std::hint::black_box(1e-7f32),
    );
    for _ in 0..iterations {
        for v in acc.iter_mut() {
            *v = *v * a + b;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    /// `CHAINS` chains of `$fmadd` on registers of `$lanes` f32, with the set's `target_feature`.
    macro_rules! chains {
        ($name:ident, $features:literal, $v:ty, $lanes:literal, $set1:ident, $fmadd:ident) => {
            /// # Safety
            /// The CPU supports the features named.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(iterations: u64) -> f32 {
                let (a, b) = ($set1(std::hint::black_box(0.999_999)), $set1(1e-7));
                let mut acc = [$set1(1.0); CHAINS];
                for _ in 0..iterations {
                    for v in acc.iter_mut() {
                        *v = $fmadd(*v, a, b);
                    }
                }
                // SAFETY: a register of $lanes f32 has the layout of [f32; $lanes].
                acc.iter()
                    .map(|v| {
                        unsafe { std::mem::transmute::<$v, [f32; $lanes]>(*v) }
                            .iter()
                            .sum::<f32>()
                    })
                    .sum()
            }
        };
    }

    chains!(
        avx512,
        "avx512f",
        __m512,
        16,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
    chains!(avx2, "avx2,fma", __m256, 8, _mm256_set1_ps, _mm256_fmadd_ps);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_set_has_a_positive_peak() {
        let peaks: Vec<Peak> = Isa::available()
            .into_iter()
            .map(|isa| fma_peak(isa, Duration::from_millis(20)))
            .collect();
        for p in &peaks {
            assert!(p.gflops > 0.1, "{p:?}");
        }
    }
}
