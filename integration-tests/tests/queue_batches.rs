//! Batched gets of unbounded queues against a real redis-server, across real processes: a get
//! fetches items a batch at a time and returns them one by one, and still every item is returned
//! by exactly one get or is in the queue, whatever process is killed (`SIGKILL`) while it holds a
//! batch; a consumer that stops getting, closes the queue or exits gives its batch back (in its
//! order, at the head of the queue: another consumer receives those items after the later ones
//! it took meanwhile); `qsize` counts what consumers hold; a dropped connection or flushed
//! scripts lose nothing.

use std::time::Duration;

use shoal::Error;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, pause_writes, queue_key_prefix, raw_redis, wait_for};

shoal::test_support!();

/// The lease of this binary's runtime: short, so that a killed consumer's batch comes back soon.
const LEASE_SECS: f64 = 1.5;

fn runtime() -> shoal::Runtime {
    let mut config = Config::builder().build().expect("config");
    config.sync.lease_secs = LEASE_SECS;
    shoal::init_with(config).expect("runtime")
}

/// A runtime on a redis-server of its own, for the tests that break the server (kill its
/// clients, flush its scripts, change its configuration): the other tests of this binary share
/// the embedded one.
fn private_runtime() -> (TestRedis, shoal::Runtime) {
    let server = TestRedis::tcp();
    let mut config = Config::builder()
        .redis_url(server.url())
        .build()
        .expect("config");
    config.sync.lease_secs = LEASE_SECS;
    let rt = shoal::init_with(config).expect("runtime");
    (server, rt)
}

/// The claims of the queue whose `Debug` is `debug` (sorted sets of held items, and the lists
/// of what waiting gets moved), with their sizes.
fn claims(conn: &mut redis::Connection, debug: &str) -> Vec<(String, usize)> {
    let prefix = queue_key_prefix(conn, debug);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}claim:*"))
        .query(conn)
        .expect("keys");
    keys.into_iter()
        .map(|key| {
            let size = if key.ends_with(":in") {
                "LLEN"
            } else {
                "ZCARD"
            };
            let n: usize = redis::cmd(size).arg(&key).query(conn).expect("size");
            (key, n)
        })
        .collect()
}

/// An item as shoal stores it: a format version byte, then MessagePack.
fn payload(n: u64) -> Vec<u8> {
    [vec![1u8], rmp_serde::to_vec(&n).expect("encode")].concat()
}

/// A claims script (`body`, with the shared Lua before it) as `holder` sends it on the queue
/// whose keys start with `prefix`: its five keys and first three arguments; the caller adds the
/// rest.
fn claims_script(prefix: &str, holder: &str, body: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(format!(
        "{}\n{}\n{body}",
        include_str!("../../primitives/src/queue/claims/claims_ttl.lua"),
        include_str!("../../primitives/src/queue/claims/claims_prelude.lua"),
    ))
    .arg(5)
    .arg(format!("{prefix}items"))
    .arg(format!("{prefix}state"))
    .arg(format!("{prefix}claims"))
    .arg(format!("{prefix}claim:{holder}"))
    .arg(format!("{prefix}claim_fences"))
    .arg(3600)
    .arg(format!("{prefix}claim:"))
    .arg(holder);
    cmd
}

fn held(conn: &mut redis::Connection, q: &Queue<u64>) -> usize {
    claims(conn, &format!("{q:?}")).iter().map(|(_, n)| n).sum()
}

/// Puts `0..n` and waits until the feeder wrote them all to Redis (`qsize` counts them as soon
/// as they are put; a test that then breaks the server must find them there).
fn fill(rt: &shoal::Runtime, q: &Queue<u64>, n: u64) {
    for i in 0..n {
        q.put(i).expect("put");
    }
    let mut raw = raw_redis(rt);
    let items = format!("{}items", queue_key_prefix(&mut raw, &format!("{q:?}")));
    assert!(
        wait_for(Duration::from_secs(10), || {
            redis::cmd("LLEN")
                .arg(&items)
                .query::<u64>(&mut raw)
                .expect("llen")
                == n
        }),
        "the feeder did not write the items"
    );
}

/// Gets `n` items, reports each on `out`, then does what `then` says: "sleep" (holds its batch
/// until killed), "close" (closes the queue, then sleeps), "exit" (returns).
#[shoal::remote]
fn take_some(q: Queue<u64>, out: SimpleQueue<u64>, n: u64, then: String) {
    for _ in 0..n {
        out.put(q.get().expect("get")).expect("put");
    }
    match then.as_str() {
        "close" => {
            q.close().expect("close");
            out.put(u64::MAX).expect("put");
            std::thread::sleep(Duration::from_secs(3600));
        }
        "sleep" => std::thread::sleep(Duration::from_secs(3600)),
        _ => {}
    }
}

/// Starts a child that takes `n` items of `q` then does `then`; returns it and the items it took.
fn child_takes(q: &Queue<u64>, n: u64, then: &str) -> (Process, Vec<u64>) {
    let out: SimpleQueue<u64> = SimpleQueue::new().expect("out");
    let child = Process::new(take_some, (q.clone(), out.clone(), n, then.to_string()));
    child.start().expect("start");
    let taken = (0..n)
        .map(|_| {
            out.get_timeout(Duration::from_secs(20))
                .expect("the child's item")
        })
        .collect();
    if then == "close" {
        assert_eq!(
            out.get_timeout(Duration::from_secs(20)).expect("closed"),
            u64::MAX
        );
    }
    (child, taken)
}

/// Gets until the queue stays empty for `quiet`. A get that fails on a Redis error (a connection
/// killed on purpose) is tried again.
fn drain(q: &Queue<u64>, quiet: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        match get_retrying(q, quiet) {
            Ok(item) => got.push(item),
            Err(Error::Empty) => return got,
            Err(e) => panic!("get: {e}"),
        }
    }
}

fn get_retrying(q: &Queue<u64>, timeout: Duration) -> shoal::Result<u64> {
    let mut failures = 0;
    loop {
        match q.get_timeout(timeout) {
            Err(Error::Redis { .. }) if failures < 5 => failures += 1,
            other => return other,
        }
    }
}

/// `got` is `expected`'s items each once, and in order but for the run `given_back` (what a
/// consumer held when it stopped), which is in order too.
fn each_once_in_order(got: &[u64], expected: std::ops::Range<u64>, given_back: &[u64]) {
    let mut sorted = got.to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, expected.collect::<Vec<_>>());
    let (back, rest): (Vec<u64>, Vec<u64>) = got.iter().partition(|i| given_back.contains(i));
    assert!(back.windows(2).all(|w| w[0] < w[1]), "{back:?}");
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:?}");
}

#[test]
fn a_consumer_killed_while_it_holds_a_batch_loses_and_duplicates_nothing() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 2000);
    let (child, taken) = child_takes(&q, 10, "sleep");
    assert_eq!(taken, (0..10).collect::<Vec<_>>());
    // The child holds a batch beyond what it returned, and qsize counts it.
    let holding = held(&mut raw, &q);
    assert!(holding > 0, "the child holds no batch");
    assert_eq!(q.qsize().expect("qsize"), 1990);
    child.kill().expect("kill");
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(-9));
    // Its batch comes back, in order, once its hold lapses.
    let held_back: Vec<u64> = (10..10 + holding as u64).collect();
    let rest = drain(&q, Duration::from_secs_f64(LEASE_SECS + 3.0));
    each_once_in_order(&rest, 10..2000, &held_back);
    assert_eq!(q.qsize().expect("qsize"), 0);
    assert_eq!(held(&mut raw, &q), 0);
}

#[test]
fn a_consumer_that_stops_getting_gives_its_batch_back_while_it_lives() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 500);
    let (child, taken) = child_takes(&q, 10, "sleep");
    assert_eq!(taken, (0..10).collect::<Vec<_>>());
    // The child's keeper gives back the batch it no longer returns, long before its hold would
    // lapse: the child is alive.
    assert!(wait_for(Duration::from_secs_f64(LEASE_SECS), || held(
        &mut raw, &q
    ) == 0));
    let rest = drain(&q, Duration::from_millis(500));
    assert!(child.is_alive());
    assert_eq!(rest, (10..500).collect::<Vec<_>>());
    assert_eq!(held(&mut raw, &q), 0);
    child.kill().expect("kill");
    child.join(None).expect("join");
}

#[test]
fn close_and_exit_give_the_batch_back_at_once() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    for then in ["close", "exit"] {
        let q: Queue<u64> = Queue::new().expect("queue");
        fill(&rt, &q, 300);
        let (child, taken) = child_takes(&q, 10, then);
        assert_eq!(taken, (0..10).collect::<Vec<_>>(), "{then}");
        if then == "exit" {
            child.join(None).expect("join");
            assert_eq!(child.exitcode(), Some(0));
        }
        // Given back already: nothing is held, and every item left is in the list.
        assert_eq!(held(&mut raw, &q), 0, "{then}");
        let rest: Vec<u64> = (10..300).map(|_| q.get_nowait().expect("get")).collect();
        assert_eq!(rest, (10..300).collect::<Vec<_>>(), "{then}");
        if then == "close" {
            child.kill().expect("kill");
            child.join(None).expect("join");
        }
    }
}

#[test]
fn a_batch_that_went_stale_is_given_back_and_fetched_again_in_order() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 100);
    let mut got = Vec::new();
    for round in 0..4 {
        // Batches of 1, 2 and 4: two items are held after five gets.
        for _ in 0..5 {
            got.push(q.get().expect("get"));
        }
        assert!(held(&mut raw, &q) > 0, "round {round}: no batch held");
        // Longer than a hold: what this process holds may no longer be returned.
        std::thread::sleep(Duration::from_millis(300));
    }
    got.extend(drain(&q, Duration::from_millis(200)));
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert_eq!(q.qsize().expect("qsize"), 0);
}

/// A `get_nowait` that finds its consumer held by the keeper (giving back a stale batch, held
/// up here by a pause of Redis's writes) waits for it and returns the item: the queue is not
/// empty. Only another get holding the consumer makes it give up, as Python's reader lock does
/// (it said `Empty` whenever the keeper held the consumer, which made a test flaky).
#[test]
fn get_nowait_waits_for_the_keeper_instead_of_finding_the_queue_empty() {
    let (server, rt) = private_runtime();
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 10);
    // Batches of 1 and 2: one item is held after two gets.
    assert_eq!(q.get_nowait().expect("get_nowait"), 0);
    assert_eq!(q.get_nowait().expect("get_nowait"), 1);
    pause_writes(&server.url(), 1500);
    // The batch goes stale after 200 ms; the keeper then gives it back, a write that waits for
    // the pause while it holds the consumer.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        q.get_nowait()
            .expect("get_nowait while the keeper gives the batch back"),
        2
    );
    let mut got = vec![0, 1, 2];
    got.extend(drain(&q, Duration::from_millis(200)));
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// `close()` of a consumer that holds nothing makes no round trip: it returns at once while
/// Redis holds its writes back (Python's `close()` never waits for the network). It waited for
/// the pause before.
#[test]
fn close_with_nothing_held_does_not_wait_for_redis() {
    let (server, rt) = private_runtime();
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 1);
    assert_eq!(q.get().expect("get"), 0);
    pause_writes(&server.url(), 3_000);
    let started = std::time::Instant::now();
    q.close().expect("close");
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "close() waited {:?}",
        started.elapsed()
    );
}

/// A `get_nowait` while another thread's get waits on the same queue gives up at once, as
/// Python's does (that get holds the reader lock).
#[test]
fn get_nowait_while_another_thread_waits_in_a_get_is_empty_at_once() {
    let _rt = runtime();
    let q: Queue<u64> = Queue::new().expect("queue");
    let waiter = {
        let q = q.clone();
        std::thread::spawn(move || q.get_timeout(Duration::from_secs(3)))
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "get_nowait waited {:?} for the other get",
        started.elapsed()
    );
    q.put(7).expect("put");
    assert_eq!(waiter.join().expect("waiter").expect("get"), 7);
}

#[test]
fn dropped_connections_and_flushed_scripts_lose_nothing() {
    let (_server, rt) = private_runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 300);
    let mut got = Vec::new();
    for round in 0..10 {
        for _ in 0..20 {
            got.push(get_retrying(&q, Duration::from_secs(5)).expect("get"));
        }
        if round % 2 == 0 {
            // Every other client's connection, this process's claims connection among them.
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .arg("SKIPME")
                .arg("yes")
                .query::<()>(&mut raw)
                .expect("client kill");
        } else {
            redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query::<()>(&mut raw)
                .expect("script flush");
        }
    }
    got.extend(drain(&q, Duration::from_millis(500)));
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    assert_eq!(q.qsize().expect("qsize"), 0);
    assert_eq!(held(&mut raw, &q), 0);
}

#[test]
fn two_consumers_of_a_paced_producer_share_and_lose_nothing() {
    let _rt = runtime();
    let q: Queue<u64> = Queue::new().expect("queue");
    let out_a: SimpleQueue<u64> = SimpleQueue::new().expect("out");
    let out_b: SimpleQueue<u64> = SimpleQueue::new().expect("out");
    let consumers: Vec<(Process, SimpleQueue<u64>)> = [out_a, out_b]
        .into_iter()
        .map(|out| {
            let p = Process::new(take_some, (q.clone(), out.clone(), 150u64, "exit".into()));
            p.start().expect("start");
            (p, out)
        })
        .collect();
    for i in 0..300u64 {
        q.put(i).expect("put");
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut all = Vec::new();
    for (p, out) in &consumers {
        let mine: Vec<u64> = (0..150)
            .map(|_| out.get_timeout(Duration::from_secs(30)).expect("item"))
            .collect();
        // Each consumer sees its items in the order they were put.
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        all.extend(mine);
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
    all.sort_unstable();
    assert_eq!(all, (0..300).collect::<Vec<_>>());
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
}

/// What a holder that died left (a claimed item, and one its waiting get's BLMOVE moved before
/// its fetch ran) comes back once its hold lapsed: at the head of the queue, claimed first.
#[test]
fn a_dead_holders_claim_and_landed_item_come_back_first_in_order() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 3);
    let prefix = queue_key_prefix(&mut raw, &format!("{q:?}"));
    redis::pipe()
        .hset(format!("{prefix}claims"), "ghost-holder", 1)
        .zadd(
            format!("{prefix}claim:ghost-holder"),
            [b"7:".as_slice(), &payload(100)].concat(),
            7,
        )
        .rpush(format!("{prefix}claim:ghost-holder:in"), payload(101))
        .query::<()>(&mut raw)
        .expect("the ghost's claim");
    assert_eq!(
        q.qsize().expect("qsize"),
        5,
        "claimed and landed items count"
    );
    let got: Vec<u64> = (0..5).map(|_| q.get_nowait().expect("get")).collect();
    assert_eq!(got, vec![100, 101, 0, 1, 2]);
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
    assert_eq!(held(&mut raw, &q), 0);
}

/// A get that waits for its item while Redis forgets its scripts (`SCRIPT FLUSH`, as after a
/// restart): the fetch written behind its `BLMOVE` meets `NOSCRIPT`; the item the `BLMOVE` took
/// is claimed by the fetch run again, and returned once.
#[test]
fn a_waiting_get_after_redis_lost_its_scripts_returns_its_item_once() {
    let (_server, rt) = private_runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    let putter = q.clone();
    let producer = std::thread::spawn(move || {
        // The get is waiting in its BLMOVE, its fetch written behind it.
        std::thread::sleep(Duration::from_millis(300));
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query::<()>(&mut raw)
            .expect("script flush");
        std::thread::sleep(Duration::from_millis(300));
        putter.put(7).expect("put");
        putter.put(8).expect("put");
        raw
    });
    assert_eq!(q.get_timeout(Duration::from_secs(10)).expect("get"), 7);
    assert_eq!(q.get_timeout(Duration::from_secs(10)).expect("get"), 8);
    let mut raw = producer.join().expect("producer");
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
    assert_eq!(held(&mut raw, &q), 0);
}

/// A get that waits receives a single item put well into its wait: the batch its waiting fetch
/// claims is usable for the wait's length, not stale on arrival (it spun, re-claiming the item
/// each second, before).
#[test]
fn a_waiting_get_receives_one_item_put_late_in_its_wait() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    for delay_ms in [50u64, 600, 900] {
        let putter = q.clone();
        let producer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            putter.put(delay_ms).expect("put");
        });
        assert_eq!(
            q.get_timeout(Duration::from_secs(5)).expect("get"),
            delay_ms
        );
        producer.join().expect("producer");
    }
    assert_eq!(held(&mut raw, &q), 0);
    assert_eq!(q.qsize().expect("qsize"), 0);
}

/// Items larger than a batch's byte limit together come a few at a time, in order.
#[test]
fn large_items_come_in_order_within_the_byte_limit() {
    let _rt = runtime();
    let q: Queue<Vec<u8>> = Queue::new().expect("queue");
    let items: Vec<Vec<u8>> = (0..40u8)
        .map(|i| {
            let size = if i >= 30 { 3 << 20 } else { 10 };
            vec![i; size]
        })
        .collect();
    for item in &items {
        q.put(item.clone()).expect("put");
    }
    for (i, item) in items.iter().enumerate() {
        let got = q.get_timeout(Duration::from_secs(20)).expect("get");
        assert!(
            got == *item,
            "item {i}: {} bytes of {:?}",
            got.len(),
            got.first()
        );
    }
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
}

/// A fetch or a give-back that reaches Redis after a later fetch of the same holder ran (sent
/// on a connection the holder gave up for lost) does nothing: numbers are never reused.
#[test]
fn a_late_fetch_or_give_back_of_a_holder_does_nothing() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 20);
    // Batches of 1, 2, 4 and 8: after 11 gets, 4 items of the fourth batch are held.
    for i in 0..11 {
        assert_eq!(q.get().expect("get"), i);
    }
    let debug = format!("{q:?}");
    let prefix = queue_key_prefix(&mut raw, &debug);
    let holders: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}claims"))
        .query(&mut raw)
        .expect("holders");
    assert_eq!(holders.len(), 1, "{holders:?}");
    let holder = &holders[0];
    let held_before = held(&mut raw, &q);
    assert!(held_before > 0);
    // A fetch numbered from 0 (the first batch's number): refused, nothing claimed; what its
    // BLMOVE would have moved (999, put in the landing list here) goes back to the queue.
    redis::cmd("RPUSH")
        .arg(format!("{prefix}claim:{holder}:in"))
        .arg(payload(999))
        .query::<()>(&mut raw)
        .expect("landing");
    let mut late_fetch = claims_script(
        &prefix,
        holder,
        include_str!("../../primitives/src/queue/claims/claim_fetch.lua"),
    );
    late_fetch.arg(0).arg(8).arg(5000).arg(1 << 20).arg(0);
    let refused = late_fetch.query::<redis::Value>(&mut raw);
    assert!(
        matches!(&refused, Err(e) if e.code() == Some("STALE")),
        "{refused:?}"
    );
    // A give-back made before the latest fetch (it had not reserved its numbers): nothing back.
    let mut late_release = claims_script(
        &prefix,
        holder,
        include_str!("../../primitives/src/queue/claims/claim_release.lua"),
    );
    late_release.arg(1);
    let given: i64 = late_release.query(&mut raw).expect("release");
    assert_eq!(given, 0);
    assert_eq!(held(&mut raw, &q), held_before);
    // The process goes on returning its batch, then the rest, each once and in order.
    let rest: Vec<u64> = (0..10).map(|_| q.get().expect("get")).collect();
    let mut expected: Vec<u64> = (11..20).collect();
    expected.insert(held_before, 999);
    assert_eq!(rest, expected);
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
}

/// Redis refuses the acks of a batch being returned (here `NOREPLICAS`; `MISCONF` or `READONLY`
/// alike): the refusals are seen before the next fetch, which waits until the acks can be
/// written again, so no item returned goes back to the queue.
#[test]
fn acks_that_redis_refuses_are_written_again_before_the_next_fetch() {
    let (_server, rt) = private_runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 100);
    let mut got: Vec<u64> = (0..20).map(|_| q.get().expect("get")).collect();
    let refuse = |conn: &mut redis::Connection, replicas: u32| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("min-replicas-to-write")
            .arg(replicas)
            .query::<()>(conn)
            .expect("config set")
    };
    refuse(&mut raw, 1);
    // Items still held are returned (their acks are written without waiting, and refused); the
    // get that needs a fetch fails.
    let mut failed = false;
    for _ in 0..40 {
        match q.get_nowait() {
            Ok(item) => got.push(item),
            Err(e) => {
                assert!(!matches!(e, Error::Empty), "{e}");
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "every get succeeded while Redis refused writes");
    refuse(&mut raw, 0);
    got.extend(drain(&q, Duration::from_millis(500)));
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert_eq!(held(&mut raw, &q), 0);
}

/// A bounded queue's gets are claimed one by one the same way: a dead holder's claim comes back
/// first, and each get still makes room for a writer waiting on a full queue.
#[test]
fn a_bounded_queue_claims_one_item_per_get_and_wakes_a_writer() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::with_maxsize(2).expect("queue");
    q.put(0).expect("put");
    q.put(1).expect("put");
    let prefix = {
        let debug = format!("{q:?}");
        queue_key_prefix(&mut raw, &debug)
    };
    redis::pipe()
        .hset(format!("{prefix}claims"), "ghost-holder", 1)
        .zadd(
            format!("{prefix}claim:ghost-holder"),
            [b"3:".as_slice(), &payload(100)].concat(),
            3,
        )
        .query::<()>(&mut raw)
        .expect("the ghost's claim");
    // Full: a writer waits until a get makes room.
    let writer = {
        let q = q.clone();
        std::thread::spawn(move || q.put_timeout(2, Duration::from_secs(20)))
    };
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<u64> = (0..4)
        .map(|_| q.get_timeout(Duration::from_secs(10)).expect("get"))
        .collect();
    writer
        .join()
        .expect("writer")
        .expect("the writer was woken");
    assert_eq!(got, vec![100, 0, 1, 2]);
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
    assert_eq!(held(&mut raw, &q), 0);
}

/// Redis out of memory (`maxmemory` reached, `noeviction`): puts are refused, and gets still
/// drain the queue (the claim scripts run at OOM, and an ack frees memory).
#[test]
fn gets_drain_a_queue_while_redis_is_out_of_memory() {
    let (_server, rt) = private_runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 50);
    let set_maxmemory = |conn: &mut redis::Connection, bytes: u64| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes)
            .query::<()>(conn)
            .expect("config set")
    };
    set_maxmemory(&mut raw, 1);
    let got: Vec<u64> = (0..50)
        .map(|_| q.get_nowait().expect("a get at OOM"))
        .collect();
    let empty = q.get_nowait();
    set_maxmemory(&mut raw, 0);
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    assert!(matches!(empty, Err(Error::Empty)), "{empty:?}");
    assert_eq!(held(&mut raw, &q), 0);
}

/// The give-back of an item whose ack is in doubt, run twice (its first reply lost), puts the
/// item back once, and the holder then learns the item is not its own.
#[test]
fn an_item_in_doubt_given_back_twice_goes_back_once() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 3);
    let prefix = queue_key_prefix(&mut raw, &format!("{q:?}"));
    let holder = "test-holder";
    let claim = format!("{prefix}claim:{holder}");
    let fences = format!("{prefix}claim_fences");
    // The holder claimed 0 and 1 (numbers 10 and 11) and its ack of 10 applied (as
    // `claim_ack.lua` records it), though its reply was lost: 10 is in doubt.
    let taken: Vec<Vec<u8>> = redis::cmd("LPOP")
        .arg(format!("{prefix}items"))
        .arg(2)
        .query(&mut raw)
        .expect("lpop");
    redis::pipe()
        .zadd(&claim, [b"10:".as_slice(), &taken[0]].concat(), 10)
        .zadd(&claim, [b"11:".as_slice(), &taken[1]].concat(), 11)
        .hset(format!("{prefix}claims"), holder, u64::MAX / 2)
        .hset(&fences, format!("{holder}:fence"), 10)
        .query::<()>(&mut raw)
        .expect("the claim");
    let ack = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("EVAL")
            .arg(include_str!(
                "../../primitives/src/queue/claims/claim_ack.lua"
            ))
            .arg(2)
            .arg(&claim)
            .arg(&fences)
            .arg(holder)
            .arg(10)
            .arg(3600)
            .query(conn)
            .expect("ack")
    };
    assert_eq!(ack(&mut raw), 1, "the first ack takes 10 out of the claim");
    let release = |conn: &mut redis::Connection| -> i64 {
        claims_script(
            &prefix,
            holder,
            include_str!("../../primitives/src/queue/claims/claim_release.lua"),
        )
        .arg(12)
        .arg("doubt")
        .arg(10)
        .arg(&taken[0])
        .query(conn)
        .expect("release")
    };
    assert_eq!(release(&mut raw), 2, "10 and 11 go back");
    assert_eq!(release(&mut raw), 0, "run again: nothing goes back twice");
    assert_eq!(ack(&mut raw), 0, "10 is in the queue: not the holder's");
    let got: Vec<u64> = (0..3).map(|_| q.get_nowait().expect("get")).collect();
    assert_eq!(got, vec![0, 1, 2]);
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
}

/// Reports `0` on `out`, then waits for one item with `get_async` (under a current-thread Tokio
/// runtime) and reports it.
#[shoal::remote]
fn get_one_async(q: Queue<u64>, out: SimpleQueue<u64>) {
    out.put(0).expect("ready");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let item = runtime.block_on(q.get_async()).expect("get_async");
    out.put(item).expect("report");
}

/// The async holders (`<process>:a<n>`) recorded in the claims hash of `q`.
fn async_holders(conn: &mut redis::Connection, q: &Queue<u64>) -> Vec<String> {
    let prefix = queue_key_prefix(conn, &format!("{q:?}"));
    let holders: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}claims"))
        .query(conn)
        .expect("hkeys");
    holders.into_iter().filter(|h| h.contains(":a")).collect()
}

fn signal(child: &Process, signal: &str) {
    let pid = child.pid().expect("pid");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[test]
fn an_item_an_async_get_takes_as_its_process_is_killed_comes_back() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    let out: SimpleQueue<u64> = SimpleQueue::new().expect("out");
    let child = Process::new(get_one_async, (q.clone(), out.clone()));
    child.start().expect("start");
    assert_eq!(out.get_timeout(Duration::from_secs(20)).expect("ready"), 0);
    // Its get waits: its holder's record is written with the BLMOVE behind it.
    assert!(
        wait_for(Duration::from_secs(10), || !async_holders(&mut raw, &q)
            .is_empty()),
        "the async get does not wait"
    );
    std::thread::sleep(Duration::from_millis(200));
    // Stopped, it cannot read what Redis answers: the item leaves the queue for its claim.
    signal(&child, "-STOP");
    q.put(42).expect("put");
    assert!(
        wait_for(Duration::from_secs(10), || held(&mut raw, &q) == 1),
        "the item did not reach the async get's claim"
    );
    assert_eq!(
        q.qsize().expect("qsize"),
        1,
        "qsize counts the claimed item"
    );
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
    signal(&child, "-KILL");
    child.join(None).expect("join");
    assert!(
        out.get_nowait().is_err(),
        "the killed child reported an item"
    );
    // Once the hold lapses (a slice, HOLD and the lease), the next get takes it back.
    assert_eq!(
        q.get_timeout(Duration::from_secs_f64(LEASE_SECS + 10.0))
            .expect("the item comes back"),
        42
    );
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
    assert_eq!(held(&mut raw, &q), 0);
}

#[test]
fn async_gets_claim_ack_and_leave_no_record_behind() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    let bounded: Queue<u64> = Queue::with_maxsize(1).expect("bounded");
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio.block_on(async {
        // Nothing there: empty, and no record of the holder stays.
        assert!(matches!(q.get_nowait_async().await, Err(Error::Empty)));
        assert!(async_holders(&mut raw, &q).is_empty());
        // Items put while three gets wait: each get receives one, each item once.
        let waiting: Vec<_> = (0..3).map(|_| q.get_async()).collect();
        let putter = q.clone();
        let put = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            for i in 0..3 {
                putter.put(i).expect("put");
            }
        });
        let mut got: Vec<u64> = futures::future::join_all(waiting)
            .await
            .into_iter()
            .map(|r| r.expect("get_async"))
            .collect();
        put.await.expect("putter");
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2]);
        // A timeout that passed already still takes an item that is there, as `get` does.
        q.put(5).expect("put");
        assert!(wait_for(Duration::from_secs(10), || q
            .qsize()
            .expect("qsize")
            == 1));
        assert_eq!(q.get_timeout_async(Duration::ZERO).await.expect("get"), 5);
        assert!(matches!(
            q.get_timeout_async(Duration::ZERO).await,
            Err(Error::Empty)
        ));
        // A bounded queue's async get wakes the writer waiting for room.
        bounded.put(7).expect("put");
        let writer = bounded.clone();
        let blocked = tokio::task::spawn_blocking(move || writer.put(8));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(bounded.get_async().await.expect("get"), 7);
        blocked.await.expect("writer").expect("put after room");
        assert_eq!(bounded.get_nowait_async().await.expect("get"), 8);
    });
    // Every item was acked: no claim, and no async holder's record in the claims hash.
    assert_eq!(held(&mut raw, &q), 0);
    assert!(async_holders(&mut raw, &q).is_empty());
    assert_eq!(held(&mut raw, &bounded), 0);
    assert!(async_holders(&mut raw, &bounded).is_empty());
}

#[test]
fn dropping_the_last_handle_gives_the_batch_back() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 100);
    let debug = format!("{q:?}");
    let items = format!("{}items", queue_key_prefix(&mut raw, &debug));
    let serialized = rmp_serde::to_vec(&q).expect("a handle as bytes");
    // Batches of 1, 2 and 4: the fourth get leaves 3 items held.
    let got: Vec<u64> = (0..4).map(|_| q.get().expect("get")).collect();
    assert_eq!(got, vec![0, 1, 2, 3]);
    let holding: usize = claims(&mut raw, &debug).iter().map(|(_, n)| n).sum();
    assert!(holding > 0, "the process holds no batch");
    drop(q);
    // Given back by the keeper at once (it would wait for the batch to go stale otherwise,
    // and a test holding no handle could not get it).
    assert!(
        wait_for(Duration::from_secs(5), || claims(&mut raw, &debug)
            .iter()
            .all(|(_, n)| *n == 0)),
        "the batch stayed claimed"
    );
    let left: usize = redis::cmd("LLEN")
        .arg(&items)
        .query(&mut raw)
        .expect("llen");
    assert_eq!(left, 96);
    let head: Vec<u8> = redis::cmd("LINDEX")
        .arg(&items)
        .arg(0)
        .query(&mut raw)
        .expect("lindex");
    assert_eq!(head, payload(4), "in order, at the head");
    // A handle of the same queue made again in this process (a pool worker's next task
    // decoding it, say) gets its items: its consumer's numbers go on above the old one's
    // fence.
    let again: Queue<u64> = rmp_serde::from_slice(&serialized).expect("the handle again");
    let got: Vec<u64> = (0..10).map(|_| again.get().expect("get")).collect();
    assert_eq!(got, (4..14).collect::<Vec<_>>());
}

/// A handle of the queue made again in this process right after the last one was dropped,
/// while the old consumer still holds its batch, takes that consumer up again: its gets return
/// the held items without a fetch (here, while Redis holds writes back). A new consumer's fetch
/// fenced off the old one's give-back, which lost an item whose ack was in doubt.
#[test]
fn a_handle_made_again_takes_up_the_batch_its_dropped_predecessor_held() {
    let (server, rt) = private_runtime();
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 20);
    let serialized = rmp_serde::to_vec(&q).expect("a handle as bytes");
    // Batches of 1, 2 and 4: the fourth get leaves 3 items held.
    let got: Vec<u64> = (0..4).map(|_| q.get().expect("get")).collect();
    assert_eq!(got, vec![0, 1, 2, 3]);
    // Dropped and made again at once (the keeper gives a retired batch back only after half a
    // hold).
    drop(q);
    let again: Queue<u64> = rmp_serde::from_slice(&serialized).expect("the handle again");
    pause_writes(&server.url(), 2_000);
    let started = std::time::Instant::now();
    assert_eq!(again.get_nowait().expect("get_nowait"), 4);
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "the held item came only after {:?} (a fetch waited for the pause)",
        started.elapsed()
    );
    let mut got = vec![4];
    got.extend(drain(&again, Duration::from_millis(300)));
    assert_eq!(got, (4..20).collect::<Vec<_>>());
}

/// A process's fields in a queue's fences hash (`<holder>:fence`, `<holder>:acked`) go once it
/// gets no more: children that took items and exited leave none, nor does this process once its
/// last handle of the queue is dropped. The hash does not keep two fields for every process
/// that ever fetched from the queue.
#[test]
fn a_process_that_gets_no_more_leaves_no_fields_in_the_fences_hash() {
    let rt = runtime();
    let mut raw = raw_redis(&rt);
    let q: Queue<u64> = Queue::new().expect("queue");
    fill(&rt, &q, 20);
    let fences = format!(
        "{}claim_fences",
        queue_key_prefix(&mut raw, &format!("{q:?}"))
    );
    let fields = |conn: &mut redis::Connection| -> Vec<String> {
        redis::cmd("HKEYS").arg(&fences).query(conn).expect("hkeys")
    };
    for round in 0..3u64 {
        let (child, taken) = child_takes(&q, 2, "exit");
        assert_eq!(taken, vec![2 * round, 2 * round + 1]);
        child.join(None).expect("join");
        assert_eq!(child.exitcode(), Some(0));
    }
    assert_eq!(
        fields(&mut raw),
        Vec::<String>::new(),
        "the children's fields"
    );
    // This process's consumer: its fence while it gets, gone with its last handle.
    let clone = q.clone();
    assert_eq!(q.get().expect("get"), 6);
    assert_eq!(clone.get().expect("get"), 7);
    assert!(!fields(&mut raw).is_empty(), "this process fetched");
    drop(q);
    assert!(!fields(&mut raw).is_empty(), "a handle is left");
    drop(clone);
    assert!(
        wait_for(Duration::from_secs(5), || fields(&mut raw).is_empty()),
        "left behind: {:?}",
        fields(&mut raw)
    );
}
