//! The `clip` command as a user runs it, against a real registry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::process::{Command, Output};

use clip_e2e::fixtures;
use clip_e2e::image::{Pusher, build_image};
use clip_e2e::model::{Kind, expected_tree};
use clip_e2e::registry::Registry;

fn clip(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clip"));
    cmd.args(args)
        .env_remove("CLIP_REGISTRY_USERNAME")
        .env_remove("CLIP_REGISTRY_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn index_inspect_and_cat_an_image() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let layers = fixtures::complex_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), None).push_image("cli/complex", "v1", &image)?;
    let expected = expected_tree(&layers);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("complex.clipidx");
    let file_arg = file.to_string_lossy().into_owned();

    let out = clip(&["index", &reference, "-o", &file_arg], &[])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    // Hard links are one file.
    let files = expected
        .values()
        .filter(|e| matches!(e.kind, Kind::File(_)))
        .map(|e| e.identity)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(summary.contains("layers:       3"), "{summary}");
    assert!(
        summary.contains(&format!("files:        {files} ")),
        "{summary}"
    );
    assert!(summary.contains("% of the compressed image"), "{summary}");
    assert!(file.is_file());

    let out = clip(&["inspect", &file_arg], &[])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&image.manifest.digest));

    let out = clip(&["inspect", "--json", "--tree", &file_arg], &[])?;
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let paths: Vec<String> = doc["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["path"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let want: Vec<String> = expected.keys().cloned().collect();
    assert_eq!(paths, want);
    assert_eq!(doc["layers"].as_array().map(Vec::len), Some(3));

    let out = clip(&["inspect", "--tree", &file_arg], &[])?;
    let listing = text(&out.stdout);
    let line = listing
        .lines()
        .find(|l| l.ends_with(" /etc/abs-link -> /etc/passwd"))
        .unwrap_or_default();
    assert!(
        line.starts_with("l0777 ") && line.contains(" 0:0 "),
        "{line:?}"
    );

    // cat from the index file and straight from the reference.
    for source in [&file_arg, &reference] {
        for path in [
            "/etc/passwd",
            "/usr/bin/tool-link",
            "/many/d05/f00005.py",
            "/empty-file",
        ] {
            let out = clip(&["cat", source, path], &[])?;
            assert!(out.status.success(), "{path}: {}", text(&out.stderr));
            let Some(Kind::File(data)) = expected.get(path).map(|e| e.kind.clone()) else {
                panic!("{path} is not a file in the model");
            };
            assert!(out.stdout == data, "{path}: bytes differ");
        }
    }
    // Symlinks are followed, inside the image.
    let out = clip(&["cat", &file_arg, "/etc/abs-link"], &[])?;
    assert!(out.stdout.starts_with(b"root:x:0:0:root:/root:/bin/ash"));

    // -v says how much came from the registry.
    let out = clip(&["cat", "-v", &file_arg, "/usr/bin/ping"], &[])?;
    let err = text(&out.stderr);
    assert!(
        err.contains("with 1 range requests") && err.contains(&registry.host()),
        "{err}"
    );

    for (path, message) in [
        ("/usr", "is a directory"),
        ("/no/such/file", "no such file or directory"),
        ("/dev/null", "not a regular file"),
    ] {
        let out = clip(&["cat", &file_arg, path], &[])?;
        assert_eq!(out.status.code(), Some(1), "{path}");
        assert!(
            text(&out.stderr).contains(message),
            "{path}: {}",
            text(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn credentials_come_from_the_environment_and_bad_ones_are_named() -> anyhow::Result<()> {
    let registry = Registry::start_with_auth("bob", "hunter2")?;
    let image = build_image(&fixtures::platform_layers("linux/amd64"), "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), registry.credentials()).push_image(
        "cli/private",
        "v1",
        &image,
    )?;

    let ok = clip(
        &["cat", &reference, "/platform.txt"],
        &[
            ("CLIP_REGISTRY_USERNAME", "bob"),
            ("CLIP_REGISTRY_PASSWORD", "hunter2"),
        ],
    )?;
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(ok.stdout, b"built for linux/amd64\n");

    let bad = clip(
        &["cat", &reference, "/platform.txt"],
        &[
            ("CLIP_REGISTRY_USERNAME", "bob"),
            ("CLIP_REGISTRY_PASSWORD", "nope"),
        ],
    )?;
    assert_eq!(bad.status.code(), Some(1));
    let err = text(&bad.stderr);
    assert!(
        err.contains("refused the credentials") && !err.contains("nope"),
        "{err}"
    );

    // A docker config.json as a pull secret would hold it.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"username":"bob","password":"hunter2"}}}}}}"#,
            registry.host()
        ),
    )?;
    let out = clip(
        &[
            "cat",
            "--docker-config",
            &cfg.to_string_lossy(),
            &reference,
            "/platform.txt",
        ],
        &[],
    )?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    Ok(())
}

#[test]
fn bad_input_gives_a_clear_error_and_exit_code() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("junk.clipidx");
    std::fs::write(
        &junk,
        b"CLIPINDX\x01\0\0\0garbage that is not an index at all........................",
    )?;
    let out = clip(&["inspect", &junk.to_string_lossy()], &[])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("corrupt clip index"),
        "{}",
        text(&out.stderr)
    );

    let out = clip(&["cat", "not a reference!", "/x"], &[])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid image reference"),
        "{}",
        text(&out.stderr)
    );

    let port = clip_e2e::free_port()?;
    let out = clip(
        &[
            "index",
            &format!("127.0.0.1:{port}/a/b:c"),
            "-o",
            &dir.path().join("x").to_string_lossy(),
        ],
        &[],
    )?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unreachable"),
        "{}",
        text(&out.stderr)
    );

    let out = clip(
        &["index", "x/y:z", "-o", "/tmp/x", "--platform", "linux"],
        &[],
    )?;
    assert!(
        text(&out.stderr).contains("invalid platform"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
