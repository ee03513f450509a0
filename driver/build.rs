//! Generates the CSI gRPC code from proto/csi.proto with protox (no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Requests that carry secrets get a hand-written Debug that hides them.
        .skip_debug([
            "csi.v1.NodePublishVolumeRequest",
            "csi.v1.NodeStageVolumeRequest",
            "csi.v1.NodeExpandVolumeRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
