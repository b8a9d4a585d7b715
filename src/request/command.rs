//! The command table: for each command its flags, its keys (which are
//! written) and what connection state it touches.
//!
//! The table is learned from the upstream's `COMMAND` reply (key specs,
//! flags, ACL categories) when the sidecar first
//! reaches it, so new Redis commands work without a code change. Until then,
//! and for upstreams that refuse `COMMAND`, the built-in table is Redis
//! 7.0's own `COMMAND` reply (`builtin-commands.resp`). Commands in neither table are still forwarded: Redis
//! answers unknown commands and wrong arity with its own errors.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;

use crate::metrics::CommandMetrics;
use crate::wire::scan::parse_int;

/// Command flags we act on (a subset of Redis's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub write: bool,
    pub readonly: bool,
    pub blocking: bool,
    pub pubsub: bool,
    pub admin: bool,
}

/// Where a key spec's search begins.
#[derive(Clone, Debug, PartialEq)]
enum Begin {
    Index(usize),
    Keyword { keyword: Bytes, startfrom: i64 },
    Unknown,
}

/// How a key spec finds its keys from the beginning.
#[derive(Clone, Debug, PartialEq)]
enum Find {
    Range {
        lastkey: i64,
        step: usize,
        limit: usize,
    },
    Keynum {
        keynumidx: usize,
        firstkey: usize,
        step: usize,
    },
    Unknown,
}

/// One Redis 7 key spec.
#[derive(Clone, Debug, PartialEq)]
struct KeySpec {
    begin: Begin,
    find: Find,
    /// RW, OW or RM: the key is written (or removed).
    write: bool,
    /// OW, or RW with INSERT or UPDATE: the command may leave the key
    /// holding what it wrote (not a key it only deletes or pops from).
    stores: bool,
}

/// One entry of the table.
#[derive(Clone, Debug)]
pub struct CommandInfo {
    /// Lower-case name, `container|sub` for subcommands.
    pub name: String,
    pub arity: i64,
    pub flags: Flags,
    /// ACL categories without the `@` (`read`, `string`, ...), from the
    /// upstream's COMMAND or the built-in table.
    pub acl_categories: Vec<String>,
    key_specs: Vec<KeySpec>,
    /// This command's metric handles, resolved on first use (one atomic
    /// load per request after that).
    pub metrics: OnceLock<Arc<CommandMetrics>>,
    /// The name's interned id ([`interned`]): what a client's last command
    /// is recorded as (one atomic store per command).
    pub id: u32,
}

/// Command names seen in any table, each stored once for the life of the
/// process (bounded: they come from the upstream's command table).
static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

/// The id of a command name, interning it on first sight.
pub fn intern(name: &str) -> u32 {
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(i) = names.iter().position(|n| *n == name) {
        return i as u32;
    }
    names.push(Box::leak(name.to_string().into_boxed_str()));
    (names.len() - 1) as u32
}

/// The name of an interned id.
pub fn interned(id: u32) -> Option<&'static str> {
    NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(id as usize)
        .copied()
}

/// A key argument of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRef {
    /// Index into the command's arguments (0 is the name).
    pub index: usize,
    pub write: bool,
    /// The command may leave the key holding what it wrote (see
    /// `KeySpec::stores`): the keys TTL policies apply to.
    pub stores: bool,
}

impl CommandInfo {
    /// Some key spec says the command may leave a key holding what it
    /// wrote (EVAL's declared keys too, though EVAL is not flagged write).
    pub fn may_store(&self) -> bool {
        self.key_specs.iter().any(|s| s.stores)
    }

    /// Keys of this invocation, from key specs. Specs Redis itself marks
    /// unknown yield nothing here (MIGRATE KEYS; SORT's BY/GET patterns
    /// are not keys), except SORT's STORE destination, found by reading
    /// SORT's options as Redis does.
    pub fn keys(&self, args: &[Bytes]) -> Vec<KeyRef> {
        let mut out = Vec::new();
        self.each_key(args, |k| out.push(k));
        out
    }

    /// [`CommandInfo::keys`] one by one, with no list built (for stages
    /// that look at every command's keys).
    pub fn each_key(&self, args: &[Bytes], mut out: impl FnMut(KeyRef)) {
        let argc = args.len();
        if self.name == "sort"
            && let Some(index) = sort_store(args)
        {
            out(KeyRef {
                index,
                write: true,
                stores: true,
            });
        }
        for spec in &self.key_specs {
            let first = match &spec.begin {
                Begin::Index(i) => *i,
                Begin::Keyword { keyword, startfrom } => {
                    let found = if *startfrom >= 0 {
                        (*startfrom as usize..argc).find(|&i| args[i].eq_ignore_ascii_case(keyword))
                    } else {
                        let start = argc as i64 + startfrom;
                        (1..=start.max(0) as usize)
                            .rev()
                            .find(|&i| i < argc && args[i].eq_ignore_ascii_case(keyword))
                    };
                    match found {
                        Some(i) => i + 1,
                        None => continue,
                    }
                }
                Begin::Unknown => continue,
            };
            if first >= argc || first == 0 {
                continue;
            }
            let (start, last, step) = match &spec.find {
                Find::Range {
                    lastkey,
                    step,
                    limit,
                } => {
                    let last = if *lastkey >= 0 {
                        first as i64 + lastkey
                    } else if *limit <= 1 {
                        argc as i64 + lastkey
                    } else {
                        first as i64 + ((argc - first) / limit) as i64 + lastkey
                    };
                    (first, last, (*step).max(1))
                }
                Find::Keynum {
                    keynumidx,
                    firstkey,
                    step,
                } => {
                    let Some(n) = args.get(first + keynumidx).and_then(|a| parse_int(a)) else {
                        continue;
                    };
                    let start = first + firstkey;
                    let step = (*step).max(1);
                    (start, start as i64 + (n - 1) * step as i64, step)
                }
                Find::Unknown => continue,
            };
            let mut i = start as i64;
            while i <= last && (i as usize) < argc {
                out(KeyRef {
                    index: i as usize,
                    write: spec.write,
                    stores: spec.stores,
                });
                i += step as i64;
            }
        }
    }
}

/// Whether `name` (lower case; `container|sub` for a subcommand) is a
/// command of Redis 7's built-in table; `Err` with the nearest known name
/// when one is close (a misspelt `flushal`), for configuration lists: a
/// deny list with a typo would otherwise deny nothing.
pub fn check_name(name: &str) -> Result<(), Option<&'static str>> {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let t = Table::builtin_shared();
        let mut v: Vec<&'static str> = t
            .index
            .keys()
            .filter_map(|n| std::str::from_utf8(n).ok())
            .map(|n| &*Box::leak(n.to_string().into_boxed_str()))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    });
    if names.binary_search(&name).is_ok() {
        return Ok(());
    }
    // The closest name within a third of the length (at least 1 edit).
    let limit = (name.len() / 3).max(1);
    let best = names
        .iter()
        .map(|n| (edit_distance(name, n), *n))
        .filter(|(d, _)| *d <= limit)
        .min();
    Err(best.map(|(_, n)| n))
}

/// Levenshtein distance of two short ASCII names.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The index of `SORT key [BY p] [LIMIT o c] [GET p ...] [ASC|DESC]
/// [ALPHA] [STORE dst]`'s destination: options read as Redis's
/// `sortCommand` does (LIMIT takes two arguments, BY, GET and STORE one);
/// the last STORE wins, as in Redis. `None` without STORE, or when the
/// options do not parse (Redis answers a syntax error).
fn sort_store(args: &[Bytes]) -> Option<usize> {
    let mut store = None;
    let mut i = 2;
    while i < args.len() {
        let a = &args[i];
        let is = |o: &[u8]| a.eq_ignore_ascii_case(o);
        let takes = if is(b"ASC") || is(b"DESC") || is(b"ALPHA") {
            0
        } else if is(b"LIMIT") {
            2
        } else if is(b"BY") || is(b"GET") {
            1
        } else if is(b"STORE") {
            store = Some(i + 1);
            1
        } else {
            return None;
        };
        if i + takes >= args.len() {
            return None;
        }
        i += takes + 1;
    }
    store
}

/// Why a command needs a dedicated upstream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// MULTI: pinned until EXEC or DISCARD.
    Multi,
    /// WATCH: pinned until EXEC, DISCARD or UNWATCH.
    Watch,
    /// Ends MULTI/WATCH state (EXEC, DISCARD, UNWATCH).
    EndTransaction,
    /// A command that may block: pinned for this command.
    Blocking,
    /// SUBSCRIBE family, MONITOR, CLIENT REPLY: the connection becomes a
    /// stream; the client stays on it for the rest of its life.
    Stream,
    /// CLIENT TRACKING and other per-connection state Redis keeps: the
    /// client stays pinned for the rest of its life.
    Sticky,
    /// SYNC/PSYNC: the client becomes a replica; its connection then
    /// carries an RDB payload and the command stream, not RESP replies.
    Replica,
}

/// How the session must treat a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Stateless: any shared connection with the client's (proto, db, user).
    Forward,
    /// Needs (or ends) a dedicated connection.
    Pin(Pin),
    /// Connection state the sidecar answers itself.
    Local(Local),
}

/// Commands the session answers itself because they change connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Hello,
    Select,
    Auth,
    Reset,
    Quit,
    ClientId,
    ClientSetName,
    ClientGetName,
    ClientSetInfo,
    ClientList,
    ClientInfo,
    ClientKill,
    ClientUnblock,
    /// UNSUBSCRIBE, PUNSUBSCRIBE, SUNSUBSCRIBE from a client that is not
    /// subscribed (a subscribed one streams them upstream).
    Unsubscribe,
}

impl Local {
    /// The CLIENT subcommands answered from the sidecar's own client
    /// registry (not CLIENT SETNAME, which changes state).
    pub fn about_clients(self) -> bool {
        matches!(
            self,
            Local::ClientId
                | Local::ClientGetName
                | Local::ClientList
                | Local::ClientInfo
                | Local::ClientSetInfo
                | Local::ClientKill
                | Local::ClientUnblock
        )
    }
}

/// Classify a command by its arguments (`args[0]` is the name).
pub fn classify(args: &[Bytes], info: Option<&CommandInfo>) -> Class {
    let Some(name) = args.first() else {
        return Class::Forward;
    };
    let mut lower = [0u8; 24];
    if name.len() > lower.len() {
        return Class::Forward;
    }
    let lower = &mut lower[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    let sub = |i: usize| args.get(i).map(|a| a.to_ascii_lowercase());
    match &lower[..] {
        b"hello" => Class::Local(Local::Hello),
        b"select" => Class::Local(Local::Select),
        b"auth" => Class::Local(Local::Auth),
        b"reset" => Class::Local(Local::Reset),
        b"quit" => Class::Local(Local::Quit),
        b"multi" => Class::Pin(Pin::Multi),
        b"watch" => Class::Pin(Pin::Watch),
        b"exec" | b"discard" | b"unwatch" => Class::Pin(Pin::EndTransaction),
        b"subscribe" | b"psubscribe" | b"ssubscribe" | b"monitor" => Class::Pin(Pin::Stream),
        b"sync" | b"psync" => Class::Pin(Pin::Replica),
        // Several replies (one per channel) to one command: never on a
        // shared connection, whose replies are matched one per command.
        b"unsubscribe" | b"punsubscribe" | b"sunsubscribe" => Class::Local(Local::Unsubscribe),
        // Replica handshake state is per connection: the SYNC that follows
        // must find it.
        b"replconf" => Class::Pin(Pin::Sticky),
        // Blocking whatever table is in use (the built-in one lacks some,
        // and a table may not be learned yet): one of these on a shared
        // connection would hold it for every client.
        b"wait" | b"waitaof" | b"blpop" | b"brpop" | b"brpoplpush" | b"blmove" | b"blmpop"
        | b"bzpopmin" | b"bzpopmax" | b"bzmpop" => Class::Pin(Pin::Blocking),
        b"xread" | b"xreadgroup" => {
            // Flagged blocking by Redis, but only BLOCK makes them block.
            let blocks = args
                .iter()
                .skip(1)
                .take_while(|a| !a.eq_ignore_ascii_case(b"streams"));
            if blocks.clone().any(|a| a.eq_ignore_ascii_case(b"block")) {
                Class::Pin(Pin::Blocking)
            } else {
                Class::Forward
            }
        }
        b"client" => match sub(1).as_deref() {
            Some(b"id") => Class::Local(Local::ClientId),
            Some(b"setname") => Class::Local(Local::ClientSetName),
            Some(b"getname") => Class::Local(Local::ClientGetName),
            Some(b"setinfo") => Class::Local(Local::ClientSetInfo),
            Some(b"list") => Class::Local(Local::ClientList),
            Some(b"info") => Class::Local(Local::ClientInfo),
            Some(b"kill") => Class::Local(Local::ClientKill),
            Some(b"unblock") => Class::Local(Local::ClientUnblock),
            Some(b"reply") => Class::Pin(Pin::Stream),
            Some(b"tracking") | Some(b"caching") | Some(b"no-evict") | Some(b"no-touch") => {
                Class::Pin(Pin::Sticky)
            }
            _ => Class::Forward,
        },
        _ => match info {
            Some(i) if i.flags.blocking => Class::Pin(Pin::Blocking),
            _ => Class::Forward,
        },
    }
}

/// Write commands that only delete or pop, for tables without Redis 7 key
/// spec flags (the built-in one, Redis 6).
const DELETE_ONLY: &[&str] = &[
    "del",
    "unlink",
    "getdel",
    "lpop",
    "rpop",
    "spop",
    "srem",
    "hdel",
    "lrem",
    "ltrim",
    "zrem",
    "zpopmin",
    "zpopmax",
    "zremrangebyscore",
    "zremrangebyrank",
    "zremrangebylex",
    "xdel",
    "xtrim",
    "blpop",
    "brpop",
    "bzpopmin",
    "bzpopmax",
    "lmpop",
    "blmpop",
    "zmpop",
    "bzmpop",
];

/// The command table: learned entries plus the built-in fallback.
#[derive(Debug, Default)]
pub struct Table {
    commands: HashMap<String, Arc<CommandInfo>>,
    /// What [`Table::lookup`] reads: every name, and every name that has
    /// subcommands (`client`, `config`, ...), as bytes,
    /// under a hash cheap for names of a few bytes (one lookup per
    /// request, where SipHash over two maps was 6 % of the sidecar's
    /// instructions).
    index: HashMap<Box<[u8]>, Slot, NameHash>,
    /// True when the entries came from the upstream's `COMMAND`.
    pub learned: bool,
}

/// A name in [`Table::index`]: its command, and whether it has
/// subcommands.
#[derive(Debug)]
struct Slot {
    info: Option<Arc<CommandInfo>>,
    container: bool,
}

/// The hash of the lookup index: FxHash's multiply-rotate over 8-byte
/// words, then a final mix (hashbrown picks buckets by the low bits, which
/// a multiply alone leaves depending on the first letters only). Not
/// resistant to chosen collisions, and need not be: the index is fixed
/// when the table is built, so a client's names can only miss.
#[derive(Clone, Copy, Debug, Default)]
struct NameHash;

impl std::hash::BuildHasher for NameHash {
    type Hasher = NameHasher;
    fn build_hasher(&self) -> NameHasher {
        NameHasher(0)
    }
}

struct NameHasher(u64);

impl NameHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

impl Table {
    /// The built-in table: Redis 7.0's own `COMMAND` reply, checked in
    /// (`scripts/gen-command-table.py` writes it from a real redis-server;
    /// `tests/commands.rs` checks it against the test server). Used until
    /// the upstream's table is learned, and when it cannot be. A table of
    /// its own: its entries carry the metrics of the sidecar that uses it.
    pub fn builtin() -> Table {
        Table::parse_builtin()
    }

    /// The built-in table, parsed once per process, for lookups of names
    /// and categories (validating a configuration). Never for a sidecar's
    /// requests: its entries' metrics would be shared by every sidecar of
    /// the process.
    pub fn builtin_shared() -> Arc<Table> {
        static BUILTIN: OnceLock<Arc<Table>> = OnceLock::new();
        BUILTIN
            .get_or_init(|| Arc::new(Table::parse_builtin()))
            .clone()
    }

    fn parse_builtin() -> Table {
        const REPLY: &[u8] = include_bytes!("builtin-commands.resp");
        let table = redis_protocol::resp2::decode::decode(REPLY)
            .ok()
            .flatten()
            .and_then(|(frame, _)| Table::from_command_reply(&frame));
        match table {
            Some(mut t) => {
                t.learned = false;
                t
            }
            // Never with the checked-in file (a unit test parses it).
            None => Table::default(),
        }
    }

    /// Each command as text (name, arity, flags, categories, key specs),
    /// sorted: two tables describe the same commands when these match.
    pub fn fingerprint(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .commands
            .values()
            .map(|i| {
                format!(
                    "{} {} {:?} {:?} {:?}",
                    i.name, i.arity, i.flags, i.acl_categories, i.key_specs
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Parse the RESP2 reply of `COMMAND` (Redis 7 layout; Redis 6's
    /// shorter entries fall back to first/last/step).
    pub fn from_command_reply(reply: &OwnedFrame) -> Option<Table> {
        let OwnedFrame::Array(entries) = reply else {
            return None;
        };
        let mut commands = HashMap::new();
        for e in entries {
            add_entry(&mut commands, e);
        }
        if commands.is_empty() {
            return None;
        }
        Some(Table::new(commands, true))
    }

    fn new(commands: HashMap<String, Arc<CommandInfo>>, learned: bool) -> Table {
        let containers = containers(&commands);
        let mut index: HashMap<Box<[u8]>, Slot, NameHash> = commands
            .iter()
            .map(|(name, info)| {
                let slot = Slot {
                    info: Some(info.clone()),
                    container: containers.contains(name),
                };
                (name.as_bytes().into(), slot)
            })
            .collect();
        for c in containers {
            // A container the table has no entry of its own for.
            index.entry(c.into_bytes().into()).or_insert(Slot {
                info: None,
                container: true,
            });
        }
        Table {
            commands,
            index,
            learned,
        }
    }

    /// Whether this table has `name` (lower case; `container|sub` for a
    /// subcommand, or a container's name).
    pub fn knows(&self, name: &str) -> bool {
        self.index.contains_key(name.as_bytes())
    }

    /// Look up by arguments: `container|sub` when that exists, else the name.
    /// Hot path: no allocation (names are lower-cased on the stack).
    pub fn lookup(&self, args: &[Bytes]) -> Option<&Arc<CommandInfo>> {
        let mut key = [0u8; 64];
        let name = args.first()?;
        let len = name.len();
        if len > 32 {
            return None;
        }
        key[..len].copy_from_slice(name);
        key[..len].make_ascii_lowercase();
        let slot = self.index.get(&key[..len])?;
        if slot.container
            && let Some(sub) = args.get(1).filter(|s| s.len() < 64 - len - 1)
        {
            let end = len + 1 + sub.len();
            key[len] = b'|';
            key[len + 1..end].copy_from_slice(sub);
            key[len + 1..end].make_ascii_lowercase();
            if let Some(info) = self.index.get(&key[..end]).and_then(|s| s.info.as_ref()) {
                return Some(info);
            }
        }
        slot.info.as_ref()
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

fn containers(commands: &HashMap<String, Arc<CommandInfo>>) -> std::collections::HashSet<String> {
    commands
        .keys()
        .filter_map(|k| k.split_once('|'))
        .map(|(c, _)| c.to_string())
        .collect()
}

fn text(f: &OwnedFrame) -> Option<String> {
    match f {
        OwnedFrame::SimpleString(b) | OwnedFrame::BulkString(b) => {
            Some(String::from_utf8_lossy(b).to_ascii_lowercase())
        }
        _ => None,
    }
}

fn int(f: &OwnedFrame) -> Option<i64> {
    match f {
        OwnedFrame::Integer(i) => Some(*i),
        _ => None,
    }
}

fn list(f: &OwnedFrame) -> &[OwnedFrame] {
    match f {
        OwnedFrame::Array(a) => a,
        _ => &[],
    }
}

/// Look a field up in a RESP2 flat map (`[k1, v1, k2, v2, ...]`).
fn field<'a>(map: &'a [OwnedFrame], key: &str) -> Option<&'a OwnedFrame> {
    map.chunks(2)
        .find(|kv| text(&kv[0]).as_deref() == Some(key))
        .and_then(|kv| kv.get(1))
}

fn add_entry(out: &mut HashMap<String, Arc<CommandInfo>>, e: &OwnedFrame) {
    let e = list(e);
    let (Some(name), Some(arity)) = (e.first().and_then(text), e.get(1).and_then(int)) else {
        return;
    };
    let flags_list: Vec<String> = e
        .get(2)
        .map(list)
        .unwrap_or(&[])
        .iter()
        .filter_map(text)
        .collect();
    let has = |f: &str| flags_list.iter().any(|x| x == f);
    let flags = Flags {
        write: has("write"),
        readonly: has("readonly"),
        blocking: has("blocking"),
        pubsub: has("pubsub"),
        admin: has("admin"),
    };
    let acl_categories: Vec<String> = e
        .get(6)
        .map(list)
        .unwrap_or(&[])
        .iter()
        .filter_map(text)
        .map(|c| c.trim_start_matches('@').to_string())
        .collect();
    let mut key_specs: Vec<KeySpec> = e
        .get(8)
        .map(list)
        .unwrap_or(&[])
        .iter()
        .filter_map(|s| parse_spec(list(s)))
        .collect();
    if e.len() < 9 {
        // Redis 6: first/last/step only.
        if let (Some(first), Some(last), Some(step)) = (
            e.get(3).and_then(int),
            e.get(4).and_then(int),
            e.get(5).and_then(int),
        ) && first > 0
        {
            key_specs.push(KeySpec {
                begin: Begin::Index(first as usize),
                find: Find::Range {
                    lastkey: if last < 0 { last } else { last - first },
                    step: step.max(1) as usize,
                    limit: 0,
                },
                write: flags.write,
                stores: flags.write && !DELETE_ONLY.contains(&name.as_str()),
            });
        }
    }
    // Subcommand names arrive as `container|sub` already in Redis 7.
    let full = name;
    if let Some(subs) = e.get(9) {
        for s in list(subs) {
            add_entry(out, s);
        }
    }
    out.insert(
        full.clone(),
        Arc::new(CommandInfo {
            id: intern(&full),
            name: full,
            arity,
            flags,
            acl_categories,
            key_specs,
            metrics: OnceLock::new(),
        }),
    );
}

fn parse_spec(spec: &[OwnedFrame]) -> Option<KeySpec> {
    let flags: Vec<String> = field(spec, "flags")
        .map(list)
        .unwrap_or(&[])
        .iter()
        .filter_map(text)
        .collect();
    let has = |f: &str| flags.iter().any(|x| x == f);
    let write = has("rw") || has("ow") || has("rm");
    let stores = has("ow") || (has("rw") && (has("insert") || has("update")));
    let bs = list(field(spec, "begin_search")?);
    let bs_spec = field(bs, "spec").map(list).unwrap_or(&[]);
    let begin = match field(bs, "type").and_then(text).as_deref() {
        Some("index") => Begin::Index(field(bs_spec, "index").and_then(int)? as usize),
        Some("keyword") => Begin::Keyword {
            keyword: Bytes::from(match field(bs_spec, "keyword")? {
                OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => b.clone(),
                _ => return None,
            }),
            startfrom: field(bs_spec, "startfrom").and_then(int)?,
        },
        _ => Begin::Unknown,
    };
    let fk = list(field(spec, "find_keys")?);
    let fk_spec = field(fk, "spec").map(list).unwrap_or(&[]);
    let num = |k: &str| field(fk_spec, k).and_then(int);
    let find = match field(fk, "type").and_then(text).as_deref() {
        Some("range") => Find::Range {
            lastkey: num("lastkey")?,
            step: num("keystep")?.max(1) as usize,
            limit: num("limit").unwrap_or(0).max(0) as usize,
        },
        Some("keynum") => Find::Keynum {
            keynumidx: num("keynumidx")?.max(0) as usize,
            firstkey: num("firstkey")?.max(0) as usize,
            step: num("keystep")?.max(1) as usize,
        },
        _ => Find::Unknown,
    };
    Some(KeySpec {
        begin,
        find,
        write,
        stores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    #[test]
    fn misspelt_names_are_named_with_the_nearest() {
        assert_eq!(check_name("flushall"), Ok(()));
        assert_eq!(check_name("config|set"), Ok(()));
        assert_eq!(check_name("client"), Ok(()));
        assert_eq!(check_name("flushal"), Err(Some("flushall")));
        assert_eq!(check_name("sett"), Err(Some("set")));
        assert_eq!(check_name("config|sett"), Err(Some("config|set")));
        assert_eq!(check_name("topsecretvalue42"), Err(None));
    }

    #[test]
    fn sort_store_destination_is_a_stored_key() {
        let t = Table::builtin();
        let keys = |s: &str| -> Vec<(usize, bool)> {
            let a = args(s);
            let info = t.lookup(&a).unwrap();
            assert!(info.may_store() || !s.contains("STORE"), "{s}");
            info.keys(&a)
                .iter()
                .filter(|k| k.stores)
                .map(|k| (k.index, k.write))
                .collect()
        };
        assert_eq!(keys("SORT l STORE dst"), vec![(3, true)]);
        assert_eq!(
            keys("SORT l BY w_* LIMIT 0 10 GET # GET h_* DESC ALPHA STORE d"),
            vec![(14, true)]
        );
        // A LIMIT argument or a GET pattern named STORE is not the option.
        assert_eq!(keys("SORT l GET STORE"), vec![]);
        assert_eq!(keys("SORT l LIMIT 0 1 STORE a STORE b"), vec![(8, true)]);
        assert_eq!(keys("SORT l STORE"), vec![]);
        assert_eq!(keys("SORT l"), vec![]);
    }

    /// The lookup index finds every entry by its name in any case (a
    /// subcommand as its two arguments), a container's own entry for a
    /// subcommand it does not have, and nothing for names it lacks.
    #[test]
    fn lookup_finds_every_entry_in_any_case() {
        let t = Table::builtin();
        for name in t.commands.keys() {
            let words: Vec<Bytes> = name
                .split('|')
                .map(|w| Bytes::from(w.to_ascii_uppercase()))
                .collect();
            let found = t.lookup(&words).map(|i| i.name.as_str());
            assert_eq!(found, Some(name.as_str()), "{name}");
            let mixed: Vec<Bytes> = words
                .iter()
                .map(|w| {
                    let mut w = w.to_vec();
                    w[0] = w[0].to_ascii_lowercase();
                    Bytes::from(w)
                })
                .collect();
            assert_eq!(
                t.lookup(&mixed).map(|i| i.name.as_str()),
                Some(name.as_str())
            );
        }
        let client = t.lookup(&args("CLIENT NOSUCHSUB")).map(|i| i.name.as_str());
        assert_eq!(client, Some("client"));
        assert!(t.lookup(&args("NOSUCHCOMMAND x")).is_none());
        assert!(
            t.lookup(&args("client|list"))
                .is_some_and(|i| i.name == "client|list")
        );
        assert!(t.lookup(&[Bytes::from(vec![b'g'; 40])]).is_none());
        assert!(t.lookup(&[Bytes::from_static(b"\xff\xfe")]).is_none());
    }

    #[test]
    fn builtin_keys_and_classes() {
        let t = Table::builtin();
        assert!(t.len() > 200, "the checked-in COMMAND reply parses");
        assert!(!t.learned);
        for name in ["blmpop", "bzmpop", "client|list", "eval", "getex"] {
            assert!(t.commands.contains_key(name), "{name}");
        }
        let blmpop = t.lookup(&args("BLMPOP 0 1 k LEFT")).unwrap();
        assert!(blmpop.flags.blocking);
        let eval = t.lookup(&args("EVAL s 1 k")).unwrap();
        assert!(eval.may_store(), "EVAL's declared keys are written");
        let a = args("MSET a 1 b 2");
        let keys: Vec<usize> = t
            .lookup(&a)
            .unwrap()
            .keys(&a)
            .iter()
            .map(|k| k.index)
            .collect();
        assert_eq!(keys, vec![1, 3]);
        let a = args("BLPOP q1 q2 0");
        let info = t.lookup(&a).map(|i| i.as_ref());
        assert_eq!(classify(&a, info), Class::Pin(Pin::Blocking));
        assert_eq!(info.unwrap().keys(&a).len(), 2);
        assert_eq!(
            classify(&args("XREAD COUNT 1 STREAMS s 0"), None),
            Class::Forward
        );
        assert_eq!(
            classify(&args("XREAD BLOCK 0 STREAMS s $"), None),
            Class::Pin(Pin::Blocking)
        );
        assert_eq!(
            classify(&args("client setname x"), None),
            Class::Local(Local::ClientSetName)
        );
        assert_eq!(
            classify(&args("CLIENT TRACKING on"), None),
            Class::Pin(Pin::Sticky)
        );
    }
}
