//! The `clip` command: index, inspect, read and mount container images without Kubernetes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // glibc gives every thread its own 64 MiB malloc arena; two keep memory flat without
    // contention that matters for a process whose heavy lifting is I/O and inflate.
    // SAFETY: mallopt only tunes the allocator and is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = clip_driver::cli::Cli::parse();
    match clip_driver::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clip: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
