//! Nothing runs for nobody: pool workers whose driver died or froze exit (in their initializer
//! too), the embedded store's directory goes with its program, and a pool whose Redis went away
//! fails its calls with the store's error, promptly, instead of counting worker crashes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, children_of, field, pid_running, wait_for};

shoal::test_support!();

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");
const LEASE: Duration = Duration::from_secs(2);

/// A driver running `scenario pool-sleep`: two workers in 60 s tasks.
struct Driver {
    lease: Duration,
    child: Child,
    workers: Vec<u32>,
    store: String,
}

impl Driver {
    fn start(redis_url: Option<&str>) -> Driver {
        Driver::with_lease(redis_url, LEASE)
    }

    fn with_lease(redis_url: Option<&str>, lease: Duration) -> Driver {
        let mut command = Command::new(SCENARIO);
        command
            .args(["pool-sleep", &lease.as_secs_f64().to_string()])
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::piped());
        if let Some(url) = redis_url {
            command.env("SHOAL_REDIS_URL", url);
        }
        let mut child = command.spawn().expect("scenario runs");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut text = String::new();
        for line in lines.by_ref() {
            let line = line.expect("line");
            text.push_str(&line);
            text.push('\n');
            if line == "ready" {
                break;
            }
        }
        let store = field(&text, "store").unwrap_or_else(|| panic!("no store in {text:?}"));
        let program = std::fs::canonicalize(SCENARIO).expect("scenario path");
        let workers: Vec<u32> = children_of(child.id())
            .into_iter()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).ok() == Some(program.clone())
            })
            .collect();
        assert_eq!(workers.len(), 2, "the driver's workers: {workers:?}");
        Driver {
            lease,
            child,
            workers,
            store,
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the driver");
    }

    /// The documented bound (the task lease plus a second; see `shoal_executor::pool::driver_ttl`),
    /// with a second of slack for a loaded machine.
    fn bound(&self) -> Duration {
        self.lease + Duration::from_secs(2)
    }

    /// Asserts that every worker is gone within `limit`; returns how long it took.
    fn workers_exit_within(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        let gone = wait_for(limit, || self.workers.iter().all(|p| !pid_running(*p)));
        let took = started.elapsed();
        assert!(
            gone,
            "workers {:?} still run {took:?} after their driver went",
            self.workers
        );
        took
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &self.workers {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

#[test]
fn workers_exit_when_their_driver_is_killed_with_an_external_redis() {
    let redis = TestRedis::tcp();
    let driver = Driver::start(Some(&redis.url()));
    driver.signal(Signal::SIGKILL);
    let took = driver.workers_exit_within(driver.bound());
    eprintln!("workers exited {took:?} after the driver's SIGKILL");
}

#[test]
fn workers_exit_when_their_driver_is_killed_and_the_embedded_store_is_removed() {
    let driver = Driver::start(None);
    let socket = PathBuf::from(driver.store.trim_start_matches("unix://"));
    let dir = socket
        .parent()
        .expect("the store's directory")
        .to_path_buf();
    assert!(dir.exists());
    driver.signal(Signal::SIGKILL);
    driver.workers_exit_within(driver.bound());
    assert!(
        wait_for(Duration::from_secs(5), || !dir.exists()),
        "{} outlived its program",
        dir.display()
    );
}

#[test]
fn workers_exit_when_their_driver_stops_refreshing_its_liveness_key() {
    // A frozen driver is not dead, so no parent-death signal comes: only the liveness key
    // tells its workers. (A driver on another host that dies looks the same to its workers.)
    let redis = TestRedis::tcp();
    let driver = Driver::start(Some(&redis.url()));
    driver.signal(Signal::SIGSTOP);
    let took = driver.workers_exit_within(driver.bound());
    eprintln!("workers exited {took:?} after their driver froze");
    assert!(
        took >= Duration::from_millis(500),
        "{took:?}: too soon for the key to lapse"
    );
}

#[test]
fn workers_of_a_short_lease_leave_a_frozen_driver_within_the_lease_and_a_second() {
    // Below a 1 s lease the liveness key's TTL follows the lease, so the bound still holds.
    let redis = TestRedis::tcp();
    let driver = Driver::with_lease(Some(&redis.url()), Duration::from_millis(300));
    driver.signal(Signal::SIGSTOP);
    let took = driver.workers_exit_within(driver.bound());
    eprintln!("workers exited {took:?} after their driver froze (lease 300 ms)");
    assert!(
        took >= Duration::from_millis(300),
        "{took:?}: too soon for the key to lapse"
    );
}

/// Sleeps `ms`.
#[shoal::remote]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[test]
fn a_lost_store_fails_the_calls_with_its_error_promptly() {
    let mut redis = TestRedis::tcp();
    let response_timeout = Duration::from_secs(1);
    let config = Config::builder()
        .redis_url(redis.url())
        .response_timeout(response_timeout)
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let pool = Pool::new(2).expect("pool");
    let pending = pool
        .map_async_with(
            sleep_ms,
            vec![40_000u64; 4],
            AsyncOptions::new().chunksize(1),
        )
        .expect("map_async");
    std::thread::sleep(Duration::from_millis(800));
    redis.kill();
    let killed = Instant::now();
    let outcome = pending.get(Some(Duration::from_secs(60)));
    let took = killed.elapsed();
    eprintln!("the call failed {took:?} after Redis was killed: {outcome:?}");
    match outcome {
        Err(e @ Error::Redis { .. }) => {
            assert!(e.is_store_unreachable(), "{e}");
            assert!(!e.to_string().contains("max_restarts"), "{e}");
        }
        other => panic!("expected the store's error, got {other:?}"),
    }
    assert!(
        took <= response_timeout + Duration::from_secs(2),
        "the call failed only {took:?} after Redis went away"
    );
    // Later calls get the same error at once.
    assert!(matches!(
        pool.map(sleep_ms, vec![1u64]),
        Err(Error::Redis { .. })
    ));
}

#[test]
fn connections_dropped_by_redis_are_reopened_and_the_map_completes() {
    let redis = TestRedis::tcp();
    let config = Config::builder()
        .redis_url(redis.url())
        .response_timeout(Duration::from_secs(5))
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let pool = Pool::new(2).expect("pool");
    let pending = pool
        .map_async_with(sleep_ms, vec![20u64; 150], AsyncOptions::new().chunksize(1))
        .expect("map_async");
    let admin = redis::Client::open(redis.url()).expect("client");
    let mut admin = admin.get_connection().expect("admin connection");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        // Every client connection but this one is closed by the server.
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query(&mut admin)
            .expect("CLIENT KILL");
        assert!(killed > 0);
    }
    let results = pending
        .get(Some(Duration::from_secs(60)))
        .expect("the map completes");
    assert_eq!(results, vec![20u64; 150]);
    // The pool still works.
    assert_eq!(pool.map(sleep_ms, vec![1u64, 2]).expect("map"), vec![1, 2]);
}

#[test]
fn after_the_store_comes_back_a_new_pool_works() {
    let mut redis = TestRedis::tcp();
    let config = Config::builder()
        .redis_url(redis.url())
        .response_timeout(Duration::from_secs(1))
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let pool = Pool::new(2).expect("pool");
    let pending = pool
        .map_async_with(
            sleep_ms,
            vec![5_000u64; 4],
            AsyncOptions::new().chunksize(1),
        )
        .expect("map_async");
    std::thread::sleep(Duration::from_millis(500));
    redis.kill();
    match pending.get(Some(Duration::from_secs(30))) {
        Err(e @ Error::Redis { .. }) => assert!(e.is_store_unreachable(), "{e}"),
        other => panic!("expected the store's error, got {other:?}"),
    }
    drop(pool);
    // Redis is back (empty): the same runtime serves a new pool.
    redis.restart();
    let pool = Pool::new(2).expect("a new pool once the store is back");
    assert_eq!(
        pool.map(sleep_ms, vec![1u64, 2, 3]).expect("map"),
        vec![1, 2, 3]
    );
}

/// Stops the Redis server at `url` (`SHUTDOWN NOSAVE`), then returns `code`.
#[shoal::remote]
fn stop_the_store_then_return(url: String, code: i32) -> Result<(), String> {
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .map_err(|e| e.to_string())?;
    // The server closes the connection instead of answering.
    let _ = redis::cmd("SHUTDOWN").arg("NOSAVE").query::<()>(&mut conn);
    if code == 0 {
        Ok(())
    } else {
        Err("failing on purpose".into())
    }
}

#[test]
fn a_child_whose_exit_cannot_be_recorded_keeps_its_exit_code() {
    let mut redis = TestRedis::tcp();
    let config = Config::builder()
        .redis_url(redis.url())
        .response_timeout(Duration::from_secs(1))
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    // The function returns Ok, then Err; each time after it stopped the store, so its exit
    // record cannot be written. Its code is still its own, not the store-lost code (75).
    for code in [0, 1] {
        if code == 1 {
            // The first child stopped it: an empty server on the same port.
            redis.restart();
        }
        let p = Process::new(stop_the_store_then_return, (redis.url(), code));
        p.start().expect("start");
        p.join(Some(Duration::from_secs(30))).expect("join");
        assert_eq!(p.exitcode(), Some(code));
    }
}

/// Leaves `dir/init-<pid>`, then sleeps `ms`: an initializer that takes long.
#[shoal::remote]
fn mark_then_sleep(dir: String, ms: u64) {
    std::fs::write(format!("{dir}/init-{}", std::process::id()), "x").expect("marker");
    std::thread::sleep(Duration::from_millis(ms));
}

/// Where [`a_driver_in_a_process_of_its_own`] finds its Redis.
const DRIVER_REDIS: &str = "SHOAL_TEST_DRIVER_REDIS";
/// Where [`a_driver_in_a_process_of_its_own`]'s initializer leaves its marks.
const DRIVER_DIR: &str = "SHOAL_TEST_DRIVER_DIR";

/// Not a test of its own: the driver of
/// `workers_leave_a_frozen_driver_while_their_initializer_runs`, which runs this test binary
/// with only this test selected (it returns at once otherwise). A pool of 2 whose initializer
/// takes 60 s; it prints `ready` and then waits.
#[test]
fn a_driver_in_a_process_of_its_own() {
    let (Ok(url), Ok(dir)) = (std::env::var(DRIVER_REDIS), std::env::var(DRIVER_DIR)) else {
        return;
    };
    let config = Config::builder().redis_url(url).build().expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let _pool = Pool::builder()
        .processes(2)
        .task_lease(LEASE)
        .initializer(mark_then_sleep, (dir, 60_000u64))
        .build()
        .expect("pool");
    println!("ready");
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn workers_leave_a_frozen_driver_while_their_initializer_runs() {
    // The heartbeat thread watches the driver; a worker in its initializer must have it too.
    // The driver is frozen rather than killed: a local worker gets the parent-death signal when
    // its driver dies, whatever it runs, so only a frozen driver (or a remote worker, which gets
    // no such signal) leaves the liveness key alone to tell its workers.
    let redis = TestRedis::tcp();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("this test binary");
    let mut child = Command::new(&exe)
        .args([
            "a_driver_in_a_process_of_its_own",
            "--exact",
            "--nocapture",
            "-q",
        ])
        .env(DRIVER_REDIS, redis.url())
        .env(DRIVER_DIR, dir.path())
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .spawn()
        .expect("the driver runs");
    let driver = Pid::from_raw(child.id() as i32);
    let in_initializer = || {
        std::fs::read_dir(dir.path())
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    let started = wait_for(Duration::from_secs(30), || in_initializer() == 2);
    let workers: Vec<u32> = children_of(child.id())
        .into_iter()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_ref() == Some(&exe))
        .collect();
    let frozen = started && workers.len() == 2 && kill(driver, Signal::SIGSTOP).is_ok();
    let since = Instant::now();
    let gone = frozen
        && wait_for(LEASE + Duration::from_secs(2), || {
            workers.iter().all(|p| !pid_running(*p))
        });
    let took = since.elapsed();
    // SIGKILL ends a stopped process too; its workers get their parent-death signal.
    let _ = child.kill();
    let _ = child.wait();
    for pid in &workers {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    assert!(
        started,
        "the workers did not start their initializer ({} did)",
        in_initializer()
    );
    assert_eq!(workers.len(), 2, "the driver's workers: {workers:?}");
    assert!(frozen, "the driver could not be stopped");
    assert!(
        gone,
        "workers {workers:?} still ran their initializer {took:?} after their driver froze"
    );
    eprintln!("workers left {took:?} after their driver froze, in their initializer");
}
