//! Compiles every `.proto` under `proto/` with protox (pure Rust, so a fresh
//! machine needs no `protoc`), generates prost/tonic code for them, and writes
//! one encoded `FileDescriptorSet` per file (the file plus its imports) so
//! each service can hand the registry exactly the descriptors it needs.

use std::path::{Path, PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.display());

    let mut files = Vec::new();
    collect_protos(&root, &mut files)?;
    files.sort();

    let all = protox::compile(&files, [&root])?;
    std::fs::write(out.join("all.fds.bin"), all.encode_to_vec())?;
    for file in &files {
        let one = protox::compile([file], [&root])?;
        let package = one
            .file
            .last()
            .and_then(|f| f.package.clone())
            .ok_or_else(|| format!("{} declares no package", file.display()))?;
        std::fs::write(out.join(format!("{package}.fds.bin")), one.encode_to_vec())?;
    }

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(all)?;
    Ok(())
}

fn collect_protos(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            files.push(path);
        }
    }
    Ok(())
}
