//! Property tests of the resumable scanners, with redis-protocol as the
//! oracle: random RESP3 replies and random commands, cut at random points,
//! must yield exactly the frames the oracle decodes; random bytes must
//! never panic.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use redis_protocol::resp3::types::{BytesFrame, FrameMap, VerbatimStringFormat};
use redis_sidecar::wire::{Limits, ReplyScanner, RequestScanner, encode_command};

fn leaf() -> impl Strategy<Value = BytesFrame> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|d| BytesFrame::BlobString {
            data: Bytes::from(d),
            attributes: None
        }),
        "[a-zA-Z0-9 ]{0,20}".prop_map(|s| BytesFrame::SimpleString {
            data: Bytes::from(s),
            attributes: None
        }),
        "[A-Z]{1,8} [a-z ]{0,20}".prop_map(|s| BytesFrame::SimpleError {
            data: s.into(),
            attributes: None
        }),
        any::<i64>().prop_map(|n| BytesFrame::Number {
            data: n,
            attributes: None
        }),
        any::<bool>().prop_map(|b| BytesFrame::Boolean {
            data: b,
            attributes: None
        }),
        (-1e9f64..1e9).prop_map(|d| BytesFrame::Double {
            data: d,
            attributes: None
        }),
        "[0-9]{20,40}".prop_map(|s| BytesFrame::BigNumber {
            data: Bytes::from(s),
            attributes: None
        }),
        "[a-z]{0,20}".prop_map(|s| BytesFrame::VerbatimString {
            data: Bytes::from(s),
            format: VerbatimStringFormat::Text,
            attributes: None
        }),
        Just(BytesFrame::Null),
    ]
}

fn frame() -> impl Strategy<Value = BytesFrame> {
    leaf().prop_recursive(3, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(|data| BytesFrame::Array {
                data,
                attributes: None
            }),
            proptest::collection::vec(inner.clone(), 1..6).prop_map(|data| BytesFrame::Push {
                data,
                attributes: None
            }),
            proptest::collection::vec(("[a-z]{1,6}", inner.clone()), 0..4).prop_map(|kv| {
                let mut m = FrameMap::new();
                for (k, v) in kv {
                    m.insert(
                        BytesFrame::SimpleString {
                            data: Bytes::from(k),
                            attributes: None,
                        },
                        v,
                    );
                }
                BytesFrame::Map {
                    data: m,
                    attributes: None,
                }
            }),
            ("[a-z]{1,6}", inner.clone()).prop_map(|(k, v)| {
                // A value annotated with an attribute.
                let mut attrs = FrameMap::new();
                attrs.insert(
                    BytesFrame::SimpleString {
                        data: Bytes::from(k),
                        attributes: None,
                    },
                    BytesFrame::Number {
                        data: 1,
                        attributes: None,
                    },
                );
                let mut v = v;
                if let BytesFrame::Array { attributes, .. } = &mut v {
                    *attributes = Some(attrs);
                }
                v
            }),
        ]
    })
}

fn encode(f: &BytesFrame) -> Vec<u8> {
    let mut out = BytesMut::new();
    redis_protocol::resp3::encode::complete::extend_encode(&mut out, f, false).unwrap();
    out.to_vec()
}

/// Feed `all` into a buffer in pieces of the sizes in `cuts` (cycled),
/// calling `drain` after each; returns the bytes left unconsumed.
fn feed_in_pieces(all: &[u8], cuts: &[usize], mut drain: impl FnMut(&mut BytesMut)) -> usize {
    let mut buf = BytesMut::new();
    let mut pos = 0;
    for &cut in cuts.iter().cycle() {
        if pos >= all.len() {
            break;
        }
        let n = cut.min(all.len() - pos);
        buf.extend_from_slice(&all[pos..pos + n]);
        pos += n;
        drain(&mut buf);
    }
    buf.len()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn reply_scanner_matches_oracle(frames in proptest::collection::vec(frame(), 1..8), cuts in proptest::collection::vec(1usize..64, 1..40)) {
        let encoded: Vec<Vec<u8>> = frames.iter().map(encode).collect();
        let all: Vec<u8> = encoded.concat();
        // The oracle's boundaries.
        let mut oracle = Vec::new();
        let mut rest = &all[..];
        while !rest.is_empty() {
            let (_, n) = redis_protocol::resp3::decode::complete::decode(rest).unwrap().unwrap();
            oracle.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        // Ours, fed in random pieces.
        let mut s = ReplyScanner::new(1 << 20);
        let mut got = Vec::new();
        let rest = feed_in_pieces(&all, &cuts, |buf| {
            while let Some(f) = s.next(buf).unwrap() {
                got.push(f.to_vec());
            }
        });
        prop_assert_eq!(rest, 0);
        prop_assert_eq!(got, oracle);
    }

    #[test]
    fn request_scanner_roundtrip(cmds in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 1..6), 1..10), cuts in proptest::collection::vec(1usize..100, 1..20)) {
        let all: Vec<u8> = cmds.iter().flat_map(|c| encode_command(c).to_vec()).collect();
        let mut s = RequestScanner::new(Limits::default());
        let mut got: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut raws = Vec::new();
        let rest = feed_in_pieces(&all, &cuts, |buf| {
            while let Some(r) = s.next(buf).unwrap() {
                got.push(r.args.iter().map(|a| a.to_vec()).collect());
                raws.push(r.raw.to_vec());
            }
        });
        prop_assert_eq!(rest, 0);
        prop_assert_eq!(&got, &cmds);
        // The forwarded bytes are exactly the bytes that arrived.
        prop_assert_eq!(raws.concat(), all);
        // And the oracle agrees on the first frame.
        let (_, n) = redis_protocol::resp2::decode::decode(&encode_command(&cmds[0])).unwrap().unwrap();
        prop_assert_eq!(n, encode_command(&cmds[0]).len());
    }

    #[test]
    fn scanners_never_panic_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut s = RequestScanner::new(Limits { max_bulk: 1000, max_array: 100, max_inline: 200, max_request: 1 << 20 });
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = s.next(&mut buf) {}
        let mut r = ReplyScanner::new(1000);
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = r.next(&mut buf) {}
    }
}
