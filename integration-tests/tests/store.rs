//! The store's connections against a real redis-server: after Redis restarted, the idle pooled
//! connections of the server that went away are not handed out one failure at a time, and
//! credentials Redis refuses are an error at once, not a store out of reach.

use std::time::{Duration, Instant};

use shoal::prelude::*;
use shoal_integration_tests::TestRedis;

shoal::test_support!();

/// A runtime on `redis`, with a response timeout long enough that a retry loop would show.
fn runtime(redis: &TestRedis) -> shoal::Runtime {
    let config = Config::builder()
        .redis_url(redis.url())
        .response_timeout(Duration::from_secs(10))
        .build()
        .expect("config");
    shoal::init_with(config).expect("runtime")
}

/// Ten waits at once on `event` (unset), each holding a connection of the pool for 300 ms:
/// ten connections sit idle afterwards.
fn fill_the_pool(event: &Event) {
    std::thread::scope(|s| {
        let waits: Vec<_> = (0..10)
            .map(|_| s.spawn(|| event.wait(Some(Duration::from_millis(300)))))
            .collect();
        for wait in waits {
            assert!(!wait.join().expect("thread").expect("wait"), "not set");
        }
    });
}

#[test]
fn pooled_connections_of_a_restarted_redis_are_not_handed_out() {
    let mut redis = TestRedis::tcp();
    let _rt = runtime(&redis);
    let event = Event::new().expect("event");
    fill_the_pool(&event);
    redis.kill();
    redis.restart();
    // Redis is back, empty. At most the first call may fail: it met a connection to the server
    // that went away, and its command was written before the client could know; it is not sent
    // again (it may have been applied), and it takes the other idle connections along.
    let mut failures = Vec::new();
    let mut ok = 0;
    let mut event = None;
    let mut value = None;
    let mut stored = 0u64;
    for step in 0..10u64 {
        let outcome = match (&event, &value) {
            (None, _) => Event::new().map(|e| event = Some(e)),
            (Some(_), None) => Value::new_raw(stored).map(|v| value = Some(v)),
            (Some(e), Some(v)) => match step % 4 {
                0 => e.set(),
                1 => e.is_set().map(|set| assert!(set)),
                2 => v.set(step).map(|()| stored = step),
                _ => v.get().map(|got| assert_eq!(got, stored)),
            },
        };
        match outcome {
            Ok(()) => ok += 1,
            Err(e) => failures.push(e),
        }
    }
    eprintln!("after the restart: {ok} calls succeeded, these failed: {failures:?}");
    assert!(
        failures.len() <= 1,
        "{ok} calls succeeded, these failed: {failures:?}"
    );
    assert!(
        failures.iter().all(Error::is_store_unreachable),
        "{failures:?}"
    );
}

#[test]
fn dedicated_async_connections_of_a_restarted_redis_are_not_handed_out() {
    let mut redis = TestRedis::tcp();
    let _rt = runtime(&redis);
    let event = Event::new().expect("event");
    // Ten async waits at once: ten dedicated connections of the runtime, idle afterwards.
    let waits = (0..10).map(|_| event.wait_async(Some(Duration::from_millis(300))));
    for waited in futures::executor::block_on(futures::future::join_all(waits)) {
        assert!(!waited.expect("wait"), "not set");
    }
    redis.kill();
    redis.restart();
    // The first synchronous call may meet a closed connection of the pool (see above).
    let event = Event::new()
        .or_else(|e| {
            assert!(e.is_store_unreachable(), "{e}");
            Event::new()
        })
        .expect("a new event once Redis is back");
    // The shared multiplexed connection (redis-rs's ConnectionManager) fails the first command
    // that meets its closed connection and reconnects: let that be this one.
    let _ = futures::executor::block_on(event.is_set_async());
    // Each wait blocks on a dedicated connection: at most the first may meet one of the server
    // that went away (see above), and it takes the other idle ones along.
    let mut failures = Vec::new();
    for _ in 0..10 {
        match futures::executor::block_on(event.wait_async(Some(Duration::from_millis(20)))) {
            Ok(set) => assert!(!set, "not set"),
            Err(e) => failures.push(e),
        }
    }
    eprintln!("after the restart, these waits failed: {failures:?}");
    assert!(failures.len() <= 1, "{failures:?}");
    assert!(
        failures.iter().all(Error::is_store_unreachable),
        "{failures:?}"
    );
}

#[test]
fn a_wrong_password_is_refused_at_once_and_not_taken_for_a_store_away() {
    let redis = TestRedis::with_acl_user("app", "s3cret");
    let wrong = redis.url().replace("s3cret", "wrong");
    let config = Config::builder()
        .redis_url(&wrong)
        .response_timeout(Duration::from_secs(10))
        .build()
        .expect("config");
    let started = Instant::now();
    let e = shoal::init_with(config).expect_err("a wrong password");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    assert!(!e.is_store_unreachable(), "{e}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(!e.to_string().contains("wrong"), "the password leaked: {e}");
}

/// Sends `REPLICAOF <args>` to the server at `url`.
fn replicaof(url: &str, args: &[&str]) {
    let mut admin = redis::Client::open(url)
        .expect("client")
        .get_connection()
        .expect("connection");
    redis::cmd("REPLICAOF")
        .arg(args)
        .query::<()>(&mut admin)
        .expect("REPLICAOF");
}

/// Sleeps `ms`, then returns it.
#[shoal::remote]
fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// A Redis that refuses writes for a while without applying them (`READONLY`: a primary
/// demoted during a failover; likewise `LOADING`, `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`) is a
/// store out of reach, not an answer: a pool's workers, feeder and supervisor send their
/// writes again until it takes them, and nothing counts as a worker crash. Before, the workers
/// failed on `READONLY` and their exits spent the restart budget: the pool broke.
#[test]
fn a_pool_rides_out_a_primary_demoted_for_a_while() {
    let redis = TestRedis::tcp();
    let _rt = runtime(&redis);
    let pool = Pool::builder()
        .processes(2)
        .restart_budget(0, Duration::from_secs(60))
        .build()
        .expect("pool");
    let call = pool
        .map_async_with(nap, vec![100u64; 30], AsyncOptions::new().chunksize(1))
        .expect("map_async");
    let counter = Value::new(0i64).expect("value");
    std::thread::sleep(Duration::from_millis(300));
    // A primary that nothing answers (port 1): the server is a replica, serving reads only.
    replicaof(&redis.url(), &["127.0.0.1", "1"]);
    // A primitive's write then fails at once, as while Redis is away, and says why (its
    // script took the refusal for an overflow before).
    let refused = counter.fetch_add(1);
    std::thread::sleep(Duration::from_millis(2_000));
    match refused {
        Err(e) => assert!(
            e.is_store_unreachable() && e.to_string().contains("read only"),
            "{e}"
        ),
        Ok(_) => panic!("an add was applied on a replica"),
    }
    replicaof(&redis.url(), &["NO", "ONE"]);
    assert_eq!(
        call.get(Some(Duration::from_secs(30))).expect("the map"),
        vec![100u64; 30]
    );
    assert_eq!(
        pool.map(nap, vec![1u64, 2]).expect("the next map"),
        vec![1, 2]
    );
}

/// A pooled connection that the server closed while it sat idle (its `timeout`, as a proxy or
/// a managed Redis does) is not handed out: the next command goes on a connection that works.
/// It failed ("connection dropped"), not knowing whether it was applied, before.
#[test]
fn idle_connections_the_server_closed_are_not_handed_out() {
    let redis = TestRedis::tcp();
    let _rt = runtime(&redis);
    let counter = Value::new(0i64).expect("value");
    counter.fetch_add(1).expect("add");
    let mut admin = redis::Client::open(redis.url())
        .expect("client")
        .get_connection()
        .expect("connection");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("timeout")
        .arg(1)
        .query::<()>(&mut admin)
        .expect("CONFIG SET timeout");
    // The server closes connections idle for a second (it checks a few times a second).
    std::thread::sleep(Duration::from_millis(2_500));
    counter
        .fetch_add(1)
        .expect("an add after the idle connections were closed");
    assert_eq!(counter.get().expect("get"), 2);
}

/// A TCP forwarder on 127.0.0.1: each connection it accepts goes to the server its target
/// names at that moment (a Service whose endpoint moves to the new primary in a failover),
/// and stays there.
fn forwarder(target: std::sync::Arc<std::sync::Mutex<u16>>) -> u16 {
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let to = *target.lock().expect("target");
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let pump = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            pump(
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            pump(server, client);
        }
    });
    port
}

/// Whether the replica at `url` has caught up with its primary's link.
fn replica_linked(url: &str) -> bool {
    let Ok(mut admin) = redis::Client::open(url).and_then(|c| c.get_connection()) else {
        return false;
    };
    redis::cmd("INFO")
        .arg("replication")
        .query::<String>(&mut admin)
        .is_ok_and(|info| info.contains("master_link_status:up"))
}

/// The async connections shared by actors and async primitives after a failover that demotes
/// the primary in place (its clients stay connected to it, as behind an operator's Service):
/// the first write refused with `READONLY` drops the shared connection, and the next ones go
/// to the new primary. Before, every async write failed with `READONLY` until the process
/// restarted.
#[test]
fn async_writes_follow_a_primary_demoted_behind_the_same_address() {
    let old = TestRedis::tcp();
    let new = TestRedis::tcp();
    replicaof(&new.url(), &["127.0.0.1", &old.port().to_string()]);
    assert!(
        shoal_integration_tests::wait_for(Duration::from_secs(10), || replica_linked(&new.url())),
        "the replica never linked"
    );
    let target = std::sync::Arc::new(std::sync::Mutex::new(old.port()));
    let port = forwarder(target.clone());
    let config = Config::builder()
        .redis_url(format!("redis://127.0.0.1:{port}"))
        .response_timeout(Duration::from_secs(10))
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let counter = Value::new(0i64).expect("value");
    let block_on = |f: std::pin::Pin<Box<dyn std::future::Future<Output = shoal::Result<i64>>>>| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio")
            .block_on(f)
    };
    assert_eq!(
        block_on(Box::pin(counter.fetch_add_async(1))).expect("add"),
        0
    );
    assert!(
        shoal_integration_tests::wait_for(Duration::from_secs(10), || {
            redis::Client::open(new.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("DBSIZE").query::<u64>(&mut c))
                .is_ok_and(|n| n > 0)
        }),
        "the replica never got the value"
    );
    // The failover: the replica takes over, the old primary follows it, and new connections
    // reach the new primary.
    replicaof(&new.url(), &["NO", "ONE"]);
    replicaof(&old.url(), &["127.0.0.1", &new.port().to_string()]);
    *target.lock().expect("target") = new.port();
    let mut outcomes = Vec::new();
    let applied = (0..20).any(|_| {
        let outcome = block_on(Box::pin(counter.fetch_add_async(1)));
        let done = outcome.is_ok();
        outcomes.push(outcome.map_err(|e| e.to_string()));
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(
        applied,
        "no async write reached the new primary: {outcomes:?}"
    );
    // At most the first write met the demoted server (refused, not applied).
    assert!(outcomes.len() <= 2, "{outcomes:?}");
    // Read through the old primary, a replica of the new one now: it catches up.
    assert!(
        shoal_integration_tests::wait_for(Duration::from_secs(5), || counter
            .get()
            .is_ok_and(|v| v == 2)),
        "the value is {:?}, not 2",
        counter.get()
    );
}
