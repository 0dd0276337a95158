//! The layering rules of ARCHITECTURE.md, checked rather than hoped (in
//! the manner of rust-analyzer's tidy tests): each module of `src/` may
//! import (`crate::x`) only the modules below it. Reads the sources as
//! text; no build of the crate is needed. A rule that no longer fits is
//! changed here and in ARCHITECTURE.md in the same commit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and the top-level modules it may
/// import, lowest first. `main.rs` and `lib.rs` are the roots: free.
const RULES: &[(&str, &[&str])] = &[
    // The protocol, sans-IO: bytes in, values out.
    ("smtp", &[]),
    // Leaves.
    ("timer", &[]),
    ("proxy_protocol", &[]),
    // Which core the current thread serves (thread-per-core).
    ("cores", &[]),
    // Logs, traces, metrics: a leaf that others write into; the proxy's
    // own replies name their trace (`own` takes a `smtp::Reply`); the
    // metrics every core writes keep a shard per core (`cores::shard`).
    ("telemetry", &["smtp", "cores"]),
    ("tls", &[]),
    ("policy", &["smtp", "telemetry"]),
    // `cores` for the runtime's thread-start hook (`no_cancellation`).
    ("config", &["smtp", "telemetry", "tls", "policy", "cores"]),
    // `tls` for loading a client certificate pair (TLS to the backends).
    (
        "relay",
        &["smtp", "telemetry", "timer", "tls", "config", "cores"],
    ),
    (
        "session",
        &[
            "smtp",
            "telemetry",
            "timer",
            "tls",
            "policy",
            "config",
            "relay",
        ],
    ),
    // The binary's admin client (`smtp-edge reload|ban|top`), declared by
    // main.rs only: it reaches the library as `smtp_edge::` (the config,
    // for the admin address) and the proxy through HTTP alone.
    ("cli", &[]),
    // The composition root knows everything.
    (
        "server",
        &[
            "smtp",
            "telemetry",
            "timer",
            "proxy_protocol",
            "tls",
            "policy",
            "config",
            "relay",
            "session",
            "cores",
        ],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_string()
}

/// The top-level modules named by `crate::…` paths in `text`, outside
/// comments; `use crate::{a, b::{c, d}}` names `a` and `b`, over any
/// number of lines.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        // `$crate::` inside a macro is the crate itself, as `crate::`.
        rest = &rest[i + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            let name = ident(rest);
            // `crate::span!(..)`: an exported macro, not a module.
            if !rest[name.len()..].starts_with('!') {
                out.insert(name);
            }
            continue;
        };
        // The group's top-level items, each from its start.
        let mut depth = 0;
        let mut start = true;
        for (k, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => start = true,
                c if start && !c.is_whitespace() => {
                    out.insert(ident(&group[k..]));
                    start = false;
                }
                _ => {}
            }
        }
    }
    out.remove("");
    out
}

/// Everything of `text` before its first `#[cfg(test)]` module: unit
/// tests may reach anywhere.
fn production(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    }
}

#[test]
fn modules_import_only_what_is_below_them() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let m = module_of(f);
        if m == "main" || m == "lib" {
            continue;
        }
        let Some((_, allowed)) = RULES.iter().find(|(name, _)| *name == m) else {
            wrong.push(format!(
                "{}: module {m:?} has no rule in tests/layering.rs",
                f.display()
            ));
            continue;
        };
        seen.insert(m.clone());
        let text = std::fs::read_to_string(f).unwrap();
        for used in crate_imports(production(&text)) {
            if used != m && !allowed.contains(&used.as_str()) {
                wrong.push(format!(
                    "{}: {m} imports crate::{used}, which is not below it",
                    f.strip_prefix(src()).unwrap().display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    for (name, _) in RULES {
        assert!(seen.contains(*name), "a rule for {name:?}, which is gone");
    }
}

/// `smtp/` knows nothing of sockets, tasks, files or the clock: bytes in,
/// values out.
#[test]
fn smtp_is_sans_io() {
    let mut files = Vec::new();
    rust_files(&src().join("smtp"), &mut files);
    let mut wrong = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in production(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for banned in [
                "tokio",
                "std::net::Tcp",
                "std::net::Udp",
                "std::fs",
                "std::thread",
                "Instant::now",
                "SystemTime::now",
            ] {
                if code.contains(banned) {
                    wrong.push(format!("{}:{}: {banned}", f.display(), n + 1));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "smtp/ does I/O:\n{}", wrong.join("\n"));
}

/// The checker itself: it sees every form of import used in `src/`.
#[test]
fn crate_imports_sees_every_form() {
    let got = crate_imports(
        "use crate::a::B;\nuse crate::{c, d::{E, F}};\nuse crate::{\n    i::J,\n    k,\n};\nlet x = crate::f::g(); // crate::h\nlet s = crate::m!(x);\n",
    );
    let want: BTreeSet<String> = ["a", "c", "d", "f", "i", "k"].map(String::from).into();
    assert_eq!(got, want);
}
