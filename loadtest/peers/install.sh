#!/usr/bin/env bash
# Idempotently installs the comparison peers for the load tests: Debian nginx with
# the mail module, HAProxy, Postfix tools (smtp-sink/smtp-source), swaks, and
# Haraka 3.3.4 from npm into loadtest/peers/.cache/haraka. Makes sure no system
# nginx/haproxy service is left running or enabled afterwards (the peer scripts
# run their own instances with state in a caller-given directory).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HARAKA_VERSION=3.3.4
HARAKA_PREFIX="$HERE/.cache/haraka"
APT_PKGS=(nginx libnginx-mod-mail haproxy postfix swaks)

log() { printf 'install.sh: %s\n' "$*" >&2; }

on_error() {
    local rc=$?
    log "failed (exit $rc) at line ${BASH_LINENO[0]}"
    # A half-finished npm install must not look complete next time.
    if [[ -d "$HARAKA_PREFIX.partial" ]]; then rm -rf "$HARAKA_PREFIX.partial"; fi
    exit "$rc"
}
trap on_error ERR

# Stop and disable a Debian service whether or not systemd is PID 1.
stop_system_service() {
    local name=$1 pidfile=$2 pid
    if command -v systemctl >/dev/null 2>&1; then
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --now "$name" >/dev/null 2>&1 || true
        else
            # Not booted with systemd: disable only edits the unit links.
            systemctl disable "$name" >/dev/null 2>&1 || true
        fi
    fi
    if command -v service >/dev/null 2>&1; then
        service "$name" stop >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d "$name" disable >/dev/null 2>&1 || true
    fi
    if [[ -s "$pidfile" ]]; then
        pid=$(<"$pidfile")
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            log "killing leftover system $name (pid $pid from $pidfile)"
            kill "$pid" 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
        fi
        rm -f "$pidfile"
    fi
}

# --- Debian packages -------------------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "Debian packages already installed"
fi
# The linter (shellcheck) is only an aid; do not fail if it is unavailable.
if ! command -v shellcheck >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null 2>&1 ||
        log "shellcheck not installable; skipping"
fi

# The packages' own services (nginx on port 80, haproxy) must not stay up or
# start at boot: the peers run as private instances. Postfix is only touched
# if this run installed it (its service would take port 25); an existing
# Postfix setup is left as it is.
stop_system_service nginx /run/nginx.pid
stop_system_service haproxy /run/haproxy.pid
if [[ " ${missing[*]} " == *" postfix "* ]]; then
    stop_system_service postfix /var/spool/postfix/pid/master.pid
fi

if [[ ! -f /usr/lib/nginx/modules/ngx_mail_module.so ]]; then
    log "ngx_mail_module.so missing after install"; exit 1
fi

# --- Haraka from npm -------------------------------------------------------
installed_version() {
    local pj="$1/node_modules/Haraka/package.json"
    [[ -f "$pj" ]] && node -p "require(process.argv[1]).version" "$pj" 2>/dev/null
}
if [[ "$(installed_version "$HARAKA_PREFIX" || true)" == "$HARAKA_VERSION" &&
      -x "$HARAKA_PREFIX/node_modules/.bin/haraka" ]]; then
    log "Haraka $HARAKA_VERSION already in $HARAKA_PREFIX"
else
    log "npm install Haraka@$HARAKA_VERSION into $HARAKA_PREFIX"
    rm -rf "$HARAKA_PREFIX.partial"
    mkdir -p "$HARAKA_PREFIX.partial"
    npm install --prefix "$HARAKA_PREFIX.partial" --cache "$HERE/.cache/npm" \
        --no-audit --no-fund --loglevel=error \
        "Haraka@$HARAKA_VERSION" >&2
    [[ "$(installed_version "$HARAKA_PREFIX.partial")" == "$HARAKA_VERSION" ]]
    rm -rf "$HARAKA_PREFIX"
    mv "$HARAKA_PREFIX.partial" "$HARAKA_PREFIX"
fi

log "nginx: $(nginx -v 2>&1)"
log "haproxy: $(haproxy -v 2>&1 | head -n1)"
log "Haraka: $(installed_version "$HARAKA_PREFIX")"
