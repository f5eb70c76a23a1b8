//! Thread pools: the heavy CPU ops of this crate run their parallel loops on the kernel threads
//! (`ops::parallel`: the calling thread and one fewer workers than rayon's global pool has threads, which spin
//! between loops); candle's own element-wise ops (gradient sums in backprop, the optimizer update) would run on
//! a pool of spinning workers of their own. On a small machine that pool fights the others over the cores: a
//! ResNet-20 training step measured 214–255 img/s with it and 286 img/s with candle's element-wise ops on the
//! calling thread (2 cores, batch 128).

/// Runs candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`) unless the user set
/// `CANDLE_NUM_THREADS`. Call first thing in `main`, before any tensor exists (candle reads it once).
pub fn use_one_compute_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY (edition 2021: safe fn): called at the start of `main`, before other threads exist.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// On the CPU, runs `f` on a worker of rayon's global pool (inline when already on one) and waits for it. The
/// ops inside fork and join many times per forward pass; forked from a thread outside the pool, each join parks
/// that thread and wakes it again (ResNet-50, batch 1: ~470 context switches per image, ~85 from a worker;
/// 16.2–17.4 → 17.2–17.9 img/s). Other devices run `f` on the calling thread, where their context lives.
pub fn on_pool<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Threads the CPU kernels run on: as many as rayon's global pool has (`RAYON_NUM_THREADS`, else one per core).
pub fn kernel_threads() -> usize {
    rayon::current_num_threads()
}
