//! The command table learned from a real Redis: key extraction and write
//! flags checked against Redis's own `COMMAND GETKEYSANDFLAGS` over a corpus.
#![allow(clippy::unwrap_used)]

mod support;

use bytes::Bytes;
use redis_sidecar::request::command::{Class, Pin, classify};
use support::*;

const CORPUS: &[&str] = &[
    "GET k",
    "SET k v EX 10",
    "MSET a 1 b 2 c 3",
    "MGET a b c",
    "DEL a b",
    "EVAL s 2 k1 k2 a1",
    "EVALSHA abc 1 k1 a1",
    "FCALL f 1 k1 a",
    "XREAD COUNT 2 STREAMS s1 s2 0 0",
    "XREADGROUP GROUP g c STREAMS s1 >",
    "ZUNIONSTORE d 2 a b",
    "BLMOVE src dst LEFT RIGHT 0",
    "BLPOP q1 q2 0",
    "RENAME a b",
    "COPY a b",
    "HSET h f v",
    "LPUSH l x",
    "OBJECT ENCODING k",
    "XADD s * f v",
    "GEOADD g 1 2 m",
    "SINTERSTORE d a b",
    "LMPOP 2 a b LEFT",
    "BITOP AND d a b",
    "PFMERGE d a b",
    "GETEX k PX 100",
    "SMOVE a b m",
    "RESTORE k 0 payload",
    "EXPIRE k 10",
    "PERSIST k",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_key_specs_match_redis_getkeysandflags() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let n = s.pool.learn_commands().await.unwrap();
    assert!(n > 200, "{n} commands learned");
    let table = s.pool.table();
    assert!(table.learned);
    let mut con = redis.direct().await;
    for line in CORPUS {
        let args: Vec<Bytes> = line
            .split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let info = table
            .lookup(&args)
            .unwrap_or_else(|| panic!("{line}: not in the table"));
        let ours: Vec<(String, bool)> = info
            .keys(&args)
            .into_iter()
            .map(|k| (String::from_utf8_lossy(&args[k.index]).to_string(), k.write))
            .collect();
        let mut cmd = redis::cmd("COMMAND");
        cmd.arg("GETKEYSANDFLAGS");
        for a in &args {
            cmd.arg(&a[..]);
        }
        let theirs: Vec<(String, Vec<String>)> = cmd.query_async(&mut con).await.unwrap();
        let theirs: Vec<(String, bool)> = theirs
            .into_iter()
            .map(|(k, flags)| {
                let write = flags.iter().any(|f| f == "RW" || f == "OW" || f == "RM");
                (k, write)
            })
            .collect();
        assert_eq!(ours, theirs, "{line}");
    }
    // ACL categories, for rules written as `@write`, `@read`...
    let get = table.lookup(&[Bytes::from_static(b"get")]).unwrap();
    assert!(
        get.acl_categories.iter().any(|c| c == "read"),
        "{:?}",
        get.acl_categories
    );
    assert!(
        get.acl_categories.iter().any(|c| c == "string"),
        "{:?}",
        get.acl_categories
    );
    let set = table.lookup(&[Bytes::from_static(b"SET")]).unwrap();
    assert!(set.acl_categories.iter().any(|c| c == "write"));
    assert!(set.flags.write && !set.flags.readonly);
    // Blocking flags come from the learned table too (BLMPOP is not in the
    // built-in fallback).
    let args: Vec<Bytes> = "BLMPOP 0 1 q LEFT"
        .split(' ')
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect();
    assert_eq!(
        classify(&args, table.lookup(&args).map(|i| i.as_ref())),
        Class::Pin(Pin::Blocking)
    );
}
