//! The kernels' parallel loops: `task(i)` for every `i < n`, on the calling thread and the kernel threads.
//!
//! rayon's idle workers sleep after a few dozen yields, and a sleeping thread on a virtual CPU that halted takes
//! tens of microseconds to wake: an empty 200 µs loop of 80 tasks cost 243 µs with rayon, 206 µs here (2-core
//! Intel Xeon VM, median of 200). ResNet-50 at batch 1 runs ~150 loops per image. So, as OpenMP runtimes and
//! ONNX Runtime's pool do, the kernel threads spin (yielding their core to any other runnable thread) for
//! [`SPIN_FOR`] after each loop before they park, and the caller works on the loop too.
//!
//! Which thread runs a task never changes what it computes (tasks write disjoint outputs from the same inputs),
//! so results do not depend on the thread count. A loop started inside another loop's task, or on a thread that
//! runs on rayon's own ([`on_rayon`], passes side by side), or while another thread's loop runs, goes to rayon
//! instead; a pool of one thread (`RAYON_NUM_THREADS=1`, a one-thread `install`) runs it inline.

use rayon::prelude::*;
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a kernel thread spins for the next loop before it parks (100 µs ran level with 1 ms: ResNet-50
/// inference at batch 1, 4 alternated rounds, and ResNet-20 training, 3; Intel Xeon, 2 cores).
const SPIN_FOR: Duration = Duration::from_millis(1);

/// A loop's body as the kernel threads see it (a borrow that outlives the loop, see [`Pool::run`]).
type Task = *const (dyn Fn(usize) + Sync);

thread_local! {
    /// Whether this thread's loops go to rayon: inside a task of a loop, or under [`on_rayon`].
    static ON_RAYON: Cell<bool> = const { Cell::new(false) };
}

/// `task(i)` for every `i < n`, in runs of at least `min_len` consecutive indices per claim.
pub fn for_each_index(n: usize, min_len: usize, task: impl Fn(usize) + Sync) {
    let min_len = min_len.max(1);
    let threads = rayon::current_num_threads();
    if n <= min_len || threads == 1 {
        return (0..n).for_each(task);
    }
    if ON_RAYON.get() || n > u32::MAX as usize {
        return (0..n).into_par_iter().with_min_len(min_len).for_each(&task);
    }
    match pool(threads).filter(|p| !p.busy.swap(true, Acquire)) {
        Some(p) => p.run(n, min_len, &task),
        None => (0..n).into_par_iter().with_min_len(min_len).for_each(&task),
    }
}

/// `f(i, chunk)` for the `len`-long chunks of `data` (the last may be shorter), as [`for_each_index`].
pub fn for_each_chunk<T: Send>(data: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_chunk_in_runs(data, len, 1, f)
}

/// [`for_each_chunk`] in runs of at least `min_chunks` consecutive chunks per claim.
pub fn for_each_chunk_in_runs<T: Send>(
    data: &mut [T],
    len: usize,
    min_chunks: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let (base, total) = (SendPtr(data.as_mut_ptr()), data.len());
    let base = &base;
    for_each_index(total.div_ceil(len.max(1)), min_chunks, |i| {
        let start = i * len;
        // SAFETY: chunks `[i·len, min((i+1)·len, total))` are disjoint and inside `data`, borrowed mutably
        // for the whole loop.
        let chunk =
            unsafe { std::slice::from_raw_parts_mut(base.0.add(start), len.min(total - start)) };
        f(i, chunk)
    })
}

/// `[f(0), f(1), …, f(n − 1)]`, computed as [`for_each_index`] (the order of the results is the indices').
pub fn map_indices<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for_each_chunk(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
    out.into_iter().flatten().collect()
}

/// `f()` with this thread's loops on rayon: for work that already runs side by side on rayon's workers (one
/// pass of a large batch per thread), where the kernel threads would only take cores from them.
pub fn on_rayon<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the flag back, also when `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON_RAYON.set(self.0);
        }
    }
    let _restore = Restore(ON_RAYON.replace(true));
    f()
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand out disjoint chunks (see `for_each_chunk`).
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// The kernel threads (one fewer than rayon's pool: the caller is the last), started on the first loop.
fn pool(threads: usize) -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| Pool::start(threads - 1))
}

struct Pool {
    /// Set while a loop runs (one at a time).
    busy: AtomicBool,
    /// Bumped to start a loop.
    generation: AtomicUsize,
    /// The indices of the running loop not yet taken, one contiguous share per participant (the caller's
    /// first): neighbouring tasks read the same weights, and a thread that runs its neighbours finds them in
    /// its cache (taking indices in turn made ResNet-50's wide 7×7 layers ~15 % slower at batch 1).
    shares: Vec<Share>,
    min_len: AtomicUsize,
    task: UnsafeCell<Task>,
    workers: Vec<Worker>,
}

struct Worker {
    thread: Thread,
    /// The last generation this worker finished.
    done: AtomicUsize,
    parked: AtomicBool,
    /// Whether a task panicked on it in the last generation.
    panicked: AtomicBool,
}

// SAFETY: `task` is written by the one caller holding `busy` before it bumps `generation` and read by the
// workers only between seeing that generation and reporting it done, which the caller waits for.
unsafe impl Sync for Pool {}
unsafe impl Send for Pool {}

impl Pool {
    fn start(workers: usize) -> Option<&'static Pool> {
        if workers == 0 {
            return None;
        }
        let (senders, threads): (Vec<_>, Vec<_>) = (0..workers)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel::<&'static Pool>();
                let handle = std::thread::Builder::new()
                    .name(format!("resnet-kernel-{i}"))
                    .spawn(move || {
                        let pool = rx.recv().expect("kernel pool handed over");
                        pool.serve(i)
                    })
                    .ok()?;
                Some((tx, handle.thread().clone()))
            })
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .unzip();
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            busy: AtomicBool::new(false),
            generation: AtomicUsize::new(0),
            shares: (0..=workers).map(|_| Share::default()).collect(),
            min_len: AtomicUsize::new(1),
            task: UnsafeCell::new(&(|_: usize| {}) as &(dyn Fn(usize) + Sync)),
            workers: threads
                .into_iter()
                .map(|thread| Worker {
                    thread,
                    done: AtomicUsize::new(0),
                    parked: AtomicBool::new(false),
                    panicked: AtomicBool::new(false),
                })
                .collect(),
        }));
        for tx in senders {
            tx.send(pool).ok()?;
        }
        Some(pool)
    }

    /// Runs one loop; the caller holds `busy`.
    fn run(&self, n: usize, min_len: usize, task: &(dyn Fn(usize) + Sync)) {
        // SAFETY: the workers read `task` only until they report this generation done, which `Finish` waits
        // for before this borrow ends (also when a task panics here).
        unsafe {
            *self.task.get() = std::mem::transmute::<&(dyn Fn(usize) + Sync), Task>(task);
        }
        let parts = self.shares.len();
        for (p, share) in self.shares.iter().enumerate() {
            share.set(p * n / parts..(p + 1) * n / parts);
        }
        self.min_len.store(min_len, Relaxed);
        let generation = self.generation.fetch_add(1, SeqCst) + 1;
        for w in &self.workers {
            if w.parked.load(SeqCst) {
                w.thread.unpark();
            }
        }
        let finish = Finish {
            pool: self,
            generation,
        };
        ON_RAYON.set(true);
        self.claim(0, task);
        drop(finish);
    }

    /// Runs participant `me`'s share of the current loop, then what is left of the others' shares.
    fn claim(&self, me: usize, task: &(dyn Fn(usize) + Sync)) {
        let min_len = self.min_len.load(Relaxed);
        while let Some(run) = self.shares[me].take_front(min_len) {
            run.for_each(task);
        }
        let others = self.shares.len();
        for k in 1..others {
            let victim = &self.shares[(me + k) % others];
            while let Some(run) = victim.take_back(min_len) {
                run.for_each(task);
            }
        }
    }

    /// A kernel thread's life: wait for a generation, work on it, report it done.
    fn serve(&self, i: usize) -> ! {
        let me = &self.workers[i];
        ON_RAYON.set(true);
        let mut seen = 0;
        loop {
            seen = self.wait_past(seen, me);
            // SAFETY: written before `generation` was bumped (SeqCst), valid until `done` says `seen`.
            let task = unsafe { &*(*self.task.get()) };
            let ok = catch_unwind(AssertUnwindSafe(|| self.claim(i + 1, task))).is_ok();
            me.panicked.store(!ok, Relaxed);
            me.done.store(seen, Release);
        }
    }

    /// Spins, then parks, until the generation is past `seen`; returns it.
    fn wait_past(&self, seen: usize, me: &Worker) -> usize {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = self.generation.load(SeqCst);
            if g != seen {
                return g;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
            } else if since.elapsed() < SPIN_FOR {
                std::thread::yield_now();
            } else {
                me.parked.store(true, SeqCst);
                if self.generation.load(SeqCst) == seen {
                    std::thread::park();
                }
                me.parked.store(false, SeqCst);
                since = Instant::now();
            }
        }
    }
}

/// A range of indices `[front, back)` in one atomic, taken from the front by its owner and from the back by
/// the others.
#[derive(Default)]
struct Share(AtomicU64);

impl Share {
    fn set(&self, r: std::ops::Range<usize>) {
        self.0
            .store(((r.start as u64) << 32) | r.end as u64, Relaxed);
    }

    fn take_front(&self, len: usize) -> Option<std::ops::Range<usize>> {
        self.take(|f, b| {
            let end = (f + len).min(b);
            (f..end, end, b)
        })
    }

    fn take_back(&self, len: usize) -> Option<std::ops::Range<usize>> {
        self.take(|f, b| {
            let start = b.saturating_sub(len).max(f);
            (start..b, f, start)
        })
    }

    /// Takes the run `split(front, back)` names, leaving the front and back it names; `None` when empty.
    fn take(
        &self,
        split: impl Fn(usize, usize) -> (std::ops::Range<usize>, usize, usize),
    ) -> Option<std::ops::Range<usize>> {
        let mut now = self.0.load(Acquire);
        loop {
            let (f, b) = ((now >> 32) as usize, (now & 0xffff_ffff) as usize);
            if f >= b {
                return None;
            }
            let (run, nf, nb) = split(f, b);
            let next = ((nf as u64) << 32) | nb as u64;
            match self.0.compare_exchange_weak(now, next, AcqRel, Acquire) {
                Ok(_) => return Some(run),
                Err(seen) => now = seen,
            }
        }
    }
}

/// Waits for every worker to finish a generation, then frees the pool; re-raises a worker's panic.
struct Finish<'p> {
    pool: &'p Pool,
    generation: usize,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        ON_RAYON.set(false);
        let mut panicked = false;
        for w in &self.pool.workers {
            while w.done.load(Acquire) != self.generation {
                std::hint::spin_loop();
            }
            panicked |= w.panicked.load(Relaxed);
        }
        self.pool.busy.store(false, Release);
        if panicked && !std::thread::panicking() {
            panic!("a kernel task panicked on a kernel thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_from_any_thread_and_nested() {
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for min_len in [1, 7, 1000, 5000] {
            for_each_index(counts.len(), min_len, |i| {
                counts[i].fetch_add(1, Relaxed);
                // A loop inside a task goes to rayon.
                if i % 100 == 0 {
                    for_each_index(10, 1, |_| {});
                }
            });
        }
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for_each_index(counts.len(), 3, |i| _ = counts[i].fetch_add(1, Relaxed))
                });
            }
        });
        assert!(counts.iter().all(|c| c.load(Relaxed) == 7));
        // Uneven tasks, so that threads take from each other's shares: every index still once per loop.
        for (n, min_len) in [(2, 1), (3, 2), (37, 1), (37, 4), (200, 3)] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                for_each_index(n, min_len, |i| {
                    let spin = if i % 3 == 0 { 2000 } else { 10 };
                    (0..spin).for_each(|_| std::hint::spin_loop());
                    seen[i].fetch_add(1, Relaxed);
                });
            }
            assert!(
                seen.iter().all(|c| c.load(Relaxed) == 50),
                "n {n}, runs of {min_len}"
            );
        }
        assert_eq!(map_indices(5, |i| i * i), [0, 1, 4, 9, 16]);
        let mut v = vec![0usize; 1001];
        for_each_chunk(&mut v, 10, |i, c| c.iter_mut().for_each(|x| *x = i));
        assert!(v.iter().enumerate().all(|(j, &x)| x == j / 10));
    }

    #[test]
    fn a_panicking_task_panics_the_caller() {
        let r = std::panic::catch_unwind(|| for_each_index(64, 1, |i| assert!(i != 40, "task 40")));
        assert!(r.is_err());
        // The pool still runs loops after.
        let sum = AtomicUsize::new(0);
        for_each_index(64, 1, |i| _ = sum.fetch_add(i, Relaxed));
        assert_eq!(sum.load(Relaxed), 64 * 63 / 2);
    }
}
