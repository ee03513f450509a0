//! Arbitrary bytes into `clip_index::decode`, three ways: as they are; resealed, with the
//! header's magic, version (4, whose digest is of the whole body; version 5 parses the
//! same frames behind a second digest, of its bulk), length and digest made right so
//! mutations reach the body (frame lengths, zstd frames, bulk); and as a version 2 payload (windows
//! and block digests inline), compressed and sealed, so mutations reach the parser and
//! `validate`. Whatever decodes must answer lookups without panicking, agree with itself
//! (`walk`, `resolve`, `lookup`, `plan`), and survive `decode(encode(x)) == x`.
#![no_main]

use clip_index::format::{HEADER_LEN, MAGIC};
use clip_index::{Content, Digest, ImageIndex, Inode, decode, decode_owned, encode};
use libfuzzer_sys::fuzz_target;

fn seal(body: &[u8], version: u32, into: &mut Vec<u8>) {
    into.extend_from_slice(MAGIC);
    into.extend_from_slice(&version.to_le_bytes());
    into.extend_from_slice(&0u32.to_le_bytes());
    into.extend_from_slice(&(body.len() as u64).to_le_bytes());
    into.extend_from_slice(&Digest::of(body).0);
    into.extend_from_slice(body);
}

fn resealed(data: &[u8]) -> Option<Vec<u8>> {
    let body = data.get(HEADER_LEN..)?;
    let mut out = Vec::with_capacity(data.len());
    seal(body, 4, &mut out);
    Some(out)
}

fn wrapped_payload(data: &[u8]) -> Option<Vec<u8>> {
    let body = zstd::bulk::compress(data, 1).ok()?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    seal(&body, 2, &mut out);
    Some(out)
}

fn exercise(index: &ImageIndex, probe: &[u8]) {
    let _ = index.stats();
    let n = index.inode_count();
    assert!(index.node(Inode(0)).is_none());
    assert!(index.node(Inode(n + 1)).is_none());
    let mut paths = Vec::new();
    index.walk(|path, ino, _| paths.push((path.to_vec(), ino)));
    assert!(paths.len() as u64 >= n, "walk must reach every inode");
    for (path, ino) in &paths {
        match index.resolve(path, false) {
            Ok(found) => assert_eq!(found, *ino, "{}", String::from_utf8_lossy(path)),
            Err(e) => panic!("walked path {:?} does not resolve: {e}", path),
        }
        let _ = index.resolve(path, true);
        for d in index.children(*ino) {
            assert_eq!(index.lookup(*ino, &d.name), Some(d.inode));
        }
        let Some(node) = index.node(*ino) else {
            panic!("walk visited inode {ino:?} that does not exist");
        };
        if let Content::File { layer, offset } = node.content {
            let Some(l) = index.layers.get(layer as usize) else {
                panic!("file in missing layer {layer}");
            };
            match l.chunks_covering(offset, node.size) {
                Ok(chunks) if !chunks.is_empty() => {
                    let plan = l.plan(chunks);
                    assert!(plan.compressed.start <= plan.compressed.end);
                }
                Ok(_) => {}
                Err(e) => panic!("validated file data is outside its layer: {e}"),
            }
        }
    }
    for l in &index.layers {
        let n = l.chunks.len() as u32;
        if n > 0 {
            let _ = l.plan(0..n);
            let _ = l.plan(n - 1..n);
        }
    }
    let _ = index.resolve(probe, false);
    let _ = index.resolve(probe, true);
    let _ = index.lookup(Inode::ROOT, probe);
}

fn check(bytes: &[u8], probe: &[u8]) {
    // A file read into memory, or read as a stream, decodes to the same as its bytes, or
    // fails the same way.
    let owned = decode_owned(bytes.to_vec());
    let streamed = clip_index::format::read(bytes, true);
    let Ok(index) = decode(bytes) else {
        assert!(owned.is_err(), "decode_owned accepted what decode refused");
        assert!(streamed.is_err(), "read accepted what decode refused");
        return;
    };
    match owned {
        Ok(o) => assert_eq!(o, index, "decode_owned != decode"),
        Err(e) => panic!("decode_owned refused what decode accepted: {e}"),
    }
    match streamed {
        Ok(s) => {
            assert_eq!(s.index, index, "read != decode");
            assert_eq!(s.digest, Some(clip_index::index_digest(bytes)));
        }
        Err(e) => panic!("read refused what decode accepted: {e}"),
    }
    exercise(&index, probe);
    let again = match encode(&index) {
        Ok(a) => a,
        Err(e) => panic!("a decoded index does not encode: {e}"),
    };
    match decode(&again) {
        Ok(back) => assert_eq!(back, index, "decode(encode(x)) != x"),
        Err(e) => panic!("a re-encoded index does not decode: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let probe = &data[..data.len().min(64)];
    check(data, probe);
    if let Some(r) = resealed(data) {
        check(&r, probe);
    }
    if let Some(w) = wrapped_payload(data) {
        check(&w, probe);
    }
});
