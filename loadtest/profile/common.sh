# Sourced by cg.sh and threads.sh: the release binaries, a work directory
# $W, an `smtp-load sink` backend and (when EXTRA mentions otlp_endpoint,
# with OTLP standing for its address) an `smtp-load otlp-sink`, and
# $W/edge.toml for smtp-edge in front of them. LOAD_ON: the command prefix
# for the load side (say, `taskset -c 0`).
R=$(cd "$(dirname "$0")/../.." && pwd)/target/release
# EDGE_BIN=/path/to/smtp-edge: profile that binary (one built from another
# commit, say) instead of target/release/smtp-edge.
EDGE=${EDGE_BIN:-$R/smtp-edge}
W=${PROF_DIR:-/tmp/smtp-edge-prof}/$NAME; rm -rf "$W"; mkdir -p "$W"
SINKP=$((30000 + RANDOM % 1000)); EP=$((31000 + RANDOM % 1000)); OP=$((32000 + RANDOM % 500))
$LOAD_ON "$R/smtp-load" sink -l 127.0.0.1:$SINKP -q > "$W/sink.log" 2>&1 & SPID=$!
EXTRA=${EXTRA//OTLP/127.0.0.1:$OP}
OPID=
if [[ "$EXTRA" == *otlp_endpoint* ]]; then
  H=(); [[ "$EXTRA" == *'"http"'* ]] && H=(--http)
  $LOAD_ON "$R/smtp-load" otlp-sink -l 127.0.0.1:$OP "${H[@]}" --threads 1 --json -q > "$W/otlp.json" 2>"$W/otlp.err" & OPID=$!
fi
cat > "$W/edge.toml" <<T
hostname = "edge.loadtest"
$EXTRA
[[listener]]
address = "127.0.0.1:$EP"
tls = "none"
[[backend]]
address = "127.0.0.1:$SINKP"
max_connections = 1000
T
sleep 0.3

# wait_edge: until smtp-edge accepts on $EP.
wait_edge() {
  for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$EP) 2>/dev/null && return 0; sleep 0.3; done
}
