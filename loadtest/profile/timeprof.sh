#!/usr/bin/env bash
# timeprof.sh NAME [CONNS=400] [SECS=4] [RATE]: where the pinned proxy's
# *time* goes (not its instructions: cache misses and the kernel count
# here), by `perf record -e cpu-clock` (a software clock: this VM has no
# hardware counters) on CPU 1 while smtp-edge runs there alone, the sink
# and the generator on CPU 0 (PIN=1's layout), persistent 4 KiB,
# pipelined; RATE: open loop at that many messages per second. Prints the
# kernel / user split and the top user-space and kernel symbols; the data
# stays in $PROF_DIR/NAME/perf.data for `perf report -i`.
set -eu
NAME=$1; CONNS=${2:-400}; SECS=${3:-4}; RATE=${4:-}
LOAD_ON="taskset -c 0"
EXTRA=""
source "$(dirname "$0")/common.sh"
command -v perf >/dev/null || { echo "timeprof.sh needs perf (apt-get install linux-perf)" >&2; exit 1; }
TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 1 "$EDGE" --config "$W/edge.toml" > "$W/edge.log" 2>&1 & EPID=$!
wait_edge
rate=(); [ -n "$RATE" ] && rate=(--rate "$RATE")
$LOAD_ON "$R/smtp-load" run -t 127.0.0.1:$EP -c "$CONNS" -m 0 -d $((SECS + 3)) -s 4096 "${rate[@]}" -q > "$W/load.txt" 2>&1 & LPID=$!
sleep 2
perf record -q -e cpu-clock -C 1 -o "$W/perf.data" -- sleep "$SECS" 2>/dev/null
wait $LPID || true
kill $EPID $SPID 2>/dev/null; wait 2>/dev/null || true
grep -m1 '^rate' "$W/load.txt"
echo "-- by process and object (CPU 1, idle included):"
perf report -i "$W/perf.data" --sort comm,dso --no-children -q 2>/dev/null | head -6
# The process's name is the binary's (EDGE_BIN=/tmp/edge-x: edge-x), cut
# to the kernel's 15 characters.
COMM=$(basename "$EDGE" | cut -c1-15)
echo "-- smtp-edge, user space:"
perf report -i "$W/perf.data" --comm "$COMM" --sort sym --no-children -q 2>/dev/null | grep -v '\[k\]' | head -20
echo "-- smtp-edge, kernel:"
perf report -i "$W/perf.data" --comm "$COMM" --sort sym --no-children -q 2>/dev/null | grep '\[k\]' | head -12
