//! The `clip` command: index, inspect, read and mount container images without Kubernetes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = clip_driver::cli::Cli::parse();
    match clip_driver::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clip: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
