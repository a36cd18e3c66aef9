#!/usr/bin/env bash
# Priority under storm: 300 scraper clients with ~50 ms transactions and 50 web clients with short
# reads, sharing a 20-connection pool in front of a PostgreSQL with max_connections=100.
#
# Setups, one after the other in one invocation (same PostgreSQL, a fresh pooler for each):
#   baseline              web alone, through Sluice without policy ("web p99 with no scrapers")
#   pgbouncer             PgBouncer, transaction mode (FIFO)
#   sluice-fifo           Sluice without policy (FIFO)
#   sluice-priority       Sluice + priority plugin (web=100, batch=0)
#   sluice-priority-shed  Sluice + priority + shed plugins
#   baseline-pgbouncer    (optional) web alone through PgBouncer: a baseline when Sluice is absent
# Scrapers (PGAPPNAME=scraper, sql/storm-scraper.sql) start LEAD seconds before the web clients
# (PGAPPNAME=web, sql/storm-web.sql) and stop LEAD seconds after them, so the whole web run is
# under storm. Both are pgbench with --log: latency percentiles come from the per-transaction logs.
#
# Usage: benches/e2e/storm.sh [-T SECONDS] [--setups LIST]
#   -T SECONDS      web run duration (default 30; env DURATION)
#   --setups LIST   comma list (default baseline,pgbouncer,sluice-fifo,sluice-priority,sluice-priority-shed)
# Env: SCRAPERS (300), WEB (50), LEAD (3), POOL_SIZE (20), SCALE (10), SLUICE_BIN, PLUGIN_DIR
#      (default ${CARGO_TARGET_DIR:-$HOME/.cache/sluice/plugins-target}/wasm32-wasip2/release — the
#      plugins workspace's target, see benches/README.md), SHED_TOML (a file with the shed plugin's
#      [[policy.plugins]] section, replacing the built-in guess), RESULTS_DIR, KEEP_WORK=1.
# Output: benches/results/storm-<date>.md and .csv, storm-<date>-buckets.csv, storm-<date>.svg and
# a copy as benches/results/storm.svg.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-30}
SCRAPERS=${SCRAPERS:-300}
WEB=${WEB:-50}
LEAD=${LEAD:-3}
SETUPS=${SETUPS:-baseline,pgbouncer,sluice-fifo,sluice-priority,sluice-priority-shed}
PLUGIN_DIR=${PLUGIN_DIR:-$HOME/.cache/sluice/plugins-target/wasm32-wasip2/release}

while [[ $# -gt 0 ]]; do
    case $1 in
        -T) DURATION=$2; shift 2 ;;
        --setups) SETUPS=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done
IFS=, read -r -a setups <<<"$SETUPS"

# Check everything a requested setup needs before starting anything.
check_tools
for s in "${setups[@]}"; do
    case $s in
        baseline|sluice-fifo) check_sluice ;;
        pgbouncer|baseline-pgbouncer) check_pgbouncer ;;
        sluice-priority|sluice-priority-shed)
            check_sluice
            [[ -f $PLUGIN_DIR/priority.wasm ]] || die "priority plugin not found: $PLUGIN_DIR/priority.wasm
       build it with:  cd plugins && CARGO_TARGET_DIR=\$HOME/.cache/sluice/plugins-target cargo build --release --target wasm32-wasip2
       (or set PLUGIN_DIR, or leave the plugin setups out with --setups)"
            if [[ $s == sluice-priority-shed && -z ${SHED_TOML:-} && ! -f $PLUGIN_DIR/shed.wasm ]]; then
                die "shed plugin not found: $PLUGIN_DIR/shed.wasm (build the plugins workspace, see above)"
            fi ;;
        *) die "unknown setup '$s'" ;;
    esac
done

install_traps
make_workdir
mkdir -p "$RESULTS_DIR"
stamp=$(date +%Y%m%d-%H%M%S)
PREFIX=$RESULTS_DIR/storm-$stamp

# Policy sections appended to the common Sluice config.
cat >"$WORK/priority.toml" <<EOF
[classes.web]
priority = 100

[classes.batch]
priority = 0

[[policy.plugins]]
name = "priority"
path = "$PLUGIN_DIR/priority.wasm"
[policy.plugins.config]
web = "web"          # application_name -> class
batch = "scraper"
# While the pool is saturated, batch holds at most 4 of its 20 connections: a freed connection
# goes to batch only when no web client waits, and batch transactions are long (~50 ms), so
# without a cap they pile up on connections between bursts of web traffic.
pressure_max_active.batch = 4
EOF
cp "$WORK/priority.toml" "$WORK/priority-shed.toml"
if [[ -n ${SHED_TOML:-} ]]; then
    cat "$SHED_TOML" >>"$WORK/priority-shed.toml"
else
    # Shed batch waiters that have queued too long, keep serving web. The settings are the shed
    # plugin's own (see plugins/shed); override the whole section with SHED_TOML=FILE.
    cat >>"$WORK/priority-shed.toml" <<EOF

[[policy.plugins]]
name = "shed"
path = "$PLUGIN_DIR/shed.wasm"
[policy.plugins.config]
batch_classes = "batch"
saturation = 1.0        # every connection busy...
min_waiting = 200       # ...and a long queue: refuse new batch transactions at once
[policy.plugins.config.classes.batch]
oldest_wait_ms = 1000   # batch waiters queued over 1 s...
max_wait_ms = 2000      # ...are shed after 2 s
EOF
fi

start_postgres
pgbench_init

# storm_run SETUP PORT WITH_SCRAPERS
storm_run() {
    local setup=$1 port=$2 with_scrapers=$3
    local dir=$WORK/storm/$setup sp="" rc=0
    mkdir -p "$dir"
    export PGPASSWORD=$APP_PASSWORD
    local common=(-n -h 127.0.0.1 -p "$port" -U "$APP_USER" -D "scale=$SCALE")
    if [[ $with_scrapers == 1 ]]; then
        log "$setup: $SCRAPERS scrapers for $((DURATION + 2 * LEAD))s, web joins after ${LEAD}s"
        PGAPPNAME=scraper timeout -k 10 $((DURATION + 2 * LEAD + 120)) "$PGBENCH" "${common[@]}" \
            -c "$SCRAPERS" -j 2 -T $((DURATION + 2 * LEAD)) -f "$E2E_DIR/sql/storm-scraper.sql" \
            --log --log-prefix="$dir/scraper" "$APP_DB" >"$dir/scraper.out" 2>"$dir/scraper.err" &
        sp=$!
        EXTRA_PIDS+=("$sp")
        sleep "$LEAD"
        kill -0 "$sp" 2>/dev/null || log "$setup: scraper pgbench already exited (see $dir/scraper.err)"
    else
        log "$setup: web alone for ${DURATION}s"
    fi
    PGAPPNAME=web timeout -k 10 $((DURATION + 120)) "$PGBENCH" "${common[@]}" \
        -c "$WEB" -j 1 -T "$DURATION" -f "$E2E_DIR/sql/storm-web.sql" \
        --log --log-prefix="$dir/web" "$APP_DB" >"$dir/web.out" 2>"$dir/web.err" || rc=$?
    [[ $rc == 0 ]] || log "$setup: web pgbench exited with $rc (see $dir/web.err)"
    if [[ -n $sp ]]; then
        rc=0
        wait "$sp" || rc=$?
        [[ $rc == 0 ]] || log "$setup: scraper pgbench exited with $rc"
        EXTRA_PIDS=()
    fi
    unset PGPASSWORD
    ARGS+=("$setup=$dir")
}

ARGS=()
for s in "${setups[@]}"; do
    case $s in
        baseline) start_sluice baseline; storm_run "$s" "$SLUICE_PORT" 0; stop_sluice ;;
        baseline-pgbouncer) start_pgbouncer; storm_run "$s" "$PGB_PORT" 0; stop_pgbouncer ;;
        pgbouncer) start_pgbouncer; storm_run "$s" "$PGB_PORT" 1; stop_pgbouncer ;;
        sluice-fifo) start_sluice fifo; storm_run "$s" "$SLUICE_PORT" 1; stop_sluice ;;
        sluice-priority) start_sluice priority "$WORK/priority.toml"; storm_run "$s" "$SLUICE_PORT" 1; stop_sluice ;;
        sluice-priority-shed) start_sluice priority-shed "$WORK/priority-shed.toml"; storm_run "$s" "$SLUICE_PORT" 1; stop_sluice ;;
    esac
done

python3 "$E2E_DIR/storm_analyze.py" --prefix "$PREFIX" --repo "$REPO_DIR" \
    --header "git $(git_rev); $(nproc) CPUs, $(cpu_model); $("$PG_BIN/postgres" --version); web -T $DURATION s, $WEB web + $SCRAPERS scraper clients, pool $POOL_SIZE, PostgreSQL max_connections=$PG_MAX_CONNECTIONS" \
    "${ARGS[@]}" >"$PREFIX.md"
cp "$PREFIX.svg" "$RESULTS_DIR/storm.svg"
cat "$PREFIX.md"
log "written $PREFIX.md, $PREFIX.csv, $PREFIX-buckets.csv, $PREFIX.svg (copied to $RESULTS_DIR/storm.svg)"
