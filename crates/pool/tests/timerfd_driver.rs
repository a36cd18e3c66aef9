//! On Linux, a runtime that drives its own deadlines (`timer::drive_here`) serves them from a
//! timerfd and never starts the timer thread: a second thread would switch glibc's socket calls
//! to their multi-threaded path. Its own test binary, so no other test starts the thread.
#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use sluice_pool::timer;

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    let tasks = match std::fs::read_dir("/proc/self/task") {
        Ok(t) => t,
        Err(e) => panic!("/proc/self/task: {e}"),
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[test]
fn deadlines_fire_without_a_timer_thread() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    rt.block_on(async {
        if let Err(e) = timer::drive_here() {
            panic!("drive_here: {e}");
        }
        // Sleeps that end in order, out of order, and a timeout.
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for ms in [30u64, 10, 20, 10, 0] {
            set.spawn(async move {
                timer::sleep(Duration::from_millis(ms)).await;
                ms
            });
        }
        let mut ended = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(ms) => ended.push(ms),
                Err(e) => panic!("sleep task: {e}"),
            }
        }
        ended.sort_unstable();
        assert_eq!(ended, [0, 10, 10, 20, 30]);
        assert!(start.elapsed() >= Duration::from_millis(30));
        let never = std::future::pending::<()>();
        assert_eq!(
            timer::timeout(Duration::from_millis(5), never).await,
            Err(timer::Elapsed)
        );
    });
    let names = thread_names();
    assert!(
        !names.iter().any(|n| n == "sluice-timer"),
        "a timer thread was started: {names:?}"
    );
}
