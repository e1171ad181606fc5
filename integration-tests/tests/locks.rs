//! `Lock`, `RLock`, `Semaphore` and `BoundedSemaphore` across real processes, including a holder
//! killed with SIGKILL.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal::prelude::*;
use shoal_integration_tests::{assert_timing, pause_writes, read_file, scratch, wait_for};

shoal::test_support!();

/// Lease of this binary's runtime: short, so the SIGKILL test is quick.
const LEASE: Duration = Duration::from_millis(1500);

fn runtime() -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.sync.lease_secs = LEASE.as_secs_f64();
    shoal::init_with(config).expect("runtime")
}

#[test]
fn lock_acquire_release_and_timeouts() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    assert!(lock.try_acquire().expect("try"));
    assert!(!lock.try_acquire().expect("a Lock is not reentrant"));
    let started = Instant::now();
    assert!(
        !lock
            .acquire_timeout(Duration::from_millis(300))
            .expect("timeout")
    );
    assert_timing(started, Duration::from_millis(300));
    lock.release().expect("release");
    let second = lock.release();
    assert!(
        matches!(second, Err(Error::InvalidState(_))),
        "releasing an unheld lock: {second:?}"
    );
    {
        let guard = lock.lock().expect("guard");
        assert!(guard.fencing_token() > 0);
        assert!(!lock.try_acquire().expect("held"));
    }
    assert!(lock.try_acquire().expect("released by the guard"));
    lock.release().expect("release");
}

#[test]
fn fencing_tokens_only_grow() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let mut last = 0;
    for _ in 0..5 {
        let guard = lock.lock().expect("lock");
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        assert_eq!(lock.fencing_token(), Some(last));
    }
    assert_eq!(lock.fencing_token(), None);
}

#[test]
fn a_waiter_gets_the_lock_when_it_is_released() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    lock.acquire().expect("acquire");
    let other = lock.clone();
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        other.acquire().expect("acquire");
        let waited = started.elapsed();
        other.release().expect("release");
        waited
    });
    std::thread::sleep(Duration::from_millis(300));
    lock.release().expect("release");
    let waited = waiter.join().expect("thread");
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(
        waited < Duration::from_millis(1000),
        "the wake-up was slow: {waited:?}"
    );
}

#[test]
fn rlock_is_reentrant_and_owned() {
    let _rt = runtime();
    let rlock = RLock::new().expect("rlock");
    rlock.acquire().expect("1");
    rlock.acquire().expect("2");
    assert!(rlock.try_acquire().expect("3"));
    let other = rlock.clone();
    let from_other_thread =
        std::thread::spawn(move || (other.try_acquire().expect("try"), other.release()))
            .join()
            .expect("thread");
    assert!(!from_other_thread.0, "another thread took a held RLock");
    assert!(
        matches!(from_other_thread.1, Err(Error::InvalidState(_))),
        "a non-owner released it"
    );
    rlock.release().expect("3");
    rlock.release().expect("2");
    rlock.release().expect("1");
    assert!(
        matches!(rlock.release(), Err(Error::InvalidState(_))),
        "one release too many"
    );
    let other = rlock.clone();
    assert!(
        std::thread::spawn(move || {
            let got = other.try_acquire().expect("try");
            other.release().expect("release");
            got
        })
        .join()
        .expect("thread")
    );
}

#[test]
fn semaphores_count_and_bound() {
    let _rt = runtime();
    let sem = Semaphore::new(2).expect("semaphore");
    assert_eq!(sem.get_value().expect("value"), 2);
    assert!(sem.try_acquire().expect("1"));
    assert!(sem.try_acquire().expect("2"));
    assert!(!sem.try_acquire().expect("3"));
    assert_eq!(sem.get_value().expect("value"), 0);
    let started = Instant::now();
    assert!(
        !sem.acquire_timeout(Duration::from_millis(200))
            .expect("timeout")
    );
    assert_timing(started, Duration::from_millis(200));
    sem.release().expect("release");
    sem.release().expect("release");
    // A plain Semaphore may go above its start (a signal).
    sem.release().expect("release");
    assert_eq!(sem.get_value().expect("value"), 3);

    let bounded = BoundedSemaphore::new(1).expect("bounded");
    assert!(matches!(bounded.release(), Err(Error::InvalidState(_))));
    bounded.acquire().expect("acquire");
    bounded.release().expect("release");
    assert!(matches!(bounded.release(), Err(Error::InvalidState(_))));
    assert_eq!(bounded.get_value().expect("value"), 1);

    // Counts stay exact (the scripts count in doubles): a size they cannot hold is refused,
    // the largest they can is kept as given.
    assert!(matches!(
        Semaphore::new(u64::MAX),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        BoundedSemaphore::new(1 << 53),
        Err(Error::InvalidState(_))
    ));
    let largest = Semaphore::new((1 << 53) - 1).expect("largest");
    assert_eq!(largest.get_value().expect("value"), (1 << 53) - 1);
}

#[shoal::remote]
fn hold_forever(lock: Lock, ready: String) {
    lock.acquire().expect("acquire");
    std::fs::write(ready, "held").expect("ready");
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_lock_whose_holder_was_killed_is_released_after_the_lease() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let dir = scratch();
    let ready = dir.path().join("ready");
    let p = Process::new(hold_forever, (lock.clone(), ready.display().to_string()));
    p.start().expect("start");
    read_file(&ready);
    let token_before = {
        assert!(!lock.try_acquire().expect("held by the child"));
        let started = Instant::now();
        assert!(
            !lock
                .acquire_timeout(LEASE * 2)
                .expect("the live child renews its lease")
        );
        assert_timing(started, LEASE * 2);
        0
    };
    kill(Pid::from_raw(p.pid().expect("pid") as i32), Signal::SIGKILL).expect("kill -9");
    p.join(None).expect("join");
    let started = Instant::now();
    assert!(
        lock.acquire_timeout(LEASE * 3).expect("acquire"),
        "the dead holder's lock was never released"
    );
    assert!(
        started.elapsed() <= LEASE + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(lock.fencing_token().expect("held") > token_before);
    lock.release().expect("release");
}

#[shoal::remote]
fn count_under_lock(lock: Lock, path: String, rounds: u32) {
    for _ in 0..rounds {
        let _guard = lock.lock().expect("lock");
        let n: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        std::fs::write(&path, (n + 1).to_string()).expect("write");
    }
}

#[test]
fn processes_hammering_one_lock_lose_no_update() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let dir = scratch();
    let path = dir.path().join("counter").display().to_string();
    let procs: Vec<Process> = (0..4)
        .map(|_| Process::new(count_under_lock, (lock.clone(), path.clone(), 100u32)))
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    assert_eq!(std::fs::read_to_string(&path).expect("counter"), "400");
}

/// A runtime whose `sync.lease_secs` was set by hand (no builder check), as a user may do.
fn runtime_with_lease(lease_secs: f64) -> shoal::Result<shoal::Runtime> {
    let mut config = Config::builder().build().expect("config");
    config.sync.lease_secs = lease_secs;
    shoal::init_with(config)
}

/// Issue 7, item 3: a lease of 0 made every acquire succeed at once (4 x 300 locked increments
/// ended at 1079); a negative or NaN lease panicked at first use.
#[test]
fn a_lease_outside_its_range_is_refused_at_init() {
    for lease in [0.0, 0.05, -1.0, f64::NAN, f64::INFINITY] {
        match runtime_with_lease(lease) {
            Err(Error::Config { key, origin, .. }) => {
                assert_eq!((key.as_str(), origin.as_str()), ("sync.lease_secs", "code"))
            }
            Err(other) => panic!("lease {lease}: {other}"),
            Ok(_) => panic!("a lease of {lease} s was accepted"),
        }
    }
}

/// The shortest lease allowed still keeps every hold: no increment is lost.
#[test]
fn four_processes_hammering_one_lock_with_the_shortest_lease_lose_no_update() {
    let _rt = runtime_with_lease(0.1).expect("the shortest lease is valid");
    let lock = Lock::new().expect("lock");
    let dir = scratch();
    let path = dir.path().join("counter").display().to_string();
    let procs: Vec<Process> = (0..4)
        .map(|_| Process::new(count_under_lock, (lock.clone(), path.clone(), 300u32)))
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    assert_eq!(std::fs::read_to_string(&path).expect("counter"), "1200");
}

#[shoal::remote]
fn hold_semaphore(sem: Semaphore, dir: String, id: u32) {
    let _permit = sem.lock().expect("acquire");
    let inside = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    std::fs::write(format!("{dir}/{id}"), inside.to_string()).expect("enter");
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(format!("{dir}/{id}")).expect("leave");
}

#[test]
fn a_semaphore_of_two_admits_two_at_a_time() {
    let _rt = runtime();
    let sem = Semaphore::new(2).expect("semaphore");
    let dir = scratch();
    let inside = dir.path().join("inside");
    std::fs::create_dir(&inside).expect("dir");
    let max_seen = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let inside = inside.clone();
        let max_seen = max_seen.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let n = std::fs::read_dir(&inside).map(|d| d.count()).unwrap_or(0);
                max_seen.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let started = Instant::now();
    let procs: Vec<Process> = (0..6)
        .map(|i| {
            Process::new(
                hold_semaphore,
                (sem.clone(), inside.display().to_string(), i),
            )
        })
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(550),
        "6 holds of 200 ms, 2 at a time, took {took:?}"
    );
    assert!(wait_for(Duration::from_secs(1), || max_seen
        .load(Ordering::Relaxed)
        > 0));
    let _ = watcher;
    assert!(
        max_seen.load(Ordering::Relaxed) <= 2,
        "{} were inside at once",
        max_seen.load(Ordering::Relaxed)
    );
    assert_eq!(sem.get_value().expect("value"), 2);
}

// ------------------------------------------- issue 7, item 7: a release by a process holding nothing

#[shoal::remote]
fn hold_permit_until_told(sem: Semaphore, held: Event, go: Event, out: Queue<String>) {
    sem.acquire().expect("acquire");
    held.set().expect("held");
    go.wait(None).expect("go");
    out.put(format!("{:?}", sem.release())).expect("report");
}

#[shoal::remote]
fn hold_bounded_until_told(sem: BoundedSemaphore, held: Event, go: Event, out: Queue<String>) {
    sem.acquire().expect("acquire");
    held.set().expect("held");
    go.wait(None).expect("go");
    out.put(format!("{:?}", sem.release())).expect("report");
}

/// A Semaphore is a counter: a release by a process that holds no permit adds one, and does not
/// take the permit another process holds (Python: 1, then 2).
#[test]
fn a_semaphore_release_by_a_process_holding_nothing_adds_a_permit() {
    let _rt = runtime();
    let sem = Semaphore::new(1).expect("semaphore");
    let (held, go) = (Event::new().expect("event"), Event::new().expect("event"));
    let out: Queue<String> = Queue::new().expect("queue");
    let child = Process::new(
        hold_permit_until_told,
        (sem.clone(), held.clone(), go.clone(), out.clone()),
    );
    child.start().expect("start");
    assert!(held.wait(Some(Duration::from_secs(20))).expect("held"));
    assert_eq!(sem.get_value().expect("value"), 0);
    sem.release()
        .expect("a release by a process that holds nothing");
    assert_eq!(sem.get_value().expect("value"), 1);
    go.set().expect("go");
    assert_eq!(
        out.get_timeout(Duration::from_secs(20)).expect("report"),
        "Ok(())"
    );
    child.join(None).expect("join");
    assert_eq!(
        sem.get_value().expect("value"),
        2,
        "the holder's own release must count too"
    );
    assert!(sem.try_acquire().expect("1") && sem.try_acquire().expect("2"));
    assert!(!sem.try_acquire().expect("no third permit"));
}

/// A BoundedSemaphore counts the same way; the release that would pass the initial value is the
/// error (Python's ValueError), whoever makes it.
#[test]
fn a_bounded_semaphore_refuses_the_release_past_its_initial_value() {
    let _rt = runtime();
    let sem = BoundedSemaphore::new(1).expect("bounded");
    let (held, go) = (Event::new().expect("event"), Event::new().expect("event"));
    let out: Queue<String> = Queue::new().expect("queue");
    let child = Process::new(
        hold_bounded_until_told,
        (sem.clone(), held.clone(), go.clone(), out.clone()),
    );
    child.start().expect("start");
    assert!(held.wait(Some(Duration::from_secs(20))).expect("held"));
    sem.release().expect("0 -> 1 is within the bound");
    assert_eq!(sem.get_value().expect("value"), 1);
    go.set().expect("go");
    let report = out.get_timeout(Duration::from_secs(20)).expect("report");
    assert!(
        report.starts_with("Err(InvalidState("),
        "1 -> 2 passes the bound: {report}"
    );
    child.join(None).expect("join");
    assert_eq!(sem.get_value().expect("value"), 1);
    assert!(matches!(sem.release(), Err(Error::InvalidState(_))));
    // The refused release ended the child's hold: nothing lapses later.
    std::thread::sleep(LEASE + Duration::from_millis(500));
    assert_eq!(sem.get_value().expect("value"), 1);
}

#[shoal::remote]
fn take_permit_then_hang(sem: Semaphore, held: Event) {
    sem.acquire().expect("acquire");
    held.set().expect("held");
    std::thread::sleep(Duration::from_secs(600));
}

/// Crash safety stays for real holds: the permit of a holder killed by SIGKILL comes back after
/// the lease, on top of a permit another process added meanwhile.
#[test]
fn a_killed_holders_permit_returns_after_the_lease() {
    let _rt = runtime();
    let sem = Semaphore::new(1).expect("semaphore");
    let held = Event::new().expect("event");
    let child = Process::new(take_permit_then_hang, (sem.clone(), held.clone()));
    child.start().expect("start");
    assert!(held.wait(Some(Duration::from_secs(20))).expect("held"));
    sem.release().expect("release by a process holding nothing");
    assert_eq!(sem.get_value().expect("value"), 1);
    kill(
        Pid::from_raw(child.pid().expect("pid") as i32),
        Signal::SIGKILL,
    )
    .expect("kill -9");
    child.join(None).expect("join");
    assert!(
        wait_for(LEASE * 3, || sem.get_value().expect("value") == 2),
        "the killed holder's permit never came back: {}",
        sem.get_value().expect("value")
    );
}

// ------------------------------------- issue 7, item 8: a holder that exits normally keeps its hold

#[shoal::remote]
fn acquire_and_exit(lock: Lock, fail: bool) {
    lock.acquire().expect("acquire");
    if fail {
        panic!("exits with an error, holding the lock");
    }
}

#[shoal::remote]
fn acquire_rlock_and_exit(lock: RLock) {
    lock.acquire().expect("acquire");
    lock.acquire().expect("again");
}

#[shoal::remote]
fn consume_signal(sem: Semaphore, out: Queue<String>) {
    sem.acquire().expect("acquire");
    out.put("got it".into()).expect("report");
}

/// Python: a child may acquire a Lock and exit, and the parent release it. The hold of a process
/// that exits normally (even with an error) no longer depends on its heartbeat: it outlives the
/// lease until someone releases it.
#[test]
fn a_lock_held_by_a_process_that_exited_normally_stays_held() {
    let _rt = runtime();
    let (lock, failed) = (Lock::new().expect("lock"), Lock::new().expect("lock"));
    let rlock = RLock::new().expect("rlock");
    let children = [
        Process::new(acquire_and_exit, (lock.clone(), false)),
        Process::new(acquire_and_exit, (failed.clone(), true)),
        Process::new(acquire_rlock_and_exit, (rlock.clone(),)),
    ];
    for child in &children {
        child.start().expect("start");
    }
    for child in &children {
        child.join(None).expect("join");
    }
    assert_eq!(children[0].exitcode(), Some(0));
    assert_eq!(children[1].exitcode(), Some(1));
    assert_eq!(children[2].exitcode(), Some(0));
    std::thread::sleep(LEASE * 2);
    assert!(!lock.try_acquire().expect("try"), "the hold lapsed");
    assert!(!failed.try_acquire().expect("try"), "the hold lapsed");
    assert!(!rlock.try_acquire().expect("try"), "the RLock hold lapsed");
    lock.release()
        .expect("the parent releases the child's lock");
    failed
        .release()
        .expect("the parent releases the child's lock");
    assert!(lock.try_acquire().expect("free again"));
    lock.release().expect("release");
    assert!(
        matches!(rlock.release(), Err(Error::InvalidState(_))),
        "only the owner may release an RLock"
    );
}

/// Semaphore(0) as a signal: the permit a child consumed before exiting stays consumed (Python's
/// value stays 0); it does not come back when the child's lease would have lapsed.
#[test]
fn a_permit_consumed_by_a_process_that_exited_stays_consumed() {
    let _rt = runtime();
    let sem = Semaphore::new(0).expect("semaphore");
    let out: Queue<String> = Queue::new().expect("queue");
    let child = Process::new(consume_signal, (sem.clone(), out.clone()));
    child.start().expect("start");
    sem.release().expect("signal");
    assert_eq!(
        out.get_timeout(Duration::from_secs(20)).expect("report"),
        "got it"
    );
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    std::thread::sleep(LEASE * 2);
    assert_eq!(sem.get_value().expect("value"), 0);
    assert!(!sem.try_acquire().expect("no permit"));
}

// ------------------------------------------------------------- issue 7, item 13: locked()

/// CPython's `test_lock` and `test_rlock` (`_test_multiprocessing.py`).
#[test]
fn locked_tells_whether_anyone_holds_the_lock() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    assert!(!lock.locked().expect("locked"));
    lock.acquire().expect("acquire");
    assert!(lock.locked().expect("locked"));
    assert!(!lock.try_acquire().expect("try"));
    lock.release().expect("release");
    assert!(!lock.locked().expect("locked"));
    assert!(matches!(lock.release(), Err(Error::InvalidState(_))));

    let rlock = RLock::new().expect("rlock");
    assert!(!rlock.locked().expect("locked"));
    rlock.acquire().expect("1");
    assert!(rlock.locked().expect("locked"));
    rlock.acquire().expect("2");
    rlock.acquire().expect("3");
    rlock.release().expect("3");
    assert!(rlock.locked().expect("still held twice"));
    let other = rlock.clone();
    assert!(
        std::thread::spawn(move || other.locked().expect("locked"))
            .join()
            .expect("thread"),
        "held by another thread counts"
    );
    rlock.release().expect("2");
    rlock.release().expect("1");
    assert!(!rlock.locked().expect("locked"));
    assert!(matches!(rlock.release(), Err(Error::InvalidState(_))));
}

#[shoal::remote]
fn acquire_and_report_locked(lock: Lock, event: Event, res: Value<i8>) {
    lock.acquire().expect("acquire");
    res.set(i8::from(lock.locked().expect("locked")))
        .expect("set");
    event.set().expect("set");
}

#[shoal::remote]
fn acquire_rlock_and_report_locked(lock: RLock, event: Event, res: Value<i8>) {
    lock.acquire().expect("acquire");
    res.set(i8::from(lock.locked().expect("locked")))
        .expect("set");
    event.set().expect("set");
}

/// CPython's `test_lock_locked_2processes` and `test_rlock_locked_2processes`: a child acquires
/// and exits; the lock is held as the child sees it and as the parent sees it, and stays held
/// after the child exited (CPython's `test_repr_rlock`: `SomeOtherProcess, nonzero`).
#[test]
fn a_lock_held_by_another_process_is_locked_here_too() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let rlock = RLock::new().expect("rlock");
    let (event, revent) = (Event::new().expect("event"), Event::new().expect("event"));
    let (res, rres) = (Value::new(0i8).expect("res"), Value::new(0i8).expect("res"));
    let p = Process::new(
        acquire_and_report_locked,
        (lock.clone(), event.clone(), res.clone()),
    );
    let r = Process::new(
        acquire_rlock_and_report_locked,
        (rlock.clone(), revent.clone(), rres.clone()),
    );
    p.start().expect("start");
    r.start().expect("start");
    assert!(event.wait(Some(Duration::from_secs(20))).expect("wait"));
    assert!(revent.wait(Some(Duration::from_secs(20))).expect("wait"));
    assert!(lock.locked().expect("locked"));
    assert!(rlock.locked().expect("locked"));
    assert_eq!(res.get().expect("res"), 1);
    assert_eq!(rres.get().expect("res"), 1);
    p.join(None).expect("join");
    r.join(None).expect("join");
    std::thread::sleep(LEASE * 2);
    assert!(
        lock.locked().expect("locked"),
        "held after the child exited"
    );
    assert!(
        rlock.locked().expect("locked"),
        "held after the child exited"
    );
    lock.release().expect("release");
    assert!(!lock.locked().expect("locked"));
}

/// A heartbeat that renews a hold whose release is in flight finds it gone: that is the
/// release, not a lapse, and says nothing (it warned "lapsed or was released by another
/// process" under contention, for holds that were fine).
#[test]
fn a_heartbeat_during_a_release_does_not_call_the_hold_lapsed() {
    let logs = shoal_integration_tests::capture_logs();
    let mut config = Config::default();
    // A heartbeat every 100 ms.
    config.sync.lease_secs = 0.3;
    let _rt = shoal::init_with(config).expect("runtime");
    let lock = Lock::new().expect("lock");
    let until = Instant::now() + Duration::from_secs(3);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < until {
                    lock.acquire().expect("acquire");
                    lock.release().expect("release");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let ops: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    let logs =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(ops > 100, "{ops} lock operations");
    assert!(!logs.contains("lapsed or was released"), "{logs}");
}

/// Closes every client connection of this test's Redis but the admin one: the next command
/// on each connection shoal had open fails.
fn kill_clients(url: &str) {
    let mut admin = redis::Client::open(url)
        .expect("client")
        .get_connection()
        .expect("admin connection");
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut admin)
        .expect("CLIENT KILL");
    assert!(killed > 0, "no connection to close");
}

/// The lease of the tests that tell a release sent again from a lapse: far longer than
/// [`RETRIED`].
const LONG_LEASE: f64 = 10.0;

/// Within this, a release that failed once is sent again and goes through (its repeats come
/// within 1.5 s); a hold it left behind would last [`LONG_LEASE`].
const RETRIED: Duration = Duration::from_secs(3);

/// Whether `lock` is free within [`RETRIED`].
fn freed(lock: &Lock) -> bool {
    wait_for(RETRIED, || lock.locked().ok() == Some(false))
}

/// A guard whose release fails (its connection was closed under it) does not leave the lock
/// held: the hold leaves this process's renewals before the release is sent, and the release
/// is sent again (at worst the lease would lapse, but the lease here is long enough to tell
/// that apart).
#[test]
fn a_blocking_guard_whose_release_fails_does_not_keep_the_lock_held() {
    let rt = runtime_with_lease(LONG_LEASE).expect("runtime");
    let url = rt.config().redis.url.clone().expect("url");
    let lock = Lock::new().expect("lock");
    // The actor runtime's connection, which the release is sent again on, is open, and closed
    // too: the first repeat fails as well.
    assert!(!futures::executor::block_on(lock.locked_async()).expect("locked"));
    let guard = lock.lock().expect("lock");
    kill_clients(&url);
    drop(guard);
    assert!(
        freed(&lock),
        "the guard's failed release was not sent again"
    );
    assert!(lock.try_acquire().expect("try"));
    lock.release().expect("release");
}

/// As [`a_blocking_guard_whose_release_fails_does_not_keep_the_lock_held`], for guards of
/// `lock_async`, whose drop releases on the actor runtime: an `RLock`'s and a `Lock`'s.
#[test]
fn an_async_guard_whose_release_fails_does_not_keep_the_lock_held() {
    let rt = runtime_with_lease(LONG_LEASE).expect("runtime");
    let url = rt.config().redis.url.clone().expect("url");
    let rlock = RLock::new().expect("rlock");
    let lock = Lock::new().expect("lock");
    futures::executor::block_on(async {
        let guard = rlock.lock_async().await.expect("lock_async");
        kill_clients(&url);
        drop(guard);
    });
    assert!(
        wait_for(RETRIED, || rlock.locked().ok() == Some(false)),
        "the RLock guard's failed release was not sent again"
    );
    futures::executor::block_on(async {
        let guard = lock.lock_async().await.expect("lock_async");
        kill_clients(&url);
        drop(guard);
    });
    assert!(
        freed(&lock),
        "the Lock guard's failed release was not sent again"
    );
    let other = rlock.clone();
    let taken = std::thread::spawn(move || {
        let taken = other.try_acquire().expect("try");
        other.release().expect("release");
        taken
    });
    assert!(
        taken.join().expect("thread"),
        "another thread cannot take the RLock"
    );
}

/// Runs `f` again while Redis cannot be reached: each connection `kill_clients` closed fails
/// its next command once.
fn reaching<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    for _ in 0..50 {
        match f() {
            Err(e) if e.is_store_unreachable() => continue,
            other => return other,
        }
    }
    f()
}

/// A blocking `Condition::wait` that fails after it let go of the lock (its connection was
/// closed under it) leaves the guard the lock was held with holding nothing: dropping the guard
/// does not release the hold another thread took meanwhile.
#[test]
fn the_guard_of_a_failed_condition_wait_does_not_release_another_holders_lock() {
    let rt = runtime();
    let url = rt.config().redis.url.clone().expect("url");
    let lock = Lock::new().expect("lock");
    let cond = Condition::new(Some(lock.clone())).expect("condition");
    let guard = cond.lock().expect("lock");
    let (held, is_held) = std::sync::mpsc::channel();
    let (go, on_go) = std::sync::mpsc::channel::<()>();
    let other = {
        let lock = lock.clone();
        std::thread::spawn(move || {
            // Granted when the wait below lets go of the lock.
            lock.acquire().expect("acquire");
            held.send(()).expect("held");
            on_go.recv().expect("go");
            reaching(|| lock.release())
        })
    };
    let killer = std::thread::spawn(move || {
        is_held
            .recv_timeout(Duration::from_secs(20))
            .expect("the other thread took the lock");
        kill_clients(&url);
    });
    let waited = cond.wait(Some(Duration::from_secs(20)));
    assert!(waited.is_err(), "its connection was closed: {waited:?}");
    killer.join().expect("killer");
    drop(guard);
    assert!(
        !reaching(|| lock.try_acquire()).expect("try"),
        "dropping the guard released the other thread's hold"
    );
    go.send(()).expect("go");
    other
        .join()
        .expect("other thread")
        .expect("the other thread's hold was taken from it");
}

/// `Guard::release_async` whose future is dropped before it is polled still releases.
#[test]
fn a_guard_release_async_dropped_unpolled_still_releases() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let guard = lock.lock().expect("lock");
    drop(guard.release_async());
    assert!(
        wait_for(LEASE * 2, || !lock.locked().expect("locked")),
        "the hold was never released"
    );
    let guard = futures::executor::block_on(lock.lock_async()).expect("lock_async");
    drop(guard.release_async());
    assert!(
        wait_for(LEASE * 2, || !lock.locked().expect("locked")),
        "the async guard's hold was never released"
    );
}

#[shoal::remote]
fn drop_async_guards_and_exit(lock: Lock, rlock: RLock, url: String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let guard = lock.lock_async().await.expect("lock_async");
        let rguard = rlock.lock_async().await.expect("lock_async");
        // The releases wait in Redis while the process goes on to exit, and close their
        // connection, unrun, if it exits first.
        pause_writes(&url, 500);
        drop(guard);
        drop(rguard);
    });
}

/// A process that exits right after dropping the guards of `lock_async` (released in the
/// background) leaves the locks free: its exit waits for those releases, rather than leaving
/// the holds to lapse after the (long) lease.
#[test]
fn a_process_exiting_right_after_dropping_async_guards_leaves_the_locks_free() {
    let rt = runtime_with_lease(LONG_LEASE).expect("runtime");
    let url = rt.config().redis.url.clone().expect("url");
    let (lock, rlock) = (Lock::new().expect("lock"), RLock::new().expect("rlock"));
    let child = Process::new(
        drop_async_guards_and_exit,
        (lock.clone(), rlock.clone(), url),
    );
    child.start().expect("start");
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    assert!(!lock.locked().expect("locked"), "the Lock is still held");
    assert!(!rlock.locked().expect("locked"), "the RLock is still held");
}

/// A `Condition` wait takes back the levels of its `RLock` that the owner holds, as its
/// process counts them, not the count in Redis: after the release of an inner level failed
/// (its connection was closed under it), Redis still counts that level, which the owner no
/// longer holds. Taking that one back too left the lock held, and renewed, once the owner had
/// released all it holds.
#[test]
fn a_condition_wait_after_a_failed_inner_release_takes_back_only_the_levels_held() {
    let rt = runtime_with_lease(LONG_LEASE).expect("runtime");
    let url = rt.config().redis.url.clone().expect("url");
    let cond = Condition::new(None).expect("condition");
    let outer = cond.lock().expect("outer level");
    let inner = cond.lock().expect("inner level");
    kill_clients(&url);
    // Its release fails (and, being a level above the last, is not sent again).
    drop(inner);
    assert!(
        !cond.wait(Some(Duration::from_millis(100))).expect("wait"),
        "nobody notified"
    );
    drop(outer);
    let other = cond.clone();
    let taken = std::thread::spawn(move || {
        wait_for(RETRIED, || {
            let taken = other.try_acquire().expect("try");
            if taken {
                other.release().expect("release");
            }
            taken
        })
    });
    assert!(
        taken.join().expect("thread"),
        "the RLock stayed held after its owner released all it holds"
    );
}

/// After the release of an inner level of an `RLock` failed, Redis counts a level that its owner
/// no longer holds. Once the owner released all it holds, its process stops renewing the grant,
/// which lapses; it used to take the count Redis answered for the levels still held, and renew
/// the grant for good.
#[test]
fn an_rlock_whose_inner_release_failed_is_not_renewed_once_its_owner_released_it() {
    let rt = runtime();
    let url = rt.config().redis.url.clone().expect("url");
    let rlock = RLock::new().expect("rlock");
    rlock.acquire().expect("outer level");
    let inner = rlock.lock().expect("inner level");
    kill_clients(&url);
    // Its release fails (and, being a level above the last, is not sent again).
    drop(inner);
    rlock.release().expect("the outer level");
    let other = rlock.clone();
    let taken = std::thread::spawn(move || {
        wait_for(LEASE * 3, || {
            let taken = other.try_acquire().expect("try");
            if taken {
                other.release().expect("release");
            }
            taken
        })
    });
    assert!(
        taken.join().expect("thread"),
        "the RLock stayed held after its owner released all it holds"
    );
}

/// An `RLock` re-entered by its owner while the release of its last level (a dropped guard's,
/// sent from the actor runtime) is on its way: both wait behind a pause of Redis's writes, the
/// re-entry first, on the actor runtime's one connection, so the re-entry reaches the grant
/// before the release does. The grant stays held with the one level its owner took again. Its
/// process used to count the level that release took off as well: a `Condition` wait then took
/// back two levels, and the lock stayed held, and renewed, once the owner released the one it
/// holds.
#[test]
fn an_rlock_reentered_while_its_last_level_is_released_counts_only_the_level_held() {
    let rt = runtime();
    let url = rt.config().redis.url.clone().expect("url");
    let rlock = RLock::new().expect("rlock");
    let cond = Condition::with_rlock(rlock.clone()).expect("condition");
    // Loads the scripts, so that only the two calls below wait for the pause.
    rlock.lock().expect("lock").release().expect("release");
    let token = futures::executor::block_on(async {
        let guard = rlock.lock_async().await.expect("lock_async");
        let token = guard.fencing_token();
        pause_writes(&url, 500);
        let mut reentry = std::pin::pin!(rlock.acquire_async());
        assert!(futures::poll!(reentry.as_mut()).is_pending());
        // The actor runtime sends the re-entry, naming the grant this thread holds...
        std::thread::sleep(Duration::from_millis(150));
        // ...then the release of that grant's last level, behind it on the same connection.
        drop(guard);
        reentry.await.expect("re-entry");
        token
    });
    assert_eq!(
        rlock.fencing_token(),
        Some(token),
        "the re-entry reached the grant before its release"
    );
    assert!(!cond.wait(Some(Duration::from_millis(50))).expect("wait"));
    rlock.release().expect("the level held");
    assert_eq!(rlock.fencing_token(), None, "a level is still counted");
    let other = rlock.clone();
    let taken = std::thread::spawn(move || {
        wait_for(LEASE * 3, || {
            let taken = other.try_acquire().expect("try");
            if taken {
                other.release().expect("release");
            }
            taken
        })
    });
    assert!(
        taken.join().expect("thread"),
        "the RLock stayed held after its owner released all it holds"
    );
}
