#!/usr/bin/env bash
# Smoke check of the comparison peers (not a benchmark): for each of direct,
# haproxy, nginx (tuned), nginx-stock and haraka, starts a fresh Postfix
# smtp-sink on loopback and the peer in front of it, sends one message with
# swaks and then a few hundred with smtp-source (a new connection per message,
# then persistent connections with -d), verifies each time that the sink
# counted exactly the messages sent, stops everything, and prints a table
# peer / mode / ok / msgs/s.
# The rates are rough (tiny runs on a shared machine); use the load tests
# for numbers.
#
#   check.sh [DIR]
#
# DIR holds all state (default: a temporary directory, removed on success and
# kept for inspection on failure). Env: CHECK_MSGS (200), CHECK_SESSIONS (10),
# CHECK_SIZE (4096), CHECK_PEERS ("direct haproxy nginx nginx-stock haraka"),
# CHECK_MODES ("new persistent"), CHECK_BASE_PORT (26000).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MSGS=${CHECK_MSGS:-200}
SESSIONS=${CHECK_SESSIONS:-10}
SIZE=${CHECK_SIZE:-4096}
read -r -a PEERS <<<"${CHECK_PEERS:-direct haproxy nginx nginx-stock haraka}"
read -r -a MODES <<<"${CHECK_MODES:-new persistent}"
BASE_PORT=${CHECK_BASE_PORT:-26000}
SOURCE_TIMEOUT=120

for tool in smtp-sink smtp-source ss timeout awk; do
    command -v "$tool" >/dev/null || die "$tool not found (run install.sh)"
done
for v in MSGS SESSIONS SIZE BASE_PORT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number"
done
if ((MSGS > 2000)); then die "CHECK_MSGS=$MSGS: this is a smoke check, not a load test"; fi

if (($# > 0)); then
    WORK=$(state_dir "$1")
    OWN_WORK=0
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/peers-check.XXXXXX")
    OWN_WORK=1
fi
# smtp-sink drops privileges to nobody; it only writes to stdout (opened
# here), so the directory need not be writable by nobody.
chmod 755 "$WORK"

SINK_PID=
CUR_PEER=
CUR_DIR=

peer_script() {
    case $1 in
    haproxy) echo "$PEERS_DIR/haproxy.sh" ;;
    nginx | nginx-stock) echo "$PEERS_DIR/nginx.sh" ;;
    haraka) echo "$PEERS_DIR/haraka.sh" ;;
    *) return 1 ;;
    esac
}

stop_peer() {
    local script
    [[ -n "$CUR_PEER" && "$CUR_PEER" != direct ]] || {
        CUR_PEER=
        return 0
    }
    script=$(peer_script "$CUR_PEER")
    "$script" stop "$CUR_DIR" || log "stopping $CUR_PEER failed"
    CUR_PEER=
}

stop_sink() {
    [[ -n "$SINK_PID" ]] || return 0
    kill "$SINK_PID" 2>/dev/null || true
    wait "$SINK_PID" 2>/dev/null || true
    SINK_PID=
}

FAILED=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_peer
    stop_sink
    if ((rc == 0 && FAILED == 0 && OWN_WORK)); then
        rm -rf -- "$WORK"
    elif ((rc != 0 || FAILED)); then
        log "state and logs kept in $WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# sink_count FILE: the sink's "mesg=" counter (smtp-sink -c writes
# "sess=N quit=N mesg=N" records separated by CR).
sink_count() {
    local n
    n=$(tr '\r' '\n' <"$1" | awk -F'mesg=' 'NF > 1 { n = $2 + 0 } END { print n + 0 }')
    echo "$n"
}

# wait_count FILE WANT: wait up to 5 s for the sink counter to reach WANT;
# print the final count.
wait_count() {
    local f=$1 want=$2 n i
    for ((i = 0; i < 50; i++)); do
        n=$(sink_count "$f")
        ((n >= want)) && break
        sleep 0.1
    done
    sleep 0.2 # anything beyond WANT would be a failure too
    sink_count "$f"
}

ROWS=()
declare -A DIRECT_RATE=()

run_peer() {
    local peer=$1
    local dir="$WORK/$peer" sink_port port target script mode sflag start
    local before after got t0 t1 secs rate ok rc ratio
    mkdir -p "$dir"
    sink_port=$(free_port "$BASE_PORT")
    port=$(free_port $((sink_port + 1)) "$sink_port")

    smtp-sink -c -u nobody "127.0.0.1:$sink_port" 1000 >"$dir/sink.out" 2>"$dir/sink.err" &
    SINK_PID=$!
    wait_listen "$sink_port" 10 || {
        log "smtp-sink did not start: $(cat "$dir/sink.err")"
        return 1
    }

    target=127.0.0.1:$sink_port
    if [[ $peer != direct ]]; then
        script=$(peer_script "$peer") || die "unknown peer '$peer'"
        CUR_PEER=$peer
        CUR_DIR="$dir/state"
        start=start
        if [[ $peer == nginx-stock ]]; then start="start-stock"; fi
        if ! "$script" "$start" "$CUR_DIR" "$port" "127.0.0.1:$sink_port" 2>"$dir/start.err"; then
            cat "$dir/start.err" >&2
            CUR_PEER=
            for mode in "${MODES[@]}"; do ROWS+=("$peer|$mode|FAIL (start)|-|-"); done
            FAILED=1
            stop_sink
            return 0
        fi
        target=127.0.0.1:$port
    fi

    # One message with a second client (swaks) first: the peer really accepts
    # a recipient @example.org and the message reaches the sink.
    if command -v swaks >/dev/null; then
        before=$(sink_count "$dir/sink.out")
        rc=0
        timeout 60 swaks --server "$target" -f a@example.org -t b@example.org \
            --h-Subject "peers check.sh $peer" >"$dir/swaks.out" 2>&1 || rc=$?
        got=$(($(wait_count "$dir/sink.out" $((before + 1))) - before))
        if ((rc == 0 && got == 1)); then
            ok=ok
        else
            ok="FAIL (swaks rc=$rc, sink got $got/1)"
            FAILED=1
            tail -n 5 "$dir/swaks.out" | sed 's/^/    /' >&2
        fi
        ROWS+=("$peer|swaks|$ok|-|-")
    fi

    for mode in "${MODES[@]}"; do
        case $mode in
        new) sflag=() ;;
        persistent) sflag=(-d) ;;
        *) die "unknown mode '$mode'" ;;
        esac
        before=$(sink_count "$dir/sink.out")
        t0=$(date +%s.%N)
        rc=0
        timeout "$SOURCE_TIMEOUT" smtp-source "${sflag[@]}" -s "$SESSIONS" -l "$SIZE" -m "$MSGS" \
            -f a@example.org -t b@example.org "$target" \
            >"$dir/source-$mode.out" 2>&1 || rc=$?
        t1=$(date +%s.%N)
        after=$(wait_count "$dir/sink.out" $((before + MSGS)))
        got=$((after - before))
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
        rate=$(awk -v n="$MSGS" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
        if ((rc == 0 && got == MSGS)); then
            ok=ok
        else
            ok="FAIL (rc=$rc, sink got $got/$MSGS)"
            FAILED=1
            sed 's/^/    /' "$dir/source-$mode.out" >&2
        fi
        if [[ $peer == direct ]]; then
            DIRECT_RATE[$mode]=$rate
            ratio=1.00
        elif [[ -n "${DIRECT_RATE[$mode]:-}" && "${DIRECT_RATE[$mode]}" != 0 ]]; then
            ratio=$(awk -v r="$rate" -v d="${DIRECT_RATE[$mode]}" 'BEGIN { printf "%.2f", r / d }')
        else
            ratio=-
        fi
        ROWS+=("$peer|$mode|$ok|$rate|$ratio")
        log "$peer $mode: smtp-source rc=$rc, sink +$got/$MSGS in ${secs}s"
    done

    stop_peer
    stop_sink
}

log "smtp-source -s $SESSIONS -l $SIZE -m $MSGS per peer and mode; state in $WORK"
for peer in "${PEERS[@]}"; do
    run_peer "$peer"
done

printf '\n%-12s %-11s %-34s %9s %10s\n' peer mode ok msgs/s vs-direct
for row in "${ROWS[@]}"; do
    IFS='|' read -r peer mode ok rate ratio <<<"$row"
    printf '%-12s %-11s %-34s %9s %10s\n' "$peer" "$mode" "$ok" "$rate" "$ratio"
done
printf '(%d msgs, %d sessions, %d-byte messages each; rough rates from one short run)\n' \
    "$MSGS" "$SESSIONS" "$SIZE"
((FAILED == 0))
