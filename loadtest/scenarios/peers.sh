#!/usr/bin/env bash
# Scenario 6, peers (issue 16): the same closed-loop load straight to the sink
# ("direct") and through HAProxy (mode tcp), nginx mail proxy (tuned,
# PEERS.md) and smtp-edge, each in front of the same smtp-load sink, on the
# whole matrix
#   new connection per message / persistent
#   x 4 KiB / 100 KiB
#   x client pipelining on / off.
# Haraka (smtp_forward) is slow and off by default: HARAKA=1 adds it (a fixed
# count of HARAKA_MSGS messages per run instead of a duration).
# Within each repeat every load runs on every path, the paths' order rotated
# from load to load; the table shows per load and path the median msgs/s of
# the repeats and its min-max, the ratio of the medians to direct's and the
# range of the per-repeat ratios (each run against direct's run of the same
# repeat), and the proxy's CPU seconds per 1 000 messages (smtp-load
# --watch-pid: smtp-edge's process, HAProxy's process, nginx's master and
# workers, Haraka's master and nodes, summed; median of the repeats).
# nginx's mail proxy does not offer PIPELINING: asked for it, smtp-load waits
# for every reply (messages.pipelined = 0), so nginx's "pipelining on" rows
# are lockstep; the note column says so wherever that happened.
# A run counts only if every message was accepted (smtp-load exits 0); a
# failed run is listed, left out of the medians, and makes the script exit 1.
# At the end the sink's message count must equal the generator's (accepted
# plus warm-up messages, all runs), or the script exits 1 too.
# PIN=1: the proxy under test alone on CPU 1 (nginx with one worker, Haraka
# with one node, smtp-edge with one worker thread), load and sink on CPU 0.
# The table is markdown, to paste into RESULTS.md.
#
# Usage: peers.sh [SECONDS_PER_RUN=5] [CONNECTIONS=50] [REPEATS=3]
# Env: HARAKA=1, HARAKA_MSGS (2000), WARMUP (1 s before each run),
#      PATHS ("direct haproxy nginx smtp-edge"), MODES ("new persistent"),
#      SIZES ("4096 102400"), PIPELINING ("on off") to run a subset.
# shellcheck source-path=SCRIPTDIR
# shellcheck source=../lib.sh
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
CONNS=${2:-50}
REPS=${3:-3}
WARMUP=${WARMUP:-1}
HARAKA_MSGS=${HARAKA_MSGS:-2000}
default_paths="direct haproxy nginx smtp-edge"
if [ -n "${HARAKA:-}" ]; then default_paths+=" haraka"; fi
read -r -a WANT <<<"${PATHS:-$default_paths}"
read -r -a MODES <<<"${MODES:-new persistent}"
read -r -a SIZES <<<"${SIZES:-4096 102400}"
read -r -a PIPES <<<"${PIPELINING:-on off}"

build
SINK=$(free_port)
start_sink "$SINK" --json
declare -A PORT WATCH
UP=()
for path in "${WANT[@]}"; do
  case $path in
    direct)
      PORT[direct]=$SINK
      ;;
    smtp-edge)
      PORT[smtp-edge]=$(free_port)
      start_edge "${PORT[smtp-edge]}" "$SINK"
      WATCH[smtp-edge]=$EDGE_PID
      ;;
    haproxy | nginx | haraka)
      p=$(free_port)
      extra=()
      if [ "$path" = nginx ]; then extra=("$(free_port)"); fi # its auth_http port
      if ! start_peer "$path" start "$p" "$SINK" "${extra[@]}"; then
        echo "skipping $path (see loadtest/peers/install.sh): $(tail -1 "$PEER_DIR.log")" >&2
        continue
      fi
      PORT[$path]=$p
      WATCH[$path]=$(peer_pids "$path" "$PEER_DIR" | paste -sd' ' -)
      ;;
    *)
      echo "unknown path '$path' (direct, haproxy, nginx, haraka, smtp-edge)" >&2
      exit 2
      ;;
  esac
  UP+=("$path")
done
if [ "${UP[0]:-}" != direct ]; then
  echo "PATHS must start with direct (the ratios are to direct)" >&2
  exit 2
fi
LOADS=()
for mode in "${MODES[@]}"; do
  for size in "${SIZES[@]}"; do
    for pipe in "${PIPES[@]}"; do LOADS+=("$mode.$size.$pipe"); done
  done
done

machine
setup="shared cores"
if [ -n "${PIN:-}" ]; then setup="PIN=1: the proxy alone on CPU 1 (nginx 1 worker, Haraka 1 node, smtp-edge 1 thread), load and sink on CPU 0"; fi
echo "peers: ${UP[*]}; $CONNS connections, ${SECS} s per run after a ${WARMUP} s warm-up${PORT[haraka]:+ (Haraka: $HARAKA_MSGS messages per run)}, $REPS repeat(s); $setup"
for path in "${UP[@]}"; do
  if [ -n "${WATCH[$path]:-}" ]; then
    echo "  $path on 127.0.0.1:${PORT[$path]}, CPU of pids ${WATCH[$path]}"
  fi
done

RUNS="$WORK/runs"
mkdir -p "$RUNS"
n=${#UP[@]}
k=0
for rep in $(seq 1 "$REPS"); do
  for ld in "${LOADS[@]}"; do
    IFS=. read -r mode size pipe <<<"$ld"
    args=(-c "$CONNS" -s "$size" --warmup "$WARMUP")
    if [ "$mode" = new ]; then args+=(-m 1); else args+=(-m 0); fi
    if [ "$pipe" = off ]; then args+=(--no-pipelining); fi
    for i in $(seq 0 $((n - 1))); do
      path=${UP[$(((i + k) % n))]}
      run=(-d "$SECS")
      if [ "$path" = haraka ]; then run=(-n "$HARAKA_MSGS"); fi
      watch=()
      for p in ${WATCH[$path]:-}; do watch+=(--watch-pid "$p"); done
      out="$RUNS/$ld.$path.$rep.json"
      if ! load "$out" -t "127.0.0.1:${PORT[$path]}" "${args[@]}" "${run[@]}" "${watch[@]}"; then
        echo "FAILED: $path, $mode, $size B, pipelining $pipe, repeat $rep (not every message accepted)" >&2
      fi
    done
    k=$((k + 1))
  done
done

# Everything stopped, the sink prints its counts.
for e in "${PEERS_STARTED[@]:-}"; do
  if [ -n "$e" ]; then stop_peer "${e%% *}" "${e#* }"; fi
done
if [ -n "${WATCH[smtp-edge]:-}" ]; then
  stop_pid "$EDGE_PID"
  forget "$EDGE_PID"
fi
stop_pid "$SINK_PID"
forget "$SINK_PID"

LT_DIR="$LT_DIR" python3 - "$RUNS" "$REPS" "$WORK/sink.$SINK.log" "${LOADS[@]}" -- "${UP[@]}" <<'PY'
import json, os, statistics, sys
args = sys.argv[1:]
runs, reps, sink_log = args[0], int(args[1]), args[2]
sep = args.index("--")
loads, paths = args[3:sep], args[sep + 1:]

def report(ld, path, rep):
    try:
        with open(os.path.join(runs, f"{ld}.{path}.{rep}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def fmt(x, nd=0):
    return "–" if x is None else f"{x:.{nd}f}"

failed, sent = [], 0
print("| connection | size | client pipelining | path | msgs/s (median) | min–max | vs direct | per-repeat ratios | CPU s / 1 000 msgs | note |")
print("|---|---|---|---|---:|---|---:|---|---:|---|")
for ld in loads:
    mode, size, pipe = ld.split(".")
    size_s = f"{int(size) // 1024} KiB" if int(size) % 1024 == 0 else f"{size} B"
    rates = {}
    for path in paths:
        rates[path] = {}
        for rep in range(1, reps + 1):
            r = report(ld, path, rep)
            if r is not None:
                sent += r["messages"]["accepted"] + r["messages"]["warmup"]
            if r is None or not r.get("ok"):
                failed.append(f"{path} {mode} {size_s} pipelining {pipe} repeat {rep}")
                continue
            rates[path][rep] = r
    direct = rates["direct"]
    dmed = statistics.median(r["msgs_per_sec"] for r in direct.values()) if direct else None
    for path in paths:
        ok = rates[path]
        notes = []
        if len(ok) < reps:
            notes.append(f"{reps - len(ok)} of {reps} runs FAILED")
        if not ok:
            print(f"| {mode} | {size_s} | {pipe} | {path} | FAILED | | | | | {'; '.join(notes)} |")
            continue
        v = [r["msgs_per_sec"] for r in ok.values()]
        med = statistics.median(v)
        ratio = med / dmed if dmed and path != "direct" else None
        per = [r["msgs_per_sec"] / direct[rep]["msgs_per_sec"] for rep, r in ok.items() if rep in direct]
        cpu = [r["server"]["cpu_s_per_1000"] for r in ok.values() if r.get("server")]
        if pipe == "on":
            piped = sum(r["messages"].get("pipelined", 0) for r in ok.values())
            att = sum(r["messages"]["attempted"] for r in ok.values())
            if piped == 0:
                notes.append("lockstep: PIPELINING not offered")
            elif piped < att:
                notes.append(f"pipelined {piped} of {att}")
        print("| {} | {} | {} | {} | {} | {}–{} | {} | {} | {} | {} |".format(
            mode, size_s, pipe, path, fmt(med), fmt(min(v)), fmt(max(v)),
            "1" if path == "direct" else fmt(ratio, 3),
            "–" if path == "direct" or not per else f"{min(per):.3f}–{max(per):.3f}",
            fmt(statistics.median(cpu), 3) if cpu else "–",
            "; ".join(notes)))

sys.path.insert(0, os.environ["LT_DIR"])
from verdict import finish  # noqa: E402

finish(failed, sink_log, sent)
PY
