#!/usr/bin/env bash
# Sluice in one command: a throwaway PostgreSQL, Sluice in front of it, and pgbench through it.
#
#   scripts/demo.sh          run the demo, then stop everything it started
#   scripts/demo.sh --keep   leave PostgreSQL and Sluice running until Ctrl-C
#
# Needs PostgreSQL 15's server binaries and pgbench (scripts/setup.sh installs them). As root,
# PostgreSQL runs as the `postgres` OS user. Ports are free ones picked at start; nothing is
# installed or left behind: every process started here is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
case "${1:-}" in
    --keep) keep=1 ;;
    "") ;;
    *) echo "usage: $0 [--keep]" >&2; exit 2 ;;
esac

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# --- what we need ------------------------------------------------------------------------------
# On a fresh machine this installs PostgreSQL and friends first (idempotent, quiet).
bash scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${SLUICE_CACHE:-$HOME/.cache/sluice}/target}
pgbin=${SLUICE_PG_BIN:-/usr/lib/postgresql/15/bin}
[ -x "$pgbin/initdb" ] || pgbin=$(pg_config --bindir 2>/dev/null || true)
[ -x "$pgbin/initdb" ] || die "PostgreSQL server binaries not found: run scripts/setup.sh"
psql=$pgbin/psql
pgbench=$pgbin/pgbench
[ -x "$pgbench" ] || pgbench=$(command -v pgbench) || die "pgbench not found"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- cleanup: by PID, whatever happens ----------------------------------------------------------
tmp=$(mktemp -d /tmp/sluice-demo.XXXXXX)
sluice_pid=
pg_pid=
# Whether PID $1 runs (a zombie doesn't: an orphan's lingers until PID 1 reaps it).
alive() {
    local st
    st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
    [ -n "$st" ] && [ "$st" != Z ]
}
# Polls until PID $1 has exited, for at most $2 tenths of a second.
wait_gone() {
    local n=0
    while alive "$1" && [ "$n" -lt "$2" ]; do sleep 0.1; n=$((n + 1)); done
    ! alive "$1"
}
cleanup() {
    set +e
    trap - EXIT INT TERM
    if [ -n "$sluice_pid" ] && kill -0 "$sluice_pid" 2>/dev/null; then
        kill -TERM "$sluice_pid"                       # graceful: drain, then exit
        wait_gone "$sluice_pid" 150 || kill -KILL "$sluice_pid"
        wait "$sluice_pid" 2>/dev/null
    fi
    if [ -n "$pg_pid" ] && alive "$pg_pid"; then
        kill -INT "$pg_pid"                            # PostgreSQL's fast shutdown
        wait_gone "$pg_pid" 300 || kill -QUIT "$pg_pid"
    fi
    rm -rf "$tmp"
    echo "demo: stopped Sluice and PostgreSQL, removed $tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build Sluice ------------------------------------------------------------------------------
say "building sluice (release)"
cargo build --release -p sluice --quiet
sluice_bin=${CARGO_TARGET_DIR:-target}/release/sluice
[ -x "$sluice_bin" ] || die "no binary at $sluice_bin"

# --- a throwaway PostgreSQL --------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no postgres OS user"
    chown postgres: "$tmp"
    if command -v setpriv >/dev/null; then
        as_pg() { (cd "$tmp" && setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"); }
    else
        as_pg() { (cd "$tmp" && runuser -u postgres -- "$@"); }
    fi
else
    as_pg() { (cd "$tmp" && "$@"); }
fi

pg_port=$(free_port)
say "starting PostgreSQL on 127.0.0.1:$pg_port (data in $tmp)"
as_pg "$pgbin/initdb" -D "$tmp/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    --no-instructions >"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log"; die "initdb failed"; }
cat >>"$tmp/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$tmp'
max_connections = 100
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
CONF
# Superuser over the Unix socket in $tmp only; passwords on TCP.
cat >"$tmp/data/pg_hba.conf" <<HBA
local all postgres trust
host  all all 127.0.0.1/32 scram-sha-256
HBA
as_pg "$pgbin/pg_ctl" -D "$tmp/data" -l "$tmp/postgres.log" -w -t 30 start >/dev/null \
    || { cat "$tmp/postgres.log"; die "PostgreSQL did not start"; }
pg_pid=$(head -n 1 "$tmp/data/postmaster.pid")
as_pg "$psql" -X -q -h "$tmp" -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "create role app login password 'secret'" -c "create database appdb owner app" >/dev/null

# --- Sluice ------------------------------------------------------------------------------------
sluice_port=$(free_port)
sed -e "s/^listen_port = .*/listen_port = $sluice_port/" -e "s/^port = .*/port = $pg_port/" \
    config/demo.toml >"$tmp/sluice.toml"
say "starting Sluice on 127.0.0.1:$sluice_port (config $tmp/sluice.toml, log $tmp/sluice.log)"
"$sluice_bin" --config "$tmp/sluice.toml" >"$tmp/sluice.log" 2>&1 &
sluice_pid=$!

export PGPASSWORD=secret PGCONNECT_TIMEOUT=5
ready=0
for _ in $(seq 300); do   # bounded: 30 s
    kill -0 "$sluice_pid" 2>/dev/null || { cat "$tmp/sluice.log"; die "Sluice exited"; }
    if "$psql" -X -Atq -h 127.0.0.1 -p "$sluice_port" -U app -d appdb -c 'select 1' >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
[ "$ready" -eq 1 ] || { cat "$tmp/sluice.log"; die "Sluice did not accept a login within 30 s"; }

cat <<MSG

  Sluice is pooling appdb. Connect with:
      psql "postgres://app:secret@127.0.0.1:$sluice_port/appdb"

MSG

# --- pgbench -----------------------------------------------------------------------------------
say "pgbench -i (straight to PostgreSQL)"
"$pgbench" -i -q -s 1 -h 127.0.0.1 -p "$pg_port" -U app appdb >"$tmp/pgbench-init.log" 2>&1 \
    || { cat "$tmp/pgbench-init.log"; die "pgbench -i failed"; }

say "pgbench -c 20 -j 2 -T 10 -S through Sluice (20 clients, 10 server connections)"
"$pgbench" -n -c 20 -j 2 -T 10 -S -h 127.0.0.1 -p "$sluice_port" -U app appdb 2>&1 \
    | grep -E '^(number of (clients|threads|transactions actually processed|failed)|latency average|tps)'

if [ "$keep" -eq 1 ]; then
    cat <<MSG

  Still running (Sluice PID $sluice_pid, PostgreSQL PID $pg_pid):
      psql "postgres://app:secret@127.0.0.1:$sluice_port/appdb"
  Press Ctrl-C to stop both.
MSG
    wait "$sluice_pid" || true
    echo "demo: Sluice exited"; tail -n 20 "$tmp/sluice.log"
fi
