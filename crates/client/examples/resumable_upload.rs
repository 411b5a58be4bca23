//! Resumable upload from stdin through the Graviton UploadService, printing the upload id (keep
//! it to resume after a crash) and progress, then the content-addressed blob key.
//!
//! `head -c 100000000 /dev/urandom | cargo run -p peervault-client --example resumable_upload`
//! To resume a crashed upload of the same content: `... --example resumable_upload -- <upload id>`

use std::sync::Arc;

use peervault_client::{Client, ClientConfig, Compression, TlsConfig, UploadOptions, hex};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("PEERVAULT_SERVER").unwrap_or_else(|_| "localhost:8082".into());
    let tls_dir = std::env::var("PEERVAULT_TLS_DIR").unwrap_or_else(|_| "data/tls".into());
    let config = ClientConfig::new(server)
        .tls(TlsConfig::from_dir(tls_dir))
        .compression(Compression::Zstd);
    let client = Client::connect(config)?;
    let opts = UploadOptions {
        resume_id: std::env::args().nth(1),
        on_upload_id: Some(Arc::new(|id: &str| eprintln!("upload id {id}"))),
        progress: Some(Arc::new(|n: u64| eprintln!("{n} bytes durable"))),
        ..Default::default()
    };
    // Unacknowledged data is kept (bounded by `window`) and resent after a reconnection.
    let up = client.upload_blob(tokio::io::stdin(), opts).await?;
    println!("{} {} bytes (resumed from {})", hex(&up.key), up.size, up.resumed_from);
    Ok(())
}
