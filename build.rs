//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no system `protoc`.

use std::path::PathBuf;

/// Messages that scripts see as `--json` get serde derives, so the JSON follows the proto.
const SERDE: &str = "#[derive(serde::Serialize, serde::Deserialize)]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_file("dfs.proto")?
        .file_descriptor_set();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out_dir.join("dfs_descriptor.bin"), bytes)?;
    tonic_prost_build::configure()
        .bytes(".dfs.v1")
        .type_attribute(".dfs.v1.FileInfo", SERDE)
        .type_attribute(".dfs.v1.ChunkInfo", SERDE)
        // A capability is a credential: never printed in `--json` output.
        .field_attribute(".dfs.v1.ChunkInfo.token", "#[serde(skip)]")
        .type_attribute(".dfs.v1.ReplicaInfo", SERDE)
        .type_attribute(".dfs.v1.ClusterStatusResponse", SERDE)
        .type_attribute(".dfs.v1.WorkerStatus", SERDE)
        .type_attribute(".dfs.v1.WorkerUsage", SERDE)
        .type_attribute(".dfs.v1.ProcessStats", SERDE)
        .type_attribute(".dfs.v1.LogEvent", SERDE)
        .type_attribute(".dfs.v1.MatrixCell", SERDE)
        .type_attribute(".dfs.v1.DrainPlanResponse", SERDE)
        .type_attribute(".dfs.v1.AtRiskFile", SERDE)
        .type_attribute(".dfs.v1.FsckResponse", SERDE)
        .type_attribute(".dfs.v1.FsckFile", SERDE)
        .type_attribute(".dfs.v1.GcStatusResponse", SERDE)
        .type_attribute(".dfs.v1.GcEntry", SERDE)
        .compile_fds(fds)?;
    Ok(())
}
