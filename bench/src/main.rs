//! clip benchmarks. Machines are noisy: every figure is printed next to a baseline measured
//! in the same run, as a ratio.
//!
//! - `index`: index build throughput against `gzip -dc`, parallel layers, index size per
//!   checkpoint span, and the peak RSS of `clip index` on a large layer.
//! - `controller`: the controller's index build of a four-layer image (its reconcile in a
//!   child process against a fake API server, a registry and a Redis Cluster): time, MB/s
//!   and peak RSS against `gzip -dc` and `clip index` of the same image.
//! - `mount`: the lazy mount through a registry behind an emulated link: a start-up command
//!   against a full pull, squashfuse and local disk; a 1 GiB sequential read cold, warm and
//!   hot against local disk; the mount's peak memory.
//! - `redis`: the shared Redis Cluster tier: GETRANGE latency, a cold read served from
//!   Redis, a second node's start-up, registry bytes when many nodes start together.
//! - `publish`: CSI NodePublishVolume to the first read of a file on a cold node, with a
//!   warm and an empty Redis, against a full pull and extraction.
//!
//! Modules: [`data`] and [`image`] build benchmark data from this machine's files; [`link`]
//! puts a registry behind a shaped veth pair and a [`delay`] proxy; [`host`] drops caches and
//! reads the mount table and process memory; [`reads`] measures what a command reads and
//! what that costs per the index; [`teardown`] undoes setup on every exit path.

mod controller;
mod data;
mod delay;
mod host;
mod image;
mod index;
mod link;
mod mount;
mod publish;
mod reads;
mod redis_tier;
mod teardown;

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
    /// The controller indexing a four-layer image: time, throughput and its memory.
    Controller(controller::ControllerBench),
    /// Lazy mount against full pull, warm cache, squashfuse and local disk (root only).
    Mount(mount::MountBench),
    /// The shared Redis Cluster tier: latency, reads from Redis, a second node's start-up,
    /// many nodes starting together (root only).
    Redis(redis_tier::RedisBench),
    /// CSI NodePublishVolume to the first read of a file, cold node with a warm or an empty
    /// Redis, against a full pull (root only).
    Publish(publish::PublishBench),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Index(b) => b.run(),
        Command::Controller(b) => b.run(),
        Command::Mount(b) => b.run(),
        Command::Redis(b) => b.run(),
        Command::Publish(b) => b.run(),
    }
}
