//! TTLs: every key expires after `redis.expiry_secs` idle, and use keeps it alive. With a 2 s
//! expiry, primitives used for longer keep working, a lock held for longer stays held (its
//! heartbeat refreshes it), and one left idle past the expiry is reported gone.

use std::time::{Duration, Instant};

use shoal::prelude::*;

shoal::test_support!();

const EXPIRY: u64 = 2;

fn runtime() -> shoal::Runtime {
    // Every lease within the expiry, as the configuration requires.
    let mut config = Config::default();
    config.redis.expiry_secs = EXPIRY;
    config.sync.lease_secs = 1.0;
    config.pool.task_lease_secs = 1.0;
    shoal::init_with(config).expect("runtime")
}

#[test]
fn primitives_in_use_outlive_the_expiry_and_idle_ones_do_not() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let q: Queue<u32> = Queue::new().expect("queue");
    let v = Value::new(0i64).expect("value");
    let total = Value::new(0.0f64).expect("float value");
    let event = Event::new().expect("event");
    let (a, b) = Pipe::new::<u32>(true).expect("pipe");
    let sem = Semaphore::new(1).expect("semaphore");
    let barrier = Barrier::new(1).expect("barrier");
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(3 * EXPIRY) {
        lock.acquire().expect("lock");
        lock.release().expect("unlock");
        q.put(n).expect("put");
        assert_eq!(q.get().expect("get"), n);
        v.fetch_add(1).expect("add");
        total.fetch_add(0.5).expect("float add");
        event.clear().expect("clear");
        b.send(&n).expect("send");
        assert_eq!(a.recv().expect("recv"), n);
        sem.acquire().expect("acquire");
        sem.release().expect("release");
        barrier.wait(None).expect("barrier");
        n += 1;
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(v.get().expect("get"), n as i64);
    assert_eq!(total.get().expect("float get"), n as f64 / 2.0);

    // Held across several expiry periods: the holder's heartbeat keeps the lock alive.
    let held = Lock::new().expect("lock");
    let guard = held.lock().expect("lock");
    std::thread::sleep(Duration::from_secs(2 * EXPIRY + 1));
    assert!(!held.try_acquire().expect("still held"));
    guard.release().expect("the hold is intact");

    // Idle past the expiry: gone, and said so.
    let idle = Value::new(1u8).expect("value");
    std::thread::sleep(Duration::from_secs(EXPIRY + 1));
    assert!(matches!(idle.get(), Err(Error::InvalidState(_))));
}

/// How long the waits below last: several expiry periods.
const LONG_WAIT: Duration = Duration::from_secs(3 * EXPIRY);

/// Runs `f` on a thread and gives back its handle, after `LONG_WAIT`.
fn after_a_long_wait<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        std::thread::sleep(LONG_WAIT);
        f()
    })
}

#[test]
fn waiting_is_using_a_primitive_however_long_the_wait() {
    let _rt = runtime();
    // Each wait on its own thread, at the same time.
    let waits: Vec<(&str, fn())> = vec![
        ("event", event_set_late),
        ("barrier", barrier_party_late),
        ("condition", condition_notified_late),
        ("bounded queue", queue_read_late),
        ("joinable queue", task_done_late),
    ];
    let waits: Vec<_> = waits
        .into_iter()
        .map(|(name, wait)| (name, std::thread::spawn(wait)))
        .collect();
    for (name, wait) in waits {
        assert!(wait.join().is_ok(), "the {name} wait failed");
    }
}

/// An event set after several expiry periods: its waiter kept it alive.
fn event_set_late() {
    let event = Event::new().expect("event");
    let setter = after_a_long_wait({
        let event = event.clone();
        move || event.set()
    });
    assert!(event.wait(None).expect("the event outlived the wait"));
    setter.join().expect("thread").expect("set");
}

/// A barrier whose second party comes late.
fn barrier_party_late() {
    let barrier = Barrier::new(2).expect("barrier");
    let late = after_a_long_wait({
        let barrier = barrier.clone();
        move || barrier.wait(None)
    });
    barrier.wait(None).expect("the barrier outlived the wait");
    late.join().expect("thread").expect("the late party passed");
}

/// A condition notified late: its lock outlived the wait.
fn condition_notified_late() {
    let condition = Condition::new(None).expect("condition");
    let notifier = after_a_long_wait({
        let condition = condition.clone();
        move || -> shoal::Result<()> {
            condition.acquire()?;
            condition.notify(1)?;
            condition.release()
        }
    });
    condition.acquire().expect("acquire");
    assert!(
        condition
            .wait(None)
            .expect("the condition outlived the wait")
    );
    condition.release().expect("release");
    notifier.join().expect("thread").expect("notified");
}

/// A writer waiting for room on a full queue that nobody reads for a while.
fn queue_read_late() {
    let full: Queue<u32> = Queue::with_maxsize(1).expect("queue");
    full.put(1).expect("put");
    let writer = std::thread::spawn({
        let full = full.clone();
        move || full.put(2)
    });
    std::thread::sleep(LONG_WAIT);
    assert_eq!(full.get().expect("the queue outlived the writer's wait"), 1);
    writer.join().expect("thread").expect("the waiting put");
    assert_eq!(full.get().expect("get"), 2);
}

/// A join waiting while a task runs for several expiry periods.
fn task_done_late() {
    let jobs: JoinableQueue<u32> = JoinableQueue::new().expect("queue");
    jobs.put(1).expect("put");
    assert_eq!(jobs.get().expect("get"), 1);
    let worker = after_a_long_wait({
        let jobs = jobs.clone();
        move || jobs.task_done()
    });
    jobs.join()
        .expect("the count of unfinished tasks outlived the join");
    worker.join().expect("thread").expect("task_done");
}
