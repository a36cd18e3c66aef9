//! Client-to-server messages: framing shared by both directions, [`FrontendMessage`], and the
//! encoders Sluice uses when it talks to a server as a client.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::buf::{begin, begin_untagged, count16, end, put_cstr, Reader};
use crate::error::WireError;
use crate::startup::CANCEL_REQUEST_CODE;

/// The five-byte header of a tagged message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The message type byte.
    pub tag: u8,
    /// The length field: counts itself and the body, not the tag.
    pub len: u32,
}

impl Header {
    /// Length of the whole message on the wire, tag included.
    pub fn total_len(&self) -> usize {
        self.len as usize + 1
    }
}

/// Peeks at a message header at the start of `buf` without consuming anything.
///
/// Returns `Ok(None)` if fewer than 5 bytes are buffered, and an error if the length field is
/// below 4. Works for messages in either direction.
pub fn peek_header(buf: &[u8]) -> Result<Option<Header>, WireError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    if len < 4 {
        return Err(WireError::InvalidMessageLength { tag, len });
    }
    Ok(Some(Header { tag, len }))
}

/// Splits one whole tagged message (either direction) off the front of `buf`, returning its
/// header and body (without tag and length).
///
/// Returns `Ok(None)` until the whole message is buffered. A length field above `max_len`
/// fails with [`WireError::MessageTooLarge`] before waiting for the body.
pub fn split_message(
    buf: &mut BytesMut,
    max_len: u32,
) -> Result<Option<(Header, Bytes)>, WireError> {
    let Some(header) = peek_header(buf)? else {
        return Ok(None);
    };
    if header.len > max_len {
        return Err(WireError::MessageTooLarge {
            tag: header.tag,
            len: header.len,
            max: max_len,
        });
    }
    let total = header.total_len();
    if buf.len() < total {
        // Bounded by max_len, checked above.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut body = buf.split_to(total).freeze();
    body.advance(5);
    Ok(Some((header, body)))
}

/// A message from a client. Variable parts are zero-copy slices of the input buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendMessage {
    /// `Q` simple query.
    Query {
        /// The query string, without its trailing NUL.
        sql: Bytes,
    },
    /// `P` Parse.
    Parse {
        /// Statement name; empty for the unnamed statement.
        name: Bytes,
        /// The query string.
        query: Bytes,
        /// Parameter type OIDs (0 = unspecified).
        param_types: Vec<u32>,
    },
    /// `B` Bind.
    Bind {
        /// Portal name; empty for the unnamed portal.
        portal: Bytes,
        /// Statement name; empty for the unnamed statement.
        statement: Bytes,
        /// Everything after the statement name's NUL (formats, parameters, result formats),
        /// verbatim.
        rest: Bytes,
    },
    /// `D` Describe.
    Describe {
        /// `b'S'` for a statement, `b'P'` for a portal.
        kind: u8,
        /// The statement or portal name.
        name: Bytes,
    },
    /// `E` Execute.
    Execute {
        /// Portal name.
        portal: Bytes,
        /// Maximum rows to return; 0 means no limit.
        max_rows: u32,
    },
    /// `C` Close.
    Close {
        /// `b'S'` for a statement, `b'P'` for a portal.
        kind: u8,
        /// The statement or portal name.
        name: Bytes,
    },
    /// `S` Sync.
    Sync,
    /// `H` Flush.
    Flush,
    /// `X` Terminate.
    Terminate,
    /// `d` CopyData, the body verbatim.
    CopyData(Bytes),
    /// `c` CopyDone.
    CopyDone,
    /// `f` CopyFail.
    CopyFail {
        /// The failure reason, without its NUL.
        message: Bytes,
    },
    /// `F` FunctionCall, the body verbatim.
    FunctionCall(Bytes),
    /// `p` body verbatim: PasswordMessage, GSSResponse, SASLInitialResponse or SASLResponse
    /// depending on the authentication exchange.
    Password(Bytes),
    /// Any other message type, body verbatim.
    Other {
        /// The message type byte.
        tag: u8,
        /// The body.
        body: Bytes,
    },
}

impl FrontendMessage {
    /// Decodes one whole message from the front of `buf`.
    ///
    /// Returns `Ok(None)` until all of it is buffered (consuming nothing), and
    /// [`WireError::MessageTooLarge`] if the length field exceeds `max_len`, checked before
    /// waiting for the body. On success the message is removed from `buf`.
    pub fn decode(buf: &mut BytesMut, max_len: u32) -> Result<Option<FrontendMessage>, WireError> {
        let Some((header, body)) = split_message(buf, max_len)? else {
            return Ok(None);
        };
        parse_body(header.tag, body).map(Some)
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            FrontendMessage::Query { .. } => b'Q',
            FrontendMessage::Parse { .. } => b'P',
            FrontendMessage::Bind { .. } => b'B',
            FrontendMessage::Describe { .. } => b'D',
            FrontendMessage::Execute { .. } => b'E',
            FrontendMessage::Close { .. } => b'C',
            FrontendMessage::Sync => b'S',
            FrontendMessage::Flush => b'H',
            FrontendMessage::Terminate => b'X',
            FrontendMessage::CopyData(_) => b'd',
            FrontendMessage::CopyDone => b'c',
            FrontendMessage::CopyFail { .. } => b'f',
            FrontendMessage::FunctionCall(_) => b'F',
            FrontendMessage::Password(_) => b'p',
            FrontendMessage::Other { tag, .. } => *tag,
        }
    }

    /// Appends the message to `buf`; the exact inverse of [`FrontendMessage::decode`].
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } => return encode_parse(buf, name, query, param_types),
            FrontendMessage::Bind {
                portal,
                statement,
                rest,
            } => return encode_bind_renamed(buf, portal, statement, rest),
            FrontendMessage::Describe { kind, name } => return encode_describe(buf, *kind, name),
            FrontendMessage::Close { kind, name } => return encode_close(buf, *kind, name),
            _ => {}
        }
        let at = begin(buf, self.tag());
        match self {
            FrontendMessage::Query { sql: s } | FrontendMessage::CopyFail { message: s } => {
                put_cstr(buf, s)
            }
            FrontendMessage::Execute { portal, max_rows } => {
                put_cstr(buf, portal);
                buf.put_u32(*max_rows);
            }
            FrontendMessage::CopyData(body)
            | FrontendMessage::FunctionCall(body)
            | FrontendMessage::Password(body)
            | FrontendMessage::Other { body, .. } => buf.extend_from_slice(body),
            _ => {}
        }
        end(buf, at);
    }
}

/// Parses a body of type `tag` (without tag and length).
fn parse_body(tag: u8, body: Bytes) -> Result<FrontendMessage, WireError> {
    let mut r = Reader::new(&body, tag);
    let sub = |s: &[u8]| body.slice_ref(s);
    let msg = match tag {
        b'Q' => FrontendMessage::Query {
            sql: sub(r.cstr("query string")?),
        },
        b'P' => {
            let name = sub(r.cstr("statement name")?);
            let query = sub(r.cstr("query string")?);
            let n = usize::from(r.u16("parameter count")?);
            let types = r.bytes(n.saturating_mul(4), "parameter types")?;
            let param_types = types
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            }
        }
        b'B' => FrontendMessage::Bind {
            portal: sub(r.cstr("portal name")?),
            statement: sub(r.cstr("statement name")?),
            rest: sub(r.rest()),
        },
        b'D' | b'C' => {
            let kind = r.u8("describe/close kind")?;
            if kind != b'S' && kind != b'P' {
                return Err(r.malformed("describe/close kind is not 'S' or 'P'"));
            }
            let name = sub(r.cstr("name")?);
            if tag == b'D' {
                FrontendMessage::Describe { kind, name }
            } else {
                FrontendMessage::Close { kind, name }
            }
        }
        b'E' => FrontendMessage::Execute {
            portal: sub(r.cstr("portal name")?),
            max_rows: r.u32("row limit")?,
        },
        b'S' => FrontendMessage::Sync,
        b'H' => FrontendMessage::Flush,
        b'X' => FrontendMessage::Terminate,
        b'c' => FrontendMessage::CopyDone,
        b'f' => FrontendMessage::CopyFail {
            message: sub(r.cstr("error message")?),
        },
        b'd' => FrontendMessage::CopyData(sub(r.rest())),
        b'F' => FrontendMessage::FunctionCall(sub(r.rest())),
        b'p' => FrontendMessage::Password(sub(r.rest())),
        _ => FrontendMessage::Other {
            tag,
            body: sub(r.rest()),
        },
    };
    r.finish("unexpected data at end of message")?;
    Ok(msg)
}

/// Splits a SASLInitialResponse body into the chosen mechanism and the initial client data
/// (empty if the client sent none, length -1).
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<(String, Bytes), WireError> {
    let mut r = Reader::new(body, b'p');
    let mechanism = r.str("SASL mechanism")?.to_owned();
    let len = r.u32("SASL data length")?;
    let data = if len == u32::MAX {
        &[][..]
    } else {
        r.bytes(len as usize, "SASL data")?
    };
    r.finish("unexpected data after SASL initial response")?;
    Ok((mechanism, Bytes::copy_from_slice(data)))
}

/// Reads a PasswordMessage body (cleartext or md5 answer): the password without its NUL.
pub fn parse_password_message(body: &[u8]) -> Result<&[u8], WireError> {
    let mut r = Reader::new(body, b'p');
    let password = r.cstr("password")?;
    r.finish("unexpected data after password")?;
    Ok(password)
}

/// Writes a SASLInitialResponse (`p`) for `mechanism` with the client's first message.
pub fn encode_sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    let at = begin(buf, b'p');
    put_cstr(buf, mechanism.as_bytes());
    buf.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    buf.extend_from_slice(data);
    end(buf, at);
}

/// Writes a Parse (`P`). At most 65535 parameter types are written.
pub fn encode_parse(buf: &mut BytesMut, name: &[u8], query: &[u8], types: &[u32]) {
    let at = begin(buf, b'P');
    put_cstr(buf, name);
    put_cstr(buf, query);
    let n = count16(types.len());
    buf.put_u16(n);
    for t in types.iter().take(usize::from(n)) {
        buf.put_u32(*t);
    }
    end(buf, at);
}

/// Writes a Bind (`B`) for `portal` and `statement`, followed by `rest` verbatim (the part of a
/// client's Bind after the statement name), so a statement can be renamed.
pub fn encode_bind_renamed(buf: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    let at = begin(buf, b'B');
    put_cstr(buf, portal);
    put_cstr(buf, statement);
    buf.extend_from_slice(rest);
    end(buf, at);
}

/// Writes a Describe (`D`); `kind` is `b'S'` or `b'P'`.
pub fn encode_describe(buf: &mut BytesMut, kind: u8, name: &[u8]) {
    let at = begin(buf, b'D');
    buf.put_u8(kind);
    put_cstr(buf, name);
    end(buf, at);
}

/// Writes a Close (`C`); `kind` is `b'S'` or `b'P'`.
pub fn encode_close(buf: &mut BytesMut, kind: u8, name: &[u8]) {
    let at = begin(buf, b'C');
    buf.put_u8(kind);
    put_cstr(buf, name);
    end(buf, at);
}

/// Writes a Sync (`S`).
pub fn encode_sync(buf: &mut BytesMut) {
    let at = begin(buf, b'S');
    end(buf, at);
}

/// Writes a Flush (`H`).
pub fn encode_flush(buf: &mut BytesMut) {
    let at = begin(buf, b'H');
    end(buf, at);
}

/// Writes a simple Query (`Q`).
pub fn encode_query(buf: &mut BytesMut, sql: &str) {
    let at = begin(buf, b'Q');
    put_cstr(buf, sql.as_bytes());
    end(buf, at);
}

/// Writes a Terminate (`X`).
pub fn encode_terminate(buf: &mut BytesMut) {
    let at = begin(buf, b'X');
    end(buf, at);
}

/// Writes a CancelRequest (untagged) for backend `pid` with its secret key.
pub fn encode_cancel_request(buf: &mut BytesMut, pid: u32, secret: &[u8]) {
    let at = begin_untagged(buf);
    buf.put_u32(CANCEL_REQUEST_CODE);
    buf.put_u32(pid);
    buf.extend_from_slice(secret);
    end(buf, at);
}

#[cfg(test)]
mod tests;
