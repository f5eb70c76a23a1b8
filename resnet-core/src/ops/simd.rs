//! The few vector operations the blocked kernels and BatchNorm's passes are written in, for each kernel set: 16 lanes of AVX-512,
//! 8 of AVX2, and 8 plain `f32`s for portable code. A kernel is one generic `#[inline(always)]` function over
//! [`Simd`]; a `#[target_feature]` entry point per set instantiates it, so the intrinsics inline into code
//! compiled for that set.

/// One vector register of f32 lanes.
pub(crate) trait Simd: Copy {
    /// f32 lanes: the channel block of the layout this set runs.
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// `p[0], p[2], …, p[2·LANES − 2]`, reading the `2·LANES` values from `p`.
    unsafe fn load_even(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// Every lane `*p`.
    unsafe fn splat(p: *const f32) -> Self;
    /// `self · b + c`, one rounding where the set has FMA.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    /// Lane by lane `b` where `self` or `b` is NaN (x86's `max`; with a finite `b`, what `f32::max` gives).
    unsafe fn max(self, b: Self) -> Self;
    /// `self` where `!(mask <= 0)` (positive or NaN), else 0: a ReLU's gradient, `mask` its output.
    unsafe fn where_positive(self, mask: Self) -> Self;
}

/// Eight `f32`s in plain Rust: the portable set (no `target_feature`; `mul_add` is an unfused `a·b + c`, as
/// a compiler emits for targets without FMA).
#[derive(Clone, Copy)]
pub(crate) struct Portable([f32; 8]);

impl Simd for Portable {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn load_even(p: *const f32) -> Self {
        let pairs = unsafe { p.cast::<[f32; 16]>().read_unaligned() };
        Portable(std::array::from_fn(|i| pairs[2 * i]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { p.cast::<[f32; 8]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        Portable([unsafe { *p }; 8])
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * b.0[i] + c.0[i]))
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + b.0[i]))
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] - b.0[i]))
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * b.0[i]))
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i].max(b.0[i])))
    }
    #[inline(always)]
    unsafe fn where_positive(self, mask: Self) -> Self {
        Portable(std::array::from_fn(|i| match mask.0[i] <= 0.0 {
            true => 0.0,
            false => self.0[i],
        }))
    }
}

/// `unsafe fn run_on_isa(isa: Isa, job: $job)`: the calling file's generic `run_on::<S: Simd>(job: $job)` on the
/// kernel set `isa`, each x86 set's copy compiled with its target features (in `mod x86`) so that the `Simd`
/// methods inline into it. `$job` is the job type, a sibling of `run_on`; callers check the operands first.
macro_rules! kernel_set_dispatch {
    ($job:ident) => {
        /// # Safety
        /// `isa` is a set this CPU runs; the job's operands are as `run_on` requires.
        unsafe fn run_on_isa(isa: $crate::ops::isa::Isa, job: $job) {
            #[cfg(target_arch = "x86_64")]
            match isa {
                $crate::ops::isa::Isa::Avx512 => return unsafe { x86::run_avx512(job) },
                $crate::ops::isa::Isa::Avx2 => return unsafe { x86::run_avx2(job) },
                $crate::ops::isa::Isa::Generic => {}
            }
            let _ = isa;
            unsafe { run_on::<$crate::ops::simd::Portable>(job) }
        }

        #[cfg(target_arch = "x86_64")]
        mod x86 {
            use super::{run_on, $job};
            use $crate::ops::simd::{Avx2, Avx512};

            /// # Safety
            /// The CPU has AVX2 and FMA; the job's operands are as `run_on` requires.
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn run_avx2(job: $job) {
                unsafe { run_on::<Avx2>(job) }
            }

            /// # Safety
            /// The CPU has AVX-512F; the job's operands are as `run_on` requires.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn run_avx512(job: $job) {
                unsafe { run_on::<Avx512>(job) }
            }
        }
    };
}
pub(crate) use kernel_set_dispatch;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{transpose_8x8, Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// `dst[c·dst_stride + r] = src[r·src_stride + c]` for `r, c < 8`: a channel block's 8 rows to 8 pixels of
    /// 8 channels, or back, as 8 loads, 24 shuffles and 8 stores (the element-by-element copy took 14 % of a
    /// ResNet-20 training step with AVX2, AMD EPYC Zen 2).
    ///
    /// # Safety
    /// AVX2; the 8 rows of 8 values at `src` and at `dst` are in bounds.
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose_8x8(
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
            // Pairs of rows interleaved, then quadruples, then the 128-bit halves exchanged.
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (
                    r[2 * (i / 2 % 2) + 4 * (i / 4)],
                    r[2 * (i / 2 % 2) + 4 * (i / 4) + 1],
                );
                match i % 2 {
                    0 => _mm256_unpacklo_ps(a, b),
                    _ => _mm256_unpackhi_ps(a, b),
                }
            });
            // t[4q + 2j + h] = unpack{lo,hi}(r[4q + 2j], r[4q + 2j + 1]); s[4q + 2h + m] takes lanes m of t[4q + h]
            // and t[4q + 2 + h].
            let s: [__m256; 8] = std::array::from_fn(|i| {
                let (q, h, m) = (i / 4, i / 2 % 2, i % 2);
                let (a, b) = (t[4 * q + h], t[4 * q + 2 + h]);
                match m {
                    0 => _mm256_shuffle_ps::<0x44>(a, b),
                    _ => _mm256_shuffle_ps::<0xEE>(a, b),
                }
            });
            for c in 0..8 {
                let (a, b) = (s[c % 4], s[4 + c % 4]);
                let v = match c / 4 {
                    0 => _mm256_permute2f128_ps::<0x20>(a, b),
                    _ => _mm256_permute2f128_ps::<0x31>(a, b),
                };
                _mm256_storeu_ps(dst.add(c * dst_stride), v);
            }
        }
    }

    /// `__m256` with FMA.
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256);

    impl Simd for Avx2 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn load_even(p: *const f32) -> Self {
            unsafe {
                // [a0 a2 b0 b2 | a4 a6 b4 b6], then its 64-bit quarters in the order 0, 2, 1, 3.
                let mixed =
                    _mm256_shuffle_ps::<0x88>(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                Avx2(_mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(
                    _mm256_castps_pd(mixed),
                )))
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            Avx2(unsafe { _mm256_broadcast_ss(&*p) })
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_sub_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_mul_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            Avx2(unsafe { _mm256_max_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn where_positive(self, mask: Self) -> Self {
            // All ones where !(mask <= 0), unordered included.
            Avx2(unsafe {
                _mm256_and_ps(
                    self.0,
                    _mm256_cmp_ps::<_CMP_NLE_UQ>(mask.0, _mm256_setzero_ps()),
                )
            })
        }
    }

    /// `__m512`.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Simd for Avx512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn load_even(p: *const f32) -> Self {
            unsafe {
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let (lo, hi) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                Avx512(_mm512_permutex2var_ps(lo, even, hi))
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            Avx512(unsafe { _mm512_set1_ps(*p) })
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_sub_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_mul_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            Avx512(unsafe { _mm512_max_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn where_positive(self, mask: Self) -> Self {
            let keep = unsafe { _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(mask.0, _mm512_setzero_ps()) };
            Avx512(unsafe { _mm512_maskz_mov_ps(keep, self.0) })
        }
    }
}
