#!/usr/bin/env bash
# pgbench against PostgreSQL directly, through PgBouncer and through Sluice, interleaved in one run.
#
# Starts its own PostgreSQL 15 (temp dir, free port, max_connections=100, fsync off), loads pgbench
# tables (scale 10), starts PgBouncer and Sluice (transaction mode, pool 20, md5, max_client_conn
# 5000; both log connections and disconnections, their default), then for each workload runs
# every target back to back, R rounds (the target order rotates each round). Reports TPS, average latency, errors and the pooler's CPU µs per transaction
# (utime+stime from /proc/PID/stat, before/after, divided by transactions).
#
# Usage: benches/e2e/pgbench-compare.sh [-T SECONDS] [-R ROUNDS] [--targets LIST] [--workloads LIST]
#   -T SECONDS         duration of each pgbench run (default 15; env DURATION)
#   -R ROUNDS          rounds per workload (default 2; env ROUNDS)
#   --targets LIST     comma list of direct,pgbouncer,sluice,sluice-priority,sluice-pgo (default
#                      the first three, and sluice-pgo when that build exists; env TARGETS).
#                      sluice-pgo is the release build of scripts/build-release.sh (env
#                      SLUICE_PGO_BIN), with the same settings as sluice
#   --workloads LIST   comma list of workload names (default all; env WORKLOADS):
#                      select-simple select-extended select-prepared tpcb connect-per-tx clients-400
#                      select-fixed-rate (not in the default list: -S at RATE transactions per
#                      second, env RATE, default 12000, so both poolers handle the same load)
# Other env: SCALE (10), POOL_SIZE (20), SLUICE_BIN, SLUICE_WORKERS (1, like PgBouncer's one
#            thread), PG_BIN, RESULTS_DIR (benches/results), SHARED_SESSION=1 (run both poolers
#            in this script's session, sharing pgbench's autogroup, instead of one each),
#            KEEP_WORK=1 keeps the temp dir (pgbench logs, pooler logs), IDLE_TIMEOUT=SECONDS
#            (both poolers with client_idle_timeout and idle_transaction_timeout set).
# Run as root (PostgreSQL and PgBouncer are started as the postgres user). Needs ~5 free minutes
# per round at the defaults.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-2}
TARGETS=${TARGETS:-}
WORKLOADS=${WORKLOADS:-$DEFAULT_WORKLOADS}
THREADS=${THREADS:-2}

parse_args "$@"

SLUICE_PGO_BIN=${SLUICE_PGO_BIN:-${CARGO_TARGET_DIR:-${SLUICE_CACHE:-$HOME/.cache/sluice}/target}/profiled/release/sluice}
if [[ -z ${TARGETS:-} ]]; then
    TARGETS=direct,pgbouncer,sluice
    if [[ -x $SLUICE_PGO_BIN ]]; then
        TARGETS+=,sluice-pgo
    else
        log "no profile-guided build at $SLUICE_PGO_BIN: comparing the plain build only (scripts/build-release.sh makes one)"
    fi
fi
IFS=, read -r -a targets <<<"$TARGETS"
IFS=, read -r -a workloads <<<"$WORKLOADS"
for t in "${targets[@]}"; do
    case $t in direct|pgbouncer|sluice|sluice-priority|sluice-pgo) ;; *) die "unknown target '$t' (direct, pgbouncer, sluice, sluice-priority, sluice-pgo)" ;; esac
done
for w in "${workloads[@]}"; do [[ -n ${WL[$w]:-} ]] || die "unknown workload '$w'"; done

check_tools
[[ ",$TARGETS," == *,pgbouncer,* ]] && check_pgbouncer
[[ ",$TARGETS," == *,sluice* ]] && check_sluice
if [[ ",$TARGETS," == *,sluice-pgo,* ]]; then
    [[ -x $SLUICE_PGO_BIN ]] || die "profile-guided build not found at $SLUICE_PGO_BIN (scripts/build-release.sh)"
fi
if [[ ",$TARGETS," == *,sluice-priority,* ]]; then
    PRIORITY_WASM=${PRIORITY_WASM:-${SLUICE_PLUGINS_TARGET_DIR:-$HOME/.cache/sluice/plugins-target}/wasm32-wasip2/release/priority.wasm}
    [[ -f $PRIORITY_WASM ]] || die "priority plugin not found at $PRIORITY_WASM (cd plugins && cargo build --release --target wasm32-wasip2)"
fi

install_traps
make_workdir
mkdir -p "$RESULTS_DIR"
stamp=$(date +%Y%m%d-%H%M%S)
CSV=$RESULTS_DIR/pgbench-$stamp.csv
MD=$RESULTS_DIR/pgbench-$stamp.md

# Every pooler keeps its pool of server connections open between runs; the direct runs need
# room beside them (plus PostgreSQL's 3 superuser slots). Raised only when the targets need it:
# 400 clients direct are still refused, as they should be.
if [[ ",$TARGETS," == *,direct,* ]]; then
    poolers=0
    for t in "${targets[@]}"; do [[ $t == direct ]] || poolers=$((poolers + 1)); done
    needed=$((poolers * POOL_SIZE + CLIENTS + 3))
    if ((needed > PG_MAX_CONNECTIONS)); then
        log "max_connections $PG_MAX_CONNECTIONS -> $needed: $poolers poolers' pools and $CLIENTS direct clients"
        PG_MAX_CONNECTIONS=$needed
    fi
fi
start_postgres
pgbench_init
[[ ",$TARGETS," == *,pgbouncer,* ]] && start_pgbouncer
[[ ",$TARGETS," == *,sluice,* ]] && start_sluice compare
SLUICE_PLAIN_PORT=${SLUICE_PORT:-}
SLUICE_PLAIN_PID=${SLUICE_PID:-}
if [[ ",$TARGETS," == *,sluice-priority,* ]]; then
    # The same Sluice with the priority plugin deciding every connect and transaction.
    cat >"$WORK/priority.toml" <<EOF
[classes.web]
priority = 100
[classes.batch]
priority = 0
[[policy.plugins]]
name = "priority"
path = "$PRIORITY_WASM"
[policy.plugins.config]
web = "pgbench"
batch = "scraper"
select_boost = 5
EOF
    [[ -n $SLUICE_PLAIN_PID ]] && EXTRA_PIDS+=("$SLUICE_PLAIN_PID")
    start_sluice priority "$WORK/priority.toml"
    SLUICE_PRIO_PORT=$SLUICE_PORT
    SLUICE_PRIO_PID=$SLUICE_PID
fi

if [[ ",$TARGETS," == *,sluice-pgo,* ]]; then
    [[ -n ${SLUICE_PID:-} ]] && EXTRA_PIDS+=("$SLUICE_PID")
    SLUICE_BIN=$SLUICE_PGO_BIN start_sluice pgo
    SLUICE_PGO_PORT=$SLUICE_PORT
    SLUICE_PGO_PID=$SLUICE_PID
fi

port_of() { case $1 in direct) echo "$PG_PORT" ;; pgbouncer) echo "$PGB_PORT" ;; sluice) echo "$SLUICE_PLAIN_PORT" ;; sluice-priority) echo "$SLUICE_PRIO_PORT" ;; sluice-pgo) echo "$SLUICE_PGO_PORT" ;; esac; }
pid_of() { case $1 in direct) echo "" ;; pgbouncer) echo "$PGB_PID" ;; sluice) echo "$SLUICE_PLAIN_PID" ;; sluice-priority) echo "$SLUICE_PRIO_PID" ;; sluice-pgo) echo "$SLUICE_PGO_PID" ;; esac; }

echo "workload,target,round,clients,tps,latency_ms,pooler_cpu_us_per_tx,transactions,errors,exit_code,note" >"$CSV"

# run_one WORKLOAD TARGET ROUND
run_one() {
    local w=$1 target=$2 round=$3
    local clients=${WL[$w]%%|*} opts=${WL[$w]#*|}
    local port pid out before after rc cpu=""
    port=$(port_of "$target")
    pid=$(pid_of "$target")
    out=$WORK/runs/$w.$target.$round
    mkdir -p "$WORK/runs"
    pg_vacuum
    if [[ -n $pid ]]; then
        kill -0 "$pid" 2>/dev/null || die "$target (pid $pid) is no longer running"
        before=$(cpu_ticks "$pid")
    fi
    log "$w round $round -> $target: pgbench -c $clients -j $THREADS -T $DURATION $opts"
    rc=0
    # shellcheck disable=SC2086
    PGPASSWORD=$APP_PASSWORD timeout -k 10 $((DURATION * 3 + 120)) \
        "$PGBENCH" -n -h 127.0.0.1 -p "$port" -U "$APP_USER" -c "$clients" -j "$THREADS" \
        -T "$DURATION" $opts "$APP_DB" >"$out.stdout" 2>"$out.stderr" || rc=$?
    if [[ -n $pid ]]; then
        kill -0 "$pid" 2>/dev/null || die "$target (pid $pid) died during $w (see $WORK)"
        after=$(cpu_ticks "$pid")
    fi
    local tps lat tx errors note
    IFS=$'\x1f' read -r tps lat tx errors note < <(python3 "$E2E_DIR/pgbench_parse.py" "$out.stdout" "$out.stderr")
    if [[ -n $pid && ${tx:-0} -gt 0 ]]; then
        cpu=$(cpu_us_per_tx "$before" "$after" "$tx")
    fi
    note=${note//\"/\'}
    printf '%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,"%s"\n' "$w" "$target" "$round" "$clients" "$tps" "$lat" \
        "$cpu" "$tx" "$errors" "$rc" "$note" >>"$CSV"
    log "   tps=${tps:-?} latency=${lat:-?}ms cpu/tx=${cpu:--}µs errors=$errors exit=$rc ${note:+($note)}"
}

total=$(( ${#workloads[@]} * ROUNDS * ${#targets[@]} ))
log "$total runs of ${DURATION}s: workloads ${workloads[*]}; targets ${targets[*]}; $ROUNDS rounds"
for w in "${workloads[@]}"; do
    for ((r = 1; r <= ROUNDS; r++)); do
        n=${#targets[@]}
        for ((i = 0; i < n; i++)); do
            # Rotate the order each round so no target always runs first (warm caches, turbo, ...).
            run_one "$w" "${targets[$(((i + r - 1) % n))]}" "$r"
        done
    done
done

report_header() {
    echo "# pgbench: direct vs PgBouncer vs Sluice — $stamp"
    echo
    echo "- git $(git_rev); $(nproc) CPUs, $(cpu_model); $("$PG_BIN/postgres" --version); $("$PGBOUNCER" --version 2>/dev/null | head -1)"
    [[ ",$TARGETS," == *,sluice,* ]] && echo "- sluice: $(basename "$SLUICE_BIN") binary (built $(date -r "$SLUICE_BIN" '+%Y-%m-%d %H:%M')), workers = ${SLUICE_WORKERS:-1}"
    [[ ",$TARGETS," == *,sluice-pgo,* ]] && echo "- sluice-pgo: the profile-guided build of scripts/build-release.sh (built $(date -r "$SLUICE_PGO_BIN" '+%Y-%m-%d %H:%M')), same settings"
    echo "- each run: pgbench -n -T $DURATION -j $THREADS, -c $CLIENTS unless noted; $ROUNDS rounds (the summary shows the median), targets interleaved per workload"
    echo "- pool size $POOL_SIZE (transaction mode, md5; both poolers log connections and disconnections, their default), PostgreSQL max_connections=$PG_MAX_CONNECTIONS, fsync off, scale $SCALE"
    [[ $IDLE_TIMEOUT != 0 ]] && echo "- both poolers: client_idle_timeout and idle_transaction_timeout = $IDLE_TIMEOUT s"
    if [[ ${SHARED_SESSION:-0} == 1 ]]; then
        echo "- both poolers run in the benchmark script's session (SHARED_SESSION=1): one autogroup, one CPU share, with pgbench"
    else
        echo "- PostgreSQL, PgBouncer and Sluice each run in a session of their own (autogroup: a CPU share each, like separate services); pgbench runs in the script's"
    fi
    echo "- pooler CPU µs/tx = (utime+stime ticks after − before) × 10⁶ / CLK_TCK($CLK_TCK) / transactions"
    echo "- workloads: select-* = -S -M simple/extended/prepared; tpcb = built-in TPC-B-like; connect-per-tx = -C -S (md5 login per transaction); clients-400 = -c 400 -S"
}
write_report report_header
