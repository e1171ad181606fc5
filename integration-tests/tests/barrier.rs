//! `Barrier` against a real redis-server: the arrival and the wait written together (one round
//! trip), timeouts shorter than the first wait slice, and a pass after Redis lost its scripts
//! (`NOSCRIPT` while a wait is already written behind the arrival).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use shoal::Error;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, assert_timing, pause_writes, raw_redis, wait_for};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

/// A short lease (`sync.lease_secs`): the lease of an action's runner.
const LEASE: Duration = Duration::from_millis(1500);

fn runtime_with_a_short_lease() -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.sync.lease_secs = LEASE.as_secs_f64();
    shoal::init_with(config).expect("runtime")
}

#[shoal::remote]
fn pass_and_report(barrier: Barrier, out: Queue<u32>, passes: u32) {
    for _ in 0..passes {
        out.put(barrier.wait(Some(Duration::from_secs(20))).expect("wait"))
            .expect("put");
    }
}

/// Two processes pass one barrier many times in a tight loop: each pass gives the indices 0 and
/// 1 once each, and nobody is left waiting.
#[test]
fn two_processes_pass_many_times_with_distinct_indices() {
    let _rt = runtime();
    let barrier = Barrier::new(2).expect("barrier");
    let out: Queue<u32> = Queue::new().expect("queue");
    const PASSES: u32 = 200;
    let child = Process::new(pass_and_report, (barrier.clone(), out.clone(), PASSES));
    child.start().expect("start");
    let mut mine = Vec::new();
    for _ in 0..PASSES {
        mine.push(barrier.wait(Some(Duration::from_secs(20))).expect("wait"));
    }
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    let theirs: Vec<u32> = (0..PASSES)
        .map(|_| out.get_timeout(Duration::from_secs(5)).expect("index"))
        .collect();
    for (pass, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        assert_eq!(
            BTreeSet::from([*a, *b]),
            BTreeSet::from([0, 1]),
            "pass {pass}"
        );
    }
    assert_eq!(barrier.n_waiting().expect("n_waiting"), 0);
    assert!(!barrier.broken().expect("broken"));
}

/// A timeout shorter than the first wait slice (written with the arrival) still breaks the
/// barrier on time; a zero timeout breaks it at once unless the caller is the last to arrive
/// (Python: the last party passes whatever its timeout).
#[test]
fn timeouts_shorter_than_the_first_slice() {
    let _rt = runtime();
    let barrier = Barrier::new(2).expect("barrier");
    let started = Instant::now();
    assert!(matches!(
        barrier.wait(Some(Duration::from_millis(30))),
        Err(Error::BrokenBarrier)
    ));
    assert_timing(started, Duration::from_millis(30));
    assert!(barrier.broken().expect("broken"));

    let barrier = Barrier::new(2).expect("barrier");
    assert!(matches!(
        barrier.wait(Some(Duration::ZERO)),
        Err(Error::BrokenBarrier)
    ));
    let single = Barrier::new(1).expect("barrier");
    assert_eq!(single.wait(Some(Duration::ZERO)).expect("last passes"), 0);

    // Waits longer than the first slice check in and go on.
    let barrier = Barrier::new(2).expect("barrier");
    let other = barrier.clone();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        other.wait(None)
    });
    let started = Instant::now();
    let index = barrier.wait(None).expect("released by the late arrival");
    assert!(started.elapsed() >= Duration::from_millis(650));
    let late_index = late.join().expect("thread").expect("late passes");
    assert_eq!(BTreeSet::from([index, late_index]), BTreeSet::from([0, 1]));
}

/// Redis forgets its scripts (`SCRIPT FLUSH`, as after a restart) after the barrier loaded
/// them: the arrivals, written with their waits behind them, meet `NOSCRIPT`, load the script,
/// arrive once each and pass.
#[test]
fn a_pass_after_redis_lost_its_scripts() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    for round in 0..3 {
        let barrier = Barrier::new(3).expect("barrier");
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query::<()>(&mut raw)
            .expect("flush");
        let started = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || barrier.wait(Some(Duration::from_secs(20))))
            })
            .collect();
        let mine = barrier.wait(Some(Duration::from_secs(20))).expect("wait");
        let mut indices = BTreeSet::from([mine]);
        for t in threads {
            indices.insert(t.join().expect("thread").expect("wait"));
        }
        assert_eq!(indices, BTreeSet::from([0, 1, 2]), "round {round}");
        assert!(started.elapsed() < Duration::from_secs(10), "round {round}");
        assert_eq!(barrier.n_waiting().expect("n_waiting"), 0);
    }
}

/// A waiter whose barrier's keys are replaced by something shoal did not write is told so,
/// as an arrival would be: the check between its wait's slices is a pipeline, whose error
/// redis-rs reports without a code unless shoal takes the failed command's own.
#[test]
fn a_waiter_finds_garbage_in_its_barrier_keys_and_says_so() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let barrier = Barrier::new(2).expect("barrier");
    let waiter = {
        let barrier = barrier.clone();
        std::thread::spawn(move || barrier.wait(Some(Duration::from_secs(20))))
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{*:barrier:*}:state")
        .query(&mut raw)
        .expect("keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    // Once the waiter has arrived (count 1), its state becomes a string.
    let started = Instant::now();
    while redis::cmd("HGET")
        .arg(&keys[0])
        .arg("count")
        .query::<Option<String>>(&mut raw)
        .expect("count")
        .as_deref()
        != Some("1")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the waiter arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    redis::pipe()
        .del(&keys[0])
        .set(&keys[0], "not a barrier")
        .query::<()>(&mut raw)
        .expect("garbage");
    match waiter.join().expect("waiter") {
        Err(Error::InvalidState(m)) => assert!(m.contains("did not write"), "{m}"),
        other => panic!("the waiter got {other:?}"),
    }
}

/// An action whose process dies in it (as by SIGKILL or a crash).
#[shoal::remote]
fn die_in_the_action() {
    std::process::abort();
}

#[shoal::remote]
fn arrive(barrier: Barrier) {
    let _ = barrier.wait(None);
}

/// The last arrival runs the action and its process dies in it: the generation would never be
/// released. Its runner's lease lapses, and the barrier breaks (as for an action that failed):
/// a waiter past its timeout gets `BrokenBarrier` about a lease later, instead of waiting for
/// ever, and so does a waiter without a timeout.
#[test]
fn a_runner_that_dies_in_the_action_breaks_the_barrier() {
    let _rt = runtime_with_a_short_lease();
    let barrier = Barrier::with_action(3, die_in_the_action, ()).expect("barrier");
    let (done, results) = std::sync::mpsc::channel();
    for timeout in [Some(Duration::from_secs(2)), None] {
        let (barrier, done) = (barrier.clone(), done.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = barrier.wait(timeout);
            let _ = done.send((timeout, result, started.elapsed()));
        });
    }
    assert!(
        wait_for(Duration::from_secs(10), || barrier
            .n_waiting()
            .expect("n_waiting")
            == 2),
        "both waiters arrived"
    );
    let runner = Process::new(arrive, (barrier.clone(),));
    runner.start().expect("start");
    runner.join(Some(Duration::from_secs(30))).expect("join");
    assert!(
        matches!(runner.exitcode(), Some(code) if code != 0),
        "the runner died in the action: {:?}",
        runner.exitcode()
    );
    for _ in 0..2 {
        let (timeout, result, waited) = results
            .recv_timeout(Duration::from_secs(30))
            .expect("a waiter waits for ever for a runner that died");
        assert!(
            matches!(result, Err(Error::BrokenBarrier)),
            "timeout {timeout:?}: {result:?}"
        );
        // The timeout, then the lease and half a lease, checked once a second.
        let bound = Duration::from_secs(2) + 2 * LEASE + Duration::from_secs(3);
        assert!(waited < bound, "timeout {timeout:?}: waited {waited:?}");
    }
    assert!(barrier.broken().expect("broken"));
}

/// An action that takes three leases: its runner lives, and renews its lease meanwhile.
#[shoal::remote]
fn take_three_leases() {
    std::thread::sleep(3 * LEASE);
}

/// A waiter with a 500 ms timeout arrives, then this thread arrives last and runs `barrier`'s
/// action (longer than the timeout): both are released, and the barrier is not broken.
fn waiter_released_after_a_long_action(barrier: &Barrier) {
    let waiter = {
        let barrier = barrier.clone();
        std::thread::spawn(move || barrier.wait(Some(Duration::from_millis(500))))
    };
    assert!(
        wait_for(Duration::from_secs(10), || barrier
            .n_waiting()
            .expect("n_waiting")
            == 1),
        "the waiter arrived"
    );
    let mine = barrier.wait(None).expect("the runner releases");
    let theirs = waiter
        .join()
        .expect("waiter")
        .expect("released after the action");
    assert_eq!(BTreeSet::from([mine, theirs]), BTreeSet::from([0, 1]));
    assert!(!barrier.broken().expect("broken"));
}

/// An action longer than the lease does not break the barrier while its runner lives: a
/// waiter whose timeout passed during it is released with the others (Python's waiter cannot
/// time out while the action holds the barrier's lock).
#[test]
fn an_action_longer_than_the_lease_releases_the_waiters() {
    let _rt = runtime_with_a_short_lease();
    let barrier = Barrier::with_action(2, take_three_leases, ()).expect("barrier");
    waiter_released_after_a_long_action(&barrier);
}

/// The local ports of this process's TCP connections to `port` on the loopback address.
fn own_connections_to(port: u16) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        if let Ok(link) = std::fs::read_link(fd.path()) {
            let link = link.to_string_lossy().to_string();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
    }
    let table = std::fs::read_to_string("/proc/self/net/tcp").expect("/proc/self/net/tcp");
    let port_of = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
            (port_of(remote) == Some(port) && inodes.contains(*inode))
                .then(|| port_of(local))
                .flatten()
        })
        .collect()
}

/// An action that cuts every connection its process has to the Redis at `url`, as a
/// network blip does: the next command on each fails as if Redis went away.
#[shoal::remote]
fn cut_this_process_off(url: String) {
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a port in the url");
    let ports = own_connections_to(port);
    assert!(!ports.is_empty(), "this process has connections to Redis");
    let mut admin = redis::Client::open(url.as_str())
        .expect("client")
        .get_connection()
        .expect("connection");
    for local in ports {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ADDR")
            .arg(format!("127.0.0.1:{local}"))
            .arg("SKIPME")
            .arg("yes")
            .query::<u64>(&mut admin)
            .expect("CLIENT KILL");
    }
}

#[shoal::remote]
fn pass_as_the_runner(barrier: Barrier) {
    barrier.wait(None).expect("the runner passes");
}

/// The runner's release meets a connection that Redis dropped (its process was cut off during
/// the action): it is sent again, and every party passes, instead of the runner failing and
/// the others waiting for its lease to lapse.
#[test]
fn a_release_that_meets_a_dropped_connection_is_sent_again() {
    let server = TestRedis::tcp();
    let config = Config::builder()
        .redis_url(server.url())
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let barrier = Barrier::with_action(2, cut_this_process_off, (server.url(),)).expect("barrier");
    let (done, result) = std::sync::mpsc::channel();
    {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            let _ = done.send(barrier.wait(Some(Duration::from_secs(2))));
        });
    }
    assert!(
        wait_for(Duration::from_secs(10), || barrier
            .n_waiting()
            .expect("n_waiting")
            == 1),
        "the waiter arrived"
    );
    let runner = Process::new(pass_as_the_runner, (barrier.clone(),));
    runner.start().expect("start");
    runner.join(Some(Duration::from_secs(30))).expect("join");
    assert_eq!(runner.exitcode(), Some(0), "the runner passed");
    let mine = result
        .recv_timeout(Duration::from_secs(30))
        .expect("the waiter is released");
    assert!(mine.is_ok(), "{mine:?}");
    assert!(!barrier.broken().expect("broken"));
}

/// An action during which Redis runs no write for twice the lease (`CLIENT PAUSE WRITE`), then
/// ends a moment later.
#[shoal::remote]
fn outage_in_the_action(url: String) {
    pause_writes(&url, 2 * LEASE.as_millis() as u64);
    std::thread::sleep(2 * LEASE + Duration::from_millis(300));
}

/// An outage longer than the lease during the action does not pass for the runner's death:
/// its lease lapsed meanwhile, but it renews it once Redis is back, and every party passes.
#[test]
fn an_outage_during_the_action_does_not_break_the_barrier() {
    let server = TestRedis::tcp();
    let mut config = Config::builder()
        .redis_url(server.url())
        .build()
        .expect("config");
    config.sync.lease_secs = LEASE.as_secs_f64();
    let _rt = shoal::init_with(config).expect("runtime");
    let barrier = Barrier::with_action(2, outage_in_the_action, (server.url(),)).expect("barrier");
    waiter_released_after_a_long_action(&barrier);
}
