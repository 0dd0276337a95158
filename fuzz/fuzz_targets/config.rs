//! Fuzz target: the config loader (`Config::parse`). No panic on any TOML
//! (any bytes that are UTF-8). A config that parses is valid, so what is
//! built from it at start and at reload must not fail on it either: the
//! backends (`Backends::new`, every duration made from the file) and the
//! policy (`Policy::new`). Side effects are kept out: Maildir backends are
//! turned into (never dialled) SMTP backends, and a config with Redis
//! rates skips the policy (its worker would dial the URL).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smtp_edge::config::Config;
use smtp_edge::telemetry::metrics::Metrics;
use smtp_edge::policy::Policy;
use smtp_edge::relay::Backends;
use smtp_edge::server::needs_restart;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut cfg = match Config::parse(text) {
        Ok(cfg) => cfg,
        Err(errors) => {
            assert!(!errors.is_empty());
            return;
        }
    };
    let again = Config::parse(text).expect("parses twice");
    assert!(needs_restart(&cfg, &again).is_empty());
    for b in &mut cfg.backends {
        if b.maildir.take().is_some() {
            b.address = Some("127.0.0.1:9".into());
        }
    }
    let _rt = runtime().enter();
    Backends::new(&cfg, &Metrics::new()).expect("relay");
    if !cfg.policy.limits.uses_redis() {
        Policy::new(&cfg.policy, &cfg.hostname).expect("policy");
    }
});
