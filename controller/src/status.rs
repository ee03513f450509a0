//! Writing ClipImage status: server-side apply to the status subresource.

use clip_api::{ClipImage, ClipImageStatus, Condition, Phase};
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::error::Result;

/// The field manager clip writes status as.
pub const MANAGER: &str = "clip-controller";

pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The Ready condition for `phase`, keeping the transition time when the status is unchanged.
pub fn ready_condition(
    previous: Option<&Condition>,
    phase: Phase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let status = match phase {
        Phase::Ready => "True",
        Phase::Failed => "False",
        _ => "Unknown",
    };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now(),
    };
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time,
        observed_generation: generation,
    }
}

/// Applies `status` to the object's status subresource.
pub async fn apply(api: &Api<ClipImage>, name: &str, status: &ClipImageStatus) -> Result<()> {
    let patch = serde_json::json!({
        "apiVersion": "clip.dev/v1alpha1",
        "kind": "ClipImage",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
