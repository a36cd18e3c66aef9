#!/usr/bin/env bash
# PgBouncer and Sluice side by side: both in front of the same PostgreSQL at the same time, each
# driven by its own pgbench at the same fixed rate. Compares their CPU per transaction at equal
# load, under the same machine conditions.
#
# pgbench-compare.sh runs the poolers one after the other at full speed. There a pooler's CPU per
# transaction depends on the throughput its run reached (a busier event loop handles more
# sockets per wake-up), and on this kind of shared machine throughput moves by ±20 % from one
# run to the next, so its CPU ratio carries that noise. Here both poolers serve the same rate
# in the same seconds: what the machine does, it does to both, and the ratio is their cost
# for the same work. TPS at full speed is still read from pgbench-compare.sh.
#
# Usage: benches/e2e/side-by-side.sh [-T SECONDS] [-R ROUNDS] [--workloads LIST]
#   -T SECONDS        duration of each run (default 20; env DURATION)
#   -R ROUNDS         rounds per workload (default 7; env ROUNDS); the pgbench started first
#                     alternates between the poolers from one round to the next
#   --workloads LIST  comma list (default all; env WORKLOADS), with the rate each pooler serves:
#                       select-simple    20 clients, -S -M simple      3000/s
#                       select-extended  20 clients, -S -M extended    3000/s
#                       tpcb             20 clients, TPC-B-like         300/s
#                       connect-per-tx   20 clients, -C -S              800/s (a login each)
#                       clients-400     400 clients, -S                2000/s
#                     Together the two poolers' loads stay below what the machine serves at
#                     full speed (about 16,000 selects, 2,200 TPC-B or 3,500 logins per second
#                     through one pooler on 2 cores). RATE_SCALE (default 1) multiplies every
#                     rate. RATE_SCALE=0 runs both at full speed at once instead: a race, whose
#                     TPS ratio compares throughput under the same machine conditions.
# Other env: SLUICE_BIN (default: the release build of scripts/build-release.sh if there is one,
#            else the plain release build), POOL_SIZE (20), SCALE (10), PG_BIN, RESULTS_DIR
#            (benches/results), KEEP_WORK=1, IDLE_TIMEOUT=SECONDS (as in pgbench-compare.sh).
# Run as root (PostgreSQL and PgBouncer run as the postgres user). Takes about
# 5 workloads × ROUNDS × (DURATION + 15) seconds.
SLUICE_BIN_GIVEN=${SLUICE_BIN:-}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-20}
ROUNDS=${ROUNDS:-7}
WORKLOADS=${WORKLOADS:-select-simple,select-extended,tpcb,connect-per-tx,clients-400}
RATE_SCALE=${RATE_SCALE:-1}
THREADS=${THREADS:-2}

parse_args "$@"

# name -> "clients|pgbench options|transactions per second for each pooler"
declare -A SIDE=(
    [select-simple]="$CLIENTS|-S -M simple|3000"
    [select-extended]="$CLIENTS|-S -M extended|3000"
    [tpcb]="$CLIENTS||300"
    [connect-per-tx]="$CLIENTS|-C -S|800"
    [clients-400]="400|-S|2000"
)
IFS=, read -r -a workloads <<<"$WORKLOADS"
for w in "${workloads[@]}"; do [[ -n ${SIDE[$w]:-} ]] || die "unknown workload '$w' (${!SIDE[*]})"; done
[[ $RATE_SCALE =~ ^[0-9]+([.][0-9]+)?$ ]] || die "RATE_SCALE must be a number (0 or more), not '$RATE_SCALE'"

SLUICE_BUILD="the binary given in SLUICE_BIN"
if [[ -z $SLUICE_BIN_GIVEN ]]; then
    release=${CARGO_TARGET_DIR:-${SLUICE_CACHE:-$HOME/.cache/sluice}/target}/profiled/release/sluice
    if [[ -x $release ]]; then
        SLUICE_BIN=$release SLUICE_BUILD="the release build of scripts/build-release.sh"
    else
        SLUICE_BUILD="the plain release build (cargo build --release)"
    fi
fi
check_tools
check_pgbouncer
check_sluice
install_traps
make_workdir
mkdir -p "$RESULTS_DIR" "$WORK/runs"
stamp=$(date +%Y%m%d-%H%M%S)
CSV=$RESULTS_DIR/side-by-side-$stamp.csv
MD=$RESULTS_DIR/side-by-side-$stamp.md

start_postgres
pgbench_init
start_pgbouncer
start_sluice side

echo "workload,target,round,clients,rate,tps,latency_ms,pooler_cpu_us_per_tx,transactions,errors,exit_code,note" >"$CSV"

# The rate of WORKLOAD for each pooler, in transactions per second (0: no limit).
rate_of() {
    local rest=${SIDE[$1]#*|}
    awk -v r="${rest##*|}" -v s="$RATE_SCALE" 'BEGIN { printf "%d", r * s }'
}

# start_pgbench WORKLOAD TARGET ROUND PORT: one pooler's pgbench, in the background; sets BG_PID.
start_pgbench() {
    local w=$1 target=$2 round=$3 port=$4
    local clients=${SIDE[$w]%%|*} rest=${SIDE[$w]#*|}
    local opts=${rest%|*} rate
    rate=$(rate_of "$w")
    local out=$WORK/runs/$w.$target.$round limit=()
    if ((rate > 0)); then limit=(-R "$rate"); fi
    # shellcheck disable=SC2086
    PGPASSWORD=$APP_PASSWORD timeout -k 10 $((DURATION * 3 + 120)) \
        "$PGBENCH" -n -h 127.0.0.1 -p "$port" -U "$APP_USER" -c "$clients" -j "$THREADS" \
        -T "$DURATION" "${limit[@]}" $opts "$APP_DB" >"$out.stdout" 2>"$out.stderr" &
    BG_PID=$!
}

# record WORKLOAD TARGET ROUND TICKS_BEFORE TICKS_AFTER EXIT_CODE
record() {
    local w=$1 target=$2 round=$3 before=$4 after=$5 rc=$6
    local clients=${SIDE[$w]%%|*} rate
    rate=$(rate_of "$w")
    local out=$WORK/runs/$w.$target.$round tps lat tx errors note cpu=""
    IFS=$'\x1f' read -r tps lat tx errors note < <(python3 "$E2E_DIR/pgbench_parse.py" "$out.stdout" "$out.stderr")
    if [[ ${tx:-0} -gt 0 ]]; then
        cpu=$(cpu_us_per_tx "$before" "$after" "$tx")
        # A pooler that fell behind the rate did less work in the same seconds: flag it.
        if awk -v t="$tps" -v r="$rate" 'BEGIN { exit !(r > 0 && t < 0.95 * r) }'; then
            note="rate not held (${tps%.*}/s of $rate/s)${note:+; $note}"
        fi
    fi
    note=${note//\"/\'}
    printf '%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,"%s"\n' "$w" "$target" "$round" "$clients" "$rate" \
        "$tps" "$lat" "$cpu" "$tx" "$errors" "$rc" "$note" >>"$CSV"
    log "   $target: tps=${tps:-?} latency=${lat:-?}ms cpu/tx=${cpu:--}µs errors=$errors exit=$rc ${note:+($note)}"
}

# run_round WORKLOAD ROUND: both poolers at once, the first pgbench alternating by round.
run_round() {
    local w=$1 round=$2 target port pid
    local -a order=(pgbouncer sluice)
    if ((round % 2 == 0)); then order=(sluice pgbouncer); fi
    pg_vacuum
    for pid in "$PGB_PID" "$SLUICE_PID"; do
        kill -0 "$pid" 2>/dev/null || die "a pooler (pid $pid) is no longer running (see $WORK)"
    done
    local pgb_before sl_before pgb_after sl_after rc_pgb=0 rc_sl=0
    pgb_before=$(cpu_ticks "$PGB_PID")
    sl_before=$(cpu_ticks "$SLUICE_PID")
    log "$w round $round: ${order[0]} then ${order[1]}, ${SIDE[$w]%%|*} clients each, ${DURATION}s"
    declare -A bg
    for target in "${order[@]}"; do
        if [[ $target == pgbouncer ]]; then port=$PGB_PORT; else port=$SLUICE_PORT; fi
        start_pgbench "$w" "$target" "$round" "$port"
        bg[$target]=$BG_PID
    done
    wait "${bg[pgbouncer]}" || rc_pgb=$?
    wait "${bg[sluice]}" || rc_sl=$?
    pgb_after=$(cpu_ticks "$PGB_PID") || die "pgbouncer died during $w (see $WORK)"
    sl_after=$(cpu_ticks "$SLUICE_PID") || die "sluice died during $w (see $WORK)"
    record "$w" pgbouncer "$round" "$pgb_before" "$pgb_after" "$rc_pgb"
    record "$w" sluice "$round" "$sl_before" "$sl_after" "$rc_sl"
}

log "$(( ${#workloads[@]} * ROUNDS )) rounds of ${DURATION}s: ${workloads[*]}; $ROUNDS rounds each"
for w in "${workloads[@]}"; do
    # Warm both pools and both poolers' code before the first measured round.
    for port in "$PGB_PORT" "$SLUICE_PORT"; do
        PGPASSWORD=$APP_PASSWORD "$PGBENCH" -n -h 127.0.0.1 -p "$port" -U "$APP_USER" -c 20 -j "$THREADS" \
            -T 2 -S "$APP_DB" >/dev/null 2>&1 || true
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        run_round "$w" "$r"
    done
done

report_header() {
    echo "# PgBouncer and Sluice side by side, same rate each — $stamp"
    echo
    echo "- git $(git_rev); $(nproc) CPUs, $(cpu_model); $("$PG_BIN/postgres" --version); $("$PGBOUNCER" --version 2>/dev/null | head -1)"
    echo "- sluice: $SLUICE_BUILD (built $(date -r "$SLUICE_BIN" '+%Y-%m-%d %H:%M')), workers = ${SLUICE_WORKERS:-1}"
    echo "- each round: both poolers in front of the same PostgreSQL at once, each with its own pgbench -n -T $DURATION -j $THREADS -R RATE (the rate column); the pgbench started first alternates between rounds; $ROUNDS rounds"
    echo "- pool size $POOL_SIZE each (transaction mode, md5; both log connections and disconnections), PostgreSQL max_connections=$PG_MAX_CONNECTIONS, fsync off, scale $SCALE"
    [[ $IDLE_TIMEOUT != 0 ]] && echo "- both poolers: client_idle_timeout and idle_transaction_timeout = $IDLE_TIMEOUT s"
    echo "- PostgreSQL, PgBouncer and Sluice each run in a session of their own; pooler CPU µs/tx = (utime+stime ticks after − before) × 10⁶ / CLK_TCK($CLK_TCK) / transactions, over the same seconds for both"
    if [[ $RATE_SCALE == 0 ]]; then
        echo "- RATE_SCALE=0: no rate limit, both at full speed at once (a race); the rate column is 0"
    else
        echo "- TPS is the rate both were asked for: its ratio only shows that both held it (latency includes pgbench's schedule lag)"
    fi
}
write_report report_header
