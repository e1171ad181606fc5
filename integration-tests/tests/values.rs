//! `Value` and `Array` with a lock of the caller's choosing (Python's `lock=`), `get_obj()`, and
//! the lock-less form, across real processes.

use shoal::prelude::*;

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

/// `Value('i', 0, lock=lock)`: the value's lock is the given one, not a new one.
#[test]
fn a_value_or_array_with_a_given_lock_shares_that_lock() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    let value = Value::with_lock(7i32, lock.clone()).expect("value");
    let array = Array::with_lock(vec![1u8, 2, 3], lock.clone()).expect("array");
    assert_eq!(value.get().expect("get"), 7);
    assert_eq!(array.to_vec().expect("to_vec"), vec![1, 2, 3]);
    assert_eq!(value.get_lock().expect("lock"), &lock);
    assert_eq!(array.get_lock().expect("lock"), &lock);
    lock.acquire().expect("acquire");
    assert!(value.get_lock().expect("lock").locked().expect("locked"));
    assert!(!array.get_lock().expect("lock").try_acquire().expect("try"));
    value
        .get_lock()
        .expect("lock")
        .release()
        .expect("one lock for both");
    assert!(!lock.locked().expect("locked"));

    let rlock = RLock::new().expect("rlock");
    let value = Value::with_lock(0.5f64, rlock.clone()).expect("value");
    let guard = value.get_lock().expect("lock").lock().expect("acquire");
    assert!(
        value.get_lock().expect("lock").try_acquire().expect("try"),
        "an RLock is reentrant"
    );
    let other = rlock.clone();
    assert!(
        !std::thread::spawn(move || other.try_acquire().expect("try"))
            .join()
            .expect("thread"),
        "another thread waits"
    );
    rlock.release().expect("inner level");
    drop(guard);
    assert!(!rlock.locked().expect("locked"));
}

#[shoal::remote]
fn bump_under_rlock(value: Value<i64, RLock>, times: u32) {
    let lock = value.get_lock().expect("lock");
    for _ in 0..times {
        let _outer = lock.lock().expect("acquire");
        let _inner = lock.lock().expect("reentrant");
        value.set(value.get().expect("get") + 1).expect("set");
    }
}

#[shoal::remote]
fn bump_both_under_one_lock(value: Value<i32>, array: Array<i32>, times: u32) {
    for _ in 0..times {
        let _guard = array.get_lock().expect("lock").lock().expect("acquire");
        let v = value.get().expect("get") + 1;
        value.set(v).expect("set");
        array.set(0, v).expect("set");
        array.set(1, array.get(1).expect("get") + 1).expect("set");
    }
}

/// The given lock travels with the handle: children serialize on it.
#[test]
fn processes_share_a_given_lock_through_the_value() {
    let _rt = runtime();
    let value = Value::with_lock(0i64, RLock::new().expect("rlock")).expect("value");
    let children: Vec<Process> = (0..2)
        .map(|_| Process::new(bump_under_rlock, (value.clone(), 100u32)))
        .collect();
    let lock = Lock::new().expect("lock");
    let counter = Value::with_lock(0i32, lock.clone()).expect("value");
    let array = Array::with_lock(vec![0i32, 0], lock).expect("array");
    let pair: Vec<Process> = (0..2)
        .map(|_| {
            Process::new(
                bump_both_under_one_lock,
                (counter.clone(), array.clone(), 100u32),
            )
        })
        .collect();
    for p in children.iter().chain(&pair) {
        p.start().expect("start");
    }
    for p in children.iter().chain(&pair) {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    assert_eq!(value.get().expect("get"), 200);
    assert_eq!(counter.get().expect("get"), 200);
    assert_eq!(array.to_vec().expect("to_vec"), vec![200, 200]);
}

/// Python's `get_obj()`: the same shared object, without the lock.
#[test]
fn get_obj_is_the_raw_object_without_the_lock() {
    let _rt = runtime();
    let value = Value::new(3u16).expect("value");
    let raw = value.get_obj();
    assert_eq!(raw.get().expect("get"), 3);
    raw.set(9).expect("set");
    assert_eq!(value.get().expect("the same object"), 9);
    assert!(matches!(raw.get_lock(), Err(Error::InvalidState(_))));
    assert!(value.get_lock().is_ok(), "the wrapper keeps its lock");
    assert_eq!(raw.typecode(), 'H');

    let array = Array::with_lock(vec![1.5f32, 2.5], RLock::new().expect("rlock")).expect("array");
    let raw = array.get_obj();
    assert_eq!(raw.len(), 2);
    raw.set(1, 4.0).expect("set");
    assert_eq!(array.to_vec().expect("to_vec"), vec![1.5, 4.0]);
    assert!(matches!(raw.get_lock(), Err(Error::InvalidState(_))));
    assert!(array.get_lock().is_ok());

    // The lock-less form (lock=False, RawValue, RawArray) has no lock to give.
    let bare = Value::new_raw(1u8).expect("raw");
    assert!(matches!(bare.get_lock(), Err(Error::InvalidState(_))));
    assert_eq!(bare.get_obj().get().expect("get"), 1);
    let bare: Array<i64> = Array::new_raw(vec![5]).expect("raw");
    assert!(matches!(bare.get_lock(), Err(Error::InvalidState(_))));
    assert_eq!(bare.fetch_add(0, 2).expect("add"), 5);
    assert_eq!(bare.get_obj().get(0).expect("get"), 7);
}
