#!/usr/bin/env bash
# cg.sh NAME EXTRA_TOML [N=20000] [LOG=warn]: instructions per relayed
# message of the release smtp-edge under callgrind (counts that do not
# depend on how busy the machine is). One worker thread, persistent
# connections (20), 4 KiB, pipelining unless LOADARGS=--no-pipelining;
# 2 000 messages of warm-up, then the counters are zeroed, N messages
# run and dumped. EXTRA_TOML goes into the config (the word OTLP is
# replaced by the address of an `smtp-load otlp-sink` started for it).
# Prints the total; per function: cg_self.py $PROF_DIR/NAME/cg.out.*.1 N.
# EDGE_BIN=/path/to/smtp-edge profiles that binary instead (common.sh);
# COPY=1 profiles `smtp-load copy`, a tokio byte copier, instead;
# HAPROXY=1 HAProxy mode tcp (one thread).
# Example: cg.sh exp '[telemetry]
#   otlp_endpoint = "http://OTLP"
#   sample_ratio = 1.0' 20000 info
set -eu
NAME=$1; EXTRA=$2; N=${3:-20000}; LOG=${4:-warn}
LOAD_ON=""
source "$(dirname "$0")/common.sh"
# COPY=1: profile `smtp-load copy` (a byte copier on one current-thread
# tokio runtime, the floor of a tokio proxy) in smtp-edge's place.
PROXY=("$EDGE" --config "$W/edge.toml")
if [ "${COPY:-0}" = 1 ]; then PROXY=("$R/smtp-load" copy -l "127.0.0.1:$EP" -t "127.0.0.1:$SINKP"); fi
# HAPROXY=1: HAProxy `mode tcp` (PEERS.md's config, one thread, in the
# foreground) in smtp-edge's place: its instructions per message beside ours.
if [ "${HAPROXY:-0}" = 1 ]; then
  cat > "$W/haproxy.cfg" <<H
global
    maxconn 8000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend smtp_in
    bind 127.0.0.1:$EP
    default_backend smtp_sink
backend smtp_sink
    server sink 127.0.0.1:$SINKP
H
  PROXY=(haproxy -db -f "$W/haproxy.cfg")
fi
TOKIO_WORKER_THREADS=1 RUST_LOG=$LOG valgrind --tool=callgrind ${CG_ARGS:-} --callgrind-out-file=$W/cg.out.%p "${PROXY[@]}" > $W/edge.log 2>&1 & EPID=$!
# A failed step (set -e) must not leave the proxy under valgrind and the
# sink running: they would skew every later measurement.
trap 'kill $EPID $SPID ${OPID:-} 2>/dev/null || true' EXIT
wait_edge
$R/smtp-load run -t 127.0.0.1:$EP -c ${CONNS:-20} -m 0 -n 2000 -s ${SIZE:-4096} ${LOADARGS:-} -q >/dev/null 2>&1
sleep 1
callgrind_control -z $EPID >/dev/null
$R/smtp-load run -t 127.0.0.1:$EP -c ${CONNS:-20} -m 0 -n $N -s ${SIZE:-4096} ${LOADARGS:-} -q > $W/load.txt 2>&1
sleep 1.5
callgrind_control -d $EPID >/dev/null
sleep 1
kill $EPID; wait $EPID 2>/dev/null || true
kill $SPID ${OPID:-} 2>/dev/null; wait 2>/dev/null || true
f=$(ls -S $W/cg.out.*.* 2>/dev/null | head -1)
tot=0
for f in $W/cg.out.*.*; do t=$(grep -m1 '^summary:\|^totals:' $f | awk '{print $2}'); tot=$((tot + ${t:-0})); done
echo "$NAME: total Ir $tot, per msg $((tot / N))"
