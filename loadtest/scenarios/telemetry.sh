#!/usr/bin/env bash
# Scenario 9, telemetry overhead (issue 14): the closed-loop load of
# throughput.sh (4 KiB, client pipelining on, new connection per message and
# persistent) through smtp-edge in four configurations:
#   (a) baseline: no [telemetry] otlp_endpoint, no [admin]
#   (b) metrics served: [admin] on, /metrics scraped once per second by a
#       curl loop during the run (the metrics counters are always on in the
#       code; this adds the listener and the scrapes)
#   (c) OTLP/gRPC span export at sample_ratio = 0.01 to `smtp-load otlp-sink`
#   (d) the same at sample_ratio = 1.0
#   (e) (d) over OTLP/HTTP (protobuf, `otlp-sink --http`) instead of gRPC
# plus a reference row, (a) with RUST_LOG=warn as the other scenarios run it.
# (a)-(d) run with RUST_LOG=info, the default when RUST_LOG is unset: spans
# below the log level are not created, so with RUST_LOG=warn nothing would
# be exported. info logs one line per message, in all of (a)-(d) alike.
# (c) and (d) also have [admin] on, never scraped during the run: one scrape
# after it reads smtp_edge_trace_spans_dropped_total.
# Each run gets a fresh smtp-edge (and otlp-sink); the configs are
# interleaved within each repeat, in an order rotated per repeat. Prints
# per config the median msgs/s, its ratio to (a), the range of the per-repeat
# ratios to (a) of the same repeat, smtp-edge's CPU per 1 000 messages and
# its ratio to (a)'s (steadier than msgs/s on a shared machine), and
# for (c)/(d) the spans the otlp-sink received per message sent (warm-up
# included; at 1.0 with a new connection per message ~3: smtp.session,
# smtp.transaction, smtp.backend), spans dropped by smtp-edge's export queue
# and the otlp-sink's own CPU per 1 000 messages (with PIN=1 it runs on
# CPU 0 with the generator and the sink). Targets (issue 14): metrics <= 2 %
# of throughput, export at 0.01 <= 5 %, at 1.0 <= 15 %.
# Usage: telemetry.sh [SECONDS_PER_RUN=5] [REPEATS=3] [CONNECTIONS=50]
source "$(dirname "$0")/../lib.sh"
SECS=${1:-5}
REPS=${2:-3}
CONNS=${3:-50}
CONFIGS=(a b c d e ref)
declare -A LABEL=(
  [a]="(a) baseline"
  [b]="(b) metrics, scraped 1/s"
  [c]="(c) export 0.01"
  [d]="(d) export 1.0"
  [e]="(e) export 1.0, HTTP"
  [ref]="ref: (a), RUST_LOG=warn"
)

build
# A binary without the keys (say, from before issue 14) cannot run this.
printf 'hostname = "probe"\n[admin]\naddress = "127.0.0.1:9"\n[telemetry]\notlp_endpoint = "http://127.0.0.1:9"\notlp_protocol = "grpc"\nsample_ratio = 0.01\n[[listener]]\naddress = "127.0.0.1:2525"\n[[backend]]\naddress = "127.0.0.1:2526"\n' >"$WORK/probe.toml"
if ! "$EDGE" check-config "$WORK/probe.toml" >"$WORK/probe.out" 2>&1; then
  echo "$EDGE does not take [admin] / [telemetry]:" >&2
  cat "$WORK/probe.out" >&2
  exit 2
fi
SINK=$(free_port)
start_sink "$SINK"
machine
echo "smtp-edge: $EDGE, sha256 $(sha256sum "$EDGE" | cut -c1-12)"
echo "telemetry: $CONNS connections, 4 KiB, pipelining on, ${SECS} s per run after a 1 s warm-up, $REPS repeat(s)${PIN:+, PIN=1}"

# scrape_loop PORT COUNT_FILE: GET /metrics once per second until killed
# (with PIN=1 on the load side's CPU); the successful scrapes are counted in
# COUNT_FILE.
scrape_loop() {
  local n=0
  trap 'exit 0' TERM
  while :; do
    if "${LOAD_ON[@]}" curl -sf -o /dev/null "http://127.0.0.1:$1/metrics"; then
      n=$((n + 1))
      echo "$n" >"$2"
    fi
    sleep 1
  done
}

# one_run CONFIG M OUT: a fresh smtp-edge for CONFIG, one measured run.
one_run() {
  local cfg=$1 m=$2 out=$3 extra="" admin="" otlp="" scraper="" log=info
  case $cfg in
    b | c | d | e)
      admin=$(free_port)
      extra="[admin]
address = \"127.0.0.1:$admin\""
      ;;
  esac
  case $cfg in
    c | d | e)
      otlp=$(free_port)
      local proto=grpc http=()
      [ "$cfg" = e ] && proto=http http=(--http)
      "${LOAD_ON[@]}" "$LOAD" otlp-sink -l "127.0.0.1:$otlp" "${http[@]}" --threads 1 --json -q >"$out.otlp" 2>"$out.otlp.err" &
      OTLP_PID=$!
      PIDS+=("$OTLP_PID")
      wait_port "$otlp"
      local sample=0.01
      [ "$cfg" != c ] && sample=1.0
      extra="$extra
[telemetry]
otlp_endpoint = \"http://127.0.0.1:$otlp\"
otlp_protocol = \"$proto\"
sample_ratio = $sample"
      ;;
    ref) log=warn ;;
  esac
  PROXY=$(free_port)
  EDGE_LOG=$log start_edge "$PROXY" "$SINK" none "$extra"
  if [ "$cfg" = b ]; then
    scrape_loop "$admin" "$out.scrapes" &
    scraper=$!
    PIDS+=("$scraper")
  fi
  load "$out" -t "127.0.0.1:$PROXY" -c "$CONNS" -m "$m" -s 4096 -d "$SECS" --warmup 1 --watch-pid "$EDGE_PID"
  if [ -n "$scraper" ]; then
    stop_pid "$scraper"
    forget "$scraper"
  fi
  if [ -n "$otlp" ]; then
    curl -sf "http://127.0.0.1:$admin/metrics" | awk '$1 == "smtp_edge_trace_spans_dropped_total" {print $2}' >"$out.dropped" || true
  fi
  # smtp-edge flushes its export queue when it stops; then the otlp-sink
  # prints its counts.
  stop_pid "$EDGE_PID"
  forget "$EDGE_PID"
  if [ -n "$otlp" ]; then
    stop_pid "$OTLP_PID"
    forget "$OTLP_PID"
  fi
  # At info smtp-edge logs a line per message: keep the rest only.
  grep -v ' INFO ' "$WORK/edge.$PROXY.log" | tail -20 >"$out.edge.log" || true
  rm -f "$WORK/edge.$PROXY.log"
}

head -1 /proc/stat >"$WORK/stat.0"
interleaved_runs "$REPS" "${CONFIGS[@]}"

head -1 /proc/stat >"$WORK/stat.1"
# Other work on the machine (a niced build, say) competes with every run.
python3 - "$WORK/stat.0" "$WORK/stat.1" <<'PY'
import sys
a, b = ([int(x) for x in open(f).read().split()[1:]] for f in sys.argv[1:])
d = [y - x for x, y in zip(a, b)]
print("during the runs: %.0f %% of the machine's CPU time went to niced processes (not ours), %.0f %% idle, %.0f %% steal"
      % (100 * d[1] / sum(d), 100 * d[3] / sum(d), 100 * d[7] / sum(d)))
PY
# The table, from the saved reports.
labels=()
for c in "${CONFIGS[@]}"; do labels+=("${LABEL[$c]}"); done
python3 - "$WORK" "$REPS" "${CONFIGS[@]}" -- "${labels[@]}" <<'PY'
import json, os, statistics, sys
args = sys.argv[1:]
sep = args.index("--")
work, reps, configs, labels = args[0], int(args[1]), args[2:sep], args[sep + 1:]
label = dict(zip(configs, labels))

def load(p):
    with open(p) as f:
        return json.load(f)

def otlp(p):
    try:
        with open(p) as f:
            lines = [l for l in f if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

fmt = "%-10s %-26s %10s %7s %13s %11s %7s %10s %16s %8s %11s"
print(fmt % ("mode", "config", "msgs/s", "vs (a)", "per repeat", "edge cpu/1k", "vs (a)", "spans/msg", "(sess+txn+be)", "dropped", "otlp cpu/1k"))
notes = []
for mode in ("new", "persistent"):
    rate = {c: [] for c in configs}
    for c in configs:
        for r in range(1, reps + 1):
            rate[c].append(load(f"{work}/{mode}.{c}.{r}.json")["msgs_per_sec"])
    base = med(rate["a"])
    base_cpu = med([(load(f"{work}/{mode}.a.{r}.json").get("server") or {}).get("cpu_s_per_1000") for r in range(1, reps + 1)])
    for c in configs:
        cpu, spm, parts, dropped, ocpu, scrapes, errs = [], [], [], [], [], [], []
        for r in range(1, reps + 1):
            p = f"{work}/{mode}.{c}.{r}.json"
            j = load(p)
            cpu.append((j.get("server") or {}).get("cpu_s_per_1000"))
            sent = j["messages"]["attempted"] + j["messages"]["warmup"]
            if j["messages"]["accepted"] != j["messages"]["attempted"]:
                errs.append(f"repeat {r}: not every message accepted: {j['messages']}")
            o = otlp(p + ".otlp")
            if o is not None and sent:
                spm.append(o["spans"] / sent)
                b = o["spans_by_name"]
                parts.append([b.get(k, 0) / sent for k in ("smtp.session", "smtp.transaction", "smtp.backend")])
                if o.get("cpu_s") is not None:
                    ocpu.append(o["cpu_s"] / sent * 1000)
            if os.path.exists(p + ".dropped"):
                d = open(p + ".dropped").read().strip()
                dropped.append(int(float(d)) if d else None)
            if os.path.exists(p + ".edge.log"):
                warn = open(p + ".edge.log").read().splitlines()
                if warn:
                    errs.append(f"repeat {r}: smtp-edge logged {len(warn)} line(s) above INFO, e.g. {warn[0]}")
            if os.path.exists(p + ".scrapes"):
                scrapes.append(int(open(p + ".scrapes").read().strip() or 0))
        m = med(rate[c])
        paired = [x / a for x, a in zip(rate[c], rate["a"]) if a]
        rng = "-" if c == "a" else "%.3f..%.3f" % (min(paired), max(paired))
        if parts:
            pm = [statistics.median(col) for col in zip(*parts)]
            part = "+".join("%.3g" % x for x in pm)
        else:
            part = "-"
        sm = med(spm)
        om = med(ocpu)
        dr = [d for d in dropped if d is not None]
        print(fmt % (mode, label[c], "%.1f" % m, "%.3f" % (m / base) if base else "nan", rng,
                     "%.3fs" % med(cpu) if med(cpu) is not None else "?",
                     "%.3f" % (med(cpu) / base_cpu) if med(cpu) is not None and base_cpu else "?",
                     "%.3f" % sm if sm is not None else "-", part,
                     str(sum(dr)) if dr else "-", "%.3fs" % om if om is not None else "-"))
        if scrapes:
            notes.append(f"{mode} {label[c]}: scrapes per run {scrapes}")
        for e in errs:
            notes.append(f"{mode} {label[c]}: {e}")
for n in notes:
    print(n)
PY
