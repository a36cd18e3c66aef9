#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): setup, wasm plugins, then every cargo test.
#
# Environment:
#   SLUICE_CACHE      where setup.sh puts the Python venv and node modules (~/.cache/sluice)
#   CARGO_TARGET_DIR  cargo's target dir (default $SLUICE_CACHE/target)
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -- smoke`).
#
# Time budget: the whole suite should stay under 20 minutes on 2 cores. Tests build in the debug
# profile; if that gets slow, `[profile.test] opt-level = 1` in Cargo.toml is the lever (the
# lead's call), not `--release`.
set -euo pipefail
cd "$(dirname "$0")/.."

export SLUICE_CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}

bash scripts/setup.sh

# The driver checks in tests/drivers/ find their runtimes through these.
export SLUICE_PY=$SLUICE_CACHE/py/bin/python
export SLUICE_NODE_PATH=$SLUICE_CACHE/node/node_modules
export SLUICE_JDBC_JAR=${SLUICE_JDBC_JAR:-/usr/share/java/postgresql.jar}

# plugins/ is its own workspace, built for wasm32 into its own cache folder; the tests load the
# .wasm files from there (sluice_policy::testing::plugin_path).
export SLUICE_PLUGINS_TARGET_DIR=${SLUICE_PLUGINS_TARGET_DIR:-$SLUICE_CACHE/plugins-target}
echo "test: building plugins (wasm32-wasip2)"
(cd plugins && CARGO_TARGET_DIR=$SLUICE_PLUGINS_TARGET_DIR cargo build --release --target wasm32-wasip2 --quiet)

echo "test: cargo test --workspace"
cargo test --workspace "$@"
