#!/usr/bin/env bash
# Scenario 17, dictionary attack against the shield (issue 25): 50 attacking
# addresses open new connections, one message each with RCPTS recipients
# that are never repeated (`--to 'nouser{seq}@example.org'`), and the sink
# backend refuses every one as an unknown user (`--unknown-prefix nouser`:
# 550 5.1.1); meanwhile good senders (4 addresses, persistent, open loop at
# GOOD_RATE) deliver to known users. Phases, each with a fresh sink and a
# fresh smtp-edge (admin listener on a free port):
#   idle      the good senders alone (smtp-edge with the shield);
#   open      the attack on smtp-edge without the shield (no
#             [policy.bans.unknown_recipients]); the unknown-recipient cache
#             ([policy.recipients] cache_unknown, default 300 s) is on, but
#             never-repeated addresses never hit it;
#   shield    the same attack on smtp-edge with
#             [policy.bans.unknown_recipients] action = "reject",
#             per_ip = { count = 20, period = 600 }, ban_for = 3600;
#   lockstep  shield, the attackers without pipelining (waiting for each
#             reply): what a budget of 20 lets through without a pipelined
#             batch (LOCKSTEP=0 leaves it out).
# The attack is an open loop of ATTACK_RATE sessions/s (default 1000, on
# at most 50 connections at once, the addresses in turn), the same load on
# every smtp-edge; ATTACK_RATE=0 makes it a closed loop, 50 connections as
# fast as they go (then the generator takes what the machine has and the
# runs differ in attempts). The good senders start first (1 s warmup); the
# attackers start when the good senders begin to measure and run as long,
# so the measured window holds the whole attack, its first moments before
# the bans included.
# Per phase: the RCPTs the backend saw and how many it refused as unknown,
# the attackers' sessions and what they were told, the bans in force at the
# end (GET /bans, /metrics smtp_edge_bans_active) and how many were added,
# the good senders' MAIL-to-final p50/p99 and their ratio to idle (issue 25
# target with the shield: <= 1.5x), and smtp-edge's CPU: in all, and per
# attacking session and per attacking RCPT sent, net of the good senders'
# share (the idle phase's CPU rate times the attack's length).
# Usage: dictionary.sh [SECONDS_PER_PHASE=5] [GOOD_RATE=40] [RCPTS=20]
# ATTACKERS=50 attacking addresses (127.0.1.2 on); KEEP=DIR keeps the
# reports, bans and metrics.
source "$(dirname "$0")/../lib.sh"
[ -n "${KEEP:-}" ] && trap 'cp -r "$WORK" "$KEEP"; cleanup' EXIT
SECS=${1:-5}
RATE=${2:-40}
RCPTS=${3:-20}
NATTACK=${ATTACKERS:-50}
ATTACK_RATE=${ATTACK_RATE:-1000}
GOOD=127.0.0.2-127.0.0.5
ATTACK=127.0.1.2-127.0.1.$((1 + NATTACK))
UNKNOWN=nouser
BUDGET=20
SHIELD="[policy.bans.unknown_recipients]
action = \"reject\"
per_ip = { count = $BUDGET, period = 600 }
ban_for = 3600"
export ALLOW_INCOMPLETE=1
build
machine

# phase NAME POLICY_TOML: a fresh sink (refusing $UNKNOWN* as unknown
# users) and a fresh smtp-edge in front of it with an admin listener; sets
# P_SINK P_SINK_PID P_EDGE P_EDGE_PID P_ADMIN.
phase() {
  P_SINK=$(free_port)
  start_sink "$P_SINK" --unknown-prefix "$UNKNOWN" --json
  P_SINK_PID=$SINK_PID
  P_ADMIN=$(free_port)
  P_EDGE=$(free_port)
  start_edge "$P_EDGE" "$P_SINK" none "[admin]
address = \"127.0.0.1:$P_ADMIN\"
$2"
  P_EDGE_PID=$EDGE_PID
  wait_port "$P_ADMIN"
}

# finish NAME: the bans and metrics from the admin listener, then stop
# smtp-edge and the sink; the sink's JSON report in $WORK/NAME.sink.json.
finish() {
  curl -fsS "http://127.0.0.1:$P_ADMIN/bans" >"$WORK/$1.bans.json"
  curl -fsS "http://127.0.0.1:$P_ADMIN/metrics" >"$WORK/$1.metrics"
  stop_pid "$P_EDGE_PID"
  forget "$P_EDGE_PID"
  stop_pid "$P_SINK_PID"
  forget "$P_SINK_PID"
  grep '^{' "$WORK/sink.$P_SINK.log" | tail -n 1 >"$WORK/$1.sink.json"
}

# good OUT: the good senders' open loop (known recipients), watching
# smtp-edge's CPU over their measured interval.
good() {
  load "$1" -t "127.0.0.1:$P_EDGE" --bind "$GOOD" -c 4 -m 0 --rate "$RATE" \
    -d "$SECS" --warmup 1 --watch-pid "$P_EDGE_PID"
}

# attack OUT [FLAGS...]: the good senders (report OUT) and, from the end of
# their warmup on, the attackers (report OUT.attack, all of it measured)
# with FLAGS.
attack() {
  local out=$1 rate=()
  shift
  if [ "$ATTACK_RATE" != 0 ]; then
    rate=(--rate "$ATTACK_RATE")
  fi
  good "$out" &
  local g=$!
  sleep 1
  load "$out.attack" -t "127.0.0.1:$P_EDGE" --bind "$ATTACK" -c "$NATTACK" -m 1 \
    -r "$RCPTS" --to "$UNKNOWN{seq}@example.org" -d "$SECS" "${rate[@]}" \
    --watch-pid "$P_EDGE_PID" "$@"
  wait "$g"
}

PHASES=(idle open shield)
phase idle "$SHIELD"
good "$WORK/idle.json"
finish idle
phase open ""
attack "$WORK/open.json"
finish open
phase shield "$SHIELD"
attack "$WORK/shield.json"
finish shield
if [ "${LOCKSTEP:-1}" != 0 ]; then
  PHASES+=(lockstep)
  phase lockstep "$SHIELD"
  attack "$WORK/lockstep.json" --no-pipelining
  finish lockstep
fi

# The table: one python3 over the reports (lib.sh's helpers one value at a
# time would be a dozen python3 starts per cell).
python3 - "$WORK" "$NATTACK" "$RCPTS" "$BUDGET" "$RATE" "$ATTACK_RATE" "${PHASES[@]}" <<'PY'
import json, re, sys
work, nattack, rcpts, budget, rate, arate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
phases = sys.argv[7:]
def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
def metric(name, ph):
    total = 0.0
    for line in open(f"{work}/{ph}.metrics"):
        if re.match(rf"{name}(\{{|\s)", line):
            total += float(line.split()[-1])
    return int(total)
idle = load(f"{work}/idle.json")
idle_cores = idle["server"]["cpu_s"] / idle["elapsed_s"]
il = idle["latency_us"]["mail_to_final"]
# label -> {phase: cell}: the good senders, the attackers, the backend,
# the bans, the CPU.
rows = {k: {} for k in (
    "good MAIL-to-final p50", "good MAIL-to-final p99", "good accepted msgs/s", "good refused/failed/dropped",
    "attacking sessions", "  refused at connect (421 greeting)", "  greeted", "  ended by 421 (stage)",
    "attacking RCPTs sent", "  answered 550 / 421", "attacker errors",
    "backend RCPTs seen", "  refused as unknown", "  unknown per attacking address",
    "bans in force at the end (GET /bans)", "smtp_edge_bans_active / bans_added_total",
    "smtp_edge_ban_refusals_total", "unknown answered from the cache",
    "edge CPU (cores)", "edge CPU per attacking session", "edge CPU per attacking RCPT sent")}
def put(label, ph, v):
    rows[label][ph] = v
for ph in phases:
    g = load(f"{work}/{ph}.json")
    a = load(f"{work}/{ph}.json.attack")
    s = load(f"{work}/{ph}.sink.json")
    lat = g["latency_us"]["mail_to_final"]
    for q in ("p50", "p99"):
        put(f"good MAIL-to-final {q}", ph, f'{lat[q]} us' + (f' ({lat[q] / il[q]:.2f}x)' if ph != "idle" else ""))
    m = g["messages"]
    put("good accepted msgs/s", ph, f'{g["msgs_per_sec"]:.1f}')
    put("good refused/failed/dropped", ph, f'{m["rejected"]}/{m["failed"]}/{m["dropped"]}')
    sessions = a["messages"]["attempted"] if a else 0
    if a:
        r = a["replies"]
        mode = "closed loop" if arate == "0" else "open loop"
        put("attacking sessions", ph, f'{sessions} ({sessions / a["elapsed_s"]:.0f}/s, {mode})')
        put("  refused at connect (421 greeting)", ph, str(r["greeting"].get("421", 0)))
        put("  greeted", ph, str(r["greeting"].get("220", 0)))
        ended = {st: cs["421"] for st, cs in r.items() if st != "greeting" and cs.get("421")}
        put("  ended by 421 (stage)", ph, ", ".join(f"{n} ({st})" for st, n in ended.items()) or "0")
        sent = a["messages"]["pipelined"] * rcpts + sum(
            n for c, n in r["rcpt"].items()) * (a["messages"]["pipelined"] == 0)
        put("attacking RCPTs sent", ph, str(sent))
        put("  answered 550 / 421", ph, f'{r["rcpt"].get("550", 0)} / {r["rcpt"].get("421", 0)}')
        put("attacker errors", ph, ", ".join(f"{k} {v}" for k, v in a["errors"].items() if v) or "0")
    put("backend RCPTs seen", ph, str(s["rcpts"]))
    put("  refused as unknown", ph, str(s["rcpts_unknown"]))
    if a:
        put("  unknown per attacking address", ph, f'{s["rcpts_unknown"] / nattack:.1f}')
    put("bans in force at the end (GET /bans)", ph, str(load(f"{work}/{ph}.bans.json")["count"]))
    put("smtp_edge_bans_active / bans_added_total", ph,
        f'{metric("smtp_edge_bans_active", ph)} / {metric("smtp_edge_bans_added_total", ph)}')
    put("smtp_edge_ban_refusals_total", ph, str(metric("smtp_edge_ban_refusals_total", ph)))
    put("unknown answered from the cache", ph, str(metric("smtp_edge_recipients_unknown_cached_total", ph)))
    w = a or g
    put("edge CPU (cores)", ph, f'{w["server"]["cpu_s"] / w["elapsed_s"]:.3f}')
    if a:
        net = max(a["server"]["cpu_s"] - idle_cores * a["elapsed_s"], 0.0)
        put("edge CPU per attacking session", ph, f'{net / max(sessions, 1) * 1e6:.1f} us')
        put("edge CPU per attacking RCPT sent", ph, f'{net / sent * 1e6:.2f} us' if sent else "-")
heads = {"idle": "idle (good alone)", "open": "attack, no shield", "shield": "attack, shield",
         "lockstep": "attack, shield, lockstep"}
print(f"\ngood senders: {rate} msgs/s from 4 addresses, persistent, known recipients; attackers: {nattack} "
      f"addresses, a new connection per message, {rcpts} never-repeated unknown RCPTs each; "
      f"shield budget {budget} unknown RCPTs per address in 600 s")
print("| | " + " | ".join(heads[p] for p in phases) + " |")
print("|---|" + "---:|" * len(phases))
for label, cells in rows.items():
    print(f"| {label.strip()} | " + " | ".join(cells.get(p, "") for p in phases) + " |")
ok = all(
    float(re.search(r"\(([\d.]+)x\)", rows[f"good MAIL-to-final {q}"]["shield"]).group(1)) <= 1.5
    for q in ("p50", "p99"))
print(f"\nissue 25 target (with the shield, the good senders' p50 and p99 <= 1.5x idle): {'met' if ok else 'NOT met'}")
PY
