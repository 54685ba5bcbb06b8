//! ggml's compute threads in the engine process. A test binary of its own: its decode would
//! compete for the CPU with the timing-bound tests of engine.rs (restart within 2 s, a
//! 300 ms hang timeout) when run beside them.

use std::time::Duration;

use hearth_tests::{Bus, Daemon, chat_request, hearth};

/// The thread ids of process `pid`.
fn threads(pid: u32) -> std::collections::BTreeSet<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_decode_starts_no_threads() {
    // ggml without a pool starts its compute threads for every graph and joins them after:
    // one thread per generated token, each living about as long as the step. Watching the
    // engine's task list every millisecond through a long decode sees those; with the
    // context's own pool it sees only the threads that were there before.
    let bus = Bus::start();
    let daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    proxy.complete(chat_request("Hi", 4)).await.unwrap();
    let models = proxy.list_models().await.unwrap();
    let pid = models.iter().find_map(|m| m.engine_pid).expect("the default model runs in an engine process");
    let before = threads(pid);
    // Main, prep and the pool's second compute thread at least: a task list that cannot be
    // read would make the test pass without looking.
    assert!(before.len() >= 3, "the engine's threads: {before:?}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.extend(threads(pid));
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        })
    };
    let r = proxy.complete(chat_request("Write a long story about a lighthouse keeper.", 96)).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(r.token_ids.len() >= 64, "a steady decode: {} tokens", r.token_ids.len());
    let started: Vec<_> = seen.difference(&before).collect();
    let some = &started[..started.len().min(8)];
    assert!(started.is_empty(), "{} threads started during {} tokens: {some:?}…", started.len(), r.token_ids.len());
    assert_eq!(threads(pid), before, "{}", daemon.log());
}
