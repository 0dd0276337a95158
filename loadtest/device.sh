#!/usr/bin/env bash
# device.sh [cores.sh arguments]: scenario 18 (scenarios/cores.sh, issue 26's
# matrix) from the packed binaries in .scale/, on a machine with neither
# cargo nor HAProxy: the 16-core device machine. .scale/ is what
# ../shared/bench/pack.sh makes (stripped smtp-edge and smtp-load, HAProxy
# and the libraries it links, about 34 MB); HAProxy alone runs with them
# (LD_LIBRARY_PATH for it only, not for python3 or taskset).
#
# Here:   cargo build --release && bash ../shared/bench/pack.sh
# There:  the device tool's run with carry [".scale"], for example
#         THREADS="1 2 4 8" MODES="persistent new" loadtest/device.sh 4 400 2
# Every environment variable of cores.sh applies (THREADS, MODES, PROXIES,
# RATE, EDGE_EXTRA, KEEP_RUNS=$OUT/runs to bring each run's JSON back).
# The profile-guided build beside the plain one: here also
#   cp target/pgo/smtp-edge .scale/bin/smtp-edge-pgo && strip .scale/bin/smtp-edge-pgo
# (loadtest/pgo.sh), there PROXIES="haproxy smtp-edge smtp-edge-alt": ALT_EDGE
# is .scale/bin/smtp-edge-pgo when it is there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scale=$root/.scale
for b in smtp-edge smtp-load haproxy; do
  if [ ! -x "$scale/bin/$b" ]; then
    echo "device.sh: no .scale/bin/$b; run 'cargo build --release && bash ../shared/bench/pack.sh' first" >&2
    exit 1
  fi
done
# A haproxy on PATH that finds its libraries, ahead of any installed one.
wrap=$(mktemp -d /tmp/smtp-edge-device.XXXXXX)
trap 'rm -rf "$wrap"' EXIT
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s/lib" exec "%s/bin/haproxy" "$@"\n' "$scale" "$scale" >"$wrap/haproxy"
chmod +x "$wrap/haproxy"
if [ -z "${ALT_EDGE:-}" ] && [ -x "$scale/bin/smtp-edge-pgo" ]; then
  export ALT_EDGE="$scale/bin/smtp-edge-pgo"
fi
export PATH="$wrap:$PATH" EDGE_BIN="$scale/bin/smtp-edge" LOAD_BIN="$scale/bin/smtp-load" NO_BUILD=1
"$root/loadtest/scenarios/cores.sh" "$@"
