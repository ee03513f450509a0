//! The registry source, the indexer and the range reader against a real registry holding
//! images built from known content.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::collections::BTreeMap;
use std::sync::Arc;

use clip_e2e::Rng;
use clip_e2e::fixtures;
use clip_e2e::image::{BuiltImage, Layer, Pusher, build_image};
use clip_e2e::model::{Expect, Kind, expected_tree};
use clip_e2e::proxy::Proxy;
use clip_e2e::registry::Registry;
use clip_index::{Content, ImageIndex, IndexOptions, NodeKind};
use clip_storage::{
    Credentials, Error, Platform, RangeReader, RegistryClient, RegistryConfig, build_index,
};

fn client() -> RegistryClient {
    RegistryClient::new(RegistryConfig::default())
}

async fn index_of(client: &RegistryClient, reference: &str) -> anyhow::Result<ImageIndex> {
    let resolved = client.resolve(reference, None).await?;
    Ok(build_index(
        client,
        &resolved,
        IndexOptions::default(),
        4,
        Arc::default(),
    )
    .await?)
}

fn push(registry_host: &str, repo: &str, layers: &[Layer]) -> anyhow::Result<(String, BuiltImage)> {
    let image = build_image(layers, "linux", "amd64")?;
    let reference = Pusher::new(registry_host, None).push_image(repo, "v1", &image)?;
    Ok((reference, image))
}

/// Compares every path of the index with the model: type, mode, owner, times, links,
/// symlink targets, device numbers and xattrs.
fn assert_tree_matches(index: &ImageIndex, expected: &BTreeMap<String, Expect>) {
    let mut seen = BTreeMap::new();
    index.walk(|path, ino, node| {
        seen.insert(
            String::from_utf8_lossy(path).into_owned(),
            (ino, node.clone()),
        );
    });
    let got: Vec<&String> = seen.keys().collect();
    let want: Vec<&String> = expected.keys().collect();
    assert_eq!(got, want, "the merged tree has other paths than the model");
    for (path, e) in expected {
        let (_, node) = &seen[path];
        let kind = match &e.kind {
            Kind::Dir => NodeKind::Directory,
            Kind::File(data) => {
                assert_eq!(node.size, data.len() as u64, "{path}: size");
                NodeKind::Regular
            }
            Kind::Symlink(t) => {
                match &node.content {
                    Content::Symlink { target } => assert_eq!(&**target, t.as_bytes(), "{path}"),
                    other => panic!("{path}: {other:?} is not a symlink"),
                }
                NodeKind::Symlink
            }
            Kind::CharDevice(ma, mi) | Kind::BlockDevice(ma, mi) => {
                assert_eq!(
                    (node.rdev_major, node.rdev_minor),
                    (*ma, *mi),
                    "{path}: rdev"
                );
                if matches!(e.kind, Kind::CharDevice(..)) {
                    NodeKind::CharDevice
                } else {
                    NodeKind::BlockDevice
                }
            }
            Kind::Fifo => NodeKind::Fifo,
        };
        assert_eq!(node.kind, kind, "{path}: kind");
        assert_eq!(node.mode, e.meta.mode, "{path}: mode");
        assert_eq!(
            (node.uid, node.gid),
            (e.meta.uid, e.meta.gid),
            "{path}: owner"
        );
        assert_eq!(
            (node.mtime, node.mtime_nsec),
            (e.meta.mtime, e.meta.mtime_nsec),
            "{path}: mtime"
        );
        assert_eq!(node.nlink, e.nlink, "{path}: nlink");
        let xattrs: Vec<(String, Vec<u8>)> = node
            .xattrs
            .iter()
            .map(|x| {
                (
                    String::from_utf8_lossy(&x.name).into_owned(),
                    x.value.to_vec(),
                )
            })
            .collect();
        assert_eq!(xattrs, e.meta.xattrs, "{path}: xattrs");
    }
    // Hard links share one inode, and nothing else does.
    let mut by_identity: BTreeMap<usize, u64> = BTreeMap::new();
    for (path, e) in expected {
        if e.kind != Kind::Dir {
            let ino = seen[path].0.0;
            let prev = by_identity.insert(e.identity, ino);
            assert!(
                prev.is_none_or(|p| p == ino),
                "{path}: hard link on another inode"
            );
        }
    }
}

/// Reads every regular file through the range reader and compares the bytes.
async fn assert_all_bytes_match<S: clip_storage::BlobSource>(
    reader: &RangeReader<S>,
    expected: &BTreeMap<String, Expect>,
) -> anyhow::Result<()> {
    let index = reader.index().clone();
    for (path, e) in expected {
        if let Kind::File(data) = &e.kind {
            let ino = index.resolve(path.as_bytes(), false)?;
            let got = reader.read_file(ino, 0, data.len() as u64 + 10).await?;
            assert!(got[..] == data[..], "{path}: bytes differ");
        }
    }
    Ok(())
}

/// Reads the file at `path` (a regular file of the model of `layers`) and checks its bytes.
async fn assert_file_reads<S: clip_storage::BlobSource>(
    reader: &RangeReader<S>,
    layers: &[Layer],
    path: &str,
) -> anyhow::Result<()> {
    let expected = expected_tree(layers);
    let Some(Kind::File(want)) = expected.get(path).map(|e| e.kind.clone()) else {
        anyhow::bail!("{path} is not a file of the model");
    };
    let ino = reader.index().resolve(path.as_bytes(), false)?;
    let got = reader.read_file(ino, 0, want.len() as u64 + 10).await?;
    assert!(got[..] == want[..], "{path}: bytes differ");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complex_image_matches_the_reference_model_byte_for_byte() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let layers = fixtures::complex_layers();
    let (reference, _) = push(&registry.host(), "test/complex", &layers)?;
    let client = client();
    let index = index_of(&client, &reference).await?;
    let expected = expected_tree(&layers);
    assert_tree_matches(&index, &expected);

    // The encoded index decodes to the same thing.
    let encoded = clip_index::encode(&index)?;
    assert_eq!(clip_index::decode(&encoded)?, index);

    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let reader = RangeReader::new(Arc::new(index), Arc::new(source));
    assert_all_bytes_match(&reader, &expected).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_member_gzip_plain_tar_and_zstd_layers_read_exactly() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let layers = fixtures::format_layers();
    let (reference, _) = push(&registry.host(), "test/formats", &layers)?;
    let client = client();
    let index = index_of(&client, &reference).await?;
    let compressions: Vec<_> = index.layers.iter().map(|l| l.compression).collect();
    use clip_index::Compression::*;
    assert_eq!(compressions, vec![Gzip, None, Zstd]);
    let expected = expected_tree(&layers);
    assert_tree_matches(&index, &expected);
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let reader = RangeReader::new(Arc::new(index), Arc::new(source));
    assert_all_bytes_match(&reader, &expected).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_layer_random_ranges_are_exact_and_a_tail_read_fetches_one_span() -> anyhow::Result<()>
{
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let layers = fixtures::big_layers(200 << 20);
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("test/big", "v1", &image)?;
    let client = client();
    let index = index_of(&client, &format!("{}/test/big:v1", proxy.host())).await?;
    let layer = &index.layers[0];
    let span = IndexOptions::default().checkpoint_span;
    assert!(
        layer.checkpoints.len() as u64 >= layer.uncompressed_size / span / 2,
        "only {} checkpoints in {} bytes",
        layer.checkpoints.len(),
        layer.uncompressed_size
    );

    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let reader = RangeReader::new(Arc::new(index.clone()), Arc::new(source));

    // A small file at the end of the layer costs about one span of compressed bytes.
    proxy.clear_log();
    let ino = index.resolve(b"/data/small-at-end.txt", false)?;
    let got = reader.read_file(ino, 0, 1 << 20).await?;
    assert_eq!(&got[..], b"the last file of the layer\n");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let reads = proxy.blob_reads();
    let fetched = proxy.blob_bytes();
    let compressed_per_span =
        span as f64 * layer.compressed_size as f64 / layer.uncompressed_size as f64;
    assert_eq!(reads.len(), 1, "one range request: {reads:?}");
    assert!(reads[0].range.is_some(), "a Range request");
    assert!(
        (fetched as f64) < 2.0 * compressed_per_span + f64::from(layer.chunk_size),
        "fetched {fetched} bytes; a span is about {compressed_per_span:.0} compressed bytes"
    );
    assert!(fetched < layer.compressed_size / 20);

    // Every entry's metadata matches the model, and the whole 200 MB file reads back exactly.
    let expected = expected_tree(&layers);
    assert_tree_matches(&index, &expected);
    let Some(Kind::File(big)) = expected.get("/data/big.bin").map(|e| e.kind.clone()) else {
        anyhow::bail!("model");
    };
    let ino = index.resolve(b"/data/big.bin", false)?;
    let mut offset = 0u64;
    while offset < big.len() as u64 {
        let piece = reader.read_file(ino, offset, 16 << 20).await?;
        assert!(
            piece[..] == big[offset as usize..offset as usize + piece.len()],
            "big.bin at {offset}"
        );
        offset += piece.len() as u64;
    }

    // Random ranges anywhere in the layer are exact.
    let tar = &image.tars[0];
    let mut rng = Rng(42);
    for _ in 0..25 {
        let len = 1 + rng.below(3 << 20);
        let offset = rng.below(tar.len() as u64 - len);
        let got = reader.read(0, offset, len).await?;
        assert!(
            got[..] == tar[offset as usize..(offset + len) as usize],
            "range {offset}+{len}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_index_resolves_to_the_requested_platform() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let amd = build_image(&fixtures::platform_layers("linux/amd64"), "linux", "amd64")?;
    let arm = build_image(&fixtures::platform_layers("linux/arm64"), "linux", "arm64")?;
    let reference = Pusher::new(&registry.host(), None).push_index(
        "test/multi",
        "v1",
        &[amd.clone(), arm.clone()],
    )?;
    let client = client();
    for (platform, image) in [("linux/arm64", &arm), ("linux/amd64", &amd)] {
        let p: Platform = platform.parse()?;
        let resolved = client.resolve(&reference, Some(&p)).await?;
        assert_eq!(resolved.manifest_digest.to_string(), image.manifest.digest);
        assert_eq!(resolved.platform.to_string(), platform);
        let index = build_index(
            &client,
            &resolved,
            IndexOptions::default(),
            2,
            Arc::default(),
        )
        .await?;
        let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
        let reader = RangeReader::new(Arc::new(index.clone()), Arc::new(source));
        let ino = index.resolve(b"platform.txt", false)?;
        let got = reader.read_file(ino, 0, 100).await?;
        assert_eq!(&got[..], format!("built for {platform}\n").as_bytes());
    }
    let missing = client
        .resolve(&reference, Some(&"linux/s390x".parse()?))
        .await;
    let msg = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/arm64"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_works_and_a_wrong_password_is_reported() -> anyhow::Result<()> {
    let registry = Registry::start_with_auth("alice", "s3cret")?;
    let image = build_image(&fixtures::platform_layers("linux/amd64"), "linux", "amd64")?;
    let reference = Pusher::new(&registry.host(), registry.credentials()).push_image(
        "private/app",
        "v1",
        &image,
    )?;

    let with = |password: &str| {
        RegistryClient::new(RegistryConfig {
            credentials: Some(Credentials::Basic {
                username: "alice".into(),
                password: password.into(),
            }),
            ..RegistryConfig::default()
        })
    };
    let good = with("s3cret");
    let index = index_of(&good, &reference).await?;
    let source = good.repository(&index.source.repository, &index.source.manifest_digest)?;
    let reader = RangeReader::new(Arc::new(index.clone()), Arc::new(source));
    let got = reader
        .read_file(index.resolve(b"platform.txt", false)?, 0, 100)
        .await?;
    assert_eq!(&got[..], b"built for linux/amd64\n");

    for c in [with("wrong"), client()] {
        match c.resolve(&reference, None).await {
            Err(Error::Unauthorized { registry: r, .. }) => assert_eq!(r, registry.host()),
            other => panic!("expected Unauthorized, got {other:?}"),
        }
    }

    // The same credentials through a docker config.json, as a pull secret carries them.
    let cfg = format!(
        r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
        registry.host()
    );
    let from_secret = RegistryClient::new(RegistryConfig {
        docker_config: clip_storage::DockerConfig::parse(cfg.as_bytes(), "test")?,
        ..RegistryConfig::default()
    });
    assert!(from_secret.resolve(&reference, None).await.is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_blobs_and_a_registry_that_ignores_range_still_read_exactly()
-> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let layers = fixtures::format_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("test/redirect", "v1", &image)?;
    let expected = expected_tree(&layers);
    let client = client();
    let reference = format!("{}/test/redirect:v1", proxy.host());

    proxy.set_redirect_blobs(true);
    let index = index_of(&client, &reference).await?;
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let reader = RangeReader::new(Arc::new(index), Arc::new(source));
    assert_all_bytes_match(&reader, &expected).await?;
    let redirects = proxy.log().iter().filter(|l| l.status == 307).count();
    let ranged_after_redirect = proxy
        .log()
        .iter()
        .filter(|l| l.path.starts_with("/redirected") && l.range.is_some() && l.status == 206)
        .count();
    assert!(
        redirects > 0 && ranged_after_redirect > 0,
        "{:?}",
        proxy.log()
    );

    proxy.set_redirect_blobs(false);
    proxy.set_ignore_range(true);
    proxy.clear_log();
    assert_all_bytes_match(&reader, &expected).await?;
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.range.is_some() && l.status == 200)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_images_unreachable_registries_and_bad_references_are_clear_errors()
-> anyhow::Result<()> {
    let registry = Registry::start()?;
    let client = client();
    match client
        .resolve(&format!("{}/no/such:image", registry.host()), None)
        .await
    {
        Err(Error::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    let (reference, _) = push(
        &registry.host(),
        "test/tags",
        &fixtures::platform_layers("x"),
    )?;
    let wrong_tag = reference.replace(":v1", ":v2");
    assert!(matches!(
        client.resolve(&wrong_tag, None).await,
        Err(Error::NotFound { .. })
    ));

    let closed = clip_e2e::free_port()?;
    match client
        .resolve(&format!("127.0.0.1:{closed}/x/y:z"), None)
        .await
    {
        Err(Error::Unreachable { .. }) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
    for bad in ["a b", "-leading/dash", "repo@sha256:nothex", ""] {
        assert!(
            matches!(
                client.resolve(bad, None).await,
                Err(Error::Reference { .. })
            ),
            "{bad}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_layer_media_types_and_corrupt_blobs_are_refused() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let pusher = Pusher::new(&registry.host(), None);
    let client = client();

    // A layer of an unknown media type.
    let mut image = build_image(&fixtures::platform_layers("x"), "linux", "amd64")?;
    image.layers[0].media_type = "application/vnd.example.weird".into();
    let image = clip_e2e::image::build_from_blobs(image.layers, image.tars, "linux", "amd64")?;
    let reference = pusher.push_image("test/weird", "v1", &image)?;
    let msg = client
        .resolve(&reference, None)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("unsupported media type"), "{msg}");

    // A truncated gzip layer (the registry serves whatever was pushed under its digest).
    let mut image = build_image(&fixtures::platform_layers("x"), "linux", "amd64")?;
    let blob = &mut image.layers[0];
    blob.data.truncate(blob.data.len() - 20);
    *blob = clip_e2e::image::Blob::new(&blob.media_type.clone(), blob.data.clone());
    let image = clip_e2e::image::build_from_blobs(image.layers, image.tars, "linux", "amd64")?;
    let reference = pusher.push_image("test/truncated", "v1", &image)?;
    let err = index_of(&client, &reference)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("layer 0") && err.contains("ended early"),
        "{err}"
    );

    // A tar entry escaping the root.
    let layers = vec![Layer::gzip(vec![clip_e2e::image::raw_entry(
        b"../../etc/evil",
        b'0',
        b"",
        b"x",
    )])];
    let (reference, _) = push(&registry.host(), "test/evil", &layers)?;
    let err = index_of(&client, &reference)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("escapes the image root"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_flow_works_and_an_expired_token_is_renewed() -> anyhow::Result<()> {
    use clip_e2e::token::TokenServer;
    let tokens = TokenServer::start("carol", "tok3n")?;
    let mut registry = Registry::start_with_token_auth(&tokens)?;
    let layers = fixtures::format_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let push = tokens.mint("tok/app", &["pull", "push"])?;
    let reference = Pusher::with_authorization(&registry.host(), &format!("Bearer {push}"))
        .push_image("tok/app", "v1", &image)?;
    let creds = |password: &str| RegistryConfig {
        credentials: Some(Credentials::Basic {
            username: "carol".into(),
            password: password.into(),
        }),
        ..RegistryConfig::default()
    };

    // Basic credentials are exchanged for a token at the realm the registry names.
    let client = RegistryClient::new(creds("tok3n"));
    let index = index_of(&client, &reference).await?;
    assert!(tokens.issued() >= 2, "tokens were requested");

    // A token that stops being accepted mid-life (revoked, or the issuer rotated its key)
    // gets a 401: clip must fetch a new token and go on, as a long-lived mount must.
    let client = RegistryClient::new(creds("tok3n"));
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let reader = RangeReader::new(Arc::new(index.clone()), Arc::new(source));
    assert_file_reads(&reader, &layers, "/multi/f0").await?;
    let issued = tokens.issued();
    tokens.rotate_key()?;
    registry.restart()?;
    // Read after the token expired.
    assert_file_reads(&reader, &layers, "/zstd/f7").await?;
    assert!(
        tokens.issued() > issued,
        "a new token was fetched after the 401"
    );

    match RegistryClient::new(creds("wrong"))
        .resolve(&reference, None)
        .await
    {
        Err(Error::Unauthorized { .. }) => {}
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_references_and_the_host_platform_resolve() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let amd = build_image(&fixtures::platform_layers("linux/amd64"), "linux", "amd64")?;
    let arm = build_image(&fixtures::platform_layers("linux/arm64"), "linux", "arm64")?;
    let pusher = Pusher::new(&registry.host(), None);
    let index_ref = pusher.push_index("test/pinned", "v1", &[arm.clone(), amd.clone()])?;
    let client = client();

    // No platform given: the host's is picked from the index.
    let host = Platform::host();
    let resolved = client.resolve(&index_ref, None).await?;
    assert_eq!(resolved.platform.architecture, host.architecture);
    let want = if host.architecture == "arm64" {
        &arm
    } else {
        &amd
    };
    assert_eq!(resolved.manifest_digest.to_string(), want.manifest.digest);

    // A manifest pinned by digest resolves to exactly that manifest, with no tag.
    let pinned = format!("{}/test/pinned@{}", registry.host(), amd.manifest.digest);
    let resolved = client.resolve(&pinned, None).await?;
    assert_eq!(resolved.manifest_digest.to_string(), amd.manifest.digest);
    // A digest that is not in the repository is not found.
    let missing = format!(
        "{}/test/pinned@{}",
        registry.host(),
        clip_index::Digest::of(b"other")
    );
    assert!(matches!(
        client.resolve(&missing, None).await,
        Err(Error::NotFound { .. })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_read_cut_off_mid_body_resumes_where_it_stopped() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::start(&registry.host())?;
    let data = Rng(11).bytes(3 << 20);
    let layers = vec![Layer::gzip(vec![clip_e2e::image::Entry::file(
        "random",
        data.clone(),
    )])];
    let image = build_image(&layers, "linux", "amd64")?;
    Pusher::new(&registry.host(), None).push_image("test/cut", "v1", &image)?;
    let client = client();
    let index = index_of(&client, &format!("{}/test/cut:v1", proxy.host())).await?;
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let digest = index.layers[0].digest;
    let reader = RangeReader::new(Arc::new(index), Arc::new(source));
    proxy.clear_log();
    proxy.cut_blob_bodies(2, 100_000);
    let ino = reader.index().resolve(b"/random", false).unwrap();
    let got = reader.read_file(ino, 0, data.len() as u64).await?;
    assert!(got[..] == data[..], "the bytes differ after the cuts");
    // Three requests: each after a cut asks only for what had not arrived.
    let reads: Vec<_> = proxy
        .blob_reads()
        .into_iter()
        .filter(|l| l.path.contains(&digest.to_string()))
        .collect();
    assert_eq!(reads.len(), 3, "{reads:?}");
    let starts: Vec<u64> = reads
        .iter()
        .map(|l| {
            let r = l.range.as_deref().unwrap_or_default();
            r.trim_start_matches("bytes=")
                .split('-')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX)
        })
        .collect();
    assert_eq!(reads[0].body_bytes, 100_000);
    assert_eq!(starts[1], starts[0] + 100_000, "{reads:?}");
    assert_eq!(starts[2], starts[1] + 100_000, "{reads:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_up_negotiates_the_token_before_the_first_read() -> anyhow::Result<()> {
    use clip_e2e::token::TokenServer;
    let tokens = TokenServer::start("dave", "s3cret")?;
    let registry = Registry::start_with_token_auth(&tokens)?;
    let layers = fixtures::format_layers();
    let image = build_image(&layers, "linux", "amd64")?;
    let push = tokens.mint("warm/app", &["pull", "push"])?;
    let reference = Pusher::with_authorization(&registry.host(), &format!("Bearer {push}"))
        .push_image("warm/app", "v1", &image)?;
    let client = || {
        RegistryClient::new(RegistryConfig {
            credentials: Some(Credentials::Basic {
                username: "dave".into(),
                password: "s3cret".into(),
            }),
            ..RegistryConfig::default()
        })
    };
    let index = index_of(&client(), &reference).await?;
    let fresh = || client().repository(&index.source.repository, &index.source.manifest_digest);

    // A new client, as a new mount has: warming up fetches its token.
    let client = client();
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    let before = tokens.issued();
    source.warm_up(&index.layers[0].digest).await;
    let warmed = tokens.issued();
    assert!(warmed > before, "the warm-up fetched a token");

    // The first read needs no token round trip of its own, and reads the right bytes.
    let reader = RangeReader::new(Arc::new(index.clone()), Arc::new(source));
    assert_file_reads(&reader, &layers, "/multi/f0").await?;
    assert_eq!(
        tokens.issued(),
        warmed,
        "the read reused the warmed-up token"
    );

    // At mount: no request when the first chunk is cached already or a shared cache answers
    // first; otherwise the warm-up runs in the background.
    fresh()?.warm_up_for(&index, |_| true, false);
    fresh()?.warm_up_for(&index, |_| false, true);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(tokens.issued(), warmed, "no warm-up request was made");
    fresh()?.warm_up_for(&index, |_| false, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while tokens.issued() == warmed {
        assert!(
            std::time::Instant::now() < deadline,
            "no warm-up in the background"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Warming up against a registry that is gone is quiet: the reads report it.
    drop(registry);
    let source = client.repository(&index.source.repository, &index.source.manifest_digest)?;
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        source.warm_up(&index.layers[0].digest),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_up_leaves_connections_for_parallel_fetches() -> anyhow::Result<()> {
    use clip_storage::BlobSource;
    let registry = Registry::start()?;
    let forward = clip_e2e::forward::Forwarder::start(&registry.host())?;
    let layers = vec![Layer::gzip(vec![clip_e2e::image::Entry::file(
        "data",
        Rng(9).bytes(1 << 20),
    )])];
    let (_, _) = push(&registry.host(), "warm/conns", &layers)?;
    let index = index_of(&client(), &format!("{}/warm/conns:v1", forward.host())).await?;
    let digest = index.layers[0].digest;
    let blob = |i: u64| i * 100_000..i * 100_000 + 1000;

    // A new mount's client: the warm-up opens the connections its first parallel fetches use.
    let before = forward.connections();
    let source =
        Arc::new(client().repository(&index.source.repository, &index.source.manifest_digest)?);
    source.warm_up(&digest).await;
    // The client hands each finished connection back to its pool on a task of its own.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let warmed = forward.connections() - before;
    assert!(
        (clip_storage::source::registry::WARM_UP_CONNECTIONS
            ..=clip_storage::source::registry::WARM_UP_CONNECTIONS + 1)
            .contains(&warmed),
        "{warmed} connections"
    );
    let reads = (0..clip_storage::source::registry::WARM_UP_CONNECTIONS as u64).map(|i| {
        let source = source.clone();
        async move { source.fetch_range(&digest, blob(i)).await }
    });
    for (i, got) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(got?.len(), 1000, "read {i}");
    }
    assert_eq!(
        forward.connections() - before,
        warmed,
        "the parallel reads found their connections open"
    );
    Ok(())
}
