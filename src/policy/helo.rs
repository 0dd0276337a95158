//! HELO/EHLO argument checks without I/O: RFC 5321 syntax, bare IPs,
//! address literals against the client, FQDN, "that is my name", and the
//! match against the client's forward-confirmed rDNS name. DNS-based checks
//! (does the name resolve) take their answer from `policy::dns`.

use std::net::IpAddr;

/// What a HELO argument is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeloName {
    /// A syntactically valid domain; `fqdn` when it has at least one dot.
    Domain { fqdn: bool },
    /// `[1.2.3.4]` or `[IPv6:...]`.
    Literal(IpAddr),
    /// An IP address without brackets.
    BareIp(IpAddr),
    /// Anything else.
    Invalid,
}

/// Classifies a HELO/EHLO argument (RFC 5321 4.1.2 Domain / address-literal;
/// like Postfix, `_` is tolerated in labels and one trailing dot is allowed).
pub fn classify(name: &str) -> HeloName {
    if let Some(inner) = name.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let ip = if let Some(v6) = inner
            .strip_prefix("IPv6:")
            .or_else(|| inner.strip_prefix("ipv6:"))
        {
            v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
        } else {
            inner.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
        };
        return ip.map_or(HeloName::Invalid, HeloName::Literal);
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return HeloName::BareIp(ip);
    }
    let body = name.strip_suffix('.').unwrap_or(name);
    if body.is_empty() || body.len() > 253 {
        return HeloName::Invalid;
    }
    let mut labels = 0;
    for label in body.split('.') {
        labels += 1;
        let b = label.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1] != b'-'
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if !ok {
            return HeloName::Invalid;
        }
    }
    // An all-numeric dotted name that is not an address (1.2.3) is no
    // hostname either: the top label of a domain is never all digits.
    if body
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|c| c.is_ascii_digit()))
        && labels > 1
    {
        return HeloName::Invalid;
    }
    HeloName::Domain { fqdn: labels > 1 }
}

/// Whether `helo` names us: our hostname, or a literal of an address we
/// listen on.
pub fn is_ours(helo: &str, kind: &HeloName, hostname: &str, local: IpAddr) -> bool {
    match kind {
        HeloName::Domain { .. } => helo
            .strip_suffix('.')
            .unwrap_or(helo)
            .eq_ignore_ascii_case(hostname),
        HeloName::Literal(ip) | HeloName::BareIp(ip) => ip.to_canonical() == local.to_canonical(),
        HeloName::Invalid => false,
    }
}

/// Whether an address literal names the client itself.
pub fn literal_matches(ip: IpAddr, client: IpAddr) -> bool {
    ip.to_canonical() == client.to_canonical()
}

/// Whether `helo` equals the forward-confirmed rDNS name, or lies in the
/// same parent domain (`mx1.example.com` for `mail.example.com`).
pub fn matches_rdns(helo: &str, rdns: &str) -> bool {
    let helo = helo.strip_suffix('.').unwrap_or(helo).to_ascii_lowercase();
    let rdns = rdns.strip_suffix('.').unwrap_or(rdns).to_ascii_lowercase();
    if helo == rdns {
        return true;
    }
    let Some((_, parent)) = rdns.split_once('.') else {
        return false;
    };
    // A parent that is only a top-level domain proves nothing.
    if !parent.contains('.') {
        return false;
    }
    helo == parent || helo.ends_with(&format!(".{parent}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        use HeloName::*;
        assert_eq!(classify("mail.example.com"), Domain { fqdn: true });
        assert_eq!(classify("mail.example.com."), Domain { fqdn: true });
        assert_eq!(classify("MAIL-1.Example.COM"), Domain { fqdn: true });
        assert_eq!(classify("win_host.corp.example"), Domain { fqdn: true });
        assert_eq!(classify("localhost"), Domain { fqdn: false });
        assert_eq!(
            classify("[127.0.0.1]"),
            Literal("127.0.0.1".parse().unwrap())
        );
        assert_eq!(classify("[IPv6:::1]"), Literal("::1".parse().unwrap()));
        assert_eq!(classify("192.0.2.1"), BareIp("192.0.2.1".parse().unwrap()));
        assert_eq!(
            classify("2001:db8::1"),
            BareIp("2001:db8::1".parse().unwrap())
        );
        for bad in [
            "",
            ".",
            "a..b",
            "-a.example",
            "a-.example",
            "a b",
            "exa mple.com",
            "[1.2.3]",
            "[IPv6:zz]",
            "[::1]",
            "1.2.3",
            "host.123",
            "ex\u{e4}mple.com",
            "a.example..",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert_eq!(classify(bad), Invalid, "{bad:?}");
        }
    }

    #[test]
    fn ours_and_literals() {
        let local: IpAddr = "192.0.2.10".parse().unwrap();
        assert!(is_ours(
            "MX.example.com",
            &classify("MX.example.com"),
            "mx.example.com",
            local
        ));
        assert!(is_ours(
            "[192.0.2.10]",
            &classify("[192.0.2.10]"),
            "mx",
            local
        ));
        assert!(!is_ours(
            "other.example",
            &classify("other.example"),
            "mx.example.com",
            local
        ));
        let mapped: IpAddr = "::ffff:192.0.2.10".parse().unwrap();
        assert!(literal_matches(mapped, local));
        assert!(!literal_matches("192.0.2.11".parse().unwrap(), local));
    }

    #[test]
    fn rdns_match() {
        assert!(matches_rdns("mail.example.com", "mail.example.com."));
        assert!(matches_rdns("mx1.example.com", "mail.example.com"));
        assert!(matches_rdns("example.com", "mail.example.com"));
        assert!(!matches_rdns("mail.other.com", "mail.example.com"));
        assert!(!matches_rdns("evil.com", "host.com"));
        assert!(!matches_rdns("x.com", "localhost"));
    }
}
