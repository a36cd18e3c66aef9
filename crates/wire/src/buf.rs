//! Small helpers shared by the encoders and decoders: a bounds-checked body reader and message
//! framing for writers.

use bytes::{BufMut, BytesMut};

use crate::error::WireError;

/// Reads fields from a message body. Every read is bounds-checked and reports the message tag.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
    tag: u8,
}

impl<'a> Reader<'a> {
    /// Starts reading `body`; `tag` is used in error reports (0 for startup packets).
    pub(crate) fn new(body: &'a [u8], tag: u8) -> Self {
        Reader { rest: body, tag }
    }

    /// A `Malformed` error for this message.
    pub(crate) fn malformed(&self, what: &'static str) -> WireError {
        WireError::Malformed {
            tag: self.tag,
            what,
        }
    }

    /// Reads a NUL-terminated string, without its NUL.
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let Some(end) = self.rest.iter().position(|&b| b == 0) else {
            return Err(self.malformed(what));
        };
        let (s, tail) = self.rest.split_at(end);
        self.rest = tail.get(1..).unwrap_or_default();
        Ok(s)
    }

    /// Reads a NUL-terminated UTF-8 string.
    pub(crate) fn str(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        let s = self.cstr(what)?;
        std::str::from_utf8(s).map_err(|_| WireError::InvalidUtf8 { what })
    }

    /// Reads exactly `n` bytes.
    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(self.malformed(what));
        }
        let (s, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(s)
    }

    /// Reads one byte.
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        let b = self.bytes(1, what)?;
        b.first().copied().ok_or_else(|| self.malformed(what))
    }

    /// Reads a big-endian 16-bit integer.
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.bytes(2, what)?;
        let arr: [u8; 2] = b.try_into().map_err(|_| self.malformed(what))?;
        Ok(u16::from_be_bytes(arr))
    }

    /// Reads a big-endian 32-bit integer.
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.bytes(4, what)?;
        let arr: [u8; 4] = b.try_into().map_err(|_| self.malformed(what))?;
        Ok(u32::from_be_bytes(arr))
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Fails unless the whole body has been read.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(what))
        }
    }
}

/// Writes a tag and a placeholder length; returns where the length goes, for [`end`].
pub(crate) fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    at
}

/// Fills in the length of the message started with [`begin`] (or [`begin_untagged`]).
pub(crate) fn end(buf: &mut BytesMut, at: usize) {
    let len = u32::try_from(buf.len().saturating_sub(at)).unwrap_or(u32::MAX);
    if let Some(dst) = buf.get_mut(at..at + 4) {
        dst.copy_from_slice(&len.to_be_bytes());
    }
}

/// Writes a placeholder length for an untagged (startup-phase) packet.
pub(crate) fn begin_untagged(buf: &mut BytesMut) -> usize {
    let at = buf.len();
    buf.put_u32(0);
    at
}

/// Writes `s` as a C string. NUL bytes inside `s` are dropped, because they would end the string
/// early and corrupt the fields after it.
pub(crate) fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    if s.contains(&0) {
        for part in s.split(|&b| b == 0) {
            buf.extend_from_slice(part);
        }
    } else {
        buf.extend_from_slice(s);
    }
    buf.put_u8(0);
}

/// A count as a protocol Int16, clamped (callers write at most this many items).
pub(crate) fn count16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_fields_and_rejects_short_input() {
        let mut r = Reader::new(b"ab\0\x00\x01\x00\x00\x00\x02z", b'x');
        assert_eq!(r.cstr("s").ok(), Some(&b"ab"[..]));
        assert_eq!(r.u16("a").ok(), Some(1));
        assert_eq!(r.u32("b").ok(), Some(2));
        assert!(r.finish("end").is_err());
        assert_eq!(r.u8("c").ok(), Some(b'z'));
        assert!(r.finish("end").is_ok());
        assert!(r.u8("d").is_err());
        assert!(r.cstr("e").is_err());
        assert!(r.u32("f").is_err());
    }

    #[test]
    fn framing_writes_length_including_itself() {
        let mut buf = BytesMut::new();
        let at = begin(&mut buf, b'Q');
        put_cstr(&mut buf, b"a\0b");
        end(&mut buf, at);
        assert_eq!(&buf[..], b"Q\0\0\0\x07ab\0");
    }
}
