//! Validation of a deserialized [`Config`]: one function per section, each
//! reporting through `err(key, message)`; [`Config::validate`] calls them in
//! a fixed order, which is the order of the reports. Type errors and unknown
//! keys are found before this, by deserializing (`toml_paths.rs`).

use super::{
    split_host_port, BackendConfig, BackendTlsMode, Config, ConfigError, ListenerConfig,
    SessionLimits, TelemetryConfig, Timeouts, TlsConfig, TlsMode, MAX_SESSION_CACHE,
};

/// Most connections one backend's pool may have (far above any real
/// backend's; the bound keeps the pool's semaphores from panicking).
const MAX_POOL: usize = 1_000_000;

impl Config {
    /// Appends every error of the values (not their types) to `errors`,
    /// each at `line_for(key)`.
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>, line_for: &dyn Fn(&str) -> usize) {
        let mut err = |key: String, message: String| {
            let line = line_for(&key);
            errors.push(ConfigError { key, line, message });
        };
        hostname(&self.hostname, &mut err);
        listeners(&self.listeners, &mut err);
        if let Some(t) = &self.tls {
            tls(t, &mut err);
        }
        limits(&self.limits, &mut err);
        timeouts(&self.timeouts, &mut err);
        telemetry(&self.telemetry, &mut err);
        listeners_accept(&self.listeners, &mut err);
        backends(&self.backends, &mut err);
        super::routes::validate(&self.routes, &self.backends, &mut err);
        self.policy.validate(&mut err);
        self.runtime.validate(&mut err);
        per_core_shares(self, &mut err);
    }
}

/// `thread_per_core`: each core keeps its own share of every backend's
/// connections, so each backend needs at least one per core.
fn per_core_shares(cfg: &super::Config, err: &mut dyn FnMut(String, String)) {
    let cores = cfg.runtime.cores();
    if cores <= 1 {
        return;
    }
    for (i, b) in cfg.backends.iter().enumerate() {
        if b.address.is_some() && b.max_connections > 0 && b.max_connections < cores {
            err(
                format!("backend[{i}].max_connections"),
                format!(
                    "{} is below the {cores} cores of [runtime] flavor = \"thread_per_core\": \
                     each core keeps its own share of the backend's connections and needs \
                     at least one (raise it, or set runtime.worker_threads)",
                    b.max_connections
                ),
            );
        }
    }
}

/// `hostname`: a domain name.
fn hostname(hostname: &str, err: &mut dyn FnMut(String, String)) {
    if hostname.is_empty()
        || !hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        err(
            "hostname".into(),
            "must be a domain name (letters, digits, '.', '-')".into(),
        );
    }
}

/// `[[listener]]`: at least one, and `require_tls` only with STARTTLS. The
/// rest of a listener is checked by [`listeners_accept`], later.
fn listeners(listeners: &[ListenerConfig], err: &mut dyn FnMut(String, String)) {
    if listeners.is_empty() {
        err(
            "listener".into(),
            "at least one [[listener]] is required".into(),
        );
    }
    for (i, l) in listeners.iter().enumerate() {
        if l.require_tls && l.tls != TlsMode::Starttls {
            err(
                format!("listener[{i}].require_tls"),
                "require_tls needs tls = \"starttls\"".into(),
            );
        }
    }
}

/// `[tls]`: one form or the other, and every pair loads (files readable,
/// the key the certificate's, `names` DNS names).
fn tls(tls: &TlsConfig, err: &mut dyn FnMut(String, String)) {
    use crate::tls::certs::{self, PairError};
    let short = tls.certificate.is_some() || tls.private_key.is_some();
    match (&tls.certificates, short) {
        (Some(_), true) => {
            return err(
                "tls.certificates".into(),
                "set either `certificate` and `private_key` or [[tls.certificates]], not both"
                    .into(),
            )
        }
        (Some(list), false) if list.is_empty() => {
            return err(
                "tls.certificates".into(),
                "must list at least one certificate".into(),
            )
        }
        (None, false) => {
            return err(
                "tls".into(),
                "no certificate: set `certificate` and `private_key`, or add [[tls.certificates]]"
                    .into(),
            )
        }
        (None, true) if tls.certificate.is_none() => {
            return err(
                "tls.certificate".into(),
                "required with tls.private_key".into(),
            )
        }
        (None, true) if tls.private_key.is_none() => {
            return err(
                "tls.private_key".into(),
                "required with tls.certificate".into(),
            )
        }
        _ => {}
    }
    for e in tls.entries() {
        match certs::load(e.certificate, e.private_key, e.names) {
            Ok(_) => {}
            Err(PairError::Certificate(m)) => err(format!("{}.certificate", e.key), m),
            Err(PairError::Key(m)) => err(format!("{}.private_key", e.key), m),
            Err(PairError::Names(m)) => err(format!("{}.names", e.key), m),
        }
    }
    if tls.session_cache_size > MAX_SESSION_CACHE {
        err(
            "tls.session_cache_size".into(),
            format!("at most {MAX_SESSION_CACHE} (0 turns the cache off)"),
        );
    }
}

/// `[limits]`: sizes and line lengths the RFCs allow.
fn limits(l: &SessionLimits, err: &mut dyn FnMut(String, String)) {
    if l.max_message_size == 0 {
        err("limits.max_message_size".into(), "must be > 0".into());
    }
    if l.max_recipients == 0 {
        err("limits.max_recipients".into(), "must be > 0".into());
    }
    if l.max_command_line < 512 {
        err(
            "limits.max_command_line".into(),
            "must be at least 512 (RFC 5321 4.5.3.1.4)".into(),
        );
    }
    if l.max_text_line != 0 && l.max_text_line < 1000 {
        err(
            "limits.max_text_line".into(),
            "must be 0 (no limit) or at least 1000 (RFC 5321 4.5.3.1.6)".into(),
        );
    }
}

/// `[timeouts]`: seconds, each > 0 (`drain_delay` >= 0) and below 1e7.
fn timeouts(t: &Timeouts, err: &mut dyn FnMut(String, String)) {
    for (k, v) in [
        ("command", t.command),
        ("data_block", t.data_block),
        ("tls_handshake", t.tls_handshake),
        ("backend_connect", t.backend_connect),
        ("backend_pool_wait", t.backend_pool_wait),
        ("backend_command", t.backend_command),
        ("backend_data_end", t.backend_data_end),
        ("shutdown_grace", t.shutdown_grace),
    ] {
        if !(v.is_finite() && v > 0.0 && v < 1e7) {
            err(
                format!("timeouts.{k}"),
                "must be a number of seconds > 0".into(),
            );
        }
    }
    if !(t.drain_delay.is_finite() && t.drain_delay >= 0.0 && t.drain_delay < 1e7) {
        err(
            "timeouts.drain_delay".into(),
            "must be a number of seconds >= 0".into(),
        );
    }
}

/// `[telemetry]`: the sample ratio, the OTLP endpoint's form, the export
/// queue and interval, the service name.
fn telemetry(tm: &TelemetryConfig, err: &mut dyn FnMut(String, String)) {
    if !(tm.sample_ratio.is_finite() && (0.0..=1.0).contains(&tm.sample_ratio)) {
        err(
            "telemetry.sample_ratio".into(),
            "must be between 0.0 and 1.0".into(),
        );
    }
    if let Some(ep) = &tm.otlp_endpoint {
        let ok = (ep.starts_with("http://") || ep.starts_with("https://"))
            && ep.parse::<hyper::Uri>().is_ok_and(|u| u.host().is_some());
        if !ok {
            err(
                "telemetry.otlp_endpoint".into(),
                format!("expected http://host:port or https://host:port, got {ep:?}"),
            );
        }
    }
    if tm.export_queue == 0 {
        err("telemetry.export_queue".into(), "must be > 0".into());
    }
    if tm.service_name.is_empty() {
        err("telemetry.service_name".into(), "must not be empty".into());
    }
}

/// `[[listener]]`, the rest: the backlog and the PROXY protocol header
/// (`proxy_protocol` with `trusted_proxies`, `proxy_header_timeout`).
/// Checked apart from [`listeners`], after `[telemetry]`: that is the order
/// the errors have always been reported in.
fn listeners_accept(listeners: &[ListenerConfig], err: &mut dyn FnMut(String, String)) {
    for (i, l) in listeners.iter().enumerate() {
        if l.backlog == 0 {
            err(format!("listener[{i}].backlog"), "must be > 0".into());
        }
        if l.proxy_protocol && l.trusted_proxies.is_empty() {
            err(
                format!("listener[{i}].proxy_protocol"),
                "needs trusted_proxies (the balancers' addresses, e.g. [\"10.0.0.0/8\"]); without it every connection is refused".into(),
            );
        }
        if !l.proxy_protocol && !l.trusted_proxies.is_empty() {
            err(
                format!("listener[{i}].trusted_proxies"),
                "has no effect without proxy_protocol = true".into(),
            );
        }
        if !(l.proxy_header_timeout.is_finite()
            && l.proxy_header_timeout > 0.0
            && l.proxy_header_timeout < 1e7)
        {
            err(
                format!("listener[{i}].proxy_header_timeout"),
                "must be a number of seconds > 0".into(),
            );
        }
    }
}

/// `[[backend]]`: at least one; each an address or a maildir, with its pool
/// and health settings in range.
fn backends(backends: &[BackendConfig], err: &mut dyn FnMut(String, String)) {
    if backends.is_empty() {
        err(
            "backend".into(),
            "at least one [[backend]] is required".into(),
        );
    }
    for (i, b) in backends.iter().enumerate() {
        match (&b.address, &b.maildir) {
            (Some(_), Some(_)) | (None, None) => err(
                format!("backend[{i}]"),
                "set exactly one of `address` or `maildir`".into(),
            ),
            (Some(a), None) => {
                if split_host_port(a).is_none() {
                    err(
                        format!("backend[{i}].address"),
                        format!("expected host:port, got {a:?}"),
                    );
                }
            }
            (None, Some(_)) => {}
        }
        if !super::routes::group_name_ok(&b.group) {
            err(
                format!("backend[{i}].group"),
                "1 to 64 of A-Z a-z 0-9 - _ .".into(),
            );
        }
        // Bounded: the pool's semaphores panic past usize::MAX >> 3.
        if b.max_connections == 0 || b.max_connections > MAX_POOL {
            err(
                format!("backend[{i}].max_connections"),
                format!("must be 1 to {MAX_POOL}"),
            );
        }
        // Bounded like every other seconds value: `Backends::new` makes a
        // `Duration` of it, which panics past ~1.8e19 s.
        for (k, v) in [("max_idle", b.max_idle), ("max_lifetime", b.max_lifetime)] {
            if !(v.is_finite() && (0.0..1e7).contains(&v)) {
                err(
                    format!("backend[{i}].{k}"),
                    "must be a number of seconds >= 0".into(),
                );
            }
        }
        if b.max_transactions == 0 {
            err(
                format!("backend[{i}].max_transactions"),
                "must be > 0".into(),
            );
        }
        for (k, v) in [
            ("probe_interval", b.probe_interval),
            ("probe_interval_max", b.probe_interval_max),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 1e7) {
                err(
                    format!("backend[{i}].{k}"),
                    "must be a number of seconds > 0".into(),
                );
            }
        }
        if b.probe_interval_max < b.probe_interval {
            err(
                format!("backend[{i}].probe_interval_max"),
                "must be >= probe_interval".into(),
            );
        }
        backend_tls(i, b, err);
    }
}

/// A backend's TLS keys: only on an SMTP backend, only with `tls` on
/// (`tls_verify = false` included), readable files, a key that is its
/// certificate's, a name a certificate can carry.
fn backend_tls(i: usize, b: &BackendConfig, err: &mut dyn FnMut(String, String)) {
    use crate::tls::certs::{self, PairError};
    let set: Vec<&str> = [
        ("tls_verify", !b.tls_verify),
        ("tls_server_name", b.tls_server_name.is_some()),
        ("tls_ca", b.tls_ca.is_some()),
        ("tls_certificate", b.tls_certificate.is_some()),
        ("tls_private_key", b.tls_private_key.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    if b.maildir.is_some() {
        if b.tls != BackendTlsMode::None {
            err(
                format!("backend[{i}].tls"),
                "TLS applies to SMTP backends (`address`), not to a Maildir".into(),
            );
        }
        for k in set {
            err(
                format!("backend[{i}].{k}"),
                "TLS applies to SMTP backends (`address`), not to a Maildir".into(),
            );
        }
        return;
    }
    if b.tls == BackendTlsMode::None {
        for k in set {
            err(
                format!("backend[{i}].{k}"),
                "has no effect without TLS: set tls = \"opportunistic\", \"starttls\" or \"implicit\""
                    .into(),
            );
        }
        return;
    }
    if let Some(name) = &b.tls_server_name {
        if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
            err(
                format!("backend[{i}].tls_server_name"),
                format!("{name:?} is not a DNS name or an IP address"),
            );
        }
    }
    if let Some(ca) = &b.tls_ca {
        if let Err(m) = certs::load_certificates(ca) {
            err(format!("backend[{i}].tls_ca"), m);
        }
    }
    match (&b.tls_certificate, &b.tls_private_key) {
        (Some(cert), Some(key)) => match certs::load(cert, key, Some(&[])) {
            Ok(_) => {}
            Err(PairError::Certificate(m)) => err(format!("backend[{i}].tls_certificate"), m),
            Err(PairError::Key(m) | PairError::Names(m)) => {
                err(format!("backend[{i}].tls_private_key"), m)
            }
        },
        (Some(_), None) => err(
            format!("backend[{i}].tls_private_key"),
            "required with tls_certificate".into(),
        ),
        (None, Some(_)) => err(
            format!("backend[{i}].tls_certificate"),
            "required with tls_private_key".into(),
        ),
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;

    #[test]
    fn proxy_protocol_keys_checked() {
        let ok = "[[listener]]\naddress = \"127.0.0.1:2525\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1/32\"]\nproxy_header_timeout = 2.5\n[[backend]]\naddress = \"a:25\"\n";
        let c = Config::parse(ok).unwrap();
        assert!(c.listeners[0].proxy_protocol);
        assert_eq!(c.listeners[0].trusted_proxies.len(), 2);
        assert_eq!(c.listeners[0].proxy_header_timeout, 2.5);
        let bad = "[[listener]]\naddress = \"127.0.0.1:2525\"\nproxy_protocol = true\nproxy_header_timeout = 0\n[[listener]]\naddress = \"127.0.0.1:2526\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n[[listener]]\naddress = \"127.0.0.1:2527\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/33\"]\n[[backend]]\naddress = \"a:25\"\n";
        let errs = Config::parse(bad).unwrap_err();
        let keys: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert!(
            keys.contains(&("listener[0].proxy_protocol", 3)),
            "{errs:?}"
        );
        assert!(
            keys.contains(&("listener[0].proxy_header_timeout", 4)),
            "{errs:?}"
        );
        assert!(
            keys.contains(&("listener[1].trusted_proxies", 7)),
            "{errs:?}"
        );
        assert!(
            keys.contains(&("listener[2].trusted_proxies", 11)),
            "{errs:?}"
        );
    }

    #[test]
    fn redis_store_errors_named_with_key_and_line() {
        let text = "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n\
                    [policy.limits.connection_rate]\nstore = \"redis\"\n\
                    [policy.limits.message_rate]\nstore = \"memcached\"\n\
                    [policy.limits.redis]\ntimeout = 0\non_failure = \"closed\"\n";
        let errs = Config::parse(text).unwrap_err();
        let keys: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        for want in [
            ("policy.limits.message_rate.store", 8),
            ("policy.limits.redis.on_failure", 11),
            ("policy.limits.connection_rate.store", 6),
            ("policy.limits.redis.url", 9),
            ("policy.limits.redis.timeout", 10),
        ] {
            assert!(keys.contains(&want), "{want:?} in {errs:?}");
        }
        assert_eq!(keys.len(), 5, "{errs:?}");
        let text = "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n\
                    [policy.limits.recipient_rate]\nstore = \"redis\"\n\
                    [policy.limits.redis]\nurl = \"redis://10.0.0.5:6379/1\"\n";
        let c = Config::parse(text).unwrap();
        assert!(c.policy.limits.uses_redis());
    }

    /// Fuzz finding (fuzz/README.md): `max_idle = 1e300` was valid, and
    /// building the backends from it (`Duration::from_secs_f64`) panicked at
    /// start or reload.
    #[test]
    fn max_idle_bounded() {
        for key in ["max_idle", "max_lifetime"] {
            let text = |v: &str| {
                format!("[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n{key} = {v}\n")
            };
            for bad in ["1e300", "1e7", "inf", "nan", "-1"] {
                let errs = Config::parse(&text(bad)).unwrap_err();
                assert_eq!(errs.len(), 1, "{key} = {bad}: {errs:?}");
                assert_eq!(
                    (errs[0].key.as_str(), errs[0].line),
                    (format!("backend[0].{key}").as_str(), 5)
                );
            }
            let b = &Config::parse(&text("86400")).unwrap().backends[0];
            assert_eq!(
                if key == "max_idle" {
                    b.max_idle
                } else {
                    b.max_lifetime
                },
                86400.0
            );
        }
        let b = &Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n",
        )
        .unwrap()
        .backends[0];
        assert_eq!(b.max_lifetime, 600.0, "default");
    }

    #[test]
    fn pool_and_health_keys_checked_with_lines() {
        let text = "[timeouts]\nbackend_pool_wait = 0\n[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\nprobe_interval = 5\nprobe_interval_max = 1\ndown_after = -1\n";
        let errs = Config::parse(text).unwrap_err();
        let keys: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert!(
            keys.contains(&("timeouts.backend_pool_wait", 2)),
            "{errs:?}"
        );
        assert!(keys.contains(&("backend[0].down_after", 9)), "{errs:?}");
        assert!(
            keys.contains(&("backend[0].probe_interval_max", 8)),
            "{errs:?}"
        );
        let ok = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n",
        )
        .unwrap();
        let b = &ok.backends[0];
        assert_eq!(
            (b.down_after, b.probe_interval, b.probe_interval_max),
            (3, 2.0, 60.0)
        );
        assert_eq!(ok.timeouts.backend_pool_wait, 30.0);
    }

    #[test]
    fn pool_sizes_are_bounded() {
        let text = |keys: &str| {
            format!(
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n{keys}"
            )
        };
        let errs = errors_of(&text("max_connections = 2305843009213693952\n"));
        assert_eq!(errs[0].0, "backend[0].max_connections", "{errs:?}");
        // A cap above the pool is the pool's size (the default 16 on a
        // pool of 3 stays valid).
        for ok in [
            "max_connecting = 0\n",
            "max_connections = 8\nmax_connecting = 8\n",
            "max_connections = 3\n",
            "max_connecting = 9223372036854775807\n",
            "",
        ] {
            assert!(errors_of(&text(ok)).is_empty(), "{ok}");
        }
    }

    #[test]
    fn backend_needs_exactly_one_kind() {
        let errs = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\nmax_connections = 3\n",
        )
        .unwrap_err();
        assert_eq!(errs[0].key, "backend[0]");
        assert_eq!(errs[0].line, 3);
    }

    #[test]
    fn thread_per_core_needs_a_connection_per_core() {
        let errs = errors_of(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n\
             max_connections = 3\n[[backend]]\nmaildir = \"/tmp/m\"\n\
             [runtime]\nflavor = \"thread_per_core\"\nworker_threads = 4\n",
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].0.as_str(), errs[0].1),
            ("backend[0].max_connections", 5)
        );
        assert!(errs[0].2.contains("4 cores"), "{}", errs[0].2);
        // Enough for every core, or not thread-per-core: no error.
        for ok in [
            "max_connections = 4\n[runtime]\nflavor = \"thread_per_core\"\nworker_threads = 4\n",
            "max_connections = 3\n[runtime]\nflavor = \"multi_thread\"\nworker_threads = 4\n",
        ] {
            let text = format!(
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n{ok}"
            );
            assert!(errors_of(&text).is_empty(), "{text}");
        }
    }

    /// Writes an ECDSA (rcgen's default) pair for `name` as `<stem>.crt` /
    /// `<stem>.key`.
    fn pair(dir: &Path, stem: &str, name: &str) -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (c, k) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, ck.cert.pem()).unwrap();
        std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }

    /// The errors of `text` as (key, line, message); none when it parses.
    fn errors_of(text: &str) -> Vec<(String, usize, String)> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(errs) => errs
                .into_iter()
                .map(|e| (e.key, e.line, e.message))
                .collect(),
        }
    }

    fn tls_errors(tls: &str) -> Vec<(String, usize, String)> {
        errors_of(&format!(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n{tls}"
        ))
    }

    #[test]
    fn tls_both_forms_and_the_list_form() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair(dir.path(), "a", "a.test");
        let (c2, k2) = pair(dir.path(), "b", "b.test");
        // The short form, and the list form with names, parse.
        assert!(tls_errors(&format!(
            "[tls]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\n"
        ))
        .is_empty());
        let list = format!(
            "[tls]\nsession_tickets = false\nsession_cache_size = 0\n\
             [[tls.certificates]]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\n\
             [[tls.certificates]]\ncertificate = \"{c2}\"\nprivate_key = \"{k2}\"\nnames = [\"mx.b.test\", \"*.b.test\"]\n"
        );
        assert!(tls_errors(&list).is_empty(), "{:?}", tls_errors(&list));
        let c = Config::parse(&format!(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n{list}"
        ))
        .unwrap();
        let t = c.tls.unwrap();
        assert!(!t.session_tickets);
        assert_eq!(t.session_cache_size, 0);
        let e = t.entries();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].key, "tls.certificates[1]");
        // Defaults: tickets on, a cache of 10240.
        let c = Config::parse(&format!("[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n[tls]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\n")).unwrap();
        let t = c.tls.unwrap();
        assert!(t.session_tickets);
        assert_eq!(t.session_cache_size, 10_240);
    }

    #[test]
    fn tls_errors_named_with_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair(dir.path(), "a", "a.test");
        let (c2, k2) = pair(dir.path(), "b", "b.test");
        let has = |errs: &[(String, usize, String)], key: &str, line: usize, msg: &str| {
            assert!(
                errs.iter()
                    .any(|(k, l, m)| k == key && *l == line && m.contains(msg)),
                "want {key} line {line} ~ {msg:?}: {errs:?}"
            );
        };
        // Lines 1-4 are the listener and backend.
        let both = format!(
            "[tls]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\n[[tls.certificates]]\ncertificate = \"{c2}\"\nprivate_key = \"{k2}\"\n"
        );
        has(&tls_errors(&both), "tls.certificates", 8, "not both");
        let mismatch = format!(
            "[tls]\n[[tls.certificates]]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\n[[tls.certificates]]\ncertificate = \"{c2}\"\nprivate_key = \"{k1}\"\n"
        );
        has(
            &tls_errors(&mismatch),
            "tls.certificates[1].private_key",
            11,
            "does not match",
        );
        let short = format!("[tls]\ncertificate = \"{c1}\"\nprivate_key = \"{k2}\"\n");
        has(&tls_errors(&short), "tls.private_key", 7, "does not match");
        let missing = format!(
            "[tls]\ncertificate = \"{}/none.crt\"\nprivate_key = \"{k1}\"\n",
            dir.path().display()
        );
        has(&tls_errors(&missing), "tls.certificate", 6, "none.crt");
        let garbage = dir.path().join("garbage.key");
        std::fs::write(&garbage, "not a key\n").unwrap();
        let bad_key = format!(
            "[tls]\ncertificate = \"{c1}\"\nprivate_key = \"{}\"\n",
            garbage.display()
        );
        has(&tls_errors(&bad_key), "tls.private_key", 7, "garbage.key");
        has(
            &tls_errors("[tls]\ncertificates = []\n"),
            "tls.certificates",
            6,
            "at least one",
        );
        has(
            &tls_errors("[tls]\nsession_tickets = true\n"),
            "tls",
            5,
            "no certificate",
        );
        has(
            &tls_errors(&format!("[tls]\ncertificate = \"{c1}\"\n")),
            "tls.private_key",
            5,
            "required",
        );
        let names = format!(
            "[tls]\n[[tls.certificates]]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\nnames = [\"a b\"]\n"
        );
        has(
            &tls_errors(&names),
            "tls.certificates[0].names",
            9,
            "not a DNS name",
        );
        let cache = format!(
            "[tls]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\nsession_cache_size = 2000000\n"
        );
        has(&tls_errors(&cache), "tls.session_cache_size", 8, "at most");
        has(
            &tls_errors(&format!(
                "[tls]\ncertificate = \"{c1}\"\nprivate_key = \"{k1}\"\nsession_cache_size = -1\n"
            )),
            "tls.session_cache_size",
            8,
            "",
        );
    }

    /// `[[backend]]` TLS keys: each error names its key and line.
    #[test]
    fn backend_tls_errors_named_with_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair(dir.path(), "a", "a.test");
        let (_, k2) = pair(dir.path(), "b", "b.test");
        let parse = |backend: &str| {
            errors_of(&format!(
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\n{backend}"
            ))
        };
        let has = |errs: &[(String, usize, String)], key: &str, line: usize, msg: &str| {
            assert!(
                errs.iter()
                    .any(|(k, l, m)| k == key && *l == line && m.contains(msg)),
                "want {key} line {line} ~ {msg:?}: {errs:?}"
            );
        };
        // A client certificate and a CA file that are fine.
        assert_eq!(
            parse(&format!(
                "address = \"a:25\"\ntls = \"starttls\"\ntls_ca = \"{c1}\"\ntls_certificate = \"{c1}\"\ntls_private_key = \"{k1}\"\n"
            )),
            Vec::new()
        );
        // TLS keys on a Maildir backend.
        let e = parse("maildir = \"/tmp/m\"\ntls = \"starttls\"\ntls_verify = false\n");
        has(&e, "backend[0].tls", 5, "not to a Maildir");
        has(&e, "backend[0].tls_verify", 6, "not to a Maildir");
        // tls_verify = false (or any TLS key) without TLS.
        let e = parse("address = \"a:25\"\ntls_verify = false\n");
        has(&e, "backend[0].tls_verify", 5, "without TLS");
        // Unreadable files, a key that is not its certificate's, half a pair.
        let e = parse(
            "address = \"a:25\"\ntls = \"implicit\"\ntls_ca = \"/nonexistent/ca.pem\"\ntls_certificate = \"/nonexistent/c.pem\"\ntls_private_key = \"/nonexistent/k.pem\"\n",
        );
        has(&e, "backend[0].tls_ca", 6, "/nonexistent/ca.pem");
        has(&e, "backend[0].tls_certificate", 7, "/nonexistent/c.pem");
        let e = parse(&format!(
            "address = \"a:25\"\ntls = \"starttls\"\ntls_certificate = \"{c1}\"\ntls_private_key = \"{k2}\"\n"
        ));
        has(&e, "backend[0].tls_private_key", 7, "does not match");
        let e = parse(&format!(
            "address = \"a:25\"\ntls = \"starttls\"\ntls_certificate = \"{c1}\"\n"
        ));
        has(
            &e,
            "backend[0].tls_private_key",
            3,
            "required with tls_certificate",
        );
        // A name no certificate can carry; an unknown mode.
        let e = parse("address = \"a:25\"\ntls = \"starttls\"\ntls_server_name = \"not a name\"\n");
        has(&e, "backend[0].tls_server_name", 6, "not a DNS name");
        let e = parse("address = \"a:25\"\ntls = \"sometimes\"\n");
        has(&e, "backend[0].tls", 5, "unknown variant");
    }
}
