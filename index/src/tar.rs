//! A streaming tar reader that reports where each file's bytes sit in the uncompressed stream.
//!
//! It understands ustar, GNU (long names, base-256 numbers) and PAX (long names, nanosecond
//! times, large ids and sizes, `SCHILY.xattr.*`). It never trusts a length from the archive
//! for an allocation beyond fixed limits, so hostile archives give errors, not panics.

use std::io::{self, Read};

use crate::error::{Error, Result};

const BLOCK: u64 = 512;
/// The largest PAX or GNU long-name record we hold in memory.
const MAX_META: u64 = 1 << 20;

/// What kind of filesystem object a tar entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Regular,
    Hardlink,
    Symlink,
    CharDevice,
    BlockDevice,
    Directory,
    Fifo,
}

/// One entry of a tar stream, with PAX and GNU extensions already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// The path exactly as the archive spells it.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission and special bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Bytes of file data that follow the header (0 for everything but regular files).
    pub size: u64,
    /// Link target for symlinks and hard links.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the first data byte in the uncompressed layer stream.
    pub data_offset: u64,
    /// Offset of the entry's first header block (including PAX/GNU prefix headers).
    pub header_offset: u64,
}

/// Pulls [`TarEntry`]s out of a byte stream, skipping file data as it goes.
#[derive(Debug)]
pub struct TarReader<R> {
    inner: R,
    pos: u64,
    /// Data and padding of the previous entry still to skip.
    pending_skip: u64,
    finished: bool,
    /// Where skipped file data is read to; large reads keep the decompressor efficient.
    scratch: Vec<u8>,
}

#[derive(Default)]
struct Extensions {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            pos: 0,
            pending_skip: 0,
            finished: false,
            scratch: Vec::new(),
        }
    }

    /// Bytes consumed from the stream so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry, or `None` at the end-of-archive marker or a clean end of stream.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>> {
        if self.finished {
            return Ok(None);
        }
        self.skip(self.pending_skip)?;
        self.pending_skip = 0;
        let mut ext = Extensions::default();
        let mut header_offset = None;
        loop {
            let start = self.pos;
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? {
                if header_offset.is_some() {
                    return Err(Error::Truncated {
                        what: "tar stream after an extended header",
                    });
                }
                self.finished = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                // End-of-archive marker; what follows is padding.
                self.finished = true;
                return Ok(None);
            }
            header_offset.get_or_insert(start);
            verify_checksum(&block, start)?;
            let typeflag = block[156];
            let size = parse_number(&block[124..136], start, "size")?;
            match typeflag {
                b'x' => {
                    let data = self.read_meta(size, start)?;
                    parse_pax(&data, &mut ext, start)?;
                    continue;
                }
                b'g' => {
                    // Global PAX headers carry archive-wide defaults that image tools do not
                    // use; skip them like containerd does.
                    self.skip(padded(size))?;
                    continue;
                }
                b'L' => {
                    ext.path = Some(trim_nul(&self.read_meta(size, start)?).to_vec());
                    continue;
                }
                b'K' => {
                    ext.link = Some(trim_nul(&self.read_meta(size, start)?).to_vec());
                    continue;
                }
                _ => {}
            }
            let entry = self.finish_entry(&block, typeflag, size, ext, start, header_offset)?;
            return Ok(Some(entry));
        }
    }

    fn finish_entry(
        &mut self,
        block: &[u8; 512],
        typeflag: u8,
        header_size: u64,
        ext: Extensions,
        start: u64,
        header_offset: Option<u64>,
    ) -> Result<TarEntry> {
        let bad = |reason: String| Error::Tar {
            offset: start,
            reason,
        };
        let kind = match typeflag {
            b'0' | 0 | b'7' => EntryKind::Regular,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::CharDevice,
            b'4' => EntryKind::BlockDevice,
            b'5' => EntryKind::Directory,
            b'6' => EntryKind::Fifo,
            b'S' => return Err(bad("GNU sparse files are not supported".into())),
            other => {
                return Err(bad(format!(
                    "unsupported entry type {:?}",
                    char::from(other)
                )));
            }
        };
        let is_ustar = &block[257..263] == b"ustar\0";
        let path = match ext.path {
            Some(p) => p,
            None => {
                let name = trim_nul(&block[0..100]);
                let prefix = if is_ustar {
                    trim_nul(&block[345..500])
                } else {
                    &[]
                };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    let mut p = prefix.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    p
                }
            }
        };
        if path.is_empty() {
            return Err(bad("entry with an empty name".into()));
        }
        let link = ext
            .link
            .unwrap_or_else(|| trim_nul(&block[157..257]).to_vec());
        let size = ext.size.unwrap_or(header_size);
        let mode = u32::try_from(parse_number(&block[100..108], start, "mode")? & 0o7777)
            .map_err(|_| bad("mode out of range".into()))?;
        let uid = match ext.uid {
            Some(u) => u,
            None => id(parse_number(&block[108..116], start, "uid")?, start, "uid")?,
        };
        let gid = match ext.gid {
            Some(g) => g,
            None => id(parse_number(&block[116..124], start, "gid")?, start, "gid")?,
        };
        let (mtime, mtime_nsec) = match ext.mtime {
            Some(t) => t,
            None => (parse_signed(&block[136..148], start, "mtime")?, 0),
        };
        let (dev_major, dev_minor) = match kind {
            EntryKind::CharDevice | EntryKind::BlockDevice => (
                id(
                    parse_number(&block[329..337], start, "devmajor")?,
                    start,
                    "devmajor",
                )?,
                id(
                    parse_number(&block[337..345], start, "devminor")?,
                    start,
                    "devminor",
                )?,
            ),
            _ => (0, 0),
        };
        // Only regular files carry data, but a header may still claim a size for other types
        // (hard links in some writers): skip whatever is claimed.
        self.pending_skip = padded(size);
        let data_offset = self.pos;
        let file_size = if kind == EntryKind::Regular { size } else { 0 };
        if matches!(kind, EntryKind::Hardlink | EntryKind::Symlink) && link.is_empty() {
            return Err(bad(format!(
                "link {:?} has an empty target",
                String::from_utf8_lossy(&path)
            )));
        }
        Ok(TarEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            size: file_size,
            link,
            dev_major,
            dev_minor,
            xattrs: ext.xattrs,
            data_offset,
            header_offset: header_offset.unwrap_or(start),
        })
    }

    /// Reads one 512-byte block; `false` on a clean end of stream before its first byte.
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<bool> {
        let mut filled = 0;
        while filled < block.len() {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pos += filled as u64;
        match filled {
            0 => Ok(false),
            512 => Ok(true),
            _ => Err(Error::Truncated { what: "tar header" }),
        }
    }

    fn read_meta(&mut self, size: u64, start: u64) -> Result<Vec<u8>> {
        if size > MAX_META {
            return Err(Error::Tar {
                offset: start,
                reason: format!(
                    "extended header of {size} bytes exceeds the {MAX_META} byte limit"
                ),
            });
        }
        let mut data = vec![0u8; size as usize];
        self.read_exact_counted(&mut data)?;
        self.skip(padded(size) - size)?;
        Ok(data)
    }

    fn read_exact_counted(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::Truncated {
                what: "tar extended header",
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        if n > 0 && self.scratch.is_empty() {
            self.scratch = vec![0u8; 256 * 1024];
        }
        let scratch = &mut self.scratch;
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            match self.inner.read(&mut scratch[..want]) {
                Ok(0) => {
                    return Err(Error::Truncated {
                        what: "tar file data",
                    });
                }
                Ok(got) => {
                    n -= got as u64;
                    self.pos += got as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK).saturating_mul(BLOCK)
}

fn trim_nul(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(end) => &field[..end],
        None => field,
    }
}

fn id(v: u64, offset: u64, field: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Tar {
        offset,
        reason: format!("{field} {v} out of range"),
    })
}

fn verify_checksum(block: &[u8; 512], offset: u64) -> Result<()> {
    let stored = parse_number(&block[148..156], offset, "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed) {
        Ok(())
    } else {
        Err(Error::Tar {
            offset,
            reason: format!("header checksum {stored} does not match computed {unsigned}"),
        })
    }
}

/// Parses an unsigned numeric field: octal text or GNU base-256.
fn parse_number(field: &[u8], offset: u64, what: &str) -> Result<u64> {
    let v = parse_signed(field, offset, what)?;
    u64::try_from(v).map_err(|_| Error::Tar {
        offset,
        reason: format!("negative {what}"),
    })
}

fn parse_signed(field: &[u8], offset: u64, what: &str) -> Result<i64> {
    let bad = || Error::Tar {
        offset,
        reason: format!(
            "malformed {what} field {:?}",
            String::from_utf8_lossy(field)
        ),
    };
    if let Some(&first) = field.first()
        && first & 0x80 != 0
    {
        // Base-256: two's complement big-endian, the marker bit excluded.
        let negative = first & 0x40 != 0;
        let mut v: i128 = i128::from(first & 0x3f);
        if negative {
            v -= 0x40;
        }
        for &b in &field[1..] {
            v = v.checked_mul(256).ok_or_else(bad)? + i128::from(b);
        }
        return i64::try_from(v).map_err(|_| bad());
    }
    let text = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ');
    let mut v: i64 = 0;
    let mut digits = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad());
        }
        v = v.checked_mul(8).ok_or_else(bad)? + i64::from(b - b'0');
        digits += 1;
    }
    if digits == 0 && field.iter().any(|&b| b != 0 && b != b' ') {
        return Err(bad());
    }
    Ok(v)
}

fn parse_pax(data: &[u8], ext: &mut Extensions, offset: u64) -> Result<()> {
    let bad = |reason: &str| Error::Tar {
        offset,
        reason: format!("malformed PAX header: {reason}"),
    };
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let space = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("record without length"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("record length is not a number"))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("record length does not match its contents"));
        }
        let record = &rest[space + 1..len - 1];
        rest = &rest[len..];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("record without '='"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let text = || std::str::from_utf8(value).map_err(|_| bad("numeric value is not text"));
        match key {
            b"path" => ext.path = Some(value.to_vec()),
            b"linkpath" => ext.link = Some(value.to_vec()),
            b"size" => ext.size = Some(text()?.parse().map_err(|_| bad("bad size"))?),
            b"uid" => ext.uid = Some(text()?.parse().map_err(|_| bad("bad uid"))?),
            b"gid" => ext.gid = Some(text()?.parse().map_err(|_| bad("bad gid"))?),
            b"mtime" => ext.mtime = Some(parse_pax_time(text()?).ok_or_else(|| bad("bad mtime"))?),
            _ if key.starts_with(b"SCHILY.xattr.") => {
                let name = &key[b"SCHILY.xattr.".len()..];
                ext.xattrs.retain(|(n, _)| n != name);
                ext.xattrs.push((name.to_vec(), value.to_vec()));
            }
            _ if key.starts_with(b"GNU.sparse.") => {
                return Err(bad("GNU sparse files are not supported"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parses PAX `mtime` (`-12.5`, `1700000000.123456789`) into seconds and nanoseconds.
fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    let negative = whole.starts_with('-');
    let secs: i64 = whole.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    if negative && nanos > 0 {
        // -1.25 means 1.25 s before the epoch: seconds -2, plus 0.75 s.
        Some((secs - 1, 1_000_000_000 - nanos))
    } else {
        Some((secs, nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap_or_default()
    }

    fn entries(data: &[u8]) -> Result<Vec<TarEntry>> {
        let mut r = TarReader::new(data);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            out.push(e);
        }
        Ok(out)
    }

    #[test]
    fn reads_files_with_exact_data_offsets() -> Result<()> {
        let data = build(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append_data(&mut h, "dir/hello.txt", &b"hello"[..]).ok();
        });
        let es = entries(&data)?;
        assert_eq!(es.len(), 1);
        assert_eq!(es[0].path, b"dir/hello.txt");
        assert_eq!(es[0].mtime, 1_700_000_000);
        let off = es[0].data_offset as usize;
        assert_eq!(&data[off..off + 5], b"hello");
        Ok(())
    }

    #[test]
    fn long_names_come_through_gnu_and_pax() -> Result<()> {
        let long = "d/".repeat(120) + "file";
        let data = build(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_cksum();
            b.append_data(&mut h, &long, &b"x"[..]).ok();
            let mut h = tar::Header::new_ustar();
            h.set_size(1);
            h.set_cksum();
            b.append_pax_extensions([("path", long.as_bytes()), ("mtime", b"12.5".as_slice())])
                .ok();
            b.append_data(&mut h, "short", &b"y"[..]).ok();
        });
        let es = entries(&data)?;
        assert_eq!(es[0].path, long.as_bytes());
        assert_eq!(es[1].path, long.as_bytes());
        assert_eq!((es[1].mtime, es[1].mtime_nsec), (12, 500_000_000));
        Ok(())
    }

    #[test]
    fn pax_times_before_the_epoch_are_normalised() {
        assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time("3"), Some((3, 0)));
        assert_eq!(parse_pax_time("3.x"), None);
    }

    #[test]
    fn base256_numbers_parse() -> Result<()> {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 0x01;
        f[10] = 0x02;
        assert_eq!(parse_signed(&f, 0, "size")?, 0x0201);
        let neg = [0xffu8; 8];
        assert_eq!(parse_signed(&neg, 0, "mtime")?, -1);
        Ok(())
    }

    #[test]
    fn corrupt_checksum_is_an_error() {
        let mut data = build(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(0);
            h.set_cksum();
            b.append_data(&mut h, "a", &b""[..]).ok();
        });
        data[0] = b'b';
        assert!(matches!(entries(&data), Err(Error::Tar { .. })));
    }

    #[test]
    fn truncated_data_is_an_error() {
        let data = build(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(4000);
            h.set_cksum();
            b.append_data(&mut h, "a", &[7u8; 4000][..]).ok();
        });
        let mut r = TarReader::new(&data[..1500]);
        assert!(r.next_entry().is_ok_and(|e| e.is_some()));
        assert!(matches!(r.next_entry(), Err(Error::Truncated { .. })));
    }

    #[test]
    fn oversized_pax_header_is_refused_without_allocating_it() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(u64::MAX / 2);
        h.set_path("pax").ok();
        h.set_cksum();
        let data = h.as_bytes().to_vec();
        assert!(matches!(entries(&data), Err(Error::Tar { .. })));
    }
}
