//! `[[route]]`: which group of backends (`[[backend]] group`) takes the
//! recipients of which domains. `RouteConfig` is the section,
//! `DomainPattern` one entry of its `domains` (exact, `*.domain` for its
//! subdomains at any depth, `*` for every domain), normalized as
//! `smtp::domain` compares recipients. The checks (patterns, a pattern in
//! two routes, a group without backends) are `validate`'s. The table built
//! from it is `relay`'s.

use serde::Deserialize;

use super::BackendConfig;
use crate::smtp::domain::normalize;

/// One `[[route]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact domains, `*.domain` (any subdomain, not the domain itself) and
    /// `*` (every domain no other route names).
    pub domains: Vec<String>,
    /// The `group` of the backends that take these recipients.
    pub group: String,
}

/// One entry of `domains`, normalized (lower case, A-labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DomainPattern {
    /// `a.example`: that domain only.
    Exact(String),
    /// `*.a.example`: every domain below `a.example`, one label or deeper.
    Below(String),
    /// `*`: every domain no other pattern matches.
    Any,
}

impl DomainPattern {
    pub fn parse(s: &str) -> Result<DomainPattern, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(DomainPattern::Any);
        }
        let (below, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if name.contains('*') {
            return Err(format!(
                "{s:?}: a wildcard is only `*` or a leading `*.` (as in \"*.example.com\")"
            ));
        }
        if name.contains('@') || name.starts_with('[') {
            return Err(format!(
                "{s:?}: expected a domain name (no `@`, no address literal)"
            ));
        }
        let Some(n) = normalize(name) else {
            return Err(format!("{s:?} is not a valid domain name"));
        };
        let n = n.into_owned();
        Ok(if below {
            DomainPattern::Below(n)
        } else {
            DomainPattern::Exact(n)
        })
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Below(d) => write!(f, "*.{d}"),
            DomainPattern::Any => f.write_str("*"),
        }
    }
}

/// The group of backends a `[[backend]]` without `group` is in.
pub const DEFAULT_GROUP: &str = "default";

/// A group name: used as a metric label, so short and plain.
pub(super) fn group_name_ok(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 64
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `[[route]]`: each pattern valid and in one route only, each route's
/// group one that some `[[backend]]` is in.
pub(super) fn validate(
    routes: &[RouteConfig],
    backends: &[BackendConfig],
    err: &mut dyn FnMut(String, String),
) {
    let mut seen: std::collections::HashMap<DomainPattern, usize> = Default::default();
    for (i, r) in routes.iter().enumerate() {
        if r.domains.is_empty() {
            err(
                format!("route[{i}].domains"),
                "list at least one domain (or \"*\" for every domain)".into(),
            );
        }
        for d in &r.domains {
            match DomainPattern::parse(d) {
                Err(m) => err(format!("route[{i}].domains"), m),
                Ok(p) => {
                    if let Some(j) = seen.get(&p) {
                        if *j != i {
                            err(
                                format!("route[{i}].domains"),
                                format!("{p} is already routed by route[{j}]"),
                            );
                        }
                    } else {
                        seen.insert(p, i);
                    }
                }
            }
        }
        if !group_name_ok(&r.group) {
            err(
                format!("route[{i}].group"),
                "1 to 64 of A-Z a-z 0-9 - _ .".into(),
            );
        } else if !backends.iter().any(|b| b.group == r.group) {
            err(
                format!("route[{i}].group"),
                format!("no [[backend]] has group = {:?}", r.group),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn errors(text: &str) -> Vec<(String, usize, String)> {
        match Config::parse(text) {
            Ok(_) => vec![],
            Err(e) => e.into_iter().map(|e| (e.key, e.line, e.message)).collect(),
        }
    }

    #[test]
    fn patterns() {
        assert_eq!(DomainPattern::parse("*"), Ok(DomainPattern::Any));
        assert_eq!(
            DomainPattern::parse("*.A.Example"),
            Ok(DomainPattern::Below("a.example".into()))
        );
        assert_eq!(
            DomainPattern::parse("bücher.example"),
            Ok(DomainPattern::Exact("xn--bcher-kva.example".into()))
        );
        for bad in ["a.*.example", "*example", "a@b", "[1.2.3.4]", "", "a..b"] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_checked_with_key_and_line() {
        let base = "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\ngroup = \"t-a\"\n[[backend]]\naddress = \"b:25\"\n";
        // Lines 1-7 above.
        let ok = format!("{base}[[route]]\ndomains = [\"a.example\", \"*.a.example\"]\ngroup = \"t-a\"\n[[route]]\ndomains = [\"*\"]\ngroup = \"default\"\n");
        assert_eq!(errors(&ok), vec![]);
        let e = errors(&format!(
            "{base}[[route]]\ndomains = [\"A.example\", \"x.*\"]\ngroup = \"nobody\"\n[[route]]\ndomains = [\"a.example\"]\ngroup = \"bad name\"\n[[route]]\ndomains = []\ngroup = \"default\"\n"
        ));
        let has = |k: &str, line: usize, m: &str| {
            assert!(
                e.iter()
                    .any(|(key, l, msg)| key == k && *l == line && msg.contains(m)),
                "{k} at {line} ({m}) not in {e:?}"
            )
        };
        has("route[0].domains", 9, "wildcard");
        has(
            "route[0].group",
            10,
            "no [[backend]] has group = \"nobody\"",
        );
        has("route[1].domains", 12, "already routed by route[0]");
        has("route[1].group", 13, "1 to 64");
        has("route[2].domains", 15, "at least one");
        let e = errors("[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\ngroup = \"\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].0.as_str(), e[0].1), ("backend[0].group", 5));
    }
}
