//! Print file events as they happen; the subscription reconnects by itself and resumes from
//! the last sequence number, so nothing is missed while the buffer reaches back.
//!
//! `cargo run -p peervault-client --example watch_events`

use peervault_client::{Client, ClientConfig, EventFilter, TlsConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("PEERVAULT_SERVER").unwrap_or_else(|_| "localhost:8082".into());
    let tls_dir = std::env::var("PEERVAULT_TLS_DIR").unwrap_or_else(|_| "data/tls".into());
    let client = Client::connect(ClientConfig::new(server).tls(TlsConfig::from_dir(tls_dir)))?;
    let mut watch = client
        .watch_events(EventFilter {
            topics: vec!["file_operations".into()],
            ..Default::default()
        })
        .await?;
    while let Some(ev) = watch.next().await? {
        println!("#{} {}/{} {}", ev.sequence, ev.topic, ev.r#type, ev.data_json);
    }
    Ok(())
}
