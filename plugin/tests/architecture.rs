//! The architecture, checked: layers depend downwards only, no import
//! cycles between source files, kernel and HTTP crates stay in their layer,
//! and no source file grows past 600 lines. `scripts/test` runs this as its
//! own lint stage; ARCHITECTURE.md explains the rules.
//!
//! Imports are read from the source text: every `crate::`, `super::` and
//! `self::` path (in `use` trees and inline), and `use child::...` in a
//! folder's `mod.rs`, resolved to the source file of the module it names.
//! A folder's `mod.rs` (and the crate root) is the folder's table of
//! contents: its references to its own descendants are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

/// Which top-level modules each top-level module of the plugin may use.
const PLUGIN_LAYERS: &[(&str, &[&str])] = &[
    ("util", &[]),
    ("telemetry", &[]),
    ("cli", &[]),
    ("dataplane", &["util"]),
    ("dns", &["telemetry"]),
    ("docker", &[]),
    ("error", &["dataplane"]),
    ("state", &["util", "error", "cli", "telemetry"]),
    ("control", &["state", "util", "error", "telemetry"]),
    (
        "sync",
        &[
            "control",
            "dataplane",
            "dns",
            "docker",
            "state",
            "util",
            "error",
            "telemetry",
        ],
    ),
    (
        "driver",
        &["sync", "control", "dataplane", "state", "util", "error"],
    ),
    (
        "api",
        &[
            "driver",
            "sync",
            "control",
            "state",
            "util",
            "error",
            "telemetry",
        ],
    ),
    (
        "cmd",
        &[
            "api",
            "driver",
            "sync",
            "control",
            "dataplane",
            "dns",
            "docker",
            "state",
            "util",
            "error",
            "cli",
            "telemetry",
        ],
    ),
];

/// The store crate: backends use the shared modules (and the crate root's
/// trait), never each other's internals.
const STORE_LAYERS: &[(&str, &[&str])] = &[
    ("types", &["error"]),
    ("error", &[]),
    ("tls", &["error"]),
    ("validate", &["types", "error"]),
    ("engine", &["types", "error", "validate"]),
    ("memory", &["engine", "types", "error"]),
    ("redb_store", &["engine", "types", "error"]),
    ("etcd", &["types", "error", "validate", "tls"]),
    ("consul", &["types", "error", "validate", "tls"]),
    ("timeout", &["types", "error"]),
    ("counting", &["types", "error"]),
    ("conformance", &["types", "error"]),
];

/// External crates (or their paths) that only some layers may name.
const CONFINED: &[(&str, &[&str])] = &[
    ("axum", &["api", "cmd"]),
    ("rtnetlink", &["dataplane"]),
    ("setns", &["dataplane"]),
    ("hickory_proto", &["dns"]),
    ("bollard", &["docker"]),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the plugin crate sits in the workspace")
        .to_path_buf()
}

/// A crate's source files, by module path (`control::ipam::alloc`; "" for
/// the crate root).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a source folder") {
            let path = entry.expect("read a folder entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_some_and(|e| e == "rs") {
                out.insert(module_path(src, &path), path);
            }
        }
    }
    out
}

fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    match last.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        name => parts.push(name.trim_end_matches(".rs").to_string()),
    }
    parts.join("::")
}

/// The file's text without its unit tests (`#[cfg(test)] mod tests` at the
/// end, whose `super::*` is the file itself) and without comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read a source file");
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Path,
    Open,
    Close,
    Comma,
    Other,
}

fn tokens(code: &str) -> Vec<Tok> {
    let mut out = vec![];
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
            continue;
        }
        if c == '"' {
            // Skip string literals (they may hold "crate::" in messages).
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Other);
            continue;
        }
        match c {
            ':' if chars.get(i + 1) == Some(&':') => {
                out.push(Tok::Path);
                i += 2;
                continue;
            }
            '{' => out.push(Tok::Open),
            '}' => out.push(Tok::Close),
            ',' => out.push(Tok::Comma),
            c if c.is_whitespace() => {}
            _ => out.push(Tok::Other),
        }
        i += 1;
    }
    out
}

/// Every path of a use tree (or an inline path) starting at `toks[i]`,
/// which follows a `::`; `prefix` is what came before.
fn paths_from(
    toks: &[Tok],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    loop {
        match toks.get(i) {
            Some(Tok::Ident(id)) => {
                path.push(id.clone());
                i += 1;
                if toks.get(i) == Some(&Tok::Path) {
                    i += 1;
                    continue;
                }
                out.push(path);
                return i;
            }
            Some(Tok::Open) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Close) => return i + 1,
                        Some(Tok::Comma) => i += 1,
                        None => return i,
                        _ => i = paths_from(toks, i, path.clone(), out),
                    }
                }
            }
            _ => {
                out.push(path);
                return i;
            }
        }
    }
}

/// The modules a file refers to, as absolute module paths (unresolved).
fn references(module: &str, code: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let toks = tokens(code);
    let here: Vec<String> = if module.is_empty() {
        vec![]
    } else {
        module.split("::").map(String::from).collect()
    };
    let mut out = vec![];
    let mut i = 0;
    while i < toks.len() {
        let Tok::Ident(id) = &toks[i] else {
            i += 1;
            continue;
        };
        let after_path = i > 0 && toks[i - 1] == Tok::Path;
        let before_path = toks.get(i + 1) == Some(&Tok::Path);
        if !before_path || after_path {
            i += 1;
            continue;
        }
        let prefix = match id.as_str() {
            "crate" => vec![],
            "self" => here.clone(),
            "super" => {
                let mut base = here.clone();
                base.pop();
                // super::super::...
                while toks.get(i + 2) == Some(&Tok::Ident("super".into()))
                    && toks.get(i + 3) == Some(&Tok::Path)
                {
                    base.pop();
                    i += 2;
                }
                base
            }
            // `use child::...` in a folder's mod.rs: the child's name is
            // the path's first segment.
            child
                if children.contains(child) && i > 0 && toks[i - 1] == Tok::Ident("use".into()) =>
            {
                i = paths_from(&toks, i, here.clone(), &mut out);
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        i = paths_from(&toks, i + 2, prefix, &mut out);
    }
    out
}

/// The longest prefix of `path` that names a module of the crate.
fn resolve(path: &[String], mods: &BTreeMap<String, PathBuf>) -> String {
    for n in (0..=path.len()).rev() {
        let candidate = path[..n].join("::");
        if mods.contains_key(&candidate) {
            return candidate;
        }
    }
    String::new()
}

fn is_descendant(module: &str, of: &str) -> bool {
    of.is_empty() && !module.is_empty() || module.starts_with(&format!("{of}::"))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

/// File-level dependency edges of a crate, facade edges left out.
fn edges(
    src: &Path,
) -> (
    BTreeMap<String, PathBuf>,
    BTreeMap<String, BTreeSet<String>>,
) {
    let mods = modules(src);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &mods {
        let is_folder = path
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs" || n == "main.rs");
        let children: BTreeSet<String> = if is_folder {
            mods.keys()
                .filter(|m| {
                    is_descendant(m, module)
                        && !m[module.len()..].trim_start_matches("::").contains("::")
                })
                .map(|m| m.rsplit("::").next().unwrap_or(m).to_string())
                .collect()
        } else {
            BTreeSet::new()
        };
        let set = graph.entry(module.clone()).or_default();
        for r in references(module, &code(path), &children) {
            let target = resolve(&r, &mods);
            if target == *module || (is_folder && is_descendant(&target, module)) {
                continue;
            }
            set.insert(target);
        }
    }
    (mods, graph)
}

/// Cycles in the graph, each as the modules of one strongly connected
/// component of more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm, iteratively simple enough for a few dozen nodes.
    struct St<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(st: &mut St<'a>, v: &'a str) {
        st.index.insert(v, st.next);
        st.low.insert(v, st.next);
        st.next += 1;
        st.stack.push(v);
        st.on.insert(v);
        if let Some(ws) = st.graph.get(v) {
            for w in ws {
                let w = w.as_str();
                if !st.graph.contains_key(w) {
                    continue;
                }
                if !st.index.contains_key(w) {
                    visit(st, w);
                    let lw = st.low[w];
                    let lv = st.low[v];
                    st.low.insert(v, lv.min(lw));
                } else if st.on.contains(w) {
                    let iw = st.index[w];
                    let lv = st.low[v];
                    st.low.insert(v, lv.min(iw));
                }
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = vec![];
            while let Some(w) = st.stack.pop() {
                st.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                st.out.push(comp);
            }
        }
    }
    let mut st = St {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on: BTreeSet::new(),
        next: 0,
        out: vec![],
    };
    for v in graph.keys() {
        if !st.index.contains_key(v.as_str()) {
            visit(&mut st, v.as_str());
        }
    }
    st.out
}

/// Violations of the layer table: "a -> b (file)".
fn layer_violations(src: &Path, layers: &[(&str, &[&str])]) -> Vec<String> {
    let (mods, graph) = edges(src);
    let allowed: BTreeMap<&str, &[&str]> = layers.iter().copied().collect();
    let mut out = vec![];
    for (module, targets) in &graph {
        let from = top(module);
        if module.is_empty() {
            continue; // the crate root
        }
        let Some(ok) = allowed.get(from) else {
            out.push(format!(
                "module {from} ({}) is not in the layer table; add it to ARCHITECTURE.md and to this test",
                mods[module].display()
            ));
            continue;
        };
        for t in targets {
            let to = top(t);
            if t.is_empty() || to == from || ok.contains(&to) {
                continue;
            }
            out.push(format!(
                "{module} -> {t}: layer {from} may not use {to} ({})",
                mods[module].display()
            ));
        }
    }
    out
}

#[test]
fn plugin_layers_depend_downwards_only() {
    let v = layer_violations(&repo().join("plugin/src"), PLUGIN_LAYERS);
    assert!(v.is_empty(), "layer violations:\n{}", v.join("\n"));
}

#[test]
fn store_backends_use_shared_modules_only() {
    let v = layer_violations(&repo().join("kvstore-backends/src"), STORE_LAYERS);
    assert!(v.is_empty(), "layer violations:\n{}", v.join("\n"));
}

#[test]
fn no_import_cycles() {
    for src in [
        "plugin/src",
        "kvstore-backends/src",
        "consul-test-server/src",
    ] {
        let (_, graph) = edges(&repo().join(src));
        let c = cycles(&graph);
        assert!(
            c.is_empty(),
            "import cycles in {src} (each line one cycle):\n{}",
            c.iter()
                .map(|m| m.join(" <-> "))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn kernel_and_http_crates_stay_in_their_layer() {
    let src = repo().join("plugin/src");
    let mut out = vec![];
    for (module, path) in modules(&src) {
        let toks = tokens(&code(&path));
        for (name, layers) in CONFINED {
            let used = toks.iter().any(|t| *t == Tok::Ident(name.to_string()));
            if used && !layers.contains(&top(&module)) {
                out.push(format!(
                    "{} names {name}, which only {layers:?} may",
                    path.display()
                ));
            }
        }
    }
    assert!(out.is_empty(), "{}", out.join("\n"));
}

#[test]
fn no_source_file_is_longer_than_600_lines() {
    let mut out = vec![];
    for src in [
        "plugin/src",
        "kvstore-backends/src",
        "consul-test-server/src",
    ] {
        for path in modules(&repo().join(src)).values() {
            let n = std::fs::read_to_string(path).expect("read").lines().count();
            if n > MAX_LINES {
                out.push(format!("{}: {n} lines", path.display()));
            }
        }
    }
    assert!(out.is_empty(), "split these files:\n{}", out.join("\n"));
}

#[test]
fn the_checker_sees_use_trees_super_and_inline_paths() {
    let children = BTreeSet::from(["alloc".to_string()]);
    let refs = references(
        "control::ipam",
        "use crate::{error::{A, B}, state::keys};\nuse alloc::Cursor;\nfn f() { super::overlay::x(); crate::util::clock::unix_now(); }",
        &children,
    );
    let joined: BTreeSet<String> = refs.iter().map(|r| r.join("::")).collect();
    for want in [
        "error::A",
        "error::B",
        "state::keys",
        "control::ipam::alloc::Cursor",
        "control::overlay::x",
        "util::clock::unix_now",
    ] {
        assert!(joined.contains(want), "missing {want} in {joined:?}");
    }
}
