#!/usr/bin/env bash
# Instructions each pooler executes per transaction, counted by valgrind's callgrind.
#
# CPU time per transaction on a shared 2-core VM moves by ±20% between runs, so small changes in
# the poolers' own work drown in it. Instruction counts do not move: this script runs PgBouncer
# and Sluice under callgrind against the same PostgreSQL, warms each up, zeroes the counters,
# runs a fixed number of transactions per workload and reads the counters back. What it does not
# show is what the instructions cost (context switches, the kernel's share): pgbench-compare.sh
# measures that. With --cache, callgrind also simulates this machine's level-1 data cache and
# its per-core level-2 cache (sizes from sysfs) and counts the user-space misses per
# transaction: how much of each pooler's own state falls out of cache between two transactions
# of a client. The kernel's work is not simulated, so real misses are more, for both.
#
# Usage: benches/e2e/instructions.sh [-t TRANSACTIONS_PER_CLIENT] [-c CLIENTS] [--cache]
#   -t N      transactions per client and workload (default 1000; env TX). The queued-select
#             workload runs the same total over QUEUED_CLIENTS (default 200) on the pool of 20.
#   -c N      clients in every workload but queued-select (default 4)
#   --cache   simulate the caches too (env CACHE_SIM=1); about twice as slow
# Other env: SLUICE_BIN, PG_BIN, RESULTS_DIR (benches/results), KEEP_WORK=1, IDLE_TIMEOUT=SECONDS
# (both poolers with client_idle_timeout and idle_transaction_timeout set, as in production).
# Needs valgrind (apt-get install -y valgrind). Takes about a minute.

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TX=${TX:-1000}
CLIENTS=4
CACHE_SIM=${CACHE_SIM:-0}
while [[ $# -gt 0 ]]; do
    case $1 in
        -t) TX=$2; shift 2 ;;
        -c) CLIENTS=$2; shift 2 ;;
        --cache) CACHE_SIM=1; shift ;;
        -h | --help) usage 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
command -v valgrind >/dev/null || die "valgrind not found (apt-get install -y valgrind)"
command -v callgrind_control >/dev/null || die "callgrind_control not found (part of valgrind)"
require_count "$TX" "-t must be a positive count"
require_count "$CLIENTS" "-c must be a positive count"

# callgrind's options: with --cache, the level-1 data cache and the level-2 cache of CPU 0 as
# the simulated D1 and LL ("size,associativity,line size", from sysfs).
CALLGRIND=(valgrind --tool=callgrind)
cache_geometry() {
    local level=$1 type=$2 dir
    for dir in /sys/devices/system/cpu/cpu0/cache/index*; do
        [[ $(<"$dir/level") == "$level" && $(<"$dir/type") == "$type" ]] || continue
        local size
        size=$(<"$dir/size")
        [[ $size =~ ^([0-9]+)K$ ]] || die "unexpected cache size '$size' in $dir"
        echo "$((BASH_REMATCH[1] * 1024)),$(<"$dir/ways_of_associativity"),$(<"$dir/coherency_line_size")"
        return
    done
    die "no level-$level $type cache in /sys/devices/system/cpu/cpu0/cache"
}
if [[ $CACHE_SIM == 1 ]]; then
    D1_GEOMETRY=$(cache_geometry 1 Data)
    LL_GEOMETRY=$(cache_geometry 2 Unified)
    CALLGRIND+=(--cache-sim=yes "--D1=$D1_GEOMETRY" "--LL=$LL_GEOMETRY")
fi

# name -> pgbench options
declare -A WORKLOAD=(
    [select-simple]="-S -M simple"
    [select-extended]="-S -M extended"
    [tpcb]="-M simple"
    [connect-per-tx]="-S -C"
    [queued-select]="-S -M simple"
)
# Clients per workload where it is not $CLIENTS: queued-select keeps QUEUED_CLIENTS on the pool
# of 20, so most transactions wait in the pooler's queue for a server connection.
QUEUED_CLIENTS=${QUEUED_CLIENTS:-200}
require_count "$QUEUED_CLIENTS" "QUEUED_CLIENTS must be a positive count"
declare -A CLIENTS_OF=([queued-select]=$QUEUED_CLIENTS)
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

# Per-transaction counts from the newest dump of OUT (FILE.1, FILE.2, ...) over TX
# transactions: "instructions" or, with the cache simulated, "instructions D1-misses L2-misses"
# (reads and writes together).
last_dump_per_tx() {
    local out=$1 tx=$2 f
    f=$(ls -1v "$out".* 2>/dev/null | tail -1)
    [[ -n $f ]] || die "no callgrind dump at $out.*"
    awk -v tx="$tx" '
        /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
        /^(summary|totals):/ {
            printf "%d", $(col["Ir"]) / tx
            if ("D1mr" in col)
                printf " %.1f %.1f", ($(col["D1mr"]) + $(col["D1mw"])) / tx, ($(col["DLmr"]) + $(col["DLmw"])) / tx
            print ""
            exit
        }' "$f"
}

# measure POOLER PORT PID USER OUT -> lines "workload instructions-per-tx [D1 L2 misses per tx]"
measure() {
    local pooler=$1 port=$2 pid=$3 user=$4 out=$5 w c counts tx
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
        tx=$((c * (TX * CLIENTS / c)))
        counts=$(last_dump_per_tx "$out" "$tx")
        log "$pooler $w per transaction: $counts (instructions${D1_GEOMETRY:+, D1 and L2 misses})"
        echo "$w $counts"
    done
}

export WAIT_POOLER_S=120
cg_out_pgb=$WORK/pgbouncer/callgrind.out
mkdir -p "$WORK/pgbouncer" && chown postgres:postgres "$WORK/pgbouncer"
POOLER_WRAP="${CALLGRIND[*]} --callgrind-out-file=$cg_out_pgb" start_pgbouncer
measure pgbouncer "$PGB_PORT" "$PGB_PID" postgres "$cg_out_pgb" >"$WORK/pgbouncer.res"
stop_pgbouncer

cg_out_sluice=$WORK/sluice-plain/callgrind.out
POOLER_WRAP="${CALLGRIND[*]} --callgrind-out-file=$cg_out_sluice" start_sluice plain
measure sluice "$SLUICE_PORT" "$SLUICE_PID" root "$cg_out_sluice" >"$WORK/sluice.res"
stop_sluice

stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS_DIR"
MD=$RESULTS_DIR/instructions-$stamp.md
{
    echo "# Instructions per transaction (callgrind) — $stamp"
    echo
    echo "- git $(git_rev); $(cpu_model); $("$PGBOUNCER" --version 2>/dev/null | head -1); Sluice with workers = ${SLUICE_WORKERS:-1}; client_idle_timeout and idle_transaction_timeout = ${IDLE_TIMEOUT} s (0 = off) for both"
    echo "- each workload: warm-up, counters zeroed, then $((CLIENTS * TX)) transactions: pgbench -n -c $CLIENTS -j 1 -t $TX (queued-select: -c ${CLIENTS_OF[queued-select]} on the pool of $POOL_SIZE)"
    echo "- both poolers: transaction mode, pool $POOL_SIZE, md5, connection logging on (their default)"
    if [[ $CACHE_SIM == 1 ]]; then
        echo "- caches simulated (user space only): D1 $D1_GEOMETRY, L2 $LL_GEOMETRY (size, ways, line); misses are reads and writes per transaction"
        echo
        echo "| workload | PgBouncer instructions | Sluice instructions | Sluice ÷ PgBouncer | PgBouncer D1 misses | Sluice D1 misses | PgBouncer L2 misses | Sluice L2 misses |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    else
        echo
        echo "| workload | PgBouncer | Sluice | Sluice ÷ PgBouncer |"
        echo "|---|---:|---:|---:|"
    fi
    # join puts the Sluice fields after all of PgBouncer's: w p [p-D1 p-L2] s [s-D1 s-L2].
    per_pooler=1
    [[ $CACHE_SIM == 1 ]] && per_pooler=3
    join <(sort "$WORK/pgbouncer.res") <(sort "$WORK/sluice.res") | while read -r -a f; do
        p=${f[1]} s=${f[1 + per_pooler]}
        ratio=$(awk -v a="$s" -v b="$p" 'BEGIN {printf "%.2f", a / b}')
        if [[ $CACHE_SIM == 1 ]]; then
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "${f[0]}" "$p" "$s" "$ratio" \
                "${f[2]}" "${f[5]}" "${f[3]}" "${f[6]}"
        else
            printf '| %s | %s | %s | %s |\n' "${f[0]}" "$p" "$s" "$ratio"
        fi
    done
} >"$MD"
cat "$MD"
log "written $MD"
