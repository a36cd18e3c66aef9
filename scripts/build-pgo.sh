#!/usr/bin/env bash
# Trains Sluice and refreshes the profile kept in the repository (pgo/sluice.profdata.gz), then
# builds the release binary with it (scripts/build-release.sh).
#
#   scripts/build-pgo.sh            train, refresh, build; prints the binary's path on the last line
#
# 1. Builds Sluice with LLVM's profiling instrumentation.
# 2. Trains it: a throwaway PostgreSQL (benches/e2e/lib.sh) with the benchmark's default
#    pgbench workloads through it (select-only simple, extended and prepared, TPC-B, a new
#    connection per transaction, 400 clients on a pool of 20); the profile is written when
#    Sluice shuts down.
# 3. Merges the profile with llvm-profdata (rustup's llvm-tools component, added if missing),
#    keeping only the functions that ran (a sparse profile: 1.5 MB instead of 28), and writes
#    it to pgo/sluice.profdata.gz. Commit it with the change it was made for.
# 4. Builds the release binary with it (scripts/build-release.sh): LLVM then lays out and
#    inlines the code the way the pooler actually runs, hot paths together and error paths out
#    of the way.
#
# The instrumented build has its own target directory under PGO_DIR (default
# ~/.cache/sluice/pgo); the first run compiles everything twice (10-20 minutes per build on two
# cores with wasmtime). Env: PGO_DIR, TRAIN_SECONDS (per workload, default 8), and what
# benches/e2e/lib.sh reads (PG_BIN, SCALE, ...). Run as root, like the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

PGO_DIR=${PGO_DIR:-$HOME/.cache/sluice/pgo}
TRAIN_SECONDS=${TRAIN_SECONDS:-8}
profiles=$PGO_DIR/profiles
merged=$PGO_DIR/sluice.profdata

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [[ ! -x $profdata ]]; then
    say "adding rustup's llvm-tools component (llvm-profdata)"
    rustup component add llvm-tools >/dev/null
fi
[[ -x $profdata ]] || { echo "build-pgo: $profdata not found" >&2; exit 1; }

say "1/4 instrumented build"
rm -rf "$profiles"
mkdir -p "$profiles"
RUSTFLAGS="-Cprofile-generate=$profiles" \
    cargo build --release --locked -p sluice --target-dir "$PGO_DIR/target-gen"

say "2/4 training run"
# In a subshell: lib.sh's EXIT trap stops what it started when the training ends.
(
    SLUICE_BIN=$PGO_DIR/target-gen/release/sluice
    source benches/e2e/lib.sh
    check_tools
    install_traps
    make_workdir
    start_postgres
    pgbench_init
    start_sluice train
    # The benchmark's default workloads (benches/e2e/lib.sh).
    IFS=, read -r -a workloads <<<"$DEFAULT_WORKLOADS"
    for w in "${workloads[@]}"; do
        clients=${WL[$w]%%|*} opts=${WL[$w]#*|}
        log "training: $w (pgbench -c $clients $opts)"
        # shellcheck disable=SC2086  # opts are pgbench options, split on purpose
        PGPASSWORD=$APP_PASSWORD "$PGBENCH" -n -c "$clients" $opts -j 2 -T "$TRAIN_SECONDS" \
            -h 127.0.0.1 -p "$SLUICE_PORT" -U "$APP_USER" "$APP_DB" >/dev/null
    done
    # A graceful stop: the profile is written as the process exits.
    stop_sluice
)
compgen -G "$profiles/*.profraw" >/dev/null || { echo "build-pgo: no profile was written" >&2; exit 1; }

say "3/4 merging the profile into pgo/sluice.profdata.gz"
"$profdata" merge --sparse -o "$merged" "$profiles"
mkdir -p pgo
# -n: no name or time in the header, so the same profile gives the same file.
gzip -9nc "$merged" >pgo/sluice.profdata.gz

say "4/4 optimized build"
exec scripts/build-release.sh
