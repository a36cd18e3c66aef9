//! Test support: builds the plugins workspace once and locates its components. Enabled by the
//! `testing` feature, so the proxy's integration tests can load real plugins too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sluice_config::{PluginConfig, PolicyConfig};

/// The `plugins/` workspace of this repository: found above the running test's package
/// directory (cargo sets it at run time), since the compile-time path is stale when a shared
/// target dir holds a binary built from another checkout.
pub fn plugins_dir() -> PathBuf {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    runtime
        .iter()
        .flat_map(|d| d.ancestors())
        .map(|d| d.join("plugins"))
        .find(|p| p.join("Cargo.toml").is_file())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins"))
}

/// Where the plugins are built: `$SLUICE_PLUGINS_TARGET_DIR`, else
/// `$HOME/.cache/sluice/plugins-target`.
pub fn plugins_target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SLUICE_PLUGINS_TARGET_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/sluice/plugins-target")
}

/// The test-only plugins of this crate (`crates/policy/tests/wasm/`, a workspace of its own),
/// found like [`plugins_dir`].
pub fn test_plugins_dir() -> PathBuf {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    runtime
        .iter()
        .flat_map(|d| d.ancestors())
        .map(|d| d.join("crates/policy/tests/wasm"))
        .find(|p| p.join("Cargo.toml").is_file())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wasm"))
}

/// Builds every plugin (`cargo build --release --target wasm32-wasip2` in `plugins/`) once per
/// process; cargo's own lock on the target directory serialises concurrent test binaries.
/// Panics with cargo's output if the build fails.
pub fn build_plugins() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_workspace(&plugins_dir()))
}

/// Builds the test-only plugins of `crates/policy/tests/wasm/` once per process, into the same
/// target directory as [`build_plugins`]. Panics with cargo's output if the build fails.
pub fn build_test_plugins() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_workspace(&test_plugins_dir()))
}

/// `cargo build --release --target wasm32-wasip2` in `dir`; returns the output directory.
fn build_workspace(dir: &Path) -> PathBuf {
    let target = plugins_target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(dir)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", &target)
        // Flags meant for the host (coverage, sanitizers) break the wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build the plugins: {e}"));
    assert!(
        out.status.success(),
        "building plugins failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("wasm32-wasip2/release")
}

/// The built component of plugin `name` (a plugins-workspace package name such as "priority",
/// "client-limits" or "spin"), building the plugins first if needed.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = build_plugins().join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "no plugin component at {}", path.display());
    path
}

/// The built component of a test-only plugin of this crate (`crates/policy/tests/wasm/NAME`,
/// such as "probe"), building them first if needed.
pub fn test_plugin_path(name: &str) -> PathBuf {
    let path = build_test_plugins().join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.exists(),
        "no test plugin component at {}",
        path.display()
    );
    path
}

/// A `[policy]` section for tests running `plugins`. The deadline is generous: tests run in
/// parallel on small machines with a debug build of wasmtime, and the epoch deadline is
/// wall-clock time, so a descheduled thread must not time out. The breaker opens after 5
/// failures.
pub fn test_policy_config(plugins: Vec<PluginConfig>) -> PolicyConfig {
    PolicyConfig {
        deadline: Duration::from_millis(200),
        memory_limit: 16 << 20,
        watch: false,
        watch_interval: Duration::from_millis(50),
        breaker_failures: 5,
        breaker_window: Duration::from_secs(10),
        breaker_cooldown: Duration::from_secs(30),
        pressure_interval: Duration::from_millis(100),
        max_query_len: 1024,
        plugins,
    }
}
