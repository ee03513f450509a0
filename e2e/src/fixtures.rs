//! The standard test images. Each is a list of layers of known content; `model` computes
//! what the merged tree must be.

use crate::image::{Compression, Entry, Layer, Meta};
use crate::{Rng, text_bytes};

/// Several gzip layers exercising every entry type and every whiteout form, PAX records
/// (long names, nanosecond times, xattrs including `security.capability`), hard links,
/// and a directory of thousands of small files.
pub fn complex_layers() -> Vec<Layer> {
    let long_dir = "deep/".to_owned() + &"a-very-long-directory-name-".repeat(5);
    let long_name = format!("{long_dir}/{}", "file-with-a-long-name-".repeat(8));
    let cap = vec![
        1u8, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut base = vec![
        Entry::dir("etc"),
        Entry::File {
            path: "etc/passwd".into(),
            meta: Meta::new(0o644),
            data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        },
        Entry::File {
            path: "etc/shadow".into(),
            meta: Meta::new(0o640).owner(0, 42),
            data: b"root:*:19000:0:99999:7:::\n".to_vec(),
        },
        Entry::dir("usr/bin"),
        Entry::File {
            path: "usr/bin/tool".into(),
            meta: Meta::new(0o4755)
                .owner(0, 0)
                .time(1_600_000_000, 123_456_789),
            data: text_bytes(70_000, 11),
        },
        Entry::File {
            path: "usr/bin/ping".into(),
            meta: Meta::new(0o755).xattr("security.capability", &cap),
            data: text_bytes(5000, 12),
        },
        Entry::File {
            path: "usr/share/doc/readme".into(),
            meta: Meta::new(0o644)
                .owner(1000, 1000)
                .xattr("user.comment", b"hello xattr"),
            data: b"documentation\n".to_vec(),
        },
        Entry::hardlink("usr/bin/tool-link", "usr/bin/tool"),
        Entry::hardlink("usr/bin/tool-link2", "usr/bin/tool"),
        Entry::symlink("usr/bin/sh", "busybox"),
        Entry::symlink("lib", "usr/lib"),
        Entry::symlink("etc/abs-link", "/etc/passwd"),
        Entry::symlink("dangling", "/does/not/exist"),
        Entry::CharDevice {
            path: "dev/null".into(),
            meta: Meta::new(0o666),
            major: 1,
            minor: 3,
        },
        Entry::BlockDevice {
            path: "dev/loop0".into(),
            meta: Meta::new(0o660).owner(0, 6),
            major: 7,
            minor: 0,
        },
        Entry::Fifo {
            path: "run/fifo".into(),
            meta: Meta::new(0o600),
        },
        Entry::file(&long_name, b"long name contents".to_vec()),
        Entry::file("old/dir/one", b"1".to_vec()),
        Entry::file("old/dir/two", b"2".to_vec()),
        Entry::file("opaque/lower-a", b"lower a".to_vec()),
        Entry::file("opaque/sub/lower-b", b"lower b".to_vec()),
        Entry::file("replace-me", b"was a file".to_vec()),
        Entry::file("empty-file", Vec::new()),
        Entry::Dir {
            path: "tmp".into(),
            meta: Meta::new(0o1777),
        },
    ];
    let mut rng = Rng(99);
    for i in 0..3000 {
        let len = rng.below(3000) as usize;
        base.push(Entry::file(
            &format!("many/d{:02}/f{i:05}.py", i % 37),
            text_bytes(len, 1000 + i),
        ));
    }
    let middle = vec![
        Entry::Whiteout {
            path: "old/dir".into(),
        },
        Entry::Opaque {
            dir: "opaque".into(),
        },
        Entry::file("opaque/upper", b"upper".to_vec()),
        Entry::dir("replace-me"),
        Entry::file("replace-me/now-a-dir", b"inside".to_vec()),
        Entry::File {
            path: "etc/passwd".into(),
            meta: Meta::new(0o600).time(1_700_000_123, 999_999_999),
            data: b"root:x:0:0:root:/root:/bin/ash\nuser:x:1000:1000::/home/user:/bin/sh\n"
                .to_vec(),
        },
        Entry::Whiteout {
            path: "usr/bin/tool".into(),
        },
        Entry::file("many/d00/added-later.txt", b"later".to_vec()),
    ];
    let top = vec![
        Entry::Whiteout {
            path: "many/d01".into(),
        },
        Entry::file("usr/bin/tool", b"new tool".to_vec()),
        Entry::Whiteout {
            path: "etc/shadow".into(),
        },
        Entry::file(
            "etc/shadow",
            b"recreated in the same layer as its whiteout".to_vec(),
        ),
        Entry::file("orphan/parents/are/synthesised", b"x".to_vec()),
    ];
    vec![Layer::gzip(base), Layer::gzip(middle), Layer::gzip(top)]
}

/// One layer holding a large file of mixed compressible and random data, then a small
/// file at the very end of the layer.
pub fn big_layers(size: usize) -> Vec<Layer> {
    let mut data = Vec::with_capacity(size);
    let mut rng = Rng(5);
    let mut i = 0u64;
    while data.len() < size {
        let piece = (1 << 20).min(size - data.len());
        if i % 3 == 2 {
            data.extend(rng.bytes(piece));
        } else {
            data.extend(text_bytes(piece, 500 + i));
        }
        i += 1;
    }
    vec![Layer::gzip(vec![
        Entry::file("data/big.bin", data),
        Entry::file(
            "data/small-at-end.txt",
            b"the last file of the layer\n".to_vec(),
        ),
    ])]
}

/// Three layers, one per compression form clip handles differently.
pub fn format_layers() -> Vec<Layer> {
    let mut multi = Vec::new();
    for i in 0..40 {
        multi.push(Entry::file(
            &format!("multi/f{i}"),
            text_bytes(100_000, 7000 + i),
        ));
    }
    let mut plain = Vec::new();
    for i in 0..20 {
        plain.push(Entry::file(
            &format!("plain/f{i}"),
            Rng(8000 + i).bytes(60_000),
        ));
    }
    let mut zstd = Vec::new();
    for i in 0..30 {
        zstd.push(Entry::file(
            &format!("zstd/f{i}"),
            text_bytes(150_000, 9000 + i),
        ));
    }
    zstd.push(Entry::Whiteout {
        path: "plain/f3".into(),
    });
    vec![
        Layer::with(multi, Compression::Gzip { members: 5 }),
        Layer::with(plain, Compression::Plain),
        Layer::with(zstd, Compression::Zstd),
    ]
}

/// A small image whose content names its platform.
pub fn platform_layers(platform: &str) -> Vec<Layer> {
    vec![Layer::gzip(vec![Entry::file(
        "platform.txt",
        format!("built for {platform}\n").into_bytes(),
    )])]
}
