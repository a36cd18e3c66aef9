//! Helpers for the operational tests (policy, scheduler, admin console, metrics, reload,
//! shutdown): the admin console as a client, a Sluice started from a config *file* (so that the
//! admin command `RELOAD` has something to re-read), a Prometheus scrape, a sampler of
//! `pg_stat_activity`, and clients with an `application_name` or a NOTICE stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sluice_config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

use super::postgres::PgCluster;
use super::sluice::{toml_str, SluiceHandle};

/// Bound on one scrape of `/metrics`.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a [`ActivitySampler`] runs, whatever happens to the test.
const SAMPLER_LIMIT: Duration = Duration::from_secs(120);

/// One admin-console row: column name -> text value (NULL as "").
pub type AdminRow = BTreeMap<String, String>;

/// A client of Sluice's admin console (database `sluice`), over tokio-postgres's simple protocol.
pub struct AdminConsole {
    client: tokio_postgres::Client,
}

impl AdminConsole {
    /// Logs in to the console of `sluice` as `user` (with the user's known password).
    pub async fn connect(sluice: &SluiceHandle, user: &str) -> Result<AdminConsole> {
        let client = sluice
            .try_connect_with(sluice.pg_config(user, "sluice"))
            .await
            .with_context(|| format!("admin console login as {user}"))?;
        Ok(AdminConsole { client })
    }

    /// Runs `SHOW <what>` and returns its rows.
    pub async fn show(&self, what: &str) -> Result<Vec<AdminRow>> {
        let (_, rows) = self.query(&format!("SHOW {what}")).await?;
        Ok(rows)
    }

    /// Runs one command; returns its column names and rows, or the driver's error.
    pub async fn query(&self, sql: &str) -> Result<(Vec<String>, Vec<AdminRow>)> {
        let msgs = self
            .try_query(sql)
            .await
            .map_err(|e| anyhow!("{sql}: {}", db_error_text(&e)))?;
        Ok(msgs)
    }

    /// Runs one command, keeping the driver's error for SQLSTATE checks.
    pub async fn try_query(
        &self,
        sql: &str,
    ) -> Result<(Vec<String>, Vec<AdminRow>), tokio_postgres::Error> {
        let msgs = self.client.simple_query(sql).await?;
        let mut columns = Vec::new();
        let mut rows = Vec::new();
        for m in msgs {
            if let SimpleQueryMessage::RowDescription(cols) = &m {
                columns = cols.iter().map(|c| c.name().to_owned()).collect();
            }
            if let SimpleQueryMessage::Row(r) = m {
                let mut row = AdminRow::new();
                for (i, c) in r.columns().iter().enumerate() {
                    row.insert(c.name().to_owned(), r.get(i).unwrap_or_default().to_owned());
                }
                rows.push(row);
            }
        }
        Ok((columns, rows))
    }

    /// The `SHOW CLASSES` row of (`pool`, `class`), if the pool has that class.
    pub async fn class_row(&self, pool: &str, class: &str) -> Result<Option<AdminRow>> {
        Ok(self.show("CLASSES").await?.into_iter().find(|r| {
            r.get("pool").map(String::as_str) == Some(pool)
                && r.get("class").map(String::as_str) == Some(class)
        }))
    }

    /// `waiting` of (`pool`, `class`) in `SHOW CLASSES` (0 when absent).
    pub async fn class_waiting(&self, pool: &str, class: &str) -> Result<u64> {
        Ok(self
            .class_row(pool, class)
            .await?
            .and_then(|r| r.get("waiting").and_then(|v| v.parse().ok()))
            .unwrap_or(0))
    }

    /// The `SHOW POOLS` row of `db`/`user`.
    pub async fn pool_row(&self, db: &str, user: &str) -> Result<Option<AdminRow>> {
        Ok(self.show("POOLS").await?.into_iter().find(|r| {
            r.get("database").map(String::as_str) == Some(db)
                && r.get("user").map(String::as_str) == Some(user)
        }))
    }

    /// A numeric column of the `SHOW POOLS` row of `db`/`user` (0 when the pool doesn't exist).
    pub async fn pool_number(&self, db: &str, user: &str, column: &str) -> Result<u64> {
        match self.pool_row(db, user).await? {
            Some(r) => r
                .get(column)
                .with_context(|| format!("SHOW POOLS has no column {column}"))?
                .parse()
                .with_context(|| format!("SHOW POOLS {column} is not a number")),
            None => Ok(0),
        }
    }

    /// The `SHOW CLIENTS` rows whose application_name is `app`.
    pub async fn clients_of_app(&self, app: &str) -> Result<Vec<AdminRow>> {
        Ok(self
            .show("CLIENTS")
            .await?
            .into_iter()
            .filter(|r| r.get("application_name").map(String::as_str) == Some(app))
            .collect())
    }

    /// The `SHOW POLICIES` row of plugin `name`.
    pub async fn policy_row(&self, name: &str) -> Result<AdminRow> {
        self.show("POLICIES")
            .await?
            .into_iter()
            .find(|r| r.get("name").map(String::as_str) == Some(name))
            .with_context(|| format!("SHOW POLICIES has no plugin {name}"))
    }
}

/// A database error's SQLSTATE and message, or the error's text.
pub fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => format!("{e:#}"),
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server (Sluice) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// Starts Sluice from the config file at `path` (`Config::load`), as the binary does, so that
/// the admin command `RELOAD` re-reads that file.
pub async fn start_from_file(path: &Path) -> Result<SluiceHandle> {
    let config =
        Config::load(path).map_err(|e| anyhow!("config {} rejected: {e}", path.display()))?;
    SluiceHandle::try_start_config(config).await
}

/// A `[[policy.plugins]]` entry for the built example plugin `plugin` (e.g. "priority",
/// "client-limits", "spin"), named `name`, with failure mode `fail` and `config` lines
/// (raw TOML `key = value` lines of its `[policy.plugins.config]` table).
pub fn plugin_toml(name: &str, plugin: &str, fail: &str, config: &[&str]) -> String {
    let path = sluice_policy::testing::plugin_path(plugin);
    plugin_toml_at(name, &path, fail, config)
}

/// [`plugin_toml`] for a component at an explicit path.
pub fn plugin_toml_at(name: &str, path: &Path, fail: &str, config: &[&str]) -> String {
    let mut s = format!(
        "[[policy.plugins]]\nname = {}\npath = {}\nfail = {}\n",
        toml_str(name),
        toml_str(&path.display().to_string()),
        toml_str(fail)
    );
    if !config.is_empty() {
        s.push_str("[policy.plugins.config]\n");
        for line in config {
            s.push_str(line);
            s.push('\n');
        }
    }
    s
}

/// Fetches `GET /metrics` from `addr` (HTTP/1.1, `Connection: close`) and returns the body.
pub async fn scrape_metrics(addr: SocketAddr) -> Result<String> {
    let fetch = async {
        let mut sock = tokio::net::TcpStream::connect(addr)
            .await
            .context("connect to /metrics")?;
        sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n")
            .await
            .context("send the request")?;
        let mut resp = Vec::new();
        sock.read_to_end(&mut resp)
            .await
            .context("read the response")?;
        let resp = String::from_utf8(resp).context("metrics are not UTF-8")?;
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .context("no end of HTTP headers")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET /metrics: {head}");
        }
        Ok(body.to_owned())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| anyhow!("GET /metrics took longer than {SCRAPE_TIMEOUT:?}"))?
}

/// The value of the series `series` (a metric name with its labels exactly as rendered, e.g.
/// `sluice_pool_servers{pool="appdb.app",state="active"}`) in Prometheus text, if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Connects through Sluice as `user` to `db` with `application_name` set to `app`.
pub async fn connect_app(
    sluice: &SluiceHandle,
    user: &str,
    db: &str,
    app: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = sluice.pg_config(user, db);
    cfg.application_name(app);
    sluice.try_connect_with(cfg).await
}

/// Connects like [`connect_app`], but hands every NOTICE the connection receives to the
/// returned channel (messages as "SQLSTATE message").
pub async fn connect_with_notices(
    sluice: &SluiceHandle,
    user: &str,
    db: &str,
    app: &str,
) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<String>)> {
    let mut cfg = sluice.pg_config(user, db);
    cfg.application_name(app);
    let (client, mut conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| anyhow!("connect: {}", db_error_text(&e)))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notice(n)) => {
                    let _ = tx.send(format!("{} {}", n.code().code(), n.message()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Ok((client, rx))
}

/// Samples, in the background, how many backends of `application_name` = `app` are `active` in
/// `pg_stat_activity`, and keeps the maximum. Each sample is one query on a direct superuser
/// connection; sampling is only an observation, never a synchronisation.
pub struct ActivitySampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<(u64, u64)>>,
}

impl ActivitySampler {
    /// Starts sampling backends of application `app` (in every database).
    pub async fn start(pg: &PgCluster, app: &str) -> Result<ActivitySampler> {
        let client = pg.connect_direct("postgres", "postgres").await?;
        let stmt = client
            .prepare(
                "select count(*) from pg_stat_activity \
                 where application_name = $1 and state = 'active' and pid <> pg_backend_pid()",
            )
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let app = app.to_owned();
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + SAMPLER_LIMIT;
            let (mut max, mut samples) = (0u64, 0u64);
            while !flag.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                let n: i64 = client.query_one(&stmt, &[&app]).await?.get(0);
                max = max.max(u64::try_from(n).unwrap_or(0));
                samples += 1;
            }
            Ok((max, samples))
        });
        Ok(ActivitySampler { stop, task })
    }

    /// Stops sampling; returns (the most active backends seen at once, number of samples).
    pub async fn finish(self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.context("join the sampler")?
    }
}
