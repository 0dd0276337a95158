#!/usr/bin/env bash
# pgo.sh: a profile-guided release build of smtp-edge. Builds an
# instrumented smtp-edge, runs it through a training load (the relay's hot
# paths: persistent and new connections, pipelined and lockstep, STARTTLS,
# several recipients, mixed sizes, sessions without mail; current_thread,
# thread_per_core and multi_thread), merges the profile and builds again
# with it. The result: target/pgo/smtp-edge (and the profile beside it).
# The code is the same; LLVM lays out and inlines the hot path by what ran
# (loadtest/RESULTS.md section 27 has what it gained).
#
# Needs llvm-profdata able to read rustc's profiles: LLVM_PROFDATA=path, or
# rustup's (`rustup component add llvm-tools`), or a Debian llvm-NN
# (NN >= 19 reads rustc 1.95's; `apt-get install llvm-19`).
# The training config is the defaults (the policy's included) plus
# TRAIN_TOML, tables appended after [runtime] (say, your [policy] tables,
# so that the paths your config takes are the ones laid out hot).
# Usage: loadtest/pgo.sh [TRAIN_SECONDS_PER_STEP=4]
# Both builds are full release builds (fat LTO): ~6 min each on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${1:-4}
OUT=$ROOT/target/pgo
GEN=$ROOT/target/pgo-gen
USE=$ROOT/target/pgo-use
RAW=$OUT/raw

find_profdata() {
  if [ -n "${LLVM_PROFDATA:-}" ]; then echo "$LLVM_PROFDATA"; return; fi
  local p
  for p in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata; do
    if [ -x "$p" ]; then echo "$p"; return; fi
  done
  for v in 25 24 23 22 21 20 19; do
    for p in "/usr/lib/llvm-$v/bin/llvm-profdata" "$(command -v "llvm-profdata-$v" || true)"; do
      if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return; fi
    done
  done
  echo "pgo.sh: no llvm-profdata that reads rustc $(rustc -V | cut -d' ' -f2)'s profiles:" \
    "set LLVM_PROFDATA, or rustup component add llvm-tools, or apt-get install llvm-19" >&2
  exit 1
}
PROFDATA=$(find_profdata)
echo "pgo.sh: llvm-profdata: $PROFDATA"

# --target: RUSTFLAGS then reach only the target's crates, not the build
# scripts and proc macros (which would write profiles of their own).
HOST=$(rustc -vV | sed -n 's/^host: //p')
rm -rf "$RAW" "$OUT/smtp-edge" "$OUT/smtp-edge.profdata"
mkdir -p "$RAW"
echo "pgo.sh: instrumented build in $GEN"
(cd "$ROOT" && cargo build --release -q -p smtp-load &&
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$RAW" CARGO_TARGET_DIR=$GEN cargo build --release -q -p smtp-edge --target "$HOST")

# lib.sh: the sink, smtp-edge's config and start, free ports, the cleanup
# on exit (of a failed step's smtp-edge too).
source "$ROOT/loadtest/lib.sh"
EDGE=$GEN/$HOST/release/smtp-edge
export LLVM_PROFILE_FILE="$RAW/edge-%p-%m.profraw"
SINK=$(free_port)
start_sink "$SINK"

# One instrumented smtp-edge per runtime flavor, each through the same loads.
train() {
  local flavor=$1 threads=$2 ep
  ep=$(free_port)
  start_edge "$ep" "$SINK" starttls "[runtime]
flavor = \"$flavor\"
worker_threads = $threads
${TRAIN_TOML:-}" 64
  local t=(-t "127.0.0.1:$ep" -d "$SECS" -q)
  echo "pgo.sh: training $flavor ($threads)"
  "$LOAD" run "${t[@]}" -c 400 -m 0 -s 4096 > /dev/null
  "$LOAD" run "${t[@]}" -c 20 -m 0 -s 4096 --no-pipelining > /dev/null
  "$LOAD" run "${t[@]}" -c 50 -m 1 -s 4096 > /dev/null
  "$LOAD" run "${t[@]}" -c 50 -m 20 --size-dist 4096:70,102400:25,1048576:5 -r 3 > /dev/null
  "$LOAD" run "${t[@]}" -c 20 -m 5 --starttls -s 4096 > /dev/null
  "$LOAD" run "${t[@]}" -c 20 --churn > /dev/null
  # SIGTERM: a graceful stop, so the process exits and writes its profile.
  stop_pid "$EDGE_PID"
  forget "$EDGE_PID"
}
train current_thread 1
train thread_per_core 2
train multi_thread 2
ls "$RAW"/edge-*.profraw > /dev/null || { echo "pgo.sh: no profile written" >&2; exit 1; }
"$PROFDATA" merge -o "$OUT/smtp-edge.profdata" "$RAW"/edge-*.profraw

echo "pgo.sh: optimised build in $USE"
(cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$OUT/smtp-edge.profdata" CARGO_TARGET_DIR=$USE cargo build --release -q -p smtp-edge --target "$HOST")
cp "$USE/$HOST/release/smtp-edge" "$OUT/smtp-edge"
echo "pgo.sh: $OUT/smtp-edge"
