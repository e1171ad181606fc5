//! `Pool` when Redis fails it in ways other than going away: it loses the pool's state (a restart
//! without persistence, a failover to a lagging replica, eviction), or a worker's reply is lost
//! on the way (the connection drops after Redis served the read). Real redis-server, real worker
//! subprocesses (or threads), and a TCP proxy that drops one chosen reply.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shoal::prelude::*;
use shoal_integration_tests::{
    TestRedis, child_pids, contains_bytes, pid_running, raw_redis, scratch, wait_for,
};

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

/// Sleeps `ms`, then returns it.
#[shoal::remote]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// This worker's pid.
#[shoal::remote]
fn pid_of(_x: u64) -> u32 {
    std::process::id()
}

/// This worker's pid; `marker` only travels in the chunk (see `LosingProxy`).
#[shoal::remote]
fn pid_with(marker: String) -> u32 {
    std::hint::black_box(marker);
    std::process::id()
}

/// The key of this runtime's only pool's task stream.
fn task_stream_key(conn: &mut redis::Connection) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{*:pool:*}:tasks")
        .query(conn)
        .expect("keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].clone()
}

/// Records the pids of this process's worker children every 10 ms until dropped.
struct PidSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<BTreeSet<u32>>>,
}

impl PidSampler {
    fn start() -> PidSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !flag.load(Ordering::Acquire) {
                seen.extend(child_pids());
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        PidSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Every worker pid seen so far.
    fn finish(mut self) -> BTreeSet<u32> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for PidSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Asserts that `outcome` is the error of a pool whose state Redis lost.
fn assert_state_lost<T: std::fmt::Debug>(outcome: Result<T>) {
    match outcome {
        Err(Error::InvalidState(reason)) => assert!(
            reason.contains("the pool's state in Redis was lost"),
            "{reason}"
        ),
        other => panic!("expected the pool's state to be lost, got {other:?}"),
    }
}

#[test]
fn a_pool_whose_task_stream_is_deleted_breaks_instead_of_respawning_its_workers() {
    let rt = runtime();
    let mut redis = raw_redis(&rt);
    let pool = Pool::new(2).expect("pool");
    let pending = pool
        .map_async_with(sleep_ms, vec![400u64; 20], AsyncOptions::new().chunksize(1))
        .expect("map_async");
    std::thread::sleep(Duration::from_millis(600));
    let before = child_pids();
    assert_eq!(before.len(), 2, "{before:?}");
    let sampler = PidSampler::start();
    // Redis loses the stream (and its consumer group), as after a restart without persistence.
    let tasks = task_stream_key(&mut redis);
    let deleted: u64 = redis::cmd("DEL")
        .arg(&tasks)
        .query(&mut redis)
        .expect("DEL");
    assert_eq!(deleted, 1);
    let lost = Instant::now();
    let outcome = pending.get(Some(Duration::from_secs(15)));
    let took = lost.elapsed();
    // A worker that found the state gone is not replaced by one that finds the same at once.
    std::thread::sleep(Duration::from_secs(1));
    let seen = sampler.finish();
    eprintln!(
        "the call ended {took:?} after the stream went: {outcome:?}; {} worker processes seen",
        seen.len()
    );
    assert!(
        seen.len() <= before.len() + 2,
        "workers respawned in a loop: {} worker processes in {:?}",
        seen.len(),
        lost.elapsed()
    );
    assert_state_lost(outcome);
    assert!(
        took < Duration::from_secs(10),
        "the call failed only after {took:?}"
    );
    // The pool is broken: a later call fails at once, and its workers are gone.
    assert_state_lost(pool.map(sleep_ms, vec![1u64]));
    assert!(
        wait_for(Duration::from_secs(10), || child_pids().is_empty()),
        "the broken pool's workers still run: {:?}",
        child_pids()
    );
    // The stream was not made again without its group.
    let exists: bool = redis::cmd("EXISTS")
        .arg(&tasks)
        .query(&mut redis)
        .expect("EXISTS");
    assert!(!exists, "{tasks} was made again");
}

#[test]
fn a_worker_in_a_long_chunk_sees_the_state_lost_without_waiting_for_its_chunk() {
    let rt = runtime();
    let mut redis = raw_redis(&rt);
    let pool = Pool::new(1).expect("pool");
    let pending = pool
        .apply_async(sleep_ms, (60_000u64,))
        .expect("apply_async");
    std::thread::sleep(Duration::from_millis(500));
    let tasks = task_stream_key(&mut redis);
    redis::cmd("DEL")
        .arg(&tasks)
        .query::<()>(&mut redis)
        .expect("DEL");
    let lost = Instant::now();
    // Its heartbeat, which renews the chunk's lease, finds the stream gone.
    let outcome = pending.get(Some(Duration::from_secs(15)));
    let took = lost.elapsed();
    eprintln!("the call ended {took:?} after the stream went: {outcome:?}");
    assert_state_lost(outcome);
    assert!(
        took < Duration::from_secs(5),
        "the call failed only after {took:?}"
    );
}

#[test]
fn a_pool_of_thread_workers_whose_store_was_flushed_breaks_and_fails_its_calls() {
    let rt = runtime();
    let mut redis = raw_redis(&rt);
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::Thread)
        .build()
        .expect("pool");
    let pending = pool
        .map_async_with(sleep_ms, vec![300u64; 20], AsyncOptions::new().chunksize(1))
        .expect("map_async");
    std::thread::sleep(Duration::from_millis(500));
    // Everything goes, as when Redis comes back empty.
    redis::cmd("FLUSHDB")
        .query::<()>(&mut redis)
        .expect("FLUSHDB");
    let lost = Instant::now();
    let outcome = pending.get(Some(Duration::from_secs(15)));
    let took = lost.elapsed();
    eprintln!("the call ended {took:?} after FLUSHDB: {outcome:?}");
    assert_state_lost(outcome);
    assert!(
        took < Duration::from_secs(10),
        "the call failed only after {took:?}"
    );
    assert_state_lost(pool.map(sleep_ms, vec![1u64]));
}

/// A TCP proxy to a Redis server that loses one reply: the first one from the server that holds
/// `marker` (or, with [`Lose::ReplyToRequest`], the first reply to a request that holds it) is
/// not passed on, and that connection is closed, as when the network fails after Redis served a
/// command and before its client got the answer.
struct LosingProxy {
    port: u16,
    lost: Arc<AtomicBool>,
}

/// Which reply a [`LosingProxy`] loses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lose {
    /// The first reply that holds the marker.
    ReplyHolding,
    /// The reply to the first request that holds the marker (the request reaches Redis).
    ReplyToRequest,
}

impl LosingProxy {
    fn start(upstream_port: u16, marker: &[u8]) -> LosingProxy {
        LosingProxy::start_losing(upstream_port, marker, Lose::ReplyHolding)
    }

    fn start_losing(upstream_port: u16, marker: &[u8], lose: Lose) -> LosingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let lost = Arc::new(AtomicBool::new(false));
        let marker = marker.to_vec();
        let flag = lost.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(from_client), Ok(to_server)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                // Set (before the request goes on) when the replies of this connection are to
                // be lost from now on.
                let doomed = Arc::new(AtomicBool::new(false));
                let (request_marker, request_flag, request_doomed) =
                    (marker.clone(), flag.clone(), doomed.clone());
                std::thread::spawn(move || {
                    pass_requests(
                        from_client,
                        to_server,
                        (lose == Lose::ReplyToRequest).then_some(&request_marker[..]),
                        &request_flag,
                        &request_doomed,
                    )
                });
                let (marker, flag) = (marker.clone(), flag.clone());
                std::thread::spawn(move || {
                    let marker = (lose == Lose::ReplyHolding).then_some(&marker[..]);
                    serve_replies(server, client, marker, &flag, &doomed)
                });
            }
        });
        LosingProxy { port, lost }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether the reply was lost yet.
    fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// Whether `bytes` (with `tail`, the end of what came before, so that a marker split between
/// two reads is seen) hold `marker`, and are the first to (across all connections: `lost`).
fn first_to_carry(
    marker: Option<&[u8]>,
    tail: &mut Vec<u8>,
    bytes: &[u8],
    lost: &AtomicBool,
) -> bool {
    let Some(marker) = marker else {
        return false;
    };
    let mut window = std::mem::take(tail);
    window.extend_from_slice(bytes);
    let first = !lost.load(Ordering::Acquire)
        && contains_bytes(&window, marker)
        && !lost.swap(true, Ordering::AcqRel);
    *tail = window[window.len().saturating_sub(marker.len())..].to_vec();
    first
}

/// Passes the client's requests to the server. The first that holds `marker` (across all
/// connections), when there is one, dooms this connection first: its reply is not passed on.
fn pass_requests(
    mut client: TcpStream,
    mut server: TcpStream,
    marker: Option<&[u8]>,
    lost: &AtomicBool,
    doomed: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if first_to_carry(marker, &mut tail, &buf[..n], lost) {
            doomed.store(true, Ordering::Release);
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

/// Passes the server's replies to the client, except the first that holds `marker` (across all
/// connections), when there is one, and any once the connection is `doomed`: then both ends are
/// closed instead.
fn serve_replies(
    mut server: TcpStream,
    mut client: TcpStream,
    marker: Option<&[u8]>,
    lost: &AtomicBool,
    doomed: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if doomed.load(Ordering::Acquire) {
            break;
        }
        if first_to_carry(marker, &mut tail, &buf[..n], lost) {
            break;
        }
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

#[test]
fn a_worker_whose_read_reply_was_lost_runs_the_chunks_it_was_given() {
    let redis = TestRedis::tcp();
    const MARKER: &str = "lose-the-reply-that-carries-this-chunk";
    let proxy = LosingProxy::start(redis.port(), MARKER.as_bytes());
    let config = Config::builder()
        .redis_url(proxy.url())
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let lease = Duration::from_secs(2);
    let pool = Pool::builder()
        .processes(1)
        .task_lease(lease)
        .build()
        .expect("pool");
    let worker = pool.apply(pid_of, (0u64,)).expect("warm up");
    // The worker's read that is served this chunk never gets its reply: the connection drops.
    let started = Instant::now();
    let pid = pool
        .apply_async(pid_with, (MARKER.to_string(),))
        .expect("apply_async")
        .get(Some(Duration::from_secs(30)));
    let took = started.elapsed();
    eprintln!("the chunk's result came {took:?} after it was sent: {pid:?}");
    assert!(
        proxy.lost(),
        "the proxy never saw the chunk go to the worker"
    );
    // Its retry took in hand the chunk pending on it: no lease lapsed, nobody was killed.
    assert_eq!(
        pid.as_ref().ok(),
        Some(&worker),
        "the chunk ran elsewhere ({pid:?}): its worker {worker} lost it"
    );
    assert!(
        pid_running(worker),
        "the worker {worker} was killed for a chunk it did not know it held"
    );
    assert!(took < lease, "the chunk waited {took:?}, past its lease");
    assert_eq!(pool.map(pid_of, 0..4u64).expect("map"), vec![worker; 4]);
}

/// Exits the worker with code 77, the code a worker uses to say the pool's state is gone.
#[shoal::remote]
fn exit_77(_x: u64) -> u64 {
    std::process::exit(77)
}

/// A task that exits with the code a worker uses for "the pool's state is gone" (77, also
/// `EX_NOPERM`) is an ordinary crash when the state is there: its chunk fails as `Crashed`, and
/// the pool goes on.
#[test]
fn a_task_that_exits_with_the_state_lost_code_is_an_ordinary_crash() {
    let _rt = runtime();
    let pool = Pool::builder()
        .processes(1)
        .retries(0)
        .build()
        .expect("pool");
    match pool.map(exit_77, vec![1u64]) {
        Err(Error::Task(e)) => assert_eq!(e.kind, shoal::TaskErrorKind::Crashed, "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        pool.map(sleep_ms, vec![1u64]).expect("the pool goes on"),
        vec![1]
    );
}

/// The TTL (seconds) of `key`: -2 when it does not exist, -1 when it has none.
fn ttl_of(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query(conn).expect("TTL")
}

/// A pool's results stream is made with its task stream, with a TTL, when the pool is built:
/// a driver killed after a first result and before its first lease check (which refreshes the
/// TTLs) leaves nothing without one. It was made by a worker's first result, without a TTL.
#[test]
fn a_pools_results_stream_expires_from_the_start() {
    let rt = runtime();
    let mut redis = raw_redis(&rt);
    let pool = Pool::new(1).expect("pool");
    let tasks = task_stream_key(&mut redis);
    let results = format!("{}results", tasks.trim_end_matches("tasks"));
    for key in [&tasks, &results] {
        let ttl = ttl_of(&mut redis, key);
        assert!(ttl > 0, "{key} has TTL {ttl} once the pool is built");
    }
    assert_eq!(pool.map(sleep_ms, vec![1u64, 2]).expect("map"), vec![1, 2]);
    let ttl = ttl_of(&mut redis, &results);
    assert!(ttl > 0, "{results} has TTL {ttl} after a result");
    // Nothing reads through the group that made it: it holds no entry.
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&results)
        .arg("made") // `shoal_executor::pool::RESULTS_GROUP`
        .query(&mut redis)
        .expect("XPENDING");
    assert!(
        matches!(&pending, redis::Value::Array(v) if v.first() == Some(&redis::Value::Int(0))),
        "{pending:?}"
    );
}

/// Appends `item` as a line to the file `runs` (each run of the task leaves one), and returns
/// twice `item`; `marker` only travels in the chunk (see `LosingProxy`).
#[shoal::remote]
fn doubled_once(item: u64, runs: String, marker: String) -> u64 {
    use std::io::Write;
    std::hint::black_box(marker);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&runs)
        .expect("runs file");
    // One write: the runs of other workers append to the same file.
    file.write_all(format!("{item}\n").as_bytes())
        .expect("runs file");
    item * 2
}

/// The feeder's write of a batch of chunks is sent again when its reply is lost, and Redis ran
/// the first one: the retry adds nothing, so each item runs once (it ran twice: the batch was
/// added twice, and only the results were kept once).
#[test]
fn a_batch_of_chunks_whose_write_reply_was_lost_runs_each_item_once() {
    let redis = TestRedis::tcp();
    const MARKER: &str = "lose-the-reply-to-the-write-of-this-chunk";
    let proxy = LosingProxy::start_losing(redis.port(), MARKER.as_bytes(), Lose::ReplyToRequest);
    let config = Config::builder()
        .redis_url(proxy.url())
        .build()
        .expect("config");
    let rt = shoal::init_with(config).expect("runtime");
    let pool = Pool::new(2).expect("pool");
    // Warm up: the script that adds chunks is loaded, so the marked write runs at once (a first
    // EVALSHA would be refused with NOSCRIPT, and run nothing).
    assert_eq!(
        pool.map(sleep_ms, vec![1u64; 4]).expect("warm up"),
        vec![1; 4]
    );
    let dir = scratch();
    let runs = dir.path().join("runs").display().to_string();
    // Ten chunks, written in batches of 1, 2, 4 and 3 chunks: the marker is in the items of
    // the third batch on (chunk 3, items 12 to 15, is the first to hold it), so the write that
    // loses its reply is one of several chunks, after others of the call were written.
    let items: Vec<(u64, String, String)> = (0..40u64)
        .map(|i| {
            let marker = if i >= 12 { MARKER } else { "" };
            (i, runs.clone(), marker.to_string())
        })
        .collect();
    let started = Instant::now();
    let results = pool
        .starmap_async_with(doubled_once, items, AsyncOptions::new().chunksize(4))
        .expect("starmap_async")
        .get(Some(Duration::from_secs(30)));
    eprintln!("the map took {:?}: {results:?}", started.elapsed());
    assert!(proxy.lost(), "the proxy never lost the reply to a write");
    assert_eq!(
        results.expect("the map"),
        (0..40u64).map(|i| i * 2).collect::<Vec<_>>()
    );
    // The record of the call's last chunk (checked below).
    let mut conn = raw_redis(&rt);
    let tasks = task_stream_key(&mut conn);
    let added = format!("{}added", tasks.trim_end_matches("tasks"));
    let added_ttl = ttl_of(&mut conn, &added);
    // A chunk added twice runs again after its first result is in: the workers run every chunk
    // in the stream (the stop entries come after them) before they exit.
    pool.close().expect("close");
    pool.join().expect("join");
    let mut counts = std::collections::BTreeMap::<u64, usize>::new();
    for line in std::fs::read_to_string(&runs).expect("runs").lines() {
        *counts.entry(line.parse().expect("an item")).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "items run more than once: {twice:?}");
    assert_eq!(counts.len(), 40, "{counts:?}");
    // The record is kept with a TTL, and goes with the pool's other keys.
    assert!(added_ttl > 0, "{added} has TTL {added_ttl}");
    drop(pool);
    assert!(
        wait_for(Duration::from_secs(10), || ttl_of(&mut conn, &added) == -2),
        "{added} outlived its pool"
    );
}
