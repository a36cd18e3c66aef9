//! Runs the client-driver check programs in `tests/drivers/` against a Sluice instance.
//!
//! Each program reads `SLUICE_HOST`, `SLUICE_PORT`, `SLUICE_USER`, `SLUICE_PASSWORD` and
//! `SLUICE_DB` ([`super::SluiceHandle::driver_env`]) and exits non-zero with a message on any
//! mismatch. Runtimes are found as `scripts/setup.sh` installs them:
//! - Python: `$SLUICE_PY`, else `${SLUICE_CACHE:-$HOME/.cache/sluice}/py/bin/python`;
//! - Node modules: `$SLUICE_NODE_PATH`, else `$SLUICE_CACHE/node/node_modules`;
//! - pgjdbc: `$SLUICE_JDBC_JAR`, else `/usr/share/java/postgresql.jar`, run by `java`.
//!
//! A missing runtime is an error (CI has them all). Set `SLUICE_SKIP_DRIVERS=1` to turn it into a
//! skip locally: [`run`] then returns `Ok(false)`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// How long one driver program may run.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(300);

/// A driver check program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `tests/drivers/psycopg_check.py` (psycopg 3).
    Psycopg,
    /// `tests/drivers/asyncpg_check.py`.
    Asyncpg,
    /// `tests/drivers/node_pg_check.js` (node-postgres).
    NodePg,
    /// `tests/drivers/JdbcCheck.java` (pgjdbc).
    Jdbc,
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SLUICE_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/sluice")
}

/// `tests/drivers/`.
pub fn drivers_dir() -> PathBuf {
    super::sluice::crate_dir().join("drivers")
}

fn env_path(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

impl Driver {
    /// The command that runs this check, or why it can't run here.
    pub fn command(self) -> Result<Command> {
        let dir = drivers_dir();
        let need = |p: &PathBuf, what: &str| -> Result<()> {
            if p.exists() {
                Ok(())
            } else {
                Err(anyhow!(
                    "{what} not found at {}: run scripts/setup.sh",
                    p.display()
                ))
            }
        };
        match self {
            Driver::Psycopg | Driver::Asyncpg => {
                let py = env_path("SLUICE_PY", cache_dir().join("py/bin/python"));
                need(&py, "Python venv")?;
                let script = if self == Driver::Psycopg {
                    "psycopg_check.py"
                } else {
                    "asyncpg_check.py"
                };
                let mut cmd = Command::new(py);
                cmd.arg(dir.join(script));
                Ok(cmd)
            }
            Driver::NodePg => {
                let modules = env_path("SLUICE_NODE_PATH", cache_dir().join("node/node_modules"));
                need(&modules.join("pg"), "node-postgres")?;
                let mut cmd = Command::new("node");
                cmd.arg(dir.join("node_pg_check.js"))
                    .env("NODE_PATH", modules);
                Ok(cmd)
            }
            Driver::Jdbc => {
                let jar = env_path(
                    "SLUICE_JDBC_JAR",
                    PathBuf::from("/usr/share/java/postgresql.jar"),
                );
                need(&jar, "pgjdbc jar (libpostgresql-jdbc-java)")?;
                let mut cmd = Command::new("java");
                cmd.arg("-cp").arg(jar).arg(dir.join("JdbcCheck.java"));
                Ok(cmd)
            }
        }
    }
}

/// Runs `driver` with `env` (from `SluiceHandle::driver_env`), bounded by 5 minutes.
/// `Ok(true)`: it passed. `Ok(false)`: skipped (runtime missing and `SLUICE_SKIP_DRIVERS=1`).
/// `Err`: it failed; the error holds its exit status, stdout and stderr.
///
/// The program runs on a blocking thread, so an in-process Sluice on the test's runtime keeps
/// serving it even on a current-thread runtime.
pub async fn run(driver: Driver, env: &[(String, String)]) -> Result<bool> {
    let mut cmd = match driver.command() {
        Ok(c) => c,
        Err(e) if std::env::var_os("SLUICE_SKIP_DRIVERS").is_some() => {
            eprintln!("skipping {driver:?}: {e:#}");
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn {driver:?}: {cmd:?}"))?;
    let pid = child.id();
    let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(DRIVER_TIMEOUT, waiter).await {
        Ok(joined) => joined
            .context("join driver waiter")?
            .context("wait for driver")?,
        Err(_) => {
            // Stop it by PID; the blocking waiter then reaps it.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            bail!("{driver:?} did not finish within {DRIVER_TIMEOUT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{driver:?} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            out.status
        );
    }
    eprintln!("{driver:?}: {}", stdout.trim());
    Ok(true)
}
