//! `smtp-edge top`: the admin listener's `/top` as a table that refreshes
//! in the terminal, like `htop` or KumoMTA's `kcli top`. Keys: `s`
//! sessions, `m` messages, `r` recipients, `f` refusals (the sort), `p`
//! addresses or prefixes, `q` (or Esc, Ctrl-C) quits. With `--once`, or
//! when stdout is not a terminal, one table is printed and it exits.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, terminal};

use super::request;

/// What the table shows.
pub struct View {
    pub by: String,
    pub n: usize,
    pub prefixes: bool,
}

/// Fetches `/top` once: the JSON, or the reason it could not.
fn fetch(addr: &str, v: &View) -> Result<serde_json::Value, String> {
    let path = format!("/top?by={}&n={}", v.by, v.n);
    match request(addr, "GET", &path, None, Duration::from_secs(5)) {
        Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}")),
        Ok((status, body)) => Err(format!("{addr} answered {status}: {}", body.trim())),
        Err(e) => Err(format!("cannot ask {addr}: {e}")),
    }
}

/// The table for one answer.
pub fn table(j: &serde_json::Value, v: &View) -> String {
    let (rows, key, what) = if v.prefixes {
        (&j["prefixes"], "prefix", "PREFIX")
    } else {
        (&j["addresses"], "address", "ADDRESS")
    };
    let mut out = format!(
        "smtp-edge top: last {} s, by {}, {} addresses and {} prefixes tracked\n\n{:<42} {:>5} {:>8} {:>8} {:>8} {:>8}  {:<24} {}\n",
        j["window"],
        v.by,
        j["tracked"]["addresses"],
        j["tracked"]["prefixes"],
        what,
        "OPEN",
        "SESSIONS",
        "MESSAGES",
        "RCPTS",
        "REFUSED",
        "MOST REFUSED FOR",
        "BAN"
    );
    for r in rows.as_array().into_iter().flatten() {
        let reason = r["refusals"]
            .as_object()
            .and_then(|m| m.iter().max_by_key(|(_, n)| n.as_u64()))
            .map(|(k, n)| format!("{k} ({n})"))
            .unwrap_or_default();
        let ban = match r["ban"].as_object() {
            Some(b) => format!(
                "{} {}s",
                b["source"].as_str().unwrap_or("?"),
                b["expires_in"]
            ),
            None => String::new(),
        };
        out.push_str(&format!(
            "{:<42} {:>5} {:>8} {:>8} {:>8} {:>8}  {:<24} {}\n",
            r[key].as_str().unwrap_or("?"),
            r["open"],
            r["sessions"],
            r["messages"],
            r["recipients"],
            r["refusals_total"],
            reason,
            ban
        ));
    }
    out
}

/// Runs `smtp-edge top` against `addr`.
pub fn run(addr: &str, mut view: View, interval: f64, once: bool) -> ExitCode {
    if once || !std::io::stdout().is_terminal() {
        return match fetch(addr, &view) {
            Ok(j) => {
                print!("{}", table(&j, &view));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("smtp-edge top: {e}");
                ExitCode::from(2)
            }
        };
    }
    let every = Duration::try_from_secs_f64(interval)
        .unwrap_or(Duration::from_secs(2))
        .max(Duration::from_millis(200));
    let mut out = std::io::stdout();
    if terminal::enable_raw_mode().is_err() {
        eprintln!("smtp-edge top: cannot drive this terminal; try --once");
        return ExitCode::from(2);
    }
    let _ = execute!(out, terminal::EnterAlternateScreen, cursor::Hide);
    let result = (|| -> std::io::Result<()> {
        loop {
            let text = match fetch(addr, &view) {
                Ok(j) => table(&j, &view),
                Err(e) => format!("smtp-edge top: {e}\n"),
            };
            // A terminal that does not tell its size (0 rows) gets 40.
            let rows = match terminal::size() {
                Ok((_, r)) if r >= 5 => r,
                _ => 40,
            };
            execute!(
                out,
                cursor::MoveTo(0, 0),
                terminal::Clear(terminal::ClearType::All)
            )?;
            let lines = text.lines().take(usize::from(rows).saturating_sub(2));
            for l in lines {
                write!(out, "{l}\r\n")?;
            }
            write!(
                out,
                "\r\n[s]essions [m]essages [r]ecipients re[f]usals  [p] {}  [q]uit",
                if view.prefixes {
                    "addresses"
                } else {
                    "prefixes"
                }
            )?;
            out.flush()?;
            let until = Instant::now() + every;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(KeyEvent {
                    code, modifiers, ..
                }) = event::read()?
                {
                    let by = match code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(())
                        }
                        KeyCode::Char('s') => "sessions",
                        KeyCode::Char('m') => "messages",
                        KeyCode::Char('r') => "recipients",
                        KeyCode::Char('f') => "refusals",
                        KeyCode::Char('p') => {
                            view.prefixes = !view.prefixes;
                            break;
                        }
                        _ => continue,
                    };
                    view.by = by.to_string();
                    break;
                }
            }
        }
    })();
    let _ = execute!(out, cursor::Show, terminal::LeaveAlternateScreen);
    let _ = terminal::disable_raw_mode();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtp-edge top: {e}");
            ExitCode::from(2)
        }
    }
}
