//! Fuzzing the WebSocket message parser on stable Rust: proptest feeds it arbitrary bytes,
//! arbitrary JSON and near-valid messages. The parser must never panic, must answer every
//! input with a message or a published error code, and must respect the size limit. The case
//! count is bounded (`PROPTEST_CASES`, default below) so it runs briefly in CI.

use peervault_events::{
    EventsError,
    ws::protocol::{ClientMessage, parse},
};
use proptest::prelude::*;
use serde_json::{Value, json};

const LIMIT: usize = 4096;

fn check(text: &str) {
    match parse(text, LIMIT) {
        Ok(m) => {
            assert!(text.len() <= LIMIT);
            let v: Value = serde_json::from_str(text).expect("accepted input is JSON");
            assert_eq!(v["type"].as_str(), Some(m.kind()));
        }
        Err(e) => {
            assert!(
                [
                    "INVALID_MESSAGE",
                    "AUTH_FAILED",
                    "RATE_LIMIT_EXCEEDED",
                    "CONNECTION_REFUSED"
                ]
                .contains(&e.ws_code())
            );
            let msg = e.ws_message();
            assert_eq!(msg["type"], "error");
            // Error text stays bounded whatever the input.
            assert!(msg.to_string().len() < 2048, "{msg}");
            if text.len() > LIMIT {
                assert!(matches!(e, EventsError::MessageTooLarge { .. }));
            }
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("subscribe"),
            Just("unsubscribe"),
            Just("auth"),
            Just("ping"),
            Just("file_operations"),
            Just("alerts"),
            Just("type"),
            Just("topic"),
            Just("token"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("topic".to_string()),
                    Just("data".to_string()),
                    Just("token".to_string()),
                    ".{0,10}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        check(&v.to_string());
    }

    #[test]
    fn near_valid_messages_parse_or_name_the_problem(
        kind in prop_oneof![Just("subscribe".to_string()), Just("unsubscribe".to_string()), Just("auth".to_string()), Just("ping".to_string()), ".{0,12}"],
        topic in prop_oneof![Just("file_operations".to_string()), Just("peer_network".to_string()), Just("system".to_string()), Just("alerts".to_string()), ".{0,12}"],
        token in ".{0,20}",
    ) {
        let text = json!({"type": kind, "topic": topic, "data": {"token": token}}).to_string();
        check(&text);
        if let Ok(m) = parse(&text, LIMIT) {
            match m {
                ClientMessage::Subscribe(t) | ClientMessage::Unsubscribe(t) => prop_assert_eq!(t.as_str(), topic),
                ClientMessage::Auth(t) => prop_assert_eq!(t, token),
                ClientMessage::Ping => prop_assert_eq!(kind.as_str(), "ping"),
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed(depth in 100usize..2000) {
        check(&format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
        check(&format!(r#"{{"type":"ping","x":{}{}}}"#, "[".repeat(depth), "]".repeat(depth)));
    }
}
