//! A throwaway PostgreSQL cluster for tests.
//!
//! [`PgCluster::start`] runs `initdb` in a temporary directory, writes a test configuration
//! (loopback only, a free port, no fsync), starts `postgres` and waits until a login succeeds.
//! It then creates the roles, databases and fixture table described in [`super::roles`].
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI), `initdb` and `postgres` run
//! as the `postgres` OS user (the directory is chowned to it); otherwise as the current user.
//!
//! Cleanup never depends on `Drop` alone. Each cluster has a small watchdog process that holds the
//! read end of a pipe; when the test process exits for any reason (including a panic in a static
//! initialiser or SIGKILL), the pipe closes and the watchdog stops the postmaster by PID and
//! removes the directory. [`PgCluster::shared`] relies on this, since statics are never dropped.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::net::{free_port, wait_until};
use super::process::{postgres_os_user, running_as_root, signal, spawn_watchdog, RunAs};
use super::roles::{self, Auth, SUPERUSER};

/// How long the server may take to accept its first login.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to exit after SIGQUIT.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting when the chosen port was taken in the meantime.
const PORT_ATTEMPTS: u32 = 5;

/// Knobs for [`PgCluster::start`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `max_connections` (default 100).
    pub max_connections: u32,
    /// Extra `postgresql.conf` lines, appended last (so they win).
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 100,
            extra_conf: Vec::new(),
        }
    }
}

/// A running PostgreSQL cluster. Dropping it stops the server and removes its directory.
#[derive(Debug)]
pub struct PgCluster {
    /// Holds the directory; removed on drop (and by the watchdog if we never drop).
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
    /// `None` when PostgreSQL runs as the current user.
    run_as: Option<RunAs>,
    /// The postmaster itself (spawned directly, so this PID is the postmaster's).
    postmaster: Option<Child>,
    /// Write end of the watchdog's stdin; see the module docs.
    watchdog: Option<(Child, ChildStdin)>,
}

impl PgCluster {
    /// The cluster shared by every test in this binary, started on first use.
    ///
    /// It allows 200 connections so that tests can run in parallel, each with its own pools.
    /// Panics (failing the test) with PostgreSQL's log if the cluster cannot start.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let opts = PgOptions {
                max_connections: 200,
                ..PgOptions::default()
            };
            match PgCluster::start(opts) {
                Ok(c) => c,
                Err(e) => panic!("could not start the shared PostgreSQL cluster: {e:#}"),
            }
        })
    }

    /// Creates, configures and starts a new cluster, then creates the test roles and databases.
    pub fn start(opts: PgOptions) -> Result<PgCluster> {
        let bin = pg_bindir()?;
        let run_as = if running_as_root()? {
            Some(postgres_os_user()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir()
            .context("create temporary directory")?;
        if let Some(u) = run_as {
            chown(dir.path(), Some(u.uid), Some(u.gid)).context("chown the cluster directory")?;
        }
        let watchdog = Some(spawn_watchdog(dir.path())?);
        let mut cluster = PgCluster {
            dir,
            port: 0,
            bin,
            run_as,
            postmaster: None,
            watchdog,
        };
        cluster.initdb()?;

        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            cluster.write_conf(&opts)?;
            match cluster.spawn_and_wait() {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) if cluster.log().contains("could not bind") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = last_err {
            return Err(e.context("no free port after several attempts"));
        }
        cluster.bootstrap()?;
        Ok(cluster)
    }

    /// Always `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The directory holding the data directory, the Unix socket and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `unix_socket_directories` of the server.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (stderr of the postmaster).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far (empty if unreadable).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The postmaster's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// A libpq connection string straight to PostgreSQL (bypassing Sluice).
    pub fn conn_string(&self, user: &str, db: &str) -> String {
        let mut s = format!(
            "host={} port={} user={user} dbname={db}",
            self.host(),
            self.port
        );
        if let Some(p) = roles::password_for(user) {
            s.push_str(&format!(" password={p}"));
        }
        s
    }

    /// Runs SQL as the superuser in database `postgres`; returns unaligned, tuples-only output.
    /// Panics with psql's stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// [`psql`](Self::psql) in database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        match self.try_psql(db, sql) {
            Ok(out) => out,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Runs SQL (fed on stdin, so several statements and CREATE DATABASE work) as the superuser,
    /// stopping at the first error. Output is unaligned and tuples-only, trimmed.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String> {
        let mut child = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER.user, "-d", db, "-f", "-"])
            .env("PGPASSWORD", SUPERUSER.password.unwrap_or_default())
            .env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGOPTIONS")
            .env_remove("PGSERVICE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn psql")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .context("write SQL to psql")?;
        }
        let out = child.wait_with_output().context("wait for psql")?;
        if !out.status.success() {
            bail!(
                "psql -d {db} failed ({}): {}\nSQL: {sql}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The stored password verifier of `role` (`SCRAM-SHA-256$...` or `md5...`), read from
    /// `pg_authid`. Give it to Sluice to test SCRAM pass-through without the clear password.
    pub fn scram_secret(&self, role: &str) -> String {
        let secret = self.psql(&format!(
            "select rolpassword from pg_authid where rolname = {}",
            quote_literal(role)
        ));
        assert!(!secret.is_empty(), "role {role} has no stored password");
        secret
    }

    /// PIDs of the server backends matching a SQL condition on `pg_stat_activity`,
    /// e.g. `"usename = 'app' and datname = 'appdb'"` or `"application_name = 'x'"`.
    pub fn backend_pids(&self, condition: &str) -> Vec<i32> {
        let out = self.psql(&format!(
            "select pid from pg_stat_activity where backend_type = 'client backend' \
             and pid <> pg_backend_pid() and ({condition}) order by pid"
        ));
        out.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Terminates one backend (`pg_terminate_backend`, i.e. SIGTERM to that process only; the
    /// rest of the cluster keeps running) and waits until it has gone from `pg_stat_activity`.
    pub fn kill_backend(&self, pid: i32) {
        self.psql(&format!("select pg_terminate_backend({pid})"));
        let gone = wait_until("backend to exit", Duration::from_secs(10), || {
            let n = self.psql(&format!(
                "select count(*) from pg_stat_activity where pid = {pid}"
            ));
            Ok((n == "0").then_some(()))
        });
        if let Err(e) = gone {
            panic!("{e:#}");
        }
    }

    /// Connects straight to PostgreSQL with tokio-postgres (no Sluice), using the role's known
    /// password, and spawns the connection task on the current runtime.
    pub async fn connect_direct(&self, user: &str, db: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_string(user, db), tokio_postgres::NoTls)
                .await
                .with_context(|| format!("connect directly to PostgreSQL as {user} to {db}"))?;
        tokio::spawn(async move {
            // The error surfaces on the client's next call; nothing to do with it here.
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Stops the server (immediate shutdown: SIGQUIT to the postmaster PID) and waits for it.
    /// Idempotent. The directory is removed when the cluster is dropped.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.postmaster.take() else {
            return Ok(());
        };
        let result = if child.try_wait().context("poll postmaster")?.is_none() {
            signal(child.id(), "QUIT")?;
            wait_until("postmaster to exit", STOP_TIMEOUT, || {
                Ok(child.try_wait().context("poll postmaster")?.map(|_| ()))
            })
            .inspect_err(|_| {
                // Last resort: never leave a server behind.
                let _ = child.kill();
                let _ = child.wait();
            })
        } else {
            Ok(())
        };
        // The PID is reaped now and may be reused: the watchdog must forget it.
        self.tell_watchdog("stopped");
        result
    }

    fn tell_watchdog(&mut self, line: &str) {
        if let Some((_, stdin)) = self.watchdog.as_mut() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        // The caller's working directory may not be readable by the postgres user.
        cmd.current_dir(self.dir.path());
        cmd.env_remove("PGDATA").env("LC_ALL", "C");
        if let Some(u) = self.run_as {
            // std also drops root's supplementary groups when switching uid as root.
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd
    }

    fn initdb(&self) -> Result<()> {
        let pwfile = self.dir.path().join("pwfile");
        fs::write(&pwfile, SUPERUSER.password.unwrap_or_default()).context("write pwfile")?;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).context("chmod pwfile")?;
        if let Some(u) = self.run_as {
            chown(&pwfile, Some(u.uid), Some(u.gid)).context("chown pwfile")?;
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                SUPERUSER.user,
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .args(["--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .context("run initdb")?;
        let _ = fs::remove_file(&pwfile);
        if !out.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn write_conf(&self, opts: &PgOptions) -> Result<()> {
        let data = self.data_dir();
        let mut conf = format!(
            "\n# Written by the sluice-tests harness.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             max_connections = {max}\n\
             superuser_reserved_connections = 3\n\
             shared_buffers = 32MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             password_encryption = 'scram-sha-256'\n\
             logging_collector = off\n\
             log_min_messages = warning\n\
             log_line_prefix = '%m [%p] %u@%d '\n",
            port = self.port,
            sock = self.socket_dir().display(),
            max = opts.max_connections,
        );
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        // initdb's own file plus ours; later settings win, and a retry rewrites ours.
        let base_path = self.dir.path().join("postgresql.conf.initdb");
        if !base_path.exists() {
            fs::copy(data.join("postgresql.conf"), &base_path).context("save postgresql.conf")?;
        }
        let base = fs::read_to_string(&base_path).context("read postgresql.conf")?;
        fs::write(data.join("postgresql.conf"), base + &conf).context("write postgresql.conf")?;

        // First match wins. The harness's superuser and most roles use SCRAM.
        let hba = format!(
            "# Written by the sluice-tests harness.\n\
             local all all trust\n\
             host all {trusted} 127.0.0.1/32 trust\n\
             host all {md5} 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
            trusted = roles::TRUSTED.user,
            md5 = roles::MD5USER.user,
        );
        fs::write(data.join("pg_hba.conf"), hba).context("write pg_hba.conf")?;
        if let Some(u) = self.run_as {
            for f in ["postgresql.conf", "pg_hba.conf"] {
                chown(data.join(f), Some(u.uid), Some(u.gid)).context("chown config")?;
            }
        }
        Ok(())
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let log = fs::File::create(self.log_path()).context("create postgres.log")?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log)
            // Its own process group: Ctrl-C on the test run reaches the watchdog's pipe, not the
            // server directly, so shutdown happens in one place.
            .process_group(0)
            .spawn()
            .context("spawn postgres")?;
        let pid = child.id();
        self.postmaster = Some(child);
        self.tell_watchdog(&format!("pid {pid}"));

        let ready = wait_until("PostgreSQL to accept a login", START_TIMEOUT, || {
            if let Some(child) = self.postmaster.as_mut() {
                if let Some(status) = child.try_wait().context("poll postmaster")? {
                    bail!("postgres exited with {status} before accepting connections");
                }
            }
            Ok(self.try_psql("postgres", "select 1").ok().map(|_| ()))
        });
        if let Err(e) = ready {
            let log = self.log();
            let _ = self.stop();
            return Err(anyhow!("{e:#}\n--- postgres.log ---\n{log}"));
        }
        Ok(())
    }

    fn bootstrap(&self) -> Result<()> {
        let mut sql = String::new();
        for login in roles::ALL {
            // Each role's verifier is computed by the server, in the format its auth method needs.
            let enc = if login.auth == Auth::Md5 {
                "md5"
            } else {
                "scram-sha-256"
            };
            sql.push_str(&format!("set password_encryption = '{enc}';\n"));
            match login.password {
                Some(pw) => sql.push_str(&format!(
                    "create role {} login password {};\n",
                    login.user,
                    quote_literal(pw)
                )),
                None => sql.push_str(&format!("create role {} login;\n", login.user)),
            }
        }
        sql.push_str(&format!(
            "create database appdb owner {};\n",
            roles::APP.user
        ));
        sql.push_str("create database otherdb;\n");
        self.try_psql("postgres", &sql)
            .context("create roles and databases")?;

        let fixture = format!(
            "create table {t} (id int primary key, label text not null);\n\
             insert into {t} select i, 'item-' || i from generate_series(1, {n}) i;\n\
             alter table {t} owner to {app};\n\
             grant select on {t} to public;\n\
             grant create on schema public to public;\n",
            t = roles::FIXTURE_TABLE,
            n = roles::FIXTURE_ROWS,
            app = roles::APP.user,
        );
        self.try_psql("appdb", &fixture)
            .context("create the fixture table")?;
        self.try_psql("otherdb", "grant create on schema public to public;")?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("sluice-tests: stopping PostgreSQL: {e:#}");
        }
        // EOF: the watchdog removes the directory (TempDir's drop does too; whichever is first).
        if let Some((mut wd, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = wd.wait();
        }
    }
}

/// The directory holding `initdb`, `postgres`, `psql`: `$SLUICE_PG_BIN`, then PostgreSQL 15's
/// Debian location, then `pg_config --bindir`.
pub fn pg_bindir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SLUICE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").exists() {
        return Ok(debian);
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    if let Ok(out) = out {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    bail!("PostgreSQL server binaries not found: install postgresql-15 (scripts/setup.sh) or set SLUICE_PG_BIN")
}

/// A SQL string literal.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
