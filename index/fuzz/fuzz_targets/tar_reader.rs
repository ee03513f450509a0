//! Arbitrary bytes through the tar reader, once in one read and once in short reads: no
//! panic, sane entries, and the same answer both ways.
#![no_main]

use clip_index::tar::{EntryKind, TarEntry, TarReader};
use clip_index_fuzz::Trickle;
use libfuzzer_sys::fuzz_target;

/// Every entry, then how the stream ended (`None` for the end marker or a clean end).
fn read_all(reader: impl std::io::Read) -> (Vec<TarEntry>, Option<String>) {
    let mut tar = TarReader::new(reader);
    let mut entries = Vec::new();
    loop {
        let before = tar.position();
        match tar.next_entry() {
            Ok(Some(e)) => {
                // The data starts at the block after the entry's headers, where the reader is.
                assert_eq!(e.data_offset, tar.position());
                assert_eq!(e.data_offset % 512, 0);
                assert!(e.header_offset >= before && e.header_offset + 512 <= e.data_offset);
                assert!(!e.path.is_empty());
                assert!(e.mode <= 0o7777);
                assert!(e.mtime_nsec < 1_000_000_000);
                assert!(e.size == 0 || e.kind == EntryKind::Regular);
                if matches!(e.kind, EntryKind::Symlink | EntryKind::Hardlink) {
                    assert!(!e.link.is_empty());
                }
                entries.push(e);
            }
            Ok(None) => {
                assert!(matches!(tar.next_entry(), Ok(None)), "None is final");
                return (entries, None);
            }
            Err(e) => return (entries, Some(e.to_string())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = read_all(data);
    let trickled = read_all(Trickle::new(data, 5));
    assert_eq!(whole, trickled);
});
