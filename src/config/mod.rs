//! TOML configuration: `Config` and its section types, their defaults, the
//! embedded default and loading/parsing. Every error names its key and line;
//! unknown keys are errors. Owns no runtime state.
//!
//! Sections here: `ListenerConfig` (with `TlsMode`), `SessionLimits`,
//! `Timeouts`, `SmtpConfig`, `BackendConfig` (with `IdentityMode`),
//! `AdminConfig`; `[[route]]` in `routes` (`RouteConfig`, `DomainPattern`);
//! `[runtime]` in `runtime` (`RuntimeConfig`: the tokio scheduler main
//! builds). Sections owned by their subsystem: `[tls]`
//! (`tls::settings`), `[policy]` (`policy::settings`, checked by
//! `PolicyConfig::validate`), `[telemetry]` (`telemetry::settings`).
//! `EMBEDDED_DEFAULT` is what runs without `--config` (127.0.0.1:2525,
//! STARTTLS, Maildir `var/mail`). `config/smtp-edge.toml` documents every
//! key (tests/cli.rs checks that it passes `check-config`).
//!
//! Children: `toml_paths` (a leaf: [`ConfigError`], keys' lines,
//! deserializing with every error collected: it re-deserializes after
//! removing each offending key) and `validate` (the checks of each
//! section's values, in `impl Config`).

mod routes;
mod runtime;
mod toml_paths;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::settings::PolicyConfig;
use crate::smtp::BareLineEndings;
pub use crate::telemetry::settings::{LogFormat, OtlpProtocol, TelemetryConfig};
pub use crate::tls::settings::{CertificateConfig, CertificateEntry, TlsConfig, MAX_SESSION_CACHE};

pub use self::routes::{DomainPattern, RouteConfig, DEFAULT_GROUP};
pub use self::runtime::{Flavor, RuntimeConfig};
pub use self::toml_paths::ConfigError;
use self::toml_paths::KeyLines;

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
    pub limits: SessionLimits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Which group of backends takes which recipient domains; empty: every
    /// domain goes to every backend.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Admission policy: lists, limits, HELO / rDNS / DNSBL checks.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The admin HTTP listener (metrics, health); absent: off.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Logs and OpenTelemetry trace export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The event loop: scheduler flavor, threads, fairness knobs.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// `[admin]`: where `/metrics`, `/livez`, `/readyz`, `/bans` and `/top`
/// are served, and who may change anything through it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// Networks allowed to `POST` and `DELETE` (`/reload`, `/bans`);
    /// anyone else gets 403. Reading stays open to all who reach it.
    #[serde(default = "loopback")]
    pub write_from: Vec<ipnet::IpNet>,
}

fn loopback() -> Vec<ipnet::IpNet> {
    vec![
        "127.0.0.1/32".parse().expect("a network"),
        "::1/128".parse().expect("a network"),
    ]
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

/// `[limits]`: what one client session may send.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionLimits {
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

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
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

/// TLS to an SMTP backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendTlsMode {
    /// Plaintext.
    #[default]
    None,
    /// STARTTLS when the backend offers it, plaintext otherwise.
    Opportunistic,
    /// STARTTLS, required: without it nothing is sent.
    Starttls,
    /// TLS from the first byte (port 465 style), required.
    Implicit,
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
    /// The group `[[route]]`s name to send recipients here.
    #[serde(default = "default_group")]
    pub group: String,
    #[serde(default)]
    pub identity: IdentityMode,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connects (with greeting and EHLO) in flight at once (0 = no cap):
    /// a burst is served by connections given back rather than by
    /// hundreds of new ones at the same moment.
    #[serde(default = "default_max_connecting")]
    pub max_connecting: usize,
    /// Seconds an idle pooled connection is kept.
    #[serde(default = "default_max_idle")]
    pub max_idle: f64,
    /// Seconds a connection is used at most from when it was opened: past
    /// it, QUIT after its transaction and never handed out again (0 = no
    /// limit).
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: f64,
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
    /// TLS to this backend.
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// Check the backend's certificate chain and name (false: any
    /// certificate; logged as a warning at start).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// The name the certificate must carry (default: the host of
    /// `address`, a DNS name or an IP address).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// PEM file of CA certificates trusted besides the system's.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM chain) and key for mTLS.
    #[serde(default)]
    pub tls_certificate: Option<PathBuf>,
    #[serde(default)]
    pub tls_private_key: Option<PathBuf>,
}

fn default_group() -> String {
    DEFAULT_GROUP.to_string()
}
fn default_true() -> bool {
    true
}

fn default_hostname() -> String {
    "localhost".into()
}
fn default_max_connections() -> usize {
    64
}
fn default_max_connecting() -> usize {
    16
}
fn default_max_idle() -> f64 {
    60.0
}
fn default_max_lifetime() -> f64 {
    600.0
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
        let lines = KeyLines::parse(text).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        let config = toml_paths::deserialize_all::<Config>(text, &lines, &mut errors);
        let Some(config) = config else {
            return Err(errors);
        };
        config.validate(&mut errors, &|key: &str| lines.line_for(key));
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
    fn removed_key_says_why() {
        let text = "[[listener]]\naddress = \"127.0.0.1:25\"\n[telemetry]\nmetrics_interval = 10\n[[backend]]\naddress = \"127.0.0.1:26\"\n";
        let errs = Config::parse(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("telemetry.metrics_interval", 4)
        );
        assert!(errs[0].message.starts_with("removed: "), "{errs:?}");
        assert!(errs[0].message.contains("/metrics"), "{errs:?}");
    }

    #[test]
    fn syntax_error_has_line() {
        let errs = Config::parse("hostname = \"a\"\n[limits\n").unwrap_err();
        assert_eq!(errs[0].line, 2, "{errs:?}");
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a.b:25"), Some(("a.b", 25)));
        assert_eq!(split_host_port("[::1]:25"), Some(("::1", 25)));
        assert_eq!(split_host_port("a.b"), None);
    }
}
