//! The Helm chart passes flags to clip's programs; a renamed flag in Rust must fail here, not
//! in a cluster. Every clip container in the rendered manifests is parsed with the programs'
//! own command-line parsers, and the node plugin and the keeper must name the same socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on broken fixtures

use clap::Parser;
use clip_driver::cli::{Cli, Command};
use serde::Deserialize;

fn containers(doc: &serde_yaml::Value) -> Vec<(String, Vec<String>)> {
    let spec = &doc["spec"]["template"]["spec"];
    let mut out = Vec::new();
    for key in ["containers", "initContainers"] {
        if let Some(list) = spec[key].as_sequence() {
            for c in list {
                let image = c["image"].as_str().unwrap_or_default().to_owned();
                let args = c["args"]
                    .as_sequence()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((image, args));
            }
        }
    }
    out
}

#[test]
fn every_flag_the_chart_passes_is_accepted() -> anyhow::Result<()> {
    let mut node = 0;
    let mut keeper = 0;
    let mut controller = 0;
    for file in ["default.yaml", "quickstart.yaml"] {
        let path = format!("{}/../manifests/chart/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path)?;
        let mut plugin_sockets = Vec::new();
        let mut keeper_sockets = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = serde_yaml::Value::deserialize(doc)?;
            for (image, args) in containers(&doc) {
                if image.contains("clip-node") {
                    let argv = std::iter::once("clip".to_owned()).chain(args.clone());
                    let cli = Cli::try_parse_from(argv)
                        .map_err(|e| anyhow::anyhow!("{file}: clip {args:?}: {e}"))?;
                    match cli.command {
                        Command::Node(a) => {
                            plugin_sockets.push(a.keeper_socket);
                            node += 1;
                        }
                        Command::Keeper(a) => {
                            keeper_sockets.push(a.socket);
                            keeper += 1;
                        }
                        other => anyhow::bail!("{file}: a clip-node container runs {other:?}"),
                    }
                } else if image.contains("clip-controller") {
                    let argv = std::iter::once("clip-controller".to_owned()).chain(args.clone());
                    clip_controller::args::Args::try_parse_from(argv)
                        .map_err(|e| anyhow::anyhow!("{file}: clip-controller {args:?}: {e}"))?;
                    controller += 1;
                }
            }
        }
        // The keeper is on by default: the plugin hands its mounts to the socket it listens on.
        assert_eq!(keeper_sockets.len(), 1, "{file}: one keeper");
        assert_eq!(
            plugin_sockets,
            vec![Some(keeper_sockets[0].clone())],
            "{file}: the node plugin connects to the keeper's socket"
        );
    }
    assert!(node >= 2, "the node plugin is in both renders");
    assert!(keeper >= 2, "the keeper is in both renders");
    assert!(
        controller >= 1,
        "the controller is in the quickstart render"
    );
    Ok(())
}
