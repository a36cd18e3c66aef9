//! A simple file watcher: polls the plugin files and reloads when one changes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use sluice_config::PolicyConfig;

use crate::engine::hex;
use crate::PolicyEngine;

/// A running watcher. Dropping it (or calling [`Watcher::stop`]) stops the thread.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Stops the thread and waits for it (at most one poll interval).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            if let Some(t) = h.thread().name() {
                tracing::debug!(thread = t, "stopping policy watcher");
            }
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.halt();
    }
}

/// (mtime, size) of a file, or None if unreadable.
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl PolicyEngine {
    /// Starts a thread that checks the plugin files of `cfg` every `cfg.watch_interval` (by
    /// mtime and size first, then by sha256) and calls [`PolicyEngine::reload`] with `cfg` and
    /// `classes` when one changed. A refused reload is logged and retried only after the file
    /// changes again. The thread holds only a weak reference to the engine. After a config
    /// reload, drop this watcher and start one with the new config.
    pub fn spawn_watcher(self: &Arc<Self>, cfg: PolicyConfig, classes: Vec<String>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let engine: Weak<PolicyEngine> = Arc::downgrade(self);
        let flag = Arc::clone(&stop);
        let interval = cfg.watch_interval.max(Duration::from_millis(10));
        // Baseline now, not in the thread: a change right after this call must be seen.
        let paths: Vec<PathBuf> = cfg.plugins.iter().map(|p| p.path.clone()).collect();
        let mut stamps: Vec<_> = paths.iter().map(stamp).collect();
        let mut digests: Vec<Option<String>> = {
            let active = self.active_digests();
            paths
                .iter()
                .map(|p| {
                    active
                        .iter()
                        .find(|(ap, _)| ap == p)
                        .map(|(_, d)| d.clone())
                })
                .collect()
        };
        let handle = std::thread::Builder::new()
            .name("sluice-policy-watch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::park_timeout(interval);
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some(engine) = engine.upgrade() else {
                        break;
                    };
                    let mut changed = false;
                    for (i, path) in paths.iter().enumerate() {
                        let s = stamp(path);
                        if s == stamps[i] {
                            continue;
                        }
                        stamps[i] = s;
                        let Ok(bytes) = std::fs::read(path) else {
                            continue;
                        };
                        let d = Some(hex(&Sha256::digest(&bytes)));
                        if d != digests[i] {
                            digests[i] = d;
                            changed = true;
                        }
                    }
                    if changed {
                        tracing::info!("policy plugin file changed; reloading");
                        // reload() logs its own outcome.
                        let _ = engine.reload(&cfg, &classes);
                    }
                }
            })
            .ok();
        Watcher { stop, handle }
    }
}
