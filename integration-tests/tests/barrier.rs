//! `Barrier` against a real redis-server: the arrival and the wait written together (one round
//! trip), timeouts shorter than the first wait slice, and a pass after Redis lost its scripts
//! (`NOSCRIPT` while a wait is already written behind the arrival).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use shoal::Error;
use shoal::prelude::*;
use shoal_integration_tests::{assert_timing, raw_redis};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
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
