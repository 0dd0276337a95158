#!/usr/bin/env bash
# metrics_shape.sh BIN_DIR OUT: the /metrics of a fixed workload, to compare
# two builds (a refactor must not change names, labels or counts). Runs
# BIN_DIR/smtp-edge (release) with an admin port in front of an `smtp-load
# sink` (BIN_DIR/smtp-load), relays 2 000 messages over 10 connections,
# refuses one connection by the deny list, scrapes /metrics and writes OUT:
# every series but the timings (histogram buckets, sums, durations) as
# "name{labels} value", sorted, the backend's random port as BACKEND; and
# OUT.types, the families' TYPE lines. Then: diff OUT_a OUT_b.
# Example: loadtest/profile/metrics_shape.sh target/release /tmp/m-new.txt
set -eu
R=$1; OUT=$2
W=$(mktemp -d)
SINKP=$((33000 + RANDOM % 500)); EP=$((33500 + RANDOM % 500)); AP=$((34000 + RANDOM % 500))
$R/smtp-load sink -l 127.0.0.1:$SINKP -q > $W/sink.log 2>&1 & SPID=$!
cat > $W/edge.toml <<T
hostname = "edge.loadtest"
[[listener]]
address = "127.0.0.1:$EP"
tls = "none"
[[backend]]
address = "127.0.0.1:$SINKP"
max_connections = 100
[admin]
address = "127.0.0.1:$AP"
[policy]
allow = ["127.0.0.1/32"]
deny = ["127.0.0.2/32"]
T
RUST_LOG=warn $R/smtp-edge --config $W/edge.toml > $W/edge.log 2>&1 & EPID=$!
for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$EP) 2>/dev/null && break; sleep 0.1; done
$R/smtp-load run -t 127.0.0.1:$EP -c 10 -m 0 -n 2000 -s 4096 -q > $W/load.txt 2>&1
python3 - $EP <<'P'
import socket,sys
s=socket.socket(); s.bind(("127.0.0.2",0)); s.connect(("127.0.0.1",int(sys.argv[1]))); s.recv(100); s.close()
P
sleep 0.5
curl -s 127.0.0.1:$AP/metrics > $W/metrics.txt
kill $EPID $SPID; wait 2>/dev/null || true
grep -v '^#' $W/metrics.txt | grep -v '_bucket{\|_sum\b\|_sum{\|duration\|_seconds' |
  sed -E "s/127\.0\.0\.1:$SINKP/BACKEND/" | sort > $OUT
grep '^# TYPE' $W/metrics.txt | sort > $OUT.types
rm -rf $W
grep -c . $OUT
