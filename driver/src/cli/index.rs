//! `clip index REF -o FILE`

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use clip_index::{IndexOptions, layer::DEFAULT_CHECKPOINT_SPAN, layer::DEFAULT_CHUNK_SIZE};
use indicatif::{ProgressBar, ProgressStyle};

use super::{RegistryArgs, default_parallelism, human_bytes};
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// Image reference: registry/repository[:tag][@digest].
    pub image: String,

    /// Where to write the index.
    #[arg(short, long, env = "CLIP_INDEX_OUTPUT")]
    pub output: PathBuf,

    /// Bytes per verified chunk (the unit of caching).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, env = "CLIP_CHUNK_SIZE")]
    pub chunk_size: u32,

    /// Minimum uncompressed bytes between gzip seek checkpoints.
    #[arg(long, default_value_t = DEFAULT_CHECKPOINT_SPAN, env = "CLIP_CHECKPOINT_SPAN")]
    pub checkpoint_span: u64,

    /// Also hash each uncompressed layer and check it against the config's diff_id (the
    /// compressed digest is always checked, and already pins the content).
    #[arg(long, env = "CLIP_VERIFY_DIFF_ID")]
    pub verify_diff_id: bool,

    /// Layers indexed at the same time (default: the number of CPUs).
    #[arg(long, env = "CLIP_PARALLEL_LAYERS")]
    pub parallel: Option<usize>,

    /// Also publish the index to the Redis Cluster under its digest (needs --redis).
    #[arg(long, env = "CLIP_PUBLISH")]
    pub publish: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub redis: super::RedisArgs,
}

pub async fn run(args: IndexArgs) -> Result<()> {
    if args.chunk_size < 4096 {
        return Err(Error::Config("--chunk-size must be at least 4096".into()));
    }
    if args.checkpoint_span < 64 * 1024 {
        return Err(Error::Config(
            "--checkpoint-span must be at least 65536".into(),
        ));
    }
    if args.publish && args.redis.seeds.is_empty() {
        return Err(Error::Config(
            "--publish needs --redis (or CLIP_REDIS_SEEDS)".into(),
        ));
    }
    let started = Instant::now();
    let redis = args.redis.connect().await?;
    let client = args.registry.client()?;
    let resolved = client
        .resolve(&args.image, args.registry.platform()?.as_ref())
        .await?;
    let progress = Arc::new(clip_storage::Progress::default());
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(resolved.compressed_size());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} indexing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                let (done, _) = progress.bytes();
                bar.set_position(done);
                bar.set_message(format!(
                    "layers {}/{}",
                    progress
                        .layers_done
                        .load(std::sync::atomic::Ordering::Relaxed),
                    progress
                        .layers_total
                        .load(std::sync::atomic::Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let opts = IndexOptions {
        chunk_size: args.chunk_size,
        checkpoint_span: args.checkpoint_span,
        verify_diff_id: args.verify_diff_id,
    };
    let result = clip_storage::build_index(
        &client,
        &resolved,
        opts,
        args.parallel.unwrap_or_else(default_parallelism),
        progress,
    )
    .await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let index = result?;
    let encoded = clip_index::encode(&index)?;
    // Write beside the target and rename, so a crash never leaves a half-written index.
    let tmp = args.output.with_extension("clipidx.tmp");
    std::fs::write(&tmp, &encoded).map_err(|source| Error::File {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &args.output).map_err(|source| Error::File {
        path: args.output.clone(),
        source,
    })?;
    let s = index.stats();
    let pct = 100.0 * encoded.len() as f64 / s.compressed_size.max(1) as f64;
    println!(
        "indexed {} ({}, {})",
        args.image, resolved.manifest_digest, resolved.platform
    );
    println!("  layers:       {}", s.layers);
    println!(
        "  files:        {} ({} directories, {} symlinks, {} other)",
        s.files, s.directories, s.symlinks, s.other
    );
    println!(
        "  bytes:        {} compressed, {} uncompressed, {} in files",
        human_bytes(s.compressed_size),
        human_bytes(s.uncompressed_size),
        human_bytes(s.file_bytes)
    );
    println!(
        "  index:        {} ({pct:.2}% of the compressed image), {} checkpoints, {} chunks",
        human_bytes(encoded.len() as u64),
        s.checkpoints,
        s.chunks
    );
    println!("  index digest: {}", clip_index::index_digest(&encoded));
    if args.publish {
        match &redis {
            Some(r) => {
                let d = r
                    .publish_index(&encoded, Some(&resolved.manifest_digest))
                    .await?;
                println!("  published:    {d} to redis");
            }
            None => println!("  published:    no (redis unavailable)"),
        }
    }
    println!("  time:         {:.2}s", started.elapsed().as_secs_f64());
    println!("  written to:   {}", args.output.display());
    Ok(())
}
