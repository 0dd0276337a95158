//! Recipients a backend refused as unknown, remembered at the edge: a RCPT
//! reply of class 5 whose enhanced code is one of `[policy.recipients]
//! unknown_codes` (5.1.1, "no such user", by default) is kept per group of
//! backends for `cache_unknown` seconds, and the next RCPT to that address
//! in that group gets the backend's own reply from the edge, without a
//! backend round trip. Temporary refusals never enter.
//!
//! Bounded (moka, `cache_size` entries, each expiring), and one per
//! `Backends`: a reload that changes the backends, the routes or these
//! settings starts an empty one. Addresses compare with the domain in
//! `smtp::domain::normalize`'s form and the local part without regard to
//! case unless `local_part_case_sensitive`. The cache is keyed by a hash of
//! (group, address) and keeps the address to compare, so a lookup
//! allocates nothing; until the first entry, a lookup is one atomic load.

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::route::GroupId;
use crate::config::Config;
use crate::smtp::domain::normalize;
use crate::smtp::{EnhancedCode, Reply};

struct Entry {
    group: usize,
    /// The address as compared: local part (lower-cased unless case
    /// sensitive), `@`, normalized domain.
    addr: Box<str>,
    reply: Reply,
}

/// The remembered "no such user" answers of one `Backends`.
pub struct UnknownRecipients {
    cache: moka::sync::Cache<u64, Arc<Entry>>,
    codes: Vec<EnhancedCode>,
    case_sensitive: bool,
    hasher: std::collections::hash_map::RandomState,
    /// Something was ever remembered: before that, lookups stop here.
    any: AtomicBool,
}

impl UnknownRecipients {
    /// None when `cache_unknown` is 0 (off).
    pub(super) fn new(cfg: &Config) -> Option<UnknownRecipients> {
        let r = &cfg.policy.recipients;
        if r.cache_unknown <= 0.0 {
            return None;
        }
        Some(UnknownRecipients {
            cache: moka::sync::Cache::builder()
                .max_capacity(r.cache_size)
                .time_to_live(Duration::from_secs_f64(r.cache_unknown))
                .build(),
            codes: r
                .codes()
                .into_iter()
                .map(|(c, s, d)| EnhancedCode(c, s, d))
                .collect(),
            case_sensitive: r.local_part_case_sensitive,
            hasher: Default::default(),
            any: AtomicBool::new(false),
        })
    }

    /// The local part and the normalized domain of `rcpt`; None without a
    /// domain (`postmaster`) or with an invalid one: never remembered.
    fn parts(rcpt: &str) -> Option<(&str, Cow<'_, str>)> {
        let (local, domain) = rcpt.rsplit_once('@')?;
        Some((local, normalize(domain)?))
    }

    fn local_bytes<'a>(&self, local: &'a str) -> impl Iterator<Item = u8> + 'a {
        let fold = !self.case_sensitive;
        local
            .bytes()
            .map(move |b| if fold { b.to_ascii_lowercase() } else { b })
    }

    fn key(&self, g: GroupId, local: &str, domain: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_usize(g.0);
        for b in self.local_bytes(local) {
            h.write_u8(b);
        }
        h.write_u8(b'@');
        h.write(domain.as_bytes());
        h.finish()
    }

    /// The backend's remembered refusal of `rcpt` in group `g`, if any.
    pub fn refusal(&self, g: GroupId, rcpt: &str) -> Option<Reply> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let (local, domain) = Self::parts(rcpt)?;
        let e = self.cache.get(&self.key(g, local, &domain))?;
        let same = e.group == g.0
            && e.addr.len() == local.len() + 1 + domain.len()
            && self
                .local_bytes(local)
                .chain([b'@'])
                .chain(domain.bytes())
                .eq(e.addr.bytes());
        same.then(|| e.reply.clone())
    }

    /// Remembers `reply` to `rcpt` in group `g` when it says "no such
    /// user" (class 5, one of the configured enhanced codes).
    pub(super) fn note(&self, g: GroupId, rcpt: &str, reply: &Reply) {
        if reply.code / 100 != 5 || !reply.enhanced().is_some_and(|e| self.codes.contains(&e)) {
            return;
        }
        let Some((local, domain)) = Self::parts(rcpt) else {
            return;
        };
        let mut addr: Vec<u8> = self.local_bytes(local).collect();
        addr.push(b'@');
        addr.extend_from_slice(domain.as_bytes());
        let Ok(addr) = String::from_utf8(addr) else {
            return;
        };
        let key = self.key(g, local, &domain);
        self.cache.insert(
            key,
            Arc::new(Entry {
                group: g.0,
                addr: addr.into(),
                reply: reply.clone(),
            }),
        );
        self.any.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(extra: &str) -> UnknownRecipients {
        let cfg = Config::parse(&format!(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n[policy.recipients]\n{extra}"
        ))
        .unwrap();
        UnknownRecipients::new(&cfg).unwrap()
    }

    fn unknown() -> Reply {
        Reply::new(550, EnhancedCode(5, 1, 1), "User unknown")
    }

    #[test]
    fn remembers_no_such_user_per_group_and_address() {
        let c = cache("");
        let g = GroupId(0);
        assert!(c.refusal(g, "x@a.example").is_none());
        c.note(g, "X@A.Example", &unknown());
        assert_eq!(c.refusal(g, "x@a.example"), Some(unknown()));
        assert_eq!(c.refusal(g, "x@A.EXAMPLE."), Some(unknown()));
        assert!(c.refusal(GroupId(1), "x@a.example").is_none(), "per group");
        assert!(c.refusal(g, "y@a.example").is_none());
        assert!(c.refusal(g, "x@b.example").is_none());
        // Never remembered: temporary, other codes, no domain.
        for (rcpt, r) in [
            (
                "t@a.example",
                Reply::new(450, EnhancedCode(4, 1, 1), "try later"),
            ),
            (
                "p@a.example",
                Reply::new(550, EnhancedCode(5, 7, 1), "policy"),
            ),
            ("n@a.example", Reply::new(550, EnhancedCode(5, 0, 0), "no")),
            ("postmaster", unknown()),
        ] {
            c.note(g, rcpt, &r);
            assert!(c.refusal(g, rcpt).is_none(), "{rcpt}");
        }
    }

    #[test]
    fn case_sensitive_local_parts_and_other_codes() {
        let c = cache("local_part_case_sensitive = true\nunknown_codes = [\"5.1.1\", \"5.1.6\"]\n");
        let g = GroupId(0);
        c.note(g, "Jo@a.example", &unknown());
        assert!(c.refusal(g, "jo@a.example").is_none());
        assert!(c.refusal(g, "Jo@a.example").is_some());
        let moved = Reply::new(551, EnhancedCode(5, 1, 6), "moved");
        c.note(g, "m@a.example", &moved);
        assert_eq!(c.refusal(g, "m@a.example"), Some(moved));
    }

    #[test]
    fn off_and_bad_settings() {
        let cfg = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n[policy.recipients]\ncache_unknown = 0\n",
        )
        .unwrap();
        assert!(UnknownRecipients::new(&cfg).is_none());
        let e = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n[policy.recipients]\ncache_unknown = -1\ncache_size = 0\nunknown_codes = [\"4.1.1\", \"x\"]\n",
        )
        .unwrap_err();
        let keys: Vec<(&str, usize)> = e.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert!(
            keys.contains(&("policy.recipients.cache_unknown", 6)),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("policy.recipients.cache_size", 7)),
            "{keys:?}"
        );
        assert_eq!(
            keys.iter()
                .filter(|k| **k == ("policy.recipients.unknown_codes", 8))
                .count(),
            2,
            "{keys:?}"
        );
    }
}
