//! Input checks shared by every API: keys, metadata maps, blob keys, content types.

use std::collections::HashMap;

use crate::error::{BlobError, Result};

/// Longest file key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Most entries in a metadata map.
pub const MAX_METADATA_ENTRIES: usize = 128;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_LEN: usize = 256;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 4096;
/// Largest metadata map in total (keys plus values), in bytes.
pub const MAX_METADATA_TOTAL: usize = 64 * 1024;
/// Longest name or content type, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// Checks a file key: 1 to 1024 bytes of UTF-8 without control characters. Keys are index keys
/// only and never become file system paths.
pub fn file_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(BlobError::invalid("file key is empty: give a key of 1 to 1024 bytes"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(BlobError::invalid(format!(
            "file key is {} bytes long; the limit is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(BlobError::invalid(format!(
            "file key contains the control character U+{:04X}; keys must be printable",
            c as u32
        )));
    }
    Ok(())
}

/// Checks a metadata map against the size caps.
pub fn metadata(map: &HashMap<String, String>) -> Result<()> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(BlobError::invalid(format!(
            "metadata has {} entries; the limit is {MAX_METADATA_ENTRIES}",
            map.len()
        )));
    }
    let mut total = 0;
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(BlobError::invalid(format!(
                "metadata key of {} bytes: keys must be 1 to {MAX_METADATA_KEY_LEN} bytes",
                k.len()
            )));
        }
        if k.chars().any(|c| c.is_control()) {
            return Err(BlobError::invalid("metadata key contains a control character"));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            return Err(BlobError::invalid(format!(
                "metadata value for '{k}' is {} bytes; the limit is {MAX_METADATA_VALUE_LEN}",
                v.len()
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_TOTAL {
        return Err(BlobError::invalid(format!(
            "metadata totals {total} bytes; the limit is {MAX_METADATA_TOTAL}"
        )));
    }
    Ok(())
}

/// Checks a name or content type.
pub fn short_text(what: &str, s: &str) -> Result<()> {
    if s.len() > MAX_NAME_LEN {
        return Err(BlobError::invalid(format!(
            "{what} is {} bytes; the limit is {MAX_NAME_LEN}",
            s.len()
        )));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(BlobError::invalid(format!("{what} contains a control character")));
    }
    Ok(())
}

/// A blob key: 32 raw bytes, or its 64-character hex form.
pub fn blob_key(raw: &[u8]) -> Result<[u8; 32]> {
    if let Ok(k) = <[u8; 32]>::try_from(raw) {
        return Ok(k);
    }
    if raw.len() == 64
        && let Ok(s) = std::str::from_utf8(raw)
        && let Ok(h) = blake3::Hash::from_hex(s)
    {
        return Ok(*h.as_bytes());
    }
    Err(BlobError::invalid(format!(
        "blob key must be the 32-byte BLAKE3 hash (or its 64-character hex form); got {} bytes",
        raw.len()
    )))
}

/// A content type guessed from a file name's extension; `application/octet-stream` otherwise.
pub fn sniff_content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "js" | "mjs" => "text/javascript",
        "json" => "application/json",
        "xml" => "application/xml",
        "yaml" | "yml" => "application/yaml",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "zst" => "application/zstd",
        "wasm" => "application/wasm",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "parquet" => "application/vnd.apache.parquet",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(file_key("a/b/c.txt").is_ok());
        assert!(file_key("").is_err());
        assert!(file_key(&"x".repeat(1025)).is_err());
        assert!(file_key(&"x".repeat(1024)).is_ok());
        assert!(file_key("a\nb").unwrap_err().to_string().contains("U+000A"));
        assert!(file_key("a\u{7f}b").is_err());
    }

    #[test]
    fn metadata_caps() {
        let mut m = HashMap::new();
        m.insert("k".to_string(), "v".repeat(4096));
        assert!(metadata(&m).is_ok());
        m.insert("k2".to_string(), "v".repeat(4097));
        assert!(metadata(&m).is_err());
        let many: HashMap<_, _> = (0..129).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(metadata(&many).is_err());
        let big: HashMap<_, _> = (0..20).map(|i| (format!("k{i}"), "v".repeat(4000))).collect();
        assert!(metadata(&big).unwrap_err().to_string().contains("totals"));
    }

    #[test]
    fn blob_keys_raw_or_hex() {
        let h = blake3::hash(b"x");
        assert_eq!(blob_key(h.as_bytes()).unwrap(), *h.as_bytes());
        assert_eq!(blob_key(h.to_hex().as_bytes()).unwrap(), *h.as_bytes());
        assert!(blob_key(b"short").is_err());
    }

    #[test]
    fn content_types() {
        assert_eq!(sniff_content_type("a/report.PDF"), "application/pdf");
        assert_eq!(sniff_content_type("noext"), "application/octet-stream");
    }
}
