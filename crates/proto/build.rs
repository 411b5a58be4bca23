//! Compiles `proto/peervault/v1/*.proto` with protox (pure Rust, no `protoc` binary) and writes the
//! encoded file descriptor set next to the generated code so reflection can serve it.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let dir = root.join("peervault/v1");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    // Stable order keeps the descriptor set (and so the build) reproducible.
    files.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&files)?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("peervault_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Services not built yet answer UNIMPLEMENTED through the same router, auth and metrics.
        .generate_default_stubs(true)
        // Chunk payloads are `Bytes`, so a frame is sliced, not copied, on its way to storage.
        .bytes(".")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
