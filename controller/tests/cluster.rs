//! The controller against a real cluster. Ignored unless asked for:
//!
//! ```sh
//! KUBECONFIG=~/.kube/config CLIP_TEST_REDIS=host:6379,... CLIP_TEST_IMAGE=registry/app:tag \
//!   cargo test -p clip-controller --test cluster -- --ignored
//! ```
//!
//! The cluster needs the CRD (`kubectl apply -f manifests/crds/clipimage.yaml`); the Redis
//! Cluster and the registry must be reachable from where the test runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use std::sync::Arc;
use std::time::Duration;

use clip_api::{ClipImage, ClipImageSpec, Phase};
use clip_storage::RegistryConfig;
use clip_storage::cache::redis::{RedisCache, RedisConfig};
use kube::Api;
use kube::api::{DeleteParams, PostParams};

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, CLIP_TEST_REDIS and CLIP_TEST_IMAGE"]
async fn a_clip_image_in_a_real_cluster_becomes_ready() -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let seeds: Vec<String> = std::env::var("CLIP_TEST_REDIS")?
        .split(',')
        .map(String::from)
        .collect();
    let image = std::env::var("CLIP_TEST_IMAGE")?;
    let ns = std::env::var("CLIP_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let redis = Arc::new(
        RedisCache::connect(RedisConfig {
            seeds,
            ..RedisConfig::default()
        })
        .await?,
    );
    let ctx = clip_controller::Context::new(
        client.clone(),
        redis,
        RegistryConfig::default(),
        2,
        Duration::from_secs(600),
    );
    let api: Api<ClipImage> = Api::namespaced(client, &ns);
    let name = format!("clip-test-{}", std::process::id());
    let ci = ClipImage::new(
        &name,
        ClipImageSpec {
            image,
            pull_secrets: vec![],
            platform: None,
            warm: false,
        },
    );
    api.create(&PostParams::default(), &ci).await?;
    let mut phase = None;
    for _ in 0..600 {
        let current = api.get(&name).await?;
        clip_controller::reconcile(Arc::new(current), ctx.clone()).await?;
        phase = api.get(&name).await?.status.and_then(|s| s.phase);
        if matches!(phase, Some(Phase::Ready | Phase::Failed)) {
            break;
        }
    }
    // Delete and let the finalizer run.
    api.delete(&name, &DeleteParams::default()).await?;
    if let Some(current) = api.get_opt(&name).await? {
        clip_controller::reconcile(Arc::new(current), ctx.clone()).await?;
    }
    assert_eq!(phase, Some(Phase::Ready));
    Ok(())
}
