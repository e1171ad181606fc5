//! TTLs: every key expires after `redis.expiry_secs` idle, and use keeps it alive. With a 2 s
//! expiry, primitives used for longer keep working, a lock held for longer stays held (its
//! heartbeat refreshes it), and one left idle past the expiry is reported gone.

use std::time::{Duration, Instant};

use shoal::prelude::*;

shoal::test_support!();

const EXPIRY: u64 = 2;

fn runtime() -> shoal::Runtime {
    let mut config = Config::builder()
        .expiry_secs(EXPIRY)
        .build()
        .expect("config");
    config.sync.lease_secs = 1.0;
    shoal::init_with(config).expect("runtime")
}

#[test]
fn primitives_in_use_outlive_the_expiry_and_idle_ones_do_not() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let q: Queue<u32> = Queue::new().expect("queue");
    let v = Value::new(0i64).expect("value");
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
