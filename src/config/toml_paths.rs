//! The key/line plumbing of configuration errors: [`ConfigError`], a key's
//! line in the user's TOML text ([`KeyLines`], found with `toml_edit`), and
//! deserializing while collecting every type error and unknown key
//! ([`deserialize_all`]: remove the offending key, try again). Generic over
//! the type deserialized; knows nothing of the configuration's sections or
//! their validation (that is `validate.rs`).

use std::ops::Range;

use serde::de::DeserializeOwned;

/// One configuration error: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `backend[1].address`; empty for syntax errors.
    pub key: String,
    /// 1-based line; 0 when unknown.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.key.is_empty()) {
            (0, true) => write!(f, "{}", self.message),
            (0, false) => write!(f, "key `{}`: {}", self.key, self.message),
            (l, true) => write!(f, "line {l}: {}", self.message),
            (l, false) => write!(f, "line {l}: key `{}`: {}", self.key, self.message),
        }
    }
}

/// A text's key paths (`backend[1].address`) with their spans, for the
/// line an error is reported at.
pub struct KeyLines<'a> {
    text: &'a str,
    keys: Vec<(String, Range<usize>)>,
}

impl<'a> KeyLines<'a> {
    /// Parses `text`; a syntax error comes back as the one error, with its
    /// line.
    pub fn parse(text: &'a str) -> Result<KeyLines<'a>, ConfigError> {
        let original = match toml_edit::Document::parse(text) {
            Ok(d) => d,
            Err(e) => {
                return Err(ConfigError {
                    key: String::new(),
                    line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
                    message: e.message().trim().to_string(),
                })
            }
        };
        Ok(KeyLines {
            text,
            keys: key_spans(original.as_item()),
        })
    }

    /// A key's line; for a key that is missing, its table's line.
    pub fn line_for(&self, key: &str) -> usize {
        let mut k = key;
        loop {
            if let Some((_, s)) = self.keys.iter().find(|(p, _)| p == k) {
                return line_of(self.text, s.start);
            }
            match k.rsplit_once('.') {
                Some((parent, _)) => k = parent,
                None => return 0,
            }
        }
    }
}

/// Keys that earlier versions took, and why they are gone: an unknown key
/// among these gets this message rather than serde's list of fields.
const REMOVED: &[(&str, &str)] = &[(
    "telemetry.metrics_interval",
    "removed: metrics are no longer pushed over OTLP; scrape /metrics ([admin] address) with Prometheus or the OpenTelemetry Collector's prometheus receiver",
)];

/// Deserializes `text`; on each error, records it, removes the offending
/// key and tries again, so one run reports every type error and unknown
/// key. `None` when no pass succeeded.
pub fn deserialize_all<T: DeserializeOwned>(
    text: &str,
    lines: &KeyLines<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let mut current = text.to_string();
    let mut value = None;
    for _ in 0..64 {
        match toml::from_str::<T>(&current) {
            Ok(c) => {
                value = Some(c);
                break;
            }
            Err(e) => {
                let cur_doc = toml_edit::Document::parse(current.as_str()).ok();
                let path = match (e.span(), &cur_doc) {
                    (Some(span), Some(doc)) => path_at(doc, span.start),
                    _ => None,
                };
                let mut message = e.message().trim().to_string();
                match path {
                    Some(path) => {
                        if let Some((_, why)) = REMOVED.iter().find(|(k, _)| *k == path) {
                            message = (*why).to_string();
                        }
                        errors.push(ConfigError {
                            line: lines.line_for(&path),
                            key: path.clone(),
                            message,
                        });
                        let mut m: toml_edit::DocumentMut = match current.parse() {
                            Ok(m) => m,
                            Err(_) => break,
                        };
                        if !remove_path(m.as_item_mut(), &path) {
                            break;
                        }
                        current = m.to_string();
                    }
                    None => {
                        let line = e.span().map(|s| line_of(&current, s.start)).unwrap_or(0);
                        // Line numbers of a rewritten text are not the
                        // user's: only trust them on the first pass.
                        let line = if current == text { line } else { 0 };
                        errors.push(ConfigError {
                            key: String::new(),
                            line,
                            message,
                        });
                        break;
                    }
                }
            }
        }
    }
    value
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Every key path in the document with the span from its key to its value.
fn key_spans(root: &toml_edit::Item) -> Vec<(String, Range<usize>)> {
    fn walk(
        item: &toml_edit::Item,
        prefix: &str,
        span: Option<Range<usize>>,
        out: &mut Vec<(String, Range<usize>)>,
    ) {
        if let Some(s) = span.or_else(|| item.span()) {
            if !prefix.is_empty() {
                out.push((prefix.to_string(), s));
            }
        }
        let join = |k: &str| {
            if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            }
        };
        match item {
            toml_edit::Item::Table(t) => {
                for (k, v) in t.iter() {
                    let ks = t.key(k).and_then(|key| key.span());
                    let vs = v.span();
                    let s = match (ks, vs) {
                        (Some(a), Some(b)) => Some(a.start.min(b.start)..a.end.max(b.end)),
                        (a, b) => a.or(b),
                    };
                    walk(v, &join(k), s, out);
                }
            }
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let p = format!("{prefix}[{i}]");
                    let item = toml_edit::Item::Table(t.clone());
                    walk(&item, &p, t.span(), out);
                }
            }
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                for (k, v) in t.iter() {
                    let item = toml_edit::Item::Value(v.clone());
                    walk(&item, &join(k), v.span(), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(root, "", None, &mut out);
    out
}

/// The innermost key whose span contains `offset`.
fn path_at(doc: &toml_edit::Document<&str>, offset: usize) -> Option<String> {
    key_spans(doc.as_item())
        .into_iter()
        .filter(|(_, s)| s.start <= offset && offset < s.end.max(s.start + 1))
        .min_by_key(|(_, s)| s.end - s.start)
        .map(|(p, _)| p)
}

/// Removes the key at a dotted path (with `[i]` array indexes).
fn remove_path(root: &mut toml_edit::Item, path: &str) -> bool {
    let parts: Vec<(&str, Option<usize>)> = path
        .split('.')
        .map(|seg| match seg.split_once('[') {
            Some((k, idx)) => (k, idx.trim_end_matches(']').parse().ok()),
            None => (seg, None),
        })
        .collect();
    root.as_table_like_mut()
        .is_some_and(|t| remove_parts(t, &parts))
}

fn remove_parts(table: &mut dyn toml_edit::TableLike, parts: &[(&str, Option<usize>)]) -> bool {
    let Some(((key, idx), rest)) = parts.split_first() else {
        return false;
    };
    match (idx, table.get_mut(key)) {
        (None, _) if rest.is_empty() => table.remove(key).is_some(),
        (None, Some(item)) => item
            .as_table_like_mut()
            .is_some_and(|t| remove_parts(t, rest)),
        (Some(i), Some(toml_edit::Item::ArrayOfTables(a))) if rest.is_empty() => {
            let found = *i < a.len();
            if found {
                a.remove(*i);
            }
            found
        }
        (Some(i), Some(toml_edit::Item::ArrayOfTables(a))) => {
            a.get_mut(*i).is_some_and(|t| remove_parts(t, rest))
        }
        _ => false,
    }
}
