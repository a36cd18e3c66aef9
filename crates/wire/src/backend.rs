//! Server-to-client messages: encoders for the messages Sluice synthesises and decoders for the
//! ones it inspects. Decoders take a message body, without tag and length (see
//! [`crate::frontend::split_message`] for framing).

use bytes::{BufMut, BytesMut};

use crate::buf::{begin, count16, end, put_cstr, Reader};
use crate::error::{ErrorFields, Severity, SqlState, WireError};

/// OID of the `text` type, used for every column Sluice describes.
const TEXT_OID: u32 = 25;
/// Cancel secret key bounds: 4 bytes under protocol 3.0, up to 256 under 3.2.
const SECRET_LEN: std::ops::RangeInclusive<usize> = 4..=256;

/// The transaction status carried by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block; a server connection may be released.
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block; queries are rejected until it ends.
    Failed,
}

impl TransactionStatus {
    /// Parses the status byte.
    pub fn from_byte(b: u8) -> Option<TransactionStatus> {
        match b {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InBlock),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }

    /// The status byte.
    pub fn to_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InBlock => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// An authentication request (`R`) from a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication<'a> {
    /// AuthenticationOk.
    Ok,
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationMD5Password with its salt.
    Md5 {
        /// The salt to hash the password with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL with the offered mechanisms.
    Sasl {
        /// Mechanism names, in the server's order of preference.
        mechanisms: Vec<&'a str>,
    },
    /// AuthenticationSASLContinue with the server's challenge.
    SaslContinue(&'a [u8]),
    /// AuthenticationSASLFinal with the server's additional data.
    SaslFinal(&'a [u8]),
    /// Any other method (Kerberos, GSS, SSPI, ...), by code, with its data.
    Other {
        /// The authentication method code.
        code: u32,
        /// The rest of the body.
        data: &'a [u8],
    },
}

fn auth(buf: &mut BytesMut, code: u32, data: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_u32(code);
    buf.extend_from_slice(data);
    end(buf, at);
}

/// Writes AuthenticationOk.
pub fn encode_auth_ok(buf: &mut BytesMut) {
    auth(buf, 0, &[]);
}

/// Writes AuthenticationCleartextPassword.
pub fn encode_auth_cleartext(buf: &mut BytesMut) {
    auth(buf, 3, &[]);
}

/// Writes AuthenticationMD5Password with `salt`.
pub fn encode_auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    auth(buf, 5, &salt);
}

/// Writes AuthenticationSASL offering `mechanisms`.
pub fn encode_auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let at = begin(buf, b'R');
    buf.put_u32(10);
    for m in mechanisms {
        put_cstr(buf, m.as_bytes());
    }
    buf.put_u8(0);
    end(buf, at);
}

/// Writes AuthenticationSASLContinue with the server-first-message.
pub fn encode_auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    auth(buf, 11, data);
}

/// Writes AuthenticationSASLFinal with the server-final-message.
pub fn encode_auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    auth(buf, 12, data);
}

/// Writes ParameterStatus (`S`).
pub fn encode_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, b'S');
    put_cstr(buf, name.as_bytes());
    put_cstr(buf, value.as_bytes());
    end(buf, at);
}

/// Writes BackendKeyData (`K`).
pub fn encode_backend_key_data(buf: &mut BytesMut, pid: u32, secret: &[u8]) {
    let at = begin(buf, b'K');
    buf.put_u32(pid);
    buf.extend_from_slice(secret);
    end(buf, at);
}

/// Writes ReadyForQuery (`Z`).
pub fn encode_ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    let at = begin(buf, b'Z');
    buf.put_u8(status.to_byte());
    end(buf, at);
}

fn empty(buf: &mut BytesMut, tag: u8) {
    let at = begin(buf, tag);
    end(buf, at);
}

/// Writes ParseComplete (`1`).
pub fn encode_parse_complete(buf: &mut BytesMut) {
    empty(buf, b'1');
}

/// Writes BindComplete (`2`).
pub fn encode_bind_complete(buf: &mut BytesMut) {
    empty(buf, b'2');
}

/// Writes CloseComplete (`3`).
pub fn encode_close_complete(buf: &mut BytesMut) {
    empty(buf, b'3');
}

/// Writes NoData (`n`).
pub fn encode_no_data(buf: &mut BytesMut) {
    empty(buf, b'n');
}

/// Writes EmptyQueryResponse (`I`).
pub fn encode_empty_query(buf: &mut BytesMut) {
    empty(buf, b'I');
}

/// Writes CommandComplete (`C`) with a command tag such as `"SELECT 1"`.
pub fn encode_command_complete(buf: &mut BytesMut, tag: &str) {
    let at = begin(buf, b'C');
    put_cstr(buf, tag.as_bytes());
    end(buf, at);
}

/// Writes RowDescription (`T`): every column is `text` in text format, with no table.
/// At most 65535 columns are written.
pub fn encode_row_description(buf: &mut BytesMut, columns: &[&str]) {
    let at = begin(buf, b'T');
    let n = count16(columns.len());
    buf.put_u16(n);
    for name in columns.iter().take(usize::from(n)) {
        put_cstr(buf, name.as_bytes());
        buf.put_u32(0); // table oid
        buf.put_u16(0); // column attribute number
        buf.put_u32(TEXT_OID);
        buf.put_i16(-1); // type size: variable
        buf.put_i32(-1); // type modifier
        buf.put_u16(0); // text format
    }
    end(buf, at);
}

/// Writes DataRow (`D`); `None` is SQL NULL. At most 65535 values are written.
pub fn encode_data_row(buf: &mut BytesMut, values: &[Option<&[u8]>]) {
    let at = begin(buf, b'D');
    let n = count16(values.len());
    buf.put_u16(n);
    for v in values.iter().take(usize::from(n)) {
        match v {
            Some(v) => {
                buf.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                buf.extend_from_slice(v);
            }
            None => buf.put_i32(-1),
        }
    }
    end(buf, at);
}

fn encode_fields(buf: &mut BytesMut, tag: u8, f: &ErrorFields) {
    let at = begin(buf, tag);
    let mut field = |t: u8, v: &[u8]| {
        buf.put_u8(t);
        put_cstr(buf, v);
    };
    field(b'S', f.severity.as_str().as_bytes());
    field(b'V', f.severity.as_str().as_bytes());
    field(b'C', f.code.as_str().as_bytes());
    field(b'M', f.message.as_bytes());
    if let Some(d) = &f.detail {
        field(b'D', d.as_bytes());
    }
    if let Some(h) = &f.hint {
        field(b'H', h.as_bytes());
    }
    for (t, v) in &f.other {
        // A zero type byte would end the list; skip it and the known fields written above.
        if !matches!(*t, 0 | b'S' | b'V' | b'C' | b'M' | b'D' | b'H') {
            field(*t, v.as_bytes());
        }
    }
    buf.put_u8(0);
    end(buf, at);
}

/// Writes NoticeResponse (`N`).
pub fn encode_notice(buf: &mut BytesMut, fields: &ErrorFields) {
    encode_fields(buf, b'N', fields);
}

/// Writes ErrorResponse (`E`).
pub fn encode_error(buf: &mut BytesMut, fields: &ErrorFields) {
    encode_fields(buf, b'E', fields);
}

/// Decodes a ReadyForQuery body.
pub fn decode_ready_for_query(body: &[u8]) -> Result<TransactionStatus, WireError> {
    let mut r = Reader::new(body, b'Z');
    let b = r.u8("transaction status")?;
    r.finish("unexpected data after transaction status")?;
    TransactionStatus::from_byte(b).ok_or_else(|| r.malformed("unknown transaction status"))
}

/// Decodes a ParameterStatus body into (name, value).
pub fn decode_parameter_status(body: &[u8]) -> Result<(&str, &str), WireError> {
    let mut r = Reader::new(body, b'S');
    let name = r.str("parameter name")?;
    let value = r.str("parameter value")?;
    r.finish("unexpected data after parameter value")?;
    Ok((name, value))
}

/// Decodes a BackendKeyData body into (pid, secret key); the key must be 4..=256 bytes.
pub fn decode_backend_key_data(body: &[u8]) -> Result<(u32, &[u8]), WireError> {
    let mut r = Reader::new(body, b'K');
    let pid = r.u32("process id")?;
    let secret = r.rest();
    if !SECRET_LEN.contains(&secret.len()) {
        return Err(r.malformed("secret key length"));
    }
    Ok((pid, secret))
}

/// Decodes a CommandComplete body into its command tag.
pub fn decode_command_complete(body: &[u8]) -> Result<&str, WireError> {
    let mut r = Reader::new(body, b'C');
    let tag = r.str("command tag")?;
    r.finish("unexpected data after command tag")?;
    Ok(tag)
}

/// Decodes an Authentication (`R`) body.
pub fn decode_authentication(body: &[u8]) -> Result<Authentication<'_>, WireError> {
    let mut r = Reader::new(body, b'R');
    let code = r.u32("authentication code")?;
    let auth = match code {
        0 => Authentication::Ok,
        3 => Authentication::Cleartext,
        5 => {
            let s = r.bytes(4, "md5 salt")?;
            let mut salt = [0u8; 4];
            salt.copy_from_slice(s);
            Authentication::Md5 { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.str("SASL mechanism")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue(r.rest()),
        12 => Authentication::SaslFinal(r.rest()),
        code => Authentication::Other {
            code,
            data: r.rest(),
        },
    };
    r.finish("unexpected data in authentication request")?;
    Ok(auth)
}

/// Decodes an ErrorResponse or NoticeResponse body.
///
/// The severity comes from `V` when present, else from `S` (an unrecognised localised `S`
/// alone gives [`Severity::Error`]). `S`, `C` and `M` are required. Text that is not UTF-8
/// (a server or client encoding other than UTF8) is converted lossily rather than rejected.
pub fn decode_error_fields(body: &[u8]) -> Result<ErrorFields, WireError> {
    let mut r = Reader::new(body, b'E');
    let mut localized = None;
    let mut severity = None;
    let mut code = None;
    let mut message = None;
    let mut detail = None;
    let mut hint = None;
    let mut other = Vec::new();
    loop {
        let t = r.u8("field type")?;
        if t == 0 {
            break;
        }
        let value = String::from_utf8_lossy(r.cstr("field value")?).into_owned();
        match t {
            b'S' => localized = Some(value),
            b'V' => severity = Severity::parse(&value),
            b'C' => code = Some(SqlState::parse(&value).ok_or_else(|| r.malformed("SQLSTATE"))?),
            b'M' => message = Some(value),
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => other.push((t, value)),
        }
    }
    r.finish("unexpected data after error fields")?;
    let Some(localized) = localized else {
        return Err(r.malformed("missing severity field"));
    };
    let severity = severity
        .or_else(|| Severity::parse(&localized))
        .unwrap_or(Severity::Error);
    Ok(ErrorFields {
        severity,
        code: code.ok_or_else(|| r.malformed("missing SQLSTATE field"))?,
        message: message.ok_or_else(|| r.malformed("missing message field"))?,
        detail,
        hint,
        other,
    })
}

#[cfg(test)]
mod tests;
