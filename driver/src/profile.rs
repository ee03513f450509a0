//! Start-up profiles ([`clip_storage::profile`]) kept in files: read when a mount starts,
//! written when its recording is over. A profile that cannot be used is reported and
//! ignored; the mount goes on without it.

use std::io::Read;
use std::path::{Path, PathBuf};

use clip_index::{Digest, ImageIndex};
use clip_storage::profile::{MAX_PROFILE_BYTES, Profile, decode, encode};

/// Where a node or a cache keeps the profile of an image: `dir/MANIFEST-DIGEST`.
pub fn path_in(dir: &Path, manifest: &Digest) -> PathBuf {
    dir.join(manifest.hex())
}

/// The chunks and reads a profile's text names; nothing (and a warning naming `origin`)
/// when it is not a usable profile.
pub fn parse(text: &str, index: &ImageIndex, origin: &str) -> Option<Profile> {
    if text.len() as u64 > MAX_PROFILE_BYTES {
        tracing::warn!(%origin, error = %format!("larger than {MAX_PROFILE_BYTES} bytes"), "start-up profile not used");
        return None;
    }
    match decode(text, index) {
        Ok(profile) => Some(profile),
        Err(e) => {
            tracing::warn!(%origin, error = %e, "start-up profile not used");
            None
        }
    }
}

/// The profile in the file at `path`; nothing if there is none.
pub fn load(path: &Path, index: &ImageIndex) -> Option<Profile> {
    let origin = path.display().to_string();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(%origin, error = %e, "start-up profile not used");
            return None;
        }
    };
    let mut text = String::new();
    if let Err(e) = file.take(MAX_PROFILE_BYTES + 1).read_to_string(&mut text) {
        tracing::warn!(%origin, error = %e, "start-up profile not used");
        return None;
    }
    parse(&text, index, &origin)
}

/// Writes `profile` to `path`; nothing when there is nothing to write.
pub fn save(path: &Path, index: &ImageIndex, profile: &Profile) {
    if !profile.is_empty() {
        save_text(path, &encode(index, profile));
    }
}

/// Writes a profile's text to `path`: to a temporary file of its own, synced, then
/// renamed, so a reader sees the old profile or the new one. Failures are logged: a
/// profile is an optimisation.
pub fn save_text(path: &Path, text: &str) {
    use std::io::Write;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::File::create(&tmp))
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %path.display(), error = %e, "writing the start-up profile failed");
    }
}
