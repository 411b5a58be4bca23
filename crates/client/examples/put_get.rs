//! Upload a file, read it back, describe it and list by prefix.
//!
//! Start a server in this folder (`cargo run --bin peervault -- serve all`), then:
//! `cargo run -p peervault-client --example put_get -- README.md docs/readme`
//! (`PEERVAULT_SERVER` and `PEERVAULT_TLS_DIR` override `localhost:8082` and `data/tls`).

use peervault_client::{Client, ClientConfig, PutOptions, TlsConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "Cargo.toml".into());
    let key = args.next().unwrap_or_else(|| "examples/put_get".into());
    let server = std::env::var("PEERVAULT_SERVER").unwrap_or_else(|_| "localhost:8082".into());
    let tls_dir = std::env::var("PEERVAULT_TLS_DIR").unwrap_or_else(|_| "data/tls".into());

    // One client (one channel) for every call; connection problems surface on the first call.
    let client = Client::connect(ClientConfig::new(server).tls(TlsConfig::from_dir(tls_dir)))?;

    // Streams the file in 256 KiB messages; retried from the start on UNAVAILABLE.
    let stored = client
        .put_path(&key, std::path::Path::new(&path), PutOptions::default())
        .await?;
    println!("stored {} ({} bytes, blake3 {})", stored.key, stored.size, stored.hash);

    // Downloads into any AsyncWrite; here a Vec.
    let mut back = Vec::new();
    let d = client.get_file(&key, &mut back, None).await?;
    println!("read back {} bytes, hash verified: {}", d.bytes, d.hash == stored.hash);

    for f in client.list(key.split('/').next().unwrap_or(""), 10).await? {
        println!("  {} {}", f.key, f.size);
    }
    Ok(())
}
