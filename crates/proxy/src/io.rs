//! A framed client connection: a stream plus read and write buffers. The only place in the
//! client session that touches the socket during startup and authentication.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use sluice_wire::frontend::{self, Header};
use sluice_wire::{ErrorFields, WireError};

use crate::readiness::ArmedRead;
use crate::stream::Stream;

/// Consumes the first `n` bytes of `buf`. Consuming all of them leaves the start where it is.
///
/// `BytesMut::advance` moves a buffer's start forward, and the next read or write lands after
/// it. A buffer emptied that way after every message walks through its whole allocation, and
/// each transaction's bytes land in cache lines gone cold: a miss in every copy, the kernel's
/// `recv` and `send` included. Emptied with `clear`, it reuses the same few hot lines. (Only a
/// partly consumed buffer moves its start; `BytesMut` takes the room back when it runs out.)
#[inline]
pub(crate) fn consume(buf: &mut BytesMut, n: usize) {
    if n == buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

/// Why reading from a peer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// A socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes that are not the protocol.
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
}

/// A client connection with buffers.
pub struct ClientIo {
    /// The socket.
    pub stream: Stream,
    /// Bytes read and not yet consumed.
    pub rbuf: BytesMut,
    /// Bytes to write.
    pub wbuf: BytesMut,
    /// Reads in the session's waits, skipped while the client has sent nothing new.
    read: ArmedRead,
}

impl ClientIo {
    /// Wraps a stream.
    pub fn new(stream: Stream) -> Self {
        ClientIo {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(8192),
            read: ArmedRead::default(),
        }
    }

    /// Reads more bytes; `Closed` at EOF.
    pub async fn fill(&mut self) -> Result<(), ReadError> {
        // This read registers the task's own waker, not the one of the session's waits.
        self.read.disarm();
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err(ReadError::Closed);
        }
        Ok(())
    }

    /// Reads more bytes in one of the session's waits: skipped while the client has sent
    /// nothing new since the last such read (see [`ArmedRead`]). `Ok(0)` at EOF.
    #[inline]
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.read.poll(cx, |cx| {
            poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf)
        })
    }

    /// Reads one whole message of at most `max` bytes.
    pub async fn message(&mut self, max: u32) -> Result<(Header, Bytes), ReadError> {
        loop {
            if let Some(m) = frontend::split_message(&mut self.rbuf, max)? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Writes everything buffered.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Sends an error (FATAL or not) and flushes; errors writing are ignored (the peer may be gone).
    pub async fn send_error(&mut self, fields: &ErrorFields) {
        sluice_wire::backend::encode_error(&mut self.wbuf, fields);
        let _ = self.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn a_buffer_emptied_after_every_message_does_not_walk_through_its_allocation() {
        let mut buf = BytesMut::with_capacity(8192);
        let start = buf.as_ptr();
        for _ in 0..100 {
            buf.put_slice(&[1; 300]);
            consume(&mut buf, 300);
            assert_eq!((buf.as_ptr(), buf.capacity()), (start, 8192));
        }
        // A message only partly consumed keeps its rest in place.
        buf.put_slice(&[2; 300]);
        consume(&mut buf, 299);
        assert_eq!(
            (buf.as_ptr(), &buf[..]),
            (start.wrapping_add(299), &[2][..])
        );
    }
}
