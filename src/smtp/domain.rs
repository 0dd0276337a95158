//! A recipient's domain as routing compares it: taken from the address
//! (`recipient_domain`) and brought to one form (`normalize`): ASCII
//! lower case, a U-label (SMTPUTF8) turned into its A-label by IDNA (UTS 46,
//! through the `idna` crate), so `Bücher.Example` and `xn--bcher-kva.example`
//! are one domain. Domain literals (`[192.0.2.1]`) are kept as written,
//! lower-cased.

use std::borrow::Cow;

/// The domain part of a recipient address (after the last `@`, which is
/// outside any quoted local part); None for an address without one (such
/// as `postmaster`).
pub fn recipient_domain(addr: &str) -> Option<&str> {
    let (_, domain) = addr.rsplit_once('@')?;
    (!domain.is_empty()).then_some(domain)
}

/// The normalized form of `domain`; None when it is not a valid domain
/// (IDNA refuses it). Borrowed when already normal (lower-case ASCII), the
/// common case: no allocation.
pub fn normalize(domain: &str) -> Option<Cow<'_, str>> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() {
        return None;
    }
    if domain.starts_with('[') {
        return Some(if domain.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(domain.to_ascii_lowercase())
        } else {
            Cow::Borrowed(domain)
        });
    }
    let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.';
    if domain.bytes().all(plain) && !domain.contains("xn--") {
        // Nothing for IDNA to do but check the labels' shape.
        if domain.split('.').any(|l| l.is_empty() || l.len() > 63) {
            return None;
        }
        return Some(Cow::Borrowed(domain));
    }
    idna::domain_to_ascii(domain).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_of_a_recipient() {
        assert_eq!(recipient_domain("a@b.example"), Some("b.example"));
        assert_eq!(recipient_domain("\"x@y\"@b.example"), Some("b.example"));
        assert_eq!(recipient_domain("postmaster"), None);
        assert_eq!(recipient_domain("a@"), None);
    }

    #[test]
    fn one_form_for_one_domain() {
        assert_eq!(normalize("a.example").as_deref(), Some("a.example"));
        assert!(matches!(normalize("a.example"), Some(Cow::Borrowed(_))));
        assert_eq!(normalize("A.Example.").as_deref(), Some("a.example"));
        let u = normalize("Bücher.example").unwrap();
        assert_eq!(u, "xn--bcher-kva.example");
        assert_eq!(
            normalize("XN--BCHER-KVA.example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(normalize("[192.0.2.1]").as_deref(), Some("[192.0.2.1]"));
        assert_eq!(normalize("[IPv6:::1]").as_deref(), Some("[ipv6:::1]"));
        assert_eq!(normalize(""), None);
        assert_eq!(normalize("a..example"), None);
    }
}
