#!/usr/bin/env bash
# Scenario 6b, STARTTLS against a peer (issue 16): smtp-edge and nginx mail
# proxy (tuned as PEERS.md says, plus `starttls on`, ssl_session_cache
# shared:SSL:10m, ssl_session_tickets on; loadtest/peers/nginx.sh start-tls)
# in front of the same smtp-load sink, with the same certificate and key,
# STARTTLS with a new connection per message, 4 KiB, client pipelining on
# (nginx offers none: lockstep there), for two certificates generated here
# with openssl:
#   ECDSA P-256, TLS 1.3 (the client offers 1.3 and 1.2)
#   RSA-2048, TLS 1.2 forced on the client side (smtp-load --tls12; ECDHE)
# and for each, full handshakes on every connection and with session
# resumption allowed (smtp-load --tls-resume). smtp-edge gets the files
# through [tls] certificate / private_key.
# Per row: msgs/s (median of the repeats, min-max), smtp-edge / nginx (ratio
# of the medians, range of the per-repeat ratios), the TLS handshake's p50
# (median of the repeats), the share of handshakes that resumed a session,
# the TLS version negotiated, and the proxy's CPU seconds per 1 000 messages
# (smtp-load --watch-pid: smtp-edge's process; nginx's master and workers).
# The note column flags a transaction p50 that exceeds the connect, handshake
# and MAIL-to-final p50s by more than 10 ms: nginx's mail module sets no
# TCP_NODELAY (and has no directive for it), and on loopback its reply to
# the EHLO after STARTTLS waits for the client's delayed ACK, about 40 ms per
# message (checked with -c 1: connect 0.25 ms, handshake 0.8 ms, MAIL to
# final 0.5 ms, transaction 44 ms); with C connections that caps nginx near
# C / 0.044 s. For the same reason nginx's close after QUIT (close_notify,
# FIN) waits about 40 ms; smtp-load by default waits for the server to close
# first, which would add those 40 ms to every nginx message although a
# sending MTA (Postfix's smtp client, say) closes as soon as it has the 221.
# So both paths run with --no-wait-close (WAIT_CLOSE=1: wait, as smtp-load
# does by default), and the note column also flags a closed-loop cycle
# (connections / msgs/s) that exceeds the transaction p50 by more than 10 ms.
# The two paths alternate within each repeat; each certificate gets a fresh
# smtp-edge and nginx. A run counts only if every message was accepted; a
# failed run is listed, left out of the medians, and makes the script exit
# 1, as does a sink count that differs from the generator's.
# PIN=1: smtp-edge (1 worker thread) or nginx (1 worker) alone on CPU 1, load
# and sink on CPU 0; the "setup" column says which, so the tables of a
# shared and a pinned run paste together. The table is markdown.
#
# Usage: tls-peers.sh [SECONDS_PER_RUN=5] [CONNECTIONS=50] [REPEATS=3]
# Env: WARMUP (1 s before each run), CERTS ("ecdsa rsa"),
#      HANDSHAKES ("full resume") to run a subset, WAIT_CLOSE=1.
# shellcheck source-path=SCRIPTDIR
# shellcheck source=../lib.sh
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
CONNS=${2:-50}
REPS=${3:-3}
WARMUP=${WARMUP:-1}
read -r -a CERTS <<<"${CERTS:-ecdsa rsa}"
read -r -a HANDSHAKES <<<"${HANDSHAKES:-full resume}"
close=(--no-wait-close)
close_s="closing after the 221 (--no-wait-close)"
if [ -n "${WAIT_CLOSE:-}" ]; then
  close=()
  close_s="waiting for the server to close after QUIT"
fi

command -v openssl >/dev/null || {
  echo "openssl is needed to make the certificates" >&2
  exit 2
}
build
SINK=$(free_port)
start_sink "$SINK" --json

# The same certificate and key for both proxies.
for cert in "${CERTS[@]}"; do
  case $cert in
    ecdsa) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    rsa) newkey=(-newkey rsa:2048) ;;
    *)
      echo "unknown certificate type '$cert' (ecdsa, rsa)" >&2
      exit 2
      ;;
  esac
  openssl req -x509 "${newkey[@]}" -nodes -days 30 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/$cert.key" -out "$WORK/$cert.crt" 2>"$WORK/$cert.openssl.log"
done

machine
setup=shared
if [ -n "${PIN:-}" ]; then setup="PIN=1"; fi
echo "tls-peers: smtp-edge vs nginx mail (starttls on), STARTTLS, new connection per message, 4 KiB, $CONNS connections, ${SECS} s per run after a ${WARMUP} s warm-up, $REPS repeat(s), $close_s; $setup"

RUNS="$WORK/runs"
mkdir -p "$RUNS"
PATHS_RUN=(smtp-edge nginx)
k=0
for cert in "${CERTS[@]}"; do
  declare -A PORT=() WATCH=()
  PORT[smtp-edge]=$(free_port)
  start_edge "${PORT[smtp-edge]}" "$SINK" starttls "[tls]
certificate = \"$WORK/$cert.crt\"
private_key = \"$WORK/$cert.key\""
  WATCH[smtp-edge]=$EDGE_PID
  PORT[nginx]=$(free_port)
  if ! start_peer nginx start-tls "${PORT[nginx]}" "$SINK" "$WORK/$cert.crt" "$WORK/$cert.key" "$(free_port)"; then
    echo "nginx did not start (see loadtest/peers/install.sh): $(tail -1 "$PEER_DIR.log")" >&2
    exit 1
  fi
  NGINX_DIR=$PEER_DIR
  WATCH[nginx]=$(peer_pids nginx "$NGINX_DIR" | paste -sd' ' -)
  echo "  $cert: smtp-edge on :${PORT[smtp-edge]} (pid ${WATCH[smtp-edge]}), nginx on :${PORT[nginx]} (pids ${WATCH[nginx]})"
  client=()
  if [ "$cert" = rsa ]; then client=(--tls12); fi
  for rep in $(seq 1 "$REPS"); do
    for hs in "${HANDSHAKES[@]}"; do
      resume=()
      if [ "$hs" = resume ]; then resume=(--tls-resume); fi
      for i in 0 1; do
        path=${PATHS_RUN[$(((i + k) % 2))]}
        watch=()
        for p in ${WATCH[$path]}; do watch+=(--watch-pid "$p"); done
        out="$RUNS/$cert.$hs.$path.$rep.json"
        if ! load "$out" -t "127.0.0.1:${PORT[$path]}" -c "$CONNS" -m 1 -s 4096 -d "$SECS" --warmup "$WARMUP" \
          --starttls "${client[@]}" "${resume[@]}" "${close[@]}" "${watch[@]}"; then
          echo "FAILED: $path, $cert, $hs handshakes, repeat $rep (not every message accepted)" >&2
        fi
      done
      k=$((k + 1))
    done
  done
  stop_pid "$EDGE_PID"
  forget "$EDGE_PID"
  stop_peer nginx "$NGINX_DIR"
done
stop_pid "$SINK_PID"
forget "$SINK_PID"

LT_DIR="$LT_DIR" python3 - "$RUNS" "$REPS" "$WORK/sink.$SINK.log" "$setup" "${CERTS[@]}" -- "${HANDSHAKES[@]}" <<'PY'
import json, os, statistics, sys
args = sys.argv[1:]
runs, reps, sink_log, setup = args[0], int(args[1]), args[2], args[3]
sep = args.index("--")
certs, handshakes = args[4:sep], args[sep + 1:]
paths = ["smtp-edge", "nginx"]
cert_name = {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}
client_tls = {"ecdsa": "1.3 + 1.2 offered", "rsa": "1.2 forced"}

def report(*key):
    try:
        with open(os.path.join(runs, ".".join(map(str, key)) + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

failed, sent = [], 0
print("| certificate | client TLS | handshakes | path | msgs/s (median) | min–max | smtp-edge / nginx (per-repeat) | handshake p50 µs | resumed | negotiated | CPU s / 1 000 msgs | setup | note |")
print("|---|---|---|---|---:|---|---|---:|---:|---|---:|---|---|")
for cert in certs:
    for hs in handshakes:
        ok = {}
        for path in paths:
            ok[path] = {}
            for rep in range(1, reps + 1):
                r = report(cert, hs, path, rep)
                if r is not None:
                    sent += r["messages"]["accepted"] + r["messages"]["warmup"]
                if r is None or not r.get("ok"):
                    failed.append(f"{path} {cert} {hs} repeat {rep}")
                    continue
                ok[path][rep] = r
        med = {p: statistics.median(r["msgs_per_sec"] for r in ok[p].values()) if ok[p] else None for p in paths}
        for path in paths:
            runs_ok = ok[path]
            notes = []
            if len(runs_ok) < reps:
                notes.append(f"{reps - len(runs_ok)} of {reps} runs FAILED")
            if not runs_ok:
                print(f"| {cert_name[cert]} | {client_tls[cert]} | {hs} | {path} | FAILED | | | | | | | {setup} | {'; '.join(notes)} |")
                continue
            v = [r["msgs_per_sec"] for r in runs_ok.values()]
            ratio = "–"
            if path == "smtp-edge" and med["nginx"]:
                per = [r["msgs_per_sec"] / ok["nginx"][rep]["msgs_per_sec"] for rep, r in runs_ok.items() if rep in ok["nginx"]]
                ratio = f"{med[path] / med['nginx']:.3f}" + (f" ({min(per):.3f}–{max(per):.3f})" if per else "")
            hs_p50 = statistics.median(r["latency_us"]["tls_handshake"]["p50"] for r in runs_ok.values())
            tls = [r.get("tls") or {} for r in runs_ok.values()]
            n = sum(t.get("handshakes", 0) for t in tls)
            resumed = sum(t.get("resumed", 0) for t in tls)
            t12 = sum(t.get("tls12", 0) for t in tls)
            t13 = sum(t.get("tls13", 0) for t in tls)
            neg = "1.3" if n and t13 == n else "1.2" if n and t12 == n else f"1.2: {t12}, 1.3: {t13}"
            share = f"{100 * resumed / n:.1f} %" if n else "–"
            if hs == "resume" and n and resumed == 0:
                notes.append("no session resumed")
            cpu = [r["server"]["cpu_s_per_1000"] for r in runs_ok.values() if r.get("server")]
            # Time per message outside the phases measured on their own:
            # the EHLOs (before and after STARTTLS) and the STARTTLS reply.
            p50 = lambda ph: statistics.median(r["latency_us"][ph]["p50"] for r in runs_ok.values())
            gap = p50("transaction") - p50("connect_to_greeting") - p50("tls_handshake") - p50("mail_to_final")
            if gap > 10000:
                notes.append(f"≈ {gap / 1000:.0f} ms per message around the EHLOs/STARTTLS (transaction p50 minus the connect, handshake and MAIL-to-final p50s)")
            cycle = statistics.median(1e6 * r["config"]["connections"] / r["msgs_per_sec"] for r in runs_ok.values())
            if cycle - p50("transaction") > 10000:
                notes.append(f"≈ {(cycle - p50('transaction')) / 1000:.0f} ms per message after the final reply (QUIT, the close)")
            if sum(r["messages"].get("pipelined", 0) for r in runs_ok.values()) == 0:
                notes.append("lockstep: PIPELINING not offered")
            print("| {} | {} | {} | {} | {:.0f} | {:.0f}–{:.0f} | {} | {:.0f} | {} | {} | {} | {} | {} |".format(
                cert_name[cert], client_tls[cert], hs, path, med[path], min(v), max(v), ratio, hs_p50,
                share, neg, f"{statistics.median(cpu):.3f}" if cpu else "–", setup, "; ".join(notes)))

sys.path.insert(0, os.environ["LT_DIR"])
from verdict import finish  # noqa: E402

finish(failed, sink_log, sent)
PY
