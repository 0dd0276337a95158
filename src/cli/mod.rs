//! The binary's admin-client commands: `smtp-edge reload`, `smtp-edge ban
//! add|list|remove|clear` and `smtp-edge top` (`top.rs`), each a plain HTTP/1.1
//! request to the admin listener (`--admin HOST:PORT`, or `[admin]
//! address` of the `--config` file). Part of the binary only (`main.rs`
//! declares it); it speaks to the proxy through the admin API alone.
//!
//! Exit codes: 0 done, 1 the proxy refused (the reason is printed), 2 the
//! proxy could not be asked.

pub mod top;

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use smtp_edge::config::Config;

/// `smtp-edge ban …`.
#[derive(Subcommand)]
pub enum BanCmd {
    /// Ban an address or a CIDR network (refused at connect with 421 4.7.1
    /// until it expires).
    Add {
        /// 198.51.100.7, 198.51.100.0/24, 2001:db8::/48 …
        address: String,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600.0)]
        ttl: f64,
        /// Why (kept for the operators; never sent to the client).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the bans in force.
    List {
        /// Only those of one source: admin, unknown_recipients,
        /// bad_commands, pregreet.
        #[arg(long)]
        source: Option<String>,
        /// The API's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// Lift the ban of exactly this address or network.
    Remove { address: String },
    /// Lift every ban of a source (`all`: every ban).
    Clear {
        #[arg(long)]
        source: String,
    },
}

/// The admin listener to ask: `--admin`, else `[admin] address` of the
/// config file. Err is the message to print (exit 2).
pub fn admin_address(admin: Option<&str>, config: Option<&Path>) -> Result<String, String> {
    match (admin, config) {
        (Some(a), _) => Ok(a.to_string()),
        (None, Some(p)) => match Config::load(p) {
            Ok(c) => match c.admin {
                Some(a) => Ok(a.address.to_string()),
                None => Err(format!(
                    "{}: no [admin] address to ask; give --admin",
                    p.display()
                )),
            },
            Err(e) => Err(e.to_string()),
        },
        (None, None) => Err("give --admin HOST:PORT or --config FILE".into()),
    }
}

/// One request: (status, body).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// `smtp-edge reload`: POST /reload.
pub fn reload(admin: Option<&str>, config: Option<&Path>) -> ExitCode {
    let addr = match admin_address(admin, config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("smtp-edge reload: {e}");
            return ExitCode::from(2);
        }
    };
    match request(&addr, "POST", "/reload", None, Duration::from_secs(60)) {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((422, body)) => {
            eprint!("{body}");
            ExitCode::from(1)
        }
        Ok((status, body)) => {
            eprintln!("smtp-edge reload: {addr} answered {status}");
            eprint!("{body}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("smtp-edge reload: cannot ask {addr}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Percent-encodes a query value (addresses carry `/` and `:`).
fn q(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// `smtp-edge ban …`.
pub fn ban(cmd: BanCmd, admin: Option<&str>, config: Option<&Path>) -> ExitCode {
    let addr = match admin_address(admin, config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("smtp-edge ban: {e}");
            return ExitCode::from(2);
        }
    };
    let (method, path, body) = match &cmd {
        BanCmd::Add {
            address,
            ttl,
            reason,
        } => (
            "POST",
            "/bans".to_string(),
            Some(serde_json::json!({"address": address, "ttl": ttl, "reason": reason}).to_string()),
        ),
        BanCmd::List { source, .. } => (
            "GET",
            match source {
                Some(s) => format!("/bans?source={}", q(s)),
                None => "/bans".to_string(),
            },
            None,
        ),
        BanCmd::Remove { address } => ("DELETE", format!("/bans?address={}", q(address)), None),
        BanCmd::Clear { source } => ("DELETE", format!("/bans?source={}", q(source)), None),
    };
    let (status, text) = match request(
        &addr,
        method,
        &path,
        body.as_deref(),
        Duration::from_secs(10),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("smtp-edge ban: cannot ask {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if !(200..300).contains(&status) {
        let why = v
            .get("error")
            .and_then(|e| e.as_str())
            .map_or_else(|| text.trim().to_string(), str::to_string);
        eprintln!("smtp-edge ban: {addr} answered {status}: {why}");
        return ExitCode::from(if (400..500).contains(&status) { 1 } else { 2 });
    }
    match cmd {
        BanCmd::List { json: true, .. } => print!("{text}"),
        BanCmd::List { .. } => print!("{}", table(&v)),
        BanCmd::Add { .. } => println!(
            "banned {} for {} s",
            v["address"].as_str().unwrap_or("?"),
            v["expires_in"]
        ),
        BanCmd::Remove { address } => println!("lifted the ban of {address}"),
        BanCmd::Clear { .. } => println!("lifted {} bans", v["removed"]),
    }
    ExitCode::SUCCESS
}

/// The list as a table, by expiry.
fn table(v: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<40} {:<20} {:>10}  {}\n",
        "ADDRESS", "SOURCE", "EXPIRES IN", "REASON"
    );
    for b in v["bans"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<40} {:<20} {:>9}s  {}\n",
            b["address"].as_str().unwrap_or("?"),
            b["source"].as_str().unwrap_or("?"),
            b["expires_in"],
            b["reason"].as_str().unwrap_or(""),
        ));
    }
    out.push_str(&format!("{} bans\n", v["count"]));
    out
}
