//! Process plumbing for [`PgCluster`](super::PgCluster): which OS user PostgreSQL runs as,
//! signals by PID, and the watchdog that cleans up if the test process dies.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{bail, Context, Result};

/// The OS identity PostgreSQL runs as.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Starts the process that cleans up after us if we die: it reads `pid N` (a postmaster was
/// started) and `stopped` (it was stopped and reaped) lines from its stdin. At EOF, which comes
/// when this process exits however it exits, it stops a postmaster still recorded (SIGQUIT, then
/// SIGKILL after 30 s) and removes `dir`.
pub(crate) fn spawn_watchdog(dir: &Path) -> Result<(Child, ChildStdin)> {
    const SCRIPT: &str = r#"
pid=
while read -r cmd arg; do
  case "$cmd" in
    pid) pid=$arg ;;
    stopped) pid= ;;
  esac
done
# Alive and not a zombie (an orphan's zombie lingers until PID 1 reaps it).
alive() {
  st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
  [ -n "$st" ] && [ "$st" != Z ]
}
if [ -n "$pid" ]; then
  kill -QUIT "$pid" 2>/dev/null
  n=0
  while alive "$pid" && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done
  alive "$pid" && kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$1"
"#;
    let mut child = Command::new("/bin/sh")
        .args(["-c", SCRIPT, "sluice-pg-watchdog"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Own process group: a Ctrl-C on the test run must not kill it before it cleans up.
        .process_group(0)
        .spawn()
        .context("spawn watchdog")?;
    let stdin = child.stdin.take().context("watchdog stdin")?;
    Ok((child, stdin))
}

/// Sends a signal by PID with kill(1) (keeps this crate free of `unsafe`).
pub(crate) fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Whether this process's effective uid is 0. `/proc/self` is owned by the effective uid.
pub(crate) fn running_as_root() -> Result<bool> {
    Ok(fs::metadata("/proc/self").context("stat /proc/self")?.uid() == 0)
}

/// The uid and gid of the `postgres` OS user (created by Debian's postgresql packages).
pub(crate) fn postgres_os_user() -> Result<RunAs> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .context("run id")?;
        if !out.status.success() {
            bail!("running as root, but there is no `postgres` OS user to run PostgreSQL as");
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("parse id output")
    };
    Ok(RunAs {
        uid: id("-u")?,
        gid: id("-g")?,
    })
}
