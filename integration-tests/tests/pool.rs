//! `Pool` against a real embedded redis-server, with real worker subprocesses, real signals
//! (SIGKILL, SIGSTOP) and functions that crash their worker.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal::prelude::*;
use shoal::{IMapIterator, TaskErrorKind};
use shoal_integration_tests::{TestRedis, child_pids, pid_running, raw_redis, scratch, wait_for};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

#[shoal::remote]
fn square(x: u64) -> u64 {
    x * x
}

#[shoal::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[shoal::remote]
fn checked_half(x: u32) -> Result<u32, String> {
    if x.is_multiple_of(2) {
        Ok(x / 2)
    } else {
        Err(format!("{x} is odd"))
    }
}

#[shoal::remote]
fn panics_on(x: u64, bad: u64) -> u64 {
    if x == bad {
        panic!("item {x} is bad");
    }
    x
}

/// Returns `(x, pid)` after `ms` milliseconds.
#[shoal::remote]
fn slow_with_pid(x: u64, ms: u64) -> (u64, u32) {
    std::thread::sleep(Duration::from_millis(ms));
    (x, std::process::id())
}

#[shoal::remote]
fn pid_of(x: u64) -> (u64, u32) {
    (x, std::process::id())
}

#[shoal::remote]
fn always_exits(_x: u64) -> u64 {
    std::process::exit(3);
}

/// Appends this worker's pid to a file in `dir`, once per call.
#[shoal::remote]
fn init_marker(dir: String) {
    let path = format!("{dir}/init-{}", std::process::id());
    let count = std::fs::read_to_string(&path).map(|s| s.len()).unwrap_or(0);
    std::fs::write(&path, "x".repeat(count + 1)).expect("marker");
}

#[shoal::remote]
fn init_panics() {
    panic!("the initializer fails");
}

/// Fails as a worker that takes seconds to start would (a pod): late, slower than the restart
/// period allows for.
#[shoal::remote]
fn init_panics_slowly() {
    std::thread::sleep(Duration::from_millis(1500));
    panic!("the initializer fails, slowly");
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// The blocking forms read their input before they start, so it may borrow the caller's data
/// (the `_async` forms and `imap` read theirs later, on a feeder thread, and need it owned).
#[test]
fn blocking_maps_take_borrowed_inputs() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let xs: Vec<u64> = (0..50).collect();
    let expected: Vec<u64> = xs.iter().map(|x| x * x).collect();
    assert_eq!(pool.map(square, xs.iter().copied()).expect("map"), expected);
    assert_eq!(
        pool.map_with(square, xs.iter().copied().filter(|x| x % 2 == 0), 4)
            .expect("map_with"),
        expected.iter().copied().step_by(2).collect::<Vec<_>>()
    );
    let pairs: Vec<(i64, i64)> = (0..20).map(|i| (i, 100 - i)).collect();
    assert_eq!(
        pool.starmap(add, pairs.iter().copied()).expect("starmap"),
        vec![100; 20]
    );
    assert_eq!(
        pool.starmap_with(add, pairs.iter().copied(), 3)
            .expect("starmap_with"),
        vec![100; 20]
    );
    // The data is still the caller's.
    assert_eq!(xs.len() + pairs.len(), 70);
}

#[test]
fn map_starmap_and_apply_return_results_in_order() {
    let _rt = runtime();
    let pool = Pool::new(3).expect("pool");
    let expected: Vec<u64> = (0..200u64).map(|x| x * x).collect();
    assert_eq!(pool.map(square, 0..200u64).expect("map"), expected);
    for chunksize in [1, 7, 500] {
        assert_eq!(
            pool.map_with(square, 0..200u64, chunksize).expect("map"),
            expected
        );
    }
    // An input without an exact length is collected first, as Python's list() does.
    let odd: Vec<u64> = pool
        .map(square, (0..50u64).filter(|x| x % 2 == 1))
        .expect("map");
    assert_eq!(
        odd,
        (0..50u64)
            .filter(|x| x % 2 == 1)
            .map(|x| x * x)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        pool.map(square, Vec::<u64>::new()).expect("empty map"),
        Vec::<u64>::new()
    );
    assert_eq!(
        pool.starmap(add, vec![(1, 1), (2, 2), (3, 3), (4, 4)])
            .expect("starmap"),
        vec![2, 4, 6, 8]
    );
    assert_eq!(
        pool.starmap_with(add, (0..10).map(|i| (i, i)), 3)
            .expect("starmap"),
        (0..10).map(|i| 2 * i).collect::<Vec<_>>()
    );
    assert_eq!(pool.apply(add, (20, 22)).expect("apply"), 42);
    let r = pool.apply_async(square, (9u64,)).expect("apply_async");
    assert_eq!(r.get(None).expect("get"), 81);
    assert_eq!(r.get(None).expect("get twice"), 81);
    assert!(r.ready());
    assert!(r.successful().expect("ready"));
}

#[test]
fn result_returning_functions_give_their_results_as_values() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let out = pool.map(checked_half, 0..6u32).expect("map");
    assert_eq!(
        out,
        vec![
            Ok(0),
            Err("1 is odd".into()),
            Ok(1),
            Err("3 is odd".into()),
            Ok(2),
            Err("5 is odd".into())
        ]
    );
}

#[test]
fn imap_is_ordered_and_imap_unordered_has_every_result() {
    let _rt = runtime();
    let pool = Pool::new(3).expect("pool");
    let ordered: Vec<u64> = pool
        .imap(square, 0..300u64)
        .expect("imap")
        .collect::<shoal::Result<_>>()
        .expect("results");
    assert_eq!(ordered, (0..300u64).map(|x| x * x).collect::<Vec<_>>());
    let chunked: Vec<u64> = pool
        .imap_with(square, 0..300u64, 16)
        .expect("imap")
        .collect::<shoal::Result<_>>()
        .expect("results");
    assert_eq!(chunked, ordered);
    let unordered: Vec<u64> = pool
        .imap_unordered(square, 0..300u64)
        .expect("imap_unordered")
        .collect::<shoal::Result<_>>()
        .expect("results");
    assert_eq!(
        unordered.iter().copied().collect::<BTreeSet<u64>>(),
        (0..300u64).map(|x| x * x).collect::<BTreeSet<u64>>()
    );
    assert_eq!(unordered.len(), 300);
}

#[shoal::remote]
fn sleep_then_return(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(if x == 0 { 400 } else { 10 }));
    x
}

#[test]
fn imap_unordered_yields_fast_results_first() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let out: Vec<u64> = pool
        .imap_unordered(sleep_then_return, 0..5u64)
        .expect("imap_unordered")
        .collect::<shoal::Result<_>>()
        .expect("results");
    assert_eq!(sorted(out.clone()), vec![0, 1, 2, 3, 4]);
    assert_ne!(out[0], 0, "the slow item came first: {out:?}");
}

#[test]
fn a_panic_fails_map_with_the_first_failing_item() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let args: Vec<(u64, u64)> = (0..40u64).map(|x| (x, 17)).collect();
    match pool.starmap_with(panics_on, args.clone(), 4) {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Panic);
            assert!(e.function.ends_with("::panics_on"), "{}", e.function);
            assert!(
                e.message
                    .starts_with("item 17 is bad at integration-tests/tests/pool.rs:"),
                "the message ends with the panic's location: {}",
                e.message
            );
            assert_eq!(e.attempts, 1);
            assert_eq!(e.item, Some(17), "the index in the whole input");
        }
        other => panic!("{other:?}"),
    }
    // The pool is still usable: a panic is a task error, not a crash.
    assert_eq!(
        pool.map(square, 0..5u64).expect("map"),
        vec![0, 1, 4, 9, 16]
    );
}

#[shoal::remote]
fn panics_on_one(x: u64) -> u64 {
    if x == 5 {
        panic!("five");
    }
    x
}

#[test]
fn imap_yields_every_result_before_the_failing_item_then_the_error() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let mut it: IMapIterator<u64> = pool.imap_with(panics_on_one, 0..12u64, 4).expect("imap");
    let mut before = Vec::new();
    let error = loop {
        match it.next() {
            Some(Ok(x)) => before.push(x),
            Some(Err(e)) => break e,
            None => panic!("no error"),
        }
    };
    assert_eq!(before, vec![0, 1, 2, 3, 4]);
    assert!(
        matches!(error, Error::Task(ref t) if t.kind == TaskErrorKind::Panic
            && t.message.starts_with("five at ") && t.item == Some(5)),
        "{error:?}"
    );
    // The rest of the failing chunk (6, 7) did not run; the next chunks follow.
    let rest: Vec<u64> = it.map(|r| r.expect("ok")).collect();
    assert_eq!(rest, vec![8, 9, 10, 11]);
}

#[test]
fn get_with_a_timeout_returns_in_time() {
    let _rt = runtime();
    let pool = Pool::new(1).expect("pool");
    let r = pool
        .apply_async(slow_with_pid, (1u64, 2000u64))
        .expect("apply_async");
    let started = Instant::now();
    match r.get(Some(Duration::from_millis(300))) {
        Err(Error::Timeout(t)) => assert_eq!(t, Duration::from_millis(300)),
        other => panic!("{other:?}"),
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_millis(1300), "{waited:?}");
    assert!(!r.ready());
    assert!(matches!(r.successful(), Err(Error::InvalidState(_))));
    r.wait(Some(Duration::from_millis(50)));
    assert!(!r.ready());
    assert_eq!(r.get(None).expect("get").0, 1);
    assert!(r.successful().expect("ready"));
}

#[test]
fn callbacks_run_once_in_the_parent_before_get_returns() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let (ok, err) = (seen.clone(), seen.clone());
    let parent = std::process::id();
    let r = pool
        .map_async_with(
            square,
            0..10u64,
            AsyncOptions::new()
                .chunksize(2)
                .callback(move |v: &Vec<u64>| {
                    ok.lock().expect("lock").push(format!(
                        "ok {} in {}",
                        v.len(),
                        std::process::id()
                    ))
                })
                .error_callback(move |e: &Error| {
                    err.lock().expect("lock").push(format!("err {e}"))
                }),
        )
        .expect("map_async");
    assert_eq!(r.get(None).expect("get").len(), 10);
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![format!("ok 10 in {parent}")]
    );

    seen.lock().expect("lock").clear();
    let (ok, err) = (seen.clone(), seen.clone());
    let r = pool
        .apply_async_with(
            panics_on,
            (3u64, 3u64),
            AsyncOptions::new()
                .callback(move |_: &u64| ok.lock().expect("lock").push("ok".into()))
                .error_callback(move |e: &Error| {
                    err.lock().expect("lock").push(format!("err {e}"))
                }),
        )
        .expect("apply_async");
    assert!(r.get(None).is_err());
    assert!(!r.successful().expect("ready"));
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].starts_with("err ") && seen[0].contains("item 3 is bad"),
        "{seen:?}"
    );
}

#[test]
fn the_initializer_runs_once_per_worker() {
    let _rt = runtime();
    let dir = scratch();
    let pool = Pool::builder()
        .processes(3)
        .initializer(init_marker, (dir.path().display().to_string(),))
        .build()
        .expect("pool");
    let results = pool
        .starmap_with(slow_with_pid, (0..30u64).map(|x| (x, 20u64)), 1)
        .expect("starmap");
    let pids: BTreeSet<u32> = results.iter().map(|(_, pid)| *pid).collect();
    assert!(!pids.is_empty());
    for pid in &pids {
        let marker = std::fs::read_to_string(dir.path().join(format!("init-{pid}")))
            .unwrap_or_else(|_| panic!("worker {pid} ran tasks without its initializer"));
        assert_eq!(
            marker,
            "x",
            "the initializer ran {} times in {pid}",
            marker.len()
        );
    }
}

#[test]
fn maxtasksperchild_replaces_workers() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(3)
        .build()
        .expect("pool");
    let results = pool.map_with(pid_of, 0..30u64, 1).expect("map");
    assert_eq!(
        results.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
        (0..30).collect::<Vec<_>>()
    );
    let mut per_pid: HashMap<u32, usize> = HashMap::new();
    for (_, pid) in &results {
        *per_pid.entry(*pid).or_default() += 1;
    }
    assert!(per_pid.values().all(|&n| n <= 3), "{per_pid:?}");
    assert!(
        per_pid.len() >= 10,
        "only {} workers ran 30 tasks",
        per_pid.len()
    );
}

#[test]
fn killed_workers_lose_nothing_and_duplicate_nothing() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let r = pool
        .starmap_async_with(
            slow_with_pid,
            (0..60u64).map(|x| (x, 25u64)),
            AsyncOptions::new().chunksize(2),
        )
        .expect("starmap_async");
    // Kill each worker once while the map runs.
    let mut killed = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while killed.len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(150));
        if let Some(pid) = child_pids().into_iter().find(|p| !killed.contains(p)) {
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
            killed.insert(pid);
        }
    }
    assert_eq!(killed.len(), 2);
    let results = r
        .get(Some(Duration::from_secs(30)))
        .expect("the map completes");
    assert_eq!(
        results.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
        (0..60).collect::<Vec<_>>()
    );
    // The replacements did the rest.
    let pids: BTreeSet<u32> = results.iter().map(|(_, pid)| *pid).collect();
    assert!(pids.len() >= 3, "{pids:?}");
}

#[test]
fn a_function_that_always_crashes_fails_the_map_in_bounded_time() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(2)
        .retries(2)
        .build()
        .expect("pool");
    let started = Instant::now();
    match pool.map_with(always_exits, 0..4u64, 1) {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Crashed, "{e}");
            assert_eq!(e.attempts, 3, "{e}");
            assert!(e.function.ends_with("::always_exits"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_crashing_initializer_breaks_the_pool_instead_of_restarting_forever() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(2)
        .initializer(init_panics, ())
        .restart_budget(5, Duration::from_secs(60))
        .build()
        .expect("pool");
    let started = Instant::now();
    match pool.map(square, 0..4u64) {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Crashed);
            assert!(e.message.contains("max_restarts"), "{e}");
        }
        Err(Error::InvalidState(reason)) => assert!(reason.contains("broken"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(matches!(
        pool.map(square, 0..4u64),
        Err(Error::InvalidState(_))
    ));
}

/// Workers whose initializer fails too slowly for the restart period (one failure per 1.5 s,
/// a period of 1 s: never two within it) still break the pool after `max_restarts` failures
/// while a call waits, instead of restarting for ever while the call hangs.
#[test]
fn a_slowly_crashing_initializer_breaks_the_pool_too() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(1)
        .initializer(init_panics_slowly, ())
        .restart_budget(2, Duration::from_secs(1))
        .build()
        .expect("pool");
    let started = Instant::now();
    let call = pool.map_async(square, 0..4u64).expect("map_async");
    match call.get(Some(Duration::from_secs(30))) {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Crashed, "{e}");
            assert!(e.message.contains("max_restarts"), "{e}");
        }
        other => panic!("after {:?}: {other:?}", started.elapsed()),
    }
    // Three failures, 1.5 s each and the back-off between them.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(
        pool.map(square, 0..4u64),
        Err(Error::InvalidState(_))
    ));
}

/// Redis not answering for longer than the task lease, but less than
/// `redis.response_timeout_secs` (no operation fails), is an outage, not silent workers: no
/// worker could renew its lease meanwhile. Once it answers again, the busy workers are not
/// killed (nor charged to the restart budget) and each task runs once, in its first worker.
#[test]
fn a_store_pause_longer_than_the_lease_kills_no_busy_worker() {
    let rt = runtime();
    let mut redis = raw_redis(&rt);
    let pool = Pool::builder()
        .processes(3)
        .task_lease(Duration::from_millis(300))
        .build()
        .expect("pool");
    pool.map_with(pid_of, 0..6u64, 1).expect("warm up");
    let workers = child_pids();
    assert_eq!(workers.len(), 3, "{workers:?}");
    let r = pool
        .starmap_async_with(
            slow_with_pid,
            (0..3u64).map(|x| (x, 6_500u64)),
            AsyncOptions::new().chunksize(1),
        )
        .expect("starmap_async");
    // The workers have the tasks in hand (a worker may have taken two), renewing their leases.
    std::thread::sleep(Duration::from_millis(500));
    // Three pauses of four leases (each a chance for a lease check to be run before the
    // renewals waiting with it), with two leases between them.
    for _ in 0..3 {
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1_200)
            .arg("ALL")
            .query::<()>(&mut redis)
            .expect("CLIENT PAUSE");
        std::thread::sleep(Duration::from_millis(1_200 + 600));
    }
    let results = r
        .get(Some(Duration::from_secs(30)))
        .expect("the map completes");
    assert_eq!(
        results.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for (x, pid) in &results {
        assert!(
            workers.contains(pid),
            "item {x} ran again in {pid}: its first worker (of {workers:?}) was killed"
        );
    }
    assert_eq!(child_pids(), workers, "a worker was replaced");
}

#[test]
fn a_stopped_worker_loses_its_lease_and_its_chunk_moves() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(2)
        .task_lease(Duration::from_millis(600))
        .build()
        .expect("pool");
    // Warm up: both workers are up.
    pool.map_with(pid_of, 0..4u64, 1).expect("map");
    let workers = child_pids();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let r = pool
        .starmap_async_with(
            slow_with_pid,
            (0..20u64).map(|x| (x, 100u64)),
            AsyncOptions::new().chunksize(1),
        )
        .expect("starmap_async");
    std::thread::sleep(Duration::from_millis(150));
    // Freeze one worker (and its heartbeat): its chunk must be redelivered after the lease.
    let frozen = workers[0];
    kill(Pid::from_raw(frozen as i32), Signal::SIGSTOP).expect("SIGSTOP");
    let results = r
        .get(Some(Duration::from_secs(30)))
        .expect("the map completes");
    assert_eq!(
        results.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    assert!(
        wait_for(Duration::from_secs(5), || !pid_running(frozen)),
        "the silent worker {frozen} was not killed"
    );
}

/// `join()` returns once every callback ran, as CPython's (which joins its result handler),
/// not as soon as the workers exited while callbacks still waited on the callback thread.
#[test]
fn join_returns_after_every_callback_ran() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let seen: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    for x in 0..5u64 {
        let seen = seen.clone();
        pool.apply_async_with(
            square,
            (x,),
            AsyncOptions::new().callback(move |v: &u64| {
                std::thread::sleep(Duration::from_millis(300));
                seen.lock().expect("lock").push(*v);
            }),
        )
        .expect("apply_async");
    }
    pool.close().expect("close");
    pool.join().expect("join");
    assert_eq!(
        sorted(seen.lock().expect("lock").clone()),
        vec![0, 1, 4, 9, 16],
        "join() returned before every callback ran"
    );
}

/// A callback that closes and joins its own pool, then drops its last handle, waits for the
/// workers only: the callbacks after it cannot run before it returns (CPython raises there).
#[test]
fn a_callback_that_joins_and_drops_its_own_pool_does_not_wait_for_itself() {
    let _rt = runtime();
    let pool = Arc::new(Pool::new(1).expect("pool"));
    let (dropped, handle_dropped) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    let own = pool.clone();
    pool.apply_async_with(
        square,
        (3u64,),
        AsyncOptions::new().callback(move |_: &u64| {
            let _ = handle_dropped.recv_timeout(Duration::from_secs(10));
            let started = Instant::now();
            let joined = own.close().and_then(|()| own.join());
            // The last handle: the pool is dropped here, on its callback thread.
            drop(own);
            let _ = tx.send((joined.is_ok(), started.elapsed()));
        }),
    )
    .expect("apply_async");
    drop(pool);
    dropped.send(()).expect("the callback waits");
    let (joined, took) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the callback returned");
    assert!(joined);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn close_join_terminate_and_their_errors() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    assert!(matches!(pool.join(), Err(Error::InvalidState(_))));
    let pending = pool
        .starmap_async(slow_with_pid, (0..4u64).map(|x| (x, 100u64)))
        .expect("starmap_async");
    pool.close().expect("close");
    assert!(matches!(
        pool.map(square, 0..3u64),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        pool.apply_async(square, (1u64,)),
        Err(Error::InvalidState(_))
    ));
    let workers = child_pids();
    pool.join().expect("join");
    // close() let the outstanding call finish.
    assert_eq!(
        pending
            .get(Some(Duration::from_secs(1)))
            .expect("finished")
            .len(),
        4
    );
    for pid in workers {
        assert!(!pid_running(pid), "worker {pid} outlived join()");
    }

    let pool = Pool::new(2).expect("pool");
    pool.map(square, 0..4u64).expect("warm up");
    let workers = child_pids();
    assert_eq!(workers.len(), 2);
    let running = pool
        .starmap_async(slow_with_pid, (0..8u64).map(|x| (x, 5000u64)))
        .expect("starmap_async");
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    pool.terminate().expect("terminate");
    assert!(started.elapsed() < Duration::from_secs(5));
    for pid in &workers {
        assert!(!pid_running(*pid), "worker {pid} outlived terminate()");
    }
    assert!(matches!(
        running.get(Some(Duration::from_secs(1))),
        Err(Error::InvalidState(_))
    ));
    pool.join().expect("join after terminate");
    assert!(matches!(
        pool.map(square, 0..3u64),
        Err(Error::InvalidState(_))
    ));
}

/// A pool that ends while Redis does not answer deletes its keys without holding shoal's actor
/// thread, where every other pool's supervisor runs: another pool still answers at once.
#[test]
fn a_pool_ending_while_the_store_is_frozen_does_not_hold_the_other_pools() {
    let redis = TestRedis::tcp();
    let config = Config::builder()
        .redis_url(redis.url())
        .response_timeout(Duration::from_secs(4))
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let ending = Pool::new(1).expect("pool");
    let other = Pool::new(1).expect("pool");
    assert_eq!(ending.map(square, 0..2u64).expect("map"), vec![0, 1]);
    assert_eq!(other.map(square, 0..2u64).expect("map"), vec![0, 1]);
    let store = Pid::from_raw(redis.pid() as i32);
    kill(store, Signal::SIGSTOP).expect("SIGSTOP the store");
    // Its worker exits at once (SIGTERM); then the pool deletes its keys.
    ending.terminate().expect("terminate");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    other.close().expect("close");
    let took = started.elapsed();
    kill(store, Signal::SIGCONT).expect("SIGCONT the store");
    assert!(
        took < Duration::from_secs(2),
        "the other pool's supervisor answered after {took:?}"
    );
}

#[test]
fn dropping_a_pool_stops_its_workers() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    pool.map(square, 0..4u64).expect("map");
    let workers = child_pids();
    assert_eq!(workers.len(), 2);
    drop(pool);
    for pid in workers {
        assert!(!pid_running(pid), "worker {pid} outlived its pool");
    }
}

#[shoal::remote]
fn start_a_child_from_a_task(_x: u64) -> String {
    let process = Process::new(pid_of, (1u64,)).start().map(|_| ());
    let pool = Pool::new(1).map(|_| ());
    format!("{process:?} {pool:?}")
}

#[test]
fn pool_workers_are_daemonic() {
    let _rt = runtime();
    for method in [StartMethod::Process, StartMethod::Thread] {
        let pool = Pool::builder()
            .processes(1)
            .start_method(method)
            .build()
            .expect("pool");
        let outcome = pool
            .apply(start_a_child_from_a_task, (0u64,))
            .expect("apply");
        assert_eq!(
            outcome.matches("are not allowed to have children").count(),
            2,
            "{method:?}: {outcome}"
        );
    }
}

// A function without `#[shoal::remote]`, or a closure, given to `map`, `apply` or
// `initializer` is a compile error (the `compile_fail` examples in the `shoal` crate's docs
// check it), so there is no run-time case left to test here.
#[test]
fn a_pool_of_no_processes_is_an_error() {
    let _rt = runtime();
    assert!(matches!(Pool::new(0), Err(Error::InvalidState(_))));
}

#[test]
fn thread_workers_run_the_same_protocol() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::Thread)
        .build()
        .expect("pool");
    assert_eq!(
        pool.map(square, 0..100u64).expect("map"),
        (0..100u64).map(|x| x * x).collect::<Vec<_>>()
    );
    let pids: BTreeSet<u32> = pool
        .map(pid_of, 0..10u64)
        .expect("map")
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(pids, BTreeSet::from([std::process::id()]));
    assert!(child_pids().is_empty());
    pool.close().expect("close");
    pool.join().expect("join");
}

/// Puts `x` on `q` and returns it.
#[shoal::remote]
fn put_and_return(q: Queue<u64>, x: u64) -> u64 {
    q.put(x).expect("put");
    x
}

/// Thread workers are threads of the driver: what they run after each batch of tasks does not
/// undo the driver's own queue marks (a queue it closed stays closed), and what a task put is
/// written before its result all the same.
#[test]
fn thread_workers_leave_the_drivers_closed_queue_closed() {
    let _rt = runtime();
    let closed: Queue<u64> = Queue::new().expect("queue");
    closed.close().expect("close");
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::Thread)
        .build()
        .expect("pool");
    assert_eq!(pool.map(square, 0..4u64).expect("map"), vec![0, 1, 4, 9]);
    assert!(
        matches!(closed.put(1), Err(Error::InvalidState(_))),
        "the driver's queue was opened again by a worker thread"
    );
    closed
        .join_thread()
        .expect("join_thread after the driver's close()");
    let q: Queue<u64> = Queue::new().expect("queue");
    let put = pool
        .starmap(
            put_and_return,
            (0..8u64).map(|x| (q.clone(), x)).collect::<Vec<_>>(),
        )
        .expect("starmap");
    assert_eq!(put, (0..8u64).collect::<Vec<_>>());
    let got: BTreeSet<u64> = (0..8)
        .map(|_| q.get_nowait().expect("written before the task's result"))
        .collect();
    assert_eq!(got, (0..8u64).collect());
}

#[shoal::remote]
fn inc(x: u64) -> u64 {
    x + 1
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_million_item_imap_keeps_memory_flat_and_starts_early() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    const N: u64 = 1_000_000;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let items = (0..N).inspect(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let mut it = pool.imap_with(inc, items, 500).expect("imap");
    let first = it.next().expect("a first result").expect("ok");
    assert_eq!(first, 1);
    let pulled_at_first = pulled.load(Ordering::Relaxed);
    assert!(
        pulled_at_first < 200_000,
        "{pulled_at_first} items were read before the first result"
    );
    let baseline = rss_kib();
    let mut expected = 2u64;
    let mut peak = baseline;
    for (i, r) in it.enumerate() {
        assert_eq!(r.expect("ok"), expected);
        expected += 1;
        if i % 50_000 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    assert_eq!(expected, N + 1);
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    assert!(
        growth_mib < 64,
        "memory grew by {growth_mib} MiB over the imap"
    );
}

/// Sleeps `ms` (a failing item fails at once), then leaves a marker file `dir/<x>`.
#[shoal::remote]
fn mark_after(x: u64, ms: u64, dir: String, bad: u64) -> u64 {
    if x == bad {
        panic!("item {x} fails fast");
    }
    std::thread::sleep(Duration::from_millis(ms));
    std::fs::write(format!("{dir}/{x}"), "done").expect("marker");
    x
}

#[test]
fn a_failing_map_reports_only_after_every_chunk_finished() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().display().to_string();
    let pool = Pool::new(2).expect("pool");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    // Item 0 fails at once; the 11 others take 100 ms each on 2 workers.
    let r = pool
        .starmap_async_with(
            mark_after,
            (0..12u64).map(move |x| (x, 100u64, path.clone(), 0u64)),
            AsyncOptions::new()
                .chunksize(1)
                .error_callback(move |e: &Error| seen.lock().expect("lock").push(e.to_string())),
        )
        .expect("starmap_async");
    let error = r
        .get(Some(Duration::from_secs(30)))
        .expect_err("item 0 fails");
    assert!(
        matches!(&error, Error::Task(t) if t.item == Some(0) && t.kind == TaskErrorKind::Panic),
        "{error:?}"
    );
    // Python's map result is ready only once every chunk is done: all 11 markers are there.
    let markers = std::fs::read_dir(dir.path()).expect("dir").count();
    assert_eq!(
        markers, 11,
        "the map failed before its other chunks finished"
    );
    let calls = calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), 1, "one error_callback: {calls:?}");
    assert!(calls[0].contains("item 0 fails fast"), "{calls:?}");
}

/// An input that panics when it reaches `at`.
fn breaking_input(n: u64, at: u64) -> impl Iterator<Item = u64> + Send + 'static {
    (0..n).inspect(move |&x| {
        if x == at {
            panic!("the input breaks at {x}");
        }
    })
}

#[test]
fn an_input_that_panics_part_way_delivers_what_was_read_then_the_error() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");

    // imap: the results of the items read before, in order, then the error, then the end.
    let mut it = pool
        .imap_with(square, breaking_input(20, 7), 3)
        .expect("imap");
    let mut got = Vec::new();
    let error = loop {
        match it.next_timeout(Duration::from_secs(20)) {
            Some(Ok(x)) => got.push(x),
            Some(Err(e)) => break e,
            None => panic!("the iteration ended without the input's error"),
        }
    };
    assert_eq!(got, (0..7u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(
        matches!(&error, Error::Input(m) if m.contains("the input breaks at 7")),
        "{error:?}"
    );
    assert!(it.next().is_none());

    // imap_unordered: the same results in some order, then the error.
    let results: Vec<Result<u64>> = pool
        .imap_unordered_with(square, breaking_input(20, 5), 2)
        .expect("imap_unordered")
        .collect();
    let (ok, err): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    assert_eq!(
        sorted(ok.into_iter().map(|r| r.expect("ok")).collect()),
        vec![0, 1, 4, 9, 16]
    );
    assert_eq!(err.len(), 1);

    // map with an exact-size input (streamed) and with one collected first: the error comes
    // back from get(), after the items before it ran; no hang.
    let exact = pool
        .map_async(square, breaking_input(40, 30))
        .expect("map_async");
    assert!(matches!(
        exact.get(Some(Duration::from_secs(20))),
        Err(Error::Input(_))
    ));
    let inexact = breaking_input(40, 30).filter(|x| x % 2 == 0);
    assert!(matches!(pool.map(square, inexact), Err(Error::Input(_))));
    // The pool is still usable.
    assert_eq!(pool.map(square, 0..3u64).expect("map"), vec![0, 1, 4]);
}

/// `(x, dir)`: item 0 fails at once; the others sleep 300 ms, then leave a marker `dir/<x>`.
#[shoal::remote]
fn fail_fast_or_finish_slowly(spec: (u64, String)) -> u64 {
    let (x, dir) = spec;
    if x == 0 {
        panic!("item 0 fails fast");
    }
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(format!("{dir}/{x}"), "done").expect("marker");
    x
}

#[test]
fn a_blocking_map_reports_its_error_only_after_the_slow_chunks_finished() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().display().to_string();
    let pool = Pool::new(2).expect("pool");
    // Chunk 0 fails at once; the 5 others take 300 ms each on 2 workers, so the error is known
    // long before they finish. Python's map() raises only once every chunk is done.
    let outcome = pool.map_with(
        fail_fast_or_finish_slowly,
        (0..6u64).map(|x| (x, path.clone())),
        1,
    );
    let markers: BTreeSet<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    match outcome {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Panic, "{e}");
            assert_eq!(e.item, Some(0), "{e}");
            assert!(e.message.contains("item 0 fails fast"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        markers,
        (1..6u64).map(|x| x.to_string()).collect::<BTreeSet<_>>(),
        "map() returned its error before every slow chunk had finished"
    );
}

#[test]
fn an_input_that_panics_part_way_fails_starmap_async_once_without_hanging() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    // Exact-size (streamed) and inexact (filtered) inputs take different paths.
    let inputs: Vec<Box<dyn Iterator<Item = (u64, u64)> + Send>> = vec![
        Box::new(breaking_input(40, 30).map(|x| (x, 1u64))),
        Box::new(
            breaking_input(40, 30)
                .filter(|x| x % 2 == 0)
                .map(|x| (x, 1u64)),
        ),
    ];
    for input in inputs {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let r = pool
            .starmap_async_with(
                busy,
                input,
                AsyncOptions::new()
                    .chunksize(4)
                    .error_callback(move |e: &Error| {
                        seen.lock().expect("lock").push(e.to_string())
                    }),
            )
            .expect("starmap_async");
        // A hang shows as Error::Timeout here.
        let error = r
            .get(Some(Duration::from_secs(30)))
            .expect_err("the input's failure");
        assert!(
            matches!(&error, Error::Input(m) if m.contains("the input breaks at 30")),
            "{error:?}"
        );
        assert_eq!(r.successful().ok(), Some(false));
        // The callback ran before get() saw the outcome, and only once.
        let calls = calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 1, "one error_callback: {calls:?}");
        assert!(calls[0].contains("the input breaks at 30"), "{calls:?}");
    }
    // The pool is still usable.
    assert_eq!(
        pool.starmap(busy, vec![(7u64, 1u64)]).expect("starmap"),
        vec![7]
    );
}

#[test]
fn the_initializer_runs_in_each_worker_even_without_tasks() {
    let _rt = runtime();
    let dir = scratch();
    let pool = Pool::builder()
        .processes(2)
        .initializer(init_marker, (dir.path().display().to_string(),))
        .build()
        .expect("pool");
    pool.close().expect("close");
    pool.join().expect("join");
    let markers: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("marker"))
        .collect();
    assert_eq!(markers, vec!["x".to_string(), "x".to_string()]);
}

#[test]
fn zero_chunksize_and_zero_maxtasksperchild_are_errors() {
    let _rt = runtime();
    assert!(matches!(
        Pool::builder().processes(1).maxtasksperchild(0).build(),
        Err(Error::InvalidState(m)) if m.contains("maxtasksperchild")
    ));
    let pool = Pool::new(1).expect("pool");
    for outcome in [
        pool.map_with(square, 0..3u64, 0).map(|_| ()),
        pool.imap_with(square, 0..3u64, 0).map(|_| ()),
        pool.imap_unordered_with(square, 0..3u64, 0).map(|_| ()),
        pool.starmap_with(add, vec![(1i64, 2i64)], 0).map(|_| ()),
        pool.map_async_with(square, 0..3u64, AsyncOptions::new().chunksize(0))
            .map(|_| ()),
    ] {
        assert!(
            matches!(&outcome, Err(Error::InvalidState(m)) if m.contains("chunksize")),
            "{outcome:?}"
        );
    }
    assert_eq!(
        pool.map_with(square, 0..3u64, 1).expect("map"),
        vec![0, 1, 4]
    );
}

/// Sleeps `ms` and returns `x`.
#[shoal::remote]
fn busy(x: u64, ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    x
}

#[test]
fn workers_killed_at_a_steady_rate_do_not_break_a_map_with_default_settings() {
    let _rt = runtime();
    let pool = Pool::new(4).expect("pool");
    const N: u64 = 10_000;
    let r = pool
        .starmap_async(busy, (0..N).map(|x| (x, 2u64)))
        .expect("starmap_async");
    let mut killed = 0usize;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    while !r.ready() {
        std::thread::sleep(Duration::from_millis(200));
        let workers = child_pids();
        if workers.is_empty() {
            continue;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let victim = workers[(rng % workers.len() as u64) as usize];
        if kill(Pid::from_raw(victim as i32), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    let results = r.get(None).expect("the map completes");
    assert_eq!(
        results,
        (0..N).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    assert!(killed >= 10, "only {killed} workers were killed");
}

#[test]
fn a_function_that_kills_every_worker_fails_fast_with_the_default_budget() {
    let _rt = runtime();
    let pool = Pool::new(4).expect("pool");
    let started = Instant::now();
    match pool.map_with(always_exits, 0..200u64, 1) {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Crashed, "{e}");
            assert!(e.function.ends_with("::always_exits"), "{e}");
            // The function ran (and killed its worker): a real attempt, and with chunks of one
            // item, the item.
            assert!(e.attempts >= 1, "{e:?}");
            assert!(e.item.is_some_and(|i| i < 200), "{e:?}");
            assert!(e.to_string().contains(", attempt "), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// A result of `len` bytes.
#[shoal::remote]
fn bytes_of(len: u64) -> Vec<u8> {
    vec![7; len as usize]
}

#[test]
fn get_can_be_called_again_and_gives_the_same_results() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let expected: Vec<u64> = (0..20_000u64).map(|x| x * x).collect();
    // Decoded on the caller's side as chunks arrive (get() wakes as they come, a timeout
    // leaves what it decoded for the next get()), moved out by the first get(), decoded again
    // for the second.
    let r = pool
        .map_async_with(square, 0..20_000u64, AsyncOptions::new().chunksize(7))
        .expect("map_async");
    let _ = r.get(Some(Duration::from_millis(1)));
    assert_eq!(r.get(None).expect("first get"), expected);
    assert_eq!(r.get(None).expect("second get"), expected);
    assert!(r.successful().expect("ready"));
    let awaited = futures::executor::block_on(r.wait_async()).expect("await");
    assert_eq!(awaited, expected);

    // With a callback the results are kept for it, then handed to get().
    let lens = Arc::new(Mutex::new(Vec::new()));
    let seen = lens.clone();
    let r = pool
        .map_async_with(
            square,
            0..5_000u64,
            AsyncOptions::new()
                .chunksize(3)
                .callback(move |v: &Vec<u64>| seen.lock().expect("lock").push(v.len())),
        )
        .expect("map_async");
    assert_eq!(r.get(None).expect("first get"), expected[..5_000]);
    assert_eq!(r.get(None).expect("second get"), expected[..5_000]);
    assert_eq!(*lens.lock().expect("lock"), vec![5_000]);

    let one = pool.apply_async(add, (40i64, 2i64)).expect("apply_async");
    assert_eq!(one.get(None).expect("first get"), 42);
    assert_eq!(one.get(None).expect("second get"), 42);
    let half = pool
        .apply_async(checked_half, (3u32,))
        .expect("apply_async");
    assert_eq!(half.get(None).expect("get"), Err("3 is odd".to_string()));
    assert_eq!(half.get(None).expect("get"), Err("3 is odd".to_string()));
}

#[test]
fn a_result_too_large_to_send_fails_its_item_and_the_others_come_back() {
    let _rt = shoal::init_with(
        Config::builder()
            .max_message_bytes(64 * 1024)
            .build()
            .expect("config"),
    )
    .expect("runtime");
    let pool = Pool::new(2).expect("pool");
    // Item 5 returns more than a message may hold: it fails (naming the function's result),
    // the items before it in its chunk and every other chunk succeed.
    let sizes: Vec<u64> = (0..12u64)
        .map(|i| if i == 5 { 100 * 1024 } else { i })
        .collect();
    match pool.map_with(bytes_of, sizes.clone(), 3) {
        Err(Error::Task(e)) => {
            assert_eq!(e.item, Some(5), "{e:?}");
            assert_eq!(e.kind, TaskErrorKind::Error);
            assert!(e.message.contains("result of"), "{}", e.message);
            assert!(e.message.contains("bytes_of"), "{}", e.message);
        }
        other => panic!("expected the item's failure, got {other:?}"),
    }
    let mut it = pool
        .imap_with(bytes_of, sizes.clone(), 3)
        .expect("imap")
        .enumerate();
    for (i, result) in it.by_ref().take(5) {
        assert_eq!(result.expect("before the failing item").len(), i);
    }
    let (_, failed) = it.next().expect("the failing item");
    assert!(failed.is_err());
    // The rest of its chunk did not run (as in Python); the next chunks did.
    let rest: Vec<usize> = it.map(|(_, r)| r.expect("later chunks").len()).collect();
    assert_eq!(rest, vec![6, 7, 8, 9, 10, 11]);
}

/// The length of this pool's task stream: `None` when there is no single one.
fn task_stream_len(url: &str) -> Option<u64> {
    let mut c = redis::Client::open(url).ok()?.get_connection().ok()?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{*:pool:*}:tasks")
        .query(&mut c)
        .ok()?;
    match keys.as_slice() {
        [key] => redis::cmd("XLEN").arg(key).query(&mut c).ok(),
        _ => None,
    }
}

#[test]
fn the_task_stream_is_trimmed_as_workers_finish() {
    let rt = runtime();
    let url = rt.store_url();
    let pool = Pool::new(2).expect("pool");
    // Workers acknowledge their chunks without deleting them; the supervisor trims them.
    let out = pool.map_with(square, 0..3_000u64, 1).expect("map");
    assert_eq!(out.len(), 3_000);
    assert!(
        wait_for(Duration::from_secs(10), || task_stream_len(&url) == Some(0)),
        "the task stream still holds {:?} entries",
        task_stream_len(&url)
    );
    // And the pool goes on working after its stream was trimmed.
    assert_eq!(pool.map(square, 0..10u64).expect("map").len(), 10);
}

/// `f()` on a thread of its own; fails the test when it has not returned within `limit` (a
/// hang shows as a failure, not as a test killed by the runner).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

/// A value whose `Serialize` panics for 3 (Python: an item that cannot be pickled).
#[derive(Clone, Copy, Debug, serde::Deserialize)]
#[serde(transparent)]
struct PanicsOnThree(u64);

impl serde::Serialize for PanicsOnThree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0 == 3 {
            panic!("item 3 cannot be encoded");
        }
        s.serialize_u64(self.0)
    }
}

#[shoal::remote]
fn unwrap_value(x: PanicsOnThree) -> u64 {
    x.0
}

#[test]
fn an_item_whose_serialize_panics_fails_the_call_instead_of_hanging_it() {
    let _rt = runtime();
    let pool = Arc::new(Pool::new(2).expect("pool"));
    let is_the_panic =
        |e: &Error| matches!(e, Error::Input(m) if m.contains("item 3 cannot be encoded"));

    // map (read first, fed on the feeder thread): fails with the panic, within bounds.
    let p = pool.clone();
    let outcome = within(Duration::from_secs(30), "map", move || {
        p.map_with(unwrap_value, (0..8u64).map(PanicsOnThree), 1)
    });
    assert!(outcome.as_ref().is_err_and(is_the_panic), "{outcome:?}");

    // map_async (streamed input): the same from get().
    let p = pool.clone();
    let outcome = within(Duration::from_secs(30), "map_async", move || {
        p.map_async(unwrap_value, (0..8u64).map(PanicsOnThree))?
            .get(None)
    });
    assert!(outcome.as_ref().is_err_and(is_the_panic), "{outcome:?}");

    // imap: the items before it yield their results, then the error, as for a failing input.
    let p = pool.clone();
    let results = within(Duration::from_secs(30), "imap", move || {
        p.imap_with(unwrap_value, (0..8u64).map(PanicsOnThree), 2)
            .expect("imap")
            .collect::<Vec<Result<u64>>>()
    });
    let ok: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .copied()
        .collect();
    assert_eq!(ok, vec![0, 1, 2], "{results:?}");
    assert!(
        results
            .last()
            .is_some_and(|r| r.as_ref().is_err_and(is_the_panic)),
        "{results:?}"
    );

    // apply_async: the caller gets the error at once.
    let outcome = pool.apply_async(unwrap_value, (PanicsOnThree(3),));
    assert!(
        outcome.as_ref().is_err_and(is_the_panic),
        "{:?}",
        outcome.err()
    );

    // The pool is still usable, and closes.
    let p = pool.clone();
    let later = within(Duration::from_secs(30), "a later map", move || {
        p.map(square, 0..5u64)
    });
    assert_eq!(later.expect("map"), vec![0, 1, 4, 9, 16]);
    let p = pool.clone();
    within(Duration::from_secs(30), "close() then join()", move || {
        p.close().and_then(|()| p.join())
    })
    .expect("join");
}

#[test]
fn join_after_close_returns_while_an_unread_imap_exceeds_its_window() {
    let _rt = runtime();
    let pool = Arc::new(Pool::new(4).expect("pool"));
    // Chunksize 1 on 4 workers: a window of 512 chunks, far fewer than the input.
    let it = pool.imap(square, 0..10_000u64).expect("imap");
    let p = pool.clone();
    within(Duration::from_secs(60), "close() then join()", move || {
        p.close().and_then(|()| p.join())
    })
    .expect("join");
    // Every result waited in the iterator (CPython buffers them too).
    let got: Vec<u64> = it.map(|r| r.expect("result")).collect();
    assert_eq!(got, (0..10_000u64).map(|x| x * x).collect::<Vec<_>>());
}

#[test]
fn cancelling_a_call_runs_its_error_callback_before_get_returns() {
    let _rt = runtime();
    let pool = Pool::new(1).expect("pool");
    // By its deadline, and by cancel(): get() returns only after the callback finished.
    for by_cancel in [false, true] {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let mut options = AsyncOptions::new().error_callback(move |_: &Error| {
            std::thread::sleep(Duration::from_millis(200));
            flag.store(true, Ordering::SeqCst);
        });
        if !by_cancel {
            options = options.deadline(Duration::from_millis(300));
        }
        let r = pool
            .apply_async_with(slow_with_pid, (1u64, 3_000u64), options)
            .expect("apply_async");
        if by_cancel {
            std::thread::sleep(Duration::from_millis(100));
            r.cancel();
        }
        let error = r.get(Some(Duration::from_secs(20))).expect_err("cancelled");
        if by_cancel {
            assert!(matches!(error, Error::Cancelled(_)), "{error:?}");
        } else {
            assert!(
                matches!(error, Error::Timeout(d) if d == Duration::from_millis(300)),
                "{error:?}"
            );
        }
        assert!(
            done.load(Ordering::SeqCst),
            "get() returned {error:?} before the error_callback finished"
        );
    }
}

#[test]
fn a_task_lease_out_of_the_configuration_range_is_refused() {
    let _rt = runtime();
    for lease in [
        Duration::MAX,
        Duration::from_secs(86_401),
        Duration::from_millis(99),
        Duration::ZERO,
    ] {
        match Pool::builder().processes(1).task_lease(lease).build() {
            Err(Error::InvalidState(m)) => {
                assert!(m.contains("task lease") && m.contains("86400"), "{m}")
            }
            other => panic!("a lease of {lease:?} gave {other:?}"),
        }
    }
    // Within the range, no longer than the keys' expiry (an hour by default).
    match Pool::builder()
        .processes(1)
        .task_lease(Duration::from_secs(3_601))
        .build()
    {
        Err(Error::InvalidState(m)) => assert!(m.contains("redis.expiry_secs"), "{m}"),
        other => panic!("a lease longer than the expiry gave {other:?}"),
    }
    // The ends of what is allowed are fine.
    for lease in [Duration::from_secs(3_600), Duration::from_millis(100)] {
        let pool = Pool::builder()
            .processes(1)
            .task_lease(lease)
            .build()
            .expect("pool");
        assert_eq!(pool.apply(square, (3u64,)).expect("apply"), 9);
    }
}

/// Leaves `dir/started`, then sleeps `ms` and returns `ms`.
#[shoal::remote]
fn mark_then_sleep(dir: String, ms: u64) -> u64 {
    std::fs::write(format!("{dir}/started"), "x").expect("marker");
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn config_set(conn: &mut redis::Connection, name: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query::<()>(conn)
        .expect("CONFIG SET");
}

#[test]
fn an_outcome_refused_at_maxmemory_is_redelivered_not_lost() {
    let rt = runtime();
    let mut redis = raw_redis(&rt);
    let dir = scratch();
    let path = dir.path().display().to_string();
    // Thread workers: no driver key to watch (its refresh fails at maxmemory too).
    let pool = Pool::builder()
        .processes(1)
        .start_method(StartMethod::Thread)
        .task_lease(Duration::from_secs(1))
        .build()
        .expect("pool");
    assert_eq!(pool.apply(square, (3u64,)).expect("warm up"), 9);
    let r = pool
        .apply_async(mark_then_wait_for_go, (path.clone(),))
        .expect("apply_async");
    assert!(
        wait_for(Duration::from_secs(10), || dir
            .path()
            .join("started")
            .exists()),
        "the task did not start"
    );
    // Redis refuses every write that needs memory while the task ends: its outcome's XADD.
    config_set(&mut redis, "maxmemory-policy", "noeviction");
    config_set(&mut redis, "maxmemory", "1");
    // Only now does the task end (its outcome refused).
    std::fs::write(format!("{path}/go"), "x").expect("go");
    std::thread::sleep(Duration::from_millis(1_500));
    config_set(&mut redis, "maxmemory", "0");
    // The chunk was not acknowledged without its outcome: it runs again.
    let value = r.get(Some(Duration::from_secs(30)));
    assert_eq!(value.as_ref().ok(), Some(&7), "{value:?}");
}

/// Leaves `dir/started`, then waits for `dir/go` (at most 30 s) and returns 7.
#[shoal::remote]
fn mark_then_wait_for_go(dir: String) -> u64 {
    std::fs::write(format!("{dir}/started"), "x").expect("marker");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::path::Path::new(&format!("{dir}/go")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    7
}

/// The key of this runtime's only pool's task stream.
fn task_stream_key(conn: &mut redis::Connection) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{*:pool:*}:tasks")
        .query(conn)
        .expect("keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].clone()
}

#[test]
fn a_worker_that_reads_two_stop_entries_leaves_one_for_another() {
    let rt = runtime();
    let mut redis = raw_redis(&rt);
    let pool = Pool::new(2).expect("pool");
    // Tiny chunks: both workers end up reading many entries at once (COUNT = their prefetch).
    for _ in 0..3 {
        assert_eq!(
            pool.map_with(inc, 0..2_000u64, 1).expect("map").len(),
            2_000
        );
    }
    let workers = child_pids();
    assert_eq!(workers.len(), 2);
    // Two stop entries at once (the supervisor's are one pipeline): the first worker served may
    // read both.
    let tasks = task_stream_key(&mut redis);
    redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(&tasks)
        .arg("*")
        .arg("s")
        .arg(1)
        .ignore()
        .cmd("XADD")
        .arg(&tasks)
        .arg("*")
        .arg("s")
        .arg(1)
        .ignore()
        .query::<()>(&mut redis)
        .expect("stop entries");
    for pid in workers {
        assert!(
            wait_for(Duration::from_secs(10), || !pid_running(pid)),
            "worker {pid} got no stop entry"
        );
    }
    // The pool replaced them and goes on.
    assert_eq!(pool.map(square, 0..4u64).expect("map"), vec![0, 1, 4, 9]);
}
