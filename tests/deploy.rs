//! The files in deploy/ checked with real parsers. The Grafana dashboard
//! must be valid JSON, shaped the way Grafana imports and provisions it
//! (uid, schema version, the `DS_PROMETHEUS` data source), and every
//! PromQL query in it must name series the proxy exports, group by labels
//! those series carry, and use `rate` on counters and histograms only.
//! What the proxy exports is read from a real scrape of a bound server.
//!
//! (The collector and Prometheus YAML files are not checked here: no YAML
//! parser is among the dependencies.)

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
    let text = m.encode();
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
