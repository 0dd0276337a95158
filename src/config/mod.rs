//! TOML configuration: types, defaults, loading and validation. Every error
//! names its key and line; unknown keys are errors. Owns no runtime state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::settings::PolicyConfig;
use crate::smtp::BareLineEndings;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name used in the greeting, EHLO reply, Received header and backend EHLO.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Admission policy: lists, limits, HELO / rDNS / DNSBL checks.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The admin HTTP listener (metrics, health); absent: off.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Logs and OpenTelemetry trace export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: log format and OTLP trace export.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `http://host:port` of an OTLP receiver; absent: no export.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    pub service_name: String,
    /// Share of sessions traced (decided at accept), 0.0 to 1.0.
    pub sample_ratio: f64,
    pub log_format: LogFormat,
    /// Envelope local parts in span attributes (domains only when false).
    pub record_addresses: bool,
    /// Most spans waiting for export; past it spans are dropped and counted.
    pub export_queue: usize,
    /// Seconds between pushes of the metrics over OTLP (0: never).
    pub metrics_interval: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            service_name: "smtp-edge".into(),
            sample_ratio: 1.0,
            log_format: LogFormat::Text,
            record_addresses: false,
            export_queue: 8192,
            metrics_interval: 10.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318; `/v1/traces` is added).
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    /// JSON lines, with the span fields (the session's trace_id) on each.
    Json,
}

/// `[admin]`: where `/metrics`, `/livez` and `/readyz` are served.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub require_tls: bool,
    /// Listen queue length (the kernel caps it at net.core.somaxconn).
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// Every connection starts with a PROXY protocol v1 or v2 header from a
    /// load balancer; its addresses are the client's for everything.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Sources allowed to send that header; others are closed at accept.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Seconds for the whole header to arrive.
    #[serde(default = "default_proxy_header_timeout")]
    pub proxy_header_timeout: f64,
}

fn default_proxy_header_timeout() -> f64 {
    5.0
}

fn default_backlog() -> u32 {
    1024
}

/// `[tls]`: the certificates (one pair, or a list of pairs chosen per
/// handshake by the client's signature algorithms and SNI) and session
/// resumption.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The short form: one pair. Exclusive with `certificates`.
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// `[[tls.certificates]]`: several pairs (RSA and ECDSA side by side,
    /// other names); the first that fits is the default.
    pub certificates: Option<Vec<CertificateConfig>>,
    /// TLS 1.3 and 1.2 session tickets, keys rotated by rustls.
    #[serde(default = "default_true")]
    pub session_tickets: bool,
    /// Sessions kept in memory for resumption by session id (TLS 1.2) or
    /// stateful ticket (TLS 1.3 without tickets); 0: none.
    #[serde(default = "default_session_cache_size")]
    pub session_cache_size: usize,
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// Names SNI selects it by; absent: the certificate's subjectAltName.
    pub names: Option<Vec<String>>,
}

/// A certificate pair of `[tls]` with the key its settings are under
/// (`tls` or `tls.certificates[i]`), for error messages.
pub struct CertificateEntry<'a> {
    pub key: String,
    pub certificate: &'a Path,
    pub private_key: &'a Path,
    pub names: Option<&'a [String]>,
}

/// Most sessions `session_cache_size` may keep (a few hundred bytes each).
pub const MAX_SESSION_CACHE: usize = 1_000_000;

fn default_true() -> bool {
    true
}

fn default_session_cache_size() -> usize {
    10_240
}

impl TlsConfig {
    /// The pairs, in the order of the file (one for the short form).
    pub fn entries(&self) -> Vec<CertificateEntry<'_>> {
        match (&self.certificates, &self.certificate, &self.private_key) {
            (Some(list), _, _) => list
                .iter()
                .enumerate()
                .map(|(i, c)| CertificateEntry {
                    key: format!("tls.certificates[{i}]"),
                    certificate: &c.certificate,
                    private_key: &c.private_key,
                    names: c.names.as_deref(),
                })
                .collect(),
            (None, Some(c), Some(k)) => vec![CertificateEntry {
                key: "tls".into(),
                certificate: c,
                private_key: k,
                names: None,
            }],
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub max_bad_commands: u32,
    /// NOOP, RSET, VRFY, HELP, EHLO/HELO allowed between two messages
    /// (Postfix's smtpd_junk_command_limit); 0 = no limit.
    pub max_junk_commands: u32,
    /// Bytes per second a message's data must average, beyond a grace of
    /// `timeouts.data_block`, counting only the time spent waiting for the
    /// client (`timer::Pace`); 0 = no minimum.
    pub min_data_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 52_428_800,
            max_recipients: 100,
            max_command_line: 512,
            max_text_line: 1000,
            max_bad_commands: 20,
            max_junk_commands: 100,
            min_data_rate: 1024,
        }
    }
}

/// All in seconds (fractions allowed).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub command: f64,
    pub data_block: f64,
    pub tls_handshake: f64,
    pub backend_connect: f64,
    pub backend_pool_wait: f64,
    pub backend_command: f64,
    pub backend_data_end: f64,
    pub shutdown_grace: f64,
    /// On SIGTERM: seconds `/readyz` answers 503 while the listeners still
    /// accept, before they close (0: close at once).
    pub drain_delay: f64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command: 300.0,
            data_block: 180.0,
            tls_handshake: 30.0,
            backend_connect: 10.0,
            backend_pool_wait: 30.0,
            backend_command: 300.0,
            backend_data_end: 600.0,
            shutdown_grace: 30.0,
            drain_delay: 0.0,
        }
    }
}

impl Timeouts {
    pub fn dur(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// What to do with bare CR / LF in message data.
    pub bare_line_endings: BareLineEndingsConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndingsConfig {
    #[default]
    Reject,
    Normalize,
}

impl From<BareLineEndingsConfig> for BareLineEndings {
    fn from(v: BareLineEndingsConfig) -> Self {
        match v {
            BareLineEndingsConfig::Reject => BareLineEndings::Reject,
            BareLineEndingsConfig::Normalize => BareLineEndings::Normalize,
        }
    }
}

/// How the client's identity is passed to an SMTP backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// XFORWARD before every MAIL on pooled connections (Postfix
    /// `smtpd_authorized_xforward_hosts`).
    #[default]
    Xforward,
    /// XCLIENT once per client session on a dedicated backend connection.
    Xclient,
    /// Pass nothing (the Received header still names the client).
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `host:port` of an SMTP backend.
    #[serde(default)]
    pub address: Option<String>,
    /// Directory of the built-in Maildir backend.
    #[serde(default)]
    pub maildir: Option<PathBuf>,
    #[serde(default)]
    pub identity: IdentityMode,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds an idle pooled connection is kept.
    #[serde(default = "default_max_idle")]
    pub max_idle: f64,
    #[serde(default = "default_max_transactions")]
    pub max_transactions: u32,
    /// Failed connects or greetings in a row that mark the backend down
    /// (0 = never).
    #[serde(default = "default_down_after")]
    pub down_after: u32,
    /// Seconds before the first probe of a down backend; doubles per failed
    /// probe up to `probe_interval_max`.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: f64,
    #[serde(default = "default_probe_interval_max")]
    pub probe_interval_max: f64,
}

fn default_hostname() -> String {
    "localhost".into()
}
fn default_max_connections() -> usize {
    64
}
fn default_max_idle() -> f64 {
    60.0
}
fn default_max_transactions() -> u32 {
    1000
}
fn default_down_after() -> u32 {
    3
}
fn default_probe_interval() -> f64 {
    2.0
}
fn default_probe_interval_max() -> f64 {
    60.0
}

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

/// All the errors found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {e}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The configuration used when smtp-edge runs without `--config`.
pub const EMBEDDED_DEFAULT: &str = r#"
hostname = "localhost"
[[listener]]
address = "127.0.0.1:2525"
tls = "starttls"
[[backend]]
maildir = "var/mail"
"#;

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: file.clone(),
            errors: vec![ConfigError {
                key: String::new(),
                line: 0,
                message: format!("cannot read: {e}"),
            }],
        })?;
        Config::parse(&text).map_err(|errors| ConfigErrors { file, errors })
    }

    /// Parses and validates TOML text, collecting every error found.
    pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
        let original = match toml_edit::Document::parse(text) {
            Ok(d) => d,
            Err(e) => {
                return Err(vec![ConfigError {
                    key: String::new(),
                    line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
                    message: e.message().trim().to_string(),
                }])
            }
        };
        let orig_keys = key_spans(original.as_item());
        // A key's line; for a key that is missing, its table's line.
        let line_for = |key: &str| {
            let mut k = key;
            loop {
                if let Some((_, s)) = orig_keys.iter().find(|(p, _)| p == k) {
                    return line_of(text, s.start);
                }
                match k.rsplit_once('.') {
                    Some((parent, _)) => k = parent,
                    None => return 0,
                }
            }
        };
        // Deserialize; on each error, record it, remove the offending key and
        // try again, so one run reports every type error and unknown key.
        let mut errors = Vec::new();
        let mut current = text.to_string();
        let mut config = None;
        for _ in 0..64 {
            match toml::from_str::<Config>(&current) {
                Ok(c) => {
                    config = Some(c);
                    break;
                }
                Err(e) => {
                    let cur_doc = toml_edit::Document::parse(current.as_str()).ok();
                    let path = match (e.span(), &cur_doc) {
                        (Some(span), Some(doc)) => path_at(doc, span.start),
                        _ => None,
                    };
                    let message = e.message().trim().to_string();
                    match path {
                        Some(path) => {
                            errors.push(ConfigError {
                                line: line_for(&path),
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
        let Some(config) = config else {
            return Err(errors);
        };
        config.validate(&mut errors, &line_for);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT).expect("embedded default config is valid")
    }

    fn validate(&self, errors: &mut Vec<ConfigError>, line_for: &dyn Fn(&str) -> usize) {
        let mut err = |key: String, message: String| {
            let line = line_for(&key);
            errors.push(ConfigError { key, line, message });
        };
        if self.hostname.is_empty()
            || !self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            err(
                "hostname".into(),
                "must be a domain name (letters, digits, '.', '-')".into(),
            );
        }
        if self.listeners.is_empty() {
            err(
                "listener".into(),
                "at least one [[listener]] is required".into(),
            );
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.require_tls && l.tls != TlsMode::Starttls {
                err(
                    format!("listener[{i}].require_tls"),
                    "require_tls needs tls = \"starttls\"".into(),
                );
            }
        }
        if let Some(tls) = &self.tls {
            validate_tls(tls, &mut err);
        }
        let l = &self.limits;
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
        let t = &self.timeouts;
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
        let tm = &self.telemetry;
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
        if !(tm.metrics_interval.is_finite() && (0.0..1e7).contains(&tm.metrics_interval)) {
            err(
                "telemetry.metrics_interval".into(),
                "must be a number of seconds >= 0".into(),
            );
        }
        if tm.export_queue == 0 {
            err("telemetry.export_queue".into(), "must be > 0".into());
        }
        if tm.service_name.is_empty() {
            err("telemetry.service_name".into(), "must not be empty".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
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
        if self.backends.is_empty() {
            err(
                "backend".into(),
                "at least one [[backend]] is required".into(),
            );
        }
        for (i, b) in self.backends.iter().enumerate() {
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
            if b.max_connections == 0 {
                err(
                    format!("backend[{i}].max_connections"),
                    "must be > 0".into(),
                );
            }
            // Bounded like every other seconds value: `Relay::new` makes a
            // `Duration` of it, which panics past ~1.8e19 s.
            if !(b.max_idle.is_finite() && b.max_idle >= 0.0 && b.max_idle < 1e7) {
                err(
                    format!("backend[{i}].max_idle"),
                    "must be a number of seconds >= 0".into(),
                );
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
        }
        self.policy.validate(&mut err);
    }
}

/// `[tls]`: one form or the other, and every pair loads (files readable,
/// the key the certificate's, `names` DNS names).
fn validate_tls(tls: &TlsConfig, err: &mut dyn FnMut(String, String)) {
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

/// Splits `host:port` (`[v6]:port` too) into its parts.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
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
fn key_spans(root: &toml_edit::Item) -> Vec<(String, std::ops::Range<usize>)> {
    fn walk(
        item: &toml_edit::Item,
        prefix: &str,
        span: Option<std::ops::Range<usize>>,
        out: &mut Vec<(String, std::ops::Range<usize>)>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].tls, TlsMode::Starttls);
        assert!(c.backends[0].maildir.is_some());
    }

    #[test]
    fn every_error_named_with_key_and_line() {
        let text = "hostname = \"mx.example.net\"\nbogus = 1\n[[listener]]\naddress = \"127.0.0.1:25\"\ntls = \"sometimes\"\n[limits]\nmax_recipients = \"many\"\n[[backend]]\naddress = \"nohostport\"\n";
        let errs = Config::parse(text).unwrap_err();
        let keys: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert!(keys.contains(&("bogus", 2)), "{errs:?}");
        assert!(keys.contains(&("listener[0].tls", 5)), "{errs:?}");
        assert!(keys.contains(&("limits.max_recipients", 7)), "{errs:?}");
        assert!(keys.contains(&("backend[0].address", 9)), "{errs:?}");
    }

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
    /// building the relay from it (`Duration::from_secs_f64`) panicked at
    /// start or reload.
    #[test]
    fn max_idle_bounded() {
        let text = |v: &str| {
            format!("[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\nmax_idle = {v}\n")
        };
        for bad in ["1e300", "1e7", "inf", "nan", "-1"] {
            let errs = Config::parse(&text(bad)).unwrap_err();
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert_eq!(
                (errs[0].key.as_str(), errs[0].line),
                ("backend[0].max_idle", 5)
            );
        }
        assert_eq!(
            Config::parse(&text("86400")).unwrap().backends[0].max_idle,
            86400.0
        );
    }

    #[test]
    fn errors_in_several_array_elements() {
        let text = "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\nmax_connections = \"x\"\n[[backend]]\naddress = \"b:25\"\nbogus = 1\n";
        let errs = Config::parse(text).unwrap_err();
        let keys: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert!(
            keys.contains(&("backend[0].max_connections", 5)),
            "{errs:?}"
        );
        assert!(keys.contains(&("backend[1].bogus", 8)), "{errs:?}");
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
    fn syntax_error_has_line() {
        let errs = Config::parse("hostname = \"a\"\n[limits\n").unwrap_err();
        assert_eq!(errs[0].line, 2, "{errs:?}");
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
    fn host_port() {
        assert_eq!(split_host_port("a.b:25"), Some(("a.b", 25)));
        assert_eq!(split_host_port("[::1]:25"), Some(("::1", 25)));
        assert_eq!(split_host_port("a.b"), None);
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

    fn tls_errors(tls: &str) -> Vec<(String, usize, String)> {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[backend]]\naddress = \"a:25\"\n{tls}"
        );
        match Config::parse(&text) {
            Ok(_) => Vec::new(),
            Err(errs) => errs
                .into_iter()
                .map(|e| (e.key, e.line, e.message))
                .collect(),
        }
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
}
