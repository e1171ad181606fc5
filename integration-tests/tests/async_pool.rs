//! The async forms of Pool and Process: an `AsyncResult` awaited, `imap` as a stream,
//! `start_async` and `join_async`, under tokio's current-thread runtime (where a blocked thread would stop
//! everything) and a multi-thread one, and under actix's.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal::prelude::*;
use shoal_integration_tests::{await_with_store_frozen, wait_for, with_ticker};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

#[shoal::remote]
fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20));
    x * x
}

#[shoal::remote]
fn nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[shoal::remote]
fn report_pid_then_nap(pids: SimpleQueue<u32>, ms: u64) {
    pids.put(std::process::id()).expect("pid");
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn an_awaited_map_does_not_block_a_current_thread_runtime() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let call = pool
        .map_async_with(slow_square, 0..40u64, AsyncOptions::new().chunksize(1))
        .expect("map_async");
    let (result, ticks) = with_ticker(async { call.await });
    assert_eq!(
        result.expect("map"),
        (0..40u64).map(|x| x * x).collect::<Vec<_>>()
    );
    // 40 items of 20 ms on 2 workers: ~400 ms, ~80 ticks of 5 ms.
    assert!(ticks >= 20, "the runtime was blocked: {ticks} ticks");
}

#[test]
fn imap_is_a_stream_in_order_and_imap_unordered_has_every_result() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let stream = pool
        .imap(slow_square, 0..20u64)
        .expect("imap")
        .into_stream();
    let (results, ticks) = with_ticker(stream.collect::<Vec<_>>());
    let results: Vec<u64> = results.into_iter().map(|r| r.expect("ok")).collect();
    assert_eq!(results, (0..20u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(ticks >= 10, "the runtime was blocked: {ticks} ticks");
    let stream = pool
        .imap_unordered(slow_square, 0..20u64)
        .expect("imap")
        .into_stream();
    let (results, _) = with_ticker(stream.collect::<Vec<_>>());
    let mut results: Vec<u64> = results.into_iter().map(|r| r.expect("ok")).collect();
    results.sort();
    assert_eq!(results, (0..20u64).map(|x| x * x).collect::<Vec<_>>());
}

#[test]
fn join_async_waits_for_the_exit_without_blocking() {
    let _rt = runtime();
    let p = Process::new(nap, (300u64,));
    p.start().expect("start");
    let (joined, ticks) = with_ticker(p.join_async());
    joined.expect("join");
    assert_eq!(p.exitcode(), Some(0));
    assert!(ticks >= 20, "the runtime was blocked: {ticks} ticks");
    let never = Process::new(nap, (1u64,));
    assert!(matches!(
        futures::executor::block_on(never.join_async()),
        Err(Error::InvalidState(_))
    ));
}

#[test]
fn a_pool_is_made_async_and_bad_settings_are_errors() {
    let _rt = runtime();
    let (squares, _) = with_ticker(async {
        let pool = Pool::new_async(2).await?;
        let squares = pool.map_async(slow_square, 0..10u64)?.await?;
        pool.close_async().await?;
        pool.join_async().await?;
        Ok::<_, Error>(squares)
    });
    assert_eq!(
        squares.expect("made, mapped, closed"),
        (0..10u64).map(|x| x * x).collect::<Vec<_>>()
    );
    let refused = futures::executor::block_on(Pool::builder().processes(0).build_async());
    assert!(
        matches!(refused, Err(Error::InvalidState(_))),
        "{refused:?}"
    );
    let refused = futures::executor::block_on(
        Pool::builder()
            .processes(1)
            .maxtasksperchild(0)
            .build_async(),
    );
    assert!(
        matches!(refused, Err(Error::InvalidState(_))),
        "{refused:?}"
    );
}

#[test]
fn start_async_starts_a_subprocess_or_a_thread_and_a_dropped_start_still_starts() {
    let _rt = runtime();
    let p = Process::new(nap, (200u64,));
    let (started, ticks) = with_ticker(async {
        p.start_async().await?;
        let alive = p.is_alive();
        p.join_async().await?;
        Ok::<_, Error>(alive)
    });
    assert!(started.expect("start and join"), "alive once started");
    assert_eq!(p.exitcode(), Some(0));
    assert!(p.pid().is_some(), "a subprocess has a pid");
    assert!(ticks >= 10, "the runtime was blocked: {ticks} ticks");
    assert!(matches!(
        futures::executor::block_on(p.start_async()),
        Err(Error::InvalidState(_))
    ));

    let t = Process::thread(
        |ms: u64| std::thread::sleep(Duration::from_millis(ms)),
        (10u64,),
    );
    futures::executor::block_on(async {
        t.start_async().await.expect("a thread starts");
        t.join_async().await.expect("join");
    });
    assert_eq!(t.exitcode(), Some(0));

    // Polled once, then dropped: the start goes ahead, and the handle shows it.
    let dropped = Process::new(nap, (50u64,));
    let _ = dropped.start_async().now_or_never();
    assert!(
        wait_for(Duration::from_secs(30), || dropped.exitcode() == Some(0)),
        "the dropped start did not start the process: {dropped:?}"
    );
    dropped.join(None).expect("join");

    // A thread target cannot run in a subprocess: an error, and the process stays startable.
    let misplaced = Process::thread(|| {}, ()).start_method(StartMethod::Process);
    assert!(matches!(
        futures::executor::block_on(misplaced.start_async()),
        Err(Error::InvalidState(_))
    ));
    let misplaced = misplaced.start_method(StartMethod::Thread);
    futures::executor::block_on(misplaced.start_async()).expect("starts on a thread");
    misplaced.join(None).expect("join");
}

#[shoal::remote]
fn add_one_back(conn: Connection<u64>) {
    let n = conn.recv().expect("recv");
    conn.send(&(n + 1)).expect("send");
}

/// Arguments that carry a pipe end are encoded on shoal's blocking pool, where passing the end
/// makes its round trip to Redis: with Redis frozen for a while, `start_async` leaves the
/// caller's thread free (the encoding on that thread parked it until Redis came back), and the
/// child gets its end. A dropped start of such arguments still starts the process, and one whose
/// end is closed fails with the process still startable.
#[test]
fn start_async_with_pipe_ends_among_its_arguments_leaves_the_thread_free() {
    const FROZEN: Duration = Duration::from_millis(1_000);
    let rt = runtime();
    let (mine, theirs) = Pipe::new::<u64>(true).expect("pipe");
    let p = Process::new(add_one_back, (theirs,));
    let redis_pid = rt.embedded_redis_pid().expect("the embedded store");
    // It waits for the store (passing the end needs it), and the thread ticks meanwhile.
    await_with_store_frozen(redis_pid, FROZEN, p.start_async()).expect("start_async");
    mine.send(&41).expect("send");
    assert_eq!(mine.recv().expect("the child's answer"), 42);
    p.join(None).expect("join");
    assert_eq!(p.exitcode(), Some(0));

    // Polled once, then dropped: the end is passed and the process started all the same.
    let (mine, theirs) = Pipe::new::<u64>(true).expect("pipe");
    let dropped = Process::new(add_one_back, (theirs,));
    let _ = dropped.start_async().now_or_never();
    mine.send(&1).expect("send");
    assert_eq!(mine.recv().expect("the dropped start's child answers"), 2);
    assert!(
        wait_for(Duration::from_secs(30), || dropped.exitcode() == Some(0)),
        "{dropped:?}"
    );

    // A closed handle cannot be passed: the start fails, and the process can start again.
    let (_mine, theirs) = Pipe::new::<u64>(true).expect("pipe");
    let closed = theirs.clone();
    closed.close().expect("close");
    let refused = Process::new(add_one_back, (closed,));
    for _ in 0..2 {
        let outcome = futures::executor::block_on(refused.start_async());
        assert!(
            matches!(&outcome, Err(Error::Codec { reason, .. }) if reason.contains("is closed")),
            "{outcome:?}"
        );
    }
    assert_eq!(refused.exitcode(), None);
}

/// `apply_async` returns before its task is written to Redis (the pool's task writer writes
/// it, calls in order): with Redis frozen for a while, calling it and awaiting the results
/// leaves the caller's thread free, and the results come once Redis is back.
#[test]
fn apply_async_leaves_the_thread_free_while_its_task_is_written() {
    const FROZEN: Duration = Duration::from_millis(1_000);
    let rt = runtime();
    let pool = Pool::new(1).expect("pool");
    // The worker is up before the store freezes.
    assert_eq!(pool.apply(slow_square, (3u64,)).expect("apply"), 9);
    let redis_pid = rt.embedded_redis_pid().expect("the embedded store");
    let results = await_with_store_frozen(redis_pid, FROZEN, async {
        let first = pool.apply_async(slow_square, (4u64,))?;
        let second = pool.apply_async(slow_square, (5u64,))?;
        Ok::<_, Error>((first.await?, second.await?))
    });
    assert_eq!(results.expect("applied"), (16, 25));
}

/// An `apply_async` cancelled while its task waits for the task writer is never written, so
/// it never runs: here the writer is held up by a frozen Redis, writing the call before it.
#[test]
fn an_apply_async_cancelled_before_its_task_is_written_never_runs() {
    let rt = runtime();
    let pool = Pool::new(1).expect("pool");
    assert_eq!(pool.apply(slow_square, (3u64,)).expect("apply"), 9);
    let pids: SimpleQueue<u32> = SimpleQueue::new().expect("queue");
    let redis_pid = Pid::from_raw(rt.embedded_redis_pid().expect("the embedded store") as i32);
    kill(redis_pid, Signal::SIGSTOP).expect("SIGSTOP the store");
    let first = pool.apply_async(slow_square, (4u64,));
    let cancelled = pool.apply_async(report_pid_then_nap, (pids.clone(), 1u64));
    if let Ok(call) = &cancelled {
        call.cancel();
    }
    std::thread::sleep(Duration::from_millis(300));
    kill(redis_pid, Signal::SIGCONT).expect("SIGCONT the store");
    assert_eq!(first.expect("apply_async").get(None).expect("first"), 16);
    let cancelled = cancelled.expect("apply_async");
    assert!(
        cancelled.get(None).is_err(),
        "the cancelled call has no result"
    );
    // The pool goes on, and the cancelled task never ran.
    assert_eq!(pool.apply(slow_square, (5u64,)).expect("apply"), 25);
    assert!(
        pids.get_timeout(Duration::from_millis(500)).is_err(),
        "the cancelled task ran"
    );
}

#[test]
fn terminate_async_and_kill_async_stop_a_process_with_pythons_codes() {
    let _rt = runtime();
    let (codes, _) = with_ticker(async {
        let termed = Process::new(nap, (60_000u64,));
        let killed = Process::new(nap, (60_000u64,));
        termed.start_async().await?;
        killed.start_async().await?;
        termed.terminate_async().await?;
        killed.kill_async().await?;
        termed.join_async().await?;
        killed.join_async().await?;
        // Stopping a process that exited already does nothing.
        termed.kill_async().await?;
        Ok::<_, Error>((termed.exitcode(), killed.exitcode()))
    });
    assert_eq!(codes.expect("stopped"), (Some(-15), Some(-9)));
    // Polled once, then dropped: the signal goes all the same (an actor skips a request whose
    // reply nobody waits for, so the request lives in a task of shoal's, not in the future).
    let dropped = Process::new(nap, (60_000u64,));
    dropped.start().expect("start");
    let _ = dropped.terminate_async().now_or_never();
    assert!(
        wait_for(Duration::from_secs(30), || dropped.exitcode() == Some(-15)),
        "the dropped terminate_async did not terminate: {dropped:?}"
    );
    let never = Process::new(nap, (1u64,));
    assert!(matches!(
        futures::executor::block_on(never.terminate_async()),
        Err(Error::InvalidState(_))
    ));
}

#[test]
fn the_runtime_goes_when_an_abandoned_start_held_it_last() {
    let rt = runtime();
    let socket = rt
        .config()
        .redis
        .url
        .clone()
        .and_then(|u| u.strip_prefix("unix://").map(str::to_string))
        .expect("the embedded store's socket");
    // The start's task holds the runtime, and (once the child started) the process: with the
    // future, the handle and the guard dropped, its references are the last ones, and the
    // teardown they start (which waits for the child, whose exit shoal's actor thread
    // records) must not run on that thread.
    let p = Process::new(nap, (100u64,));
    let _ = p.start_async().now_or_never();
    drop(p);
    drop(rt);
    assert!(
        wait_for(Duration::from_secs(60), || !std::path::Path::new(&socket)
            .exists()),
        "the runtime's teardown did not finish (its store is still there)"
    );
}

#[test]
fn awaited_calls_work_on_a_multi_thread_runtime_and_under_actix() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let squares = multi.block_on(async {
        let calls: Vec<_> = (0..4u64)
            .map(|i| {
                pool.map_async(slow_square, i * 5..i * 5 + 5)
                    .expect("map_async")
            })
            .collect();
        futures::future::join_all(calls.into_iter().map(|c| c.into_future())).await
    });
    let flat: Vec<u64> = squares.into_iter().flat_map(|r| r.expect("map")).collect();
    assert_eq!(flat, (0..20u64).map(|x| x * x).collect::<Vec<_>>());

    let system = actix_rt::System::new();
    let total =
        system.block_on(async { pool.apply_async(slow_square, (7u64,)).expect("apply").await });
    assert_eq!(total.expect("apply"), 49);
}

#[test]
fn a_pool_closes_terminates_and_joins_without_blocking() {
    let _rt = runtime();
    // close_async, then join_async once the outstanding call is done; the ticker keeps
    // counting: the thread was never blocked.
    let pool = Pool::new(2).expect("pool");
    let (squares, _) = with_ticker(async {
        let squares = pool.map_async(slow_square, 0..40u64).expect("map");
        assert!(matches!(
            pool.join_async().await,
            Err(shoal::Error::InvalidState(m)) if m.contains("close() or terminate()")
        ));
        pool.close_async().await.expect("close");
        assert!(
            pool.map_async(slow_square, 0..1u64).is_err(),
            "a closed pool takes no call"
        );
        squares
    });
    // The join waits for the outstanding call (40 tasks of 20 ms on 2 workers) and the
    // workers' exit, while the ticker keeps counting.
    let (joined, ticks) = with_ticker(pool.join_async());
    joined.expect("join");
    assert!(ticks > 5, "the thread was blocked ({ticks} ticks)");
    let squares = squares.get(None).expect("the outstanding call completed");
    assert_eq!(squares, (0..40u64).map(|x| x * x).collect::<Vec<_>>());

    // A close_async polled once, then dropped, closes the pool all the same.
    let pool = Pool::new(1).expect("pool");
    let _ = pool.close_async().now_or_never();
    assert!(
        wait_for(Duration::from_secs(30), || pool
            .map_async(slow_square, 0..1u64)
            .is_err()),
        "the dropped close_async did not close the pool"
    );
    pool.join().expect("join");

    // terminate_async stops workers in the middle of long tasks, and kills those that do not
    // stop within the grace. The workers are stopped (SIGSTOP): the SIGTERM waits, so the
    // terminate lasts the grace whatever the machine's load, and a thread it blocked would
    // count no tick meanwhile.
    let pool = Pool::new(2).expect("pool");
    let pids: SimpleQueue<u32> = SimpleQueue::new().expect("queue");
    let naps = pool
        .apply_async(report_pid_then_nap, (pids.clone(), 60_000u64))
        .expect("apply");
    let also = pool
        .apply_async(report_pid_then_nap, (pids.clone(), 60_000u64))
        .expect("apply");
    for _ in 0..2 {
        let pid = pids
            .get_timeout(Duration::from_secs(30))
            .expect("a worker's pid");
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    }
    let (terminated, ticks) = with_ticker(pool.terminate_async());
    terminated.expect("terminate");
    assert!(ticks > 100, "the thread was blocked ({ticks} ticks)");
    assert!(also.get(None).is_err());
    assert!(
        naps.get(None).is_err(),
        "a terminated pool fails its running call"
    );
    with_ticker(pool.join_async())
        .0
        .expect("join after terminate");
}

/// A pool of 2 workers, each in a 60 s task and stopped (`SIGSTOP`), so that its termination
/// lasts the grace (5 s) whatever the machine's load; with the tasks' calls and the workers'
/// pids.
fn pool_with_stopped_workers() -> (Pool, Vec<AsyncResult<()>>, Vec<u32>) {
    let pool = Pool::new(2).expect("pool");
    let pids: SimpleQueue<u32> = SimpleQueue::new().expect("queue");
    let calls: Vec<_> = (0..2)
        .map(|_| {
            pool.apply_async(report_pid_then_nap, (pids.clone(), 60_000u64))
                .expect("apply")
        })
        .collect();
    let pids: Vec<u32> = (0..2)
        .map(|_| {
            pids.get_timeout(Duration::from_secs(30))
                .expect("a worker's pid")
        })
        .collect();
    for pid in &pids {
        kill(Pid::from_raw(*pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    }
    (pool, calls, pids)
}

/// A pool dropped on a thread of an async runtime without close, terminate or join terminates
/// on a thread of its own: the drop does not hold the thread while the workers exit (here
/// stopped ones, killed after the grace).
#[test]
fn a_pool_dropped_in_an_async_task_terminates_in_the_background() {
    let _rt = runtime();
    let (pool, calls, pids) = pool_with_stopped_workers();
    let dropped_in = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
        .block_on(async move {
            let started = std::time::Instant::now();
            drop(pool);
            started.elapsed()
        });
    assert!(
        dropped_in < Duration::from_secs(2),
        "the drop held the thread {dropped_in:?}"
    );
    for call in calls {
        assert!(call.get(None).is_err(), "a terminated pool fails its calls");
    }
    assert!(
        wait_for(Duration::from_secs(30), || pids
            .iter()
            .all(|pid| !shoal_integration_tests::pid_running(*pid))),
        "the workers of the dropped pool are still there"
    );
}

/// The termination of a pool dropped in async code holds no handle of the runtime: the drop of
/// the runtime's last handle right after (the end of an async `main`) still tears the runtime
/// down, and that finishes the termination before it returns, so no worker outlives it.
#[test]
fn the_runtime_dropped_after_a_pool_in_async_code_finishes_its_termination() {
    let rt = runtime();
    let (pool, calls, pids) = pool_with_stopped_workers();
    drop(calls);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
        .block_on(async move {
            drop(pool);
            drop(rt);
        });
    let left: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|pid| shoal_integration_tests::pid_running(*pid))
        .collect();
    assert!(left.is_empty(), "workers {left:?} outlived the runtime");
}

#[shoal::remote]
fn put_then_square(seen: SimpleQueue<u64>, x: u64) -> u64 {
    seen.put(x).expect("put");
    x * x
}

/// Holds shoal's actor thread (where every pool's supervisor runs) for `busy`, from the moment
/// this returns; the returned future resolves once it let go.
fn hold_shoals_actor_thread(busy: Duration) -> impl std::future::Future<Output = ()> {
    let (started, wait) = std::sync::mpsc::channel();
    let context = shoal_core::context::current().expect("context");
    let held = context.spawn(
        move |_, caller: shoal_core::actors::Caller<()>| async move {
            let _ = started.send(());
            std::thread::sleep(busy);
            caller.finish(Ok(()));
        },
    );
    wait.recv_timeout(Duration::from_secs(10))
        .expect("the actor thread took the task");
    async move {
        held.await.expect("held");
    }
}

#[test]
fn async_pool_calls_return_while_the_supervisor_is_busy() {
    let _rt = runtime();
    let pool = Pool::new(2).expect("pool");
    assert_eq!(pool.apply(slow_square, (3,)).expect("apply"), 9);
    let held = hold_shoals_actor_thread(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let applied = pool.apply_async(slow_square, (4,)).expect("apply_async");
    let mapped = pool.map_async(slow_square, 0..10u64).expect("map_async");
    let returned_after = started.elapsed();
    // They used to wait for the supervisor's acknowledgement: the whole 1.5 s.
    assert!(
        returned_after < Duration::from_millis(700),
        "the calls waited {returned_after:?} for the busy supervisor"
    );
    futures::executor::block_on(held);
    assert_eq!(applied.get(None).expect("apply result"), 16);
    assert_eq!(
        mapped.get(None).expect("map result"),
        (0..10u64).map(|x| x * x).collect::<Vec<_>>()
    );
}

#[test]
fn a_call_made_as_the_pool_closes_is_refused_through_its_result_and_never_runs() {
    let _rt = runtime();
    let seen: SimpleQueue<u64> = SimpleQueue::new().expect("queue");
    let pool = Pool::new(1).expect("pool");
    assert_eq!(
        pool.apply(put_then_square, (seen.clone(), 1))
            .expect("apply"),
        1
    );
    assert_eq!(seen.get().expect("first"), 1);
    let held = hold_shoals_actor_thread(Duration::from_millis(800));
    // close() queues its message behind the busy actor thread; the calls below are made
    // after it was queued and before the supervisor handled it (its phase still reads
    // "running" here).
    std::thread::scope(|scope| {
        let closing = scope.spawn(|| pool.close().expect("close"));
        std::thread::sleep(Duration::from_millis(300));
        let called_back = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let error_callback = |called_back: &std::sync::Arc<std::sync::atomic::AtomicU32>| {
            let called_back = called_back.clone();
            move |_: &Error| {
                called_back.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        };
        let applied = pool
            .apply_async_with(
                put_then_square,
                (seen.clone(), 2),
                AsyncOptions::new().error_callback(error_callback(&called_back)),
            )
            .expect("apply_async is taken before the pool closed");
        let mapped = pool
            .starmap_async_with(
                put_then_square,
                vec![(seen.clone(), 3u64)],
                AsyncOptions::new().error_callback(error_callback(&called_back)),
            )
            .expect("starmap_async is taken before the pool closed");
        futures::executor::block_on(held);
        closing.join().expect("close returned");
        match applied.get(Some(Duration::from_secs(10))) {
            Err(Error::InvalidState(why)) => assert!(why.contains("closed"), "{why}"),
            other => panic!("the apply crossing close() ran: {other:?}"),
        }
        match mapped.get(Some(Duration::from_secs(10))) {
            Err(Error::InvalidState(why)) => assert!(why.contains("closed"), "{why}"),
            other => panic!("the map crossing close() ran: {other:?}"),
        }
        // As for any failed call, each error callback ran once, before get() returned.
        assert_eq!(
            called_back.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "the refused calls' error callbacks"
        );
    });
    pool.join().expect("join");
    assert!(seen.empty().expect("empty"), "a refused call ran");
}

#[test]
fn a_deadline_counts_from_the_call_even_while_the_supervisor_is_busy() {
    let _rt = runtime();
    let pool = Pool::new(1).expect("pool");
    assert_eq!(pool.apply(slow_square, (2,)).expect("apply"), 4);
    let held = hold_shoals_actor_thread(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let call = pool
        .apply_async_with(
            nap_then_square,
            (5_000u64, 3u64),
            AsyncOptions::new().deadline(Duration::from_millis(1200)),
        )
        .expect("apply_async");
    match call.get(Some(Duration::from_secs(20))) {
        Err(Error::Timeout(_)) => {}
        other => panic!("{other:?}"),
    }
    // Due at 1.2 s, noticed when the supervisor is free again (1.5 s); counted from the
    // supervisor's registration, it would end at 2.7 s.
    let ended_after = started.elapsed();
    assert!(
        ended_after < Duration::from_millis(2300),
        "the deadline ended the call after {ended_after:?}"
    );
    futures::executor::block_on(held);
}

#[shoal::remote]
fn nap_then_square(ms: u64, x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    x * x
}

/// An argument whose `Serialize` needs a deep stack (about 400 KiB in a release build, more in
/// a debug one), as a recursive user type may: it reaches Redis as a plain number.
#[derive(serde::Deserialize)]
struct NeedsStack(u64);

impl serde::Serialize for NeedsStack {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn descend(depth: u32) -> u64 {
            let frame = [depth as u8; 4096];
            let here = std::hint::black_box(&frame)[0] as u64;
            if depth == 0 {
                here
            } else {
                here.wrapping_add(descend(depth - 1))
            }
        }
        std::hint::black_box(descend(100));
        serializer.serialize_u64(self.0)
    }
}

#[shoal::remote]
fn needs_stack(x: NeedsStack) -> u64 {
    x.0
}

#[test]
fn an_async_maps_input_may_need_as_much_stack_as_a_blocking_maps() {
    let _rt = runtime();
    let pool = Pool::new(1).expect("pool");
    // The blocking map encodes on the caller's thread, the async one on its feeder thread.
    assert_eq!(
        pool.map(needs_stack, vec![NeedsStack(1), NeedsStack(2)])
            .expect("map"),
        vec![1, 2]
    );
    assert_eq!(
        pool.map_async(needs_stack, vec![NeedsStack(3), NeedsStack(4)])
            .expect("map_async")
            .get(None)
            .expect("get"),
        vec![3, 4]
    );
}
