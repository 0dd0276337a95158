# Shared helpers for the peer scripts in loadtest/peers (sourced, not run):
# argument checks, loopback port probing, waiting for a listener, and stopping
# a process recorded in a pid file. Everything here acts only on 127.0.0.1 and
# on processes whose pid the scripts themselves recorded.
# shellcheck shell=bash

PEERS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
PEERS_CACHE="$PEERS_DIR/.cache"

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# check_port NAME VALUE: a TCP port number, and never the SMTP port 25.
check_port() {
    local name=$1 p=$2
    if ! [[ "$p" =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then die "$name: not a port: '$p'"; fi
    ((p != 25)) || die "$name: refusing to use port 25"
}

# parse_backend HOST:PORT -> sets BACKEND_HOST (IPv4 literal) and BACKEND_PORT.
parse_backend() {
    local spec=$1
    [[ "$spec" == *:* ]] || die "backend must be HOST:PORT, got '$spec'"
    BACKEND_HOST=${spec%:*}
    BACKEND_PORT=${spec##*:}
    [[ "$BACKEND_HOST" == localhost ]] && BACKEND_HOST=127.0.0.1
    [[ "$BACKEND_HOST" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] ||
        die "backend host must be an IPv4 address (nginx's Auth-Server needs one), got '$BACKEND_HOST'"
    check_port "backend port" "$BACKEND_PORT"
}

# state_dir DIR: make DIR absolute and create it.
state_dir() {
    [[ -n "$1" ]] || die "state directory is empty"
    mkdir -p -- "$1"
    (cd -- "$1" && pwd)
}

# port_in_use PORT: true if something listens on TCP PORT (any address).
port_in_use() {
    [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]
}

# free_port START [TAKEN...]: first port >= START (below the ephemeral range)
# with no listener and not among TAKEN.
free_port() {
    local p=$1 t
    shift
    for ((; p < 32768; p++)); do
        ((p == 25)) && continue
        for t in "$@"; do [[ "$t" == "$p" ]] && continue 2; done
        port_in_use "$p" || {
            echo "$p"
            return 0
        }
    done
    die "no free port found"
}

# pid_alive PID: true if PID exists and is not a zombie (an exited daemon
# stays a zombie until PID 1 reaps it, which can take seconds here).
pid_alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n "$st" && "$st" != Z* ]]
}

# group_alive PGID: true if any non-zombie process is in process group PGID.
group_alive() {
    ps -e -o pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { f = 1 } END { exit !f }'
}

# pid_from FILE: print the pid in FILE if that process is alive.
pid_from() {
    local f=$1 pid
    [[ -s "$f" ]] || return 1
    pid=$(<"$f")
    pid=${pid//[^0-9]/}
    [[ -n "$pid" ]] && pid_alive "$pid" && echo "$pid"
}

# wait_listen PORT SECONDS [PIDFILE]: wait until 127.0.0.1:PORT accepts; give up
# early if the process in PIDFILE (once written) has died.
wait_listen() {
    local port=$1 secs=$2 pidfile=${3:-} i
    for ((i = 0; i < secs * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if [[ -n "$pidfile" && -s "$pidfile" ]] && ! pid_from "$pidfile" >/dev/null; then
            log "process from $pidfile exited before listening on $port"
            return 1
        fi
        sleep 0.1
    done
    log "nothing listening on 127.0.0.1:$port after ${secs}s"
    return 1
}

# stop_pidfile FILE [group]: SIGTERM the pid in FILE (its whole process group
# if "group" is given, for a leader started with setsid), wait up to 5 s,
# then SIGKILL; remove FILE. A missing or stale FILE is not an error.
stop_pidfile() {
    local f=$1 mode=${2:-} pid target i
    pid=$(pid_from "$f") || {
        rm -f -- "$f"
        return 0
    }
    target=$pid
    [[ "$mode" == group ]] && target=-$pid
    still_running() {
        if [[ "$mode" == group ]]; then group_alive "$pid"; else pid_alive "$pid"; fi
    }
    kill -TERM -- "$target" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        still_running || break
        sleep 0.05
    done
    if still_running; then
        log "pid $pid did not stop on SIGTERM; sending SIGKILL"
        kill -KILL -- "$target" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f -- "$f"
}

# Cleanup for "start": the peer scripts call arm_cleanup PEER_stop DIR just
# before they launch the daemon. If the script then exits with an error (or is
# interrupted), the EXIT trap runs that stop, so no half-started daemon is left
# behind; failures before the launch (bad arguments, already running, port in
# use) leave any running instance alone. disarm_cleanup after success.
CLEANUP=()
arm_cleanup() {
    CLEANUP=("$@")
    trap on_start_exit EXIT
    trap 'exit 130' INT TERM
}
disarm_cleanup() {
    CLEANUP=()
    trap - EXIT INT TERM
}
on_start_exit() {
    local rc=$?
    trap - EXIT
    if ((rc != 0 && ${#CLEANUP[@]} > 0)); then
        log "start failed (exit $rc); cleaning up"
        "${CLEANUP[@]}" || true
    fi
    exit "$rc"
}

# nofile_limit: the fd limit a daemon can raise itself to (hard limit, capped).
nofile_limit() {
    local h
    h=$(ulimit -Hn)
    if [[ "$h" == unlimited ]] || ((h > 65536)); then h=65536; fi
    echo "$h"
}
