//! Framing and classification micro-benchmarks.
//!
//! `cargo bench --bench framing`. The 4 MiB MSET fed in 16 KiB reads shows
//! the resumable scanner is linear; redis-protocol's `decode_range`, which
//! re-parses a partial frame from the start on every read, is shown on a
//! 512 KiB MSET for comparison (at 4 MiB it takes seconds per iteration).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redis_sidecar::request::command::{Table, classify};
use redis_sidecar::wire::{Limits, ReplyScanner, RequestScanner, encode_command};

fn mset(bytes: usize) -> Bytes {
    let mut args: Vec<Vec<u8>> = vec![b"MSET".to_vec()];
    let mut total = 0;
    let mut i = 0u64;
    while total < bytes {
        args.push(format!("key:{i}").into_bytes());
        args.push(b"value-0123456789".to_vec());
        total += 40;
        i += 1;
    }
    encode_command(&args)
}

fn scan_in_chunks(frame: &Bytes, chunk: usize) -> usize {
    let mut s = RequestScanner::new(Limits::default());
    let mut buf = BytesMut::new();
    for piece in frame.chunks(chunk) {
        buf.extend_from_slice(piece);
        if let Some(r) = s.next(&mut buf).unwrap() {
            return r.args.len();
        }
    }
    0
}

fn decode_range_in_chunks(frame: &Bytes, chunk: usize) -> usize {
    let mut buf = BytesMut::new();
    for piece in frame.chunks(chunk) {
        buf.extend_from_slice(piece);
        if let Some((_, n)) = redis_protocol::resp2::decode::decode_range(&buf).unwrap() {
            return n;
        }
    }
    0
}

fn bench(c: &mut Criterion) {
    let big = mset(4 << 20);
    let mut g = c.benchmark_group("mset_4mib_16kib_reads");
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("resumable_scanner", |b| {
        b.iter(|| black_box(scan_in_chunks(&big, 16 * 1024)))
    });
    g.finish();

    let mid = mset(512 << 10);
    let mut g = c.benchmark_group("mset_512kib_16kib_reads");
    g.throughput(Throughput::Bytes(mid.len() as u64));
    g.sample_size(10);
    g.bench_function("resumable_scanner", |b| {
        b.iter(|| black_box(scan_in_chunks(&mid, 16 * 1024)))
    });
    g.bench_function("redis_protocol_decode_range", |b| {
        b.iter(|| black_box(decode_range_in_chunks(&mid, 16 * 1024)))
    });
    g.finish();

    // 10k pipelined GETs in one buffer.
    let mut pipeline = BytesMut::new();
    for i in 0..10_000 {
        pipeline.extend_from_slice(&encode_command(&[
            &b"GET"[..],
            format!("key:{i}").as_bytes(),
        ]));
    }
    let pipeline = pipeline.freeze();
    let mut g = c.benchmark_group("pipeline_10k_get");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("request_scanner", |b| {
        b.iter(|| {
            let mut s = RequestScanner::new(Limits::default());
            let mut buf = BytesMut::from(&pipeline[..]);
            let mut n = 0;
            while let Some(r) = s.next(&mut buf).unwrap() {
                n += r.args.len();
            }
            black_box(n)
        })
    });
    let mut replies = BytesMut::new();
    for i in 0..10_000 {
        replies.extend_from_slice(format!("$7\r\nval{i:04}\r\n").as_bytes());
    }
    let replies = replies.freeze();
    g.bench_function("reply_scanner", |b| {
        b.iter(|| {
            let mut s = ReplyScanner::new(512 << 20);
            let mut buf = BytesMut::from(&replies[..]);
            let mut n = 0;
            while let Some(f) = s.next(&mut buf).unwrap() {
                n += f.len();
            }
            black_box(n)
        })
    });
    let table = Table::builtin();
    let args: Vec<Bytes> = vec![Bytes::from_static(b"GET"), Bytes::from_static(b"key:1")];
    g.bench_function("classify_and_keys_x10k", |b| {
        b.iter(|| {
            let mut n = 0;
            for _ in 0..10_000 {
                let info = table.lookup(&args);
                let _ = black_box(classify(&args, info.map(|i| i.as_ref())));
                n += info.map(|i| i.keys(&args).len()).unwrap_or(0);
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
