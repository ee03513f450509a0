//! Filesystem errors as errno: the one place storage and index errors meet the kernel.

use fuser::Errno;

/// The errno a failed read returns. Every fetch or verification failure is EIO for that
/// read only; the mount stays up.
pub fn read_errno(e: &clip_storage::Error) -> Errno {
    match e {
        clip_storage::Error::Index(clip_index::Error::RangeOutOfBounds { .. }) => Errno::EINVAL,
        _ => Errno::EIO,
    }
}
