//! Span fields for JSON log lines, kept as one JSON object that a `record` appends to.
//!
//! tracing-subscriber's `JsonFields` parses a span's stored fields and renders them again on
//! every `Span::record`; a gRPC call records up to three (caller, status, trace id), which made that
//! a twentieth of the server's CPU under small requests. Here the new fields are rendered on
//! their own and spliced in. A field recorded twice appears twice; the JSON event formatter
//! parses the object into a map, where the later value wins, as it did before.

use std::fmt;

use tracing::span::Record;
use tracing_subscriber::{
    field::RecordFields,
    fmt::{
        FormatFields, FormattedFields,
        format::{JsonFields, Writer},
    },
};

/// [`JsonFields`] with an appending `add_fields`.
#[derive(Debug, Default)]
pub struct AppendingJsonFields {
    inner: JsonFields,
}

impl<'writer> FormatFields<'writer> for AppendingJsonFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        self.inner.format_fields(writer, fields)
    }

    fn add_fields(&self, current: &'writer mut FormattedFields<Self>, fields: &Record<'_>) -> fmt::Result {
        let mut new = String::new();
        self.inner.format_fields(Writer::new(&mut new), fields)?;
        splice(&mut current.fields, &new);
        Ok(())
    }
}

/// Appends the members of the JSON object `new` to the JSON object `current` (either may be
/// empty text or `{}`).
fn splice(current: &mut String, new: &str) {
    let members = new
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or("");
    if members.trim().is_empty() {
        return;
    }
    let cur = current.trim_end();
    if cur.is_empty() || cur == "{}" {
        current.clear();
        current.push('{');
    } else if let Some(open) = cur.strip_suffix('}') {
        let len = open.len();
        current.truncate(len);
        current.push(',');
    } else {
        // Not an object (never written by this formatter): start over with the new fields.
        current.clear();
        current.push('{');
    }
    current.push_str(members);
    current.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::from_str(s).unwrap() {
            serde_json::Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn splicing_keeps_one_valid_object_and_the_later_value_wins() {
        let mut cur = String::new();
        splice(&mut cur, r#"{"a":1}"#);
        assert_eq!(cur, r#"{"a":1}"#);
        splice(&mut cur, "{}");
        assert_eq!(cur, r#"{"a":1}"#);
        splice(&mut cur, r#"{"b":"x,}","c":[1,2]}"#);
        let m = parsed(&cur);
        assert_eq!(
            (m["a"].as_i64(), m["b"].as_str(), m["c"].as_array().map(Vec::len)),
            (Some(1), Some("x,}"), Some(2))
        );
        splice(&mut cur, r#"{"a":2}"#);
        assert_eq!(parsed(&cur)["a"], 2);
        let mut empty = "{}".to_string();
        splice(&mut empty, r#"{"z":true}"#);
        assert_eq!(empty, r#"{"z":true}"#);
    }

    #[test]
    fn a_recorded_span_field_reaches_the_json_line() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(AppendingJsonFields::default())
            .with_writer(move || w.clone());
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!(
                "call",
                method = "Put",
                caller = tracing::field::Empty,
                code = tracing::field::Empty
            );
            span.record("caller", "svc/a");
            span.record("code", 0);
            span.record("caller", "svc/b");
            let _g = span.enter();
            tracing::info!("answered");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(line["span"]["method"], "Put");
        assert_eq!(line["span"]["code"], 0);
        assert_eq!(line["span"]["caller"], "svc/b");
        assert_eq!(line["message"], "answered");
    }
}
