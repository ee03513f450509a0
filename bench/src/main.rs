//! clip benchmarks. Machines are noisy: every figure is printed next to a baseline measured
//! in the same run, as a ratio.
//!
//! - `index`: index build throughput against `gzip -dc`, parallel layers, index size per
//!   checkpoint span, and the peak RSS of `clip index` on a large layer.

mod data;
mod index;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "clip-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Index build speed, memory and index size.
    Index(index::IndexBench),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Index(b) => b.run(),
    }
}
