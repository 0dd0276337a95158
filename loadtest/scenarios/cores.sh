#!/usr/bin/env bash
# Scenario 18, many cores (issue 26): smtp-edge with T tokio workers against
# HAProxy `mode tcp` with T threads, each pinned to the same T cores, in front
# of one smtp-load sink, for every T of THREADS, persistent connections and a
# new connection per message, 4 KiB, pipelining on. Per run: msgs/s, the
# proxy's CPU seconds per 1 000 messages (--watch-pid; and its user-space
# part, the rest being the kernel's) and the generator's
# MAIL-to-final p50/p99; the table shows the medians of the repeats and the
# edge / HAProxy ratios of the medians, and each repeat's ratios to
# HAProxy's run of the same repeat (their median and range).
#
# Core sets: with 16 or more cores, the proxy on 0..T-1, the sink on 8-11 and
# the generator on 12-15 (the reference layout of the issue's table); with
# fewer, only T = 1 as PIN=1 lays it out (the proxy alone on CPU 1, sink and
# generator on CPU 0). The runs alternate between the two proxies.
#
# Usage: cores.sh [SECONDS_PER_RUN=4] [CONNECTIONS=400] [REPEATS=2]
# Env: THREADS ("1 2 4 8" on >= 16 cores, else "1"), MODES ("persistent new"),
#      EDGE_EXTRA (TOML for smtp-edge's config, such as a [runtime] table),
#      RATE (open loop: messages per second on a fixed schedule, the same
#      for both proxies; below both one's capacity, CPU per message is then
#      compared at the same work rate, with the sink and generator as busy
#      for one proxy as for the other - RESULTS.md section 22),
#      PROXIES ("haproxy smtp-edge"; also smtp-edge@FLAVOR, and tokio-copy:
#      `smtp-load copy`, a byte copier on one current-thread tokio runtime,
#      the floor of a tokio proxy - RESULTS.md section 24; and
#      smtp-edge-alt: the binary ALT_EDGE, another build beside this one
#      in the same run - RESULTS.md section 25),
#      SYSCALLS=1 (`perf stat` counts each proxy's system calls by name,
#      context switches and page faults over the measured interval,
#      tracepoints only, or the events of PERF_EVENTS: printed per message
#      after the table - RESULTS.md section 25; syscalls.sh counts the
#      total with the machine's segments and wake-ups, smtp-edge and
#      HAProxy only),
#      KEEP_RUNS=DIR (each run's smtp-load JSON copied there, named
#      T.MODE.PROXY.REPEAT.json, for the spread behind the medians; with
#      two or more smtp-edge entries in PROXIES a second table pairs each
#      with the first, repeat by repeat),
#      PERF_RECORD=1 (`perf record -e cpu-clock`, PERF_ARGS added, samples
#      each proxy over the measured interval, kernel included, into
#      runs/*.data, or PERF_KEEP if set: profile/timeprof.sh's time
#      profile, for every proxy of PROXIES in one run),
#      SIZE (message bytes, 4096) and LOAD_ARGS (more `smtp-load run`
#      options, such as --no-pipelining): other loads than the issue's.
# shellcheck source-path=SCRIPTDIR
# shellcheck source=../lib.sh
source "$(dirname "$0")/../lib.sh"
SECS=${1:-4}
CONNS=${2:-400}
REPS=${3:-2}
SIZE=${SIZE:-4096}
read -r -a LOAD_ARGS <<< "${LOAD_ARGS:-}"
BIG=0
if [ "$(nproc)" -ge 16 ]; then BIG=1; fi
if [ "$BIG" = 1 ]; then default_threads="1 2 4 8"; else default_threads="1"; fi
read -r -a THREADS <<<"${THREADS:-$default_threads}"
read -r -a MODES <<<"${MODES:-persistent new}"
read -r -a PROXIES <<<"${PROXIES:-haproxy smtp-edge}"

ALL_CPUS=0-$(($(nproc) - 1))
if [ "$BIG" = 1 ]; then
  SINK_CPUS=8-11 LOAD_CPUS=12-15
elif [ "${SHARED:-0}" = 1 ]; then
  SINK_CPUS=$ALL_CPUS LOAD_CPUS=$ALL_CPUS
else
  SINK_CPUS=0 LOAD_CPUS=0
  for t in "${THREADS[@]}"; do
    if [ "$t" != 1 ]; then
      echo "fewer than 16 cores: only THREADS=1 (pinned as PIN=1), or SHARED=1" >&2
      exit 2
    fi
  done
fi
LOAD_ON=(taskset -c "$LOAD_CPUS")
proxy_cpus() {
  if [ "$BIG" = 1 ]; then
    echo "0-$(($1 - 1))"
  elif [ "${SHARED:-0}" = 1 ]; then
    echo "$ALL_CPUS"
  else
    echo 1
  fi
}

build
SINK=$(free_port)
taskset -c "$SINK_CPUS" "$LOAD" sink -l "127.0.0.1:$SINK" -q --threads "$([ "$BIG" = 1 ] && echo 4 || echo 1)" >"$WORK/sink.log" 2>&1 &
PIDS+=($!)
wait_port "$SINK"
machine
echo "cores: THREADS=${THREADS[*]}, $CONNS connections, $SIZE bytes, pipelining on ${LOAD_ARGS[*]:+(run ${LOAD_ARGS[*]})}, ${SECS} s per run after 1 s warm-up, $REPS repeat(s); proxy on CPUs $(proxy_cpus "${THREADS[-1]}") (T=${THREADS[-1]}), sink on $SINK_CPUS, generator on $LOAD_CPUS"

# start_proxy NAME T: smtp-edge or haproxy with T threads on its CPUs; sets
# PPORT and PWATCH (the pids whose CPU counts).
start_proxy() {
  local name=$1 t=$2 cpus
  cpus=$(proxy_cpus "$t")
  PPORT=$(free_port)
  case $name in
    smtp-edge*)
      local runtime=""
      if [ "$name" != "${name#smtp-edge@}" ]; then
        runtime="[runtime]
flavor = \"${name#smtp-edge@}\""
      fi
      cat >"$WORK/edge.$PPORT.toml" <<TOML
hostname = "edge.cores"
${EDGE_EXTRA:-}
[[listener]]
address = "127.0.0.1:$PPORT"
backlog = 8192
[[backend]]
address = "127.0.0.1:$SINK"
max_connections = 2000
$runtime
TOML
      ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
      # taskset execs smtp-edge: $! is its pid (a function would be a subshell).
      local bin=$EDGE
      if [ "$name" = smtp-edge-alt ]; then bin=${ALT_EDGE:?smtp-edge-alt needs ALT_EDGE}; fi
      TOKIO_WORKER_THREADS=$t RUST_LOG=warn taskset -c "$cpus" "$bin" --config "$WORK/edge.$PPORT.toml" >"$WORK/edge.$PPORT.log" 2>&1 &
      PWATCH=$!
      PIDS+=("$PWATCH")
      wait_port "$PPORT"
      ;;
    tokio-copy)
      # The floor of a tokio proxy: `smtp-load copy`, one current-thread
      # runtime copying bytes, nothing parsed (T = 1 only).
      taskset -c "$cpus" "$LOAD" copy -l "127.0.0.1:$PPORT" -t "127.0.0.1:$SINK" >"$WORK/copy.$PPORT.log" 2>&1 &
      PWATCH=$!
      PIDS+=("$PWATCH")
      wait_port "$PPORT"
      ;;
    haproxy)
      # HAProxy starts as many threads as CPUs it may run on: T.
      EDGE_ON=(taskset -c "$cpus")
      if ! start_peer haproxy start "$PPORT" "$SINK"; then
        echo "haproxy did not start: $(tail -1 "$PEER_DIR.log")" >&2
        exit 1
      fi
      PWATCH=$(peer_pids haproxy "$PEER_DIR" | paste -sd' ' -)
      ;;
  esac
}

stop_proxy() {
  case $1 in
    smtp-edge* | tokio-copy) stop_pid "$PWATCH"; forget "$PWATCH" ;;
    haproxy) stop_peer haproxy "$PEER_DIR" ;;
  esac
}

SYSCALL_EVENTS=${PERF_EVENTS:-raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_sendmsg,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_splice,context-switches,page-faults}
RUNS="$WORK/runs"
mkdir -p "$RUNS"
failed=0
k=0
for t in "${THREADS[@]}"; do
  for mode in "${MODES[@]}"; do
    m=0
    [ "$mode" = new ] && m=1
    for rep in $(seq 1 "$REPS"); do
      # Rotated each repeat: no proxy always runs first. Every other
      # round of rotations runs the rest in reverse: with three or more
      # proxies a plain rotation would keep each one's predecessor (the
      # same build always right after HAProxy). Balanced over 2 x n repeats.
      n=${#PROXIES[@]}
      order=("${PROXIES[$((k % n))]}")
      for i in $(seq 1 $((n - 1))); do
        if [ $(((k / n) % 2)) = 0 ]; then j=$(((k + i) % n)); else j=$(((k + n - i) % n)); fi
        order+=("${PROXIES[$j]}")
      done
      k=$((k + 1))
      for name in "${order[@]}"; do
        start_proxy "$name" "$t"
        watch=()
        for p in $PWATCH; do watch+=(--watch-pid "$p"); done
        out="$RUNS/$t.$mode.$name.$rep.json"
        rate=()
        if [ -n "${RATE:-}" ]; then rate=(--rate "$RATE"); fi
        # perf over the measured interval (after the warm-up).
        perf_pids=()
        ppids=$(echo "$PWATCH" | tr ' ' ,)
        if [ "${SYSCALLS:-0}" = 1 ]; then
          (sleep 1 && exec perf stat -x, -o "${out%.json}.perf" -e "$SYSCALL_EVENTS" -p "$ppids" -- sleep "$SECS") 2>/dev/null &
          perf_pids+=($!)
        fi
        if [ "${PERF_RECORD:-0}" = 1 ]; then
          # shellcheck disable=SC2086 # PERF_ARGS: words for perf
          (sleep 1 && exec perf record -q -e cpu-clock -F 2999 ${PERF_ARGS:-} -o "${PERF_KEEP:-$RUNS}/$t.$mode.$name.$rep.data" -p "$ppids" -- sleep "$SECS") >/dev/null 2>&1 &
          perf_pids+=($!)
        fi
        if ! load "$out" -t "127.0.0.1:$PPORT" -c "$CONNS" -m "$m" -s "$SIZE" -d "$SECS" --warmup 1 "${rate[@]}" "${watch[@]}" "${LOAD_ARGS[@]}"; then
          echo "FAILED: $name, T=$t, $mode, repeat $rep" >&2
          rm -f "$out"
          failed=1
        fi
        if [ ${#perf_pids[@]} -gt 0 ]; then wait "${perf_pids[@]}" || true; fi
        stop_proxy "$name"
      done
    done
  done
done

if [ -n "${KEEP_RUNS:-}" ]; then
  mkdir -p "$KEEP_RUNS"
  cp "$RUNS"/*.json "$KEEP_RUNS"/
fi

python3 - "$RUNS" "${THREADS[*]}" "${MODES[*]}" "${PROXIES[*]}" <<'PY'
import glob, json, os, statistics, sys
runs, threads, modes, proxies = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
edges = [p for p in proxies if p != "haproxy"]
def med(xs):
    return statistics.median(xs) if xs else float("nan")
def get(t, mode, name):
    rs = [json.load(open(f)) for f in sorted(glob.glob(f"{runs}/{t}.{mode}.{name}.*.json"))]
    mps = [r["msgs_per_sec"] for r in rs]
    cpu = [1000 * r["server"]["cpu_s"] / max(1, r["messages"]["accepted"]) for r in rs if r.get("server")]
    user = [1000 * r["server"].get("user_s", float("nan")) / max(1, r["messages"]["accepted"]) for r in rs if r.get("server")]
    lat = r"latency_us"
    p50 = [r[lat]["mail_to_final"]["p50"] / 1000 for r in rs]
    p99 = [r[lat]["mail_to_final"]["p99"] / 1000 for r in rs]
    rss = [r["server"].get("rss_kib_end", float("nan")) / 1024 for r in rs if r.get("server")]
    return med(mps), med(cpu), med(p50), med(p99), len(rs), med(user), med(rss)
def paired(t, mode, name, base="haproxy"):
    # Each repeat's ratio to HAProxy's (or base's) run of the same repeat
    # (run minutes apart at most: the host's drift between repeats cancels
    # out). Also how many repeats it was ahead in (msgs/s, less CPU).
    def per_rep(n):
        out = {}
        for f in glob.glob(f"{runs}/{t}.{mode}.{n}.*.json"):
            r = json.load(open(f))
            cpu = 1000 * r["server"]["cpu_s"] / max(1, r["messages"]["accepted"]) if r.get("server") else float("nan")
            out[f.rsplit(".", 2)[-2]] = (r["msgs_per_sec"], cpu)
        return out
    h, e = per_rep(base), per_rep(name)
    reps = [k for k in e if k in h and h[k][0] and h[k][1]]
    m = [e[k][0] / h[k][0] for k in reps]
    c = [e[k][1] / h[k][1] for k in reps]
    fmt = lambda xs: f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "nan"
    return fmt(m), fmt(c), sum(x > 1 for x in m), sum(x < 1 for x in c), len(reps)
print()
print("| load | T | edge | HAProxy msgs/s | smtp-edge msgs/s | edge / HAProxy | CPU s per 1k msgs HAProxy / edge | p50 MAIL→final ms HAProxy / edge | p99 MAIL→final ms HAProxy / edge | user-space CPU s per 1k HAProxy / edge | RSS MiB at the end HAProxy / edge | runs | per repeat: msgs/s, CPU per msg edge / HAProxy, median (range) |")
print("|---|---|---|---:|---:|---:|---|---|---|---|---|---|---|")
for mode in modes:
    for t in threads:
        h = get(t, mode, "haproxy")
        for name in edges:
            e = get(t, mode, name)
            r = e[0] / h[0] if h[0] else float("nan")
            pm, pc, *_ = paired(t, mode, name)
            print(f"| {mode} | {t} | {name} | {h[0]:,.0f} | {e[0]:,.0f} | {r:.2f} | {h[1]:.4f} / {e[1]:.4f} | {h[2]:.2f} / {e[2]:.2f} | {h[3]:.2f} / {e[3]:.2f} | {h[5]:.4f} / {e[5]:.4f} | {h[6]:.0f} / {e[6]:.0f} | {h[4]}+{e[4]} | {pm}; {pc} |")
if len(edges) > 1:
    # Two builds or flavors in one run: each against the first, repeat by
    # repeat (what a change is judged by on a noisy host).
    print()
    print(f"| load | T | against {edges[0]}, per repeat | msgs/s, median (range) | ahead in | CPU per msg, median (range) | less CPU in |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        for t in threads:
            for name in edges[1:]:
                pm, pc, up, down, n = paired(t, mode, name, edges[0])
                print(f"| {mode} | {t} | {name} | {pm} | {up} of {n} | {pc} | {down} of {n} |")
if glob.glob(f"{runs}/*.perf"):
    print()
    print("System calls and context switches per message (perf stat over the measured interval; medians of the repeats):")
    print()
    def perf(t, mode, name):
        per = {}
        for f in sorted(glob.glob(f"{runs}/{t}.{mode}.{name}.*.perf")):
            j = f[:-5] + ".json"
            if not os.path.exists(j):
                continue
            r = json.load(open(j))
            msgs = max(1, r["messages"]["accepted"])
            for line in open(f):
                parts = line.strip().split(",")
                if len(parts) < 3 or not parts[0].replace(".", "").isdigit():
                    continue
                ev = parts[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "all")
                per.setdefault(ev, []).append(float(parts[0]) / msgs)
        return {k: med(v) for k, v in per.items()}
    for mode in modes:
        for t in threads:
            cols = {name: perf(t, mode, name) for name in proxies}
            evs = list(dict.fromkeys(e for c in cols.values() for e in c))
            print(f"| {mode}, T={t} | " + " | ".join(proxies) + " |")
            print("|---|" + "---:|" * len(proxies))
            for e in evs:
                if any(cols[n].get(e, 0) > 0.005 for n in proxies):
                    print(f"| {e} | " + " | ".join(f"{cols[n].get(e, float('nan')):.2f}" for n in proxies) + " |")
            print()
PY
exit "$failed"
