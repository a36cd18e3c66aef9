//! Codec micro-benchmarks: decoding and encoding the messages on the hot path.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice_wire::backend::{self, TransactionStatus};
use sluice_wire::frontend::{self, FrontendMessage};

fn extended_batch() -> BytesMut {
    let mut b = BytesMut::new();
    for m in [
        FrontendMessage::Parse {
            name: Bytes::from_static(b"s1"),
            query: Bytes::from_static(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
            param_types: vec![23],
        },
        FrontendMessage::Bind {
            portal: Bytes::new(),
            statement: Bytes::from_static(b"s1"),
            rest: Bytes::from_static(&[0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 42, 0, 0]),
        },
        FrontendMessage::Describe {
            kind: b'P',
            name: Bytes::new(),
        },
        FrontendMessage::Execute {
            portal: Bytes::new(),
            max_rows: 0,
        },
        FrontendMessage::Sync,
    ] {
        m.encode(&mut b);
    }
    b
}

fn bench(c: &mut Criterion) {
    let batch = extended_batch();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(5));
    g.bench_function("decode extended batch (5 messages)", |b| {
        b.iter(|| {
            let mut buf = batch.clone();
            let mut n = 0;
            while let Ok(Some(m)) = FrontendMessage::decode(&mut buf, 1 << 20) {
                black_box(&m);
                n += 1;
            }
            assert_eq!(n, 5);
        })
    });
    g.bench_function("peek headers of extended batch", |b| {
        b.iter(|| {
            let mut at = 0;
            while let Ok(Some(h)) = frontend::peek_header(&batch[at..]) {
                at += h.total_len();
            }
            black_box(at)
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode DataRow + CommandComplete + ReadyForQuery", |b| {
        let mut out = BytesMut::with_capacity(256);
        b.iter(|| {
            out.clear();
            backend::encode_data_row(&mut out, &[Some(b"12345"), None, Some(b"hello")]);
            backend::encode_command_complete(&mut out, "SELECT 1");
            backend::encode_ready_for_query(&mut out, TransactionStatus::Idle);
            black_box(out.len())
        })
    });
    // Every simple query is checked for session state it may leave; an ordinary one must not
    // be lexed.
    g.bench_function("session-state scan of pgbench's select", |b| {
        let sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";
        b.iter(|| black_box(sluice_wire::sql::leaves_session_state(black_box(sql))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
