//! A worker's death is charged to the chunk it ran, not to the others of its read: a worker
//! takes up to 64 tiny chunks at once, and those it finished (outcomes not sent yet) or had not
//! started are redelivered without an attempt charged. Real redis-server, real worker
//! subprocesses that exit in a task, a real cancel sweep.

use std::time::Duration;

use shoal::prelude::*;
use shoal::{IMapIterator, TaskErrorKind};
use shoal_integration_tests::{scratch, wait_for};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.pool.task_lease_secs = 1.0;
    shoal::init_with(config).expect("runtime")
}

#[shoal::remote]
fn square(x: u64) -> u64 {
    x * x
}

/// Appends `x` to the file `log`, then ends the worker's process when `x == bad`.
#[shoal::remote]
fn log_then_exit_on(task: (u64, u64, String)) -> u64 {
    use std::io::Write;
    let (x, bad, log) = task;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log");
    // One write: two workers append at once.
    file.write_all(format!("{x}\n").as_bytes()).expect("append");
    drop(file);
    if x == bad {
        std::process::exit(3);
    }
    x
}

/// Sleeps `ms` milliseconds, whatever cancellation says; leaves `marker` first.
#[shoal::remote]
fn stubborn(ms: u64, marker: String) -> u64 {
    std::fs::write(&marker, "started").expect("marker");
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[shoal::remote]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// A map of many trivial one-item chunks: each worker's reads grow to 64 chunks.
fn warm(pool: &Pool) {
    let n = 4_000u64;
    let squares = pool.map_with(square, 0..n, 1).expect("warm-up map");
    assert_eq!(squares.len() as u64, n);
}

const ITEMS: u64 = 400;
const BAD: u64 = 150;

#[test]
fn a_worker_death_fails_only_the_chunk_that_killed_it() {
    let _rt = runtime();
    let dir = scratch();
    let log = dir.path().join("ran").display().to_string();
    let pool = Pool::builder()
        .processes(2)
        .retries(0)
        .build()
        .expect("pool");
    warm(&pool);
    let tasks = |log: String| (0..ITEMS).map(move |x| (x, BAD, log.clone()));
    let it: IMapIterator<u64> = pool
        .imap_with(log_then_exit_on, tasks(log.clone()), 1)
        .expect("imap");
    let results: Vec<Result<u64>> = it.collect();
    assert_eq!(results.len() as u64, ITEMS);
    for (x, result) in (0..ITEMS).zip(&results) {
        match result {
            Ok(y) => {
                assert_ne!(x, BAD, "the bad item gave a result");
                assert_eq!(*y, x);
            }
            Err(Error::Task(e)) if x == BAD => {
                assert_eq!(e.kind, TaskErrorKind::Crashed, "{e}");
                assert_eq!(e.item, Some(BAD), "{e}");
                assert_eq!(e.attempts, 1, "{e}");
            }
            Err(e) => panic!("item {x} failed with its neighbour's crash: {e:?}"),
        }
    }
    // Every item ran (those done but unreported when the worker died ran again).
    let ran: std::collections::BTreeSet<u64> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(|l| l.parse().expect("number"))
        .collect();
    assert_eq!(ran, (0..ITEMS).collect());

    // A map reports the item that killed its worker, not a neighbour.
    warm(&pool);
    match pool.map_with(log_then_exit_on, tasks(log), 1) {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Crashed, "{e}");
            assert_eq!(e.item, Some(BAD), "{e}");
            assert_eq!(e.attempts, 1, "{e}");
            assert!(e.function.ends_with("::log_then_exit_on"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // The pool goes on.
    assert_eq!(pool.map(square, 0..4u64).expect("map"), vec![0, 1, 4, 9]);
}

/// A worker killed by a cancel sweep holds, in the same read, another call's chunks it ran
/// before the stubborn one: they run again, and that call succeeds even without retries.
#[test]
fn a_cancel_sweep_charges_nothing_to_the_other_calls_chunks() {
    let _rt = runtime();
    let dir = scratch();
    let marker = dir.path().join("stubborn").display().to_string();
    let pool = Pool::builder()
        .processes(1)
        .retries(0)
        .build()
        .expect("pool");
    // The worker is busy while the two calls are added; its next reads then take 1, 2, 4, 8
    // chunks of `other` (its prefetch doubles while they are trivial), then the last 15 of
    // `other` and the stubborn chunk together.
    let busy = pool
        .map_async_with(sleep_ms, [800u64], AsyncOptions::new().chunksize(1))
        .expect("busy");
    std::thread::sleep(Duration::from_millis(200));
    let other = pool
        .map_async_with(square, 0..30u64, AsyncOptions::new().chunksize(1))
        .expect("other");
    std::thread::sleep(Duration::from_millis(200));
    let held = pool
        .starmap_async_with(
            stubborn,
            [(30_000u64, marker.clone())],
            AsyncOptions::new().chunksize(1),
        )
        .expect("stubborn");
    assert_eq!(
        busy.get(Some(Duration::from_secs(10))).expect("busy"),
        vec![800]
    );
    assert!(
        wait_for(Duration::from_secs(10), || std::path::Path::new(&marker)
            .exists()),
        "the stubborn task started"
    );
    held.cancel();
    let squares = other
        .get(Some(Duration::from_secs(20)))
        .expect("the other call's chunks are not charged with the killed worker");
    assert_eq!(squares, (0..30u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(held.get(Some(Duration::from_secs(10))).is_err());
    assert_eq!(pool.map(square, 0..4u64).expect("map"), vec![0, 1, 4, 9]);
}
