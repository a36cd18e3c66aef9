//! Real client drivers and tools through Sluice: psycopg, asyncpg, node-postgres and pgjdbc
//! (programs in `tests/drivers/`), psql, and pgbench in prepared mode.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_tests::harness::drivers::{self, Driver};
use sluice_tests::harness::postgres::pg_bindir;
use sluice_tests::harness::{ConfigBuilder, PgCluster, SluiceHandle};

use crate::util::create_database;

async fn driver_check(driver: Driver) {
    let sluice = SluiceHandle::start(ConfigBuilder::new(PgCluster::shared()).pool_size(5)).await;
    let env = sluice.driver_env("app", "appdb");
    match drivers::run(driver, &env).await {
        Ok(true) => {}
        Ok(false) => eprintln!("{driver:?} skipped (SLUICE_SKIP_DRIVERS)"),
        Err(e) => panic!("{e:#}"),
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn driver_psycopg() {
    driver_check(Driver::Psycopg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn driver_asyncpg() {
    driver_check(Driver::Asyncpg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn driver_node_pg() {
    driver_check(Driver::NodePg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn driver_jdbc() {
    driver_check(Driver::Jdbc).await;
}

/// A PostgreSQL client program from the server's bindir, else from PATH.
fn pg_tool(name: &str) -> PathBuf {
    pg_bindir()
        .map(|d| d.join(name))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `cmd` on a blocking thread with `stdin` fed in, killed by PID after `timeout`.
async fn run(mut cmd: Command, stdin: &str, timeout: Duration) -> Result<Output> {
    use std::io::Write;
    cmd.env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes()).context("write stdin")?;
    }
    let pid = child.id();
    let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(timeout, waiter).await {
        Ok(joined) => Ok(joined.context("join")?.context("wait")?),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            bail!("{cmd:?} did not finish within {timeout:?}")
        }
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_gset_and_prepare_in_one_transaction() {
    let sluice = SluiceHandle::start(ConfigBuilder::new(PgCluster::shared()).pool_size(2)).await;
    let url = sluice.url("app", "appdb");
    let base = |extra: &[&str]| {
        let mut cmd = Command::new(pg_tool("psql"));
        cmd.arg(&url)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(extra);
        cmd
    };

    // \gset and variables, from a script.
    let script = "select 42 as answer \\gset\n\\echo answer=:answer\nselect :answer + 1;\n";
    let out = run(base(&["-f", "-"]), script, Duration::from_secs(60))
        .await
        .expect("psql script");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "psql failed: {stderr}");
    assert_eq!(stdout, "answer=42\n43", "stderr: {stderr}");

    // Several -c commands; PREPARE/EXECUTE inside one transaction spanning them.
    let out = run(
        base(&[
            "-c",
            "begin",
            "-c",
            "prepare psql_p(int) as select $1 * 2",
            "-c",
            "execute psql_p(21)",
            "-c",
            "deallocate psql_p",
            "-c",
            "commit",
            "-c",
            "select count(*) from sluice_fixture",
        ]),
        "",
        Duration::from_secs(60),
    )
    .await
    .expect("psql -c");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "psql failed: {stderr}");
    assert_eq!(stdout, "42\n1000", "stderr: {stderr}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_prepared_select_only() {
    let pg = PgCluster::shared();
    create_database(pg, "drv_pgbench");
    let password = "secret";

    let mut init = Command::new(pg_tool("pgbench"));
    init.args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "app"])
        .arg("-p")
        .arg(pg.port().to_string())
        .arg("drv_pgbench")
        .env("PGPASSWORD", password);
    let out = run(init, "", Duration::from_secs(120))
        .await
        .expect("pgbench -i");
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "pgbench -i failed:\n{stdout}\n{stderr}"
    );

    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .pool_size(5)
            .database("drv_pgbench", "drv_pgbench"),
    )
    .await;
    let mut bench = Command::new(pg_tool("pgbench"));
    bench
        .args(["-M", "prepared", "-S", "-c", "10", "-T", "3"])
        .args(["-h", "127.0.0.1", "-U", "app"])
        .arg("-p")
        .arg(sluice.port().to_string())
        .arg("drv_pgbench")
        .env("PGPASSWORD", password);
    let out = run(bench, "", Duration::from_secs(120))
        .await
        .expect("pgbench run");
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "pgbench exited {}:\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "no failed transactions expected:\n{stdout}\n{stderr}"
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(processed > 0, "pgbench processed transactions:\n{stdout}");
    sluice.shutdown().await;
}
