#!/usr/bin/env bash
# Instructions each pooler executes per transaction, counted by valgrind's callgrind.
#
# CPU time per transaction on a shared 2-core VM moves by ±20% between runs, so small changes in
# the poolers' own work drown in it. Instruction counts do not move: this script runs PgBouncer
# and Sluice under callgrind against the same PostgreSQL, warms each up, zeroes the counters,
# runs a fixed number of transactions per workload and reads the counters back. What it does not
# show is what the instructions cost (cache misses, context switches): pgbench-compare.sh
# measures that.
#
# Usage: benches/e2e/instructions.sh [-t TRANSACTIONS_PER_CLIENT]
#   -t N   transactions per client and workload (default 1000; 4 clients; env TX). The
#          queued-select workload runs the same total over 200 clients on the pool of 20.
# Other env: SLUICE_BIN, PG_BIN, RESULTS_DIR (benches/results), KEEP_WORK=1, IDLE_TIMEOUT=SECONDS
# (both poolers with client_idle_timeout and idle_transaction_timeout set, as in production).
# Needs valgrind (apt-get install -y valgrind). Takes about a minute.

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TX=${TX:-1000}
CLIENTS=4
while [[ $# -gt 0 ]]; do
    case $1 in
        -t) TX=$2; shift 2 ;;
        -h | --help) usage 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
command -v valgrind >/dev/null || die "valgrind not found (apt-get install -y valgrind)"
command -v callgrind_control >/dev/null || die "callgrind_control not found (part of valgrind)"

# name -> pgbench options
declare -A WORKLOAD=(
    [select-simple]="-S -M simple"
    [select-extended]="-S -M extended"
    [tpcb]="-M simple"
    [connect-per-tx]="-S -C"
    [queued-select]="-S -M simple"
)
# Clients per workload where it is not $CLIENTS: queued-select keeps 200 clients on the pool of
# 20, so most transactions wait in the pooler's queue for a server connection.
declare -A CLIENTS_OF=([queued-select]=200)
ORDER=(select-simple select-extended tpcb connect-per-tx queued-select)

check_tools
check_pgbouncer
check_sluice
install_traps
make_workdir
start_postgres
pgbench_init

# callgrind_control must run as the profiled process's user.
cg_control() {
    local user=$1; shift
    runuser -u "$user" -- callgrind_control "$@" >/dev/null
}

# The instruction count of the newest dump of OUT (FILE.1, FILE.2, ...).
last_dump_total() {
    local out=$1 f
    f=$(ls -1v "$out".* 2>/dev/null | tail -1)
    [[ -n $f ]] || die "no callgrind dump at $out.*"
    awk '/^(summary|totals):/ {print $2; exit}' "$f"
}

# measure POOLER PORT PID USER OUT -> lines "workload instructions-per-tx"
measure() {
    local pooler=$1 port=$2 pid=$3 user=$4 out=$5 w c total tx
    for w in "${ORDER[@]}"; do
        # The same number of transactions in every workload, however many clients run them.
        c=${CLIENTS_OF[$w]:-$CLIENTS}
        # shellcheck disable=SC2086
        PGPASSWORD=$APP_PASSWORD "$PGBENCH" -n -h 127.0.0.1 -p "$port" -U "$APP_USER" \
            -c "$c" -j 1 -t $((50 * CLIENTS / c + 1)) ${WORKLOAD[$w]} "$APP_DB" >/dev/null 2>&1 \
            || die "$pooler warm-up for $w failed"
        cg_control "$user" -z "$pid"
        # shellcheck disable=SC2086
        PGPASSWORD=$APP_PASSWORD "$PGBENCH" -n -h 127.0.0.1 -p "$port" -U "$APP_USER" \
            -c "$c" -j 1 -t $((TX * CLIENTS / c)) ${WORKLOAD[$w]} "$APP_DB" >"$WORK/$pooler-$w.log" 2>&1 \
            || die "$pooler $w failed (log: $WORK/$pooler-$w.log)"
        cg_control "$user" -d "$pid"
        total=$(last_dump_total "$out")
        tx=$((c * (TX * CLIENTS / c)))
        log "$pooler $w: $((total / tx)) instructions per transaction"
        echo "$w $((total / tx))"
    done
}

export WAIT_POOLER_S=120
cg_out_pgb=$WORK/pgbouncer/callgrind.out
mkdir -p "$WORK/pgbouncer" && chown postgres:postgres "$WORK/pgbouncer"
POOLER_WRAP="valgrind --tool=callgrind --callgrind-out-file=$cg_out_pgb" start_pgbouncer
measure pgbouncer "$PGB_PORT" "$PGB_PID" postgres "$cg_out_pgb" >"$WORK/pgbouncer.res"
stop_pgbouncer

cg_out_sluice=$WORK/sluice-plain/callgrind.out
POOLER_WRAP="valgrind --tool=callgrind --callgrind-out-file=$cg_out_sluice" start_sluice plain
measure sluice "$SLUICE_PORT" "$SLUICE_PID" root "$cg_out_sluice" >"$WORK/sluice.res"
stop_sluice

stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS_DIR"
MD=$RESULTS_DIR/instructions-$stamp.md
{
    echo "# Instructions per transaction (callgrind) — $stamp"
    echo
    echo "- git $(git_rev); $("$PGBOUNCER" --version 2>/dev/null | head -1); Sluice with workers = ${SLUICE_WORKERS:-1}; client_idle_timeout and idle_transaction_timeout = ${IDLE_TIMEOUT} s (0 = off) for both"
    echo "- each workload: warm-up, counters zeroed, then $((CLIENTS * TX)) transactions: pgbench -n -c $CLIENTS -j 1 -t $TX (queued-select: -c ${CLIENTS_OF[queued-select]} on the pool of $POOL_SIZE)"
    echo "- both poolers: transaction mode, pool $POOL_SIZE, md5, connection logging on (their default)"
    echo
    echo "| workload | PgBouncer | Sluice | Sluice ÷ PgBouncer |"
    echo "|---|---:|---:|---:|"
    join <(sort "$WORK/pgbouncer.res") <(sort "$WORK/sluice.res") | while read -r w p s; do
        printf '| %s | %s | %s | %s |\n' "$w" "$p" "$s" "$(awk -v a="$s" -v b="$p" 'BEGIN {printf "%.2f", a / b}')"
    done
} >"$MD"
cat "$MD"
log "written $MD"
