//! Tests for the backend codec.

use super::*;
use crate::frontend::split_message;

/// Splits one message off `buf`, asserting it is whole and has `tag`.
fn one(buf: &mut BytesMut, tag: u8) -> bytes::Bytes {
    let (h, body) = split_message(buf, 1 << 20).expect("valid").expect("whole");
    assert_eq!(h.tag, tag);
    body
}

#[test]
fn error_fields_round_trip() {
    let mut f = ErrorFields::error(SqlState::DUPLICATE_PREPARED_STATEMENT, "exists")
        .with_detail("detail \u{e9}")
        .with_hint("hint");
    f.other.push((b'P', "12".into()));
    f.other.push((b'W', "where".into()));
    let mut buf = BytesMut::new();
    encode_error(&mut buf, &f);
    let body = one(&mut buf, b'E');
    assert_eq!(decode_error_fields(&body).expect("valid"), f);

    for f in [
        ErrorFields::notice("hello"),
        ErrorFields::fatal(SqlState::TOO_MANY_CONNECTIONS, "full"),
    ] {
        encode_notice(&mut buf, &f);
        let body = one(&mut buf, b'N');
        assert_eq!(decode_error_fields(&body).expect("valid"), f);
    }
}

#[test]
fn error_field_layout() {
    let mut buf = BytesMut::new();
    encode_error(
        &mut buf,
        &ErrorFields::error(SqlState::PROTOCOL_VIOLATION, "bad"),
    );
    assert_eq!(&buf[5..], b"SERROR\0VERROR\0C08P01\0Mbad\0\0");
}

#[test]
fn error_field_decoding_edge_cases() {
    // Localised S without V: falls back to ERROR.
    let f = decode_error_fields(b"SFEHLER\0C42601\0Mx\0\0").expect("valid");
    assert_eq!(f.severity, Severity::Error);
    // S without V, in English.
    let f = decode_error_fields(b"SFATAL\0C28P01\0Mx\0\0").expect("valid");
    assert_eq!(f.severity, Severity::Fatal);
    // Non-UTF-8 text is converted, not rejected.
    let f = decode_error_fields(b"SERROR\0C42601\0M\xe9\0\0").expect("valid");
    assert_eq!(f.message, "\u{fffd}");
    for bad in [
        &b""[..],
        b"SERROR\0C42601\0Mx\0",       // no terminator
        b"SERROR\0C42601\0Mx",         // unterminated value
        b"C42601\0Mx\0\0",             // no severity
        b"SERROR\0Mx\0\0",             // no code
        b"SERROR\0C42601\0\0",         // no message
        b"SERROR\0Cbogus\0Mx\0\0",     // bad code
        b"SERROR\0C42601\0Mx\0\0junk", // trailing data
    ] {
        assert!(decode_error_fields(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn simple_messages() {
    let mut buf = BytesMut::new();
    encode_parse_complete(&mut buf);
    encode_bind_complete(&mut buf);
    encode_close_complete(&mut buf);
    encode_no_data(&mut buf);
    encode_empty_query(&mut buf);
    assert_eq!(
        &buf[..],
        b"1\0\0\0\x042\0\0\0\x043\0\0\0\x04n\0\0\0\x04I\0\0\0\x04"
    );
}

#[test]
fn ready_for_query_round_trips() {
    for s in [
        TransactionStatus::Idle,
        TransactionStatus::InBlock,
        TransactionStatus::Failed,
    ] {
        let mut buf = BytesMut::new();
        encode_ready_for_query(&mut buf, s);
        let body = one(&mut buf, b'Z');
        assert_eq!(decode_ready_for_query(&body).expect("valid"), s);
    }
    assert!(decode_ready_for_query(b"").is_err());
    assert!(decode_ready_for_query(b"X").is_err());
    assert!(decode_ready_for_query(b"II").is_err());
}

#[test]
fn parameter_status_and_command_complete_round_trip() {
    let mut buf = BytesMut::new();
    encode_parameter_status(&mut buf, "TimeZone", "Europe/Paris");
    let body = one(&mut buf, b'S');
    assert_eq!(
        decode_parameter_status(&body).expect("valid"),
        ("TimeZone", "Europe/Paris")
    );
    encode_command_complete(&mut buf, "INSERT 0 1");
    let body = one(&mut buf, b'C');
    assert_eq!(decode_command_complete(&body).expect("valid"), "INSERT 0 1");
    assert!(decode_parameter_status(b"a\0").is_err());
    assert!(decode_parameter_status(b"a\0b\0c").is_err());
    assert!(decode_parameter_status(b"\xff\0b\0").is_err());
    assert!(decode_command_complete(b"SELECT 1").is_err());
}

#[test]
fn backend_key_data_round_trips() {
    for len in [4usize, 32, 256] {
        let secret = vec![9u8; len];
        let mut buf = BytesMut::new();
        encode_backend_key_data(&mut buf, 77, &secret);
        let body = one(&mut buf, b'K');
        assert_eq!(
            decode_backend_key_data(&body).expect("valid"),
            (77, &secret[..])
        );
    }
    assert!(decode_backend_key_data(b"\0\0\0\x01abc").is_err());
    assert!(decode_backend_key_data(&[0u8; 4 + 257]).is_err());
}

#[test]
fn authentication_round_trips() {
    let mut buf = BytesMut::new();
    encode_auth_ok(&mut buf);
    assert_eq!(
        decode_authentication(&one(&mut buf, b'R')).ok(),
        Some(Authentication::Ok)
    );
    encode_auth_cleartext(&mut buf);
    assert_eq!(
        decode_authentication(&one(&mut buf, b'R')).ok(),
        Some(Authentication::Cleartext)
    );
    encode_auth_md5(&mut buf, [1, 2, 3, 4]);
    assert_eq!(
        decode_authentication(&one(&mut buf, b'R')).ok(),
        Some(Authentication::Md5 { salt: [1, 2, 3, 4] })
    );
    encode_auth_sasl(&mut buf, &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]);
    let body = one(&mut buf, b'R');
    assert_eq!(
        &body[..],
        b"\0\0\0\x0aSCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0"
    );
    assert_eq!(
        decode_authentication(&body).ok(),
        Some(Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
        })
    );
    encode_auth_sasl_continue(&mut buf, b"r=abc");
    let body = one(&mut buf, b'R');
    assert_eq!(
        decode_authentication(&body).ok(),
        Some(Authentication::SaslContinue(b"r=abc"))
    );
    encode_auth_sasl_final(&mut buf, b"v=xyz");
    let body = one(&mut buf, b'R');
    assert_eq!(
        decode_authentication(&body).ok(),
        Some(Authentication::SaslFinal(b"v=xyz"))
    );
    assert!(decode_authentication(b"\0\0\0\x05ab").is_err());
    assert!(decode_authentication(b"\0\0\0\x0aSCRAM").is_err());
    assert!(decode_authentication(b"\0\0\0").is_err());
}

#[test]
fn row_description_and_data_row_layout() {
    let mut buf = BytesMut::new();
    encode_row_description(&mut buf, &["a"]);
    let body = one(&mut buf, b'T');
    assert_eq!(
        &body[..],
        b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0"
    );
    encode_data_row(&mut buf, &[Some(b"xy"), None]);
    let body = one(&mut buf, b'D');
    assert_eq!(&body[..], b"\0\x02\0\0\0\x02xy\xff\xff\xff\xff");
}
