//! Tests for the frontend codec.

use super::*;

const MAX: u32 = 1 << 20;

fn all_variants() -> Vec<FrontendMessage> {
    let b = Bytes::from_static;
    vec![
        FrontendMessage::Query {
            sql: b(b"select 1"),
        },
        FrontendMessage::Query { sql: b(b"") },
        FrontendMessage::Parse {
            name: b(b"s1"),
            query: b(b"select $1"),
            param_types: vec![23, 0],
        },
        FrontendMessage::Parse {
            name: b(b""),
            query: b(b"select"),
            param_types: vec![],
        },
        FrontendMessage::Bind {
            portal: b(b""),
            statement: b(b"s1"),
            rest: b(b"\0\x01\0\x00\0\x01\0\0\0\x011\0\0"),
        },
        FrontendMessage::Describe {
            kind: b'S',
            name: b(b"s1"),
        },
        FrontendMessage::Describe {
            kind: b'P',
            name: b(b""),
        },
        FrontendMessage::Execute {
            portal: b(b"p"),
            max_rows: 10,
        },
        FrontendMessage::Close {
            kind: b'S',
            name: b(b"s1"),
        },
        FrontendMessage::Sync,
        FrontendMessage::Flush,
        FrontendMessage::Terminate,
        FrontendMessage::CopyData(b(b"1\t2\n\0\xff")),
        FrontendMessage::CopyDone,
        FrontendMessage::CopyFail {
            message: b(b"nope"),
        },
        FrontendMessage::FunctionCall(b(b"\0\0\0\x01\0\0")),
        FrontendMessage::Password(b(b"SCRAM-SHA-256\0\0\0\0\x03abc")),
        FrontendMessage::Other {
            tag: b'z',
            body: b(b"\0\x01"),
        },
    ]
}

#[test]
fn every_variant_round_trips() {
    for msg in all_variants() {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let header = peek_header(&buf).expect("valid").expect("complete");
        assert_eq!(header.tag, msg.tag());
        assert_eq!(header.total_len(), buf.len());
        let decoded = FrontendMessage::decode(&mut buf, MAX).expect("valid");
        assert_eq!(decoded.as_ref(), Some(&msg));
        assert!(buf.is_empty());
    }
}

#[test]
fn incomplete_input_returns_none_at_every_prefix() {
    let mut wire = BytesMut::new();
    for msg in all_variants() {
        msg.encode(&mut wire);
    }
    // Each message alone, at every prefix length.
    for msg in all_variants() {
        let mut one = BytesMut::new();
        msg.encode(&mut one);
        for n in 0..one.len() {
            let mut part = BytesMut::from(&one[..n]);
            assert_eq!(
                FrontendMessage::decode(&mut part, MAX).expect("prefix"),
                None
            );
            assert_eq!(part.len(), n, "nothing consumed");
        }
    }
    // The whole stream decodes back in order.
    let mut out = Vec::new();
    while let Some(m) = FrontendMessage::decode(&mut wire, MAX).expect("valid") {
        out.push(m);
    }
    assert_eq!(out, all_variants());
    assert!(wire.is_empty());
}

#[test]
fn oversize_and_short_lengths_fail_before_the_body() {
    let mut buf = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
    assert!(matches!(
        FrontendMessage::decode(&mut buf, MAX),
        Err(WireError::MessageTooLarge {
            tag: b'Q',
            len: 0x7fff_ffff,
            max: MAX
        })
    ));
    for len in 0u8..4 {
        let bytes = [b'Q', 0, 0, 0, len];
        assert!(matches!(
            peek_header(&bytes),
            Err(WireError::InvalidMessageLength { tag: b'Q', .. })
        ));
        assert!(FrontendMessage::decode(&mut BytesMut::from(&bytes[..]), MAX).is_err());
    }
    assert_eq!(peek_header(b"Q\0\0\0").expect("short"), None);
}

#[test]
fn malformed_bodies_are_rejected() {
    let cases: &[&[u8]] = &[
        b"Q\0\0\0\x07abc",          // no NUL
        b"Q\0\0\0\x08ab\0c",        // data after NUL
        b"P\0\0\0\x0as\0q\0\0\x01", // parameter count but no types
        b"D\0\0\0\x07Xs\0",         // bad kind
        b"C\0\0\0\x04",             // no kind
        b"E\0\0\0\x07p\0\0",        // short row limit
        b"S\0\0\0\x05x",            // Sync with a body
        b"X\0\0\0\x05x",            // Terminate with a body
        b"f\0\0\0\x04",             // CopyFail without message
        b"B\0\0\0\x06p\0",          // Bind without statement name
    ];
    for case in cases {
        let res = FrontendMessage::decode(&mut BytesMut::from(*case), MAX);
        assert!(
            matches!(res, Err(WireError::Malformed { .. })),
            "{case:?}: {res:?}"
        );
    }
}

#[test]
fn decoded_fields_share_the_input_buffer() {
    let mut buf = BytesMut::new();
    encode_query(&mut buf, "select 42");
    let msg = FrontendMessage::decode(&mut buf, MAX)
        .expect("ok")
        .expect("whole");
    assert_eq!(
        msg,
        FrontendMessage::Query {
            sql: Bytes::from_static(b"select 42")
        }
    );
}

#[test]
fn plain_encoders_match_the_protocol() {
    let mut buf = BytesMut::new();
    encode_sync(&mut buf);
    encode_flush(&mut buf);
    encode_terminate(&mut buf);
    assert_eq!(&buf[..], b"S\0\0\0\x04H\0\0\0\x04X\0\0\0\x04");
    buf.clear();
    encode_parse(&mut buf, b"a", b"q", &[25]);
    assert_eq!(&buf[..], b"P\0\0\0\x0ea\0q\0\0\x01\0\0\0\x19");
    buf.clear();
    encode_describe(&mut buf, b'S', b"a");
    encode_close(&mut buf, b'P', b"");
    assert_eq!(&buf[..], b"D\0\0\0\x07Sa\0C\0\0\0\x06P\0");
    buf.clear();
    encode_bind_renamed(&mut buf, b"", b"new", b"\0\0\0\0\0\0");
    assert_eq!(&buf[..], b"B\0\0\0\x0f\0new\0\0\0\0\0\0\0");
    buf.clear();
    encode_cancel_request(&mut buf, 7, &[1, 2, 3, 4]);
    assert_eq!(
        &buf[..],
        b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\0\x07\x01\x02\x03\x04"
    );
}

#[test]
fn sasl_initial_response_parses() {
    let mut buf = BytesMut::new();
    encode_sasl_initial_response(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc");
    let msg = FrontendMessage::decode(&mut buf, MAX)
        .expect("ok")
        .expect("whole");
    let FrontendMessage::Password(body) = msg else {
        panic!("not a password message");
    };
    let (mech, data) = parse_sasl_initial_response(&body).expect("valid");
    assert_eq!(mech, "SCRAM-SHA-256");
    assert_eq!(&data[..], b"n,,n=,r=abc");

    let (mech, data) = parse_sasl_initial_response(b"X\0\xff\xff\xff\xff").expect("no data");
    assert_eq!((mech.as_str(), data.len()), ("X", 0));
    for bad in [
        &b"X"[..],
        b"X\0\0\0",
        b"X\0\0\0\0\x05ab",
        b"X\0\0\0\0\x01ab",
        b"\xff\0\0\0\0\0",
    ] {
        assert!(parse_sasl_initial_response(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn password_message_parses() {
    assert_eq!(
        parse_password_message(b"secret\0").ok(),
        Some(&b"secret"[..])
    );
    assert!(parse_password_message(b"secret").is_err());
    assert!(parse_password_message(b"a\0b").is_err());
}
