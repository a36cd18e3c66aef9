//! The `sluice` binary: a thin main. Parse the command line, load and validate the config
//! before binding anything, start the proxy, then turn signals into reloads and shutdowns.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use sluice_config::{Config, FailMode, LogFormat, PluginConfig};
use sluice_policy::PolicyEngine;
use sluice_proxy::{Proxy, ShutdownMode};

mod logfmt;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: a PostgreSQL connection pooler with WebAssembly policies.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Run in the foreground with this config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate this config file (and load its plugins), then exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Policy plugin tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Replays connect/transaction events (JSON lines) through a plugin and prints decisions.
    Test {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// Events, one JSON object per line.
        events: PathBuf,
        /// Take the plugin's settings and the class names from this config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Class names plugins may assign (repeatable), when no config is given.
        #[arg(long = "class")]
        classes: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(Command::Policy {
        command:
            PolicyCommand::Test {
                plugin,
                events,
                config,
                classes,
            },
    }) = cli.command
    {
        return policy_test(plugin, events, config, classes);
    }
    if let Some(path) = cli.check_config {
        let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let classes = class_names(&cfg);
        PolicyEngine::new(&cfg.policy, &classes).map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("{}: configuration is valid", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let Some(path) = cli.config else {
        anyhow::bail!("no config file: run `sluice --config FILE` (see --help)");
    };
    // Load and validate everything before binding a port.
    let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    init_tracing(cfg.sluice.log_format);
    let classes = class_names(&cfg);
    let policy = PolicyEngine::new(&cfg.policy, &classes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let workers = match cfg.sluice.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    // One worker runs everything on the main thread, like PgBouncer: the cheapest per
    // transaction when PostgreSQL shares the machine. More workers scale across cores.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    // No tokio time driver: it would cost every park of the runtime a wheel scan, two locks and
    // a clock read. Sluice's deadlines live in `sluice_pool::timer`, driven from a timerfd.
    // One clock read per wake-up for the session's and the pool's timestamps.
    builder
        .enable_io()
        .on_thread_unpark(sluice_pool::clock::on_unpark);
    let rt = builder.build().context("starting the runtime")?;
    rt.block_on(serve(cfg, policy))
}

fn class_names(cfg: &Config) -> Vec<String> {
    cfg.classes.iter().map(|c| c.name.clone()).collect()
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.event_format(logfmt::LeanText { ansi }).init(),
    }
}

async fn serve(cfg: Config, policy: Arc<PolicyEngine>) -> anyhow::Result<ExitCode> {
    let watch = cfg
        .policy
        .watch
        .then(|| (cfg.policy.clone(), class_names(&cfg)));
    let running = Proxy::start(cfg, policy.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The plugin watcher follows the config: every reload (SIGHUP or the admin console's
    // RELOAD) replaces it with one for the new `[policy]` settings, or stops it.
    let watcher = Arc::new(parking_lot::Mutex::new(
        watch.map(|(p, c)| policy.spawn_watcher(p, c)),
    ));
    {
        let policy = policy.clone();
        running.shared().on_reload(move |cfg| {
            let mut slot = watcher.lock();
            if let Some(old) = slot.take() {
                old.stop();
            }
            if cfg.policy.watch {
                *slot = Some(policy.spawn_watcher(cfg.policy.clone(), class_names(cfg)));
            }
        });
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shared = running.shared().clone();
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading configuration");
                if let Err(e) = sluice_proxy::reload_from_disk(&shared).await {
                    warn!(error = %e, "reload failed");
                }
            }
            _ = term.recv() => {
                running.shutdown(ShutdownMode::Graceful);
                break;
            }
            _ = int.recv() => {
                running.shutdown(ShutdownMode::Fast);
                break;
            }
            _ = shared.shutdown.cancelled() => break,
        }
    }
    // A second signal while draining stops at once.
    let s = shared.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        sluice_proxy::begin_shutdown(&s, ShutdownMode::Fast);
    });
    running.wait().await;
    info!("sluice stopped");
    Ok(ExitCode::SUCCESS)
}

fn policy_test(
    plugin: PathBuf,
    events: PathBuf,
    config: Option<PathBuf>,
    mut classes: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let mut pcfg = match &config {
        Some(p) => {
            let cfg = Config::load(p).map_err(|e| anyhow::anyhow!("{e}"))?;
            if classes.is_empty() {
                classes = class_names(&cfg);
            }
            cfg.policy
        }
        None => {
            let cfg = Config::parse("", None).map_err(|e| anyhow::anyhow!("{e}"))?;
            if classes.is_empty() {
                classes = class_names(&cfg);
            }
            cfg.policy
        }
    };
    let name = plugin
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "plugin".into());
    // The plugin's settings: the entry with its name or path, else the only entry there is.
    let entry = pcfg
        .plugins
        .iter()
        .find(|p| p.name == name || p.path == plugin)
        .or(if pcfg.plugins.len() == 1 {
            pcfg.plugins.first()
        } else {
            None
        });
    if config.is_some() && entry.is_none() && !pcfg.plugins.is_empty() {
        eprintln!("sluice: no [[policy.plugins]] entry named \"{name}\" in the config: running it without settings");
    }
    let settings = entry.map(|p| p.settings.clone()).unwrap_or_default();
    pcfg.plugins = vec![PluginConfig {
        name,
        path: plugin,
        fail: FailMode::Open,
        settings,
    }];
    let file =
        std::fs::File::open(&events).with_context(|| format!("opening {}", events.display()))?;
    let stdout = std::io::stdout();
    match sluice_policy::simulate::simulate(
        &pcfg,
        &classes,
        std::io::BufReader::new(file),
        stdout.lock(),
    ) {
        Ok(summary) => {
            eprintln!("{summary:?}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            error!(error = %e, "simulation failed");
            anyhow::bail!("{e}")
        }
    }
}
