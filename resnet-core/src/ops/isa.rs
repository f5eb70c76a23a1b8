//! Which kernel set runs: the one place that looks at the CPU's instruction sets.
//!
//! By default the best the CPU has; `RESNET_CPU_ISA=avx512|avx2|generic` forces a narrower one (to compare
//! with a CPU that lacks AVX-512, or to check the portable code on an x86 machine). The choice covers our own
//! kernels and, through a patched gemm-common (`vendor/README.md`), the GEMMs of the `gemm` crate that both
//! we and candle call. `generic` is code without any `target_feature`: what aarch64 and other hosts run.

use crate::{ResNetError, Result};
use std::sync::atomic::{AtomicU8, Ordering};

/// A kernel set, from the most portable to the widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust (no `target_feature`); the `gemm` crate's scalar kernels on x86.
    Generic,
    /// x86-64 AVX2 with FMA: 8 lanes of f32.
    Avx2,
    /// x86-64 AVX-512F: 16 lanes of f32.
    Avx512,
}

/// The environment variable that forces a kernel set.
pub const ENV: &str = "RESNET_CPU_ISA";

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Generic, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// f32 lanes of one vector register.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Generic => 1,
            Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }

    /// The widest kernel set this CPU runs.
    pub fn best_available() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    }

    /// Every kernel set this CPU runs, narrowest first.
    pub fn available() -> Vec<Isa> {
        let best = Isa::best_available();
        Isa::ALL.into_iter().filter(|i| *i <= best).collect()
    }

    /// The kernel set in use: `RESNET_CPU_ISA` if it names one this CPU runs, else the best available (the
    /// binaries call [`select_from_env`] first, which rejects a bad value with an error).
    pub fn current() -> Isa {
        match CURRENT.load(Ordering::Relaxed) {
            UNSET => {
                let isa = from_env().unwrap_or_else(|_| Isa::best_available());
                install(isa);
                isa
            }
            v => Isa::ALL[v as usize],
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const UNSET: u8 = u8::MAX;
static CURRENT: AtomicU8 = AtomicU8::new(UNSET);

fn install(isa: Isa) {
    CURRENT.store(isa as u8, Ordering::Relaxed);
    // gemm-common's levels: 0 scalar, 1 AVX2 + FMA, 2 AVX-512.
    gemm_common::MAX_X86_ISA.store(isa as u8, Ordering::Relaxed);
}

/// The kernel set `RESNET_CPU_ISA` asks for (the best available when it is unset or empty).
pub fn from_env() -> Result<Isa> {
    match std::env::var(ENV) {
        Ok(v) if !v.is_empty() => {
            let isa = Isa::parse(&v).ok_or_else(|| {
                ResNetError::InvalidConfig(format!(
                    "{ENV}={v}: expected one of avx512, avx2, generic"
                ))
            })?;
            check_available(isa)?;
            Ok(isa)
        }
        _ => Ok(Isa::best_available()),
    }
}

fn check_available(isa: Isa) -> Result<()> {
    let best = Isa::best_available();
    if isa > best {
        return Err(ResNetError::InvalidConfig(format!(
            "{ENV}={isa}: this CPU does not run {isa} kernels (the widest it runs is {best})"
        )));
    }
    Ok(())
}

/// Uses `RESNET_CPU_ISA`'s kernel set from now on; an error names the variable and the accepted values.
pub fn select_from_env() -> Result<Isa> {
    let isa = from_env()?;
    install(isa);
    Ok(isa)
}

/// Uses `isa` from now on, in every thread (tests loop over [`Isa::available`] with it).
pub fn select(isa: Isa) -> Result<()> {
    check_available(isa)?;
    install(isa);
    Ok(())
}

/// `$portable(args)` compiled for the kernel set `$isa`: its `target_feature` entry point (module `x86`) where the
/// set has one. The callers pass `Isa::current()` or one of `Isa::available()`: a set this CPU runs.
macro_rules! on_kernel_set {
    ($isa:expr, $avx512:path, $avx2:path, $portable:path, ($($arg:expr),*)) => {{
        let isa: Isa = $isa;
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: a kernel set this CPU runs (the callers' promise above).
            Isa::Avx512 => return unsafe { $avx512($($arg),*) },
            Isa::Avx2 => return unsafe { $avx2($($arg),*) },
            Isa::Generic => {}
        }
        let _ = isa;
        $portable($($arg),*)
    }};
}
pub(crate) use on_kernel_set;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_cpu_runs_generic_code() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("sse"), None);
        assert_eq!(Isa::available()[0], Isa::Generic);
        assert_eq!(*Isa::available().last().unwrap(), Isa::best_available());
    }
}
