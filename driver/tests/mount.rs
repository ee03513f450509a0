//! Real FUSE mounts of test images served from a real registry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clip_driver::fs::{Mount, MountOptions, is_mounted, mount, mount_line, premount};
use clip_e2e::Rng;
use clip_e2e::check::{
    assert_dir_matches, assert_same_tree, bytes_under, resident, run_in_root, settled_bytes_under,
};
use clip_e2e::extract::extract_image;
use clip_e2e::fixtures;
use clip_e2e::image::{Entry, Layer, Meta, Pusher, build_image};
use clip_e2e::model::{Kind, expected_tree};
use clip_e2e::proxy::Proxy;
use clip_e2e::registry::Registry;
use clip_index::{ImageIndex, IndexOptions};
use clip_storage::cache::disk::DiskCache;
use clip_storage::{ChunkStore, RegistryBlobs, RegistryClient, RegistryConfig, StoreConfig};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?)
}

struct Served {
    store: Arc<ChunkStore<RegistryBlobs>>,
    mount: Option<Mount>,
    dir: tempfile::TempDir,
}

impl Served {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Indexes `reference` and returns the index and a client.
fn index(
    rt: &tokio::runtime::Runtime,
    reference: &str,
) -> anyhow::Result<(Arc<ImageIndex>, RegistryClient)> {
    let client = RegistryClient::new(RegistryConfig::default());
    let index = rt.block_on(async {
        let resolved = client.resolve(reference, None).await?;
        clip_storage::build_index(
            &client,
            &resolved,
            IndexOptions::default(),
            4,
            Arc::default(),
        )
        .await
    })?;
    Ok((Arc::new(index), client))
}

/// Mounts an indexed image with a disk cache at `cache`.
fn serve(
    rt: &tokio::runtime::Runtime,
    index: &Arc<ImageIndex>,
    client: &RegistryClient,
    cache: &Path,
    cache_bytes: u64,
) -> anyhow::Result<Served> {
    serve_with(
        rt,
        index,
        client,
        cache,
        cache_bytes,
        StoreConfig::default(),
        &test_mount(),
    )
}

/// The mount options of these tests.
fn test_mount() -> MountOptions {
    MountOptions {
        fsname: "clip:test".into(),
        ..MountOptions::default()
    }
}

/// [`serve_with`] on a default mount, with files of at least `whole_from` bytes kept
/// whole (0: none).
fn serve_keeping_whole(
    rt: &tokio::runtime::Runtime,
    index: &Arc<ImageIndex>,
    client: &RegistryClient,
    cache: &Path,
    cache_bytes: u64,
    whole_from: u64,
) -> anyhow::Result<Served> {
    let config = StoreConfig {
        whole_file_min_bytes: whole_from,
        ..StoreConfig::default()
    };
    serve_with(rt, index, client, cache, cache_bytes, config, &test_mount())
}

/// [`serve`] with a store configured by `config` (whole files kept as it says) and a mount
/// by `options`.
fn serve_with(
    rt: &tokio::runtime::Runtime,
    index: &Arc<ImageIndex>,
    client: &RegistryClient,
    cache: &Path,
    cache_bytes: u64,
    config: StoreConfig,
    options: &MountOptions,
) -> anyhow::Result<Served> {
    let (store, disk) = store_with(index, client, cache, cache_bytes, config)?;
    store.keep_whole_files(disk);
    let dir = tempfile::tempdir()?;
    let m = mount(store.clone(), dir.path(), options, rt.handle().clone())?;
    Ok(Served {
        store,
        mount: Some(m),
        dir,
    })
}

/// A store of `index` over a disk cache at `cache`, and that cache.
fn store_with(
    index: &Arc<ImageIndex>,
    client: &RegistryClient,
    cache: &Path,
    cache_bytes: u64,
    config: StoreConfig,
) -> anyhow::Result<(Arc<ChunkStore<RegistryBlobs>>, Arc<DiskCache>)> {
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let disk = Arc::new(DiskCache::open(cache, cache_bytes)?);
    let store = ChunkStore::new(
        index.clone(),
        Arc::new(source),
        vec![disk.clone()],
        None,
        config,
    );
    Ok((store, disk))
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
    }
}

#[test]
fn every_entry_of_the_mounted_images_matches_the_reference() -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let pusher = Pusher::new(&registry.host(), None);
    // Every test image of the foundation issue: the one of every entry type and whiteout
    // form, the compression forms, the 200 MB file, and a multi-platform index (which
    // resolves to this host's platform).
    let mut images = Vec::new();
    for (name, layers) in [
        ("complex", fixtures::complex_layers()),
        ("formats", fixtures::format_layers()),
        ("big", fixtures::big_layers(200 << 20)),
    ] {
        let image = build_image(&layers, "linux", "amd64")?;
        let reference = pusher.push_image(&format!("fs/{name}"), "v1", &image)?;
        images.push((name, layers, image, reference));
    }
    let host = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let platforms: Vec<_> = ["amd64", "arm64"]
        .iter()
        .map(|arch| {
            let layers = fixtures::platform_layers(&format!("linux/{arch}"));
            build_image(&layers, "linux", arch).map(|image| (*arch, layers, image))
        })
        .collect::<anyhow::Result<_>>()?;
    let images_of: Vec<_> = platforms.iter().map(|(_, _, i)| i.clone()).collect();
    let reference = pusher.push_index("fs/multi", "v1", &images_of)?;
    let Some((_, layers, image)) = platforms.into_iter().find(|(arch, ..)| *arch == host) else {
        anyhow::bail!("no image for {host}");
    };
    images.push(("multi-platform", layers, image, reference));

    for (name, layers, image, reference) in images {
        let (index, client) = index(&rt, &reference)?;
        assert_eq!(
            index.source.manifest_digest.to_string(),
            image.manifest.digest
        );
        let cache = tempfile::tempdir()?;
        let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
        assert_dir_matches(served.path(), &expected_tree(&layers))
            .map_err(|e| e.context(format!("image {name}")))?;
        // And to what GNU tar unpacks from the same blobs, whiteouts applied as a runtime does.
        let extracted = tempfile::tempdir()?;
        let extracted_from = extract_image(&image, extracted.path())?;
        let compared = assert_same_tree(served.path(), extracted.path(), extracted_from)
            .map_err(|e| e.context(format!("image {name} against tar -x")))?;
        assert_eq!(compared, expected_tree(&layers).len(), "image {name}");
        // The mount is read-only.
        let err = std::fs::write(served.path().join("new-file"), b"x").err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EROFS));
        let stat = nix_statfs(served.path())?;
        assert!(stat.f_flag & libc::ST_RDONLY != 0, "mounted read-only");
        // As mount(8) shows it: read-only, no setuid programs or devices, the kernel
        // checking permissions, open to every user, named as asked.
        let fields = mount_fields(served.path())?;
        let (options, sb) = fields.split_once(" - ").unwrap_or_default();
        let sb: Vec<&str> = sb.split(' ').collect();
        for o in ["ro", "nosuid", "nodev"] {
            assert!(options.split(',').any(|x| x == o), "{o}: {fields}");
        }
        assert!(
            sb[0].starts_with("fuse") && sb[1] == "clip:test",
            "{fields}"
        );
        for o in ["default_permissions", "allow_other"] {
            assert!(sb[2].split(',').any(|x| x == o), "{o}: {fields}");
        }
        // The kernel reads ahead 1 MiB (not its 128 KiB default) on the mount.
        let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(served.path())?);
        let knob = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        assert_eq!(std::fs::read_to_string(&knob)?.trim(), "1024", "{knob}");
    }
    Ok(())
}

fn nix_statfs(p: &Path) -> anyhow::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: zeroed statvfs is valid; c is a valid path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    anyhow::ensure!(r == 0, "statvfs: {}", std::io::Error::last_os_error());
    Ok(s)
}

/// The host's static busybox as the image's /bin/busybox, and /bin/sh linking to it.
fn busybox_entries(busybox: Vec<u8>) -> [Entry; 2] {
    [
        Entry::File {
            path: "bin/busybox".into(),
            meta: Meta::new(0o755),
            data: busybox,
        },
        Entry::symlink("bin/sh", "busybox"),
    ]
}

#[test]
fn busybox_runs_from_the_mount() -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let busybox = std::fs::read("/bin/busybox")?;
    let mut entries = busybox_entries(busybox).to_vec();
    entries.push(Entry::file(
        "etc/greeting",
        b"hello from the image\n".to_vec(),
    ));
    let layers = vec![Layer::gzip(entries)];
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/busybox", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let cache = tempfile::tempdir()?;
    let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    let out = run_in_root(
        served.path(),
        "busybox cat /etc/greeting; echo $((6 * 7)); busybox ls /bin",
    )?;
    assert_eq!(out, "hello from the image\n42\nbusybox\nsh\n");
    Ok(())
}

/// An image of several large files for read tests.
fn data_layers(files: usize, size: usize) -> Vec<Layer> {
    let mut entries = Vec::new();
    for i in 0..files {
        let data = if i % 2 == 0 {
            clip_e2e::text_bytes(size, 100 + i as u64)
        } else {
            Rng(200 + i as u64).bytes(size)
        };
        entries.push(Entry::file(&format!("data/f{i}"), data));
    }
    vec![Layer::gzip(entries)]
}

#[test]
fn concurrent_random_reads_are_exact_and_fetch_each_span_once() -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let layers = data_layers(8, 6 << 20);
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("fs/data", "v1", &image)?;
    let (index, client) = index(&rt, &format!("{}/fs/data:v1", proxy.host()))?;
    let cache = tempfile::tempdir()?;
    proxy.clear_log();
    let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    let expected = Arc::new(expected_tree(&layers));
    let root = served.path().to_owned();
    std::thread::scope(|s| {
        for t in 0..32u64 {
            let expected = expected.clone();
            let root = root.clone();
            s.spawn(move || {
                let mut rng = Rng(1000 + t);
                for _ in 0..20 {
                    let i = rng.below(8);
                    let path = format!("/data/f{i}");
                    let Some(Kind::File(data)) = expected.get(&path).map(|e| e.kind.clone()) else {
                        panic!("no {path} in the model");
                    };
                    let len = 1 + rng.below(300_000) as usize;
                    let off = rng.below((data.len() - len) as u64) as usize;
                    let f = std::fs::File::open(root.join(&path[1..])).expect("open");
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64).expect("read");
                    assert!(
                        buf == data[off..off + len],
                        "{path} {off}+{len}: wrong bytes"
                    );
                }
            });
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let reads = proxy.blob_reads();
    let mut ranges: Vec<String> = reads.iter().filter_map(|l| l.range.clone()).collect();
    let total = ranges.len();
    ranges.sort();
    ranges.dedup();
    assert_eq!(ranges.len(), total, "a range was fetched twice: {reads:?}");
    let runs = index.layers[0].checkpoints.len() + 1;
    assert!(total <= runs, "{total} requests for {runs} spans");
    let stats = served.store.stats().snapshot();
    let layer_chunks = index.layers[0].chunks.len() as u64;
    let fetched: u64 = stats
        .tiers
        .iter()
        .find(|t| t.tier == "source")
        .map_or(0, |t| t.chunks);
    assert!(
        fetched <= layer_chunks && stats.prefetched_chunks <= fetched,
        "{stats:?}"
    );
    Ok(())
}

/// Bytes in the cache directory (chunk files, whole files, their check records and the
/// files being written) at one moment: see [`settled_bytes_under`].
fn du(dir: &Path) -> anyhow::Result<u64> {
    let subs = ["chunks", "files", "checked", "tmp"].map(|sub| dir.join(sub));
    settled_bytes_under(&subs, Duration::from_secs(10))
}

/// Inode numbers come from the index: every mount of the image, in any process or order
/// of lookups, gives each entry the same number. And a file read once is read again from
/// the page cache, also through a new open (FOPEN_KEEP_CACHE): no read reaches clip.
#[test]
fn inode_numbers_are_the_same_in_every_mount_and_reopens_keep_the_page_cache() -> anyhow::Result<()>
{
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::Ordering::Relaxed;
    let rt = runtime()?;
    let registry = Registry::start()?;
    let mut layers = clip_e2e::fixtures::complex_layers();
    let big = Rng(81).bytes(3 << 20);
    layers.push(Layer::gzip(vec![Entry::file("big", big.clone())]));
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/inodes", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let inodes = |root: &Path, paths: &[String]| -> anyhow::Result<Vec<(String, u64)>> {
        paths
            .iter()
            .map(|p| {
                Ok((
                    p.clone(),
                    std::fs::symlink_metadata(root.join(&p[1..]))?.ino(),
                ))
            })
            .collect()
    };
    let (cache1, cache2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let first = serve(&rt, &index, &client, cache1.path(), 1 << 30)?;
    let paths = clip_e2e::check::list(first.path())?;
    assert!(paths.len() > 20, "{paths:?}");
    let numbers = inodes(first.path(), &paths)?;
    // Another mount, its names looked up in the opposite order.
    let second = serve(&rt, &index, &client, cache2.path(), 1 << 30)?;
    let mut backwards = paths.clone();
    backwards.reverse();
    let mut again = inodes(second.path(), &backwards)?;
    again.reverse();
    assert_eq!(numbers, again);

    let counters = first.mount.as_ref().unwrap().counters().clone();
    assert!(std::fs::read(first.path().join("big"))? == big);
    let reads = counters.reads.load(Relaxed);
    assert!(reads > 0);
    // (This machine's kernel may page out cold pages on its own: those are read again.)
    let (cached, of) = resident(&first.path().join("big"), 0..u64::MAX)?;
    assert!(std::fs::read(first.path().join("big"))? == big);
    let again = counters.reads.load(Relaxed) - reads;
    assert!(
        again <= (of - cached) as u64,
        "{again} reads reached clip; {} of {of} pages were out of the page cache",
        of - cached
    );
    Ok(())
}

#[test]
fn a_cache_smaller_than_the_image_stays_under_its_cap() -> anyhow::Result<()> {
    cache_under_its_cap(&[0])
}

/// The same with files also kept whole (as `clip mount` has it).
#[test]
fn a_cache_smaller_than_the_image_stays_under_its_cap_with_whole_files() -> anyhow::Result<()> {
    cache_under_its_cap(&[1 << 20])
}

/// Reads an image of 24 MiB through a cache capped at 8 MiB, once per whole-file threshold
/// of `whole_from` (0: no whole files).
fn cache_under_its_cap(whole_from: &[u64]) -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    // 24 MiB of files of 2 MiB: a file's chunks and its whole copy fit under the cap
    // together, three files' do not.
    let layers = data_layers(12, 2 << 20);
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/capped", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let expected = expected_tree(&layers);
    let cap = 8 << 20;
    for &whole_file_min_bytes in whole_from {
        let cache = tempfile::tempdir()?;
        let served = serve_keeping_whole(
            &rt,
            &index,
            &client,
            cache.path(),
            cap,
            whole_file_min_bytes,
        )?;
        read_all_under_cap(
            &served,
            &expected,
            cache.path(),
            cap,
            whole_file_min_bytes > 0,
        )
        .map_err(|e| e.context(format!("whole files from {whole_file_min_bytes} bytes")))?;
    }
    Ok(())
}

/// Reads every file of `expected` twice through `served`, checking its bytes and that the
/// cache at `cache` holds at most `cap` bytes after each file; with `whole`, also that
/// files are kept whole along the way (the cap checked while waiting for the first).
fn read_all_under_cap(
    served: &Served,
    expected: &clip_e2e::model::Tree,
    cache: &Path,
    cap: u64,
    whole: bool,
) -> anyhow::Result<()> {
    let mut seen_whole = !whole;
    for _round in 0..2 {
        for (path, e) in expected {
            if let Kind::File(data) = &e.kind {
                let got = std::fs::read(served.path().join(&path[1..]))?;
                assert!(got == *data, "{path}");
                let held = du(cache)?;
                anyhow::ensure!(held <= cap, "{path}: cache holds {held} > {cap}");
                // The copy of a file read whole trails its read by a moment.
                let waiting = std::time::Instant::now();
                while !seen_whole && waiting.elapsed() < Duration::from_secs(10) {
                    seen_whole = bytes_under(&cache.join("files")) > 0;
                    let held = du(cache)?;
                    anyhow::ensure!(held <= cap, "{path}: cache holds {held} > {cap}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let held = du(cache)?;
    anyhow::ensure!(held <= cap && held > 0, "cache holds {held}, cap {cap}");
    anyhow::ensure!(seen_whole, "no file was kept whole");
    Ok(())
}

#[test]
fn cached_files_survive_a_registry_outage_and_uncached_ones_recover() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = runtime()?;
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let layers = vec![Layer::gzip(vec![
        Entry::file("warm", clip_e2e::text_bytes(3 << 20, 1)),
        // Large enough that read-ahead after the warm file cannot reach its end.
        Entry::file("cold", Rng(2).bytes(48 << 20)),
    ])];
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("fs/outage", "v1", &image)?;
    let (index, client) = index(&rt, &format!("{}/fs/outage:v1", proxy.host()))?;
    let expected = expected_tree(&layers);
    let Some(Kind::File(warm)) = expected.get("/warm").map(|e| e.kind.clone()) else {
        anyhow::bail!("model");
    };
    let Some(Kind::File(cold)) = expected.get("/cold").map(|e| e.kind.clone()) else {
        anyhow::bail!("model");
    };
    let cache = tempfile::tempdir()?;
    {
        let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
        assert!(std::fs::read(served.path().join("warm"))? == warm);
        std::thread::sleep(Duration::from_millis(300));
    }
    // A new mount over the same disk cache, registry gone: no page cache, no memory tier.
    proxy.set_refuse(true);
    let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    let counters = served.mount.as_ref().unwrap().counters().clone();
    assert!(
        std::fs::read(served.path().join("warm"))? == warm,
        "warm file from disk"
    );
    // Its data on local disk, reads were answered by the worker that took them (those not
    // were of chunks that read-ahead was loading at that moment).
    let (reads, at_once) = (
        counters.reads.load(Relaxed),
        counters.reads_at_once.load(Relaxed),
    );
    assert!(at_once > 0 && at_once <= reads, "{at_once} of {reads}");
    let f = std::fs::File::open(served.path().join("cold"))?;
    let mut buf = vec![0u8; 4096];
    let err = f.read_exact_at(&mut buf, 44 << 20).err();
    assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EIO));
    // The reads that needed the registry went to the runtime, not answered at once.
    assert!(counters.reads.load(Relaxed) > reads);
    assert_eq!(counters.reads_at_once.load(Relaxed), at_once);
    assert!(
        is_mounted(served.path()),
        "the mount survives a failed read"
    );
    proxy.set_refuse(false);
    f.read_exact_at(&mut buf, 44 << 20)?;
    assert!(buf == cold[44 << 20..(44 << 20) + 4096]);
    assert!(std::fs::read(served.path().join("cold"))? == cold);
    Ok(())
}

#[test]
fn a_corrupt_chunk_in_the_disk_cache_is_discarded_and_refetched() -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let layers = vec![Layer::gzip(vec![Entry::file(
        "file",
        clip_e2e::text_bytes(3 << 20, 9),
    )])];
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/corrupt", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let Some(Kind::File(data)) = expected_tree(&layers).get("/file").map(|e| e.kind.clone()) else {
        anyhow::bail!("model");
    };
    let cache = tempfile::tempdir()?;
    {
        let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
        assert!(std::fs::read(served.path().join("file"))? == data);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Flip bytes in every chunk file.
    let mut damaged = 0;
    let mut todo = vec![cache.path().to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                let mut bytes = std::fs::read(e.path())?;
                bytes[100] ^= 0xff;
                std::fs::write(e.path(), bytes)?;
                damaged += 1;
            }
        }
    }
    assert!(damaged > 0);
    let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    assert!(
        std::fs::read(served.path().join("file"))? == data,
        "no wrong byte"
    );
    let stats = served.store.stats().snapshot();
    let from_source = stats
        .tiers
        .iter()
        .find(|t| t.tier == "source")
        .map_or(0, |t| t.chunks);
    assert!(from_source > 0, "refetched: {stats:?}");
    Ok(())
}

#[test]
fn missing_paths_are_cached_by_the_kernel_and_the_mount_refuses_writes() -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let layers = fixtures::format_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/neg", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let cache = tempfile::tempdir()?;
    let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    let counters = served.mount.as_ref().unwrap().counters().clone();
    use std::sync::atomic::Ordering::Relaxed;
    // An interpreter probing the same missing module path again and again.
    for _ in 0..50 {
        assert!(std::fs::metadata(served.path().join("multi/no_such_module.py")).is_err());
    }
    assert_eq!(
        counters.negative_lookups.load(Relaxed),
        1,
        "the miss was cached"
    );

    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(served.path().join("multi/f1").as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::access(path.as_ptr(), libc::R_OK) }, 0);
    // SAFETY: as above.
    let w = unsafe { libc::access(path.as_ptr(), libc::W_OK) };
    assert_eq!(
        (w, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EROFS))
    );
    Ok(())
}

#[test]
fn a_slow_fetch_does_not_block_readers_of_cached_files() -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let small: Vec<Entry> = (0..30)
        .map(|i| Entry::file(&format!("small/f{i}"), clip_e2e::text_bytes(3000, 10 + i)))
        .collect();
    let layers = vec![
        Layer::gzip(small),
        Layer::gzip(vec![Entry::file("slow", Rng(4).bytes(2 << 20))]),
    ];
    let expected = expected_tree(&layers);
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("fs/slow", "v1", &image)?;
    let (index, client) = index(&rt, &format!("{}/fs/slow:v1", proxy.host()))?;
    let cache = tempfile::tempdir()?;
    let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    // Reading one small file brings their (shared) chunk into the caches.
    std::fs::read(served.path().join("small/f0"))?;
    // From now on every registry request hangs for a long time.
    proxy.set_delay(Duration::from_secs(6));
    let slow_path = served.path().join("slow");
    let slow = std::thread::spawn(move || std::fs::read(slow_path));
    std::thread::sleep(Duration::from_millis(300));
    // Other files, never opened before (so each needs a FUSE lookup, open and read), are
    // served while the slow read waits for the registry.
    for i in 1..30 {
        let path = format!("/small/f{i}");
        let got = std::fs::read(served.path().join(&path[1..]))?;
        let Some(Kind::File(want)) = expected.get(&path).map(|e| e.kind.clone()) else {
            anyhow::bail!("model");
        };
        assert!(got == want, "{path}");
    }
    assert!(
        !slow.is_finished(),
        "the slow read was still waiting while others were served"
    );
    proxy.set_delay(Duration::ZERO);
    let got = slow
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread"))??;
    assert_eq!(got.len(), 2 << 20);
    Ok(())
}

#[test]
fn the_kernel_keeps_opens_symlinks_and_listings_and_first_reads_prefetch() -> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let big = Rng(77).bytes(12 << 20);
    let layers = vec![Layer::gzip(vec![
        Entry::file("dir/small", clip_e2e::text_bytes(5000, 3)),
        Entry::file("dir/other", clip_e2e::text_bytes(700, 4)),
        Entry::symlink("dir/link", "small"),
        Entry::file("big", big.clone()),
    ])];
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("fs/kernel", "v1", &image)?;
    let (index, client) = index(&rt, &format!("{}/fs/kernel:v1", proxy.host()))?;
    let cache = tempfile::tempdir()?;
    let served = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    let counters = served.mount.as_ref().unwrap().counters().clone();
    use std::sync::atomic::Ordering::Relaxed;

    // A listing brings every entry's attributes (READDIRPLUS): a program that lists a
    // directory and then looks at its entries does not make the kernel ask for each.
    let listed = std::fs::read_dir(served.path().join("dir"))?.count();
    assert_eq!(listed, 3);
    let lookups = counters.lookups.load(Relaxed);
    assert_eq!(
        std::fs::metadata(served.path().join("dir/other"))?.len(),
        700
    );
    assert!(std::fs::symlink_metadata(served.path().join("dir/link"))?.is_symlink());
    assert_eq!(
        counters.lookups.load(Relaxed),
        lookups,
        "entries known from the listing"
    );
    // `isatty` on a file is answered at once (and counted; the kernel asks every time).
    let file = std::fs::File::open(served.path().join("dir/other"))?;
    // SAFETY: isatty on an open descriptor.
    let tty = unsafe { libc::isatty(std::os::fd::AsRawFd::as_raw_fd(&file)) };
    assert_eq!(tty, 0);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    assert_eq!(counters.ioctls.load(Relaxed), 1);
    let metrics = counters.to_prometheus("image=\"x\"");
    assert!(
        metrics.contains("clip_fs_requests_total{op=\"ioctl\",image=\"x\"} 1\n"),
        "{metrics}"
    );
    drop(file);

    // An interpreter opening the same files, following the same links and listing the same
    // directories over and over: the kernel asks once.
    let small = std::fs::read(served.path().join("dir/small"))?;
    for _ in 0..20 {
        assert!(std::fs::read(served.path().join("dir/small"))? == small);
        assert_eq!(
            std::fs::read_link(served.path().join("dir/link"))?,
            Path::new("small")
        );
        let mut names: Vec<String> = std::fs::read_dir(served.path().join("dir"))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        assert_eq!(names, ["link", "other", "small"]);
    }
    assert_eq!(
        small,
        clip_e2e::text_bytes(5000, 3),
        "the file read is the file written"
    );
    // No-open and cached symlinks: Linux 5.1 and 4.20.
    if kernel_at_least(5, 1) {
        assert!(
            counters.opens.load(Relaxed) <= 2,
            "one open and one opendir at most reach the filesystem: {}",
            counters.opens.load(Relaxed)
        );
        assert_eq!(counters.readlinks.load(Relaxed), 1, "the target was cached");
    }

    // The first read of a file starts fetching its first spans (16 MiB by default), as an
    // open would: a reader that goes on finds them fetched.
    let spans = index.layers[0].span_runs(0..index.layers[0].chunks.len() as u32);
    assert!(spans.count() >= 3, "the file spans several checkpoints");
    let f = std::fs::File::open(served.path().join("big"))?;
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0)?;
    assert!(head == big[..4096]);
    // Until the fetches are over: something was fetched ahead and the count holds still.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = (0, 0);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = (
            served.store.stats().snapshot().prefetched_chunks,
            proxy.blob_reads().len(),
        );
        if now.0 > 0 && now == last && proxy.in_flight() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was fetched ahead of the reader"
        );
        last = now;
    }
    rt.block_on(served.store.flush(Duration::from_secs(30)));
    let fetched = proxy.blob_reads().len();
    assert!(std::fs::read(served.path().join("big"))? == big);
    // (The proxy logs a request once its whole response has gone through.)
    while proxy.in_flight() > 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        proxy.blob_reads().len(),
        fetched,
        "the rest of the file had been fetched at its first read"
    );
    Ok(())
}

/// Whether this kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// The files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    clip_e2e::check::files_under(dir).into_keys().collect()
}

/// The bytes of `path` as a shared library sees them: mapped, not read.
fn mapped(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    // SAFETY: a private read-only mapping of an open file of `len` bytes, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    anyhow::ensure!(
        p != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping is `len` readable bytes until munmap.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec();
    // SAFETY: p and len are the mapping made above.
    unsafe { libc::munmap(p, len) };
    Ok(bytes)
}

#[test]
fn small_files_with_local_data_are_in_the_page_cache_before_their_first_read() -> anyhow::Result<()>
{
    use std::sync::atomic::Ordering::Relaxed;
    if !kernel_at_least(6, 9) {
        return Ok(()); // opens reach clip only with passthrough
    }
    let rt = runtime()?;
    let registry = Registry::start()?;
    let one = clip_e2e::text_bytes(5000, 41);
    let two = clip_e2e::text_bytes(7000, 42);
    let mid = clip_e2e::text_bytes(200 << 10, 43);
    let many: Vec<Vec<u8>> = (0..20)
        .map(|i| clip_e2e::text_bytes(3000, 50 + i))
        .collect();
    let mut entries = vec![
        Entry::file("one", one.clone()),
        Entry::file("two", two.clone()),
        Entry::file("mid", mid.clone()),
    ];
    for (i, data) in many.iter().enumerate() {
        entries.push(Entry::file(&format!("many/f{i}"), data.clone()));
    }
    let layers = vec![Layer::gzip(entries)];
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/push", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let cache = tempfile::tempdir()?;
    let served = serve_keeping_whole(&rt, &index, &client, cache.path(), 1 << 30, 1 << 20)?;
    let p = served.path();
    let counters = served.mount.as_ref().unwrap().counters().clone();
    // Nothing local yet: the first file is read the usual way, from the registry.
    assert!(std::fs::read(p.join("one"))? == one);
    let reads = counters.reads.load(Relaxed);
    assert!(reads > 0);
    assert_eq!(counters.pushes.load(Relaxed), 0);
    // The second is in the chunk that came with it: in the page cache before any read.
    assert!(std::fs::read(p.join("two"))? == two);
    assert_eq!(counters.reads.load(Relaxed), reads);
    assert_eq!(counters.pushes.load(Relaxed), 1);
    // Above the size limit: read the usual way.
    assert!(mid.len() as u64 > clip_driver::fs::PUSH_MAX);
    assert!(std::fs::read(p.join("mid"))? == mid);
    assert!(counters.reads.load(Relaxed) > reads);
    assert_eq!(counters.pushes.load(Relaxed), 1);
    // Eight programs opening the same small files at once: each file is put in the page
    // cache once, by its first open, the others waiting for it; every byte is right.
    let reads = counters.reads.load(Relaxed);
    let many = Arc::new(many);
    let readers: Vec<_> = (0..8)
        .map(|t| {
            let (p, many) = (p.to_owned(), many.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                for k in 0..many.len() {
                    let i = (k + t * 3) % many.len();
                    let got = std::fs::read(p.join(format!("many/f{i}")))?;
                    anyhow::ensure!(got == many[i], "many/f{i}");
                }
                Ok(())
            })
        })
        .collect();
    for r in readers {
        r.join().map_err(|_| anyhow::anyhow!("reader thread"))??;
    }
    assert_eq!(counters.pushes.load(Relaxed), 1 + many.len() as u64);
    assert_eq!(counters.reads.load(Relaxed), reads);
    Ok(())
}

#[test]
fn files_kept_whole_are_read_by_the_kernel_itself() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = runtime()?;
    let registry = Registry::start()?;
    let busybox = std::fs::read("/bin/busybox")?;
    let big = Rng(31).bytes(6 << 20);
    let text = clip_e2e::text_bytes(3 << 20, 32);
    let small = clip_e2e::text_bytes(5000, 33);
    let mut entries = busybox_entries(busybox.clone()).to_vec();
    entries.extend([
        Entry::file("big", big.clone()),
        Entry::file("text", text.clone()),
        Entry::file("small", small.clone()),
    ]);
    let layers = vec![Layer::gzip(entries)];
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/whole", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let cache = tempfile::tempdir()?;
    let config = StoreConfig {
        whole_file_min_bytes: 1 << 20,
        // Files come as they are read (not whole at their open).
        open_prefetch_bytes: 0,
        ..StoreConfig::default()
    };
    // Mounts of the image on this cache.
    let mount_on_cache = |options: &MountOptions| {
        serve_with(
            &rt,
            &index,
            &client,
            cache.path(),
            1 << 30,
            config.clone(),
            options,
        )
    };
    // Passthrough: Linux 6.9, and CAP_SYS_ADMIN (the tests run as root).
    let kernel_reads = kernel_at_least(6, 9);
    let whole_dir = cache.path().join("files");

    // First mount: files are read through clip and those of at least 1 MiB are kept
    // whole (copied as their chunks reach the disk).
    {
        let served = mount_on_cache(&test_mount())?;
        let p = served.path();
        let counters = served.mount.as_ref().unwrap().counters().clone();
        let mut reader = std::fs::File::open(p.join("big"))?;
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut got)?;
        assert!(got == big);
        if kernel_reads {
            // Copied whole as its chunks came, while its reader still has it open...
            clip_e2e::wait::until("big kept whole", Duration::from_secs(10), || {
                files_under(&whole_dir).len() == 1
            })?;
            // ...so an open after that one closed hands it to the kernel. (The kernel
            // sends the release after `close` returns: an open that overtakes it is served
            // the usual way, the first open still counting.)
            let releases = counters.releases.load(Relaxed);
            drop(reader);
            clip_e2e::wait::until("the release", Duration::from_secs(10), || {
                counters.releases.load(Relaxed) > releases
            })?;
            let reads = counters.reads.load(Relaxed);
            assert!(std::fs::read(p.join("big"))? == big);
            assert_eq!(counters.passthrough_opens.load(Relaxed), 1);
            assert_eq!(counters.reads.load(Relaxed), reads, "read by the kernel");
        }
        assert!(std::fs::read(p.join("text"))? == text);
        assert!(std::fs::read(p.join("small"))? == small);
        assert!(std::fs::read(p.join("bin/busybox"))? == busybox);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while kernel_reads && files_under(&whole_dir).len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "files kept whole: {:?}",
                files_under(&whole_dir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if !kernel_reads {
        return Ok(());
    }
    let mut kept = files_under(&whole_dir);
    kept.sort();
    assert_eq!(kept.len(), 3, "big, text and busybox; not the small file");

    // A new mount on that cache: the files are checked in full, then the kernel reads
    // them itself, also when mapped or run, and clip sees no read of them. (Backing files
    // go 2 s after their last open closed here, 30 s by default.)
    let idle = MountOptions {
        backing_idle: Duration::from_secs(2),
        ..test_mount()
    };
    let served = mount_on_cache(&idle)?;
    let p = served.path().to_owned();
    let counters = served.mount.as_ref().unwrap().counters().clone();
    let reads = counters.reads.load(Relaxed);
    let big_file = std::fs::File::open(p.join("big"))?;
    // A second open while the first is open shares its backing file.
    assert!(std::fs::read(p.join("big"))? == big);
    let mut buf = vec![0u8; 1 << 20];
    big_file.read_exact_at(&mut buf, 3 << 20)?;
    assert!(buf[..] == big[3 << 20..4 << 20]);
    assert!(mapped(&p.join("text"))? == text);
    let out = run_in_root(&p, "echo $((6 * 7)); busybox ls /")?;
    assert_eq!(out, "42\nbig\nbin\nsmall\ntext\n");
    assert_eq!(
        counters.reads.load(Relaxed),
        reads,
        "the kernel read the files itself"
    );
    assert!(counters.passthrough_opens.load(Relaxed) >= 4);
    assert!(served.store.stats().snapshot().whole_files_opened >= 1);
    drop(big_file);
    // The small file, its data on disk, was put in the page cache at its open: no read
    // either, and opened again it is not put there again.
    for _ in 0..2 {
        assert!(std::fs::read(p.join("small"))? == small);
    }
    assert_eq!(counters.reads.load(Relaxed), reads);
    assert_eq!(counters.pushes.load(Relaxed), 1);
    // Nothing open and nobody using the mount: its backing files are released all the
    // same (the kernel holds each open, and with it a whole file the cache may evict).
    assert!(counters.backing_files.load(Relaxed) >= 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while counters.backing_files.load(Relaxed) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "backing files still registered on an idle mount"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let opens = counters.passthrough_opens.load(Relaxed);
    assert!(std::fs::read(p.join("big"))? == big);
    assert_eq!(
        counters.reads.load(Relaxed),
        reads,
        "handed to the kernel again"
    );
    assert_eq!(counters.passthrough_opens.load(Relaxed), opens + 1);
    drop(served);

    // An open served the usual way holds its inode to that way: an open of it meanwhile
    // must not get a backing file (the kernel would fail it), and reads stay exact.
    for f in &kept {
        std::fs::remove_file(f)?;
    }
    let served = mount_on_cache(&test_mount())?;
    let p = served.path().to_owned();
    let counters = served.mount.as_ref().unwrap().counters().clone();
    let held = std::fs::File::open(p.join("text"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while files_under(&whole_dir).is_empty() {
        assert!(std::time::Instant::now() < deadline, "kept whole at open");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::fs::read(p.join("text"))? == text);
    assert_eq!(counters.passthrough_opens.load(Relaxed), 0);
    held.read_exact_at(&mut buf, 0)?;
    assert!(buf[..] == text[..1 << 20]);
    drop(held);
    // Once the last such open is closed, the next open gets the backing file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(std::fs::read(p.join("text"))? == text);
        if counters.passthrough_opens.load(Relaxed) > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never handed over");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(served);

    // A damaged whole file is caught by the next process, removed, and the file read
    // through clip: no wrong byte.
    let kept = files_under(&whole_dir);
    assert_eq!(kept.len(), 1);
    let mut bytes = std::fs::read(&kept[0])?;
    bytes[1000] ^= 0x20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&kept[0])?
        .write_all_at(&bytes[1000..1001], 1000)?;
    let served = mount_on_cache(&test_mount())?;
    let counters = served.mount.as_ref().unwrap().counters().clone();
    assert!(
        std::fs::read(served.path().join("text"))? == text,
        "no wrong byte"
    );
    assert_eq!(counters.passthrough_opens.load(Relaxed), 0);
    let events = served.store.snapshot().events;
    assert!(
        events.contains(&("disk".into(), "verify_failure".into(), 1)),
        "{events:?}"
    );
    // (Its chunks are all on disk: it may be kept whole again, from them.)
    if let Ok(again) = std::fs::read(&kept[0]) {
        assert!(again == text, "the damaged file was replaced");
    }
    Ok(())
}

/// A whole file handed to the kernel and then evicted from the cache: once its last open
/// has closed, its backing file goes at once, not after the idle time (30 s), since the
/// kernel holds the file, and its disk space past the cap, while it is registered.
#[test]
fn a_backing_file_whose_whole_file_was_evicted_goes_soon() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    if !kernel_at_least(6, 9) {
        return Ok(()); // no passthrough
    }
    let rt = runtime()?;
    let registry = Registry::start()?;
    let layers = data_layers(6, 2 << 20);
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/evicted", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let expected = expected_tree(&layers);
    let data = |i: usize| match &expected[&format!("/data/f{i}")].kind {
        Kind::File(d) => d.clone(),
        _ => unreachable!("a file"),
    };
    let cache = tempfile::tempdir()?;
    assert_eq!(test_mount().backing_idle, Duration::from_secs(30));
    let served = serve_keeping_whole(&rt, &index, &client, cache.path(), 8 << 20, 1 << 20)?;
    let p = served.path();
    let counters = served.mount.as_ref().unwrap().counters().clone();
    let whole_dir = cache.path().join("files");

    // f0 read through clip, kept whole, then handed to the kernel at its next open.
    assert!(std::fs::read(p.join("data/f0"))? == data(0));
    clip_e2e::wait::until("f0 kept whole", Duration::from_secs(10), || {
        files_under(&whole_dir).len() == 1
    })?;
    let kept = files_under(&whole_dir).remove(0);
    clip_e2e::wait::until("f0's release", Duration::from_secs(10), || {
        counters.opens.load(Relaxed) == counters.releases.load(Relaxed)
    })?;
    assert!(std::fs::read(p.join("data/f0"))? == data(0));
    assert_eq!(counters.passthrough_opens.load(Relaxed), 1);
    assert_eq!(counters.backing_files.load(Relaxed), 1);

    // Other files push f0's whole copy out of the 8 MiB cache.
    for i in 1..6 {
        assert!(std::fs::read(p.join(format!("data/f{i}")))? == data(i));
        if !kept.exists() {
            break;
        }
    }
    clip_e2e::wait::until("f0's whole copy evicted", Duration::from_secs(10), || {
        !kept.exists()
    })?;
    clip_e2e::wait::until("f0's backing file to go", Duration::from_secs(5), || {
        counters.backing_files.load(Relaxed) == 0
    })?;
    // Read again, still right (through clip, or a new whole copy).
    assert!(std::fs::read(p.join("data/f0"))? == data(0));
    Ok(())
}

#[test]
fn a_start_up_profile_fills_a_new_mounts_kernel_caches_before_the_program_asks()
-> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = runtime()?;
    let registry = Registry::start()?;
    let mods: Vec<Vec<u8>> = (0..12)
        .map(|i| clip_e2e::text_bytes(4000 + i * 100, 60 + i as u64))
        .collect();
    let mut entries = vec![Entry::dir("app"), Entry::dir("app/lib")];
    for (i, data) in mods.iter().enumerate() {
        entries.push(Entry::file(&format!("app/lib/m{i}.py"), data.clone()));
    }
    entries.push(Entry::symlink("app/current", "lib"));
    let image = build_image(&[Layer::gzip(entries)], "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/prefill", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let cache = tempfile::tempdir()?;
    // A program's start-up: a stat, a missing name, and three modules read, one of them
    // through a symlink.
    let start_up = |p: &Path| -> anyhow::Result<()> {
        std::fs::metadata(p.join("app/lib/m3.py"))?;
        anyhow::ensure!(std::fs::metadata(p.join("app/lib/m3.so")).is_err());
        anyhow::ensure!(std::fs::read(p.join("app/lib/m3.py"))? == mods[3], "m3");
        anyhow::ensure!(std::fs::read(p.join("app/lib/m7.py"))? == mods[7], "m7");
        anyhow::ensure!(std::fs::read(p.join("app/current/m5.py"))? == mods[5], "m5");
        Ok(())
    };

    // The first mount records the names its program looked up, in order, found or not.
    let first = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    start_up(first.path())?;
    let recorded = first.store.profile_to_save();
    let names: Vec<String> = recorded
        .paths
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "app",
            "app/lib",
            "app/lib/m3.py",
            "app/lib/m3.so",
            "app/lib/m7.py",
            "app/current",
            "app/lib/m5.py"
        ]
    );
    assert!(rt.block_on(first.store.flush(Duration::from_secs(10))));
    drop(first);

    // The next mount, with the profile as read from its file (and a path through a symlink
    // that no profile file can hold, first: the prefill never follows it): as soon as it is
    // up, it looks those names up itself and puts the modules read in the page cache.
    let text = clip_storage::profile::encode(&index, &recorded);
    let mut profile = clip_storage::profile::decode(&text, &index)?;
    assert_eq!(profile, recorded);
    profile.paths.insert(0, b"app/current/m1.py".to_vec());
    let second = serve(&rt, &index, &client, cache.path(), 1 << 30)?;
    {
        let _runtime = rt.enter();
        second.store.replay(&profile, 1 << 30);
    }
    let counters = second.mount.as_ref().unwrap().counters().clone();
    clip_e2e::wait::until("the prefill", Duration::from_secs(20), || {
        counters.prefilled_names.load(Relaxed) >= 7 && counters.prefilled_files.load(Relaxed) >= 3
    })?;
    // (A little longer: an eighth name or a fourth file would show now.)
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counters.prefilled_names.load(Relaxed), 7);
    assert_eq!(counters.prefilled_files.load(Relaxed), 3);
    // The same start-up now asks the filesystem for no name, symlink or byte: all of it is
    // in the kernel's caches, and every byte is right.
    let before = |c: &clip_driver::fs::FsCounters| {
        (
            c.lookups.load(Relaxed),
            c.readlinks.load(Relaxed),
            c.reads.load(Relaxed),
            c.pushes.load(Relaxed),
        )
    };
    // This machine's kernel pages out cold memory on its own (DAMON, by regions of
    // physical memory, so also pages just stored): a module whose pages went since the
    // prefill stored them is read through clip again; the others are not.
    let modules = ["app/lib/m3.py", "app/lib/m7.py", "app/lib/m5.py"];
    let mut gone = 0;
    for m in modules {
        let (cached, of) = resident(&second.path().join(m), 0..u64::MAX)?;
        gone += u64::from(cached < of);
    }
    let was = before(&counters);
    start_up(second.path())?;
    let now = before(&counters);
    assert_eq!(
        (now.0, now.1, now.3),
        (was.0, was.1, was.3),
        "(lookups, readlinks, pushes)"
    );
    assert!(
        now.2 - was.2 <= gone,
        "{} reads through clip; {gone} modules were paged out",
        now.2 - was.2
    );
    // A name the profile does not hold is asked for as usual, and it alone is recorded:
    // the prefill's own lookups are not the program's.
    assert!(std::fs::read(second.path().join("app/lib/m9.py"))? == mods[9]);
    assert_eq!(counters.lookups.load(Relaxed), was.0 + 1);
    assert_eq!(
        second.store.recorded_profile().paths,
        [b"app/lib/m9.py".to_vec()]
    );
    Ok(())
}

/// The fields of /proc/self/mountinfo that describe the mount at `dir`: its mount options,
/// and after the separator its type, source and superblock options.
fn mount_fields(dir: &Path) -> anyhow::Result<String> {
    let line =
        mount_line(dir).ok_or_else(|| anyhow::anyhow!("{} is not mounted", dir.display()))?;
    let (before, after) = line
        .split_once(" - ")
        .ok_or_else(|| anyhow::anyhow!("no separator in {line}"))?;
    Ok(format!(
        "{} - {after}",
        before.split(' ').nth(5).unwrap_or_default()
    ))
}

/// A thread reading `path`, once it waits inside its open (the system call openat, per
/// /proc) for a filesystem that does not answer yet.
fn reader_waiting_in_open(
    path: std::path::PathBuf,
) -> anyhow::Result<std::thread::JoinHandle<std::io::Result<Vec<u8>>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(unsafe { libc::gettid() });
        std::fs::read(path)
    });
    let tid = rx.recv()?;
    let openat = libc::SYS_openat.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let call =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if call.split(' ').next() == Some(openat.as_str()) {
            return Ok(reader);
        }
        anyhow::ensure!(
            !reader.is_finished(),
            "the reader did not wait: {:?}",
            reader.join()
        );
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the reader never waited in its open"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_mount_made_before_its_index_holds_readers_until_served_and_ends_them_if_dropped()
-> anyhow::Result<()> {
    let rt = runtime()?;
    let registry = Registry::start()?;
    let layers = fixtures::complex_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("fs/early", "v1", &image)?;
    let (index, client) = index(&rt, &reference)?;
    let cache = tempfile::tempdir()?;
    let options = test_mount();
    let want = match &expected_tree(&layers)["/etc/passwd"].kind {
        Kind::File(data) => data.clone(),
        other => anyhow::bail!("the fixture's /etc/passwd is {other:?}"),
    };

    // Mounted at once; a reader that comes before the filesystem waits for it.
    let dir = tempfile::tempdir()?;
    let pre = premount(dir.path(), &options)?;
    assert!(is_mounted(dir.path()));
    let reader = reader_waiting_in_open(dir.path().join("etc/passwd"))?;
    let (store, _) = store_with(
        &index,
        &client,
        cache.path(),
        1 << 30,
        StoreConfig::default(),
    )?;
    let early = clip_driver::fs::serve(pre, store.clone(), &options, rt.handle().clone())?;
    assert_eq!(reader.join().unwrap()?, want);
    assert_dir_matches(dir.path(), &expected_tree(&layers))?;
    // The same mount as one made after the index: options, type, source.
    let later_dir = tempfile::tempdir()?;
    let later = mount(store, later_dir.path(), &options, rt.handle().clone())?;
    assert_eq!(mount_fields(dir.path())?, mount_fields(later_dir.path())?);
    assert!(
        mount_fields(dir.path())?.starts_with("ro,nosuid,nodev"),
        "{}",
        mount_fields(dir.path())?
    );
    later.unmount()?;
    early.unmount()?;
    assert!(!is_mounted(dir.path()), "unmounted");

    // Given up (the index could not be read): the waiting reader gets an error, not a
    // hang, and nothing stays mounted.
    let pre = premount(dir.path(), &options)?;
    let reader = reader_waiting_in_open(dir.path().join("etc/passwd"))?;
    drop(pre);
    let err = reader
        .join()
        .unwrap()
        .expect_err("no filesystem ever served");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    assert!(!is_mounted(dir.path()), "nothing stays mounted");
    Ok(())
}
