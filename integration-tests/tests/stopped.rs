//! A process stopped while it waits (`SIGSTOP`, Ctrl-Z, a debugger) and continued: Linux fails
//! a socket read that has a timeout with `EINTR` then, and redis-rs gives up the reply it was
//! reading. A wait that takes nothing from Redis (a lock's, an event's, a pipe's `poll`), or
//! whose take can be recovered (a queue's get, whose items are claimed; a pipe's `recv`, whose
//! message is taken by a command behind the wait), goes on as if its slice had ended empty:
//! the caller sees nothing of it; an actor `ask` gets its reply, which its wait moved. They
//! failed with "Interrupted system call" before (the pipe's message and the ask's reply lost).

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use shoal::prelude::*;

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

/// Stops `p` while it waits, runs `meanwhile`, continues it, and leaves it waiting a little
/// longer.
fn stop_and_continue(p: &Process, meanwhile: impl FnOnce()) {
    let pid = Pid::from_raw(p.pid().expect("pid") as i32);
    // Its wait is under way (a slice of up to a second).
    std::thread::sleep(Duration::from_millis(700));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    std::thread::sleep(Duration::from_millis(200));
    // Continued whatever happens meanwhile: a stopped child would hang the test.
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(meanwhile));
    std::thread::sleep(Duration::from_millis(200));
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    if let Err(panic) = done {
        std::panic::resume_unwind(panic);
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn assert_clean_exit(p: &Process) {
    p.join(Some(Duration::from_secs(30))).expect("join");
    assert_eq!(p.exitcode(), Some(0), "the child's wait failed");
}

#[shoal::remote]
fn get_one(q: Queue<u64>) {
    assert_eq!(q.get_timeout(Duration::from_secs(20)).expect("get"), 7);
}

#[test]
fn a_queue_get_rides_out_a_stop_and_a_continue() {
    let _rt = runtime();
    let q: Queue<u64> = Queue::new().expect("queue");
    let p = Process::new(get_one, (q.clone(),));
    p.start().expect("start");
    stop_and_continue(&p, || {});
    q.put(7).expect("put");
    assert_clean_exit(&p);
    assert!(q.empty().expect("empty"), "the item was taken once");
}

/// The item arrives while the getter is stopped: its `BLMOVE` takes it, and the reply is lost
/// with the interrupted read; the next fetch claims it.
#[test]
fn an_item_put_while_its_getter_is_stopped_is_not_lost() {
    let _rt = runtime();
    let q: Queue<u64> = Queue::new().expect("queue");
    let p = Process::new(get_one, (q.clone(),));
    p.start().expect("start");
    stop_and_continue(&p, || {
        q.put(7).expect("put");
        // The feeder writes it meanwhile.
        std::thread::sleep(Duration::from_millis(300));
    });
    assert_clean_exit(&p);
    assert!(q.empty().expect("empty"), "the item was taken once");
}

#[shoal::remote]
fn acquire_once(lock: Lock) {
    assert!(
        lock.acquire_timeout(Duration::from_secs(20))
            .expect("acquire")
    );
    lock.release().expect("release");
}

#[test]
fn a_lock_wait_rides_out_a_stop_and_a_continue() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    lock.acquire().expect("acquire");
    let p = Process::new(acquire_once, (lock.clone(),));
    p.start().expect("start");
    stop_and_continue(&p, || {});
    lock.release().expect("release");
    assert_clean_exit(&p);
}

#[shoal::remote]
fn wait_for_event(event: Event) {
    assert!(event.wait(Some(Duration::from_secs(20))).expect("wait"));
}

#[test]
fn an_event_wait_rides_out_a_stop_and_a_continue() {
    let _rt = runtime();
    let event = Event::new().expect("event");
    let p = Process::new(wait_for_event, (event.clone(),));
    p.start().expect("start");
    stop_and_continue(&p, || event.set().expect("set"));
    assert_clean_exit(&p);
}

#[shoal::remote]
fn poll_then_recv(end: Connection<u64>) {
    assert!(end.poll(Some(Duration::from_secs(20))).expect("poll"));
    assert_eq!(end.recv().expect("recv"), 7);
}

#[test]
fn a_pipe_poll_rides_out_a_stop_and_a_continue() {
    let _rt = runtime();
    let (reader, writer) = Pipe::new::<u64>(false).expect("pipe");
    let p = Process::new(poll_then_recv, (reader,));
    p.start().expect("start");
    stop_and_continue(&p, || writer.send(&7).expect("send"));
    assert_clean_exit(&p);
}

/// The lock is released while its waiter is stopped: the grant pushed to the waiter is moved by
/// its wait and taken by the command behind it, read although the wait's own read was
/// interrupted.
#[test]
fn a_lock_released_while_its_waiter_is_stopped_reaches_it() {
    let _rt = runtime();
    let lock = Lock::new().expect("lock");
    lock.acquire().expect("acquire");
    let p = Process::new(acquire_once, (lock.clone(),));
    p.start().expect("start");
    stop_and_continue(&p, || lock.release().expect("release"));
    assert_clean_exit(&p);
}

#[shoal::remote]
fn wait_for_notification(condition: Condition, ready: Event) {
    let _held = condition.lock().expect("lock");
    ready.set().expect("ready");
    assert!(condition.wait(Some(Duration::from_secs(20))).expect("wait"));
}

/// Notified while stopped: the wake-up the wait moved is taken by the command behind it, read
/// although the wait's own read was interrupted.
#[test]
fn a_condition_notified_while_its_waiter_is_stopped_wakes_it() {
    let _rt = runtime();
    let condition = Condition::new(None).expect("condition");
    let ready = Event::new().expect("event");
    let p = Process::new(wait_for_notification, (condition.clone(), ready.clone()));
    p.start().expect("start");
    assert!(ready.wait(Some(Duration::from_secs(20))).expect("ready"));
    stop_and_continue(&p, || {
        let _held = condition.lock().expect("lock");
        condition.notify(1).expect("notify");
    });
    assert_clean_exit(&p);
}

#[shoal::remote]
fn recv_one(end: Connection<u64>) {
    assert_eq!(end.recv().expect("recv"), 7);
}

/// A message sent while its receiver is stopped: the receive's wait moves it and the reply is
/// lost with the interrupted read, but the command written behind the wait takes it from where
/// it was moved. It was lost before.
#[test]
fn a_message_sent_while_its_receiver_is_stopped_is_not_lost() {
    let _rt = runtime();
    let (reader, writer) = Pipe::new::<u64>(false).expect("pipe");
    let p = Process::new(recv_one, (reader,));
    p.start().expect("start");
    stop_and_continue(&p, || writer.send(&7).expect("send"));
    assert_clean_exit(&p);
}

/// A tally whose additions take their time.
#[derive(Serialize, Deserialize, Default, Debug, shoal::Actor)]
#[actor(messages(SlowAdd))]
struct Tally {
    n: u64,
}

/// Adds one after `.0` milliseconds.
#[derive(Serialize, Deserialize)]
struct SlowAdd(u64);

impl Handler<SlowAdd> for Tally {
    type Reply = u64;
    fn handle(&mut self, SlowAdd(ms): SlowAdd, _: &mut ActorContext) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        self.n += 1;
        self.n
    }
}

#[shoal::remote]
fn ask_slowly(tally: ActorRef<Tally>) {
    let asked = tally.ask(SlowAdd(800), Some(Duration::from_secs(20)));
    assert_eq!(asked.expect("ask"), 2);
}

/// The reply comes while its asker is stopped: the ask's wait moves it and the read is
/// interrupted, but the command written behind the wait takes it. The ask waited until its
/// timeout before (the reply lost), or for ever without one.
#[test]
fn an_ask_whose_reply_comes_while_its_asker_is_stopped_gets_it() {
    let _rt = runtime();
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(
        tally
            .ask(SlowAdd(0), Some(Duration::from_secs(30)))
            .expect("first ask"),
        1
    );
    let p = Process::new(ask_slowly, (tally.clone(),));
    p.start().expect("start");
    // The asker waits from about its start on (the reply comes 800 ms after the ask): it is
    // stopped before the reply and continued after it.
    stop_and_continue(&p, || std::thread::sleep(Duration::from_millis(1_000)));
    assert_clean_exit(&p);
}

#[shoal::remote]
fn pass_barrier(barrier: Barrier) {
    barrier.wait(Some(Duration::from_secs(20))).expect("wait");
}

/// The other party arrives while this one is stopped: the wake-up its wait moved is taken by
/// the command behind it.
#[test]
fn a_barrier_passed_while_a_party_is_stopped_releases_it() {
    let _rt = runtime();
    let barrier = Barrier::new(2).expect("barrier");
    let p = Process::new(pass_barrier, (barrier.clone(),));
    p.start().expect("start");
    stop_and_continue(&p, || {
        barrier
            .wait(Some(Duration::from_secs(20)))
            .expect("this party's wait");
    });
    assert_clean_exit(&p);
}
