//! Arbitrary bytes as a gzip layer (one or more members): index it, decode every chunk it planned, merge it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|blob: &[u8]| {
    clip_index_fuzz::check_layer(blob, clip_index_fuzz::GZIP);
});
