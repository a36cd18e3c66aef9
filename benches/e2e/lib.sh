# shellcheck shell=bash
# Shared helpers for the end-to-end benchmarks (sourced by pgbench-compare.sh and storm.sh).
#
# Everything runs on 127.0.0.1 with ports picked at run time. Every process we start is recorded by
# PID and stopped by PID in `e2e_cleanup` (installed as the EXIT trap by the caller).
# PostgreSQL and PgBouncer refuse to run as root, so they run as the `postgres` OS user.

set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$E2E_DIR/../.." && pwd)

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PGBENCH=${PGBENCH:-$PG_BIN/pgbench}
PSQL=${PSQL:-$PG_BIN/psql}
PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
SLUICE_BIN=${SLUICE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}/release/sluice}
RESULTS_DIR=${RESULTS_DIR:-$REPO_DIR/benches/results}

APP_USER=${APP_USER:-app}
APP_PASSWORD=${APP_PASSWORD:-secret}
APP_DB=${APP_DB:-appdb}
POOL_SIZE=${POOL_SIZE:-20}
MAX_CLIENT_CONN=${MAX_CLIENT_CONN:-5000}
PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-100}
# Seconds of client_idle_timeout and idle_transaction_timeout for both poolers, as a production
# config sets them; unset or 0 leaves both off (the default of both poolers).
IDLE_TIMEOUT=${IDLE_TIMEOUT:-0}
SCALE=${SCALE:-10}
CLK_TCK=$(getconf CLK_TCK)

# The pgbench workloads, name -> "clients|pgbench options": pgbench-compare.sh runs them, and
# scripts/build-pgo.sh trains on the default ones.
CLIENTS=${CLIENTS:-20}
DEFAULT_WORKLOADS=select-simple,select-extended,select-prepared,tpcb,connect-per-tx,clients-400
declare -A WL=(
    [select-simple]="$CLIENTS|-S -M simple"
    [select-extended]="$CLIENTS|-S -M extended"
    [select-prepared]="$CLIENTS|-S -M prepared"
    [tpcb]="$CLIENTS|"
    [connect-per-tx]="$CLIENTS|-C -S"
    [clients-400]="400|-S"
    [select-fixed-rate]="$CLIENTS|-S -M simple -R ${RATE:-12000}"
)

# State filled in by the start_* functions.
WORK=""
PG_PORT="" PG_PID=""
PGB_PORT="" PGB_PID="" PGB_WRAPPER_PID=""
SLUICE_PORT="" SLUICE_PID=""
EXTRA_PIDS=()   # background clients (storm), stopped on exit

# Each server runs in a session of its own, as a service manager would start it. The kernel's
# autogroup scheduler then gives PostgreSQL, the pooler and the benchmark script (pgbench) a
# CPU share each, as separate services get on a real host. pg_ctl already detaches PostgreSQL;
# without this the pooler would share one group, and one CPU share, with pgbench. SHARED_SESSION=1
# keeps both poolers in the script's session instead.
OWN_SESSION=()
[[ ${SHARED_SESSION:-0} == 1 ]] || OWN_SESSION=(setsid)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# A free TCP port on loopback (the kernel picks it; tiny race before the server binds it).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Run a command as the postgres OS user, from a directory it can read.
as_pg() { (cd "$WORK" && runuser -u postgres -- "$@"); }

# Superuser psql over the Unix socket in $WORK.
pg_super() { as_pg "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres "$@"; }

# App-user psql over TCP to PORT (direct or through a pooler).
app_psql() {
    local port=$1; shift
    PGPASSWORD=$APP_PASSWORD PGCONNECT_TIMEOUT=5 "$PSQL" -X -q -At -h 127.0.0.1 -p "$port" -U "$APP_USER" -d "$APP_DB" "$@"
}

check_tools() {
    [[ $EUID -eq 0 ]] || die "run as root (PostgreSQL and PgBouncer are started as the postgres user via runuser)"
    id postgres >/dev/null 2>&1 || die "no 'postgres' OS user"
    for t in "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/postgres" "$PGBENCH" "$PSQL"; do
        [[ -x $t ]] || die "missing $t (PostgreSQL 15 binaries; set PG_BIN)"
    done
    command -v python3 >/dev/null || die "python3 is required"
}

check_pgbouncer() {
    [[ -x $PGBOUNCER ]] || die "pgbouncer not found (apt-get install -y pgbouncer; or set PGBOUNCER)"
}

# Fail early, before starting anything, when a Sluice target is requested but not built.
check_sluice() {
    if [[ ! -x $SLUICE_BIN ]]; then
        die "sluice binary not found at $SLUICE_BIN
       build it with:  cargo build --release -p sluice   (or set SLUICE_BIN=/path/to/sluice)
       or leave Sluice out of this run (see --help: TARGETS / SETUPS)"
    fi
}

make_workdir() {
    WORK=$(mktemp -d /tmp/sluice-e2e.XXXXXX)
    chown postgres:postgres "$WORK"
    chmod 755 "$WORK"
}

# Stop PID with SIGNAL, then SIGKILL after TIMEOUT seconds. Only ever a PID we started.
stop_pid() {
    local pid=$1 sig=${2:-TERM} timeout=${3:-10} i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

e2e_cleanup() {
    local rc=$?
    set +e
    local p
    for p in "${EXTRA_PIDS[@]}"; do stop_pid "$p" INT 5; done
    stop_sluice
    stop_pgbouncer
    if [[ -n $PG_PID ]]; then
        stop_pid "$PG_PID" INT 30   # SIGINT = fast shutdown
        PG_PID=""
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${KEEP_WORK:-0} == 1 || $rc -ne 0 ]]; then
            log "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    return $rc
}

install_traps() {
    trap e2e_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL
start_postgres() {
    local pgdata=$WORK/pgdata
    PG_PORT=$(free_port)
    log "initdb (PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on port $PG_PORT)"
    as_pg "$PG_BIN/initdb" -D "$pgdata" -U postgres -E UTF8 --auth-local=trust --auth-host=md5 \
        --no-sync >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
    cat >>"$pgdata/postgresql.conf" <<EOF

# sluice e2e benchmark
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = $PG_MAX_CONNECTIONS
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
password_encryption = md5
log_min_messages = warning
EOF
    as_pg "$PG_BIN/pg_ctl" -D "$pgdata" -l "$WORK/postgres.log" -w -t 60 start >/dev/null \
        || { tail -20 "$WORK/postgres.log" >&2; die "PostgreSQL did not start"; }
    PG_PID=$(head -1 "$pgdata/postmaster.pid")
    pg_super -d postgres -c "CREATE ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD'" \
        -c "CREATE DATABASE $APP_DB OWNER $APP_USER"
}

pgbench_init() {
    log "pgbench -i -s $SCALE"
    PGPASSWORD=$APP_PASSWORD "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$APP_USER" "$APP_DB" \
        >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
}

# Tidy up between runs, directly against PostgreSQL (we run pgbench with -n).
pg_vacuum() {
    pg_super -d "$APP_DB" -c "VACUUM pgbench_branches" -c "VACUUM pgbench_tellers" \
        -c "TRUNCATE pgbench_history" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Poolers

# Wait until PORT answers `SELECT 1` for the app user; give up (with the log) if PID dies.
wait_pooler() {
    local name=$1 port=$2 pid=$3 logfile=$4 i
    for ((i = 0; i < ${WAIT_POOLER_S:-20} * 5; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -30 "$logfile" >&2 || true
            die "$name exited during startup (log: $logfile)"
        fi
        if [[ $(app_psql "$port" -c 'SELECT 1' 2>/dev/null) == 1 ]]; then
            return 0
        fi
        sleep 0.2
    done
    tail -30 "$logfile" >&2 || true
    die "$name did not answer SELECT 1 on 127.0.0.1:$port within ${WAIT_POOLER_S:-20} s (log: $logfile)"
}

start_pgbouncer() {
    check_pgbouncer
    local dir=$WORK/pgbouncer
    mkdir -p "$dir"
    PGB_PORT=$(free_port)
    local md5
    md5=$(printf '%s%s' "$APP_PASSWORD" "$APP_USER" | md5sum | cut -d' ' -f1)
    printf '"%s" "md5%s"\n' "$APP_USER" "$md5" >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
$APP_DB = host=127.0.0.1 port=$PG_PORT dbname=$APP_DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = md5
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = $MAX_CLIENT_CONN
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
stats_period = 60
ignore_startup_parameters = extra_float_digits
client_idle_timeout = $IDLE_TIMEOUT
idle_transaction_timeout = $IDLE_TIMEOUT
EOF
    chown -R postgres:postgres "$dir"
    rm -f "$dir/pgbouncer.pid"
    # runuser forks, so its PID is not PgBouncer's: read the real one from the pidfile.
    # shellcheck disable=SC2086  # POOLER_WRAP is a command prefix, split on purpose
    (cd "$dir" && exec "${OWN_SESSION[@]}" runuser -u postgres -- ${POOLER_WRAP:-} "$PGBOUNCER" "$dir/pgbouncer.ini") \
        >"$dir/stdout.log" 2>&1 &
    PGB_WRAPPER_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $dir/pgbouncer.pid ]] && break
        kill -0 "$PGB_WRAPPER_PID" 2>/dev/null || { cat "$dir/stdout.log" >&2; die "pgbouncer exited during startup"; }
        sleep 0.1
    done
    PGB_PID=$(cat "$dir/pgbouncer.pid" 2>/dev/null) || die "pgbouncer wrote no pidfile"
    wait_pooler pgbouncer "$PGB_PORT" "$PGB_PID" "$dir/pgbouncer.log"
    log "pgbouncer $("$PGBOUNCER" --version | head -1 | awk '{print $2}') pid $PGB_PID on port $PGB_PORT (pool $POOL_SIZE, transaction, md5)"
}

stop_pgbouncer() {
    [[ -n $PGB_PID ]] && stop_pid "$PGB_PID" INT 10   # SIGINT = safe shutdown
    [[ -n $PGB_WRAPPER_PID ]] && stop_pid "$PGB_WRAPPER_PID" TERM 5
    PGB_PID="" PGB_WRAPPER_PID=""
    return 0
}

# start_sluice NAME [EXTRA_TOML_FILE]: a Sluice with the common settings plus EXTRA (classes,
# policy plugins).
start_sluice() {
    check_sluice
    local name=$1 extra=${2:-}
    local dir=$WORK/sluice-$name
    mkdir -p "$dir"
    SLUICE_PORT=$(free_port)
    cat >"$dir/sluice.toml" <<EOF
[sluice]
listen_addr = "127.0.0.1"
listen_port = $SLUICE_PORT
pool_mode = "transaction"
default_pool_size = $POOL_SIZE
max_client_conn = $MAX_CLIENT_CONN
workers = ${SLUICE_WORKERS:-1}
client_idle_timeout = $IDLE_TIMEOUT
idle_transaction_timeout = $IDLE_TIMEOUT

[databases.$APP_DB]
host = "127.0.0.1"
port = $PG_PORT

[users.$APP_USER]
password = "$APP_PASSWORD"
auth_type = "md5"
EOF
    if [[ -n $extra ]]; then
        printf '\n' >>"$dir/sluice.toml"
        cat "$extra" >>"$dir/sluice.toml"
    fi
    # shellcheck disable=SC2086  # POOLER_WRAP is a command prefix, split on purpose
    # setsid execs in place here (a background job of a script leads no process group), so $!
    # is Sluice's PID.
    "${OWN_SESSION[@]}" ${POOLER_WRAP:-} "$SLUICE_BIN" --config "$dir/sluice.toml" >"$dir/sluice.log" 2>&1 &
    SLUICE_PID=$!
    wait_pooler "sluice ($name)" "$SLUICE_PORT" "$SLUICE_PID" "$dir/sluice.log"
    log "sluice ($name) pid $SLUICE_PID on port $SLUICE_PORT (config $dir/sluice.toml)"
}

stop_sluice() {
    [[ -n $SLUICE_PID ]] && stop_pid "$SLUICE_PID" INT 10
    SLUICE_PID=""
    return 0
}

# utime+stime of PID (all its threads), in clock ticks. Field 2 (comm) may hold spaces, so cut
# after the last ')': the rest starts at field 3 (state), putting utime at 12 and stime at 13.
cpu_ticks() {
    local stat rest
    stat=$(<"/proc/$1/stat") || return 1
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo $(( ${12} + ${13} ))
}

# CPU µs per transaction from a pooler's utime+stime ticks before and after, and the transactions.
cpu_us_per_tx() {
    awk -v d=$(($2 - $1)) -v hz="$CLK_TCK" -v n="$3" 'BEGIN { printf "%.1f", d * 1e6 / hz / n }'
}

# The calling script's help: its header comment, from line 2 to the first line that is blank or
# not a comment.
usage() { sed -n '2,/^\([^#]\|$\)/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

# The options the comparison scripts share: -T, -R, --workloads, -h, and --targets in a script
# that has targets (one that sets TARGETS before calling).
parse_args() {
    while [[ $# -gt 0 ]]; do
        case $1 in
            -T) DURATION=$2; shift 2 ;;
            -R) ROUNDS=$2; shift 2 ;;
            --workloads) WORKLOADS=$2; shift 2 ;;
            --targets) [[ -n ${TARGETS+set} ]] || usage 2; TARGETS=$2; shift 2 ;;
            -h | --help) usage 0 ;;
            *) echo "unknown argument: $1" >&2; usage 2 ;;
        esac
    done
    require_count "$DURATION" "-T must be a whole number of seconds"
    require_count "$ROUNDS" "-R must be a positive count"
}

# require_count VALUE MESSAGE: dies with "MESSAGE, not 'VALUE'" unless VALUE is a whole number > 0.
require_count() {
    [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2, not '$1'"
}

# write_report HEADER_FUNCTION: the Markdown report $MD, the function's lines (the run's setup)
# and then the tables results_table.py makes of $CSV; printed as well.
write_report() {
    {
        "$1"
        echo
        python3 "$E2E_DIR/results_table.py" "$CSV"
        echo
        echo "CSV: ${CSV#"$REPO_DIR"/}"
    } >"$MD"
    cat "$MD"
    log "written $MD and $CSV"
}

git_rev() { git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown; }
# The CPU, for the results header: TPS and CPU per transaction are comparable only on one model.
# Family and model numbers too, since some hypervisors report only "AMD EPYC".
cpu_model() {
    awk -F': ' '/^model name/ && !n {n=$2} /^cpu family/ && !f {f=$2} /^model\t/ && !m {m=$2}
        END {printf "%s (family %s, model %s)", n, f, m}' /proc/cpuinfo
}
