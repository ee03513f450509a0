//! ClipImage lookups through kube against a mocked API server (tower-test), and against a
//! real cluster when one is configured.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use clip_api::{ClipImage, ClipImageSpec, ClipImageStatus, Phase};
use clip_driver::csi::lookup::{ClipImageLookup, KubeLookup};
use http::{Request, Response};
use kube::client::Body;

fn clip_image() -> ClipImage {
    let mut ci = ClipImage::new(
        "app",
        ClipImageSpec {
            image: "registry.example/team/app:v1".into(),
            pull_secrets: vec!["regcred".into()],
            platform: None,
            warm: false,
        },
    );
    ci.metadata.namespace = Some("team".into());
    ci.status = Some(ClipImageStatus {
        phase: Some(Phase::Ready),
        index_digest: Some(format!("sha256:{}", "ab".repeat(32))),
        ..ClipImageStatus::default()
    });
    ci
}

fn status_body(code: u16, reason: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} for the test"), "reason": reason, "code": code,
    }))
    .unwrap()
}

#[tokio::test]
async fn lookups_read_the_namespaced_resource_and_tell_missing_from_failing() -> anyhow::Result<()>
{
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let lookup = KubeLookup::new(kube::Client::new(mock, "default"));
    let server = tokio::spawn(async move {
        let mut paths = Vec::new();
        for (status, body) in [
            (200, serde_json::to_vec(&clip_image()).unwrap()),
            (404, status_body(404, "NotFound")),
            (500, status_body(500, "InternalError")),
        ] {
            let (req, send) = handle.next_request().await.expect("a request");
            paths.push((req.method().to_string(), req.uri().path().to_owned()));
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(body))
                    .unwrap(),
            );
        }
        paths
    });
    let found = lookup
        .get("team", "app")
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        found
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.phase),
        Some(Phase::Ready)
    );
    assert_eq!(
        found.map(|c| c.spec.pull_secrets),
        Some(vec!["regcred".to_owned()])
    );
    assert!(
        lookup
            .get("team", "missing")
            .await
            .map_err(anyhow::Error::msg)?
            .is_none()
    );
    let err = lookup.get("team", "broken").await.unwrap_err();
    assert!(
        err.contains("InternalError") || err.contains("500"),
        "{err}"
    );
    let paths = server.await?;
    assert_eq!(
        paths,
        vec![
            (
                "GET".to_owned(),
                "/apis/clip.dev/v1alpha1/namespaces/team/clipimages/app".to_owned()
            ),
            (
                "GET".to_owned(),
                "/apis/clip.dev/v1alpha1/namespaces/team/clipimages/missing".to_owned()
            ),
            (
                "GET".to_owned(),
                "/apis/clip.dev/v1alpha1/namespaces/team/clipimages/broken".to_owned()
            ),
        ]
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG to a cluster with the ClipImage CRD installed"]
async fn lookups_work_against_a_real_cluster() -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let lookup = KubeLookup::new(client);
    let ns = std::env::var("CLIP_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let missing = lookup
        .get(&ns, "clip-test-does-not-exist")
        .await
        .map_err(anyhow::Error::msg)?;
    assert!(missing.is_none());
    Ok(())
}
