#!/usr/bin/env bash
# Installs what the test suite and the demo need, and only what is missing. Idempotent and quiet:
# one line per thing installed. Works as root (CI) or as a user with sudo.
#
#   - Debian: postgresql-15, pgbouncer, libpostgresql-jdbc-java, default-jdk-headless (if no java),
#     python3-venv and npm (if missing)
#   - rustup target wasm32-wasip2 (for plugins/)
#   - Python venv  ${SLUICE_CACHE:-$HOME/.cache/sluice}/py   with psycopg[binary] and asyncpg
#   - Node modules ${SLUICE_CACHE:-$HOME/.cache/sluice}/node with pg
set -euo pipefail

cd "$(dirname "$0")/.."   # so rustup sees rust-toolchain.toml
cache=${SLUICE_CACHE:-$HOME/.cache/sluice}
mkdir -p "$cache"

say() { printf 'setup: %s\n' "$*"; }
# Runs a command silently; shows its output only if it fails.
quietly() {
    local out
    if ! out=$("$@" 2>&1); then
        printf 'setup: failed: %s\n%s\n' "$*" "$out" >&2
        return 1
    fi
}

if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi

# --- Debian packages --------------------------------------------------------------------------
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
want=(postgresql-15 pgbouncer libpostgresql-jdbc-java)
command -v java >/dev/null 2>&1 || want+=(default-jdk-headless)
# The Python and Node test clients install into venv/node_modules caches: they need these.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || want+=(python3-venv)
command -v npm >/dev/null 2>&1 || want+=(npm)
missing=()
for p in "${want[@]}"; do have_pkg "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    quietly "${sudo[@]}" apt-get update -qq
    quietly "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    for p in "${missing[@]}"; do say "installed $p"; done
fi

# --- Rust target for the policy plugins -------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        quietly rustup target add wasm32-wasip2
        say "installed rust target wasm32-wasip2"
    fi
fi

# --- Python drivers ---------------------------------------------------------------------------
py=$cache/py/bin/python
if [ ! -x "$py" ]; then
    quietly python3 -m venv "$cache/py"
    say "created venv $cache/py"
fi
if ! "$py" -c 'import psycopg, asyncpg; psycopg.pq.version()' >/dev/null 2>&1; then
    quietly "$py" -m pip install -q --disable-pip-version-check 'psycopg[binary]>=3.1' 'asyncpg>=0.29'
    say "installed psycopg[binary] and asyncpg into $cache/py"
fi

# --- node-postgres ----------------------------------------------------------------------------
if [ ! -f "$cache/node/node_modules/pg/package.json" ]; then
    mkdir -p "$cache/node"
    quietly npm install --prefix "$cache/node" --no-audit --no-fund pg@8
    say "installed node-postgres into $cache/node"
fi
