//! clip-api: the `ClipImage` custom resource.
//!
//! A platform team declares the images it wants served lazily; the controller resolves each
//! to a digest, indexes it once and reports progress in the status; the node plugin reads
//! the status to find the index for a pod's volume.
//!
//! - [`ClipImageSpec`], [`ClipImageStatus`], [`Phase`], [`Condition`]: the types.
//! - [`crd_yaml`]: the CustomResourceDefinition as YAML; [`crd_file`]: the file `crdgen`
//!   writes to manifests/ (a header, then the YAML).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An image to serve lazily.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "clip.dev",
    version = "v1alpha1",
    kind = "ClipImage",
    namespaced,
    shortname = "cimg",
    status = "ClipImageStatus",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.resolvedDigest","priority":1}"#,
    printcolumn = r#"{"name":"Files","type":"integer","jsonPath":".status.files"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","format":"int64","jsonPath":".status.uncompressedSize"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClipImageSpec {
    /// Image reference: registry/repository[:tag][@sha256:digest].
    #[schemars(regex(
        pattern = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
    ))]
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// kubernetes.io/dockerconfigjson Secrets in the same namespace used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<String>,

    /// os/arch[/variant] to pick from a multi-platform image; default the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$"))]
    pub platform: Option<String>,

    /// Also copy every chunk into Redis after indexing, so first reads never touch the registry.
    #[serde(default)]
    pub warm: bool,
}

/// Where a ClipImage is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Resolving,
    Indexing,
    Ready,
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Phase::Pending => "Pending",
            Phase::Resolving => "Resolving",
            Phase::Indexing => "Indexing",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
        };
        f.write_str(s)
    }
}

/// A status condition, as Kubernetes conventions describe them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason, e.g. `Indexed`, `ImageNotFound`, `Unauthorized`.
    pub reason: String,
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Bytes indexed so far, for a progress bar.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What the controller has done with a ClipImage.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClipImageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The manifest digest the reference resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_digest: Option<String>,
    /// The digest of the published index (its key in Redis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time the index was last built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_indexed: Option<String>,
}

impl ClipImage {
    /// The Ready condition, if any.
    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
    }
}

/// The CRD as YAML.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&ClipImage::crd())
}

/// The first line of the file `crdgen` writes.
pub const CRD_FILE_HEADER: &str =
    "# Generated by `cargo run -p clip-api --bin crdgen`; do not edit.\n";

/// The CRD file, as `crdgen` writes it: [`CRD_FILE_HEADER`], then [`crd_yaml`].
pub fn crd_file() -> Result<String, serde_yaml::Error> {
    Ok(format!("{CRD_FILE_HEADER}{}", crd_yaml()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_names_the_group_kind_and_columns() -> Result<(), serde_yaml::Error> {
        let y = crd_yaml()?;
        assert!(y.contains("name: clipimages.clip.dev"));
        assert!(y.contains("kind: ClipImage"));
        assert!(y.contains("- cimg"));
        assert!(y.contains("jsonPath: .status.phase"));
        assert!(y.contains("subresources:"));
        Ok(())
    }

    #[test]
    fn status_round_trips_in_camel_case() -> Result<(), serde_json::Error> {
        let s = ClipImageStatus {
            phase: Some(Phase::Ready),
            index_digest: Some("sha256:ab".into()),
            ..ClipImageStatus::default()
        };
        let v = serde_json::to_value(&s)?;
        assert_eq!(v["phase"], "Ready");
        assert_eq!(v["indexDigest"], "sha256:ab");
        assert_eq!(serde_json::from_value::<ClipImageStatus>(v)?, s);
        Ok(())
    }
}

#[cfg(test)]
mod manifest_tests {
    /// Where two texts first differ: the line number and both lines.
    fn first_difference(committed: &str, fresh: &str) -> String {
        let (c, f): (Vec<&str>, Vec<&str>) = (committed.lines().collect(), fresh.lines().collect());
        let i = (0..c.len().max(f.len()))
            .find(|&i| c.get(i) != f.get(i))
            .unwrap_or(c.len());
        let at = |lines: &[&str]| {
            lines
                .get(i)
                .map_or("<end of file>".into(), |l| format!("{l:?}"))
        };
        format!("line {}: committed {}, generated {}", i + 1, at(&c), at(&f))
    }

    #[test]
    fn the_committed_crd_is_not_stale() -> Result<(), Box<dyn std::error::Error>> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/crds/clipimage.yaml"
        );
        let committed =
            std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
        let fresh = super::crd_file()?;
        assert!(
            committed == fresh,
            "{path} is not what crdgen writes ({}): run `cargo run -p clip-api --bin crdgen manifests/crds/clipimage.yaml`",
            first_difference(&committed, &fresh)
        );
        Ok(())
    }
}
