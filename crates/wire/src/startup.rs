//! The untagged first packet of a connection: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest, plus the NegotiateProtocolVersion reply.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::buf::{begin, begin_untagged, end, put_cstr, Reader};
use crate::error::WireError;
use crate::MAX_STARTUP_PACKET;

/// Request code of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Smallest startup packet: the length and the code.
const MIN_STARTUP_PACKET: u32 = 8;
/// Cancel secret key bounds: 4 bytes under protocol 3.0, up to 256 under 3.2.
const MIN_SECRET: usize = 4;
const MAX_SECRET: usize = 256;
/// Prefix of protocol options (as opposed to run-time parameters) in a StartupMessage.
const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

/// A protocol version as sent in a StartupMessage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtocolVersion {
    /// Major version; always 3 in a decoded StartupMessage.
    pub major: u16,
    /// Minor version; anything, the caller negotiates down with NegotiateProtocolVersion.
    pub minor: u16,
}

impl ProtocolVersion {
    /// The version code as sent on the wire (`major << 16 | minor`).
    pub fn code(&self) -> u32 {
        (u32::from(self.major) << 16) | u32::from(self.minor)
    }
}

/// The first packet a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupPacket {
    /// SSLRequest: answer one byte, `S` or `N`.
    SslRequest,
    /// GSSENCRequest: answer one byte, `G` or `N`.
    GssEncRequest,
    /// CancelRequest for the backend `pid`, authenticated by `secret` (4..=256 bytes).
    Cancel {
        /// Process id the client was given in BackendKeyData.
        pid: u32,
        /// Secret key the client was given in BackendKeyData.
        secret: Bytes,
    },
    /// StartupMessage.
    Startup {
        /// Requested version; major is 3, minor is whatever the client asked for.
        version: ProtocolVersion,
        /// Run-time parameters in the order sent (duplicates kept; the caller decides).
        /// Always contains a non-empty `user`.
        params: Vec<(String, String)>,
        /// Names of the `_pq_.` protocol options sent; none are recognised, so they go back in
        /// NegotiateProtocolVersion. They are not in `params`.
        unrecognized_protocol_options: Vec<String>,
    },
}

impl StartupPacket {
    /// Decodes the first packet of a connection from the front of `buf`.
    ///
    /// Returns `Ok(None)` until the whole packet has arrived. A packet that starts with a TLS
    /// handshake byte fails with [`WireError::DirectTls`], and a length outside 8..=10000 fails
    /// with [`WireError::InvalidStartupLength`] as soon as the length is known.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<StartupPacket>, WireError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if first == 0x16 {
            return Err(WireError::DirectTls);
        }
        let Some(len_bytes) = buf.get(..4) else {
            return Ok(None);
        };
        let mut arr = [0u8; 4];
        arr.copy_from_slice(len_bytes);
        let len = u32::from_be_bytes(arr);
        if len < MIN_STARTUP_PACKET || len as usize > MAX_STARTUP_PACKET {
            return Err(WireError::InvalidStartupLength(len));
        }
        let len = len as usize;
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        let mut packet = buf.split_to(len).freeze();
        packet.advance(4);
        parse_packet(packet).map(Some)
    }

    /// Encodes this packet, e.g. to open or cancel a server connection.
    ///
    /// `unrecognized_protocol_options` are not written (their values are not kept).
    pub fn encode(&self, buf: &mut BytesMut) {
        let at = begin_untagged(buf);
        match self {
            StartupPacket::SslRequest => buf.put_u32(SSL_REQUEST_CODE),
            StartupPacket::GssEncRequest => buf.put_u32(GSSENC_REQUEST_CODE),
            StartupPacket::Cancel { pid, secret } => {
                buf.put_u32(CANCEL_REQUEST_CODE);
                buf.put_u32(*pid);
                buf.extend_from_slice(secret);
            }
            StartupPacket::Startup {
                version, params, ..
            } => {
                buf.put_u32(version.code());
                for (k, v) in params {
                    put_cstr(buf, k.as_bytes());
                    put_cstr(buf, v.as_bytes());
                }
                buf.put_u8(0);
            }
        }
        end(buf, at);
    }
}

/// Parses a whole packet after its length field.
fn parse_packet(packet: Bytes) -> Result<StartupPacket, WireError> {
    let mut r = Reader::new(&packet, 0);
    let code = r.u32("request code")?;
    match code {
        SSL_REQUEST_CODE => {
            r.finish("SSLRequest has a body")?;
            return Ok(StartupPacket::SslRequest);
        }
        GSSENC_REQUEST_CODE => {
            r.finish("GSSENCRequest has a body")?;
            return Ok(StartupPacket::GssEncRequest);
        }
        CANCEL_REQUEST_CODE => {
            let pid = r.u32("cancel pid")?;
            let secret = r.rest();
            if !(MIN_SECRET..=MAX_SECRET).contains(&secret.len()) {
                return Err(r.malformed("cancel secret key length"));
            }
            let secret = packet.slice_ref(secret);
            return Ok(StartupPacket::Cancel { pid, secret });
        }
        _ => {}
    }
    let version = ProtocolVersion {
        major: (code >> 16) as u16,
        minor: (code & 0xffff) as u16,
    };
    // Major 1234 marks special request codes; an unknown one lands here too.
    if version.major != 3 {
        return Err(WireError::UnsupportedProtocol {
            major: version.major,
            minor: version.minor,
        });
    }
    let mut params = Vec::new();
    let mut unrecognized_protocol_options = Vec::new();
    let mut has_user = false;
    loop {
        let key = r.str("startup parameter name")?;
        if key.is_empty() {
            break;
        }
        let value = r.str("startup parameter value")?;
        if key.starts_with(PROTOCOL_OPTION_PREFIX) {
            unrecognized_protocol_options.push(key.to_owned());
            continue;
        }
        if key == "user" {
            has_user = !value.is_empty();
        }
        params.push((key.to_owned(), value.to_owned()));
    }
    r.finish("data after startup parameter terminator")?;
    if !has_user {
        return Err(WireError::MissingUser);
    }
    Ok(StartupPacket::Startup {
        version,
        params,
        unrecognized_protocol_options,
    })
}

/// Writes NegotiateProtocolVersion (`v`): the newest minor version supported for the requested
/// major version, and the `_pq_.` options that were not recognised.
pub fn encode_negotiate_protocol_version(
    buf: &mut BytesMut,
    newest_minor: u32,
    unrecognized: &[String],
) {
    let at = begin(buf, b'v');
    buf.put_u32(newest_minor);
    let n = u32::try_from(unrecognized.len()).unwrap_or(u32::MAX);
    buf.put_u32(n);
    for name in unrecognized.iter().take(n as usize) {
        put_cstr(buf, name.as_bytes());
    }
    end(buf, at);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(code: u32, params: &[(&str, &str)]) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u32(code);
        for (k, v) in params {
            put_cstr(&mut body, k.as_bytes());
            put_cstr(&mut body, v.as_bytes());
        }
        body.put_u8(0);
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32 + 4);
        buf.extend_from_slice(&body);
        buf
    }

    fn decode_all(bytes: &[u8]) -> Result<Option<StartupPacket>, WireError> {
        StartupPacket::decode(&mut BytesMut::from(bytes))
    }

    #[test]
    fn startup_message_decodes_with_options() {
        let mut buf = startup_bytes(
            196_610,
            &[
                ("user", "alice"),
                ("database", "db"),
                ("_pq_.foo", "1"),
                ("user", "bob"),
            ],
        );
        buf.extend_from_slice(b"next");
        let pkt = StartupPacket::decode(&mut buf)
            .expect("valid")
            .expect("whole");
        assert_eq!(&buf[..], b"next");
        let StartupPacket::Startup {
            version,
            params,
            unrecognized_protocol_options,
        } = pkt
        else {
            panic!("not a startup message: {pkt:?}");
        };
        assert_eq!(version, ProtocolVersion { major: 3, minor: 2 });
        assert_eq!(params.len(), 3);
        assert_eq!(params[0], ("user".into(), "alice".into()));
        assert_eq!(params[2], ("user".into(), "bob".into()));
        assert_eq!(unrecognized_protocol_options, vec!["_pq_.foo".to_string()]);
    }

    #[test]
    fn incomplete_startup_returns_none_at_every_prefix() {
        let buf = startup_bytes(196_608, &[("user", "a"), ("database", "b")]);
        for n in 0..buf.len() {
            let mut part = BytesMut::from(&buf[..n]);
            assert!(StartupPacket::decode(&mut part).expect("prefix").is_none());
            assert_eq!(part.len(), n, "nothing consumed");
        }
        assert!(decode_all(&buf).expect("ok").is_some());
    }

    #[test]
    fn startup_round_trips_through_encode() {
        let pkt = StartupPacket::Startup {
            version: ProtocolVersion { major: 3, minor: 0 },
            params: vec![
                ("user".into(), "u".into()),
                ("options".into(), "-c x=y".into()),
            ],
            unrecognized_protocol_options: vec![],
        };
        let mut buf = BytesMut::new();
        pkt.encode(&mut buf);
        assert_eq!(StartupPacket::decode(&mut buf).ok().flatten(), Some(pkt));
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_lengths_fail_without_waiting() {
        for len in [0u32, 3, 7, 10_001, 0x8000_0000, u32::MAX] {
            let err = decode_all(&len.to_be_bytes()).expect_err("bad length");
            assert!(matches!(err, WireError::InvalidStartupLength(l) if l == len));
        }
    }

    #[test]
    fn direct_tls_is_detected_from_the_first_byte() {
        assert!(matches!(decode_all(&[0x16]), Err(WireError::DirectTls)));
        assert!(matches!(
            decode_all(&[0x16, 3, 1, 0, 0xa5]),
            Err(WireError::DirectTls)
        ));
    }

    #[test]
    fn bogus_versions_are_unsupported() {
        for (code, major, minor) in [
            (5 << 16, 5, 0),
            ((1234 << 16) | 9999, 1234, 9999),
            (2 << 16, 2, 0),
        ] {
            let buf = startup_bytes(code, &[("user", "a")]);
            let err = decode_all(&buf).expect_err("unsupported");
            assert!(
                matches!(err, WireError::UnsupportedProtocol { major: a, minor: b } if a == major && b == minor),
                "{err:?}"
            );
        }
    }

    #[test]
    fn newer_minor_versions_are_accepted() {
        let buf = startup_bytes((3 << 16) | 99, &[("user", "a")]);
        let pkt = decode_all(&buf).expect("ok").expect("whole");
        assert!(matches!(
            pkt,
            StartupPacket::Startup {
                version: ProtocolVersion {
                    major: 3,
                    minor: 99
                },
                ..
            }
        ));
    }

    #[test]
    fn garbage_and_layout_errors() {
        // Missing user, empty user.
        assert!(matches!(
            decode_all(&startup_bytes(196_608, &[("database", "d")])),
            Err(WireError::MissingUser)
        ));
        assert!(matches!(
            decode_all(&startup_bytes(196_608, &[("user", "")])),
            Err(WireError::MissingUser)
        ));
        // No terminator: the value's NUL is the last byte.
        let mut buf = startup_bytes(196_608, &[("user", "a")]);
        buf.truncate(buf.len() - 1);
        let n = buf.len() as u32;
        buf[..4].copy_from_slice(&n.to_be_bytes());
        assert!(matches!(decode_all(&buf), Err(WireError::Malformed { .. })));
        // Trailing data after the terminator.
        let mut buf = startup_bytes(196_608, &[("user", "a")]);
        buf.put_u8(b'x');
        let n = buf.len() as u32;
        buf[..4].copy_from_slice(&n.to_be_bytes());
        assert!(matches!(decode_all(&buf), Err(WireError::Malformed { .. })));
        // Invalid UTF-8.
        let buf = startup_bytes(196_608, &[("user", "\u{e9}")]);
        let mut raw = buf.to_vec();
        let pos = raw.len() - 4;
        raw[pos] = 0xff;
        assert!(matches!(
            decode_all(&raw),
            Err(WireError::InvalidUtf8 { .. })
        ));
        // Random junk with a plausible length.
        let mut junk = vec![0u8, 0, 0, 12];
        junk.extend_from_slice(b"\xde\xad\xbe\xefABCD");
        assert!(decode_all(&junk).is_err());
    }

    #[test]
    fn special_requests() {
        let mut buf = BytesMut::new();
        StartupPacket::SslRequest.encode(&mut buf);
        assert_eq!(&buf[..], &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(
            StartupPacket::decode(&mut buf).ok().flatten(),
            Some(StartupPacket::SslRequest)
        );
        StartupPacket::GssEncRequest.encode(&mut buf);
        assert_eq!(
            StartupPacket::decode(&mut buf).ok().flatten(),
            Some(StartupPacket::GssEncRequest)
        );
        let mut long_ssl = vec![0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 0];
        assert!(StartupPacket::decode(&mut BytesMut::from(&long_ssl[..])).is_err());
        long_ssl.clear();
    }

    #[test]
    fn cancel_packets_with_short_and_long_secrets() {
        for secret_len in [4usize, 32, 256] {
            let secret: Vec<u8> = (0..secret_len).map(|i| i as u8).collect();
            let mut buf = BytesMut::new();
            crate::frontend::encode_cancel_request(&mut buf, 4242, &secret);
            assert_eq!(buf.len(), 12 + secret_len);
            let pkt = StartupPacket::decode(&mut buf).expect("ok").expect("whole");
            assert_eq!(
                pkt,
                StartupPacket::Cancel {
                    pid: 4242,
                    secret: Bytes::from(secret)
                }
            );
        }
        for secret_len in [0usize, 3, 257] {
            let mut buf = BytesMut::new();
            crate::frontend::encode_cancel_request(&mut buf, 1, &vec![7; secret_len]);
            assert!(matches!(
                StartupPacket::decode(&mut buf),
                Err(WireError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn negotiate_protocol_version_layout() {
        let mut buf = BytesMut::new();
        encode_negotiate_protocol_version(&mut buf, 2, &["_pq_.a".to_string()]);
        assert_eq!(&buf[..], b"v\0\0\0\x13\0\0\0\x02\0\0\0\x01_pq_.a\0");
    }
}
