//! The library behind the `resnet-infer` binary: loading weights from anywhere, evaluation, classification.

pub mod bench;
pub mod class_names;
pub mod conv_bench;
pub mod evaluate;
pub mod heap;
pub mod hub;
pub mod loading;
pub mod metrics;

pub use evaluate::{choose_normalization, evaluate, EvalDataset, EvalOptions, EvalReport};
pub use loading::{load_model, LoadedModel};

/// Keeps freed memory for reuse instead of handing it back to the OS: a training or inference loop frees and
/// reallocates the same large activation buffers every step, and re-faulting their pages cost ~10 % of a step.
/// Call first thing in `main` of a binary whose global allocator is mimalloc.
pub fn keep_freed_memory() {
    // Indices of mimalloc v2's `mi_option_e` (c_src/mimalloc/v2/include/mimalloc.h in libmimalloc-sys 0.1.49).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const ARENA_RESERVE: libmimalloc_sys::mi_option_t = 23;
    // SAFETY: plain option setters of the allocator, valid at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        // KiB: one 4 GiB arena of address space (committed only as used).
        libmimalloc_sys::mi_option_set(ARENA_RESERVE, 4 << 20);
    }
}

/// Ends the process quietly when its standard output is closed (`resnet-infer bench … | head -1`), as a C
/// program does, instead of a panic with a backtrace from `println!`: Rust ignores SIGPIPE by default.
pub fn exit_quietly_when_stdout_closes() {
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Parses the command line; a usage error is printed as one `error: …` line (exit 2), help and version as usual.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            // One line: clap's message up to its usage block, so that a missing argument is named too
            // ("… were not provided: --model <MODEL>").
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            match message.is_empty() {
                true => eprintln!("error: invalid arguments"),
                false => eprintln!("{}", message.join(" ")),
            }
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}
