//! A disk cache that cannot open its files (the process is out of file descriptors) misses
//! and keeps them. Its own test binary: it lowers the limit of the whole process.

use bytes::Bytes;
use clip_index::Digest;
use clip_storage::cache::disk::{DiskCache, whole_key};
use clip_storage::cache::{ChunkCache, ChunkKey};

fn set_open_files(limit: u64) -> std::io::Result<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct this frame owns.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let new = libc::rlimit {
            rlim_cur: limit,
            rlim_max: old.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(old.rlim_cur)
}

/// The lowest descriptor number not open: the limit that leaves none free.
fn lowest_free_fd() -> std::io::Result<u64> {
    let f = std::fs::File::open("/dev/null")?;
    use std::os::fd::AsRawFd;
    Ok(f.as_raw_fd() as u64)
}

#[tokio::test(flavor = "current_thread")]
async fn a_chunk_or_whole_file_that_cannot_be_opened_is_a_miss_and_stays() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = DiskCache::open(dir.path(), 1 << 20)?;
    let data = Bytes::from(vec![7u8; 5000]);
    let key = ChunkKey {
        digest: Digest::of(&data),
        len: data.len() as u32,
    };
    cache.put(&key, data.clone()).await?;
    assert_eq!(cache.get(&key).await?, Some(data.clone()));
    // A file kept whole, made of the chunk's bytes 1000..4000.
    let file = whole_key(&Digest::of(b"layer"), 0, 3000);
    assert!(cache.store_whole(&file, 3000, &[(key, 1000..4000)])?);
    assert!(cache.open_whole(&file, 3000).is_some());
    let before = cache.bytes();

    let old = set_open_files(lowest_free_fd()?)?;
    let starved = cache.get(&key).await;
    let part_starved = cache.get_range(&key, 10..20).await;
    let whole_starved = cache.open_whole(&file, 3000).is_some();
    set_open_files(old)?;

    assert!(matches!(starved, Ok(None)), "a miss: {starved:?}");
    assert!(matches!(part_starved, Ok(None)), "a miss: {part_starved:?}");
    assert!(!whole_starved, "a miss");
    assert_eq!(cache.bytes(), before, "still counted");
    assert!(cache.contains(&key.digest), "still held");
    assert!(cache.has_whole(&file), "still held whole");
    assert_eq!(
        cache.get(&key).await?,
        Some(data),
        "and read once descriptors are back"
    );
    assert!(cache.open_whole(&file, 3000).is_some());
    Ok(())
}
