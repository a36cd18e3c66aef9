//! Property tests: every decoder survives arbitrary bytes, and frontend messages round-trip.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sluice_wire::{backend, frontend, sql, FrontendMessage, StartupPacket};

/// Decodes messages until the buffer is exhausted, stuck or broken; checks progress is made.
fn drain_frontend(bytes: &[u8], max_len: u32) {
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        match FrontendMessage::decode(&mut buf, max_len) {
            Ok(Some(msg)) => {
                assert!(buf.len() < before, "a decoded message consumes input");
                // Re-encoding reproduces the consumed bytes exactly.
                let mut out = BytesMut::new();
                msg.encode(&mut out);
                assert_eq!(out.len(), before - buf.len());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete message consumes nothing");
                break;
            }
            Err(_) => break,
        }
    }
}

fn bytes_strategy() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

/// Names and strings without NUL (as decoded ones never contain one).
fn cstr_strategy() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(1u8..=255, 0..16).prop_map(Bytes::from)
}

fn frontend_strategy() -> impl Strategy<Value = FrontendMessage> {
    prop_oneof![
        cstr_strategy().prop_map(|sql| FrontendMessage::Query { sql }),
        (
            cstr_strategy(),
            cstr_strategy(),
            proptest::collection::vec(any::<u32>(), 0..4)
        )
            .prop_map(|(name, query, param_types)| FrontendMessage::Parse {
                name,
                query,
                param_types
            }),
        (cstr_strategy(), cstr_strategy(), bytes_strategy()).prop_map(
            |(portal, statement, rest)| FrontendMessage::Bind {
                portal,
                statement,
                rest
            }
        ),
        (prop_oneof![Just(b'S'), Just(b'P')], cstr_strategy())
            .prop_map(|(kind, name)| FrontendMessage::Describe { kind, name }),
        (prop_oneof![Just(b'S'), Just(b'P')], cstr_strategy())
            .prop_map(|(kind, name)| FrontendMessage::Close { kind, name }),
        (cstr_strategy(), any::<u32>())
            .prop_map(|(portal, max_rows)| FrontendMessage::Execute { portal, max_rows }),
        Just(FrontendMessage::Sync),
        Just(FrontendMessage::Flush),
        Just(FrontendMessage::Terminate),
        Just(FrontendMessage::CopyDone),
        bytes_strategy().prop_map(FrontendMessage::CopyData),
        cstr_strategy().prop_map(|message| FrontendMessage::CopyFail { message }),
        bytes_strategy().prop_map(FrontendMessage::FunctionCall),
        bytes_strategy().prop_map(FrontendMessage::Password),
        bytes_strategy().prop_map(|body| FrontendMessage::Other { tag: b'z', body }),
    ]
}

proptest! {
    #[test]
    fn startup_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        if let Ok(None) = StartupPacket::decode(&mut buf) {
            prop_assert_eq!(buf.len(), before);
        }
    }

    #[test]
    fn startup_decoder_survives_plausible_lengths(
        len in 0u32..64,
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let _ = StartupPacket::decode(&mut BytesMut::from(&bytes[..]));
        // The same with a startup-looking version code.
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0, 3, 0, 0]);
        bytes.extend_from_slice(&body);
        let _ = StartupPacket::decode(&mut BytesMut::from(&bytes[..]));
    }

    #[test]
    fn frontend_decoder_never_panics(
        tag in any::<u8>(),
        len in 0u32..48,
        body in proptest::collection::vec(any::<u8>(), 0..64),
        raw in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut framed = vec![tag];
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&body);
        drain_frontend(&framed, 1 << 20);
        drain_frontend(&framed, 16);
        drain_frontend(&raw, 1 << 20);
        let _ = frontend::peek_header(&raw);
    }

    #[test]
    fn body_decoders_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = frontend::parse_sasl_initial_response(&body);
        let _ = frontend::parse_password_message(&body);
        let _ = backend::decode_ready_for_query(&body);
        let _ = backend::decode_parameter_status(&body);
        let _ = backend::decode_backend_key_data(&body);
        let _ = backend::decode_command_complete(&body);
        let _ = backend::decode_error_fields(&body);
        let _ = backend::decode_authentication(&body);
    }

    #[test]
    fn sql_helpers_never_panic(sql in "[ -~\\n\u{e9}\u{1f600}]{0,40}") {
        let _ = sql::first_keyword(&sql);
        let _ = sql::statement_count(&sql);
        let _ = sql::session_command(&sql);
        let _ = sql::leaves_session_state(sql.as_bytes());
    }

    #[test]
    fn leaves_session_state_never_panics_on_bytes(sql in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = sql::leaves_session_state(&sql);
    }

    #[test]
    fn sql_helpers_never_panic_on_sql_like_text(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("SET "), Just("RESET "), Just("DEALLOCATE "), Just("x"), Just("="),
                Just("'"), Just("\""), Just("$$"), Just("$a$"), Just(";"), Just("--"),
                Just("/*"), Just("*/"), Just("\n"), Just("E'\\"), Just("."), Just("\u{e9}"),
                Just("set_config("), Just("("), Just(")"), Just(","), Just("true"),
                Just("pg_advisory_lock("), Just("CREATE TEMP "), Just("WITH HOLD"), Just("_lock"),
            ],
            0..16,
        )
    ) {
        let sql: String = parts.concat();
        let _ = sql::first_keyword(&sql);
        let _ = sql::statement_count(&sql);
        let _ = sql::session_command(&sql);
        let _ = sql::leaves_session_state(sql.as_bytes());
    }

    #[test]
    fn frontend_messages_round_trip(msgs in proptest::collection::vec(frontend_strategy(), 1..6)) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        // Every prefix of the stream decodes to a prefix of the messages, then None.
        let all = wire.clone().freeze();
        for cut in 0..=all.len() {
            let mut buf = BytesMut::from(&all[..cut]);
            let mut n = 0;
            while let Some(m) = FrontendMessage::decode(&mut buf, 1 << 20).expect("valid stream") {
                prop_assert_eq!(&m, &msgs[n]);
                n += 1;
            }
            prop_assert!(n <= msgs.len());
        }
        let mut decoded = Vec::new();
        while let Some(m) = FrontendMessage::decode(&mut wire, 1 << 20).expect("valid stream") {
            decoded.push(m);
        }
        prop_assert_eq!(decoded, msgs);
        prop_assert!(wire.is_empty());
    }
}
