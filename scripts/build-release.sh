#!/usr/bin/env bash
# Builds the release binary of Sluice with the profile kept in the repository: the build to ship.
#
#   scripts/build-release.sh        build; prints the binary's path on the last line
#
# pgo/sluice.profdata.gz is an LLVM profile of Sluice running the benchmark's pgbench workloads
# (scripts/build-pgo.sh makes it). With it, LLVM inlines and lays out the code the way the pooler
# runs: the relay's hot path packed together, error paths out of its way. On the benchmark
# machine that is about 20 % fewer instructions per transaction than `cargo build --release`,
# and the CPU per transaction of PgBouncer instead of 3-10 % more (README, Benchmarks).
#
# The profile does not have to match the sources exactly. LLVM uses it for every function whose
# code is unchanged since the profile was made and treats the others as in a plain build, so a
# profile a few commits old loses only part of its gain. Refresh it with scripts/build-pgo.sh
# after changes to the relay, the pool or the login path.
#
# Needs gzip. The profile's format is that of the LLVM in the toolchain pinned by
# rust-toolchain.toml. The build has its own target directory (RUSTFLAGS differ from a plain
# build's, and sharing one would rebuild everything at each switch): profiled/ in
# $CARGO_TARGET_DIR, by default the one scripts/demo.sh and scripts/test.sh use
# (~/.cache/sluice/target, or $SLUICE_CACHE/target).
set -euo pipefail
cd "$(dirname "$0")/.."

profile_gz=pgo/sluice.profdata.gz
[[ -f $profile_gz ]] || { echo "build-release: $profile_gz is missing (scripts/build-pgo.sh makes it)" >&2; exit 1; }
target_dir=${CARGO_TARGET_DIR:-${SLUICE_CACHE:-$HOME/.cache/sluice}/target}/profiled
mkdir -p "$target_dir"
# Every crate's build depends on the profile file (rustc lists it among the inputs), so it is
# replaced only when its content changed: a fresh checkout or a switch of branches with the same
# profile must not rebuild everything.
profile=$target_dir/sluice.profdata
gzip -dc "$profile_gz" >"$profile.new"
if cmp -s "$profile.new" "$profile"; then
    rm "$profile.new"
else
    mv "$profile.new" "$profile"
fi

RUSTFLAGS="-Cprofile-use=$profile" \
    cargo build --release --locked -p sluice --target-dir "$target_dir"
echo "$target_dir/release/sluice"
