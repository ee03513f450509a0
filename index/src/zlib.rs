//! A small safe wrapper around the zlib inflate calls that flate2 does not expose:
//! stopping at deflate block boundaries (`Z_BLOCK`), `inflatePrime` and
//! `inflateSetDictionary`. All `unsafe` of the crate lives here.

use std::ffi::{CStr, c_int};

use libz_rs_sys as z;

/// How the inflater interprets the start of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wrapper {
    /// A gzip member header comes first.
    Gzip,
    /// Raw deflate data: resuming at a checkpoint.
    Raw,
}

impl Wrapper {
    fn window_bits(self) -> c_int {
        match self {
            Wrapper::Gzip => 31,
            Wrapper::Raw => -15,
        }
    }
}

/// What one call to [`Inflater::inflate`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The end of the current gzip member (or raw deflate stream) was reached.
    pub stream_end: bool,
    /// zlib's `data_type`: unused bits in the last input byte, +64 while in the last block,
    /// +128 right after a block or header ended.
    pub data_type: i32,
}

impl Step {
    /// True when inflate stopped exactly at a block boundary that can be a checkpoint.
    pub fn at_block_boundary(&self) -> bool {
        self.data_type & 128 != 0 && self.data_type & 64 == 0
    }

    /// Unused bits of the last consumed byte, the bits a resume must prime.
    pub fn bits(&self) -> u8 {
        (self.data_type & 7) as u8
    }
}

/// An inflate stream. The `z_stream` is boxed because zlib keeps a pointer to it.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inflater")
    }
}

// SAFETY: the stream's state is owned exclusively by this value and zlib-rs uses no
// thread-local state; moving it to another thread is sound.
unsafe impl Send for Inflater {}

impl Inflater {
    pub fn new(wrapper: Wrapper) -> Result<Self, String> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid, zero-initialised z_stream; version and size are the
        // library's own.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                wrapper.window_bits(),
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if ret != z::Z_OK {
            return Err(format!("inflateInit2 failed ({ret})"));
        }
        Ok(Self { strm })
    }

    /// Starts over, e.g. at the next gzip member.
    pub fn reset(&mut self, wrapper: Wrapper) -> Result<(), String> {
        // SAFETY: strm was initialised by inflateInit2_.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, wrapper.window_bits()) };
        self.check(ret, "inflateReset2")
    }

    /// Feeds the `bits` high bits of `byte` that precede a checkpoint.
    pub fn prime(&mut self, bits: u8, byte: u8) -> Result<(), String> {
        if bits == 0 {
            return Ok(());
        }
        // A block boundary leaves at most 7 unused bits in its byte; more is a corrupt index.
        if bits > 7 {
            return Err(format!(
                "{bits} spare bits do not fit in the byte before a checkpoint"
            ));
        }
        let value = c_int::from(byte >> (8 - bits));
        // SAFETY: strm was initialised by inflateInit2_ in raw mode.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), value) };
        self.check(ret, "inflatePrime")
    }

    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), String> {
        if dict.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(dict.len()).map_err(|_| "dictionary too large".to_owned())?;
        // SAFETY: dict is a valid slice of len bytes; zlib copies it.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        self.check(ret, "inflateSetDictionary")
    }

    /// Runs inflate once. With `stop_at_block` zlib returns at every deflate block boundary.
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_block: bool,
    ) -> Result<Step, String> {
        let in_len = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let out_len = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len;
        let flush = if stop_at_block {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        // SAFETY: next_in/next_out point into live slices of the given lengths for the
        // duration of the call; zlib writes at most avail_out bytes.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = (in_len - self.strm.avail_in) as usize;
        let produced = (out_len - self.strm.avail_out) as usize;
        // Do not keep pointers into the caller's buffers.
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let step = Step {
            consumed,
            produced,
            stream_end: ret == z::Z_STREAM_END,
            data_type: self.strm.data_type,
        };
        match ret {
            z::Z_OK | z::Z_STREAM_END => Ok(step),
            // No progress was possible: the caller must supply more input or output space.
            z::Z_BUF_ERROR => Ok(step),
            z::Z_NEED_DICT => Err("stream needs a preset dictionary".into()),
            _ => Err(self.message(ret)),
        }
    }

    fn check(&self, ret: c_int, what: &str) -> Result<(), String> {
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(format!("{what}: {}", self.message(ret)))
        }
    }

    fn message(&self, ret: c_int) -> String {
        if self.strm.msg.is_null() {
            format!("zlib error {ret}")
        } else {
            // SAFETY: zlib sets msg to a static NUL-terminated string.
            unsafe { CStr::from_ptr(self.strm.msg) }
                .to_string_lossy()
                .into_owned()
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: strm was initialised by inflateInit2_ and is ended exactly once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priming_more_bits_than_a_byte_holds_is_an_error() -> Result<(), String> {
        // Found by the decode_chunks fuzz target: `8 - bits` overflowed for bits > 8.
        let mut inf = Inflater::new(Wrapper::Raw)?;
        assert!(inf.prime(9, 0xff).is_err());
        assert!(inf.prime(255, 0xff).is_err());
        inf.prime(7, 0xff)
    }
}
