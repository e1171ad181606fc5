//! Cancelling pool calls: `cancel()`, a dropped future, a deadline; the items that did not start
//! do not run, running tasks are told, a task that does not stop costs its worker (replaced,
//! not counted as a failure), and the pool serves the next call.

use std::time::{Duration, Instant};

use shoal::prelude::*;
use shoal_integration_tests::scratch;

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.pool.task_lease_secs = 1.0;
    shoal::init_with(config).expect("runtime")
}

/// Works for `ms` in 10 ms steps, stopping early when asked; leaves `dir/<x>` when it ran.
#[shoal::remote]
fn cooperative(x: u64, ms: u64, dir: String) -> u64 {
    std::fs::write(format!("{dir}/{x}"), "started").expect("marker");
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if shoal::termination_requested() {
            std::fs::write(format!("{dir}/{x}"), "stopped").expect("marker");
            return 0;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    x
}

/// Ignores cancellation.
#[shoal::remote]
fn stubborn(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[shoal::remote]
fn double(x: u64) -> u64 {
    2 * x
}

fn markers(dir: &tempfile::TempDir) -> Vec<String> {
    std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("marker"))
        .collect()
}

/// Leaves `dir/<x>` when it runs.
#[shoal::remote]
fn mark(x: u64, dir: String) -> u64 {
    std::fs::write(format!("{dir}/{x}"), "ran").expect("marker");
    x
}

/// An item the caller's input yields after `cancel()` returned never runs: the feeder stops
/// reading the input, and does not write a batch it had read before it saw the cancel.
#[test]
fn items_read_after_cancel_never_run() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().display().to_string();
    let pool = Pool::new(2).expect("pool");
    let produced = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = produced.clone();
    let call = pool
        .starmap_async_with(
            mark,
            (0..10_000u64).map(move |x| {
                // A slow input: the feeder reads its batches over many milliseconds.
                std::thread::sleep(Duration::from_millis(2));
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (x, path.clone())
            }),
            AsyncOptions::new().chunksize(1),
        )
        .expect("starmap_async");
    std::thread::sleep(Duration::from_millis(500));
    call.cancel();
    let read_before = produced.load(std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        call.get(Some(Duration::from_secs(5))),
        Err(Error::Cancelled(_))
    ));
    std::thread::sleep(Duration::from_secs(1));
    let late: Vec<u64> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|x| *x >= read_before)
        .collect();
    assert!(
        late.is_empty(),
        "{} items read after cancel() ran (first read after: {read_before}): {late:?}",
        late.len()
    );
}

/// A batch whose write reaches Redis after its call's cancel marked the call never runs, however
/// late the feeder learns of the cancel: the script that writes it checks the cancelled set in
/// the same atomic step. The race (the feeder checked `is_cancelled`, then the cancel script
/// ran, then the batch landed) is widened here to the whole test: the call is marked cancelled
/// in Redis only, as the cancel script does, so the feeder never sees it on its side.
#[test]
fn a_batch_written_after_its_calls_cancel_never_runs() {
    let rt = runtime();
    let dir = scratch();
    let path = dir.path().display().to_string();
    let pool = Pool::new(2).expect("pool");
    let produced = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = produced.clone();
    let call = pool
        .starmap_async_with(
            mark,
            (0..10_000u64).map(move |x| {
                // A slow input: the feeder writes batch after batch for seconds.
                std::thread::sleep(Duration::from_millis(2));
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (x, path.clone())
            }),
            AsyncOptions::new().chunksize(1),
        )
        .expect("starmap_async");
    let mut conn = shoal_integration_tests::raw_redis(&rt);
    // The call's id, from a chunk's header `call.chunk.attempt.first.done`.
    let mut found = None;
    assert!(
        shoal_integration_tests::wait_for(Duration::from_secs(10), || {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("shoal:{*:pool:*}:tasks")
                .query(&mut conn)
                .expect("keys");
            let Some(tasks) = keys.first() else {
                return false;
            };
            let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(tasks)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query(&mut conn)
                .expect("xrange");
            let header = entries.ids.first().and_then(|e| e.get::<String>("h"));
            found = header
                .and_then(|h| h.split('.').next()?.parse::<u64>().ok())
                .map(|call| (tasks.clone(), call));
            found.is_some()
        }),
        "no chunk was written"
    );
    let (tasks, id) = found.expect("the call");
    std::thread::sleep(Duration::from_millis(300));
    let cancelled = format!("{}cancelled", tasks.trim_end_matches("tasks"));
    let _: u64 = redis::cmd("SADD")
        .arg(&cancelled)
        .arg(id)
        .query(&mut conn)
        .expect("sadd");
    let read_before = produced.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    let late: Vec<u64> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|x| *x >= read_before)
        .collect();
    assert!(
        late.is_empty(),
        "{} items written after the call was marked cancelled ran (first read after: \
         {read_before}): {late:?}",
        late.len()
    );
    call.cancel();
    assert!(matches!(
        call.get(Some(Duration::from_secs(5))),
        Err(Error::Cancelled(_))
    ));
    assert_eq!(pool.map(double, 0..3u64).expect("map"), vec![0, 2, 4]);
}

#[test]
fn cancel_stops_what_did_not_start_and_tells_what_runs() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().display().to_string();
    let pool = Pool::new(2).expect("pool");
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = errors.clone();
    let call = pool
        .starmap_async_with(
            cooperative,
            (0..40u64).map(move |x| (x, 2_000u64, path.clone())),
            AsyncOptions::new()
                .chunksize(1)
                .error_callback(move |e: &Error| seen.lock().expect("lock").push(e.to_string())),
        )
        .expect("starmap_async");
    std::thread::sleep(Duration::from_millis(300));
    let cancelled_at = Instant::now();
    call.cancel();
    assert!(matches!(
        call.get(Some(Duration::from_secs(5))),
        Err(Error::Cancelled(_))
    ));
    // The running tasks stop soon (their worker's heartbeat tells them).
    let stopped = shoal_integration_tests::wait_for(Duration::from_secs(5), || {
        markers(&dir).iter().all(|m| m == "stopped")
    });
    let latency = cancelled_at.elapsed();
    let ran = markers(&dir);
    eprintln!(
        "cancel: {} items started, stopped {latency:?} after cancel()",
        ran.len()
    );
    assert!(stopped, "running tasks did not stop: {ran:?}");
    assert!(
        ran.len() <= 4,
        "items that had not started ran: {}",
        ran.len()
    );
    assert_eq!(errors.lock().expect("lock").len(), 1, "one error_callback");
    // The pool serves the next call at once.
    let started = Instant::now();
    assert_eq!(pool.map(double, 0..4u64).expect("map"), vec![0, 2, 4, 6]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_dropped_future_cancels_its_call() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().display().to_string();
    let pool = Pool::new(2).expect("pool");
    let call = pool
        .starmap_async_with(
            cooperative,
            (0..40u64).map(move |x| (x, 2_000u64, path.clone())),
            AsyncOptions::new().chunksize(1),
        )
        .expect("starmap_async");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio");
    let outcome = rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(300), call.into_future()).await
    });
    assert!(
        outcome.is_err(),
        "the request timed out: its future was dropped"
    );
    assert!(shoal_integration_tests::wait_for(
        Duration::from_secs(5),
        || markers(&dir).iter().all(|m| m == "stopped")
    ));
    assert!(markers(&dir).len() <= 4, "{:?}", markers(&dir));
    assert_eq!(pool.map(double, 0..3u64).expect("map"), vec![0, 2, 4]);
}

#[test]
fn a_deadline_fails_the_call_with_a_timeout_and_a_stubborn_task_costs_only_its_worker() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(2)
        .restart_budget(0, Duration::from_secs(60))
        .build()
        .expect("pool");
    let call = pool
        .map_async_with(
            stubborn,
            vec![4_000u64; 4],
            AsyncOptions::new()
                .chunksize(1)
                .deadline(Duration::from_millis(300)),
        )
        .expect("map_async");
    let started = Instant::now();
    assert!(matches!(
        call.get(Some(Duration::from_secs(10))),
        Err(Error::Timeout(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The stubborn tasks ignore the cancellation: their workers are replaced after the grace
    // period, which a restart budget of 0 would not allow if it counted as failures.
    let t = Instant::now();
    assert_eq!(pool.map(double, 0..4u64).expect("map"), vec![0, 2, 4, 6]);
    eprintln!(
        "the next call completed {:?} after the deadline",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn dropping_an_imap_stream_cancels_the_rest() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().display().to_string();
    let pool = Pool::new(2).expect("pool");
    let mut it = pool
        .imap(cooperative_one, (0..40u64).map(move |x| (x, path.clone())))
        .expect("imap");
    assert!(it.next().is_some());
    drop(it);
    std::thread::sleep(Duration::from_millis(1500));
    let ran = markers(&dir).len();
    assert!(ran <= 8, "{ran} items ran after the stream was dropped");
}

/// `cooperative` for one tuple argument (imap passes one argument).
#[shoal::remote]
fn cooperative_one(args: (u64, String)) -> u64 {
    let (x, dir) = args;
    std::fs::write(format!("{dir}/{x}"), "started").expect("marker");
    std::thread::sleep(Duration::from_millis(100));
    x
}

/// Appends a line to `marker` (unless empty) when it starts, then sleeps `ms`, ignoring
/// cancellation.
#[shoal::remote]
fn nap_marked(args: (u64, String)) -> u64 {
    let (ms, marker) = args;
    if !marker.is_empty() {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&marker)
            .expect("marker");
        writeln!(file, "started").expect("marker");
    }
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn starts(marker: &str) -> usize {
    std::fs::read_to_string(marker)
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

/// A worker that holds a chunk of a cancelled call behind another call's long chunk (both in
/// one read) is not killed by the cancel sweep: it skips the cancelled chunk when it gets
/// there, and the other call's chunk runs once, on the same worker. The sweep killed it (the
/// long chunk ran twice) before.
#[test]
fn a_cancel_sweep_spares_a_worker_whose_cancelled_chunk_waits_behind_another_calls() {
    let _rt = runtime();
    let dir = scratch();
    let marker = |name: &str| dir.path().join(name).display().to_string();
    let (first, long) = (marker("first"), marker("long"));
    let pool = Pool::new(1).expect("pool");
    let pids = || shoal_integration_tests::child_pids();
    // Trivial chunks make the worker read many at a time (up to 64).
    pool.map_with(double, 0..500u64, 1).expect("warm-up");
    let worker = pids();
    assert_eq!(worker.len(), 1, "{worker:?}");
    // One read of 64 chunks: a 40 ms one first, then trivial ones (under 1 ms a chunk on
    // average, so the worker's next read takes 2 or more). Meanwhile the long chunk and the
    // chunks of the call to cancel are written: the next read holds both.
    let mut items = vec![(40u64, first.clone())];
    items.extend((0..63).map(|_| (0u64, String::new())));
    let warm = pool
        .map_async_with(nap_marked, items, AsyncOptions::new().chunksize(1))
        .expect("map_async");
    assert!(
        shoal_integration_tests::wait_for(Duration::from_secs(5), || starts(&first) == 1),
        "the first chunk never started"
    );
    let other = pool
        .apply_async(nap_marked, ((2_500u64, long.clone()),))
        .expect("apply_async");
    let doomed = pool
        .map_async_with(
            nap_marked,
            vec![(1u64, String::new()); 2],
            AsyncOptions::new().chunksize(1),
        )
        .expect("map_async");
    assert_eq!(
        warm.get(Some(Duration::from_secs(10))).expect("warm").len(),
        64
    );
    assert!(
        shoal_integration_tests::wait_for(Duration::from_secs(5), || starts(&long) == 1),
        "the long chunk never started"
    );
    doomed.cancel();
    assert!(matches!(
        doomed.get(Some(Duration::from_secs(5))),
        Err(Error::Cancelled(_))
    ));
    // The sweep comes a lease (1 s) after the cancel, while the long chunk runs.
    assert_eq!(
        other
            .get(Some(Duration::from_secs(15)))
            .expect("the long chunk"),
        2_500
    );
    assert_eq!(starts(&long), 1, "the long chunk ran again");
    assert_eq!(pids(), worker, "the worker was replaced");
    assert_eq!(pool.map(double, 0..4u64).expect("map"), vec![0, 2, 4, 6]);
}
