//! The runtime as a whole program sees it: the embedded redis-server's lifecycle, daemon and
//! non-daemon children at exit, configuration errors, and the Redis URL forms.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal::prelude::*;
use shoal_integration_tests::{TestRedis, field, pid_running, scratch, text, wait_for};

shoal::test_support!();

const SCENARIO: &str = env!("CARGO_BIN_EXE_scenario");

fn scenario(args: &[&str], env: &[(&str, &str)]) -> Output {
    shoal_integration_tests::scenario(SCENARIO, args, env)
}

fn redis_pid(stdout: &str) -> u32 {
    field(stdout, "redis_pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no redis_pid in {stdout:?}"))
}

#[test]
fn embedded_redis_stops_when_the_program_ends() {
    let out = scenario(&["hello"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let pid = redis_pid(&stdout);
    assert!(!pid_running(pid), "redis-server {pid} outlived the program");
}

#[test]
fn embedded_redis_stops_when_main_panics() {
    let out = scenario(&["panic"], &[]);
    assert_eq!(out.status.code(), Some(101));
    let pid = redis_pid(&text(&out.stdout));
    assert!(!pid_running(pid), "redis-server {pid} outlived the panic");
}

/// Starts `scenario wait`, reads the embedded server's pid, then sends `signal` to the program.
fn signal_program(signal: Signal) {
    let mut child = Command::new(SCENARIO)
        .arg("wait")
        .stdout(Stdio::piped())
        .spawn()
        .expect("scenario runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let pid = redis_pid(&line);
    assert!(pid_running(pid));
    kill(Pid::from_raw(child.id() as i32), signal).expect("signal the program");
    let _ = child.wait();
    assert!(
        wait_for(Duration::from_secs(5), || !pid_running(pid)),
        "redis-server {pid} outlived {signal}"
    );
}

#[test]
fn embedded_redis_stops_on_ctrl_c() {
    signal_program(Signal::SIGINT);
}

#[test]
fn embedded_redis_stops_when_the_program_is_killed() {
    signal_program(Signal::SIGKILL);
}

#[test]
fn embedded_redis_stops_when_the_runtime_is_dropped_in_process() {
    let rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    let pid = rt.embedded_redis_pid().expect("embedded");
    assert!(pid_running(pid));
    drop(rt);
    assert!(!pid_running(pid), "redis-server {pid} still runs");
    // A new runtime starts a new server.
    let rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    assert_ne!(rt.embedded_redis_pid(), Some(pid));
}

#[test]
fn daemons_are_terminated_and_other_children_joined_at_exit() {
    let dir = scratch();
    let started = Instant::now();
    let out = scenario(&["daemon", &dir.path().display().to_string()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let daemon: u32 = field(&stdout, "daemon_pid")
        .and_then(|p| p.parse().ok())
        .expect("pid");
    let worker: u32 = field(&stdout, "worker_pid")
        .and_then(|p| p.parse().ok())
        .expect("pid");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the daemon was waited for"
    );
    assert!(
        dir.path().join("worker").exists(),
        "the non-daemon child was not joined"
    );
    assert!(!dir.path().join("daemon").exists());
    assert!(!pid_running(daemon), "daemon {daemon} still runs");
    assert!(!pid_running(worker));
}

#[test]
fn a_missing_redis_server_says_how_to_install_it() {
    let out = scenario(
        &["ok"],
        &[("SHOAL_REDIS_SERVER_BINARY", "/nonexistent/redis-server")],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("apt-get install redis-server"), "{stderr}");
    assert!(stderr.contains("redis.url"), "{stderr}");
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let dir = scratch();
    let path = dir.path().join("shoal.yaml");
    std::fs::write(&path, "redis:\n  expiry_sec: 10\n").expect("write");
    let out = scenario(&["ok"], &[("SHOAL_CONFIG", &path.display().to_string())]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("redis.expiry_sec"), "{stderr}");

    std::fs::write(&path, "local:\n  start_method: thread\n").expect("write");
    let out = scenario(
        &["ok"],
        &[
            ("SHOAL_CONFIG", &path.display().to_string()),
            ("SHOAL_LOCAL_START_METHOD", "fork"),
        ],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("SHOAL_LOCAL_START_METHOD"), "{stderr}");
    assert!(stderr.contains("local.start_method"), "{stderr}");

    let out = scenario(&["ok"], &[("SHOAL_CONFIG", "/nonexistent.yaml")]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("SHOAL_CONFIG"));
}

#[test]
fn environment_overrides_reach_the_runtime() {
    // The thread start method runs the child in the program itself: the scenario's greeting
    // comes out even though nothing else changed.
    let out = scenario(&["hello"], &[("SHOAL_LOCAL_START_METHOD", "thread")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hello bob"));
}

#[shoal::remote]
fn touch(path: String) {
    std::fs::write(path, "ok").expect("write");
}

/// Runs one subprocess child through `url` with a runtime of its own.
fn run_child_through(url: &str) {
    let config = Config::builder()
        .redis_url(url)
        .namespace("urltest")
        .build()
        .expect("config");
    let rt = shoal::init_with(config).expect("runtime");
    assert_eq!(rt.embedded_redis_pid(), None);
    let dir = scratch();
    let path = dir.path().join("touched");
    let p = Process::new(touch, (path.display().to_string(),));
    p.start().expect("start");
    p.join(None).expect("join");
    assert_eq!(p.exitcode(), Some(0));
    assert!(path.exists());
}

#[test]
fn a_tcp_redis_url_works() {
    let server = TestRedis::tcp();
    run_child_through(&server.url());
}

#[test]
fn an_acl_user_and_password_work_and_a_wrong_password_is_an_error() {
    let server = TestRedis::with_acl_user("app", "s3cret");
    let wrong = server.url().replace("s3cret", "wrong");
    let config = Config::builder().redis_url(&wrong).build().expect("config");
    match shoal::init_with(config) {
        Err(Error::Redis { context, .. }) => {
            assert!(context.contains("app:***@"), "{context}");
            assert!(!context.contains("wrong"), "the password leaked: {context}");
        }
        other => panic!("{other:?}"),
    }
    run_child_through(&server.url());
}

#[test]
fn a_tls_redis_url_works() {
    let server = TestRedis::tls();
    run_child_through(&server.url());
}

#[test]
fn tls_verifies_certificates_unless_told_not_to() {
    let server = TestRedis::tls();
    // The server's certificate is self-signed: without #insecure the handshake must fail.
    let strict = server.url().replace("/#insecure", "");
    let config = Config::builder()
        .redis_url(strict)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("config");
    match shoal::init_with(config) {
        Err(Error::Redis { .. }) => {}
        other => panic!("a self-signed certificate was accepted: {other:?}"),
    }
}

#[test]
fn redis_going_away_is_a_clear_error() {
    let mut server = TestRedis::tcp();
    let config = Config::builder()
        .redis_url(server.url())
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    server.kill();
    let p = Process::new(touch, ("/nonexistent/never".to_string(),));
    let started = Instant::now();
    match p.start() {
        Err(Error::Redis { context, .. }) => {
            assert!(
                context.contains(&format!("127.0.0.1:{}", server.port())),
                "{context}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!p.is_alive());
}

#[test]
fn a_second_runtime_with_another_configuration_is_refused() {
    let _rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    let same = shoal::init_with(Config::builder().build().expect("config"));
    assert!(same.is_ok());
    let other = Config::builder()
        .namespace("other")
        .build()
        .expect("config");
    assert!(matches!(
        shoal::init_with(other),
        Err(Error::InvalidState(_))
    ));
}

#[test]
fn execution_details_are_exported() {
    let dir = scratch();
    let config = Config::builder()
        .export_execution_details(dir.path())
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let target = scratch();
    let p = Process::new(touch, (target.path().join("x").display().to_string(),)).name("exported");
    p.start().expect("start");
    p.join(None).expect("join");
    let path = dir.path().join("shoal-execution-details.jsonl");
    assert!(wait_for(Duration::from_secs(5), || path.exists()));
    let line = std::fs::read_to_string(&path).expect("details");
    assert!(line.contains("\"name\":\"exported\""), "{line}");
    assert!(line.contains("\"exitcode\":0"), "{line}");
    assert!(line.contains("\"start_method\":\"process\""), "{line}");
    assert!(
        line.contains(&format!("\"pid\":{}", p.pid().expect("pid"))),
        "{line}"
    );
}

#[test]
fn a_service_installs_its_own_tracing_subscriber_after_init() {
    let _rt = shoal::init_with(Config::builder().build().expect("config")).expect("runtime");
    // tracing_subscriber's init() panics when a global subscriber is set already: shoal must
    // not have set one.
    tracing_subscriber::fmt().with_writer(std::io::sink).init();
    assert!(
        !shoal::log_to_stderr(),
        "the service's subscriber is in place"
    );
}

#[test]
fn shoal_main_keeps_the_body_of_main_out_of_workers() {
    let out = Command::new(env!("CARGO_BIN_EXE_attributed"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the program runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.matches("main body in pid").count(),
        1,
        "the body of main ran in a worker too:\n{stdout}"
    );
    assert!(stdout.contains("the child runs"), "{stdout}");
    assert!(stdout.contains("exitcode=0"), "{stdout}");
}

/// Ignores `SIGTERM` (a handler of its own, tokio's, that nobody reads), then sleeps for a
/// minute.
#[shoal::remote]
fn ignore_sigterm_then_sleep(dir: String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let _terminate = runtime
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        })
        .expect("a SIGTERM handler");
    std::fs::write(format!("{dir}/{}", std::process::id()), "ignoring SIGTERM").expect("marker");
    std::thread::sleep(Duration::from_secs(60));
}

/// `shutdown_within` terminates the children still running at its deadline together: those
/// that ignore SIGTERM share one grace before they are killed, instead of adding one each.
/// `Duration::MAX` means no limit (it panicked adding itself to the clock).
#[test]
fn shutdown_within_gives_stubborn_children_one_grace_together() {
    let dir = scratch();
    let path = dir.path().display().to_string();
    let rt = shoal::init().expect("runtime");
    let children: Vec<Process> = (0..3)
        .map(|_| Process::new(ignore_sigterm_then_sleep, (path.clone(),)))
        .collect();
    for child in &children {
        child.start().expect("start");
    }
    assert!(wait_for(Duration::from_secs(20), || {
        std::fs::read_dir(dir.path()).map_or(0, |d| d.count()) == 3
    }));
    let started = Instant::now();
    rt.shutdown_within(Duration::from_millis(300));
    let took = started.elapsed();
    // 0.3 s, one grace of 5 s, and the kills: not 0.3 + 3 × 5.
    assert!(took < Duration::from_secs(9), "{took:?}");
    for pid in std::fs::read_dir(dir.path()).expect("dir") {
        let pid: u32 = pid
            .expect("entry")
            .file_name()
            .to_str()
            .and_then(|n| n.parse().ok())
            .expect("a pid");
        assert!(
            wait_for(Duration::from_secs(5), || !pid_running(pid)),
            "{pid} runs on"
        );
    }

    let rt = shoal::init().expect("runtime");
    rt.shutdown_within(Duration::MAX);
}

#[shoal::remote]
fn does_nothing() {}

/// A process started while the runtime is being dropped (from a thread child the drop waits
/// for) is refused: it used to start a second runtime, never dropped, which a later `init()`
/// then handed back with its store already stopped.
#[test]
fn a_process_started_while_the_runtime_drops_is_refused() {
    let rt = shoal::init().expect("runtime");
    let refused = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = refused.clone();
    let late = Process::thread(
        move || {
            std::thread::sleep(Duration::from_millis(300));
            let started = Process::new(does_nothing, ()).start();
            *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(started.is_err());
        },
        (),
    );
    late.start().expect("start");
    drop(late);
    drop(rt);
    assert_eq!(
        *refused.lock().unwrap_or_else(|p| p.into_inner()),
        Some(true),
        "the start during the drop was refused"
    );
    // Once dropped, a start says that no runtime runs (not that one is shutting down).
    match Process::new(does_nothing, ()).start() {
        Err(shoal::Error::InvalidState(m)) => assert!(m.contains("init"), "{m}"),
        other => panic!("a start without a runtime gave {other:?}"),
    }
    let _rt = shoal::init().expect("a fresh runtime");
    let q: Queue<u32> = Queue::new().expect("its store works");
    q.put(1).expect("put");
    assert_eq!(q.get().expect("get"), 1);
}

/// `init_with` while a runtime runs: a configuration asking for another store is a different
/// one (it used to get a guard to the running runtime, on the first store); the same URL, or
/// none, gets the running one.
#[test]
fn a_second_init_with_another_store_is_refused() {
    let (first, second) = (TestRedis::tcp(), TestRedis::tcp());
    let on = |url: Option<String>| {
        let builder = Config::builder();
        match url {
            Some(url) => builder.redis_url(url),
            None => builder,
        }
        .build()
        .expect("config")
    };
    let _rt = shoal::init_with(on(Some(first.url()))).expect("runtime");
    let again = shoal::init_with(on(Some(first.url()))).expect("the same store");
    assert_eq!(again.store_url(), _rt.store_url());
    let any = shoal::init_with(on(None)).expect("no URL: the running store");
    assert_eq!(any.store_url(), _rt.store_url());
    match shoal::init_with(on(Some(second.url()))) {
        Err(Error::InvalidState(reason)) => assert!(reason.contains("different"), "{reason}"),
        other => panic!("expected InvalidState, got {other:?}"),
    }
}

/// A runtime that fails to start (here: a Kubernetes context no kubeconfig has) leaves no
/// context behind: a primitive made afterwards says to call `init()`, instead of using the
/// failed runtime's store.
#[test]
fn a_runtime_that_failed_to_start_leaves_nothing_installed() {
    let redis = TestRedis::tcp();
    let config = Config::from_yaml_str(
        &format!(
            "shoal:\n  backend: kubernetes\nredis:\n  url: {}\nkubernetes:\n  context: \
             shoal-test-no-such-context\n  image: example.invalid/shoal:1\n  \
             redis_url_secret: {{name: shoal-redis, key: url}}\n",
            redis.url()
        ),
        "this test",
    )
    .expect("config");
    assert!(shoal::init_with(config).is_err(), "no such context");
    match Queue::<u8>::new() {
        Err(Error::InvalidState(reason)) => assert!(reason.contains("init()"), "{reason}"),
        other => panic!("expected InvalidState, got {other:?}"),
    }
}
