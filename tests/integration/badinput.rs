//! Malformed and unusual input from clients: garbage, bad protocol versions, absurd lengths,
//! truncated messages, clients vanishing mid-startup and mid-query, SSL/GSS requests and
//! protocol 3.2. Every case ends without a hang, and Sluice keeps serving normal clients.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use sluice_tests::harness::raw::frontend;
use sluice_tests::harness::{BackendMessage, ConfigBuilder, PgCluster, SluiceHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{assert_serves, raw_trusted, SETTLE};

/// A startup packet with an explicit protocol version.
fn startup_version(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(version);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::new();
    out.put_i32(i32::try_from(body.len() + 4).expect("small"));
    out.put_slice(&body);
    out.to_vec()
}

/// Writes `bytes`, half-closes, and expects Sluice to close its side within SETTLE.
async fn send_then_half_close(sluice: &SluiceHandle, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(sluice.addr()).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    tokio::time::timeout(SETTLE, s.read_to_end(&mut got))
        .await
        .expect("Sluice closes the connection, no hang")
        .ok();
    got
}

async fn sluice() -> SluiceHandle {
    SluiceHandle::start(ConfigBuilder::new(PgCluster::shared()).pool_size(1)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_instead_of_startup() {
    let sluice = sluice().await;
    let mut raw = sluice.raw().await;
    raw.send(b"GET / HTTP/1.1\r\nHost: sluice\r\n\r\n")
        .await
        .expect("send");
    raw.expect_closed(SETTLE).await.expect("closed");
    // Random-looking bytes with a plausible small length.
    let mut raw = sluice.raw().await;
    raw.send(&[0, 0, 0, 12, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4])
        .await
        .expect("send");
    raw.expect_closed(SETTLE).await.expect("closed");
    assert_serves(&sluice).await;
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_protocol_version_is_fatal_0a000() {
    let sluice = sluice().await;
    let mut raw = sluice.raw().await;
    raw.send(&startup_version(
        5 << 16,
        &[("user", "trusted"), ("database", "appdb")],
    ))
    .await
    .expect("send");
    let seen = raw.expect_closed(SETTLE).await.expect("closed");
    let err = seen
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.sqlstate().as_deref(), Some("0A000"), "{seen:?}");
    assert_eq!(err.field(b'S').as_deref(), Some("FATAL"));
    assert_serves(&sluice).await;
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn absurd_startup_lengths_close_without_hang() {
    let sluice = sluice().await;
    let cases: [&[u8]; 5] = [
        &[0x80, 0, 0, 0, 0, 3, 0, 0],          // 2 GiB (negative as i32)
        &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0], // just under 2 GiB
        &[0, 0, 0, 4],                         // shorter than a header
        &[0, 0, 0, 7, 0, 3, 0],                // < 8
        &[0, 0, 0, 0],                         // zero
    ];
    for bytes in cases {
        let mut raw = sluice.raw().await;
        raw.send(bytes).await.expect("send");
        let seen = raw
            .expect_closed(SETTLE)
            .await
            .unwrap_or_else(|e| panic!("{bytes:?}: {e:#}"));
        assert!(
            seen.iter().all(|m| m.tag == b'E'),
            "{bytes:?}: only an ErrorResponse may precede the close: {seen:?}"
        );
        assert_serves(&sluice).await;
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_messages_then_close() {
    let sluice = sluice().await;
    // Half a startup packet, then EOF.
    let startup = frontend::startup("trusted", "appdb", &[]);
    send_then_half_close(&sluice, &startup[..startup.len() / 2]).await;
    assert_serves(&sluice).await;

    // After login: the first bytes of a Query, then EOF. The pool of one must not leak.
    let mut s = TcpStream::connect(sluice.addr()).await.expect("connect");
    s.write_all(&startup).await.expect("startup");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    // Read until ReadyForQuery's 'Z' header (bounded).
    for _ in 0..50 {
        let n = tokio::time::timeout(SETTLE, s.read(&mut buf))
            .await
            .expect("login answer")
            .expect("read");
        assert!(n > 0, "closed during login");
        got.extend_from_slice(&buf[..n]);
        if got.len() >= 6 && got[got.len() - 6] == b'Z' {
            break;
        }
    }
    let q = frontend::query("select 1");
    s.write_all(&q[..3]).await.expect("partial query");
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tokio::time::timeout(SETTLE, s.read_to_end(&mut rest))
        .await
        .expect("Sluice closes after a truncated message")
        .ok();
    assert_serves(&sluice).await;
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_vanishes_mid_startup_and_mid_query() {
    let sluice = sluice().await;
    // Mid-SCRAM: the client leaves after the SASL request.
    let mut raw = sluice.raw().await;
    raw.startup("app", "appdb", &[]).await.expect("startup");
    let m = raw.recv().await.expect("auth request");
    assert_eq!(m.auth_code(), Some(10), "SASL requested: {m:?}");
    drop(raw);
    assert_serves(&sluice).await;

    // Mid-query on the pool of one: the next client is served within the bound.
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    raw.query("select pg_sleep(2)").await.expect("query");
    drop(raw);
    tokio::time::timeout(Duration::from_secs(15), assert_serves(&sluice))
        .await
        .expect("next client served after the vanished one");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ssl_and_gss_requests_are_declined_then_login_works() {
    let sluice = sluice().await;
    let mut raw = sluice.raw().await;
    assert_eq!(raw.ssl_request().await.expect("ssl"), b'N');
    raw.login("trusted", "appdb", None, &[])
        .await
        .expect("login");
    assert_eq!(
        raw.simple_rows("select 'ssl-n'").await.expect("query"),
        vec![vec![Some("ssl-n".to_owned())]]
    );
    let mut raw = sluice.raw().await;
    assert_eq!(raw.gssenc_request().await.expect("gss"), b'N');
    raw.login("trusted", "appdb", None, &[])
        .await
        .expect("login");
    assert_eq!(raw.simple_rows("select 1").await.expect("query").len(), 1);
    assert_serves(&sluice).await;
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_3_2_is_negotiated_down() {
    let sluice = sluice().await;
    let mut raw = sluice.raw().await;
    raw.send(&startup_version(
        (3 << 16) | 2,
        &[("user", "trusted"), ("database", "appdb")],
    ))
    .await
    .expect("send");
    let msgs = raw.recv_until_ready().await.expect("login");
    let v = msgs
        .iter()
        .find(|m| m.tag == b'v')
        .unwrap_or_else(|| panic!("NegotiateProtocolVersion expected: {msgs:?}"));
    let minor = i32::from_be_bytes(v.body[..4].try_into().expect("4 bytes"));
    assert_eq!(minor, 0, "newest minor version supported");
    assert!(msgs.iter().any(|m| m.auth_code() == Some(0)));
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert_eq!(
        raw.simple_rows("select 32").await.expect("query"),
        vec![vec![Some("32".to_owned())]]
    );
    assert_serves(&sluice).await;
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_message_after_login_is_refused() {
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(PgCluster::shared())
            .pool_size(1)
            .set_str("max_packet_size", "1KiB"),
    )
    .await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&0x7fff_0000i32.to_be_bytes());
    msg.extend_from_slice(b"select 1");
    raw.send(&msg).await.expect("send");
    let seen = raw.expect_closed(SETTLE).await.expect("closed");
    assert!(
        seen.iter().any(|m: &BackendMessage| m.tag == b'E'),
        "an ErrorResponse explains the refusal: {seen:?}"
    );
    // A query just over the limit is refused too, one under it works.
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    let ok = format!("select '{}'", "y".repeat(500));
    assert_eq!(raw.simple_rows(&ok).await.expect("small query").len(), 1);
    raw.query(&format!("select '{}'", "z".repeat(2000)))
        .await
        .expect("send");
    let seen = raw.expect_closed(SETTLE).await.expect("closed");
    assert!(seen.iter().any(|m| m.tag == b'E'), "{seen:?}");
    assert_serves(&sluice).await;
    sluice.shutdown().await;
}
