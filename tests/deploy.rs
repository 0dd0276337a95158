//! The files in deploy/ checked with real tools and parsers, and run where
//! they can be.
//!
//! The Grafana dashboard must be valid JSON, shaped the way Grafana
//! imports and provisions it (uid, schema version, the `DS_PROMETHEUS`
//! data source), and every PromQL query in it must name series the proxy
//! exports, group by labels those series carry, and use `rate` on counters
//! and histograms only. What the proxy exports is read from a real scrape
//! of a bound server.
//!
//! The deployment files (the second half): HAProxy's config with
//! `haproxy -c` and run in front of two real instances, the systemd unit
//! with `systemd-analyze verify` and `security` and its command lines run,
//! the Kubernetes manifests with kubernetes-validate, compose.yaml with the
//! Compose schema and a Compose implementation, the Dockerfiles with
//! hadolint and the image's HEALTHCHECK run against the real binary,
//! Postfix's main.cf with `postconf`, every smtp-edge config with
//! `smtp-edge check-config`, and the values the files share (ports, paths,
//! drain timings, users) checked against each other. A missing tool skips
//! a test, except under CI=true, where it fails it (.ci/run installs them).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;
use smtp_edge::config::Config;
use smtp_edge::server::Server;

const DASHBOARD: &str = "deploy/observability/grafana-dashboard.json";
const DATASOURCE: &str = "${DS_PROMETHEUS}";

/// Everything that makes the proxy export all of its metrics: a backend
/// (pool gauges, per-backend counters and histograms), `[admin]`, and a
/// policy with DNS checks (the DNS cache counters). Nothing is served and
/// the backend is never connected to during the scrape.
const CONFIG: &str = r#"
hostname = "edge.test"
[admin]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:0"
[[backend]]
address = "127.0.0.1:9"
[policy.rdns]
lookup = true
[policy.dns]
nameservers = ["127.0.0.1:9"]
timeout = 0.5
attempts = 1
[policy.dnsbl]
action = "observe"
[[policy.dnsbl.zone]]
name = "bl.example"
[policy.limits.connection_rate]
action = "observe"
per_ip = { count = 100, period = 1 }
store = "redis"
[policy.limits.redis]
url = "redis://127.0.0.1:9"
[policy.bans]
store = "redis"
"#;

/// Labels Prometheus attaches to every scraped series (the target's).
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, including those nested in collapsed rows.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// `(where, expr)` of every panel target.
fn panel_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"));
            let at = format!("panel {title:?} target {}", t["refId"]);
            out.push((at, expr.to_string()));
        }
    }
    out
}

/// `(name, query)` of every templating variable backed by a query.
fn variable_queries(dash: &Value) -> Vec<(String, String)> {
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    vars.iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().expect("variable name").to_string();
            let q = &v["query"];
            let q = q.get("query").unwrap_or(q).as_str();
            (
                name.clone(),
                q.unwrap_or_else(|| panic!("${name}: no query")).to_string(),
            )
        })
        .collect()
}

/// What a scrape offers to PromQL.
struct Exported {
    /// Family name (as on its `# TYPE` line) to type.
    families: BTreeMap<String, String>,
    /// Series name a query can select to its family and its label names.
    series: BTreeMap<String, (String, BTreeSet<String>)>,
    /// Families with at least one sample (their label names are known).
    sampled: BTreeSet<String>,
}

impl Exported {
    /// Parses the Prometheus text format: families from the `# TYPE`
    /// lines (a family with no label set yet has no samples), label names
    /// from the sample lines.
    fn parse(text: &str) -> Exported {
        let mut families = BTreeMap::new();
        let mut series = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            families.insert(name.to_string(), kind.to_string());
            let names = match kind {
                "histogram" => vec![
                    format!("{name}_bucket"),
                    format!("{name}_sum"),
                    format!("{name}_count"),
                ],
                // The encoder names a counter's family `x_total` already.
                "counter" => {
                    assert!(name.ends_with("_total"), "counter {name} without _total");
                    vec![name.to_string()]
                }
                _ => vec![name.to_string()],
            };
            for s in names {
                let labels = if s.ends_with("_bucket") {
                    BTreeSet::from(["le".to_string()])
                } else {
                    BTreeSet::new()
                };
                series.insert(s, (name.to_string(), labels));
            }
        }
        let mut sampled = BTreeSet::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (name, labels) = sample(line);
            let (family, known) = series
                .get_mut(name)
                .unwrap_or_else(|| panic!("sample {name} of no # TYPE family: {line}"));
            known.extend(labels);
            sampled.insert(family.clone());
        }
        Exported {
            families,
            series,
            sampled,
        }
    }
}

/// Name and label names of one sample line: `name{k="v",...} value`.
fn sample(line: &str) -> (&str, Vec<String>) {
    let end = line.find(['{', ' ']).expect("sample line");
    let (name, mut rest) = line.split_at(end);
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        rest = body;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = rest.split_once("=\"").expect("label=\"value\"");
            labels.push(key.to_string());
            // Skip the value, honouring \" and \\ escapes.
            let mut chars = r.char_indices();
            let close = loop {
                match chars.next().expect("closing quote") {
                    (_, '\\') => {
                        chars.next();
                    }
                    (i, '"') => break i,
                    _ => {}
                }
            };
            rest = &r[close + 1..];
        }
    }
    assert!(
        rest.trim().parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&rest.trim()),
        "sample value: {line}"
    );
    (name, labels)
}

/// Scrapes a server bound with [`CONFIG`] (nothing is served).
async fn exported() -> Exported {
    let cfg = Config::parse(CONFIG).unwrap_or_else(|e| panic!("config: {e:?}"));
    let server = Server::bind(cfg).await.expect("bind");
    let m = server.metrics();
    // One label set in each labelled family that is empty until traffic
    // arrives, so the scrape shows their label names.
    m.refused("deny_list");
    m.tls("ok", "TLSv1_3");
    m.transaction(250);
    m.route_refusal("no_route");
    m.backend("127.0.0.1:9", "default")
        .tls_failure("certificate");
    let text = server.stats().encode();
    let e = Exported::parse(&text);
    assert!(e.families.len() > 10, "a thin scrape:\n{text}");
    // A labelled family prints only its # TYPE line until a label set
    // exists; without a sample its label names are unknown.
    for f in e.families.keys() {
        assert!(
            e.sampled.contains(f),
            "{f} has no sample: give it a label set in exported()\n{text}"
        );
    }
    e
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A Grafana variable: `$var` or `${var}`.
    Var,
    Num,
    Str,
    Punct(char),
}

/// A PromQL lexer, enough to find metric names, label names and ranges:
/// tokens with their byte offsets in `expr`.
fn lex(expr: &str) -> Vec<(Tok, usize)> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let tok = if c.is_ascii_whitespace() {
            i += 1;
            continue;
        } else if c == b'"' || c == b'\'' || c == b'`' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            assert!(i < b.len(), "unterminated string in {expr}");
            i += 1;
            Tok::Str
        } else if c == b'$' {
            i += 1;
            if b.get(i) == Some(&b'{') {
                while i < b.len() && b[i] != b'}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
            }
            Tok::Var
        } else if c.is_ascii_digit() || c == b'.' {
            // Numbers and durations (0.99, 1e3, 5m).
            while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
            Tok::Num
        } else if ident(c) {
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            Tok::Ident(expr[start..i].to_string())
        } else {
            i += 1;
            Tok::Punct(c as char)
        };
        out.push((tok, start));
    }
    out
}

/// What one query uses: series names and label names.
#[derive(Debug, Default)]
struct Uses {
    series: Vec<String>,
    labels: BTreeSet<String>,
}

/// Checks the shape of one PromQL expression and returns what it uses.
/// Problems go into `errs`, prefixed with `at`.
fn analyse(at: &str, expr: &str, exported: &Exported, errs: &mut Vec<String>) -> Uses {
    let toks = lex(expr);
    let tok = |j: usize| toks.get(j).map(|(t, _)| t);
    let mut uses = Uses::default();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Ident(name) if name.starts_with("smtp_edge_") => {
                uses.series.push(name.clone());
                // The selector's label matchers: the names are identifiers,
                // the values strings.
                let mut j = i + 1;
                if tok(j) == Some(&Tok::Punct('{')) {
                    while j < toks.len() && toks[j].0 != Tok::Punct('}') {
                        if let Tok::Ident(l) = &toks[j].0 {
                            uses.labels.insert(l.clone());
                        }
                        j += 1;
                    }
                    j += 1;
                }
                let ranged = tok(j) == Some(&Tok::Punct('['));
                if ranged {
                    let open = toks[j].1 + 1;
                    let close = expr[open..].find(']').map_or(expr.len(), |c| open + c);
                    let window = expr[open..close].trim();
                    if window != "$__rate_interval" && window != "$__range" {
                        errs.push(format!(
                            "{at}: {name}[{window}]: use [$__rate_interval] (or [$__range])"
                        ));
                    }
                }
                if let Some((family, _)) = exported.series.get(name) {
                    let kind = exported.families[family].as_str();
                    let counting = kind == "counter" || kind == "histogram";
                    if counting && !ranged {
                        errs.push(format!("{at}: {kind} {name} used without rate()"));
                    }
                    if !counting && ranged {
                        errs.push(format!("{at}: {kind} {name} used with a range"));
                    }
                }
                i = j;
            }
            Tok::Ident(kw)
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&kw.as_str())
                    && tok(i + 1) == Some(&Tok::Punct('(')) =>
            {
                let mut j = i + 2;
                while j < toks.len() && toks[j].0 != Tok::Punct(')') {
                    if let Tok::Ident(l) = &toks[j].0 {
                        uses.labels.insert(l.clone());
                    }
                    j += 1;
                }
                i = j + 1;
            }
            Tok::Punct('{') => {
                errs.push(format!("{at}: a selector without a smtp_edge_ metric name"));
                i += 1;
            }
            _ => i += 1,
        }
    }
    if uses.series.is_empty() {
        errs.push(format!("{at}: names no smtp_edge_ metric: {expr}"));
    }
    for s in &uses.series {
        if !exported.series.contains_key(s) {
            errs.push(format!("{at}: {s} is not exported"));
        }
    }
    // Each label must be carried by one of the series the query selects
    // (checked once every series is known).
    if uses.series.iter().any(|s| !exported.series.contains_key(s)) {
        return uses;
    }
    let carried: BTreeSet<&String> = uses
        .series
        .iter()
        .filter_map(|s| exported.series.get(s))
        .flat_map(|(_, l)| l)
        .collect();
    for l in &uses.labels {
        if !TARGET_LABELS.contains(&l.as_str()) && !carried.contains(l) {
            errs.push(format!("{at}: label {l} is on none of {:?}", uses.series));
        }
    }
    uses
}

#[test]
fn dashboard_is_importable_and_provisionable() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "smtp-edge");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dash["id"].is_null(), "an exported dashboard has id null");

    // The data source: an import input and a variable of the same name, so
    // both the import dialog and file provisioning resolve it.
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["name"] == "DS_PROMETHEUS"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no DS_PROMETHEUS datasource variable"
    );
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"]["uid"], DATASOURCE, "variable {}", v["name"]);
    }

    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title:?}: id"));
        assert!(ids.insert(id), "panel id {id} twice ({title:?})");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap() > 0,
            "{title:?}: {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title:?}: no description"
        );
        assert_eq!(p["datasource"]["uid"], DATASOURCE, "{title:?}");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        for t in targets.unwrap_or_else(|| panic!("{title:?}: no targets")) {
            assert_eq!(t["datasource"]["uid"], DATASOURCE, "{title:?}");
            queries += 1;
        }
    }
    assert!(queries >= 20, "only {queries} queries");
}

#[tokio::test]
async fn dashboard_queries_name_exported_metrics() {
    let dash = dashboard();
    let exported = exported().await;
    let mut errs = Vec::new();
    for (at, expr) in panel_queries(&dash) {
        analyse(&at, &expr, &exported, &mut errs);
    }
    // label_values(metric{...}, label) in the variables.
    for (name, q) in variable_queries(&dash) {
        let at = format!("variable ${name}");
        let Some(args) = q
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        else {
            errs.push(format!("{at}: not label_values(...): {q}"));
            continue;
        };
        let (selector, label) = args
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        let uses = analyse(&at, selector, &exported, &mut errs);
        let label = label.trim();
        if !TARGET_LABELS.contains(&label) {
            let carried = uses
                .series
                .iter()
                .filter_map(|s| exported.series.get(s))
                .any(|(_, l)| l.contains(label));
            if !carried {
                errs.push(format!(
                    "{at}: label {label} is on none of {:?}",
                    uses.series
                ));
            }
        }
    }
    assert!(errs.is_empty(), "{DASHBOARD}:\n{}", errs.join("\n"));
}

/// A metric added to the proxy shows up on the dashboard too.
#[tokio::test]
async fn dashboard_shows_every_exported_metric() {
    let dash = dashboard();
    let exported = exported().await;
    let mut shown = BTreeSet::new();
    for (at, expr) in panel_queries(&dash) {
        for s in analyse(&at, &expr, &exported, &mut Vec::new()).series {
            if let Some((family, _)) = exported.series.get(&s) {
                shown.insert(family.clone());
            }
        }
    }
    let missing: Vec<_> = exported
        .families
        .keys()
        .filter(|f| !shown.contains(*f))
        .collect();
    assert!(missing.is_empty(), "not on {DASHBOARD}: {missing:?}");
}

#[test]
fn the_checker_catches_what_it_should() {
    let exported = Exported::parse(
        "# HELP smtp_edge_a_total A.\n# TYPE smtp_edge_a_total counter\n\
         smtp_edge_a_total{k=\"v,}\\\"\",k2=\"\"} 1\n\
         # TYPE smtp_edge_g gauge\nsmtp_edge_g 2\n# TYPE smtp_edge_h_seconds histogram\n\
         smtp_edge_h_seconds_bucket{le=\"+Inf\"} 0\n\
         smtp_edge_h_seconds_sum 0\nsmtp_edge_h_seconds_count 0\n",
    );
    assert_eq!(
        exported.series.keys().collect::<Vec<_>>(),
        [
            "smtp_edge_a_total",
            "smtp_edge_g",
            "smtp_edge_h_seconds_bucket",
            "smtp_edge_h_seconds_count",
            "smtp_edge_h_seconds_sum"
        ]
    );
    assert_eq!(
        exported.series["smtp_edge_a_total"].1,
        BTreeSet::from(["k".to_string(), "k2".to_string()])
    );
    let errors = |expr: &str| {
        let mut errs = Vec::new();
        analyse("t", expr, &exported, &mut errs);
        errs
    };
    let rated = r#"sum by (k) (rate(smtp_edge_a_total{job=~"$job", k="}"}[$__rate_interval]))"#;
    assert_eq!(errors(rated), Vec::<String>::new());
    let quantile = "histogram_quantile(0.99, sum by (le) \
                    (rate(smtp_edge_h_seconds_bucket[$__rate_interval]))) / smtp_edge_g";
    assert_eq!(errors(quantile), Vec::<String>::new());
    for bad in [
        "sum(smtp_edge_a_total)",
        "rate(smtp_edge_a_total[5m])",
        "rate(smtp_edge_g[$__rate_interval])",
        "sum by (x) (rate(smtp_edge_a_total[$__rate_interval]))",
        "sum(smtp_edge_g{le=\"1\"})",
        "rate(smtp_edge_h_seconds[$__rate_interval])",
        "rate(smtp_edge_b_total[$__rate_interval])",
        "up",
        "rate({__name__=\"smtp_edge_a_total\"}[$__rate_interval])",
    ] {
        assert!(!errors(bad).is_empty(), "{bad} passes");
    }
}

// ===========================================================================
// Deployment files: deploy/{haproxy,systemd,docker,kubernetes}.

mod files {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use ipnet::IpNet;
    use yaml_rust2::{Yaml, YamlLoader};

    use crate::common::{free_port, http_get, require_tool, write_cert, Running};

    const BIN: &str = env!("CARGO_BIN_EXE_smtp-edge");
    /// Where .ci/run installs the tools that come from PyPI
    /// (kubernetes-validate, check-jsonschema, hadolint).
    const CI_VENV_BIN: &str = "/opt/smtp-edge-ci/venv/bin";
    /// The Kubernetes version the manifests are validated against.
    const KUBERNETES_VERSION: &str = "1.31.0";
    /// The binary's path in the systemd unit and the Dockerfile.
    const INSTALLED_BIN: &str = "/usr/local/bin/smtp-edge";

    pub fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    pub fn read(rel: &str) -> String {
        std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    /// A tool from .ci/run's virtualenv, else from PATH (None: skip; under
    /// CI a missing tool panics).
    fn tool(name: &str) -> Option<PathBuf> {
        let venv = Path::new(CI_VENV_BIN).join(name);
        if venv.is_file() {
            return Some(venv);
        }
        require_tool(name)
    }

    /// Runs `cmd` to its end (no stdin).
    fn run(cmd: &mut Command) -> Output {
        cmd.stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
    }

    /// stdout and stderr of `out`, one after the other.
    fn said(out: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn yaml_docs(rel: &str) -> Vec<Yaml> {
        YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: not YAML: {e}"))
    }

    /// The `.yaml` files of a directory of deploy/, sorted.
    fn yaml_files(dir: &str) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(repo(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .map(|n| format!("{dir}/{n}"))
            .collect();
        out.sort();
        out
    }

    fn s(y: &Yaml) -> &str {
        y.as_str().unwrap_or_else(|| panic!("not a string: {y:?}"))
    }

    fn int(y: &Yaml) -> i64 {
        y.as_i64()
            .unwrap_or_else(|| panic!("not an integer: {y:?}"))
    }

    fn list(y: &Yaml) -> &[Yaml] {
        y.as_vec().map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// A mapping with YAML merge keys (`<<: *anchor`) applied, the way
    /// Compose reads them (yaml-rust2 keeps `<<` as a plain key).
    fn merged(y: &Yaml) -> Yaml {
        let Some(h) = y.as_hash() else {
            return y.clone();
        };
        let mut out = yaml_rust2::yaml::Hash::new();
        if let Some(base) = h.get(&Yaml::String("<<".into())) {
            if let Yaml::Hash(b) = merged(base) {
                out.extend(b);
            }
        }
        for (k, v) in h {
            if k.as_str() != Some("<<") {
                out.insert(k.clone(), v.clone());
            }
        }
        Yaml::Hash(out)
    }

    /// The key=value lines of a systemd unit, in order.
    fn unit_entries(text: &str) -> Vec<(String, String)> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    fn unit_value(entries: &[(String, String)], key: &str) -> String {
        let vals: Vec<_> = entries.iter().filter(|(k, _)| k == key).collect();
        assert_eq!(vals.len(), 1, "{key}= once in the unit: {vals:?}");
        vals[0].1.clone()
    }

    // -- smtp-edge configurations ------------------------------------------

    /// Every smtp-edge configuration in deploy/: the `.toml` files and the
    /// `smtp-edge.toml` of each ConfigMap, as (where, text).
    pub fn deploy_configs() -> Vec<(String, String)> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut paths = Vec::new();
        walk(&repo("deploy"), &mut paths);
        paths.sort();
        let root = repo("");
        let mut out = Vec::new();
        for p in paths {
            let rel = p.strip_prefix(&root).unwrap().display().to_string();
            if rel.ends_with(".toml") {
                out.push((rel.clone(), read(&rel)));
            } else if rel.starts_with("deploy/kubernetes/") && rel.ends_with(".yaml") {
                for d in yaml_docs(&rel) {
                    if d["kind"].as_str() == Some("ConfigMap") {
                        if let Some(t) = d["data"]["smtp-edge.toml"].as_str() {
                            out.push((format!("{rel} (data.smtp-edge.toml)"), t.to_string()));
                        }
                    }
                }
            }
        }
        out
    }

    fn doc(text: &str) -> toml_edit::DocumentMut {
        text.parse()
            .unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"))
    }

    /// `text` with its [tls] files replaced by a real certificate and key
    /// in `dir` (check-config wants them to exist).
    fn with_certificates(text: &str, dir: &Path) -> String {
        let mut d = doc(text);
        if let Some(tls) = d.get_mut("tls").and_then(|t| t.as_table_like_mut()) {
            let (cert, key) = write_cert(dir, "mx.example.net");
            tls.insert("certificate", toml_edit::value(cert.display().to_string()));
            tls.insert("private_key", toml_edit::value(key.display().to_string()));
        }
        d.to_string()
    }

    /// `smtp-edge check-config` on `text`: Ok, or the error lines.
    fn check_config(text: &str) -> Result<(), Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smtp-edge.toml");
        std::fs::write(&path, text).unwrap();
        let out = run(Command::new(BIN).arg("check-config").arg(&path));
        if out.status.success() {
            return Ok(());
        }
        assert_eq!(out.status.code(), Some(2), "check-config: {}", said(&out));
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(String::from)
            .collect())
    }

    /// A number under `table.key` of a TOML config (`default` if absent).
    pub fn config_number(text: &str, table: &str, key: &str, default: f64) -> f64 {
        let v: toml::Value = toml::from_str(text).unwrap();
        match v.get(table).and_then(|t| t.get(key)) {
            None => default,
            Some(toml::Value::Integer(i)) => *i as f64,
            Some(toml::Value::Float(f)) => *f,
            Some(other) => panic!("{table}.{key} = {other}"),
        }
    }

    /// The address of the first [[listener]] and of [admin], if any.
    pub fn config_addresses(text: &str) -> (SocketAddr, Option<SocketAddr>) {
        let v: toml::Value = toml::from_str(text).unwrap();
        let listen = v["listener"][0]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let admin = v
            .get("admin")
            .map(|a| a["address"].as_str().unwrap().parse().unwrap());
        (listen, admin)
    }

    /// Every smtp-edge configuration in deploy/ passes `smtp-edge
    /// check-config` whole (certificate paths pointed at real files).
    #[test]
    fn deploy_configs_pass_check_config() {
        let configs = deploy_configs();
        let names: Vec<_> = configs.iter().map(|(n, _)| n.as_str()).collect();
        for expected in [
            "deploy/systemd/smtp-edge.toml",
            "deploy/docker/smtp-edge.toml",
            "deploy/kubernetes/configmap.yaml (data.smtp-edge.toml)",
        ] {
            assert!(names.contains(&expected), "{expected} not among {names:?}");
        }
        for (name, text) in &configs {
            let dir = tempfile::tempdir().unwrap();
            let text = with_certificates(text, dir.path());
            if let Err(errs) = check_config(&text) {
                panic!("{name}: check-config refused it:\n{}", errs.join("\n"));
            }
        }
    }

    // -- HAProxy -------------------------------------------------------------

    const HAPROXY_CFG: &str = "deploy/haproxy/haproxy.cfg";

    /// `haproxy -c` on `cfg` with `env`: (valid without warnings, output).
    fn haproxy_check(haproxy: &Path, cfg: &Path, env: &[(&str, &str)]) -> (bool, String) {
        let mut cmd = Command::new(haproxy);
        cmd.arg("-c").arg("-f").arg(cfg);
        for v in [
            "HAPROXY_BIND",
            "EDGE1",
            "EDGE2",
            "EDGE1_ADMIN_PORT",
            "EDGE2_ADMIN_PORT",
            "HAPROXY_STATS",
        ] {
            cmd.env_remove(v);
        }
        cmd.envs(env.iter().copied());
        let out = run(&mut cmd);
        let text = said(&out);
        let clean = out.status.success()
            && text.contains("Configuration file is valid")
            && !text.contains("[WARNING]")
            && !text.contains("[ALERT]");
        (clean, text)
    }

    /// `haproxy -c` passes, without a warning, in each way the file is
    /// used: SMTP checks (`option smtpchk` with `check-send-proxy`,
    /// tests/proxy_protocol.rs' way), /readyz checks with a stats socket
    /// (compose.yaml's way), and PROXY v1 (send-proxy-v2 replaced by
    /// send-proxy, as the header's documentation says); it fails without
    /// the address variables, so they are really used.
    #[test]
    fn haproxy_config_is_valid() {
        let Some(haproxy) = require_tool("haproxy") else {
            return;
        };
        let cfg = repo(HAPROXY_CFG);
        let base = [
            ("HAPROXY_BIND", "127.0.0.1:2525"),
            ("EDGE1", "127.0.0.1:2601"),
            ("EDGE2", "127.0.0.1:2602"),
        ];
        let (ok, out) = haproxy_check(&haproxy, &cfg, &base);
        assert!(ok, "SMTP checks:\n{out}");
        let mut readyz = base.to_vec();
        readyz.extend([
            ("EDGE1_ADMIN_PORT", "9091"),
            ("EDGE2_ADMIN_PORT", "9092"),
            ("HAPROXY_STATS", "/tmp/haproxy-test.sock"),
        ]);
        let (ok, out) = haproxy_check(&haproxy, &cfg, &readyz);
        assert!(ok, "/readyz checks and stats socket:\n{out}");

        let text = read(HAPROXY_CFG);
        let config_lines = |t: &str| -> Vec<String> {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        let v2: Vec<_> = config_lines(&text)
            .into_iter()
            .filter(|l| l.contains("send-proxy-v2"))
            .collect();
        assert_eq!(
            v2.len(),
            1,
            "send-proxy-v2 on one line (default-server): {v2:?}"
        );
        assert!(v2[0].starts_with("default-server"), "{v2:?}");
        // Without the admin ports: the SMTP check, which sends a PROXY
        // header first (smtp-edge serves v2 LOCAL as a session).
        let lines = config_lines(&text);
        let at = |needle: &str| lines.iter().rposition(|l| l.starts_with(needle));
        let (Some(else_at), Some(chk), Some(end)) =
            (at(".else"), at("option smtpchk EHLO "), at(".endif"))
        else {
            panic!("an .else branch with `option smtpchk EHLO name`:\n{text}");
        };
        assert!(else_at < chk && chk < end, "smtpchk in the .else branch");
        let servers: Vec<_> = lines[else_at..end]
            .iter()
            .filter(|l| l.starts_with("server "))
            .collect();
        assert_eq!(servers.len(), 2, "{servers:?}");
        assert!(
            servers
                .iter()
                .all(|l| l.contains(" check check-send-proxy")),
            "the SMTP check starts with a PROXY header: {servers:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("haproxy-v1.cfg");
        std::fs::write(&v1, text.replace("send-proxy-v2", "send-proxy")).unwrap();
        let (ok, out) = haproxy_check(&haproxy, &v1, &base);
        assert!(ok, "PROXY v1:\n{out}");

        let (ok, out) = haproxy_check(&haproxy, &cfg, &[]);
        assert!(!ok, "valid without HAPROXY_BIND, EDGE1, EDGE2:\n{out}");
    }

    /// One line of HAProxy's `show stat` for `server` of backend smtp_edge:
    /// its status (UP, DOWN, ...).
    fn haproxy_status(sock: &Path, server: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let header = out.lines().next()?.trim_start_matches("# ");
        let cols: Vec<_> = header.split(',').collect();
        let status = cols.iter().position(|c| *c == "status")?;
        out.lines().find_map(|l| {
            let f: Vec<_> = l.split(',').collect();
            (f.first() == Some(&"smtp_edge") && f.get(1) == Some(&server))
                .then(|| f[status].to_string())
        })
    }

    fn wait_status(sock: &Path, server: &str, want: &str, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if haproxy_status(sock, server).as_deref() == Some(want) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn signal(child: &Child, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {sig} failed");
    }

    /// An instance of the real binary on loopback: listener and admin on
    /// free ports, a Maildir backend (always in rotation), `extra` TOML.
    struct Edge {
        proc: Running,
        smtp: SocketAddr,
        admin: SocketAddr,
        _dir: tempfile::TempDir,
    }

    impl Edge {
        async fn start(extra: &str) -> Edge {
            let dir = tempfile::tempdir().unwrap();
            let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let cfg = dir.path().join("smtp-edge.toml");
            std::fs::write(
                &cfg,
                format!(
                    "hostname = \"edge.test\"\n[[listener]]\naddress = \"{smtp}\"\n\
                     [[backend]]\nmaildir = \"{}\"\n[admin]\naddress = \"{admin}\"\n{extra}",
                    dir.path().join("mail").display()
                ),
            )
            .unwrap();
            let proc = Running::listening(
                Command::new(BIN).arg("--config").arg(&cfg),
                &dir.path().join("log"),
                smtp,
            )
            .await;
            crate::common::wait_port(&admin.to_string());
            Edge {
                proc,
                smtp,
                admin,
                _dir: dir,
            }
        }
    }

    /// deploy/haproxy/haproxy.cfg run by HAProxy in front of two real
    /// instances with /readyz checks (EDGE*_ADMIN_PORT, compose.yaml's
    /// way): both come UP; SIGTERM to one makes HAProxy take it DOWN while
    /// its listener still accepts (drain_delay), so no new session reaches
    /// a closed port; the other stays UP. (Mail through HAProxy needs the
    /// PROXY protocol listener of issue 15: its own tests send it.)
    #[tokio::test]
    async fn haproxy_takes_a_draining_instance_out_before_it_stops_listening() {
        let Some(haproxy) = require_tool("haproxy") else {
            return;
        };
        // HAProxy's checks: every 2 s, down after 2 failures.
        let drain = "[timeouts]\ndrain_delay = 8\nshutdown_grace = 1\n";
        let e1 = Edge::start(drain).await;
        let e2 = Edge::start(drain).await;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stats.sock");
        let bind = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let mut hap = Running(
            Command::new(&haproxy)
                .args(["-db", "-f"])
                .arg(repo(HAPROXY_CFG))
                .env("HAPROXY_BIND", &bind)
                .env("EDGE1", e1.smtp.to_string())
                .env("EDGE2", e2.smtp.to_string())
                .env("EDGE1_ADMIN_PORT", e1.admin.port().to_string())
                .env("EDGE2_ADMIN_PORT", e2.admin.port().to_string())
                .env("HAPROXY_STATS", &sock)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn haproxy"),
        );
        let hap_log =
            || std::fs::read_to_string(dir.path().join("haproxy.log")).unwrap_or_default();
        for server in ["edge1", "edge2"] {
            if wait_status(&sock, server, "UP", Duration::from_secs(15)).is_none() {
                let _ = hap.0.kill();
                panic!(
                    "{server} not UP: {:?}\n{}",
                    haproxy_status(&sock, server),
                    hap_log()
                );
            }
        }
        crate::common::wait_port(&bind);

        signal(&e1.proc.0, "-TERM");
        let down = wait_status(&sock, "edge1", "DOWN", Duration::from_secs(8));
        let listening = std::net::TcpStream::connect(e1.smtp).is_ok();
        let down = down.unwrap_or_else(|| {
            panic!(
                "edge1 not DOWN within drain_delay: {:?}\n{}",
                haproxy_status(&sock, "edge1"),
                hap_log()
            )
        });
        assert!(
            listening,
            "edge1 stopped listening before HAProxy took it out ({down:?} after SIGTERM)"
        );
        eprintln!("edge1 DOWN in HAProxy {down:?} after SIGTERM, its listener still open");
        assert_eq!(haproxy_status(&sock, "edge2").as_deref(), Some("UP"));
        let (code, _) = http_get(e2.admin, "/readyz").await;
        assert_eq!(code, 200);
    }

    // -- systemd -------------------------------------------------------------

    const UNIT: &str = "deploy/systemd/smtp-edge.service";
    const UNIT_CONFIG: &str = "deploy/systemd/smtp-edge.toml";

    /// The unit with the binary it starts pointed at the built one
    /// (`systemd-analyze verify` checks that it exists and is executable),
    /// written as `smtp-edge.service` in `dir`.
    fn unit_for_test(dir: &Path) -> PathBuf {
        let text = read(UNIT).replace(INSTALLED_BIN, BIN);
        let path = dir.join("smtp-edge.service");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `systemd-analyze verify` finds nothing to say about the unit (it
    /// prints unknown keys, bad values and missing executables as
    /// warnings, exiting 0 for some: any output fails), it says something
    /// about a misspelt key (the check can fail), and `systemd-analyze
    /// security` rates the sandbox at exposure 2.0 or better ("OK").
    #[test]
    fn systemd_unit_verifies_and_is_hardened() {
        let Some(sd) = require_tool("systemd-analyze") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let unit = unit_for_test(dir.path());
        let out = run(Command::new(&sd).args(["verify", "--man=no"]).arg(&unit));
        assert!(
            out.status.success() && said(&out).trim().is_empty(),
            "systemd-analyze verify {UNIT}: {}\n{}",
            out.status,
            said(&out)
        );

        let bad_dir = tempfile::tempdir().unwrap();
        let bad = unit_for_test(bad_dir.path());
        let text = std::fs::read_to_string(&bad).unwrap();
        std::fs::write(&bad, text.replace("ProtectSystem=", "ProtectSytem=")).unwrap();
        let out = run(Command::new(&sd).args(["verify", "--man=no"]).arg(&bad));
        assert!(
            said(&out).contains("ProtectSytem"),
            "verify missed a misspelt key: {}",
            said(&out)
        );

        let out = run(Command::new(&sd)
            .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
            .arg(&unit));
        let text = said(&out);
        let overall = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no overall exposure:\n{text}"));
        eprintln!("{}", overall.trim());
        assert!(out.status.success(), "exposure above 2.0:\n{text}");
    }

    /// The unit and the config it runs agree: TimeoutStopSec covers the
    /// drain (drain_delay + shutdown_grace + 5 s), the three commands use
    /// one config file, `ExecReload` (smtp-edge reload) has the [admin]
    /// it needs, the capability to bind port 25 is there because the
    /// listener is below 1024, and the user has a sysusers.d entry.
    #[test]
    fn systemd_unit_matches_its_config() {
        let unit = unit_entries(&read(UNIT));
        let config = read(UNIT_CONFIG);
        let drain = config_number(&config, "timeouts", "drain_delay", 0.0)
            + config_number(&config, "timeouts", "shutdown_grace", 30.0);
        let stop: f64 = unit_value(&unit, "TimeoutStopSec").parse().unwrap();
        assert!(
            stop >= drain + 5.0,
            "TimeoutStopSec={stop} < drain_delay + shutdown_grace ({drain}) + 5"
        );
        assert_eq!(unit_value(&unit, "KillSignal"), "SIGTERM");
        let conf = "/etc/smtp-edge/smtp-edge.toml";
        for key in ["ExecStartPre", "ExecStart", "ExecReload"] {
            let cmd = unit_value(&unit, key);
            assert!(
                cmd.starts_with(INSTALLED_BIN) && cmd.contains(conf),
                "{key}={cmd}"
            );
        }
        assert!(unit_value(&unit, "ExecReload").ends_with(" reload"));
        let (listen, admin) = config_addresses(&config);
        assert!(
            admin.is_some(),
            "ExecReload (smtp-edge reload) needs [admin]"
        );
        let caps = unit_value(&unit, "AmbientCapabilities");
        assert_eq!(
            caps.contains("CAP_NET_BIND_SERVICE"),
            listen.port() < 1024,
            "AmbientCapabilities={caps} for a listener on {listen}"
        );
        for (k, v) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ] {
            assert_eq!(unit_value(&unit, k), v, "{k}");
        }
        assert!(unit_value(&unit, "LimitNOFILE").parse::<u64>().unwrap() >= 65536);
        let user = unit_value(&unit, "User");
        let sysusers = read("deploy/systemd/smtp-edge.sysusers");
        assert!(
            sysusers
                .lines()
                .any(|l| l.split_whitespace().take(2).eq(["u", user.as_str()])),
            "no sysusers.d entry for {user}"
        );
    }

    /// The unit's command lines run against the real binary on its config
    /// (addresses moved to loopback, certificates made): ExecStartPre
    /// accepts the file, ExecStart serves, ExecReload exits 0 for a good
    /// file, 2 for an invalid one and 1 for one the proxy refuses (so
    /// `systemctl reload` fails for both), and SIGTERM (KillSignal) ends the process
    /// after drain_delay, well within TimeoutStopSec, /readyz 503 meanwhile.
    #[tokio::test]
    async fn systemd_unit_commands_run_the_real_binary() {
        let unit = unit_entries(&read(UNIT));
        let dir = tempfile::tempdir().unwrap();
        let mut d = doc(&with_certificates(&read(UNIT_CONFIG), dir.path()));
        let smtp = format!("127.0.0.1:{}", free_port());
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        d["listener"][0]["address"] = toml_edit::value(smtp.clone());
        d["admin"]["address"] = toml_edit::value(admin.to_string());
        // Nothing leaves the machine: the backends on loopback (discard
        // port, nobody listening).
        for b in d["backend"].as_array_of_tables_mut().unwrap().iter_mut() {
            b.insert("address", toml_edit::value("127.0.0.1:9"));
        }
        let good = d.to_string();
        let cfg = dir.path().join("smtp-edge.toml");
        std::fs::write(&cfg, &good).unwrap();
        let command = |key: &str| -> Command {
            let line = unit_value(&unit, key);
            let mut words = line.split_whitespace().map(|w| {
                if w == "/etc/smtp-edge/smtp-edge.toml" {
                    cfg.display().to_string()
                } else {
                    w.to_string()
                }
            });
            assert_eq!(words.next().as_deref(), Some(INSTALLED_BIN));
            let mut c = Command::new(BIN);
            c.args(words);
            c
        };
        let out = run(&mut command("ExecStartPre"));
        assert!(out.status.success(), "ExecStartPre: {}", said(&out));

        let mut proc = Running::listening(
            &mut command("ExecStart"),
            &dir.path().join("log"),
            smtp.parse().unwrap(),
        )
        .await;
        crate::common::wait_port(&admin.to_string());
        let out = run(&mut command("ExecReload"));
        assert!(out.status.success(), "ExecReload: {}", said(&out));
        // An invalid file: `smtp-edge reload` reads it first (for
        // [admin]) and fails without asking (2).
        std::fs::write(&cfg, good.replacen("[admin]", "bogus_key = 1\n[admin]", 1)).unwrap();
        let out = run(&mut command("ExecReload"));
        assert_eq!(
            out.status.code(),
            Some(2),
            "ExecReload of an invalid file: {}",
            said(&out)
        );
        // A certificate that does not load makes the file invalid (the
        // check reads it): not asked (2), the key named.
        std::fs::write(&cfg, &good).unwrap();
        let cert = d["tls"]["certificate"].as_str().unwrap().to_string();
        let pem = std::fs::read(&cert).unwrap();
        std::fs::write(&cert, "not a certificate").unwrap();
        let out = run(&mut command("ExecReload"));
        assert_eq!(
            out.status.code(),
            Some(2),
            "ExecReload, certificate broken: {}",
            said(&out)
        );
        assert!(
            said(&out).contains("key `tls.certificate`"),
            "ExecReload, certificate broken: {}",
            said(&out)
        );
        std::fs::write(&cert, pem).unwrap();
        let out = run(&mut command("ExecReload"));
        assert!(
            out.status.success(),
            "ExecReload after the repair: {}",
            said(&out)
        );

        let drain = config_number(&good, "timeouts", "drain_delay", 0.0);
        let stop: f64 = unit_value(&unit, "TimeoutStopSec").parse().unwrap();
        let start = Instant::now();
        signal(&proc.0, "-TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (code, _) = http_get(admin, "/readyz").await;
        assert_eq!(code, 503, "/readyz while draining");
        let status = loop {
            if let Some(st) = proc.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed().as_secs_f64() < stop,
                "still running TimeoutStopSec={stop} s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let took = start.elapsed().as_secs_f64();
        assert!(status.success(), "exit after SIGTERM: {status}");
        assert!(
            took >= drain - 0.5,
            "stopped after {took} s, drain_delay {drain}"
        );
        eprintln!("SIGTERM to exit: {took:.1} s (drain_delay {drain}, TimeoutStopSec {stop})");
    }

    // -- Docker --------------------------------------------------------------

    const DOCKERFILE: &str = "deploy/docker/Dockerfile";
    const DOCKERFILES: [&str; 2] = [DOCKERFILE, "deploy/docker/postfix/Dockerfile"];

    /// The Dockerfile's instructions, continuation lines joined, comments
    /// dropped: (INSTRUCTION, arguments).
    fn dockerfile(rel: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for line in read(rel).lines() {
            let t = line.trim();
            if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(part) => {
                    cur.push_str(part);
                    cur.push(' ');
                }
                None => {
                    cur.push_str(t);
                    let (i, a) = cur.split_once(' ').unwrap_or((&cur, ""));
                    out.push((i.to_uppercase(), a.trim().to_string()));
                    cur.clear();
                }
            }
        }
        out
    }

    /// hadolint (from PyPI: its wheel carries the binary) finds nothing in
    /// either Dockerfile.
    #[test]
    fn dockerfiles_pass_hadolint() {
        let Some(hadolint) = tool("hadolint") else {
            return;
        };
        for f in DOCKERFILES {
            let out = run(Command::new(&hadolint).arg(repo(f)));
            assert!(
                out.status.success() && said(&out).trim().is_empty(),
                "hadolint {f}:\n{}",
                said(&out)
            );
        }
        let out = run(Command::new(&hadolint).arg("--version"));
        eprintln!("{}", said(&out).trim());
    }

    /// The image's Dockerfile agrees with the repository and the configs:
    /// every file it copies exists, its empty dependency-layer targets are
    /// exactly the workspace's members and benches (a bench added to
    /// Cargo.toml without one breaks `docker build`), a multi-stage build
    /// whose final stage runs as the non-root user the Kubernetes pods
    /// use, exposing the ports the configs listen on.
    #[test]
    fn dockerfile_matches_the_repository() {
        let ins = dockerfile(DOCKERFILE);
        let froms: Vec<_> = ins
            .iter()
            .filter(|(i, _)| i == "FROM")
            .map(|(_, a)| a)
            .collect();
        assert_eq!(froms.len(), 2, "{froms:?}");
        assert!(
            froms[0].starts_with("rust:1-bookworm AS builder"),
            "{froms:?}"
        );
        assert!(!froms[1].starts_with("rust"), "{froms:?}");
        // What it copies exists and is let through its .dockerignore
        // (which excludes everything else: target/ is gigabytes).
        let ignore = read("deploy/docker/Dockerfile.dockerignore");
        let ignore: Vec<_> = ignore
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        assert_eq!(ignore.first(), Some(&"*"), "{ignore:?}");
        for (i, a) in &ins {
            if i == "COPY" && !a.starts_with("--from") {
                let words: Vec<_> = a.split_whitespace().collect();
                for src in &words[..words.len() - 1] {
                    assert!(repo(src).exists(), "COPY {src}: not in the repository");
                    assert!(
                        ignore.contains(&format!("!{src}").as_str()),
                        "COPY {src}: excluded by Dockerfile.dockerignore"
                    );
                }
            }
        }
        // The dependency layer's targets.
        let cargo: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
        let run_lines: String = ins
            .iter()
            .filter(|(i, _)| i == "RUN")
            .map(|(_, a)| a.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let benches: Vec<&str> = cargo["bench"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        let stub = run_lines
            .split("for b in ")
            .nth(1)
            .and_then(|r| r.split("; do").next())
            .expect("the bench stubs loop");
        let mut stubbed: Vec<_> = stub.split_whitespace().collect();
        let mut want = benches.clone();
        stubbed.sort();
        want.sort();
        assert_eq!(stubbed, want, "the dependency layer's bench stubs");
        for m in cargo["workspace"]["members"].as_array().unwrap() {
            let m = m.as_str().unwrap();
            if m != "." {
                let manifest = format!("{m}/Cargo.toml");
                assert!(
                    ins.iter()
                        .any(|(i, a)| i == "COPY" && a.starts_with(&manifest)),
                    "workspace member {m}: its Cargo.toml is not copied"
                );
            }
        }

        let user = ins
            .iter()
            .rfind(|(i, _)| i == "USER")
            .map(|(_, a)| a.clone())
            .expect("USER");
        let uid: u32 = user
            .split(':')
            .next()
            .unwrap()
            .parse()
            .expect("numeric USER");
        assert_ne!(uid, 0);
        let deploy = yaml_docs("deploy/kubernetes/deployment.yaml");
        let pod = &deploy[0]["spec"]["template"]["spec"];
        assert_eq!(int(&pod["securityContext"]["runAsUser"]), uid as i64);

        let exposed: Vec<u16> = ins
            .iter()
            .filter(|(i, _)| i == "EXPOSE")
            .flat_map(|(_, a)| a.split_whitespace().map(|p| p.parse().unwrap()))
            .collect();
        for (name, text) in deploy_configs() {
            if name.starts_with("deploy/systemd/") {
                continue;
            }
            let (listen, admin) = config_addresses(&text);
            assert!(
                exposed.contains(&listen.port()),
                "{name}: {listen} not EXPOSEd"
            );
            assert!(
                admin.is_some_and(|a| exposed.contains(&a.port())),
                "{name}: [admin] {admin:?} not EXPOSEd"
            );
        }
        let env: Vec<_> = ins
            .iter()
            .filter(|(i, _)| i == "ENV")
            .map(|(_, a)| a)
            .collect();
        assert!(
            env.iter()
                .any(|a| a.as_str() == "SMTP_EDGE_ADMIN_PORT=9090"),
            "{env:?}"
        );
    }

    /// The image's HEALTHCHECK command, run with bash against the real
    /// binary: healthy while ready, unhealthy once SIGTERM starts the
    /// drain (Docker then stops routing to it in a swarm and compose shows
    /// it). Without [admin] it fails too.
    #[tokio::test]
    async fn docker_healthcheck_follows_readyz() {
        let ins = dockerfile(DOCKERFILE);
        let hc = &ins
            .iter()
            .find(|(i, _)| i == "HEALTHCHECK")
            .expect("HEALTHCHECK")
            .1;
        let json = &hc[hc.find("CMD [").expect("HEALTHCHECK ... CMD [exec form]") + 4..];
        let argv: Vec<String> = serde_json::from_str(json).expect("CMD's JSON array");
        let check = |port: u16| {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..])
                .env("SMTP_EDGE_ADMIN_PORT", port.to_string());
            let out = run(&mut c);
            out.status.success()
        };
        let edge = Edge::start("[timeouts]\ndrain_delay = 3\nshutdown_grace = 1\n").await;
        assert!(check(edge.admin.port()), "unhealthy while ready");
        assert!(!check(free_port()), "healthy with nothing listening");
        signal(&edge.proc.0, "-TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!check(edge.admin.port()), "healthy while draining");
    }

    // -- Compose -------------------------------------------------------------

    const COMPOSE: &str = "deploy/docker/compose.yaml";

    /// compose.yaml against the Compose Specification's JSON schema
    /// (check-jsonschema's vendored copy), then read by a Compose
    /// implementation: `docker compose config` where the plugin exists,
    /// else Debian's docker-compose 1.29 (`config` needs no engine; it
    /// predates the top-level `name`, which is left out for it).
    #[test]
    fn compose_file_validates() {
        let Some(cj) = tool("check-jsonschema") else {
            return;
        };
        let out = run(Command::new(&cj)
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(repo(COMPOSE)));
        assert!(out.status.success(), "compose-spec schema:\n{}", said(&out));

        let plugin = Command::new("docker")
            .args(["compose", "version"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        let project = repo("deploy/docker");
        let out = if plugin {
            run(Command::new("docker")
                .args(["compose", "-f"])
                .arg(repo(COMPOSE))
                .args(["config", "--quiet"]))
        } else {
            let Some(dc) = require_tool("docker-compose") else {
                return;
            };
            let dir = tempfile::tempdir().unwrap();
            let v1 = dir.path().join("compose.yaml");
            let text: String = read(COMPOSE)
                .lines()
                .filter(|l| !l.starts_with("name:"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&v1, text).unwrap();
            run(Command::new(dc)
                .arg("--project-directory")
                .arg(&project)
                .arg("-f")
                .arg(&v1)
                .args(["config", "--quiet"]))
        };
        assert!(out.status.success(), "compose config:\n{}", said(&out));
    }

    /// Host and port of `host:port` or `scheme://host:port[/...]`.
    fn host_port(s: &str) -> (String, u16) {
        let s = s.split("://").last().unwrap();
        let s = s.split('/').next().unwrap();
        let (h, p) = s
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("no port in {s}"));
        (h.to_string(), p.parse().unwrap())
    }

    fn seconds(y: &Yaml) -> f64 {
        let t = s(y);
        t.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{t}: seconds like 40s"))
    }

    /// compose.yaml and the files it mounts agree: mounted files and build
    /// contexts exist, depends_on names services, HAProxy's EDGE1/EDGE2
    /// and admin ports are the instances' listener and [admin], the
    /// instances trust HAProxy's fixed address (inside the network), their
    /// backend, Redis and collector hosts are services, Postfix lets the
    /// network XFORWARD, the config lands where the image's CMD reads it,
    /// and stop_grace_period covers the drain.
    #[test]
    fn compose_file_matches_what_it_mounts() {
        let c = &yaml_docs(COMPOSE)[0];
        let base = repo("deploy/docker");
        let services: Vec<&str> = c["services"].as_hash().unwrap().keys().map(s).collect();
        for want in [
            "haproxy",
            "edge1",
            "edge2",
            "postfix",
            "redis",
            "otel-collector",
        ] {
            assert!(services.contains(&want), "service {want}: {services:?}");
        }
        let svc = |n: &str| merged(&c["services"][n]);
        let mut edge_config = None;
        for name in &services {
            let sv = svc(name);
            for v in list(&sv["volumes"]) {
                let v = s(v);
                let src = v.split(':').next().unwrap();
                if src.starts_with('.') {
                    let path = base.join(src);
                    assert!(path.exists(), "{name}: mounts {src}, not in the repository");
                    let target = v.split(':').nth(1).unwrap();
                    if target == "/etc/smtp-edge/smtp-edge.toml" {
                        edge_config = Some(path);
                    }
                }
            }
            if let Some(ctx) = sv["build"]["context"].as_str() {
                let df = sv["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
                assert!(
                    base.join(ctx).join(df).is_file(),
                    "{name}: build {ctx} {df}"
                );
            }
            if let Some(deps) = sv["depends_on"].as_hash() {
                for d in deps.keys() {
                    assert!(services.contains(&s(d)), "{name} depends on {d:?}");
                }
            }
        }
        let edge_config = edge_config.expect("the instances' config mount");
        assert_eq!(edge_config, base.join("smtp-edge.toml"));
        let cmd = dockerfile(DOCKERFILE)
            .into_iter()
            .find(|(i, _)| i == "CMD")
            .unwrap()
            .1;
        assert!(
            cmd.contains("\"/etc/smtp-edge/smtp-edge.toml\""),
            "image CMD: {cmd}"
        );

        let config = read("deploy/docker/smtp-edge.toml");
        let v: toml::Value = toml::from_str(&config).unwrap();
        let (listen, admin) = config_addresses(&config);
        let hap = svc("haproxy");
        let env = &hap["environment"];
        for e in ["EDGE1", "EDGE2"] {
            let (h, p) = host_port(s(&env[e]));
            assert!(services.contains(&h.as_str()), "{e}={h}: not a service");
            assert_eq!(p, listen.port(), "{e}: the instances listen on {listen}");
            let admin_port: u16 = s(&env[format!("{e}_ADMIN_PORT").as_str()]).parse().unwrap();
            assert_eq!(Some(admin_port), admin.map(|a| a.port()), "{e}_ADMIN_PORT");
        }
        let hap_addr: std::net::IpAddr =
            s(&hap["networks"]["mail"]["ipv4_address"]).parse().unwrap();
        let trusted: Vec<IpNet> = v["listener"][0]["trusted_proxies"]
            .as_array()
            .expect("trusted_proxies")
            .iter()
            .map(|n| n.as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            trusted.iter().any(|n| n.contains(&hap_addr)),
            "HAProxy's {hap_addr} not in trusted_proxies {trusted:?}"
        );
        let subnet: IpNet = s(&c["networks"]["mail"]["ipam"]["config"][0]["subnet"])
            .parse()
            .unwrap();
        assert!(subnet.contains(&hap_addr), "{hap_addr} outside {subnet}");
        let main_cf = read("deploy/docker/postfix/main.cf");
        let mynetworks = main_cf
            .lines()
            .find_map(|l| l.strip_prefix("mynetworks ="))
            .expect("mynetworks");
        assert!(
            mynetworks
                .split_whitespace()
                .any(|n| n == subnet.to_string()),
            "Postfix's mynetworks lacks {subnet}: {mynetworks}"
        );
        for (what, addr) in [
            ("backend", v["backend"][0]["address"].as_str().unwrap()),
            (
                "redis",
                v["policy"]["limits"]["redis"]["url"].as_str().unwrap(),
            ),
            (
                "collector",
                v["telemetry"]["otlp_endpoint"].as_str().unwrap(),
            ),
        ] {
            let (h, _) = host_port(addr);
            assert!(
                services.contains(&h.as_str()),
                "{what} {addr}: not a service"
            );
        }
        let drain = config_number(&config, "timeouts", "drain_delay", 0.0)
            + config_number(&config, "timeouts", "shutdown_grace", 30.0);
        for e in ["edge1", "edge2"] {
            let grace = seconds(&svc(e)["stop_grace_period"]);
            assert!(
                grace >= drain + 5.0,
                "{e}: stop_grace_period {grace} < {drain} + 5"
            );
        }
        // HAProxy marks an instance down after fall x inter (2 x 2 s) of
        // 503s; the listener must still accept until then.
        let dd = config_number(&config, "timeouts", "drain_delay", 0.0);
        assert!(
            dd >= 6.0,
            "drain_delay {dd} < HAProxy's 4 s + one check interval"
        );
    }

    /// The demo Postfix's main.cf, read by Postfix's own postconf with
    /// Debian's master.cf (as the image has it): no unknown parameter, no
    /// bad value, no warning.
    #[test]
    fn compose_postfix_main_cf_is_valid() {
        let Some(postconf) = require_tool("postconf") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            repo("deploy/docker/postfix/main.cf"),
            dir.path().join("main.cf"),
        )
        .unwrap();
        std::fs::copy("/etc/postfix/master.cf", dir.path().join("master.cf"))
            .expect("Debian's /etc/postfix/master.cf (package postfix)");
        let out = run(Command::new(&postconf).arg("-c").arg(dir.path()).arg("-n"));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "postconf -n:\n{}",
            said(&out)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("smtpd_authorized_xforward_hosts"));
    }

    // -- Kubernetes ----------------------------------------------------------

    /// Every document of every manifest in deploy/kubernetes/ validates
    /// with kubernetes-validate (strict: unknown fields are errors) against
    /// Kubernetes 1.31, and each document was looked at.
    #[test]
    fn kubernetes_manifests_validate() {
        let Some(kv) = tool("kubernetes-validate") else {
            return;
        };
        let files = yaml_files("deploy/kubernetes");
        assert!(files.len() >= 5, "{files:?}");
        for f in files {
            let docs = yaml_docs(&f).len();
            let out = run(Command::new(&kv)
                .args(["--strict", "-k", KUBERNETES_VERSION])
                .arg(repo(&f)));
            let text = said(&out);
            assert!(out.status.success(), "kubernetes-validate {f}:\n{text}");
            let passed = text.matches("passed for resource").count();
            assert_eq!(
                passed, docs,
                "{f}: {docs} documents, {passed} validated:\n{text}"
            );
            eprint!("{text}");
        }
    }

    /// Each object of the manifests, by kind.
    fn kube(kind: &str) -> Vec<Yaml> {
        yaml_files("deploy/kubernetes")
            .iter()
            .flat_map(|f| yaml_docs(f))
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    }

    /// The manifests agree with each other and with the ConfigMap's
    /// config: terminationGracePeriodSeconds covers the preStop sleep,
    /// drain_delay, shutdown_grace and 5 s, the probes ask /livez and /readyz on the
    /// [admin] port, the container ports are the config's, no capability
    /// is kept for a listener above 1024, the root file system is read-only,
    /// the args name the mounted ConfigMap, the Service keeps client
    /// addresses (externalTrafficPolicy: Local) and its target ports exist,
    /// the selectors of Service, PDB and HPA find the pods.
    #[test]
    fn kubernetes_manifests_agree() {
        let deploy = &kube("Deployment")[0];
        let pod = &deploy["spec"]["template"]["spec"];
        let labels = deploy["spec"]["template"]["metadata"]["labels"]
            .as_hash()
            .unwrap();
        let c = &pod["containers"][0];
        let cm = &kube("ConfigMap")[0];
        let config = s(&cm["data"]["smtp-edge.toml"]);
        let (listen, admin) = config_addresses(config);
        let admin = admin.expect("[admin] for the probes");

        // The drain.
        let pre = list(&c["lifecycle"]["preStop"]["exec"]["command"]);
        assert_eq!(s(&pre[0]), "sleep", "preStop {pre:?}");
        let pre: f64 = s(&pre[1]).parse().unwrap();
        let drain = config_number(config, "timeouts", "drain_delay", 0.0);
        let grace = config_number(config, "timeouts", "shutdown_grace", 30.0);
        let period = int(&pod["terminationGracePeriodSeconds"]) as f64;
        assert!(
            period >= pre + drain + grace + 5.0,
            "terminationGracePeriodSeconds {period} < preStop {pre} + drain_delay {drain} + shutdown_grace {grace} + 5"
        );
        assert!(drain > 0.0, "drain_delay 0: the listener closes at SIGTERM");

        // Ports and probes.
        let port = |name: &str| -> i64 {
            list(&c["ports"])
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .map(|p| int(&p["containerPort"]))
                .unwrap_or_else(|| panic!("no container port {name}"))
        };
        assert_eq!(port("smtp"), listen.port() as i64);
        assert_eq!(port("admin"), admin.port() as i64);
        assert!(
            admin.ip().is_unspecified(),
            "[admin] {admin}: the kubelet probes the pod IP"
        );
        for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
            let g = &c[probe]["httpGet"];
            assert_eq!(s(&g["path"]), path, "{probe}");
            assert_eq!(s(&g["port"]), "admin", "{probe}");
        }

        // Security.
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        let drop: Vec<_> = list(&sc["capabilities"]["drop"]).iter().map(s).collect();
        assert_eq!(drop, ["ALL"]);
        let add: Vec<_> = list(&sc["capabilities"]["add"]).iter().map(s).collect();
        let want: &[&str] = if listen.port() < 1024 {
            &["NET_BIND_SERVICE"]
        } else {
            &[]
        };
        assert_eq!(add, want, "capabilities for a listener on {listen}");
        assert!(
            c["resources"]["requests"]["cpu"].as_str().is_some(),
            "the HPA needs a CPU request"
        );

        // The config file.
        let args: Vec<_> = list(&c["args"]).iter().map(s).collect();
        let path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
        let (dir, file) = path.rsplit_once('/').unwrap();
        let mount = list(&c["volumeMounts"])
            .iter()
            .find(|m| s(&m["mountPath"]) == dir)
            .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
        let vol = list(&pod["volumes"])
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(vol["configMap"]["name"], cm["metadata"]["name"]);
        assert!(
            cm["data"][file].as_str().is_some(),
            "the ConfigMap has no {file}"
        );
        // The TLS files are under a mount.
        let v: toml::Value = toml::from_str(config).unwrap();
        for k in ["certificate", "private_key"] {
            let p = v["tls"][k].as_str().unwrap();
            assert!(
                list(&c["volumeMounts"])
                    .iter()
                    .any(|m| p.starts_with(&format!("{}/", s(&m["mountPath"])))),
                "tls.{k} {p} is on no mount"
            );
        }

        // Selectors.
        let selects = |sel: &Yaml, what: &str| {
            let sel = sel
                .as_hash()
                .unwrap_or_else(|| panic!("{what}: no selector"));
            for (k, v) in sel {
                assert_eq!(labels.get(k), Some(v), "{what} selects {k:?}={v:?}");
            }
        };
        selects(&deploy["spec"]["selector"]["matchLabels"], "Deployment");
        let svcs = kube("Service");
        let public = svcs
            .iter()
            .find(|s| s["spec"]["type"].as_str() == Some("LoadBalancer"))
            .expect("a LoadBalancer Service");
        assert_eq!(s(&public["spec"]["externalTrafficPolicy"]), "Local");
        assert_eq!(int(&public["spec"]["ports"][0]["port"]), 25);
        for sv in &svcs {
            selects(&sv["spec"]["selector"], "Service");
            for p in list(&sv["spec"]["ports"]) {
                port(s(&p["targetPort"]));
            }
        }
        selects(
            &kube("PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"],
            "PDB",
        );
        let hpa = &kube("HorizontalPodAutoscaler")[0];
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["name"],
            deploy["metadata"]["name"]
        );
        assert_eq!(s(&hpa["spec"]["scaleTargetRef"]["kind"]), "Deployment");
        assert!(
            int(&hpa["spec"]["minReplicas"]) >= 2,
            "one pod cannot drain behind a PDB"
        );
        assert!(
            deploy["spec"]["replicas"].is_badvalue(),
            "replicas are the HPA's"
        );
    }

    // -- Observability ---------------------------------------------------------

    /// The collector config's pipelines name only receivers, processors
    /// and exporters it configures (the check the collector makes at
    /// start), the OTLP receiver listens on the ports smtp-edge's
    /// configs send to, and the metrics pipeline scrapes /metrics with the
    /// prometheus receiver (smtp-edge pushes no metrics), on the admin
    /// port of the configs, as prometheus.yml does.
    #[test]
    fn observability_yaml_is_consistent() {
        let col = &yaml_docs("deploy/observability/collector.yaml")[0];
        let pipelines = col["service"]["pipelines"].as_hash().expect("pipelines");
        assert!(!pipelines.is_empty());
        for (name, p) in pipelines {
            for kind in ["receivers", "processors", "exporters"] {
                for c in list(&p[kind]) {
                    assert!(
                        !col[kind][s(c)].is_badvalue(),
                        "pipeline {name:?}: {kind} {c:?} not configured"
                    );
                }
            }
        }
        let grpc = s(&col["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]);
        for (name, text) in deploy_configs() {
            let v: toml::Value = toml::from_str(&text).unwrap();
            if let Some(ep) = v.get("telemetry").and_then(|t| t.get("otlp_endpoint")) {
                let (_, p) = host_port(ep.as_str().unwrap());
                assert_eq!(p, host_port(grpc).1, "{name}: otlp_endpoint {ep}");
            }
        }
        let prom = &yaml_docs("deploy/observability/prometheus.yml")[0];
        assert_eq!(s(&prom["scrape_configs"][0]["metrics_path"]), "/metrics");
        let metrics = &col["service"]["pipelines"]["metrics"];
        let receivers: Vec<&str> = list(&metrics["receivers"]).iter().map(s).collect();
        assert_eq!(receivers, ["prometheus"]);
        for scrape in [
            &col["receivers"]["prometheus"]["config"]["scrape_configs"][0],
            &prom["scrape_configs"][0],
        ] {
            assert_eq!(s(&scrape["metrics_path"]), "/metrics");
            let target = s(&scrape["static_configs"][0]["targets"][0]);
            let admin_ports: Vec<u16> = deploy_configs()
                .iter()
                .filter_map(|(_, text)| {
                    let v: toml::Value = toml::from_str(text).ok()?;
                    let a = v.get("admin")?.get("address")?.as_str()?.to_string();
                    Some(host_port(&a).1)
                })
                .collect();
            assert!(
                admin_ports.contains(&host_port(target).1),
                "scrape target {target} is no config's admin port {admin_ports:?}"
            );
        }
    }
}
