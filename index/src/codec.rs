//! The LEB128 encoding of an index's metadata: what writes it and what reads it back, every
//! read bounds-checked (a hostile payload gives an error, never a panic).

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::ImageSource;

#[derive(Default)]
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub(crate) fn uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    pub(crate) fn int(&mut self, v: i64) {
        self.uint(((v << 1) ^ (v >> 63)) as u64);
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.uint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    pub(crate) fn digest(&mut self, d: &Digest) {
        self.0.extend_from_slice(&d.0);
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// A reader of `buf` from `pos`.
    pub(crate) fn at(buf: &'a [u8], pos: usize) -> Self {
        Self { buf, pos }
    }

    fn truncated() -> Error {
        Error::CorruptIndex("payload ends early".into())
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8> {
        let b = *self.buf.get(self.pos).ok_or_else(Self::truncated)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub(crate) fn uint(&mut self) -> Result<u64> {
        // Most values fit in one byte.
        if let Some(&b) = self.buf.get(self.pos)
            && b < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(b));
        }
        self.long_uint()
    }

    fn long_uint(&mut self) -> Result<u64> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let mut v: u64 = 0;
        // At most ten bytes: 7 bits each, the tenth holding the 64th bit only.
        for (i, &b) in rest.iter().take(10).enumerate() {
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(Error::CorruptIndex("varint overflow".into()));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                self.pos += i + 1;
                return Ok(v);
            }
        }
        if rest.len() < 10 {
            return Err(Self::truncated());
        }
        Err(Error::CorruptIndex("varint too long".into()))
    }

    pub(crate) fn int(&mut self) -> Result<i64> {
        let u = self.uint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.uint()?).map_err(|_| Error::CorruptIndex("value out of range".into()))
    }

    /// Refuses bytes after what was parsed.
    pub(crate) fn end(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(Error::CorruptIndex(
                "trailing bytes after the payload".into(),
            ));
        }
        Ok(())
    }

    /// A length that will size an allocation: it must fit in what is left of the payload,
    /// given that each element takes at least `min_size` bytes.
    pub(crate) fn count(&mut self, min_size: usize) -> Result<usize> {
        let n = self.uint()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(Self::truncated());
        }
        Ok(n as usize)
    }

    /// The next `n` items of `size` bytes each, as one slice.
    pub(crate) fn fixed(&mut self, n: u64, size: usize) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        let len = n
            .checked_mul(size as u64)
            .filter(|&l| l <= left)
            .ok_or_else(Self::truncated)? as usize;
        let b = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(b)
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.uint()?;
        self.fixed(n, 1)
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| Error::CorruptIndex("text is not UTF-8".into()))
    }

    /// The image source, which a payload starts with.
    pub(crate) fn source(&mut self) -> Result<ImageSource> {
        Ok(ImageSource {
            repository: self.string()?,
            manifest_digest: self.digest()?,
            config_digest: self.digest()?,
            platform: self.string()?,
        })
    }

    pub(crate) fn digest(&mut self) -> Result<Digest> {
        let b = self
            .buf
            .get(self.pos..self.pos + 32)
            .ok_or_else(Self::truncated)?;
        self.pos += 32;
        let mut d = [0u8; 32];
        d.copy_from_slice(b);
        Ok(Digest(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_bad_ones_are_refused() {
        let values = [0, 1, 127, 128, 300, u64::from(u32::MAX), 1 << 63, u64::MAX];
        let ints = [0, -1, 1, i64::MIN, i64::MAX, -1_700_000_000];
        let mut w = Writer::default();
        values.iter().for_each(|&v| w.uint(v));
        ints.iter().for_each(|&v| w.int(v));
        let mut r = Reader::new(&w.0);
        for v in values {
            assert_eq!(r.uint().unwrap(), v);
        }
        for v in ints {
            assert_eq!(r.int().unwrap(), v);
        }
        assert!(r.end().is_ok());
        let refused = |bytes: &[u8], why: &str| {
            let r = Reader::new(bytes).uint();
            assert!(
                matches!(&r, Err(Error::CorruptIndex(m)) if m.contains(why)),
                "{bytes:?}: {r:?}"
            );
        };
        refused(&[], "ends early");
        refused(&[0x80], "ends early");
        refused(&[0xff; 9], "ends early");
        refused(
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            "overflow",
        );
        refused(&[0x80; 11], "too long");
        // A value that fits in 64 bits but not in 32 is refused where 32 are wanted.
        let mut w = Writer::default();
        w.uint(1 << 32);
        assert!(Reader::new(&w.0).u32().is_err());
        // A reader from a position reads on from there.
        assert_eq!(Reader::at(&[0x05, 0x07], 1).u8().unwrap(), 7);
    }
}
