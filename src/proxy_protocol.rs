//! PROXY protocol inbound (HAProxy's v1 text and v2 binary headers, parsed
//! by the `ppp` crate): on a listener with `proxy_protocol = true`, who may
//! send a header (`trusted_proxies`), reading exactly the header off the
//! socket within `proxy_header_timeout`, and what it says: the original
//! client and destination addresses, or LOCAL (the balancer's own
//! connection, a health check: served with the socket's endpoints).
//!
//! Reading never consumes a byte past the header: the bytes are peeked,
//! judged, and only the header's own bytes are read, so what follows (a TLS
//! ClientHello on an implicit-TLS listener, a client talking before the
//! greeting) reaches the session untouched. Bytes peeked while the header is
//! still incomplete are all header, so they are read off before peeking
//! again, and a peek never returns the same bytes twice (no spinning).
//!
//! `scan` is the sans-IO judge of the bytes so far (`Scan::Complete`,
//! `Incomplete` or `Invalid` with a `Refusal`, whose `name` is the metric
//! label): ppp parses, `scan` adds the length cap (`MAX_HEADER`) and judges
//! a v1 line only once its LF is there, on the bytes up to that LF alone,
//! because ppp calls some cuts of a valid v1 line invalid and judges a
//! whole line by what follows it. `trusted` says who may send a header.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature (12 bytes) that starts every binary header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header, CRLF included (the spec's 107 bytes).
const V1_MAX: usize = 107;

/// The longest header taken: a v1 header is at most 107 bytes; a v2 header
/// is 16 bytes and the addresses (at most 216 for UNIX sockets) plus TLVs.
/// Balancers send a few hundred bytes of TLVs at most (AWS, Azure, GCP);
/// anything longer is refused as `too_long` before it is read.
pub const MAX_HEADER: usize = 1536;

/// What a complete, valid header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied TCP connection: the original client and the address it
    /// connected to (the balancer's public address).
    Proxied {
        client: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 LOCAL or v1 UNKNOWN: the balancer speaking for itself (a health
    /// check). The spec has the receiver accept it and use the real
    /// connection endpoints: served as a session whose client is the
    /// socket's peer (the balancer), judged by the policy like any client.
    Local,
}

/// Why a connection on a PROXY protocol listener was closed before its
/// session began. Each is a label of `smtp_edge_proxy_headers_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source is not in `trusted_proxies`.
    Untrusted,
    /// The header was not complete within `proxy_header_timeout`.
    Timeout,
    /// Not a PROXY header, or an invalid one.
    Malformed,
    /// Longer than [`MAX_HEADER`].
    TooLong,
    /// A PROXY command for a family other than TCP over IPv4/IPv6 (UNIX
    /// sockets, UDP, unspecified).
    Unsupported,
    /// The peer closed (or the socket failed) before the header was whole.
    Closed,
    /// The listener already had `backlog` connections waiting for their
    /// header: closed at accept, unread.
    Busy,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::Timeout => "timeout",
            Refusal::Malformed => "malformed",
            Refusal::TooLong => "too_long",
            Refusal::Unsupported => "unsupported",
            Refusal::Closed => "closed",
            Refusal::Busy => "busy",
        }
    }
}

/// Whether `source` may send a PROXY header (IPv4-mapped IPv6 sources are
/// judged as their IPv4 address).
pub fn trusted(trusted_proxies: &[IpNet], source: IpAddr) -> bool {
    let source = source.to_canonical();
    trusted_proxies.iter().any(|n| n.contains(&source))
}

/// The judgement of the bytes seen so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// A whole header of `len` bytes.
    Complete {
        len: usize,
        header: Header,
    },
    /// A valid start; more bytes are needed.
    Incomplete,
    Invalid(Refusal),
}

/// Judges `buf`, the bytes from the start of the connection (possibly
/// followed by bytes that are not part of the header). Public for the
/// fuzz target and property tests; the server uses `read_header`.
pub fn scan(buf: &[u8]) -> Scan {
    if buf.len() >= 16 && buf.starts_with(V2_SIGNATURE) {
        let total = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if total > MAX_HEADER {
            return Scan::Invalid(Refusal::TooLong);
        }
    }
    // A v1 header is judged whole (up to its LF): ppp calls some cuts of a
    // valid one invalid (`PROXY TCP6 a b 1 ` before the last port).
    let v2_start = buf.len().min(12);
    let v1_start = buf.len().min(6);
    let mut buf = buf;
    let v1 = buf[..v2_start] != V2_SIGNATURE[..v2_start];
    if v1 {
        if buf[..v1_start] != b"PROXY "[..v1_start] {
            return Scan::Invalid(Refusal::Malformed);
        }
        let Some(lf) = memchr::memchr(b'\n', buf) else {
            return if buf.len() >= V1_MAX {
                Scan::Invalid(Refusal::TooLong)
            } else {
                Scan::Incomplete
            };
        };
        // A v1 header ends at its first LF: it is judged on those bytes
        // alone, so what follows them (and how it arrives) cannot change
        // the verdict (ppp judged some lines by the bytes after the LF).
        buf = &buf[..=lf];
    }
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        // The whole v1 line is there: it will never be more complete.
        return if v1 {
            Scan::Invalid(Refusal::Malformed)
        } else {
            Scan::Incomplete
        };
    }
    match parsed {
        HeaderResult::V2(Ok(h)) => {
            let len = h.len();
            let header = match (h.command, h.protocol, h.addresses) {
                (v2::Command::Local, _, _) => Header::Local,
                (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => {
                    Header::Proxied {
                        client: SocketAddr::from((a.source_address, a.source_port)),
                        destination: SocketAddr::from((a.destination_address, a.destination_port)),
                    }
                }
                (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => {
                    Header::Proxied {
                        client: SocketAddr::from((a.source_address, a.source_port)),
                        destination: SocketAddr::from((a.destination_address, a.destination_port)),
                    }
                }
                _ => return Scan::Invalid(Refusal::Unsupported),
            };
            Scan::Complete { len, header }
        }
        HeaderResult::V1(Ok(h)) => {
            let len = h.header.len();
            let header = match h.addresses {
                v1::Addresses::Unknown => Header::Local,
                v1::Addresses::Tcp4(a) => Header::Proxied {
                    client: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                v1::Addresses::Tcp6(a) => Header::Proxied {
                    client: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
            };
            Scan::Complete { len, header }
        }
        HeaderResult::V1(Err(v1::BinaryParseError::Parse(v1::ParseError::HeaderTooLong))) => {
            Scan::Invalid(Refusal::TooLong)
        }
        _ => Scan::Invalid(Refusal::Malformed),
    }
}

/// Reads the PROXY header at the start of `stream`, within `timeout`, and
/// nothing after it.
pub async fn read_header(stream: &mut TcpStream, timeout: Duration) -> Result<Header, Refusal> {
    match tokio::time::timeout(timeout, read_header_inner(stream)).await {
        Ok(r) => r,
        Err(_) => Err(Refusal::Timeout),
    }
}

async fn read_header_inner(stream: &mut TcpStream) -> Result<Header, Refusal> {
    let mut seen: Vec<u8> = Vec::with_capacity(128);
    let mut peeked = [0u8; MAX_HEADER];
    loop {
        let room = MAX_HEADER - seen.len();
        let n = stream
            .peek(&mut peeked[..room])
            .await
            .map_err(|_| Refusal::Closed)?;
        if n == 0 {
            return Err(Refusal::Closed);
        }
        let before = seen.len();
        seen.extend_from_slice(&peeked[..n]);
        match scan(&seen) {
            Scan::Complete { len, header } => {
                // Only the header's own bytes; the rest stays in the socket.
                stream
                    .read_exact(&mut peeked[..len - before])
                    .await
                    .map_err(|_| Refusal::Closed)?;
                return Ok(header);
            }
            Scan::Incomplete if seen.len() >= MAX_HEADER => return Err(Refusal::TooLong),
            Scan::Incomplete => {
                // All of it is header: take it off, so the next peek waits
                // for new bytes.
                stream
                    .read_exact(&mut peeked[..n])
                    .await
                    .map_err(|_| Refusal::Closed)?;
            }
            Scan::Invalid(r) => return Err(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v2(cmd: u8, fam: u8, addr: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | cmd);
        b.push(fam);
        b.extend_from_slice(&((addr.len() + tlvs.len()) as u16).to_be_bytes());
        b.extend_from_slice(addr);
        b.extend_from_slice(tlvs);
        b
    }

    fn v4_addrs() -> Vec<u8> {
        let mut a = vec![192, 0, 2, 7, 198, 51, 100, 1];
        a.extend_from_slice(&40000u16.to_be_bytes());
        a.extend_from_slice(&25u16.to_be_bytes());
        a
    }

    #[test]
    fn v1_tcp4_and_what_follows_is_not_taken() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        let Scan::Complete { len, header } = scan(h) else {
            panic!()
        };
        assert_eq!(&h[len..], b"EHLO x\r\n");
        assert_eq!(
            header,
            Header::Proxied {
                client: "192.0.2.7:40000".parse().unwrap(),
                destination: "198.51.100.1:25".parse().unwrap()
            }
        );
    }

    #[test]
    fn v1_tcp6_unknown_and_partial() {
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert!(matches!(
            scan(h),
            Scan::Complete {
                header: Header::Proxied { .. },
                ..
            }
        ));
        assert_eq!(
            scan(b"PROXY UNKNOWN\r\n"),
            Scan::Complete {
                len: 15,
                header: Header::Local
            }
        );
        for cut in 1..h.len() {
            assert_eq!(scan(&h[..cut]), Scan::Incomplete, "cut {cut}");
        }
    }

    /// The spec: after UNKNOWN "the receiver must ignore anything presented
    /// before the CRLF"; what follows the line is the session's.
    #[test]
    fn v1_unknown_with_addresses_is_local_too() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 40000 25\r\n",
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ] {
            let mut with_tail = line.to_vec();
            with_tail.extend_from_slice(b"EHLO x\r\n");
            assert_eq!(
                scan(&with_tail),
                Scan::Complete {
                    len: line.len(),
                    header: Header::Local
                },
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn v2_ipv4_with_tlvs_local_and_every_prefix_incomplete() {
        // An unknown TLV (0xE0) and an AWS-style one: ignored.
        let h = v2(1, 0x11, &v4_addrs(), &[0xE0, 0, 3, 1, 2, 3, 0xEA, 0, 1, 9]);
        for cut in 0..h.len() {
            assert_eq!(scan(&h[..cut]), Scan::Incomplete, "cut {cut}");
        }
        let mut with_tail = h.clone();
        with_tail.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            scan(&with_tail),
            Scan::Complete {
                len: h.len(),
                header: Header::Proxied {
                    client: "192.0.2.7:40000".parse().unwrap(),
                    destination: "198.51.100.1:25".parse().unwrap()
                }
            }
        );
        assert!(matches!(
            scan(&v2(0, 0x00, &[], &[])),
            Scan::Complete {
                header: Header::Local,
                len: 16
            }
        ));
        // LOCAL with an address block (any family, UDP and UNIX included):
        // the spec has the receiver discard the block, family and all.
        for (fam, addr) in [
            (0x11, v4_addrs()),
            (0x12, v4_addrs()),
            (0x31, vec![0u8; 216]),
        ] {
            let h = v2(0, fam, &addr, &[0xE0, 0, 1, 7]);
            assert_eq!(
                scan(&h),
                Scan::Complete {
                    len: h.len(),
                    header: Header::Local
                },
                "family {fam:#x}"
            );
        }
    }

    #[test]
    fn bad_headers() {
        assert_eq!(
            scan(b"EHLO client.example\r\n"),
            Scan::Invalid(Refusal::Malformed)
        );
        assert_eq!(
            scan(b"PROXY TCP4 1.2.3.4 nonsense 1 2\r\n"),
            Scan::Invalid(Refusal::Malformed)
        );
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        assert_eq!(scan(long.as_bytes()), Scan::Invalid(Refusal::TooLong));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(scan(&huge), Scan::Invalid(Refusal::TooLong));
        // PROXY over UDP, and a UNIX-socket family.
        assert_eq!(
            scan(&v2(1, 0x12, &v4_addrs(), &[])),
            Scan::Invalid(Refusal::Unsupported)
        );
        assert_eq!(
            scan(&v2(1, 0x31, &[0u8; 216], &[])),
            Scan::Invalid(Refusal::Unsupported)
        );
        // Version 1 in the binary form is not a thing.
        let mut bad = v2(1, 0x11, &v4_addrs(), &[]);
        bad[12] = 0x11;
        assert_eq!(scan(&bad), Scan::Invalid(Refusal::Malformed));
    }

    #[test]
    fn trusted_sources() {
        let nets: Vec<IpNet> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        assert!(trusted(&nets, Ipv4Addr::LOCALHOST.into()));
        assert!(trusted(&nets, "10.9.8.7".parse().unwrap()));
        assert!(trusted(&nets, "::ffff:10.1.1.1".parse().unwrap()));
        assert!(!trusted(&nets, "192.0.2.1".parse().unwrap()));
        assert!(!trusted(&[], Ipv4Addr::LOCALHOST.into()));
    }

    /// Fuzz finding (fuzz/README.md, `proxy` target): a v1 line whose LF
    /// was there stayed `Incomplete` (ppp waits for a CRLF), except at one
    /// length where ppp called it malformed: the verdict depended on how
    /// the bytes arrived, and a line that can never become a header was
    /// waited on until the timeout.
    #[test]
    fn v1_line_judged_once_its_lf_is_there() {
        let input = b"PROXY TCP4 1\x023\0XYC\nQU\n~\xc6\xb6n;T";
        let verdicts: Vec<(usize, Scan)> =
            (0..=input.len()).map(|k| (k, scan(&input[..k]))).collect();
        for (k, v) in &verdicts {
            let lf = input[..*k].contains(&b'\n');
            let want = if lf {
                Scan::Invalid(Refusal::Malformed)
            } else {
                Scan::Incomplete
            };
            assert_eq!(*v, want, "prefix {k}");
        }
    }
}
