//! `[client_auth]`: clients authenticate to the sidecar as to a Redis with
//! `requirepass` (and ACL users); the sidecar uses the upstream URL's own
//! credentials. The same script to a real Redis with that password and to
//! the sidecar gets the same replies.
#![allow(clippy::unwrap_used)]

mod support;

use redis_sidecar::config::{ClientAuthConfig, ClientUser};
use support::*;

fn script() -> Vec<Vec<&'static [u8]>> {
    vec![
        vec![b"PING"],
        vec![b"GET", b"k"],
        vec![b"MULTI"],
        vec![b"HELLO", b"3"],
        vec![b"AUTH", b"x"],
        vec![b"AUTH", b"default", b"x"],
        vec![b"AUTH", b"nouser", b"x"],
        vec![b"AUTH", b"app", b"wrong"],
        vec![b"AUTH", b"pw"],
        vec![b"SET", b"k", b"v"],
        vec![b"GET", b"k"],
        vec![b"AUTH", b"a", b"b", b"c"],
        vec![b"RESET"],
        vec![b"GET", b"k"],
        vec![b"HELLO", b"3", b"AUTH", b"app", b"wrong"],
        vec![b"HELLO", b"3", b"AUTH", b"app", b"apppw"],
        vec![b"GET", b"k"],
        vec![b"HGETALL", b"nokey"],
        vec![b"RESET"],
        vec![b"AUTH", b"app", b"apppw"],
        vec![b"MULTI"],
        vec![b"AUTH", b"pw"],
        vec![b"GET", b"k"],
        vec![b"EXEC"],
    ]
}

async fn run(addr: std::net::SocketAddr) -> Vec<String> {
    let mut c = Raw::connect(addr).await;
    let mut out = Vec::new();
    for cmd in script() {
        let r = c.call(&cmd).await;
        out.push(String::from_utf8_lossy(&normalize_hello_id(&r)).into_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_authenticate_to_the_sidecar_as_to_redis() {
    let direct = RedisServer::start_with(&["--requirepass", "pw"]);
    let mut d = redis::Client::open(direct.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", ">apppw", "~*", "&*", "+@all"])
        .query_async(&mut d)
        .await
        .unwrap();
    // The sidecar's upstream has another password, in the URL: a client's
    // credentials that reached it would be refused there.
    let behind = RedisServer::start_with(&["--requirepass", "urlpw"]);
    let mut cfg = config(&behind.url());
    cfg.client_auth = ClientAuthConfig {
        password: Some("pw".into()),
        password_file: None,
        users: vec![ClientUser {
            name: "app".into(),
            password: Some("apppw".into()),
            password_file: None,
        }],
    };
    let s = sidecar_with(cfg, Default::default()).await;
    let want = run(std::net::SocketAddr::from(([127, 0, 0, 1], direct.port))).await;
    let got = run(s.addr).await;
    let script = script();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(
            g,
            w,
            "reply {i} to {:?}",
            String::from_utf8_lossy(&script[i].concat())
        );
    }
    // A command the table does not know is not sent upstream either
    // (Redis would say "unknown command"; nothing unauthenticated goes
    // out with the URL's credentials).
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(
        &c.call(&[b"NOSUCHCOMMAND", b"x"]).await[..],
        b"-NOAUTH Authentication required.\r\n"
    );
    // CLIENT LIST shows the sidecar user.
    assert_eq!(&c.call(&[b"AUTH", b"app", b"apppw"]).await[..], b"+OK\r\n");
    let info = c.call(&[b"CLIENT", b"INFO"]).await;
    assert!(
        String::from_utf8_lossy(&info).contains(" user=app "),
        "{info:?}"
    );
}

#[test]
fn bad_client_auth_settings_are_config_errors() {
    let mut cfg = config("redis://127.0.0.1:1");
    cfg.client_auth = ClientAuthConfig {
        password: Some("a".into()),
        password_file: Some("/nonexistent/file".into()),
        users: vec![ClientUser {
            name: "u".into(),
            password: None,
            password_file: Some("/nonexistent/file".into()),
        }],
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("client_auth: set password or password_file, not both"),
        "{e}"
    );
    assert!(
        e.contains("client_auth.users[0]: cannot read password_file"),
        "{e}"
    );
    assert!(!e.contains("/nonexistent/file\""), "{e}");
}

/// `[access]` lists per user: the user a client authenticated to the
/// sidecar as gets its own lists instead of everyone's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lists_per_user() {
    use redis_sidecar::config::AccessUser;
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    let user = |name: &str, pw: &str| ClientUser {
        name: name.into(),
        password: Some(pw.into()),
        password_file: None,
    };
    cfg.client_auth = ClientAuthConfig {
        password: Some("pw".into()),
        password_file: None,
        users: vec![user("app", "apppw"), user("ops", "opspw")],
    };
    cfg.access.deny = vec!["KEYS".into(), "@dangerous".into()];
    cfg.access.users = vec![AccessUser {
        name: "ops".into(),
        deny: vec![],
        allow: vec!["@all".into()],
    }];
    let s = sidecar_with(cfg, Default::default()).await;
    let mut app = Raw::connect(s.addr).await;
    assert_eq!(
        &app.call(&[b"AUTH", b"app", b"apppw"]).await[..],
        b"+OK\r\n"
    );
    assert!(app.call(&[b"KEYS", b"*"]).await.starts_with(b"-NOPERM"));
    assert!(app.call(&[b"FLUSHALL"]).await.starts_with(b"-NOPERM"));
    assert_eq!(&app.call(&[b"SET", b"k", b"v"]).await[..], b"+OK\r\n");
    let mut ops = Raw::connect(s.addr).await;
    assert_eq!(
        &ops.call(&[b"AUTH", b"ops", b"opspw"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&ops.call(&[b"KEYS", b"k"]).await[..], b"*1\r\n$1\r\nk\r\n");
    // The default user has no list of its own: everyone's.
    let mut def = Raw::connect(s.addr).await;
    assert_eq!(&def.call(&[b"AUTH", b"pw"]).await[..], b"+OK\r\n");
    assert!(def.call(&[b"KEYS", b"*"]).await.starts_with(b"-NOPERM"));
}

/// What the README says of deny lists and scripts: `[access] deny` does
/// not reach inside a script (EVAL runs a denied FLUSHALL), denying
/// `@scripting` closes that, and an upstream ACL user without the
/// commands makes Redis refuse them inside scripts too.
#[tokio::test]
async fn deny_lists_and_scripts_as_the_readme_says() {
    let redis = RedisServer::start();
    let mut d = redis.direct().await;
    let flush_script: &[&[u8]] = &[b"EVAL", b"return redis.call('FLUSHALL')", b"0"];
    // A deny list alone: the script runs the denied command.
    let mut cfg = config(&redis.url());
    cfg.access.deny = vec!["KEYS".into(), "FLUSHALL".into()];
    let s = sidecar_with(cfg, Default::default()).await;
    let _: () = redis::AsyncCommands::set(&mut d, "kept", "1")
        .await
        .unwrap();
    let mut c = Raw::connect(s.addr).await;
    assert!(c.call(&[b"FLUSHALL"]).await.starts_with(b"-NOPERM"));
    assert_eq!(&c.call(flush_script).await[..], b"+OK\r\n");
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut d).await.unwrap();
    assert_eq!(n, 0, "the documented gap: a script ran the denied FLUSHALL");
    s.shutdown().await;
    // Denying @scripting too closes it.
    let mut cfg = config(&redis.url());
    cfg.access.deny = vec!["KEYS".into(), "FLUSHALL".into(), "@scripting".into()];
    let s = sidecar_with(cfg, Default::default()).await;
    let mut c = Raw::connect(s.addr).await;
    assert!(c.call(flush_script).await.starts_with(b"-NOPERM"));
    s.shutdown().await;
    // The upstream's ACL user: Redis refuses the command inside the script.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "sidecar",
            "on",
            ">app-pw",
            "~*",
            "&*",
            "+@all",
            "-keys",
            "-flushall",
            "-flushdb",
        ])
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::AsyncCommands::set(&mut d, "kept", "1")
        .await
        .unwrap();
    let url = format!("redis://sidecar:app-pw@127.0.0.1:{}", redis.port);
    let s = sidecar_with(config(&url), Default::default()).await;
    let mut c = Raw::connect(s.addr).await;
    let r = c.call(flush_script).await;
    assert!(
        r.starts_with(b"-ERR The user executing the script can't run this command"),
        "{r:?}"
    );
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut d).await.unwrap();
    assert_eq!(n, 1, "Redis refused FLUSHALL inside the script");
    s.shutdown().await;
}
