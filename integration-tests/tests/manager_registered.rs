//! Registered types on a Manager (Python's `BaseManager.register`): typed proxies to durable
//! actors, used from many processes without lost updates, a method returning a live proxy,
//! type-id and authkey errors, and shutdown stopping the instances.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal::AuthKey;
use shoal::prelude::*;

shoal::test_support!();

fn runtime() -> shoal::Runtime {
    shoal::init_with(Config::builder().build().expect("config")).expect("runtime")
}

#[derive(Serialize, Deserialize, Default, shoal::Actor)]
#[actor(messages(Incr, Value))]
struct Counter {
    n: u64,
}

#[derive(Serialize, Deserialize)]
struct Incr(u64);

#[derive(Serialize, Deserialize)]
struct Value;

impl Handler<Incr> for Counter {
    type Reply = u64;
    fn handle(&mut self, Incr(by): Incr, _: &mut ActorContext) -> u64 {
        self.n += by;
        self.n
    }
}

impl Handler<Value> for Counter {
    type Reply = u64;
    fn handle(&mut self, _: Value, _: &mut ActorContext) -> u64 {
        self.n
    }
}

/// A directory of counters: `Lookup` returns a proxy (Python's `method_to_typeid`).
#[derive(Serialize, Deserialize, Default, shoal::Actor)]
#[actor(messages(Add, Lookup, OpenQueue))]
struct Directory {
    entries: std::collections::BTreeMap<String, ActorRef<Counter>>,
}

#[derive(Serialize, Deserialize)]
struct Add(String, ActorRef<Counter>);

#[derive(Serialize, Deserialize)]
struct Lookup(String);

impl Handler<Add> for Directory {
    type Reply = ();
    fn handle(&mut self, Add(name, counter): Add, _: &mut ActorContext) {
        self.entries.insert(name, counter);
    }
}

/// Makes a new shared queue in the host and returns it (a method whose result is a new object
/// the caller gets as a live proxy, as Python's `method_to_typeid` wraps one).
#[derive(Serialize, Deserialize)]
struct OpenQueue;

impl Handler<OpenQueue> for Directory {
    type Reply = Queue<String>;
    fn handle(&mut self, _: OpenQueue, _: &mut ActorContext) -> Queue<String> {
        let queue = Queue::new().expect("a queue made in the host");
        queue.put("made by the host".to_string()).expect("put");
        queue
    }
}

impl Handler<Lookup> for Directory {
    type Reply = Option<ActorRef<Counter>>;
    fn handle(&mut self, Lookup(name): Lookup, _: &mut ActorContext) -> Option<ActorRef<Counter>> {
        self.entries.get(&name).cloned()
    }
}

const T: Option<Duration> = Some(Duration::from_secs(30));

#[shoal::remote]
fn bump(counter: ActorRef<Counter>, times: u64) {
    for _ in 0..times {
        counter.ask(Incr(1), T).expect("ask");
    }
}

#[test]
fn a_registered_type_is_shared_by_many_processes_without_lost_updates() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    manager.register::<Counter>("Counter").expect("register");
    manager
        .register::<Counter>("Counter")
        .expect("registering again is fine");
    let counter = manager
        .create("Counter", Counter::default())
        .expect("create");
    let workers: Vec<Process> = (0..4)
        .map(|_| Process::new(bump, (counter.clone(), 250u64)))
        .collect();
    for w in &workers {
        w.start().expect("start");
    }
    for w in &workers {
        w.join(None).expect("join");
        assert_eq!(w.exitcode(), Some(0));
    }
    assert_eq!(counter.ask(Value, T).expect("value"), 1000);
}

#[test]
fn a_method_can_return_a_live_proxy() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    manager.register::<Counter>("Counter").expect("register");
    manager
        .register::<Directory>("Directory")
        .expect("register");
    let directory = manager
        .create("Directory", Directory::default())
        .expect("create");
    let counter = manager
        .create("Counter", Counter::default())
        .expect("create");
    directory
        .ask(Add("hits".into(), counter.clone()), T)
        .expect("add");
    let found = directory
        .ask(Lookup("hits".into()), T)
        .expect("lookup")
        .expect("found");
    assert_eq!(
        found.ask(Incr(5), T).expect("through the returned proxy"),
        5
    );
    assert_eq!(counter.ask(Value, T).expect("value"), 5, "the same object");
    assert!(
        directory
            .ask(Lookup("misses".into()), T)
            .expect("lookup")
            .is_none()
    );

    // A method that makes a new object each call: each caller gets its own live proxy.
    let first = directory.ask(OpenQueue, T).expect("open");
    let second = directory.ask(OpenQueue, T).expect("open");
    let timeout = Duration::from_secs(10);
    assert_eq!(first.get_timeout(timeout).expect("get"), "made by the host");
    assert_eq!(
        second.get_timeout(timeout).expect("get"),
        "made by the host"
    );
    first.put("from the caller".into()).expect("put");
    assert!(
        second.get_timeout(Duration::from_millis(200)).is_err(),
        "two objects"
    );
    assert_eq!(first.get_timeout(timeout).expect("get"), "from the caller");
}

#[test]
fn type_ids_and_authkeys_are_checked() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    assert!(matches!(
        manager.create("Counter", Counter::default()),
        Err(Error::InvalidState(m)) if m.contains("not registered")
    ));
    manager.register::<Counter>("Thing").expect("register");
    assert!(matches!(
        manager.register::<Directory>("Thing"),
        Err(Error::InvalidState(m)) if m.contains("registered")
    ));
    assert!(matches!(
        manager.create("Thing", Directory::default()),
        Err(Error::InvalidState(m)) if m.contains("not")
    ));
    // A manager with another authkey: this process's hosts could not check its messages.
    let other =
        Manager::with_authkey(AuthKey::from_bytes(b"another key".to_vec())).expect("manager");
    other.register::<Counter>("Counter").expect("register");
    assert!(matches!(
        other.create("Counter", Counter::default()),
        Err(Error::Authentication(m)) if m.contains("set_authkey")
    ));
}

/// A new manager with `Counter` registered, and an instance of it that has counted 1.
fn manager_with_a_counter() -> (Manager, ActorRef<Counter>) {
    let manager = Manager::new().expect("manager");
    manager.register::<Counter>("Counter").expect("register");
    let counter = manager
        .create("Counter", Counter::default())
        .expect("create");
    assert_eq!(counter.ask(Incr(1), T).expect("ask"), 1);
    (manager, counter)
}

/// Whether `counter` refuses asks as a stopped actor within 10 s.
fn comes_to_a_stop(counter: &ActorRef<Counter>) -> bool {
    shoal_integration_tests::wait_for(
        Duration::from_secs(10),
        || matches!(counter.ask(Value, T), Err(Error::InvalidState(m)) if m.contains("stopped")),
    )
}

#[test]
fn shutdown_stops_the_instances() {
    let _rt = runtime();
    let (manager, counter) = manager_with_a_counter();
    manager.shutdown().expect("shutdown");
    assert!(comes_to_a_stop(&counter));
}

#[test]
fn shutdown_async_stops_the_instances_and_deletes_the_containers() {
    let _rt = runtime();
    let (manager, counter) = manager_with_a_counter();
    let d = manager.dict::<String, u64>().expect("dict");
    d.set("k", 1).expect("set");
    let connected =
        Manager::connect(manager.address(), current_process().authkey).expect("connect");
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    tokio.block_on(async {
        // Only the process that made it shuts it down, as with `shutdown`.
        assert!(matches!(
            connected.shutdown_async().await,
            Err(Error::InvalidState(m)) if m.contains("only the process that started it")
        ));
        manager.shutdown_async().await.expect("shutdown_async");
        // Again: nothing to do.
        manager
            .shutdown_async()
            .await
            .expect("a second shutdown_async");
    });
    assert!(
        matches!(d.get(&"k".to_string()), Err(Error::InvalidState(m)) if m.contains("no longer exists")),
        "the dict's keys are gone"
    );
    assert!(
        manager.dict::<String, u64>().is_err(),
        "no container can be made"
    );
    assert!(comes_to_a_stop(&counter));
}

#[test]
fn types_are_registered_and_instances_made_async() {
    let _rt = runtime();
    let manager = Manager::new().expect("manager");
    let counter = futures::executor::block_on(async {
        manager
            .register_async::<Counter>("Counter")
            .await
            .expect("register_async");
        // Again, the same type: fine; another type under the id: refused.
        manager
            .register_async::<Counter>("Counter")
            .await
            .expect("registered again");
        assert!(matches!(
            manager.register_async::<Directory>("Counter").await,
            Err(Error::InvalidState(m)) if m.contains("is registered in")
        ));
        let counter = manager
            .create_async("Counter", Counter::default())
            .await
            .expect("create_async");
        assert_eq!(counter.ask_async(Incr(3), T).await.expect("ask"), 3);
        assert!(matches!(
            manager.create_async("Nothing", Counter::default()).await,
            Err(Error::InvalidState(m)) if m.contains("not registered")
        ));
        manager.shutdown_async().await.expect("shutdown");
        assert!(matches!(
            manager.register_async::<Counter>("Other").await,
            Err(Error::InvalidState(m)) if m.contains("shut down")
        ));
        counter
    });
    // The instance made async was recorded: the shutdown stopped it.
    assert!(comes_to_a_stop(&counter));
}

/// Whether the record of the manager at `address` exists in Redis (and its TTL, for messages).
fn record_left(conn: &mut redis::Connection, address: &ManagerAddress) -> Option<i64> {
    let meta = format!("shoal:{{default:manager:{}}}:meta", address.id());
    let exists: bool = redis::cmd("EXISTS").arg(&meta).query(conn).expect("exists");
    exists.then(|| redis::cmd("TTL").arg(&meta).query(conn).expect("ttl"))
}

#[test]
fn register_and_create_racing_a_shutdown_never_make_the_record_again() {
    let rt = runtime();
    let mut conn = shoal_integration_tests::raw_redis(&rt);
    // `create` in a loop on one thread, the shutdown on another: a create whose check passed
    // before the shutdown and whose record came after it made the record again (with no TTL:
    // it never expired), and its instance, returned, was never stopped.
    for round in 0..20u64 {
        let manager = Manager::new().expect("manager");
        manager.register::<Counter>("Counter").expect("register");
        let creator = manager.clone();
        let made = std::thread::scope(|s| {
            let creating = s.spawn(move || {
                let mut made = Vec::new();
                while let Ok(counter) = creator.create("Counter", Counter::default()) {
                    made.push(counter);
                }
                made
            });
            std::thread::sleep(Duration::from_millis(round % 5));
            manager.shutdown().expect("shutdown");
            creating.join().expect("the creating thread")
        });
        assert_eq!(
            record_left(&mut conn, &manager.address()),
            None,
            "round {round}: a create after the shutdown made the record again (TTL -1: never \
             expires)"
        );
        for counter in &made {
            assert!(
                comes_to_a_stop(counter),
                "round {round}: an instance created before the shutdown runs on"
            );
        }
    }
    // Every instance made, whether its create returned it or refused it (its record came after
    // the shutdown's first step), was stopped.
    let states: Vec<String> = redis::cmd("KEYS")
        .arg("shoal:{default:actor:*}:state")
        .query(&mut conn)
        .expect("keys");
    assert!(!states.is_empty());
    for state in states {
        let id = state
            .strip_prefix("shoal:{default:actor:")
            .and_then(|rest| rest.strip_suffix("}:state"))
            .expect("an actor id");
        let counter: ActorRef<Counter> =
            serde_json::from_value(serde_json::json!({ "id": id, "authenticated": true }))
                .expect("a handle");
        assert!(comes_to_a_stop(&counter), "actor {id} runs on");
    }
    // The same with `register`: its window (between its check and its write) is one round
    // trip, so it takes more rounds to hit.
    for round in 0..300u64 {
        let manager = Manager::new().expect("manager");
        let registrar = manager.clone();
        std::thread::scope(|s| {
            let registering = s.spawn(
                move || {
                    while registrar.register::<Counter>("Counter").is_ok() {}
                },
            );
            std::thread::sleep(Duration::from_micros(round % 7 * 100));
            manager.shutdown().expect("shutdown");
            registering.join().expect("the registering thread");
        });
        assert_eq!(
            record_left(&mut conn, &manager.address()),
            None,
            "round {round}: a register after the shutdown made the record again (TTL -1: \
             never expires)"
        );
    }
}

/// The namespace of the process that connects from another namespace (see below).
const OTHER_NAMESPACE: &str = "manager-registered-other";

/// Run by [`shutdown_stops_instances_made_from_another_namespace`] as a separate program (this
/// test binary again) in [`OTHER_NAMESPACE`]: connects to the manager, makes an instance (run by
/// its own hosts), prints it, waits for a line on stdin (the manager was shut down), then checks
/// that the instance stopped. Nothing when run as a test of its own.
#[test]
fn from_another_namespace() {
    let Ok(address) = std::env::var("SHOAL_TEST_MANAGER") else {
        return;
    };
    let var = |name: &str| std::env::var(name).expect(name);
    let config = Config::builder()
        .redis_url(var("SHOAL_TEST_REDIS_URL"))
        .namespace(OTHER_NAMESPACE)
        .build()
        .expect("config");
    let _rt = shoal::init_with(config).expect("runtime");
    let authkey: Vec<u8> = serde_json::from_str(&var("SHOAL_TEST_AUTHKEY")).expect("authkey");
    shoal::set_authkey(AuthKey::from_bytes(authkey.clone()));
    let address: ManagerAddress = serde_json::from_str(&address).expect("address");
    let manager = Manager::connect(address, AuthKey::from_bytes(authkey)).expect("connect");
    let counter = manager
        .create("Counter", Counter::default())
        .expect("create");
    assert_eq!(counter.ask(Incr(1), T).expect("ask"), 1);
    println!("\nCREATED");
    std::io::Write::flush(&mut std::io::stdout()).expect("flush");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("stdin");
    let stopped = comes_to_a_stop(&counter);
    assert!(stopped, "not stopped: {:?}", counter.ask(Value, T));
}

#[test]
fn shutdown_stops_instances_made_from_another_namespace() {
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};

    let rt = runtime();
    assert_ne!(rt.config().shoal.namespace, OTHER_NAMESPACE);
    let manager = Manager::new().expect("manager");
    manager.register::<Counter>("Counter").expect("register");
    let url = rt.config().redis.url.clone().expect("url");
    let authkey = serde_json::to_string(current_process().authkey.as_bytes()).expect("json");
    let address = serde_json::to_string(&manager.address()).expect("json");
    // A process of another namespace connects and makes an instance, run by its hosts.
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "from_another_namespace", "--nocapture"])
        .args(["--test-threads", "1"])
        .env("SHOAL_TEST_REDIS_URL", url)
        .env("SHOAL_TEST_AUTHKEY", authkey)
        .env("SHOAL_TEST_MANAGER", address)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the test binary");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    while !seen.contains("CREATED") {
        let mut line = String::new();
        if stdout.read_line(&mut line).expect("read") == 0 {
            panic!("the instance was not made:\n{seen}");
        }
        seen.push_str(&line);
    }
    manager.shutdown().expect("shutdown");
    // The stop was sent where the instance runs: that process sees it stopped.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"shut down\n").expect("write");
    drop(stdin);
    let output = child.wait_with_output().expect("wait");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("read");
    assert!(
        output.status.success(),
        "the other process failed:\n{seen}{rest}"
    );
}
