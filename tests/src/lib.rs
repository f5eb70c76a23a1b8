//! Helpers shared by the integration tests: where `../shared` is, and PyTorch-style tolerance checks.
//!
//! Tests that need a fixture fail loudly when it is missing: they never skip.

pub mod mock_hub;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use resnet_core::ops::isa::Isa;
use std::collections::HashMap;
use std::path::PathBuf;

/// `$RESNET_SHARED`, or `../shared` beside the repository.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("RESNET_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// A file under `shared/`, which must exist.
pub fn shared(rel: &str) -> PathBuf {
    let path = shared_dir().join(rel);
    assert!(
        path.exists(),
        "required fixture {} is missing (set RESNET_SHARED to the shared/ folder)",
        path.display()
    );
    path
}

/// All tensors of a fixture file, in f32 on the CPU.
pub fn load_fixture(rel: &str) -> Result<HashMap<String, Tensor>> {
    let path = shared(rel);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype().is_float() {
                v.to_dtype(DType::F32)?
            } else {
                v
            };
            Ok((k, v))
        })
        .collect()
}

/// Tensors whose names start with `prefix`, with the prefix removed.
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

pub fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    max_abs(&(a - b)?)
}

/// ‖a − b‖ / ‖b‖ (Frobenius).
pub fn rel_norm_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok(norm(&(a - b)?)? / norm(b)?.max(f32::MIN_POSITIVE))
}

/// ‖t‖ (Frobenius).
pub fn norm(t: &Tensor) -> Result<f32> {
    Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())
}

/// The real CIFAR-10 JPEG images of `../shared/data`, extracted once into the target folder:
/// `ROOT/train/<class>/*.jpg` and `ROOT/test/<class>/*.jpg`.
pub fn cifar10_jpg_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let root = test_data_dir().join("cifar10-jpg");
        for split in ["train", "test"] {
            if root.join(split).join("truck").is_dir() {
                continue;
            }
            let archive = shared(&format!("data/cifar10-jpg-{split}.tar.gz"));
            // Extract beside, then rename: concurrent test binaries never see a half-extracted folder.
            let tmp = root.join(format!(".{split}-{}", std::process::id()));
            std::fs::create_dir_all(&tmp).unwrap();
            let status = std::process::Command::new("tar")
                .arg("xzf")
                .arg(&archive)
                .arg("-C")
                .arg(&tmp)
                .status()
                .expect("running tar");
            assert!(status.success(), "tar failed on {}", archive.display());
            let _ = std::fs::rename(tmp.join(split), root.join(split));
            let _ = std::fs::remove_dir_all(&tmp);
        }
        root
    })
    .clone()
}

/// A fresh temporary folder for one test, `target/test-data/NAME-PID`. The folders that earlier runs left under
/// the same name are removed first, so scratch space stays one run's worth (~0.5 GB) instead of piling up.
pub fn temp_dir(name: &str) -> PathBuf {
    let prefix = format!("{name}-");
    if let Ok(entries) = std::fs::read_dir(test_data_dir()) {
        for entry in entries.flatten() {
            let file = entry.file_name();
            let earlier_run = file
                .to_str()
                .and_then(|f| f.strip_prefix(&prefix))
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
            if earlier_run {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = test_data_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Scratch space of the tests: `target/test-data` of the workspace.
pub fn test_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-data")
}

/// The same caching allocator as the binaries, so full-size parity tests run at the binaries' speed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A command that failed as users should see it: exit ≠ 0, no panic, one stderr line `error: …` naming `needle`.
pub fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the command should have failed:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(
        lines[0].starts_with("error:") && lines[0].contains(needle),
        "expected `{needle}` in:\n{stderr}"
    );
}

/// Runs `cmd` with a standard output that nobody reads (as `cmd | head -0`) and asserts that the process ended as
/// a C program does there: killed by SIGPIPE at its first write, with no panic on stderr.
pub fn assert_quiet_on_closed_stdout(cmd: &mut std::process::Command) {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the command");
    // Nobody reads: the first write after this fails with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waiting for the command");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{:?}: {stderr}",
            out.status
        );
    }
}

/// A small ImageFolder of the real CIFAR-10 JPEGs under `temp_dir(name)`: the first `train` training and `test`
/// test images of each class (symlinks; 0 leaves the split out).
pub fn small_cifar(name: &str, train: usize, test: usize) -> PathBuf {
    let src = cifar10_jpg_root();
    let root = temp_dir(name);
    for (split, n) in [("train", train), ("test", test)] {
        if n == 0 {
            continue;
        }
        for class in datasets::cifar_binary::CIFAR10_CLASSES {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            let mut files: Vec<PathBuf> = std::fs::read_dir(src.join(split).join(class))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files.iter().take(n) {
                std::os::unix::fs::symlink(f, dir.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    root
}

/// Tests of one binary that switch the kernel set take turns through this lock, so each sees its own.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` once on every CPU kernel set this machine has (`resnet_core::ops::isa`), narrowest first, and
/// returns to the best one.
pub fn for_each_isa(mut f: impl FnMut(Isa) -> Result<()>) -> Result<()> {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let result = Isa::available().into_iter().try_for_each(|isa| {
        resnet_core::ops::isa::select(isa)?;
        f(isa).with_context(|| format!("with the {isa} kernel set"))
    });
    resnet_core::ops::isa::select(Isa::best_available())?;
    result
}

/// Runs `f` on the best kernel set, with no other test switching sets meanwhile: for tests that compare two
/// computations of one net, which must not run on two kernel sets.
pub fn on_one_isa<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    resnet_core::ops::isa::select(Isa::best_available())?;
    f()
}
