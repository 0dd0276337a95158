//! In-process authoritative DNS server for tests (hickory-server): answers
//! from an in-memory record table on 127.0.0.1 (UDP and TCP on one
//! ephemeral port), counts every query per (name, type), answers SERVFAIL or
//! nothing at all for chosen names, and stops when dropped.
//!
//! Answers: the records of the queried name and type (a CNAME of the name
//! is returned for any other type); NOERROR with no data when the name has
//! other records; NXDOMAIN otherwise. Negative answers carry an SOA in the
//! authority section whose minimum is [`SOA_MINIMUM`] (the negative TTL).
//!
//! Names in `servfail` and `silent` match themselves and every name below
//! them (so `slow.test` silences a whole DNSBL zone).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;

/// Negative TTL (SOA minimum) of every negative answer.
pub const SOA_MINIMUM: u32 = 60;
/// TTL of the records in [`TestDns::standard`].
pub const STANDARD_TTL: u32 = 300;

/// A running test DNS server; stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: Server<Handler>,
}

struct State {
    records: HashMap<(String, RecordType), Vec<Record>>,
    /// Every owner name with at least one record.
    names: HashSet<String>,
    servfail: Vec<String>,
    silent: Vec<String>,
    counts: Mutex<HashMap<(String, RecordType), usize>>,
    total: AtomicUsize,
    /// Names taken away while running (`TestDns::remove`): NXDOMAIN.
    removed: Mutex<HashSet<String>>,
}

struct Handler(Arc<State>);

/// Lowercase, without trailing dot.
fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let n = norm(name);
    Name::from_ascii(format!("{n}.")).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"))
}

fn rtype(t: &str) -> RecordType {
    match t.to_ascii_uppercase().as_str() {
        "A" => RecordType::A,
        "AAAA" => RecordType::AAAA,
        "PTR" => RecordType::PTR,
        "MX" => RecordType::MX,
        "CNAME" => RecordType::CNAME,
        "TXT" => RecordType::TXT,
        other => panic!("TestDns: unsupported record type {other}"),
    }
}

fn rdata(t: RecordType, value: &str) -> RData {
    match t {
        RecordType::A => RData::A(A(value.parse().expect("A value"))),
        RecordType::AAAA => RData::AAAA(AAAA(value.parse().expect("AAAA value"))),
        RecordType::PTR => RData::PTR(PTR(fqdn(value))),
        RecordType::CNAME => RData::CNAME(CNAME(fqdn(value))),
        RecordType::TXT => RData::TXT(TXT::new(vec![value.to_string()])),
        RecordType::MX => {
            let (pref, host) = value.trim().split_once(' ').expect("MX value: \"10 host\"");
            RData::MX(MX::new(
                pref.parse().expect("MX preference"),
                fqdn(host.trim()),
            ))
        }
        _ => unreachable!(),
    }
}

/// Whether `name` is `pattern` or below it.
fn covered(name: &str, pattern: &str) -> bool {
    name == pattern
        || (name.len() > pattern.len()
            && name.ends_with(pattern)
            && name.as_bytes()[name.len() - pattern.len() - 1] == b'.')
}

/// The SOA for a negative answer about `name`: owned by its "zone" (the
/// reverse tree root or the last two labels).
fn soa_for(name: &str) -> Record {
    let apex = if covered(name, "in-addr.arpa") {
        "in-addr.arpa".to_string()
    } else if covered(name, "ip6.arpa") {
        "ip6.arpa".to_string()
    } else {
        let labels: Vec<&str> = name.split('.').collect();
        labels[labels.len().saturating_sub(2)..].join(".")
    };
    let soa = SOA::new(
        fqdn("ns.test"),
        fqdn("hostmaster.test"),
        1,
        3600,
        600,
        86400,
        SOA_MINIMUM,
    );
    Record::from_rdata(fqdn(&apex), 3600, RData::SOA(soa))
}

impl State {
    fn answer(&self, name: &str, qtype: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        if self.removed.lock().unwrap().contains(name) {
            return (ResponseCode::NXDomain, Vec::new(), vec![soa_for(name)]);
        }
        if let Some(r) = self.records.get(&(name.to_string(), qtype)) {
            return (ResponseCode::NoError, r.clone(), Vec::new());
        }
        if qtype != RecordType::CNAME {
            if let Some(c) = self.records.get(&(name.to_string(), RecordType::CNAME)) {
                let mut answers = c.clone();
                if let Some(RData::CNAME(target)) = c.first().map(|r| &r.data) {
                    let t = norm(&target.0.to_ascii());
                    if let Some(more) = self.records.get(&(t, qtype)) {
                        answers.extend(more.iter().cloned());
                    }
                }
                return (ResponseCode::NoError, answers, Vec::new());
            }
        }
        let code = if self.names.contains(name) {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        (code, Vec::new(), vec![soa_for(name)])
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let st = &self.0;
        let mut meta = Metadata::response_from_request(&request.metadata);
        let fail = |mut meta: Metadata| {
            meta.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: meta,
                counts: HeaderCounts::default(),
            })
        };
        let Ok(info) = request.request_info() else {
            let resp = MessageResponseBuilder::from_message_request(request)
                .error_msg(&request.metadata, ResponseCode::FormErr);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or_else(|_| fail(meta));
        };
        let name = norm(&info.query.name().to_string());
        let qtype = info.query.query_type();
        st.total.fetch_add(1, Ordering::SeqCst);
        *st.counts
            .lock()
            .unwrap()
            .entry((name.clone(), qtype))
            .or_insert(0) += 1;

        if st.silent.iter().any(|p| covered(&name, p)) {
            // Never answered: the client times out.
            return fail(meta);
        }
        if st.servfail.iter().any(|p| covered(&name, p)) {
            let resp = MessageResponseBuilder::from_message_request(request)
                .error_msg(&request.metadata, ResponseCode::ServFail);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or_else(|_| fail(meta));
        }
        let (code, answers, soa) = st.answer(&name, qtype);
        meta.response_code = code;
        meta.authoritative = true;
        let resp = MessageResponseBuilder::from_message_request(request).build(
            meta,
            answers.iter(),
            std::iter::empty(),
            soa.iter(),
            std::iter::empty(),
        );
        response_handle
            .send_response(resp)
            .await
            .unwrap_or_else(|_| fail(meta))
    }
}

impl TestDns {
    /// Starts a server answering `records` (name, type A|AAAA|PTR|MX|CNAME|TXT,
    /// value, ttl; MX values are "10 host"), SERVFAIL for the names (and
    /// subdomains) in `servfail`, and never answering those in `silent`.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        records: &[(&str, &str, &str, u32)],
        servfail: &[&str],
        silent: &[&str],
    ) -> TestDns {
        let mut map: HashMap<(String, RecordType), Vec<Record>> = HashMap::new();
        let mut names = HashSet::new();
        for &(name, t, value, ttl) in records {
            let t = rtype(t);
            let n = norm(name);
            let rec = Record::from_rdata(fqdn(&n), ttl, rdata(t, value));
            map.entry((n.clone(), t)).or_default().push(rec);
            names.insert(n);
        }
        let state = Arc::new(State {
            records: map,
            names,
            servfail: servfail.iter().map(|s| norm(s)).collect(),
            silent: silent.iter().map(|s| norm(s)).collect(),
            counts: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            removed: Mutex::new(HashSet::new()),
        });

        // UDP and TCP on the same ephemeral port (retry if TCP's is taken).
        let (udp, tcp) = {
            let mut tries = 0;
            loop {
                let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let addr = udp.local_addr().unwrap();
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(tcp) => break (udp, tcp),
                    Err(e) if tries < 20 => {
                        tries += 1;
                        let _ = e;
                    }
                    Err(e) => panic!("TestDns: no port for UDP+TCP: {e}"),
                }
            }
        };
        let addr = udp.local_addr().unwrap();
        let mut server = Server::new(Handler(state.clone()));
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 64);
        TestDns {
            addr,
            state,
            server,
        }
    }

    /// The zones the policy tests use (all TTLs [`STANDARD_TTL`], negative
    /// answers with SOA minimum [`SOA_MINIMUM`]). Clients are 127.0.0.x:
    ///
    /// | client     | PTR                        | forward               | DNSBL answers                                  |
    /// |------------|----------------------------|-----------------------|------------------------------------------------|
    /// | 127.0.0.2  | good.example.test          | A 127.0.0.2 (pass)    | none                                           |
    /// | 127.0.0.3  | NXDOMAIN (no PTR)          |                       | none                                           |
    /// | 127.0.0.4  | mismatch.example.test      | A 127.0.0.99          | none                                           |
    /// | 127.0.0.5  | SERVFAIL                   |                       | none                                           |
    /// | 127.0.0.6  | never answered (timeout)   |                       | none                                           |
    /// | 127.0.0.7  | good7.example.test         | A 127.0.0.7           | bl.test 127.0.0.2, bl2.test 127.0.0.10         |
    /// | 127.0.0.8  | good8.example.test         | A 127.0.0.8           | wl.test 127.0.0.5                              |
    /// | 127.0.0.9  | good9.example.test         | A 127.0.0.9           | bl.test 127.0.0.200                            |
    ///
    /// HELO names: mail.example.test (A 127.0.0.2), mx-only.example.test
    /// (MX 10 mail.example.test), nohost.example.test (NXDOMAIN),
    /// servfail.example.test (SERVFAIL). The zone slow.test never answers
    /// (a DNSBL that times out).
    pub async fn standard() -> TestDns {
        Self::start(STANDARD_RECORDS, STANDARD_SERVFAIL, STANDARD_SILENT).await
    }

    /// Takes `name`'s records away: from now on it is NXDOMAIN.
    pub fn remove(&self, name: &str) {
        self.state.removed.lock().unwrap().insert(norm(name));
    }

    /// Queries seen for `name` (trailing dot and case ignored) and type.
    pub fn queries(&self, name: &str, rtype_name: &str) -> usize {
        let key = (norm(name), rtype(rtype_name));
        self.state
            .counts
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Queries seen for the PTR of an IPv4 address.
    pub fn ptr_queries(&self, ip: Ipv4Addr) -> usize {
        let [a, b, c, d] = ip.octets();
        self.queries(&format!("{d}.{c}.{b}.{a}.in-addr.arpa"), "PTR")
    }

    /// All queries seen.
    pub fn total_queries(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        // Stops the accept loops; the server's tasks are aborted with it.
        self.server.shutdown_token().cancel();
    }
}

const T: u32 = STANDARD_TTL;

/// Records of [`TestDns::standard`].
pub const STANDARD_RECORDS: &[(&str, &str, &str, u32)] = &[
    // rDNS
    ("2.0.0.127.in-addr.arpa", "PTR", "good.example.test", T),
    ("good.example.test", "A", "127.0.0.2", T),
    ("4.0.0.127.in-addr.arpa", "PTR", "mismatch.example.test", T),
    ("mismatch.example.test", "A", "127.0.0.99", T),
    ("7.0.0.127.in-addr.arpa", "PTR", "good7.example.test", T),
    ("good7.example.test", "A", "127.0.0.7", T),
    ("8.0.0.127.in-addr.arpa", "PTR", "good8.example.test", T),
    ("good8.example.test", "A", "127.0.0.8", T),
    ("9.0.0.127.in-addr.arpa", "PTR", "good9.example.test", T),
    ("good9.example.test", "A", "127.0.0.9", T),
    // DNSBL / DNSWL
    ("7.0.0.127.bl.test", "A", "127.0.0.2", T),
    ("7.0.0.127.bl2.test", "A", "127.0.0.10", T),
    ("8.0.0.127.wl.test", "A", "127.0.0.5", T),
    ("9.0.0.127.bl.test", "A", "127.0.0.200", T),
    // HELO names
    ("mail.example.test", "A", "127.0.0.2", T),
    ("mx-only.example.test", "MX", "10 mail.example.test", T),
];

/// SERVFAIL names of [`TestDns::standard`].
pub const STANDARD_SERVFAIL: &[&str] = &["5.0.0.127.in-addr.arpa", "servfail.example.test"];

/// Never-answered names of [`TestDns::standard`].
pub const STANDARD_SILENT: &[&str] = &["6.0.0.127.in-addr.arpa", "slow.test"];
