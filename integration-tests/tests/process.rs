//! `Process` against a real embedded redis-server, with real subprocesses (start method
//! `process`) and threads (start method `thread`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal::prelude::*;
use shoal_integration_tests::{
    contains_bytes, every_value_in_redis, raw_redis, read_file, scratch, wait_for,
};

shoal::test_support!();

const METHODS: [StartMethod; 2] = [StartMethod::Process, StartMethod::Thread];

/// Payload limit of this binary's runtime: small, so the limit test stays cheap.
const LIMIT: usize = 1 << 20;

fn runtime() -> shoal::Runtime {
    let config = Config::builder()
        .max_message_bytes(LIMIT as u64)
        .build()
        .expect("config");
    shoal::init_with(config).expect("runtime")
}

#[shoal::remote]
fn noop() {}

#[shoal::remote]
fn panics() {
    panic!("boom from the child");
}

#[shoal::remote]
fn fails() -> Result<u32, String> {
    Err("the child returned an error".into())
}

#[shoal::remote]
fn exits(code: i32) {
    std::process::exit(code);
}

/// Sleeps `ms`, returning early when a thread child is asked to terminate.
#[shoal::remote]
fn sleeps(ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if shoal::termination_requested() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[shoal::remote]
fn sleeps_then_touch(ms: u64, path: String) {
    std::thread::sleep(Duration::from_millis(ms));
    std::fs::write(path, "done").expect("write");
}

/// Writes who the child is to `path`.
#[shoal::remote]
fn report(path: String) {
    let me = shoal::current_process();
    let text = format!(
        "name={}\nidentity={:?}\npid={}\n",
        me.name,
        me.identity,
        std::process::id()
    );
    std::fs::write(path, text).expect("write");
}

/// Starts a grandchild running `report` and waits for it.
#[shoal::remote]
fn spawns_grandchild(path: String) {
    let p = Process::new(report, (path,));
    p.start().expect("grandchild starts");
    p.join(None).expect("grandchild joins");
    assert_eq!(p.exitcode(), Some(0));
}

#[allow(clippy::too_many_arguments)]
#[shoal::remote]
fn eight(
    path: String,
    a: u8,
    b: i64,
    c: Vec<u32>,
    d: (bool, f64),
    e: Option<String>,
    f: BTreeMap<String, i32>,
    g: char,
) {
    std::fs::write(path, format!("{a} {b} {c:?} {d:?} {e:?} {f:?} {g}")).expect("write");
}

#[test]
fn a_returning_child_exits_zero() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(noop, ()).start_method(method);
        assert!(!p.is_alive());
        assert_eq!(p.exitcode(), None);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0), "{method:?}");
        assert!(!p.is_alive());
    }
}

#[test]
fn pid_is_the_subprocess_and_none_for_threads() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().join("who");
    let p = Process::new(report, (path.display().to_string(),));
    p.start().expect("start");
    let pid = p.pid().expect("a subprocess has a pid");
    assert_ne!(pid, std::process::id());
    p.join(None).expect("join");
    assert!(read_file(&path).contains(&format!("pid={pid}\n")));

    let t = Process::new(noop, ()).start_method(StartMethod::Thread);
    t.start().expect("start");
    assert_eq!(t.pid(), None);
    t.join(None).expect("join");
}

#[test]
fn a_panic_exits_one() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(panics, ()).start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(1), "{method:?}");
    }
}

#[test]
fn an_err_return_exits_one() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(fails, ()).start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(1), "{method:?}");
    }
}

/// An error type that is neither `Serialize` nor `Display` (like many library errors).
#[derive(Debug)]
struct Opaque;

#[shoal::remote]
fn fails_opaquely() -> Result<(), Opaque> {
    Err(Opaque)
}

#[shoal::remote]
fn returns_unserializable() -> Instant {
    Instant::now()
}

#[test]
fn any_error_type_fails_a_process_and_any_return_type_is_fine() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(fails_opaquely, ()).start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(1), "{method:?}");
        let p = Process::new(returns_unserializable, ()).start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0), "{method:?}");
    }
}

#[test]
fn process_exit_code_is_kept() {
    let _rt = runtime();
    for code in [3, 42, 0] {
        let p = Process::new(exits, (code,));
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(code));
    }
}

#[test]
fn terminate_and_kill_give_negative_signals() {
    let _rt = runtime();
    for (signal, code) in [("terminate", -15), ("kill", -9)] {
        let p = Process::new(sleeps, (30_000u64,));
        p.start().expect("start");
        assert!(p.is_alive());
        let started = Instant::now();
        match signal {
            "terminate" => p.terminate().expect("terminate"),
            _ => p.kill().expect("kill"),
        }
        p.join(None).expect("join");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(p.exitcode(), Some(code), "{signal}");
        assert!(!p.is_alive());
        // Stopping an exited process does nothing.
        p.terminate().expect("terminate after exit");
        assert_eq!(p.exitcode(), Some(code));
    }
}

#[test]
fn thread_terminate_is_cooperative_and_recorded() {
    let _rt = runtime();
    let dir = scratch();
    for (signal, code) in [("terminate", -15), ("kill", -9)] {
        let p = Process::new(sleeps, (30_000u64,)).start_method(StartMethod::Thread);
        p.start().expect("start");
        assert!(p.is_alive());
        match signal {
            "terminate" => p.terminate().expect("terminate"),
            _ => p.kill().expect("kill"),
        }
        p.join(Some(Duration::from_secs(5))).expect("join");
        assert_eq!(p.exitcode(), Some(code), "{signal}");
        assert!(!p.is_alive());
    }
    // A target that never looks at the flag keeps running, but its exit code is recorded.
    let path = dir.path().join("late");
    let p = Process::new(sleeps_then_touch, (300u64, path.display().to_string()))
        .start_method(StartMethod::Thread);
    p.start().expect("start");
    p.terminate().expect("terminate");
    assert_eq!(p.exitcode(), Some(-15));
    assert!(
        wait_for(Duration::from_secs(5), || path.exists()),
        "the thread ran on"
    );
}

#[test]
fn join_with_timeout_returns_while_the_child_runs() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(sleeps, (20_000u64,)).start_method(method);
        p.start().expect("start");
        let started = Instant::now();
        p.join(Some(Duration::from_millis(300))).expect("join");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300),
            "{method:?}: {waited:?}"
        );
        assert!(
            waited < Duration::from_millis(1300),
            "{method:?}: {waited:?}"
        );
        assert!(p.is_alive(), "{method:?}");
        assert_eq!(p.exitcode(), None);
        p.terminate().expect("terminate");
        p.join(None).expect("join");
    }
}

#[test]
fn killed_from_outside_is_seen_as_minus_nine() {
    let _rt = runtime();
    let p = Process::new(sleeps, (30_000u64,));
    p.start().expect("start");
    let pid = p.pid().expect("pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
    let started = Instant::now();
    p.join(Some(Duration::from_secs(10))).expect("join");
    assert!(started.elapsed() < Duration::from_secs(5), "join hung");
    assert_eq!(p.exitcode(), Some(-9));
    assert!(!p.is_alive());
}

#[test]
fn names_default_to_process_n_and_reach_the_child() {
    let _rt = runtime();
    let dir = scratch();
    let a = Process::new(noop, ());
    let b = Process::new(noop, ());
    let n = |p: &Process| -> u32 {
        p.get_name()
            .strip_prefix("Process-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{} is not Process-N", p.get_name()))
    };
    assert!(n(&b) > n(&a));
    for method in METHODS {
        let path = dir.path().join(format!("{method:?}"));
        let p = Process::new(report, (path.display().to_string(),))
            .name("greeter")
            .start_method(method);
        assert_eq!(p.get_name(), "greeter");
        p.start().expect("start");
        p.join(None).expect("join");
        assert!(read_file(&path).starts_with("name=greeter\n"), "{method:?}");
    }
    // Any string is a name, as in Python: one with a NUL (which an OS thread's name cannot
    // hold) starts a thread child, and the runtime serves the next ones.
    let odd = Process::thread(|| {}, ()).name("a\0b");
    odd.start().expect("start");
    odd.join(Some(Duration::from_secs(10))).expect("join");
    assert_eq!(odd.exitcode(), Some(0));
    assert_eq!(odd.get_name(), "a\0b");
    let next = Process::thread(|| {}, ());
    next.start().expect("start");
    next.join(Some(Duration::from_secs(10))).expect("join");
    assert_eq!(next.exitcode(), Some(0));
}

#[test]
fn a_child_can_start_its_own_child() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().join("grandchild");
    let p = Process::new(spawns_grandchild, (path.display().to_string(),));
    let parent_name = p.get_name().to_string();
    p.start().expect("start");
    p.join(None).expect("join");
    assert_eq!(p.exitcode(), Some(0));
    let text = read_file(&path);
    let name = text.lines().next().unwrap_or_default();
    assert!(
        name.starts_with(&format!("name={parent_name}:")),
        "{name} is not a child of {parent_name}"
    );
}

/// Tries to start a child and writes what happened to `path`.
#[shoal::remote]
fn try_to_start_a_child(path: String) {
    let outcome = Process::new(noop, ()).start();
    std::fs::write(path, format!("{outcome:?}")).expect("write");
}

#[test]
fn daemonic_processes_may_not_have_children() {
    let _rt = runtime();
    let dir = scratch();
    for method in METHODS {
        let path = dir.path().join(format!("daemon-{method:?}"));
        let p = Process::new(try_to_start_a_child, (path.display().to_string(),))
            .daemon(true)
            .start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        let outcome = read_file(&path);
        assert!(
            outcome.contains("InvalidState") && outcome.contains("daemonic"),
            "{outcome}"
        );

        let path = dir.path().join(format!("plain-{method:?}"));
        let p =
            Process::new(try_to_start_a_child, (path.display().to_string(),)).start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(
            read_file(&path),
            "Ok(())",
            "a non-daemonic child may start children"
        );
    }
}

#[test]
fn arguments_of_every_arity_round_trip() {
    let _rt = runtime();
    let dir = scratch();
    for method in METHODS {
        let path = dir.path().join(format!("eight-{method:?}"));
        let map = BTreeMap::from([("k".to_string(), -1)]);
        let p = Process::new(
            eight,
            (
                path.display().to_string(),
                7u8,
                -9_000_000_000i64,
                vec![1u32, 2, 3],
                (true, 2.5f64),
                Some("opt".to_string()),
                map,
                'λ',
            ),
        )
        .start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
        assert_eq!(
            read_file(&path),
            "7 -9000000000 [1, 2, 3] (true, 2.5) Some(\"opt\") {\"k\": -1} λ"
        );
    }
}

#[test]
fn invalid_states_are_errors() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(noop, ()).start_method(method);
        assert!(matches!(p.join(None), Err(Error::InvalidState(_))));
        assert!(matches!(p.terminate(), Err(Error::InvalidState(_))));
        assert!(matches!(p.kill(), Err(Error::InvalidState(_))));
        p.start().expect("start");
        assert!(matches!(p.start(), Err(Error::InvalidState(_))));
        p.join(None).expect("join");
        assert!(matches!(p.start(), Err(Error::InvalidState(_))));
    }
}

fn not_registered(x: u32) -> u32 {
    x + 1
}

// A function without `#[shoal::remote]`, or a closure, given to `Process::new` is a compile
// error (the `compile_fail` examples in the `shoal` crate's docs check it).
#[test]
fn process_thread_runs_any_function_or_closure_and_only_on_a_thread() {
    let _rt = runtime();
    let offset = 5u32;
    let seen = Arc::new(AtomicU32::new(0));
    let into = seen.clone();
    let closure = Process::thread(
        move |x: u32| into.fetch_add(x + offset, Ordering::SeqCst),
        (1u32,),
    );
    closure.start().expect("thread start");
    closure.join(None).expect("join");
    assert_eq!(closure.exitcode(), Some(0));
    assert_eq!(seen.load(Ordering::SeqCst), 6);

    let plain = Process::thread(not_registered, (1u32,));
    plain.start().expect("thread start");
    plain.join(None).expect("join");
    assert_eq!(plain.exitcode(), Some(0));

    let panicking = Process::thread(|| panic!("on purpose"), ());
    panicking.start().expect("thread start");
    panicking.join(None).expect("join");
    assert_eq!(panicking.exitcode(), Some(1));

    // Asked to run in a subprocess, it refuses at start and stays startable.
    let moved = Process::thread(not_registered, (1u32,)).start_method(StartMethod::Process);
    match moved.start() {
        Err(Error::InvalidState(message)) => {
            assert!(message.contains("Process::thread"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!moved.is_alive());
    assert!(matches!(moved.start(), Err(Error::InvalidState(_))));
}

#[shoal::remote]
fn takes_bytes(data: Vec<u8>) -> usize {
    data.len()
}

#[test]
fn arguments_over_the_message_limit_are_refused_at_start() {
    let _rt = runtime();
    let limit = LIMIT;
    let p = Process::new(takes_bytes, (vec![0u8; limit + 1],));
    match p.start() {
        Err(Error::TooLarge {
            size,
            limit: l,
            key,
        }) => {
            assert!(size > limit);
            assert_eq!(l, limit);
            assert!(key.ends_with(":task"), "{key}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!p.is_alive());
}

#[test]
fn many_children_at_once() {
    let _rt = runtime();
    let children: Vec<Process> = (0..8).map(|_| Process::new(sleeps, (200u64,))).collect();
    for p in &children {
        p.start().expect("start");
    }
    for p in &children {
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
    }
}

#[test]
fn children_that_end_at_once_are_seen_started_and_ended() {
    // A thread child can end before its start is acknowledged: the start must still succeed.
    let _rt = runtime();
    for method in METHODS {
        let n = if method == StartMethod::Thread {
            300
        } else {
            20
        };
        for _ in 0..n {
            let p = Process::new(noop, ()).start_method(method);
            p.start().expect("start");
            p.join(None).expect("join");
            assert_eq!(p.exitcode(), Some(0));
        }
    }
}

#[test]
fn a_worker_with_no_task_fails_clearly() {
    let rt = runtime();
    let url = rt.config().redis.url.clone().expect("url");
    let output = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["shoal_worker_entry", "--exact", "--nocapture", "-q"])
        .env("SHOAL_WORKER_TASK", "default/no-such-task")
        .env("SHOAL_WORKER_REDIS", url)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no task record"), "{stderr}");
}

/// Writes what `current_process()` and `parent_process()` say, one `key=value` per line.
#[shoal::remote]
fn describe_self(path: String) {
    let me = shoal::current_process();
    let parent = shoal::parent_process();
    let text = format!(
        "name={}\npid={}\nreal_pid={}\ndaemon={}\nalive={}\nexitcode={:?}\nauthkey={:?}\n\
         parent_name={}\nparent_pid={:?}\nparent_alive={}\n",
        me.name,
        me.pid(),
        std::process::id(),
        me.daemon,
        me.is_alive(),
        me.exitcode(),
        me.authkey.as_bytes(),
        parent.as_ref().map(|p| p.name.as_str()).unwrap_or("-"),
        parent.as_ref().and_then(|p| p.pid),
        parent.as_ref().is_some_and(|p| p.is_alive()),
    );
    std::fs::write(path, text).expect("write");
}

fn fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn current_process_and_parent_process_describe_the_child() {
    let _rt = runtime();
    let me = shoal::current_process();
    assert_eq!(me.name, "MainProcess");
    assert_eq!(me.pid(), std::process::id());
    assert!(shoal::parent_process().is_none());
    assert_eq!(me.authkey.as_bytes().len(), 32);
    let dir = scratch();
    for method in METHODS {
        let path = dir.path().join(format!("{method:?}"));
        let p = Process::new(describe_self, (path.display().to_string(),))
            .name("describer")
            .daemon(true)
            .start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0), "{method:?}");
        let f = fields(&read_file(&path));
        assert_eq!(f["name"], "describer");
        assert_eq!(f["pid"], f["real_pid"]);
        if method == StartMethod::Process {
            assert_eq!(f["pid"], p.pid().expect("pid").to_string());
        }
        assert_eq!(f["daemon"], "true");
        assert_eq!(
            (f["alive"].as_str(), f["exitcode"].as_str()),
            ("true", "None")
        );
        assert_eq!(
            f["authkey"],
            format!("{:?}", me.authkey.as_bytes()),
            "{method:?}: the child inherits the parent's authkey"
        );
        assert_eq!(f["parent_name"], "MainProcess");
        assert_eq!(f["parent_pid"], format!("Some({})", std::process::id()));
        assert_eq!(f["parent_alive"], "true");
    }
}

#[test]
fn the_daemon_flag_cannot_change_after_start() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(sleeps, (200u64,)).start_method(method);
        p.set_daemon(true).expect("before start");
        assert!(p.is_daemon());
        p.start().expect("start");
        assert!(
            matches!(p.set_daemon(false), Err(Error::InvalidState(m)) if m.contains("already started"))
        );
        let p = p.daemon(false);
        assert!(
            p.is_daemon(),
            "{method:?}: the builder does not change a started process"
        );
        p.join(None).expect("join");
    }
}

#[test]
fn active_children_lists_the_children_that_run() {
    let _rt = runtime();
    assert!(shoal::active_children().is_empty());
    let short = Process::new(noop, ()).name("short");
    let long = Process::new(sleeps, (30_000u64,)).name("long");
    short.start().expect("start");
    long.start().expect("start");
    short.join(None).expect("join");
    let children = shoal::active_children();
    let names: Vec<&str> = children.iter().map(|c| c.name()).collect();
    assert_eq!(names, ["long"]);
    assert_eq!(children[0].pid(), long.pid());
    assert!(children[0].is_alive());
    children[0]
        .terminate()
        .expect("terminate through the listing");
    long.join(Some(Duration::from_secs(10))).expect("join");
    assert_eq!(long.exitcode(), Some(-15));
    assert!(shoal::active_children().is_empty());
}

#[test]
fn close_releases_an_exited_process_and_refuses_a_running_one() {
    let _rt = runtime();
    for method in METHODS {
        let p = Process::new(sleeps, (300u64,)).start_method(method);
        p.start().expect("start");
        assert!(
            matches!(p.close(), Err(Error::InvalidState(m)) if m.contains("still running")),
            "{method:?}"
        );
        p.join(None).expect("join");
        assert!(!p.is_closed());
        p.close().expect("close after exit");
        // Python's test_close closes twice: the second close does nothing.
        p.close().expect("a second close is a no-op");
        assert!(p.is_closed(), "{method:?}");
        // Python raises ValueError here; shoal's plain getters answer "not known" (documented).
        assert!(!p.is_alive());
        assert_eq!(p.exitcode(), None);
        assert_eq!(p.pid(), None);
        for outcome in [p.start(), p.join(None), p.terminate(), p.kill()] {
            assert!(
                matches!(&outcome, Err(Error::InvalidState(m)) if m.contains("is closed")),
                "{method:?}: {outcome:?}"
            );
        }
        let joined = futures::executor::block_on(p.join_async());
        assert!(
            matches!(&joined, Err(Error::InvalidState(m)) if m.contains("is closed")),
            "{method:?}: {joined:?}"
        );
        // Metadata stays usable, as in Python (name and the daemon setter do not check).
        p.set_daemon(true)
            .expect("the daemon flag of a closed process");
        assert!(p.is_daemon());
        assert!(!p.get_name().is_empty());
    }
    // A process that never started can be closed, twice.
    let never = Process::new(noop, ());
    never.close().expect("close");
    never.close().expect("close again");
    assert!(never.is_closed());
    assert!(matches!(never.start(), Err(Error::InvalidState(m)) if m.contains("is closed")));
}

/// Reports this process's authkey on `out`, then waits for `go`.
#[shoal::remote]
fn report_authkey(out: SimpleQueue<Vec<u8>>, go: Event) {
    out.put(current_process().authkey.as_bytes().to_vec())
        .expect("report");
    go.wait(Some(Duration::from_secs(30))).expect("wait");
}

#[shoal::remote]
fn authkey_of_worker(_: u32) -> Vec<u8> {
    current_process().authkey.as_bytes().to_vec()
}

#[test]
fn children_inherit_the_authkey_without_it_going_through_redis() {
    let rt = runtime();
    let key = current_process().authkey.as_bytes().to_vec();
    let out: SimpleQueue<Vec<u8>> = SimpleQueue::new().expect("queue");
    let go = Event::new().expect("event");
    let child =
        Process::new(report_authkey, (out.clone(), go.clone())).start_method(StartMethod::Process);
    child.start().expect("start");
    assert_eq!(
        out.get_timeout(Duration::from_secs(30))
            .expect("the child's key"),
        key
    );
    let pool = Pool::new(1).expect("pool");
    assert_eq!(pool.apply(authkey_of_worker, (0,)).expect("apply"), key);
    // The child, the pool worker and their task records are all there now: none holds the key.
    let values = every_value_in_redis(&mut raw_redis(&rt));
    assert!(!values.is_empty());
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let holding: Vec<&Vec<u8>> = values
        .iter()
        .filter(|v| contains_bytes(v, &key) || contains_bytes(v, hex.as_bytes()))
        .collect();
    assert!(
        holding.is_empty(),
        "the authkey is in Redis: {} values",
        holding.len()
    );
    go.set().expect("go");
    child.join(None).expect("join");
    assert_eq!(child.exitcode(), Some(0));
    pool.close().expect("close");
    pool.join().expect("join");
}

/// Calls `shoal::init()` and `shoal::init_with()` as a library the task uses might, then uses
/// a queue.
#[shoal::remote]
fn inits_again_then_puts(q: Queue<u32>) -> Result<(), String> {
    inits_again_then_starts_a_thread()?;
    q.put(7).map_err(|e| e.to_string())?;
    q.close().map_err(|e| e.to_string())?;
    q.join_thread().map_err(|e| e.to_string())
}

/// Calls `init()`, `init_with()` with another configuration, and `shutdown_within` on a handle,
/// as a library a child's code uses might; then starts and joins a thread child.
fn inits_again_then_starts_a_thread() -> Result<(), String> {
    let _rt = shoal::init().map_err(|e| e.to_string())?;
    let _again = shoal::init_with(Config::default()).map_err(|e| e.to_string())?;
    // A library that shuts down the runtime it was handed only lets go of its handle.
    shoal::init()
        .map_err(|e| e.to_string())?
        .shutdown_within(Duration::from_millis(100));
    // ... so the child can still start processes.
    let helper = Process::thread(|| {}, ());
    helper.start().map_err(|e| e.to_string())?;
    helper
        .join(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// In a child, `init()` is the child's own runtime: it used to start the worker again, which
/// found its task claimed and exited with 1 before the function returned.
#[test]
fn a_child_that_calls_init_again_runs_on() {
    let _rt = runtime();
    let q: Queue<u32> = Queue::new().expect("queue");
    let p = Process::new(inits_again_then_puts, (q.clone(),));
    p.start().expect("start");
    p.join(Some(Duration::from_secs(30))).expect("join");
    assert_eq!(p.exitcode(), Some(0));
    assert_eq!(q.get_timeout(Duration::from_secs(5)).expect("the put"), 7);
}

/// In a thread child too, `init()` is the runtime that started it, whatever the configuration
/// says (this test's runtime has a non-default one); it used to load the configuration again
/// and refuse it, and the handle's `shutdown_within` drained the whole runtime.
#[test]
fn a_thread_child_that_calls_init_runs_on_its_parents_runtime() {
    let _rt = runtime();
    let q: Queue<u32> = Queue::new().expect("queue");
    let child_q = q.clone();
    let p = Process::thread(
        move || -> Result<(), String> {
            inits_again_then_starts_a_thread()?;
            child_q.put(7).map_err(|e| e.to_string())
        },
        (),
    );
    p.start().expect("start");
    p.join(Some(Duration::from_secs(30))).expect("join");
    assert_eq!(p.exitcode(), Some(0));
    assert_eq!(q.get_timeout(Duration::from_secs(5)).expect("the put"), 7);
    // The runtime still serves this process.
    let after = Process::new(noop, ());
    after
        .start()
        .expect("a process started after the child's shutdown_within");
    after.join(Some(Duration::from_secs(30))).expect("join");
    assert_eq!(after.exitcode(), Some(0));
}

/// A thread child numbers its own children from 1, as each Python child restarts the process
/// counter: the first child of `Process-N` is `Process-N:1`, however many processes the main
/// process made.
#[test]
fn a_thread_childs_first_child_is_its_number_then_1() {
    let _rt = runtime();
    let _earlier: Vec<Process> = (0..3).map(|_| Process::new(noop, ())).collect();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let names = seen.clone();
    let parent = Process::thread(
        move || {
            let first = Process::new(noop, ());
            let second = Process::new(noop, ());
            names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend([first.get_name().to_string(), second.get_name().to_string()]);
        },
        (),
    );
    let parent_name = parent.get_name().to_string();
    parent.start().expect("start");
    parent.join(Some(Duration::from_secs(10))).expect("join");
    assert_eq!(
        *seen.lock().unwrap_or_else(|p| p.into_inner()),
        vec![format!("{parent_name}:1"), format!("{parent_name}:2")]
    );
}

/// A remote function defined in a function body takes its module's path: these two both
/// register as `process::twin`.
fn first_twin() -> shoal::Remote<fn() -> u32> {
    #[shoal::remote]
    fn twin() -> u32 {
        1
    }
    twin
}

fn second_twin() -> shoal::Remote<fn() -> u32> {
    #[shoal::remote]
    fn twin() -> u32 {
        2
    }
    twin
}

/// Two remote functions of one path are refused by name, as a process and as a pool call; a
/// worker used to run whichever of them the registry kept.
#[test]
fn two_remote_functions_of_one_path_are_refused_not_mixed_up() {
    let _rt = runtime();
    for twin in [first_twin(), second_twin()] {
        match Process::new(twin, ()).start() {
            Err(Error::AmbiguousFunction { function, count }) => {
                assert!(function.ends_with("::twin"), "{function}");
                assert_eq!(count, 2);
            }
            other => panic!("expected AmbiguousFunction, got {other:?}"),
        }
    }
    let pool = Pool::new(1).expect("pool");
    assert!(matches!(
        pool.apply(second_twin(), ()),
        Err(Error::AmbiguousFunction { .. })
    ));
    assert!(matches!(
        Barrier::with_action(2, first_twin(), ()),
        Err(Error::AmbiguousFunction { .. })
    ));
    // On a thread, the function itself runs: no name is looked up.
    let p = Process::new(first_twin(), ()).start_method(StartMethod::Thread);
    p.start().expect("start on a thread");
    p.join(Some(Duration::from_secs(10))).expect("join");
    assert_eq!(p.exitcode(), Some(0));
}

/// A thread child that holds the last handle to the runtime (its own `init()`'s, kept after
/// the main process let go of its handles) drops it without shutting the runtime down on its
/// own thread: that shutdown joins the thread child itself, and used to wait for ever.
#[test]
fn a_thread_child_that_drops_the_last_runtime_handle_ends() {
    let rt = runtime();
    let (dropped, handle_gone) = std::sync::mpsc::channel();
    let (started, child_has_handle) = std::sync::mpsc::channel();
    let p = Process::thread(
        move || -> Result<(), String> {
            let own = shoal::init().map_err(|e| e.to_string())?;
            let _ = started.send(());
            // The main process drops its handles meanwhile: this one is the last.
            std::thread::sleep(Duration::from_millis(300));
            drop(own);
            let _ = dropped.send(());
            Ok(())
        },
        (),
    );
    p.start().expect("start");
    child_has_handle
        .recv_timeout(Duration::from_secs(10))
        .expect("the child took its handle");
    drop(p);
    drop(rt);
    handle_gone
        .recv_timeout(Duration::from_secs(20))
        .expect("the child's drop of the last handle returned");
}

#[shoal::remote]
fn doubles(x: u64) -> u64 {
    2 * x
}

/// Runs a thread child that makes what `hold` returns (something that keeps the runtime alive),
/// waits there until the main thread let go of its runtime handle and of the child's `Process`,
/// then drops it: the last reference to the runtime, dropped on the thread child's own thread.
/// That drop must return and the runtime must then shut down (its embedded store stops): run on
/// that thread, the shutdown joins the thread child itself and used to wait for ever. Bounded by
/// timeouts, so that such a wait fails the test instead of hanging it.
fn drop_the_last_reference_in_a_thread_child<T, F>(hold: F)
where
    F: FnOnce() -> Result<T, String> + Send + 'static,
    T: 'static,
{
    let rt = runtime();
    let redis_pid = rt.embedded_redis_pid().expect("the embedded store");
    let (holding, child_holds) = std::sync::mpsc::channel();
    let (let_go, main_let_go) = std::sync::mpsc::channel::<()>();
    let (dropped, holder_gone) = std::sync::mpsc::channel();
    let p = Process::thread(
        move || -> Result<(), String> {
            let held = hold()?;
            let _ = holding.send(());
            // The main thread drops its handles meanwhile: `held` is the last reference.
            main_let_go
                .recv_timeout(Duration::from_secs(30))
                .map_err(|e| format!("the main thread's handles: {e}"))?;
            drop(held);
            let _ = dropped.send(());
            Ok(())
        },
        (),
    );
    p.start().expect("start");
    child_holds
        .recv_timeout(Duration::from_secs(30))
        .expect("the child made what it holds");
    drop(p);
    drop(rt);
    let_go.send(()).expect("the child waits");
    holder_gone
        .recv_timeout(Duration::from_secs(30))
        .expect("the child's drop of the last reference returned");
    // The shutdown ran elsewhere, once the thread child ended: the store is stopped and reaped.
    let pid = Pid::from_raw(redis_pid as i32);
    assert!(
        wait_for(Duration::from_secs(30), || kill(pid, None).is_err()),
        "the runtime did not shut down"
    );
}

/// A thread child's own `Pool`, the last reference to the runtime, dropped there.
#[test]
fn a_thread_child_whose_pool_is_the_last_runtime_reference_ends() {
    drop_the_last_reference_in_a_thread_child(|| {
        let pool = Pool::new(1).map_err(|e| e.to_string())?;
        let doubled = pool.apply(doubles, (21u64,)).map_err(|e| e.to_string())?;
        if doubled != 42 {
            return Err(format!("the pool doubled 21 into {doubled}"));
        }
        Ok(pool)
    });
}

/// A thread child's own started `Process`, the last reference to the runtime, dropped there.
#[test]
fn a_thread_child_whose_process_is_the_last_runtime_reference_ends() {
    drop_the_last_reference_in_a_thread_child(|| {
        let child = Process::new(noop, ()).start_method(StartMethod::Process);
        child.start().map_err(|e| e.to_string())?;
        child
            .join(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        match child.exitcode() {
            Some(0) => Ok(child),
            code => Err(format!("the grandchild exited with {code:?}")),
        }
    });
}

/// A return value whose drop panics: the panic escapes the target's call.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("dropping the thread child's return value panics");
    }
}

/// An argument whose encoding panics: on a thread, the arguments are encoded before the call.
#[derive(serde::Deserialize)]
struct PanicsOnSerialize;

impl serde::Serialize for PanicsOnSerialize {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("encoding the thread child's argument panics");
    }
}

#[shoal::remote]
fn takes_panics_on_serialize(_: PanicsOnSerialize) {}

/// A panic that escapes a thread child's body (outside the call's own panic catching) ends it
/// with exit code 1; it used to leave it running for ever, and `join(None)` and the runtime's
/// shutdown with it. Daemons, so that the old code's thread children, never seen to end, are
/// terminated at the test's end instead of hanging it.
#[test]
fn a_panic_outside_a_thread_childs_call_ends_it_with_one() {
    let _rt = runtime();
    let on_drop = Process::thread(|| PanicsOnDrop, ()).daemon(true);
    let on_encode = Process::new(takes_panics_on_serialize, (PanicsOnSerialize,))
        .start_method(StartMethod::Thread)
        .daemon(true);
    for (what, p) in [("return value", on_drop), ("argument", on_encode)] {
        p.start().expect("start");
        p.join(Some(Duration::from_secs(10))).expect("join");
        assert!(!p.is_alive(), "{what}: the thread child is not seen to end");
        assert_eq!(p.exitcode(), Some(1), "{what}");
    }
}

/// Writes the environment of a program it runs (`env`) to `path`.
#[shoal::remote]
fn runs_env(path: String) {
    let out = std::process::Command::new("env")
        .output()
        .expect("env runs");
    std::fs::write(path, out.stdout).expect("write");
}

/// The variables a worker is started with (its task's address, the authkey) are not inherited
/// by the programs it runs: a shoal program there would take itself for the worker, and the
/// authkey would reach every program.
#[test]
fn programs_a_child_runs_do_not_inherit_the_worker_variables() {
    let _rt = runtime();
    let dir = scratch();
    let path = dir.path().join("env");
    let p = Process::new(runs_env, (path.display().to_string(),));
    p.start().expect("start");
    p.join(Some(Duration::from_secs(30))).expect("join");
    assert_eq!(p.exitcode(), Some(0));
    let env = read_file(&path);
    assert!(env.contains("PATH="), "{env}");
    let leaked: Vec<&str> = env
        .lines()
        .filter(|l| l.starts_with("SHOAL_WORKER_"))
        .map(|l| l.split_once('=').map_or(l, |(name, _)| name))
        .collect();
    assert!(leaked.is_empty(), "inherited: {leaked:?}");
}

/// `active_children()` in a thread child lists the children it started, not itself, its
/// siblings or its parent's other children (Python: direct children only); the main process's
/// list does not show its grandchildren. Joining what it lists used to wait for the thread
/// child itself.
#[test]
fn active_children_of_a_thread_child_are_its_own() {
    let _rt = runtime();
    // A daemon: terminated at the runtime's shutdown should the test fail before it does.
    let sibling = Process::new(sleeps, (60_000u64,))
        .name("sibling")
        .start_method(StartMethod::Thread)
        .daemon(true);
    sibling.start().expect("start");
    let (tell, told) = std::sync::mpsc::channel();
    let (listed, main_listed) = std::sync::mpsc::channel::<()>();
    let outer = Process::thread(
        move || -> Result<(), String> {
            let grandchild = Process::new(sleeps, (500u64,))
                .name("grandchild")
                .start_method(StartMethod::Thread);
            grandchild.start().map_err(|e| e.to_string())?;
            let children = shoal::active_children();
            let names: Vec<String> = children.iter().map(|c| c.name().to_string()).collect();
            let _ = tell.send(names);
            // The main thread lists its own while the grandchild runs.
            let _ = main_listed.recv_timeout(Duration::from_secs(10));
            for child in &children {
                child.join(Some(Duration::from_secs(5)));
            }
            Ok(())
        },
        (),
    )
    .name("outer");
    outer.start().expect("start");
    let names = told
        .recv_timeout(Duration::from_secs(10))
        .expect("the thread child listed its children");
    let in_main: Vec<String> = shoal::active_children()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let _ = listed.send(());
    let started = Instant::now();
    outer.join(Some(Duration::from_secs(30))).expect("join");
    let waited = started.elapsed();
    assert_eq!(names, ["grandchild"]);
    assert_eq!(in_main, ["sibling", "outer"]);
    assert!(!outer.is_alive());
    assert_eq!(outer.exitcode(), Some(0));
    assert!(waited < Duration::from_secs(5), "joining took {waited:?}");
    sibling.terminate().expect("terminate");
    sibling.join(Some(Duration::from_secs(10))).expect("join");
}
