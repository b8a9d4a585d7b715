//! The crate's shape: every module imports only from the layers below it,
//! and no two sibling modules import each other (directly or round a
//! cycle). Read from the source: every `crate::` and `super::` path outside
//! comments and `#[cfg(test)]` code. `LAYERS` is the one place the order
//! is written; `src/lib.rs`'s module map describes it.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Top-level modules, lowest first. A module may import from the ones
/// before it, never from itself's successors.
const LAYERS: &[&str] = &[
    "wire", "config", "metrics", "request", "upstream", "policy", "client", "app",
];

/// A source file: its module path (`["upstream", "cluster", "router"]`)
/// and its text without comments and test code.
struct Source {
    module: Vec<String>,
    text: String,
    file: PathBuf,
}

fn sources(dir: &Path, prefix: &[String], out: &mut Vec<Source>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(name);
            sources(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let is_mod_rs = name == "mod";
            let mut module = prefix.to_vec();
            if !is_mod_rs && !(prefix.is_empty() && (name == "lib" || name == "main")) {
                module.push(name);
            }
            if module.is_empty() {
                continue; // lib.rs and main.rs wire everything together
            }
            out.push(Source {
                module,
                text: code_of(&fs::read_to_string(&path).unwrap()),
                file: path,
            });
        }
    }
}

/// The text without `//` comments (doc comments included) and without
/// `#[cfg(test)]` items (a test module may use anything).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i64> = None;
    let mut depth = 0i64;
    let mut pending_test = false;
    for line in text.lines() {
        let code = match line.find("//") {
            // A `//` inside a string literal would cut too much; paths
            // never follow one on the same line in this crate.
            Some(i) => &line[..i],
            None => line,
        };
        if code.trim() == "#[cfg(test)]" {
            pending_test = true;
            continue;
        }
        let before = depth;
        depth += code.matches('{').count() as i64 - code.matches('}').count() as i64;
        if pending_test {
            pending_test = false;
            if depth > before {
                skip_depth = Some(before);
            }
            continue; // the item's first line (or a one-line item)
        }
        match skip_depth {
            Some(d) if depth <= d => skip_depth = None,
            Some(_) => {}
            None => {
                out.push_str(code);
                out.push('\n');
            }
        }
    }
    out
}

/// Every module path a file names (types and functions dropped): `crate::a::b`, `crate::{a, b::c}`,
/// `super::x` (resolved against the file's place).
fn imports(s: &Source) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let t = &s.text;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut at = 0;
    while let Some(i) = t[at..].find("crate::").map(|i| i + at) {
        at = i + 7;
        if i > 0 && t[..i].ends_with(|c: char| ident(c) || c == '$') {
            continue;
        }
        let rest = &t[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let path: Vec<String> = item
                    .trim()
                    .split("::")
                    .map(|p| p.trim().to_string())
                    .take_while(|p| {
                        p.starts_with(|c: char| c.is_ascii_lowercase()) && p.chars().all(ident)
                    })
                    .collect();
                if !path.is_empty() {
                    out.insert(path);
                }
            }
        } else {
            out.insert(path_at(rest));
        }
    }
    let mut at = 0;
    while let Some(i) = t[at..].find("super::").map(|i| i + at) {
        at = i + 7;
        if i > 0 && t[..i].ends_with(|c: char| ident(c) || c == ':') {
            continue; // counted with the first `super::`
        }
        // The module `super` names: the parent of this file's module.
        let mut base = s.module.clone();
        // (a mod.rs file is its directory's module, so `super` is the
        // directory's parent)
        base.pop();
        let mut rest = &t[at..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let first = item.trim().split("::").next().unwrap_or("").trim();
                if first.starts_with(|c: char| c.is_ascii_lowercase())
                    && first.chars().all(ident)
                    && first != "self"
                {
                    let mut p = base.clone();
                    p.push(first.to_string());
                    out.insert(p);
                }
            }
        } else {
            let mut p = base.clone();
            p.extend(path_at(rest));
            out.insert(p);
        }
    }
    out
}

/// The path segments (lower-case: modules) at the start of `rest`.
fn path_at(rest: &str) -> Vec<String> {
    let mut path = Vec::new();
    let mut r = rest;
    loop {
        let end = r
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(r.len());
        let seg = &r[..end];
        if seg.is_empty() || !seg.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
            break;
        }
        path.push(seg.to_string());
        match r[end..].strip_prefix("::") {
            Some(next) => r = next,
            None => break,
        }
    }
    path
}

fn all() -> Vec<Source> {
    let mut out = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut out,
    );
    out
}

#[test]
fn every_import_goes_down_a_layer() {
    let srcs = all();
    let mut tops = BTreeSet::new();
    let mut wrong = Vec::new();
    for s in &srcs {
        let top = &s.module[0];
        tops.insert(top.clone());
        let Some(me) = LAYERS.iter().position(|l| l == top) else {
            wrong.push(format!(
                "{}: module {top} is not in LAYERS",
                s.file.display()
            ));
            continue;
        };
        for p in imports(s) {
            let Some(to) = p.first() else { continue };
            if to == top {
                continue;
            }
            match LAYERS.iter().position(|l| l == to) {
                Some(there) if there < me => {}
                Some(_) => wrong.push(format!(
                    "{}: {top} imports {} from a layer above it or beside it",
                    s.file.display(),
                    p.join("::")
                )),
                // Not a module of the crate (a macro, a type at the root).
                None => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
    // Every layer exists: the table describes the crate, not a wish.
    for l in LAYERS {
        assert!(
            tops.contains(*l),
            "LAYERS names {l}, which src/ does not have"
        );
    }
}

/// Within every module, its submodules (files and directories) import each
/// other without a cycle.
#[test]
fn no_cycle_between_sibling_modules() {
    let srcs = all();
    // (parent module, child) -> children of the same parent it imports
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for s in &srcs {
        for p in imports(s) {
            // The first segment where the two paths part is a sibling pair.
            let common = s.module.iter().zip(&p).take_while(|(a, b)| a == b).count();
            if common < s.module.len() && common < p.len() {
                let from = s.module[..=common].to_vec();
                let to = p[..=common].to_vec();
                edges.entry(from).or_default().insert(to);
            }
        }
    }
    // A cycle: a path from a node back to itself.
    let mut cycles = Vec::new();
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<Vec<String>> = edges[start].iter().cloned().collect();
        while let Some(n) = stack.pop() {
            if &n == start {
                cycles.push(start.join("::"));
                break;
            }
            if seen.insert(n.clone())
                && let Some(next) = edges.get(&n)
            {
                stack.extend(next.iter().cloned());
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules in an import cycle with a sibling: {}\nedges: {:#?}",
        cycles.join(", "),
        edges
            .iter()
            .filter(|(k, _)| cycles.contains(&k.join("::")))
            .collect::<Vec<_>>()
    );
}

/// The reader itself: a path in a comment or a test module is not an
/// import; grouped and `super::` paths are.
#[test]
fn the_reader_finds_what_rust_would() {
    let s = Source {
        module: vec!["upstream".into(), "pool".into()],
        text: code_of(
            "use crate::wire::scan;\nuse crate::{config::Config, metrics};\n// crate::app::x\nuse super::conn::End;\n#[cfg(test)]\nmod tests {\n    use crate::client::y;\n}\nfn f() {\n    super::super::client::x();\n}\n#[cfg(test)]\nuse crate::app::z;\n",
        ),
        file: PathBuf::from("x.rs"),
    };
    let got: Vec<String> = imports(&s).into_iter().map(|p| p.join("::")).collect();
    assert_eq!(
        got,
        // module paths only: a type or function ends the path
        [
            "client::x",
            "config",
            "metrics",
            "upstream::conn",
            "wire::scan"
        ]
    );
}
