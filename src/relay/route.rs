//! Routes by recipient domain: the groups of backends a transaction may
//! go to (`Group`: its members and its own round robin) and the table of
//! `[[route]]`s that picks one for a recipient (`Routes::lookup`: exact
//! domain first, then the longest `*.domain`, then `*`). Built once per
//! `Backends` (a reload builds new ones), read without locks.
//!
//! Without `[[route]]` there is one group of every backend and no table:
//! every recipient goes to it, as before routes existed. The session asks
//! `Backends::route` per recipient; domains are compared in
//! `smtp::domain::normalize`'s form (lower case, IDNA A-labels).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::config::{Config, DomainPattern};

/// A group a transaction is begun on: an index into its `Backends`' groups
/// (meaningful only with the `Backends` that gave it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupId(pub(super) usize);

impl GroupId {
    /// The one group of a set without routes (every backend).
    pub const UNROUTED: GroupId = GroupId(0);
}

/// The backends of one group, by index into `Backends`' list, and where
/// its round robin stands.
pub(super) struct Group {
    pub(super) name: String,
    pub(super) members: Vec<usize>,
    pub(super) next: Turn,
}

/// A group's round robin, one turn counter per core (`cores::current`):
/// with `thread_per_core` the cores take their turns without writing a
/// cache line another core writes, each going round the members on its
/// own (a session stays on its core, so its transactions still
/// alternate). Every other thread is core 0: a multi-thread runtime's
/// workers share one counter, as a session moves between them.
#[derive(Default)]
pub(super) struct Turn(Box<[CachePadded<AtomicUsize>; crate::cores::SHARDS]>);

impl Turn {
    fn counter(&self) -> &AtomicUsize {
        &self.0[crate::cores::current() % crate::cores::SHARDS]
    }

    /// This core's next turn, not taken.
    pub(super) fn peek(&self) -> usize {
        self.counter().load(Ordering::Relaxed)
    }

    /// This core's next turn, taken.
    pub(super) fn take(&self) -> usize {
        self.counter().fetch_add(1, Ordering::Relaxed)
    }
}

/// The `[[route]]` table: normalized patterns to group indices.
pub(super) struct Routes {
    exact: HashMap<String, usize>,
    below: HashMap<String, usize>,
    any: Option<usize>,
}

impl Routes {
    /// The group for a normalized domain: the exact entry, else the
    /// longest `*.` suffix that matches, else `*`.
    pub(super) fn lookup(&self, domain: &str) -> Option<usize> {
        if let Some(&g) = self.exact.get(domain) {
            return Some(g);
        }
        if !self.below.is_empty() && !domain.starts_with('[') {
            // Left to right: the first suffix found is the longest.
            let mut rest = domain;
            while let Some((_, tail)) = rest.split_once('.') {
                if let Some(&g) = self.below.get(tail) {
                    return Some(g);
                }
                rest = tail;
            }
        }
        self.any
    }
}

/// The groups and the route table of `cfg`: with routes, one group per
/// group name a route names (in order of first mention), with the backends
/// of that `group`; without, one group of every backend and no table.
pub(super) fn build(cfg: &Config) -> (Vec<Group>, Option<Routes>) {
    let group = |name: &str, members: Vec<usize>| Group {
        name: name.to_string(),
        members,
        next: Turn::default(),
    };
    if cfg.routes.is_empty() {
        let all = (0..cfg.backends.len()).collect();
        return (vec![group("*", all)], None);
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut routes = Routes {
        exact: HashMap::new(),
        below: HashMap::new(),
        any: None,
    };
    for r in &cfg.routes {
        let g = match groups.iter().position(|g| g.name == r.group) {
            Some(g) => g,
            None => {
                let members = (cfg.backends.iter().enumerate())
                    .filter(|(_, b)| b.group == r.group)
                    .map(|(i, _)| i)
                    .collect();
                groups.push(group(&r.group, members));
                groups.len() - 1
            }
        };
        // Checked by `Config::validate`: a pattern that does not parse is
        // not there to route.
        for p in r
            .domains
            .iter()
            .filter_map(|d| DomainPattern::parse(d).ok())
        {
            match p {
                DomainPattern::Exact(d) => {
                    routes.exact.entry(d).or_insert(g);
                }
                DomainPattern::Below(d) => {
                    routes.below.entry(d).or_insert(g);
                }
                DomainPattern::Any => {
                    routes.any.get_or_insert(g);
                }
            }
        }
    }
    for (i, b) in cfg.backends.iter().enumerate() {
        if !groups.iter().any(|g| g.members.contains(&i)) {
            tracing::warn!(
                backend = %b.address.as_deref().unwrap_or("maildir"),
                group = %b.group,
                "no [[route]] names this backend's group: it gets no mail"
            );
        }
    }
    (groups, Some(routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &str) -> (Vec<Group>, Routes) {
        let cfg = Config::parse(&format!(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n\
             [[backend]]\naddress = \"a:25\"\ngroup = \"a\"\n\
             [[backend]]\naddress = \"b:25\"\ngroup = \"b\"\n\
             [[backend]]\naddress = \"c:25\"\n\
             [[backend]]\naddress = \"a2:25\"\ngroup = \"a\"\n{routes}"
        ))
        .unwrap();
        let (g, r) = build(&cfg);
        (g, r.unwrap())
    }

    #[test]
    fn exact_then_longest_wildcard_then_any() {
        let (groups, r) = table(
            "[[route]]\ndomains = [\"a.example\", \"*.deep.b.example\"]\ngroup = \"a\"\n\
             [[route]]\ndomains = [\"*.b.example\", \"x.deep.b.example\"]\ngroup = \"b\"\n",
        );
        let name = |d: &str| r.lookup(d).map(|g| groups[g].name.as_str());
        assert_eq!(name("a.example"), Some("a"));
        assert_eq!(name("x.a.example"), None);
        assert_eq!(
            name("b.example"),
            None,
            "*.b.example is below b.example only"
        );
        assert_eq!(name("m.b.example"), Some("b"));
        assert_eq!(name("y.deep.b.example"), Some("a"), "the longer wildcard");
        assert_eq!(name("z.y.deep.b.example"), Some("a"));
        assert_eq!(name("deep.b.example"), Some("b"));
        assert_eq!(
            name("x.deep.b.example"),
            Some("b"),
            "exact before any wildcard"
        );
        assert_eq!(name("[192.0.2.1]"), None);
        assert_eq!(groups[0].members, vec![0, 3]);
        assert_eq!(groups[1].members, vec![1]);
    }

    #[test]
    fn catch_all_and_groups_in_order_of_mention() {
        let (groups, r) = table(
            "[[route]]\ndomains = [\"*\"]\ngroup = \"default\"\n\
             [[route]]\ndomains = [\"Bücher.Example\"]\ngroup = \"b\"\n",
        );
        assert_eq!(groups.len(), 2);
        assert_eq!(
            (groups[0].name.as_str(), &groups[0].members),
            ("default", &vec![2])
        );
        assert_eq!(r.lookup("xn--bcher-kva.example"), Some(1));
        assert_eq!(r.lookup("anything.example"), Some(0));
        assert_eq!(r.lookup("[192.0.2.1]"), Some(0));
    }

    #[test]
    fn without_routes_one_group_of_all() {
        let cfg = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\ngroup = \"a\"\n[[backend]]\naddress = \"b:25\"\n",
        )
        .unwrap();
        let (g, r) = build(&cfg);
        assert!(r.is_none());
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].members, vec![0, 1]);
    }
}
