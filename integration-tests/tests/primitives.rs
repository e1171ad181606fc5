//! Queues, pipes, events, conditions, barriers, values and arrays against a real redis-server,
//! across real processes: Python's semantics, timing bounds of every timeout, stress, and keys
//! that were deleted or hold garbage.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal::prelude::*;
use shoal::{Error, TaskErrorKind};
use shoal_integration_tests::{assert_timing, raw_redis, read_file, scratch};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

/// Every key of the namespace that contains `kind`.
fn keys_of(conn: &mut redis::Connection, kind: &str) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{default:*")
        .query(conn)
        .expect("keys");
    keys.into_iter()
        .filter(|k| k.contains(&format!(":{kind}:")))
        .collect()
}

// ---------------------------------------------------------------------------------- events --

#[shoal::remote]
fn set_after(event: Event, ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
    event.set().expect("set");
}

#[test]
fn event_set_clear_wait() {
    let _rt = runtime();
    let event = Event::new().expect("event");
    assert!(!event.is_set().expect("is_set"));
    let started = Instant::now();
    assert!(!event.wait(Some(Duration::from_millis(300))).expect("wait"));
    assert_timing(started, Duration::from_millis(300));
    let p = Process::new(set_after, (event.clone(), 300u64));
    p.start().expect("start");
    let started = Instant::now();
    assert!(event.wait(None).expect("wait"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(event.is_set().expect("is_set"));
    assert!(
        event
            .wait(Some(Duration::ZERO))
            .expect("set: returns at once")
    );
    event.clear().expect("clear");
    assert!(!event.is_set().expect("cleared"));
    p.join(None).expect("join");
}

#[shoal::remote]
fn wait_for_event(event: Event, out: Queue<bool>) {
    out.put(event.wait(Some(Duration::from_secs(10))).expect("wait"))
        .expect("put");
}

#[test]
fn set_wakes_every_waiting_process() {
    let _rt = runtime();
    let event = Event::new().expect("event");
    let out: Queue<bool> = Queue::new().expect("queue");
    let waiters: Vec<Process> = (0..3)
        .map(|_| Process::new(wait_for_event, (event.clone(), out.clone())))
        .collect();
    for w in &waiters {
        w.start().expect("start");
    }
    std::thread::sleep(Duration::from_millis(300));
    event.set().expect("set");
    for _ in 0..3 {
        assert!(out.get_timeout(Duration::from_secs(5)).expect("woken"));
    }
    for w in &waiters {
        w.join(None).expect("join");
    }
}

// ------------------------------------------------------------------------------ conditions --

#[test]
fn condition_needs_its_lock_and_times_out() {
    let _rt = runtime();
    let cond = Condition::new(None).expect("condition");
    assert!(matches!(
        cond.wait(Some(Duration::from_millis(10))),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(cond.notify(1), Err(Error::InvalidState(_))));
    assert!(matches!(cond.notify_all(), Err(Error::InvalidState(_))));
    let guard = cond.lock().expect("lock");
    let started = Instant::now();
    assert!(!cond.wait(Some(Duration::from_millis(300))).expect("wait"));
    assert_timing(started, Duration::from_millis(300));
    // wait took the lock back: notify needs it.
    cond.notify_all().expect("notify with the lock held");
    drop(guard);
    // An RLock held twice is released fully while waiting and restored after.
    cond.acquire().expect("1");
    cond.acquire().expect("2");
    assert!(!cond.wait(Some(Duration::from_millis(50))).expect("wait"));
    cond.release().expect("2");
    cond.release().expect("1");
    assert!(matches!(cond.release(), Err(Error::InvalidState(_))));

    let lock = Lock::new().expect("lock");
    let cond = Condition::new(Some(lock.clone())).expect("condition on a Lock");
    cond.acquire().expect("acquire");
    assert!(!lock.try_acquire().expect("the condition holds the lock"));
    cond.release().expect("release");
}

#[shoal::remote]
fn wait_on(cond: Condition, out: Queue<String>, name: String) {
    let _guard = cond.lock().expect("lock");
    out.put(format!("{name} waiting")).expect("put");
    let notified = cond.wait(Some(Duration::from_secs(10))).expect("wait");
    out.put(format!("{name} {notified}")).expect("put");
}

#[test]
fn notify_wakes_one_and_notify_all_the_rest() {
    let _rt = runtime();
    let cond = Condition::new(None).expect("condition");
    let out: Queue<String> = Queue::new().expect("queue");
    let waiters: Vec<Process> = ["a", "b", "c"]
        .iter()
        .map(|n| Process::new(wait_on, (cond.clone(), out.clone(), n.to_string())))
        .collect();
    for w in &waiters {
        w.start().expect("start");
    }
    for _ in 0..3 {
        assert!(
            out.get_timeout(Duration::from_secs(5))
                .expect("waiting")
                .ends_with("waiting")
        );
    }
    {
        let _guard = cond.lock().expect("lock");
        cond.notify(1).expect("notify");
    }
    let first = out.get_timeout(Duration::from_secs(5)).expect("one woke");
    assert!(first.ends_with(" true"), "{first}");
    assert!(
        matches!(
            out.get_timeout(Duration::from_millis(300)),
            Err(Error::Empty)
        ),
        "only one woke"
    );
    {
        let _guard = cond.lock().expect("lock");
        cond.notify_all().expect("notify_all");
    }
    for _ in 0..2 {
        assert!(
            out.get_timeout(Duration::from_secs(5))
                .expect("woke")
                .ends_with(" true")
        );
    }
    for w in &waiters {
        w.join(None).expect("join");
        assert_eq!(w.exitcode(), Some(0));
    }
}

#[shoal::remote]
fn bump_and_notify(cond: Condition, counter: Value<i64>, times: u32) {
    for _ in 0..times {
        let _guard = cond.lock().expect("lock");
        counter.set(counter.get().expect("get") + 1).expect("set");
        cond.notify_all().expect("notify");
    }
}

#[test]
fn wait_for_sees_every_update_with_no_lost_wake_up() {
    let _rt = runtime();
    let cond = Condition::new(None).expect("condition");
    let counter = Value::new(0i64).expect("value");
    let p = Process::new(bump_and_notify, (cond.clone(), counter.clone(), 50u32));
    p.start().expect("start");
    let _guard = cond.lock().expect("lock");
    let reached = cond
        .wait_for(
            || counter.get().expect("get") >= 50,
            Some(Duration::from_secs(20)),
        )
        .expect("wait_for");
    assert!(reached);
    assert_eq!(counter.get().expect("get"), 50);
    let started = Instant::now();
    assert!(
        !cond
            .wait_for(|| false, Some(Duration::from_millis(300)))
            .expect("wait_for")
    );
    assert_timing(started, Duration::from_millis(300));
    drop(_guard);
    p.join(None).expect("join");
}

// -------------------------------------------------------------------------------- barriers --

#[shoal::remote]
fn pass_barrier(barrier: Barrier, out: Queue<u32>, rounds: u32) {
    for _ in 0..rounds {
        out.put(barrier.wait(None).expect("wait")).expect("put");
    }
}

#[shoal::remote]
fn count_generation(counter: Value<i64>) {
    counter.fetch_add(1).expect("add");
}

/// An action that says it started, then waits for the test to let it finish.
#[shoal::remote]
fn count_generation_when_told(counter: Value<i64>, acting: Event, finish: Event) {
    acting.set().expect("set");
    assert!(finish.wait(Some(Duration::from_secs(30))).expect("wait"));
    counter.fetch_add(1).expect("add");
}

/// A barrier of 2 whose action ([`count_generation_when_told`]) sets `acting`, then waits for
/// `finish` before it counts its generation in `counter`.
fn barrier_with_a_held_action() -> (Barrier, Value<i64>, Event, Event) {
    let counter = Value::new_raw(0i64).expect("value");
    let (acting, finish) = (Event::new().expect("event"), Event::new().expect("event"));
    let barrier = Barrier::with_action(
        2,
        count_generation_when_told,
        (counter.clone(), acting.clone(), finish.clone()),
    )
    .expect("barrier");
    (barrier, counter, acting, finish)
}

/// A caller that comes while the last arrival runs the action waits for that generation to
/// end and arrives in the next one (Python's `Barrier._enter`): the action runs once per
/// generation, and every index is in `0..parties`.
#[test]
fn a_caller_that_comes_while_the_action_runs_joins_the_next_generation() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let (barrier, counter, acting, finish) = barrier_with_a_held_action();
    let wait = || {
        let barrier = barrier.clone();
        std::thread::spawn(move || barrier.wait(Some(Duration::from_secs(30))))
    };
    let first = [wait(), wait()];
    assert!(
        acting
            .wait(Some(Duration::from_secs(10)))
            .expect("the action started")
    );
    let late = wait();
    // The late caller is entering (without the fix it ran the action too, and waits on
    // `finish` in it).
    let mut entering = || -> usize {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("shoal:{*:barrier:*}:entering")
            .query(&mut raw)
            .expect("keys");
        keys.len()
    };
    shoal_integration_tests::wait_for(Duration::from_secs(5), || entering() == 1);
    finish.set().expect("finish");
    let mut passed: Vec<u32> = first
        .into_iter()
        .map(|t| {
            t.join()
                .expect("thread")
                .expect("the first generation passed")
        })
        .collect();
    passed.sort_unstable();
    assert_eq!(passed, vec![0, 1], "distinct indices in 0..2");
    assert_eq!(
        counter.get().expect("get"),
        1,
        "one action for one generation"
    );
    assert!(
        !late.is_finished(),
        "the late caller waits for a second party"
    );
    assert!(!barrier.broken().expect("broken"));
    let second = barrier
        .wait(Some(Duration::from_secs(30)))
        .expect("second generation");
    let late = late
        .join()
        .expect("thread")
        .expect("the late caller passed");
    let mut second_pass = vec![late, second];
    second_pass.sort_unstable();
    assert_eq!(second_pass, vec![0, 1], "distinct indices in 0..2");
    assert_eq!(counter.get().expect("get"), 2);
}

/// A waiter whose timeout passes while the last arrival runs the action is released with
/// the others: in Python the action holds the lock the waiter needs to time out, so the
/// generation that arrived is not broken.
#[test]
fn a_timeout_that_passes_while_the_action_runs_does_not_break_the_barrier() {
    let _rt = runtime();
    let (barrier, counter, acting, finish) = barrier_with_a_held_action();
    let impatient = {
        let barrier = barrier.clone();
        std::thread::spawn(move || barrier.wait(Some(Duration::from_millis(400))))
    };
    std::thread::sleep(Duration::from_millis(100));
    let last = {
        let barrier = barrier.clone();
        std::thread::spawn(move || barrier.wait(Some(Duration::from_secs(30))))
    };
    assert!(
        acting
            .wait(Some(Duration::from_secs(10)))
            .expect("the action started")
    );
    // The impatient waiter's 400 ms pass while the action runs.
    std::thread::sleep(Duration::from_millis(800));
    finish.set().expect("finish");
    let mut passed = vec![
        impatient
            .join()
            .expect("thread")
            .expect("released with the others"),
        last.join()
            .expect("thread")
            .expect("the last arrival passed"),
    ];
    passed.sort_unstable();
    assert_eq!(passed, vec![0, 1]);
    assert!(!barrier.broken().expect("broken"));
    assert_eq!(counter.get().expect("get"), 1);
}

#[test]
fn barrier_indices_generations_and_action() {
    let _rt = runtime();
    let counter = Value::new_raw(0i64).expect("value");
    let barrier = Barrier::with_action(3, count_generation, (counter.clone(),)).expect("barrier");
    assert_eq!(barrier.parties(), 3);
    let out: Queue<u32> = Queue::new().expect("queue");
    let procs: Vec<Process> = (0..3)
        .map(|_| Process::new(pass_barrier, (barrier.clone(), out.clone(), 20u32)))
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    let mut indices: BTreeMap<u32, u32> = BTreeMap::new();
    for _ in 0..60 {
        *indices
            .entry(out.get_timeout(Duration::from_secs(5)).expect("index"))
            .or_default() += 1;
    }
    assert_eq!(
        indices,
        BTreeMap::from([(0, 20), (1, 20), (2, 20)]),
        "distinct indices each generation"
    );
    assert_eq!(
        counter.get().expect("get"),
        20,
        "the action ran once per generation"
    );
    assert_eq!(barrier.n_waiting().expect("n_waiting"), 0);
    assert!(!barrier.broken().expect("broken"));
}

#[shoal::remote]
fn wait_expecting_broken(barrier: Barrier, out: Queue<String>) {
    let result = barrier.wait(None);
    out.put(format!("{result:?}")).expect("put");
}

#[test]
fn a_timeout_or_abort_breaks_the_barrier_for_everyone_until_reset() {
    let _rt = runtime();
    let barrier = Barrier::new(3).expect("barrier");
    let out: Queue<String> = Queue::new().expect("queue");
    let other = Process::new(wait_expecting_broken, (barrier.clone(), out.clone()));
    other.start().expect("start");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(barrier.n_waiting().expect("n_waiting"), 1);
    let started = Instant::now();
    assert!(matches!(
        barrier.wait(Some(Duration::from_millis(300))),
        Err(Error::BrokenBarrier)
    ));
    assert_timing(started, Duration::from_millis(300));
    assert_eq!(
        out.get_timeout(Duration::from_secs(5)).expect("other"),
        "Err(BrokenBarrier)"
    );
    assert!(barrier.broken().expect("broken"));
    assert!(
        matches!(barrier.wait(None), Err(Error::BrokenBarrier)),
        "broken until reset"
    );
    barrier.reset().expect("reset");
    assert!(!barrier.broken().expect("reset"));

    let waiter = Process::new(wait_expecting_broken, (barrier.clone(), out.clone()));
    waiter.start().expect("start");
    std::thread::sleep(Duration::from_millis(200));
    barrier.abort().expect("abort");
    assert_eq!(
        out.get_timeout(Duration::from_secs(5)).expect("aborted"),
        "Err(BrokenBarrier)"
    );
    assert!(barrier.broken().expect("broken"));
    other.join(None).expect("join");
    waiter.join(None).expect("join");

    let single = Barrier::new(1).expect("barrier");
    assert_eq!(single.wait(None).expect("one party passes alone"), 0);
    assert!(matches!(Barrier::new(0), Err(Error::InvalidState(_))));
}

#[shoal::remote]
fn failing_action() {
    panic!("the action fails");
}

#[test]
fn a_failing_action_breaks_the_barrier() {
    let _rt = runtime();
    let barrier = Barrier::with_action(1, failing_action, ()).expect("barrier");
    match barrier.wait(None) {
        Err(Error::Task(e)) => {
            assert_eq!(e.kind, TaskErrorKind::Panic);
            assert!(e.message.starts_with("the action fails at "), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(barrier.broken().expect("broken"));
}

// ------------------------------------------------------------------------- values, arrays --

#[shoal::remote]
fn deposit(balance: Value<i32>, lock: Lock, times: u32, delta: i32) {
    for _ in 0..times {
        lock.acquire().expect("acquire");
        balance
            .set(balance.get().expect("get") + delta)
            .expect("set");
        lock.release().expect("release");
    }
}

#[test]
fn the_bank_balance_ends_at_exactly_100() {
    let _rt = runtime();
    let balance = Value::new(100i32).expect("value");
    let lock = balance.get_lock().expect("lock").clone();
    let withdraw = Process::new(deposit, (balance.clone(), lock.clone(), 300u32, -1));
    let add = Process::new(deposit, (balance.clone(), lock, 300u32, 1));
    withdraw.start().expect("start");
    add.start().expect("start");
    withdraw.join(None).expect("join");
    add.join(None).expect("join");
    assert_eq!(balance.get().expect("get"), 100);
}

#[test]
fn values_of_every_typecode_and_fetch_add() {
    let _rt = runtime();
    assert_eq!(Value::new(1.5f64).expect("d").get().expect("get"), 1.5);
    assert_eq!(Value::new(-7i8).expect("b").typecode(), 'b');
    assert_eq!(Value::new('λ').expect("u").get().expect("get"), 'λ');
    assert!(Value::new(true).expect("?").get().expect("get"));
    assert_eq!(
        Value::new(u64::MAX).expect("Q").get().expect("get"),
        u64::MAX
    );
    let v = Value::new(0.5f32).expect("f");
    assert_eq!(v.fetch_add(0.25).expect("add"), 0.5);
    assert_eq!(v.get().expect("get"), 0.75);

    let n = Value::new(125i8).expect("b");
    assert_eq!(n.fetch_add(2).expect("add"), 125);
    assert!(
        matches!(n.fetch_add(1), Err(Error::InvalidState(_))),
        "128 does not fit an i8"
    );
    assert_eq!(n.get().expect("unchanged"), 127);
    n.set(-3).expect("set");
    assert_eq!(n.get().expect("get"), -3);

    let raw = Value::new_raw(1u32).expect("raw");
    assert!(matches!(raw.get_lock(), Err(Error::InvalidState(_))));

    // Exact past 2^53 (Lua's numbers are doubles): a nanosecond clock, say.
    let big = Value::new(1i64 << 60).expect("q");
    assert_eq!(big.fetch_add(1).expect("add"), 1 << 60);
    assert_eq!(big.get().expect("get"), (1 << 60) + 1);
    let top = Value::new(i64::MAX - 1).expect("q");
    assert_eq!(top.fetch_add(1).expect("add"), i64::MAX - 1);
    assert!(
        matches!(top.fetch_add(1), Err(Error::InvalidState(_))),
        "past 64 bits"
    );
    assert_eq!(top.get().expect("unchanged"), i64::MAX);
    // A sum outside the type is taken back exactly, whatever the delta.
    let small = Array::new(vec![0i32, 5]).expect("array");
    assert!(matches!(
        small.fetch_add(0, i64::MIN),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        small.fetch_add(1, i64::MAX - 4),
        Err(Error::InvalidState(_))
    ));
    assert_eq!(small.to_vec().expect("unchanged"), vec![0, 5]);
}

#[test]
fn an_add_to_a_value_shoal_did_not_write_says_so() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let v = Value::new(5i64).expect("value");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{*:value:*}:value")
        .query(&mut raw)
        .expect("keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    redis::cmd("SET")
        .arg(&keys[0])
        .arg("not a number")
        .query::<()>(&mut raw)
        .expect("set");
    match v.fetch_add(1) {
        Err(Error::InvalidState(m)) => assert!(m.contains("did not write"), "{m}"),
        other => panic!("an add to garbage gave {other:?}"),
    }
}

#[shoal::remote]
fn add_to_each(arr: Array<i32>) {
    let lock = arr.get_lock().expect("lock");
    let _guard = lock.lock().expect("lock");
    for i in 0..arr.len() {
        arr.set(i, arr.get(i).expect("get") + 1).expect("set");
    }
}

#[test]
fn arrays_get_set_slices_and_bounds() {
    let _rt = runtime();
    let arr = Array::new(vec![1i32, 2, 3, 4, 5]).expect("array");
    assert_eq!(arr.len(), 5);
    let procs: Vec<Process> = (0..2)
        .map(|_| Process::new(add_to_each, (arr.clone(),)))
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
    }
    assert_eq!(arr.to_vec().expect("to_vec"), vec![3, 4, 5, 6, 7]);
    assert_eq!(arr.get_slice(1..3).expect("slice"), vec![4, 5]);
    arr.set_slice(3, &[0, 0]).expect("set_slice");
    assert_eq!(arr.to_vec().expect("to_vec"), vec![3, 4, 5, 0, 0]);
    assert!(matches!(arr.get(5), Err(Error::InvalidState(_))));
    assert!(matches!(arr.get(usize::MAX), Err(Error::InvalidState(_))));
    assert!(matches!(
        arr.set(usize::MAX, 1),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        arr.fetch_add(usize::MAX, 1),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        arr.set_slice(4, &[1, 2]),
        Err(Error::InvalidState(_))
    ));
    assert_eq!(arr.fetch_add(0, 10).expect("add"), 3);
    assert_eq!(arr.get(0).expect("get"), 13);
    let zeros: Array<f64> = Array::zeroed(3).expect("zeros");
    assert_eq!(zeros.to_vec().expect("to_vec"), vec![0.0; 3]);
    let empty: Array<u8> = Array::new_raw(vec![]).expect("empty");
    assert!(empty.is_empty() && empty.to_vec().expect("to_vec").is_empty());
}

#[test]
fn deleted_or_garbage_values_locks_and_events_are_clear_errors() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let v = Value::new(5i32).expect("value");
    let key = keys_of(&mut raw, "value").pop().expect("value key");
    redis::cmd("SET")
        .arg(&key)
        .arg("not a number")
        .query::<()>(&mut raw)
        .expect("set");
    match v.get() {
        Err(Error::Codec {
            key: k, expected, ..
        }) => assert_eq!((k, expected.as_str()), (key.clone(), "i32")),
        other => panic!("{other:?}"),
    }
    redis::cmd("DEL")
        .arg(&key)
        .query::<()>(&mut raw)
        .expect("del");
    assert!(matches!(v.get(), Err(Error::InvalidState(_))));
    assert!(matches!(v.set(1), Err(Error::InvalidState(_))));
    assert!(matches!(v.fetch_add(1), Err(Error::InvalidState(_))));

    let lock = Lock::new().expect("lock");
    let event = Event::new().expect("event");
    let barrier = Barrier::new(2).expect("barrier");
    let (a, _b) = Pipe::new::<u8>(true).expect("pipe");
    for kind in ["lock", "event", "barrier", "pipe"] {
        for key in keys_of(&mut raw, kind) {
            redis::cmd("DEL")
                .arg(&key)
                .query::<()>(&mut raw)
                .expect("del");
        }
    }
    let started = Instant::now();
    assert!(matches!(lock.acquire(), Err(Error::InvalidState(_))));
    assert!(matches!(event.wait(None), Err(Error::InvalidState(_))));
    assert!(matches!(barrier.wait(None), Err(Error::InvalidState(_))));
    assert!(matches!(a.recv(), Err(Error::InvalidState(_))));
    assert!(matches!(a.send(&1), Err(Error::InvalidState(_))));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a call on a deleted primitive hung"
    );

    let lock = Lock::new().expect("lock");
    let state = keys_of(&mut raw, "lock")
        .into_iter()
        .find(|k| k.ends_with(":state"))
        .expect("state");
    redis::cmd("HSET")
        .arg(&state)
        .arg("value")
        .arg("many")
        .query::<()>(&mut raw)
        .expect("hset");
    match lock.acquire() {
        Err(Error::InvalidState(reason)) => assert!(reason.contains("did not write"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[shoal::remote]
fn quick() {}

#[test]
fn duration_max_means_forever_not_a_panic() {
    let _rt = runtime();
    let forever = Duration::MAX;
    let q: Queue<u8> = Queue::with_maxsize(1).expect("queue");
    q.put_timeout(1, forever).expect("put");
    assert_eq!(q.get_timeout(forever).expect("get"), 1);
    let lock = Lock::new().expect("lock");
    assert!(lock.acquire_timeout(forever).expect("acquire"));
    lock.release().expect("release");
    let sem = Semaphore::new(1).expect("semaphore");
    assert!(sem.acquire_timeout(forever).expect("acquire"));
    let event = Event::new().expect("event");
    event.set().expect("set");
    assert!(event.wait(Some(forever)).expect("wait"));
    assert_eq!(
        Barrier::new(1)
            .expect("barrier")
            .wait(Some(forever))
            .expect("wait"),
        0
    );
    let (a, b) = Pipe::new::<u8>(true).expect("pipe");
    b.send(&1).expect("send");
    assert!(a.poll(Some(forever)).expect("poll"));
    let p = Process::new(quick, ());
    p.start().expect("start");
    p.join(Some(forever)).expect("join");
    assert_eq!(p.exitcode(), Some(0));
    let pool = Pool::new(1).expect("pool");
    let r = pool.apply_async(quick, ()).expect("apply_async");
    r.get(Some(forever)).expect("get");
    let mut it = pool.imap(shoal_square, 0..2u64).expect("imap");
    assert_eq!(it.next_timeout(forever).expect("item").expect("ok"), 0);
}

#[shoal::remote]
fn shoal_square(x: u64) -> u64 {
    x * x
}

// --------------------------------------------------------------------------- cross-process --

#[shoal::remote]
fn report_all(q: Queue<String>, event: Event, lock: Lock, sem: Semaphore, path: String) {
    event.wait(None).expect("event");
    let _l = lock.lock().expect("lock");
    let _s = sem.lock().expect("semaphore");
    q.put("child saw them all".into()).expect("put");
    q.close().expect("close");
    q.join_thread().expect("join_thread");
    std::fs::write(path, "done").expect("write");
}

#[test]
fn handles_travel_to_a_child_as_arguments() {
    let _rt = runtime();
    let q: Queue<String> = Queue::new().expect("queue");
    let event = Event::new().expect("event");
    let lock = Lock::new().expect("lock");
    let sem = Semaphore::new(1).expect("semaphore");
    let dir = scratch();
    let path = dir.path().join("done");
    let p = Process::new(
        report_all,
        (
            q.clone(),
            event.clone(),
            lock,
            sem,
            path.display().to_string(),
        ),
    );
    p.start().expect("start");
    event.set().expect("set");
    assert_eq!(
        q.get_timeout(Duration::from_secs(5)).expect("get"),
        "child saw them all"
    );
    p.join(None).expect("join");
    assert_eq!(read_file(&path), "done");
}

// ------------------------------------------------------------- conditions: stopped waiters --

#[shoal::remote]
fn wait_for_a_notification(cond: Condition, out: Queue<String>) {
    cond.acquire().expect("acquire");
    // The async form: its wait's reads are the actor runtime's, which go on after SIGSTOP and
    // SIGCONT (a blocking socket read with a timeout fails with EINTR then).
    let notified = futures::executor::block_on(cond.wait_async(None)).expect("wait");
    out.put(format!("woke {notified}")).expect("put");
    cond.release().expect("release");
}

/// A waiter stopped (`SIGSTOP`) for longer than it counts as alive without checking in is
/// taken for dead by a `notify(1)`, which finds no live waiter: it is woken all the same, and
/// once it resumes its wait returns (as notified), instead of queueing itself again while the
/// notification went to nobody.
#[test]
fn a_waiter_stopped_past_its_liveness_still_gets_the_notification() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let cond = Condition::new(None).expect("condition");
    let out: Queue<String> = Queue::new().expect("queue");
    let child = Process::new(wait_for_a_notification, (cond.clone(), out.clone()));
    child.start().expect("start");
    let mut queued = || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("shoal:*:cond:*:waiters")
            .query(&mut raw)
            .expect("keys");
        keys.len() == 1
            && redis::cmd("LLEN")
                .arg(&keys[0])
                .query::<u64>(&mut raw)
                .expect("llen")
                == 1
    };
    assert!(
        shoal_integration_tests::wait_for(Duration::from_secs(20), &mut queued),
        "the child waits on the condition"
    );
    let pid = Pid::from_raw(child.pid().expect("pid") as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    // Three seconds without a check-in: taken for dead.
    std::thread::sleep(Duration::from_secs(4));
    cond.acquire().expect("acquire");
    cond.notify(1).expect("notify");
    cond.release().expect("release");
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let woke = out.get_timeout(Duration::from_secs(10));
    if woke.is_err() {
        let _ = child.kill();
    }
    assert_eq!(woke.expect("the child woke up"), "woke true");
    child.join(Some(Duration::from_secs(20))).expect("join");
    assert_eq!(child.exitcode(), Some(0));
}
