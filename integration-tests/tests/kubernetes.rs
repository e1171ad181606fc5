//! The Kubernetes backend end to end (`shoal.backend: kubernetes`, crate feature `kubernetes`):
//! real runtimes, through the real Kubernetes executor, against the test-only API emulator
//! (`shoal_integration_tests::kube_emulator`) whose kubelet runs every pod in a PID namespace of
//! its own (shared by the pod: the worker is PID 2, as the executor's Jobs ask), in a network
//! namespace host of its own (`netns`), reaching Redis over TCP on
//! the bridge: nothing can depend on a shared Unix socket, a parent pid or a terminal. Pods run
//! this very test binary (`kubernetes.command`), as its `shoal_worker_entry` test.
//!
//! A runtime finds its cluster through `KUBECONFIG`, which a test cannot set in its own process
//! (the environment is process-wide). So each test runs twice: the test started by the harness
//! (the *outer* one) starts this binary again as that one test (the *driver*), with
//! `KUBECONFIG` set and [`ROLE`] = `driver`; the driver starts the network, Redis and the
//! emulator, writes the emulator's kubeconfig where `KUBECONFIG` says, and runs the scenario;
//! the outer test checks that it succeeded and reads its stdout and stderr, where the workers'
//! output arrives and the executor's log goes.
//!
//! Against a real cluster: the tests whose names start with `cluster_` are ignored unless asked
//! for; `make test-kubernetes` runs them when `KUBECONFIG`, `SHOAL_TEST_IMAGE` and
//! `SHOAL_TEST_REDIS_URL` are set (see the Makefile and the README's "Run on Kubernetes").

#![cfg(feature = "kubernetes")]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use shoal::config::{Backend, SecretKeyRef};
use shoal::prelude::*;
use shoal_integration_tests::kube_emulator::{
    DEFAULT_NAMESPACE, Emulator, PULL_FAILURES, START_DELAY_MS,
};
use shoal_integration_tests::netns::Network;
use shoal_integration_tests::{TestRedis, contains_bytes, every_value_in_redis, pid_running};

shoal::test_support!();

/// Environment variable telling a test that it is the driver half (see the module docs). Not
/// `SHOAL_*`: `shoal::init()` refuses unknown `SHOAL_` variables.
const ROLE: &str = "KUBERNETES_TEST_ROLE";
/// What a driver prints when its scenario ran to the end.
const DRIVER_DONE: &str = "kubernetes-test-driver: scenario done";
/// Environment variable telling a driver which cluster it drives (`emulator`, `cluster`).
const TARGET: &str = "KUBERNETES_TEST_TARGET";

/// How long any single wait may take before it counts as a hang: a minute on the emulator,
/// five on a real cluster (image pulls, scheduling).
fn patience() -> Duration {
    match std::env::var(TARGET).as_deref() {
        Ok("cluster") => Duration::from_secs(300),
        _ => Duration::from_secs(60),
    }
}

/// How long a driver may run before the outer test kills it.
fn driver_deadline(target: Target) -> Duration {
    match target {
        Target::Emulator => Duration::from_secs(110),
        Target::Cluster => Duration::from_secs(1200),
    }
}
/// Where the image built for the real-cluster tests holds this test binary.
const IMAGE_COMMAND: &str = "/usr/local/bin/shoal-kubernetes-tests";
/// Where that image holds another shoal program, without the tests' functions: the integration
/// tests' `scenario` binary.
const IMAGE_OTHER_COMMAND: &str = "/usr/local/bin/scenario";

// ---------------------------------------------------------------------------------------------
// Functions the workers run.

#[shoal::remote]
fn noop() {}

#[shoal::remote]
fn panics() {
    panic!("boom from a pod");
}

#[shoal::remote]
fn exits(code: i32) {
    std::process::exit(code);
}

#[shoal::remote]
fn sleeps(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Prints on both streams, naming the pod it runs in.
#[shoal::remote]
fn greet(name: String) {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    println!("hello {name} from {host}");
    eprintln!("greeting {name} on stderr");
}

/// Prints the worker's view of itself: its pid, parent pid and environment variable.
#[shoal::remote]
fn describe(variable: String) {
    println!(
        "pid={} ppid={} {variable}={}",
        std::process::id(),
        nix::unistd::getppid(),
        std::env::var(&variable).unwrap_or_else(|_| "<unset>".into())
    );
}

#[shoal::remote]
fn square(x: u64) -> u64 {
    x * x
}

/// Prints a line naming `x`, returns `x`.
#[shoal::remote]
fn loud(x: u64) -> u64 {
    println!("pool task {x} speaking");
    x
}

#[shoal::remote]
fn slow_square(x: u64, ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    x * x
}

/// Records `<x> <ms since epoch> <pod>` on the Redis list `list` (best effort, with short
/// timeouts: a partitioned worker must not hang here), then works `ms` and returns `x²`.
#[shoal::remote]
fn recorded_square(url: String, list: String, x: u64, ms: u64) -> u64 {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let entry = format!("{x} {} {host}", now_ms());
    let timeout = Duration::from_secs(1);
    if let Ok(client) = redis::Client::open(url)
        && let Ok(mut conn) = client.get_connection_with_timeout(timeout)
    {
        let _ = conn.set_read_timeout(Some(timeout));
        let _ = conn.set_write_timeout(Some(timeout));
        let _: redis::RedisResult<()> = redis::cmd("RPUSH").arg(&list).arg(entry).query(&mut conn);
    }
    std::thread::sleep(Duration::from_millis(ms));
    x * x
}

/// Pushes `entry` on the Redis list `list` (best effort, with short timeouts).
fn record(url: &str, list: &str, entry: &str) {
    let timeout = Duration::from_secs(1);
    if let Ok(client) = redis::Client::open(url)
        && let Ok(mut conn) = client.get_connection_with_timeout(timeout)
    {
        let _ = conn.set_read_timeout(Some(timeout));
        let _ = conn.set_write_timeout(Some(timeout));
        let _: redis::RedisResult<()> = redis::cmd("RPUSH").arg(list).arg(entry).query(&mut conn);
    }
}

/// Handles `SIGTERM` (so the worker lives on through its pod's grace period, as a program with
/// clean-up to do would), records `started` on `list`, works `ms`, then records `still
/// running`: a side effect that must not happen once `kill()` has said the process ended.
#[shoal::remote]
fn outlives_sigterm(url: String, list: String, ms: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the signal handler");
    let _handler = {
        let _inside = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler")
    };
    record(&url, &list, "started");
    std::thread::sleep(Duration::from_millis(ms));
    record(&url, &list, "still running");
}

/// Kills its own worker with `SIGKILL`, as `examples/fault_tolerant_map.rs` does; returns only
/// if the signal did nothing (a worker that is PID 1 of its container).
#[shoal::remote]
fn kills_itself() {
    let _ = nix::sys::signal::raise(Signal::SIGKILL);
    println!("kills_itself: SIGKILL did nothing");
}

/// Starts a `Process` of its own from inside its pod (a non-daemonic child may, as in Python),
/// which records `nested <its pod>` on `list` and sleeps `ms`; then waits for it.
#[shoal::remote]
fn starts_a_sleeper(url: String, list: String, ms: u64) {
    let nested = Process::new(records_and_sleeps, (url, list, ms));
    nested.start().expect("start the nested process");
    nested.join(None).expect("join the nested process");
}

/// Records `nested <pod>` on `list`, then sleeps `ms`.
#[shoal::remote]
fn records_and_sleeps(url: String, list: String, ms: u64) {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    record(&url, &list, &format!("nested {host}"));
    std::thread::sleep(Duration::from_millis(ms));
}

/// The inputs whose first runs kill their worker in [`square_or_die`].
const VICTIMS: [u64; 2] = [7, 23];

/// `x²`; a victim input, while `kills` (incremented on each victim run) is below the number of
/// victims, first kills its own worker with `SIGKILL` (as `examples/fault_tolerant_map.rs`
/// does). A kill that did nothing returns `u64::MAX`, a wrong result.
#[shoal::remote]
fn square_or_die(x: u64, kills: shoal::Value<i64>) -> u64 {
    if VICTIMS.contains(&x) && kills.fetch_add(1).expect("count the kill") < VICTIMS.len() as i64 {
        let _ = nix::sys::signal::raise(Signal::SIGKILL);
        return u64::MAX;
    }
    x * x
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The harness: an outer test, a driver with KUBECONFIG, and the cluster it drives.

/// Which cluster a driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The emulator, with pods in network namespace hosts.
    Emulator,
    /// The cluster of `KUBECONFIG`, with `SHOAL_TEST_IMAGE` and `SHOAL_TEST_REDIS_URL`.
    Cluster,
}

/// What the outer test sees of its driver.
struct Driven {
    stdout: String,
    stderr: String,
}

impl Driven {
    /// Asserts that the driver's log has each of `lines`: `what` says what they tell.
    fn assert_logged(&self, lines: &[&str], what: &str) {
        for line in lines {
            assert!(self.stderr.contains(line), "{what} ({line})");
        }
    }
}

/// Runs `scenario` in a driver process (see the module docs). Returns the driver's output in the
/// outer test, `None` in the driver itself (which must then return).
fn drive(test: &str, target: Target, scenario: impl FnOnce(&Kube)) -> Option<Driven> {
    if std::env::var(ROLE).as_deref() == Ok("driver") {
        let kube = Kube::start(target);
        scenario(&kube);
        drop(kube);
        println!("{DRIVER_DONE}");
        return None;
    }
    let dir = tempfile::tempdir().expect("a directory for the kubeconfig");
    let kubeconfig = match target {
        Target::Emulator => dir.path().join("kubeconfig"),
        Target::Cluster => cluster_settings().kubeconfig,
    };
    let program = std::env::current_exe().expect("this test binary");
    let mut child = Command::new(program)
        .args([
            test,
            "--exact",
            "--nocapture",
            "--test-threads=1",
            // The real-cluster tests are ignored unless asked for; their drivers are asked for.
            "--include-ignored",
        ])
        .env(ROLE, "driver")
        .env(
            TARGET,
            match target {
                Target::Emulator => "emulator",
                Target::Cluster => "cluster",
            },
        )
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the driver starts");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + driver_deadline(target);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the driver's status") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let driven = Driven {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    println!("--- driver stdout ---\n{}", driven.stdout);
    println!("--- driver stderr ---\n{}", driven.stderr);
    let status = status.unwrap_or_else(|| panic!("the driver of {test} ran too long: killed"));
    assert!(
        status.success() && driven.stdout.contains(DRIVER_DONE),
        "the driver of {test} failed ({status}); its output is above"
    );
    Some(driven)
}

/// What the real-cluster tests are given.
struct ClusterSettings {
    kubeconfig: PathBuf,
    image: String,
    /// The driver's Redis URL.
    redis_url: String,
    /// The workers' Redis URL, when it differs (`SHOAL_TEST_WORKER_REDIS_URL`: then the tests
    /// hand it to the workers through a Secret, as `kubernetes.redis_url_secret` does).
    worker_redis_url: Option<String>,
    command: String,
    /// `SHOAL_TEST_OTHER_COMMAND`: another shoal program in the image, which lacks the tests'
    /// functions (default: [`IMAGE_OTHER_COMMAND`]).
    other_command: String,
    namespace: Option<String>,
}

/// The settings of the real-cluster tests, or a panic naming what is missing (they are ignored
/// tests: `make test-kubernetes` checks the variables first and says when it skips them).
fn cluster_settings() -> ClusterSettings {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let missing: Vec<&str> = ["KUBECONFIG", "SHOAL_TEST_IMAGE", "SHOAL_TEST_REDIS_URL"]
        .into_iter()
        .filter(|v| get(v).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "the real-cluster tests need {} (see `make test-kubernetes`)",
        missing.join(", ")
    );
    ClusterSettings {
        kubeconfig: PathBuf::from(get("KUBECONFIG").unwrap_or_default()),
        image: get("SHOAL_TEST_IMAGE").unwrap_or_default(),
        redis_url: get("SHOAL_TEST_REDIS_URL").unwrap_or_default(),
        worker_redis_url: get("SHOAL_TEST_WORKER_REDIS_URL"),
        command: get("SHOAL_TEST_COMMAND").unwrap_or_else(|| IMAGE_COMMAND.to_string()),
        other_command: get("SHOAL_TEST_OTHER_COMMAND")
            .unwrap_or_else(|| IMAGE_OTHER_COMMAND.to_string()),
        namespace: get("SHOAL_TEST_NAMESPACE"),
    }
}

/// The cluster a driver uses, and what its scenarios need of it.
struct Kube {
    target: Target,
    /// The shoal key namespace of this test (unique: the Jobs' `shoal.dev/namespace` label).
    keys: String,
    /// The Kubernetes namespace of the Jobs.
    namespace: String,
    /// The driver's Redis URL.
    redis_url: String,
    /// The workers' Redis URL.
    worker_redis_url: String,
    /// The Secret holding `worker_redis_url`, when it differs from `redis_url`.
    redis_secret: Option<String>,
    image: String,
    command: String,
    tokio: tokio::runtime::Runtime,
    client: kube::Client,
    // Dropped in this order: the emulator (its pods), Redis, the network.
    emulator: Option<Emulator>,
    redis: Option<TestRedis>,
    _network: Option<Network>,
}

/// Creates the Secret `name` holding `data` (`stringData`) in `namespace`.
fn create_secret(
    tokio: &tokio::runtime::Runtime,
    client: &kube::Client,
    namespace: &str,
    name: &str,
    data: serde_json::Value,
) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": data,
    }))
    .expect("a Secret");
    tokio
        .block_on(
            Api::<Secret>::namespaced(client.clone(), namespace)
                .create(&PostParams::default(), &secret),
        )
        .expect("create the Secret");
}

impl Kube {
    fn start(target: Target) -> Kube {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a Tokio runtime for the test's API calls");
        let keys = format!("k8s-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        match target {
            Target::Emulator => {
                let network = Network::new();
                let redis = TestRedis::tcp_also_on(&[network.host_address().into()]);
                let emulator = Emulator::start(Some(&network));
                let kubeconfig = std::env::var("KUBECONFIG").expect("the driver's KUBECONFIG");
                emulator
                    .write_kubeconfig(Path::new(&kubeconfig))
                    .expect("the emulator's kubeconfig");
                let client = {
                    let _inside = tokio.enter();
                    emulator.client()
                };
                let redis_url = redis.url_at(network.host_address().into());
                Kube {
                    target,
                    keys,
                    namespace: DEFAULT_NAMESPACE.to_string(),
                    worker_redis_url: redis_url.clone(),
                    redis_secret: None,
                    redis_url,
                    image: "shoal-tests.example/kubernetes-tests:1".to_string(),
                    command: std::env::current_exe()
                        .expect("this test binary")
                        .display()
                        .to_string(),
                    tokio,
                    client,
                    emulator: Some(emulator),
                    redis: Some(redis),
                    _network: Some(network),
                }
            }
            Target::Cluster => {
                let settings = cluster_settings();
                let config = tokio
                    .block_on(kube::Config::infer())
                    .expect("a Kubernetes configuration from KUBECONFIG");
                let namespace = settings
                    .namespace
                    .unwrap_or_else(|| config.default_namespace.clone());
                let client = {
                    let _inside = tokio.enter();
                    kube::Client::try_from(config).expect("a Kubernetes client")
                };
                let redis_secret = settings.worker_redis_url.as_ref().map(|url| {
                    let name = format!("shoal-test-redis-{keys}");
                    create_secret(&tokio, &client, &namespace, &name, json!({"url": url}));
                    name
                });
                Kube {
                    target,
                    keys,
                    namespace,
                    worker_redis_url: settings
                        .worker_redis_url
                        .unwrap_or_else(|| settings.redis_url.clone()),
                    redis_secret,
                    redis_url: settings.redis_url,
                    image: settings.image,
                    command: settings.command,
                    tokio,
                    client,
                    emulator: None,
                    redis: None,
                    _network: None,
                }
            }
        }
    }

    /// A Kubernetes-backend configuration for this cluster.
    fn config(&self) -> Config {
        let mut config = Config::default();
        config.shoal.backend = Backend::Kubernetes;
        config.shoal.namespace = self.keys.clone();
        config.redis.url = Some(self.redis_url.clone());
        config.kubernetes.image = Some(self.image.clone());
        config.kubernetes.command = Some(self.command.clone());
        if self.target == Target::Cluster {
            config.kubernetes.namespace = Some(self.namespace.clone());
        }
        if let Some(secret) = &self.redis_secret {
            config.kubernetes.redis_url_secret = Some(SecretKeyRef {
                name: secret.clone(),
                key: "url".into(),
            });
        }
        config
    }

    /// Creates the Secret `name` holding `data` (`stringData`) in this test's namespace.
    fn create_secret(&self, name: &str, data: serde_json::Value) {
        create_secret(&self.tokio, &self.client, &self.namespace, name, data);
    }

    fn emulator(&self) -> &Emulator {
        self.emulator.as_ref().expect("an emulator scenario")
    }

    fn jobs_api(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// This test's selector, plus `extra` (`key=value,...`) when not empty.
    fn selector(&self, extra: &str) -> ListParams {
        let mut selector = format!("shoal.dev/namespace={}", self.keys);
        if !extra.is_empty() {
            selector = format!("{selector},{extra}");
        }
        ListParams::default().labels(&selector)
    }

    fn jobs(&self, extra: &str) -> Vec<Job> {
        self.tokio
            .block_on(self.jobs_api().list(&self.selector(extra)))
            .expect("list Jobs")
            .items
    }

    fn secrets(&self, extra: &str) -> Vec<Secret> {
        self.tokio
            .block_on(
                Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
                    .list(&self.selector(extra)),
            )
            .expect("list Secrets")
            .items
    }

    fn pods(&self, extra: &str) -> Vec<Pod> {
        self.tokio
            .block_on(self.pods_api().list(&self.selector(extra)))
            .expect("list pods")
            .items
    }

    /// The pod of process `name` once it runs.
    fn running_pod(&self, name: &str) -> String {
        let selector = format!("shoal.dev/process={name}");
        let mut found = None;
        let ran = wait(patience(), || {
            found = self
                .pods(&selector)
                .into_iter()
                .find(|p| phase(p) == "Running")
                .and_then(|p| p.metadata.name);
            found.is_some()
        });
        assert!(
            ran,
            "the pod of {name} never ran: {:?}",
            self.pods(&selector)
        );
        found.unwrap_or_default()
    }

    /// Waits until the worker of process `name` has claimed its task (the status hash has
    /// `started_ms`; its pod's `shoal.dev/worker` label names the task), and returns when that
    /// was (ms since the epoch).
    fn claimed(&self, name: &str) -> u64 {
        let selector = format!("shoal.dev/process={name}");
        let mut id = String::new();
        let found = wait(patience(), || {
            id = self
                .pods(&selector)
                .first()
                .map(|p| label(&p.metadata, "shoal.dev/worker").to_string())
                .unwrap_or_default();
            !id.is_empty()
        });
        assert!(found, "no pod for {name}");
        let status = format!("shoal:{{{}:proc:{id}}}:status", self.keys);
        let mut redis = self.redis();
        let mut started_ms = None;
        let claimed = wait(patience(), || {
            started_ms = redis::cmd("HGET")
                .arg(&status)
                .arg("started_ms")
                .query::<Option<u64>>(&mut redis)
                .expect("HGET");
            started_ms.is_some()
        });
        assert!(claimed, "the worker of {name} never claimed its task");
        started_ms.unwrap_or_default()
    }

    /// Kills a pod's process with SIGKILL: through its pid on the emulator, by deleting the pod
    /// with grace 0 on a real cluster (whose kubelet then SIGKILLs it).
    fn kill_pod(&self, pod: &str) {
        match &self.emulator {
            Some(emulator) => {
                let pid = emulator
                    .pod_pid(&self.namespace, pod)
                    .unwrap_or_else(|| panic!("pod {pod} runs no process"));
                kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL the pod");
            }
            None => {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                let _ = self
                    .tokio
                    .block_on(self.pods_api().delete(pod, &params))
                    .expect("delete the pod");
            }
        }
    }

    fn redis(&self) -> redis::Connection {
        redis::Client::open(self.redis_url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("a connection to the test's Redis")
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        if let Some(secret) = &self.redis_secret {
            let secrets = Api::<Secret>::namespaced(self.client.clone(), &self.namespace);
            if let Err(e) = self
                .tokio
                .block_on(secrets.delete(secret, &DeleteParams::default()))
            {
                eprintln!("deleting the test's Secret {secret}: {e}");
            }
        }
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

fn label<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> &'a str {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
        .unwrap_or_default()
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
fn wait(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime(config: Config) -> shoal::Runtime {
    let rt = shoal::init_with(config).expect("a kubernetes runtime");
    // The tests read what the driver logs (why a pod ended, a lost lease).
    shoal::log_to_stderr();
    rt
}

/// Joins `process`, at most [`patience()`], and returns its exit code.
fn exit_code(process: &Process) -> Option<i32> {
    process.join(Some(patience())).expect("join");
    process.exitcode()
}

// ---------------------------------------------------------------------------------------------
// Scenarios, shared by the emulator and the real-cluster tests.

/// Processes exit with Python's codes; their output reaches the driver; `is_alive` and
/// `join(timeout)` follow the pod; each is a Job with shoal's labels.
fn process_lifecycle(kube: &Kube) {
    let _rt = runtime(kube.config());
    let ok = Process::new(noop, ());
    let panicking = Process::new(panics, ());
    let exiting = Process::new(exits, (7,));
    let greeting = Process::new(greet, ("k8s".to_string(),));
    let slow = Process::new(sleeps, (1500u64,));
    for p in [&ok, &panicking, &exiting, &greeting, &slow] {
        p.start().expect("start");
    }
    assert!(slow.is_alive());
    assert_eq!(slow.pid(), None, "a pod's pid is not a pid of this machine");
    slow.join(Some(Duration::from_millis(200))).expect("join");
    assert!(
        slow.is_alive(),
        "join(timeout) returned with the process running"
    );
    assert_eq!(slow.exitcode(), None);

    assert_eq!(exit_code(&ok), Some(0));
    assert_eq!(exit_code(&panicking), Some(1));
    assert_eq!(exit_code(&exiting), Some(7));
    assert_eq!(exit_code(&greeting), Some(0));
    assert_eq!(exit_code(&slow), Some(0));
    assert!(!slow.is_alive());

    let jobs = kube.jobs("");
    assert_eq!(jobs.len(), 5, "one Job per process: {jobs:?}");
    for job in &jobs {
        assert_eq!(
            label(&job.metadata, "app.kubernetes.io/managed-by"),
            "shoal"
        );
        assert!(label(&job.metadata, "shoal.dev/process").starts_with("Process-"));
        let spec = job.spec.as_ref().expect("a Job spec");
        assert_eq!(spec.backoff_limit, Some(0));
    }
}

/// `terminate()` ends a pod with -15 without waiting out its grace period (the worker, not PID
/// 1 of its pod, dies of SIGTERM), `kill()` with -9; a process terminated before its pod ran too.
fn terminate_and_kill(kube: &Kube) {
    let _rt = runtime(kube.config());
    let terminated = Process::new(sleeps, (60_000u64,));
    let killed = Process::new(sleeps, (60_000u64,));
    terminated.start().expect("start");
    killed.start().expect("start");
    // Terminated while it runs its task.
    kube.claimed(terminated.get_name());
    kube.claimed(killed.get_name());

    let asked = Instant::now();
    terminated.terminate().expect("terminate");
    assert_eq!(exit_code(&terminated), Some(-15));
    // The pods' grace period is 30 s: a SIGTERM ignored would take that long, then end in -9.
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "terminate took {:?}: the worker waited out its grace period",
        asked.elapsed()
    );
    killed.kill().expect("kill");
    assert_eq!(exit_code(&killed), Some(-9));

    // A pod whose container takes a second to start (a real cluster's are slower still; the
    // annotation is the emulator's): terminate() lands before the program runs.
    drop((terminated, killed, _rt));
    let mut slow_start = kube.config();
    slow_start
        .kubernetes
        .annotations
        .insert(START_DELAY_MS.into(), "1000".into());
    let _rt = runtime(slow_start);
    let early = Process::new(sleeps, (60_000u64,));
    early.start().expect("start");
    early.terminate().expect("terminate before the pod runs");
    assert_eq!(exit_code(&early), Some(-15));
    let selector = format!("shoal.dev/process={}", early.get_name());
    assert!(
        wait(patience(), || kube.jobs(&selector).is_empty()
            && kube.pods(&selector).is_empty()),
        "the Job or pod of a terminated process stays"
    );
}

/// One run of [`recorded_square`] as it logged it.
#[derive(Clone, Debug, Default)]
struct Start {
    item: u64,
    at_ms: u64,
    pod: String,
}

/// The log [`recorded_square`] writes for one test.
struct Starts {
    list: String,
    url: String,
    redis: redis::Connection,
}

impl Starts {
    fn new(kube: &Kube, name: &str) -> Starts {
        Starts {
            list: format!("shoal-test:{}:{name}", kube.keys),
            url: kube.worker_redis_url.clone(),
            redis: kube.redis(),
        }
    }

    /// Arguments for `recorded_square` over `items`, each working `ms`.
    fn args(&self, items: std::ops::Range<u64>, ms: u64) -> Vec<(String, String, u64, u64)> {
        items
            .map(|x| (self.url.clone(), self.list.clone(), x, ms))
            .collect()
    }

    /// Every start so far, oldest first.
    fn all(&mut self) -> Vec<Start> {
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(&self.list)
            .arg(0)
            .arg(-1)
            .query(&mut self.redis)
            .expect("LRANGE");
        entries
            .iter()
            .filter_map(|e| {
                let mut words = e.split(' ');
                Some(Start {
                    item: words.next()?.parse().ok()?,
                    at_ms: words.next()?.parse().ok()?,
                    pod: words.next()?.to_string(),
                })
            })
            .collect()
    }

    /// Waits until `pods` different pods have started items and one just started an item (seen
    /// on this poll for the first time, so it is still running it); returns that start.
    fn fresh_start(&mut self, pods: usize) -> Start {
        let mut seen = 0;
        let mut fresh = None;
        let found = wait(patience(), || {
            let now = self.all();
            let distinct: BTreeSet<&String> = now.iter().map(|s| &s.pod).collect();
            if distinct.len() >= pods && now.len() > seen && seen > 0 {
                fresh = now.last().cloned();
                return true;
            }
            seen = now.len();
            false
        });
        assert!(found, "items never ran on {pods} pods: {:?}", self.all());
        fresh.unwrap_or_default()
    }

    /// Waits until `count` starts are logged; returns them.
    fn at_least(&mut self, count: usize) -> Vec<Start> {
        let mut all = Vec::new();
        let logged = wait(patience(), || {
            all = self.all();
            all.len() >= count
        });
        assert!(logged, "fewer than {count} starts: {all:?}");
        all
    }

    /// The first start of `item` at or after `since_ms` on another pod than `pod`.
    fn rerun(&mut self, item: u64, since_ms: u64, pod: &str) -> Option<Start> {
        self.all()
            .into_iter()
            .find(|s| s.item == item && s.at_ms >= since_ms && s.pod != pod)
    }
}

/// A pool map whose worker pod is SIGKILLed mid-map completes with every result once and in
/// order; the killed pod's chunk is redelivered and runs again on another pod.
fn pool_survives_a_killed_worker(kube: &Kube) {
    let _rt = runtime(kube.config());
    let pool = Pool::new(2).expect("pool");
    let mut starts = Starts::new(kube, "killed");
    let result = pool
        .starmap_async_with(
            recorded_square,
            starts.args(0..40, 150),
            AsyncOptions::new().chunksize(1),
        )
        .expect("map");
    // Once both workers run, kill one right after it started an item: mid-item.
    let victim = starts.fresh_start(2);
    kube.kill_pod(&victim.pod);
    let killed_at = now_ms();

    let results = result.get(Some(patience())).expect("the map completes");
    assert_eq!(
        results,
        (0..40u64).map(|x| x * x).collect::<Vec<_>>(),
        "every result once, in order"
    );
    assert!(
        starts.rerun(victim.item, killed_at, &victim.pod).is_some(),
        "item {}, which {} was running when killed, never ran again: {:?}",
        victim.item,
        victim.pod,
        starts.all()
    );
}

/// A worker that kills itself with `SIGKILL` ends as it would locally: a Process with -9, and a
/// pool map whose function kills its worker on some inputs completes with every result once and
/// in order (the dead workers' chunks redelivered). As PID 1 of its container the worker would
/// survive its own `SIGKILL` (the pods share their PID namespace so that it is not).
fn workers_that_sigkill_themselves(kube: &Kube) {
    let _rt = runtime(kube.config());
    let p = Process::new(kills_itself, ());
    p.start().expect("start");
    assert_eq!(
        exit_code(&p),
        Some(-9),
        "a function that SIGKILLs its own worker ends its process with -9"
    );

    let kills = shoal::Value::new(0i64).expect("a kill counter");
    let pool = Pool::new(2).expect("pool");
    let inputs: Vec<(u64, shoal::Value<i64>)> = (0..30u64).map(|x| (x, kills.clone())).collect();
    let results = pool
        .starmap_async_with(square_or_die, inputs, AsyncOptions::new().chunksize(1))
        .expect("map")
        .get(Some(patience()))
        .expect("the map completes");
    assert_eq!(
        results,
        (0..30u64).map(|x| x * x).collect::<Vec<_>>(),
        "every result once, in order, none from a worker that survived its SIGKILL"
    );
    let killed = kills.get().expect("the kill counter");
    assert!(
        killed >= 2 * VICTIMS.len() as i64,
        "each victim ran again after killing its worker: {killed} victim runs"
    );
}

/// A durable actor whose state is a tally.
#[derive(serde::Serialize, serde::Deserialize, Default, shoal::Actor)]
#[actor(messages(Add))]
struct Tally {
    n: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Add(u64);

impl Handler<Add> for Tally {
    type Reply = u64;
    fn handle(&mut self, Add(by): Add, _: &mut ActorContext) -> u64 {
        self.n += by;
        self.n
    }
}

/// An actor hosted in a pod: its host pod SIGKILLed between messages, a new host pod takes it
/// over from its committed state and every message is applied once.
fn actor_survives_a_killed_host_pod(kube: &Kube) {
    let mut config = kube.config();
    config.actors.hosts = 1;
    config.actors.lease_secs = 1.0;
    let _rt = runtime(config);
    let tally = shoal::spawn_actor(Tally::default()).expect("spawn");
    assert_eq!(tally.ask(Add(1), Some(patience())).expect("ask"), 1);
    for _ in 0..50 {
        tally.tell(Add(1)).expect("tell");
    }
    let host = kube.running_pod("ActorHost-1");
    kube.kill_pod(&host);
    for _ in 0..50 {
        tally.tell(Add(1)).expect("tell");
    }
    assert_eq!(
        tally
            .ask(Add(0), Some(patience()))
            .expect("answered by a new host pod"),
        101,
        "every message applied once"
    );
    assert!(tally.activations().expect("activations") >= 2);
    let replaced = wait(patience(), || {
        kube.pods("shoal.dev/process=ActorHost-2")
            .iter()
            .any(|p| phase(p) == "Running")
    });
    assert!(replaced, "no replacement host pod runs");
}

/// Pods that cannot start are reported and end their process with code 1, not waited for: an
/// image that cannot be pulled, a missing Secret, a program the container runtime cannot
/// execute; a pool whose workers cannot start breaks instead of hanging.
///
/// Failures the kubelet retries (a pull, a missing Secret) end the process once they have lasted
/// `kubernetes.pod_create_grace_secs`, not before; an image name that cannot be parsed ends it at
/// once, whatever the grace.
fn unstartable_pods(kube: &Kube, with_bad_command: bool) {
    let grace = Duration::from_secs(2);
    let run = |mut config: Config, what: &str| {
        config.kubernetes.pod_create_grace_secs = grace.as_secs_f64();
        let rt = runtime(config);
        let p = Process::new(noop, ());
        p.start().expect("start");
        let started = Instant::now();
        assert_eq!(exit_code(&p), Some(1), "{what}");
        let took = started.elapsed();
        println!("{what}: reported after {took:?}");
        assert!(
            wait(patience(), || kube
                .jobs(&format!("shoal.dev/process={}", p.get_name()))
                .is_empty()),
            "{what}: the Job of a pod that cannot start is left behind"
        );
        drop(p);
        drop(rt);
        took
    };

    let mut unpullable = kube.config();
    unpullable.kubernetes.image = Some("registry.invalid/shoal/none:1".into());
    let took = run(unpullable.clone(), "an image that cannot be pulled");
    assert!(
        took >= grace,
        "a pull the kubelet retries ended the process at once: {took:?}"
    );

    let mut missing_secret = kube.config();
    missing_secret.kubernetes.redis_url_secret = Some(SecretKeyRef {
        name: "shoal-test-no-such-secret".into(),
        key: "url".into(),
    });
    let took = run(missing_secret, "a missing Secret");
    assert!(
        took >= grace,
        "a missing Secret ended the process at once: {took:?}"
    );

    // No retry makes such a name valid: it ends the process at once, with the grace long.
    let mut invalid = kube.config();
    invalid.kubernetes.image = Some("Shoal-Invalid-Image-Name:1".into());
    invalid.kubernetes.pod_create_grace_secs = 600.0;
    let rt = runtime(invalid);
    let p = Process::new(noop, ());
    p.start().expect("start");
    let started = Instant::now();
    assert_eq!(exit_code(&p), Some(1), "an invalid image name");
    println!(
        "an invalid image name: reported after {:?}",
        started.elapsed()
    );
    drop(p);
    drop(rt);

    if with_bad_command {
        let mut bad_command = kube.config();
        bad_command.kubernetes.command = Some("/nonexistent/shoal-worker".into());
        run(bad_command, "a command that does not exist");
    }

    // With the default restart budget: workers the backend cannot start break the pool after
    // two in a row per worker.
    unpullable.kubernetes.pod_create_grace_secs = grace.as_secs_f64();
    let rt = runtime(unpullable);
    let pool = Pool::builder().processes(1).build().expect("pool");
    let started = Instant::now();
    let outcome = pool.map(square, vec![1u64, 2, 3]);
    assert!(
        matches!(&outcome, Err(e) if e.to_string().contains("could not be started by the backend")),
        "a pool whose workers cannot start: {outcome:?}"
    );
    println!(
        "a pool whose workers cannot start broke after {:?}",
        started.elapsed()
    );
    drop(pool);
    drop(rt);
}

/// A service account that exists in no namespace: the cluster refuses the pods that name it.
const NO_SUCH_ACCOUNT: &str = "shoal-test-no-such-account";

/// Jobs whose pods the cluster refuses to create (their service account does not exist, so the
/// Job controller only records `FailedCreate` Events): a Process ends with code 1 once
/// `kubernetes.pod_create_grace_secs` have passed since the first refusal, not before, with no
/// pod ever made and its Job deleted; a Pool whose workers are all refused breaks its map (two
/// workers in a row per slot that never started) instead of retrying forever.
fn refused_pods(kube: &Kube) {
    let grace = Duration::from_secs(2);
    let mut config = kube.config();
    config.kubernetes.service_account = Some(NO_SUCH_ACCOUNT.into());
    config.kubernetes.pod_create_grace_secs = grace.as_secs_f64();
    let rt = runtime(config);
    let p = Process::new(noop, ());
    let started = Instant::now();
    p.start().expect("start");
    assert_eq!(exit_code(&p), Some(1), "a process whose pod is refused");
    let took = started.elapsed();
    println!("a process whose pod is refused ended after {took:?}");
    assert!(took >= grace, "ended before the grace: {took:?}");
    assert!(
        took < grace + Duration::from_secs(30),
        "ended long after the grace: {took:?}"
    );
    let own = format!("shoal.dev/process={}", p.get_name());
    assert!(
        wait(patience(), || kube.jobs(&own).is_empty()),
        "the Job whose pod is refused is left behind: {:?}",
        kube.jobs(&own)
    );
    assert!(kube.pods(&own).is_empty(), "no pod was ever made");

    // The default restart budget (20 failures within 10 s) alone would never fill with one
    // failure per grace: workers that never started break the pool after two in a row per slot.
    let pool = Pool::builder().processes(1).build().expect("pool");
    let started = Instant::now();
    let outcome = pool.map(square, vec![1u64, 2, 3]);
    assert!(
        matches!(&outcome, Err(e) if e.to_string().contains("could not be started by the backend")),
        "a pool whose worker pods are refused: {outcome:?}"
    );
    println!(
        "a pool whose worker pods are refused broke after {:?}",
        started.elapsed()
    );
    assert!(
        wait(patience(), || kube.jobs("").is_empty()),
        "the refused workers' Jobs are left behind: {:?}",
        kube.jobs("")
    );
    drop(pool);
    drop(rt);
}

/// A refusal that ends within the grace (the service account is created after the first
/// `FailedCreate` Event, and the Job controller's next attempt makes the pod) does not end the
/// process: it runs and exits 0.
fn refused_then_admitted(kube: &Kube) {
    let account = format!("shoal-test-late-{}", kube.keys);
    let mut config = kube.config();
    config.kubernetes.service_account = Some(account.clone());
    config.kubernetes.pod_create_grace_secs = 20.0;
    let _rt = runtime(config);
    let p = Process::new(noop, ());
    p.start().expect("start");
    let own = format!("shoal.dev/process={}", p.get_name());
    let mut job = String::new();
    assert!(
        wait(patience(), || {
            job = kube
                .jobs(&own)
                .first()
                .and_then(|j| j.metadata.name.clone())
                .unwrap_or_default();
            !job.is_empty()
        }),
        "no Job for {own}"
    );
    let events: Api<Event> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let selector = format!("involvedObject.kind=Job,involvedObject.name={job},reason=FailedCreate");
    assert!(
        wait(patience(), || !kube
            .tokio
            .block_on(events.list(&ListParams::default().fields(&selector)))
            .expect("list Events")
            .items
            .is_empty()),
        "no FailedCreate Event for Job {job}"
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let late: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": account}})).expect("an account");
    kube.tokio
        .block_on(accounts.create(&PostParams::default(), &late))
        .expect("create the service account");
    assert_eq!(
        exit_code(&p),
        Some(0),
        "a pod admitted within the grace runs"
    );
}

/// Failures to start that the kubelet retries and that then clear do not end the process: an
/// image whose first pulls fail (a registry's rate limit; the emulator's [`PULL_FAILURES`]) and
/// a Secret the container needs created a moment after the pod: both processes run and exit 0.
fn transient_start_failures(kube: &Kube) {
    let mut config = kube.config();
    config.kubernetes.pod_create_grace_secs = 30.0;
    config
        .kubernetes
        .annotations
        .insert(PULL_FAILURES.into(), "3".into());
    let rt = runtime(config);
    let pulled_late = Process::new(noop, ());
    pulled_late.start().expect("start");
    assert_eq!(
        exit_code(&pulled_late),
        Some(0),
        "a pod whose first pulls failed runs once one works"
    );
    drop(pulled_late);
    drop(rt);

    let secret = format!("shoal-test-late-url-{}", kube.keys);
    let mut config = kube.config();
    config.kubernetes.pod_create_grace_secs = 30.0;
    config.kubernetes.redis_url_secret = Some(SecretKeyRef {
        name: secret.clone(),
        key: "url".into(),
    });
    let _rt = runtime(config);
    let p = Process::new(noop, ());
    p.start().expect("start");
    let own = format!("shoal.dev/process={}", p.get_name());
    let waiting_for = |reason: &str| {
        kube.pods(&own).iter().any(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                == Some(reason)
        })
    };
    assert!(
        wait(patience(), || waiting_for("CreateContainerConfigError")),
        "the pod never waited for its Secret: {:?}",
        kube.pods(&own)
    );
    // Long enough for the executor to see it too.
    std::thread::sleep(Duration::from_secs(1));
    kube.create_secret(&secret, json!({"url": kube.worker_redis_url}));
    assert_eq!(
        exit_code(&p),
        Some(0),
        "a pod whose Secret came late runs once it is there"
    );
}

/// A pod the scheduler cannot place (a node selector no node matches) ends its process with
/// code 1 once the start timeout (here the annotation's 3 s) has passed, not before, saying
/// why; its pod and Job are deleted.
fn unschedulable_pods(kube: &Kube) {
    let timeout = Duration::from_secs(3);
    let mut config = kube.config();
    config
        .kubernetes
        .node_selector
        .insert("disktype".into(), "no-such-disk".into());
    config.kubernetes.pod_start_timeout_secs = timeout.as_secs_f64();
    let rt = runtime(config);
    let p = Process::new(noop, ());
    let started = Instant::now();
    p.start().expect("start");
    assert_eq!(
        exit_code(&p),
        Some(1),
        "a process whose pod cannot be scheduled"
    );
    let took = started.elapsed();
    println!("a process whose pod cannot be scheduled ended after {took:?}");
    assert!(took >= timeout, "ended before the start timeout: {took:?}");
    assert!(
        took < timeout + Duration::from_secs(20),
        "ended long after the start timeout: {took:?}"
    );
    let own = format!("shoal.dev/process={}", p.get_name());
    assert!(
        wait(patience(), || kube.jobs(&own).is_empty()
            && kube.pods(&own).is_empty()),
        "the Job or pod that could not be scheduled is left behind"
    );
    drop(p);
    // The runtime's drop does not wait for it either.
    let dropped = Instant::now();
    drop(rt);
    assert!(dropped.elapsed() < Duration::from_secs(20));
}

/// Calls to the API server that go unanswered (the emulator holds every write, as a connection
/// dropped silently would) fail after the API call timeout (here the annotation's 2 s) naming
/// the call, instead of blocking `start()` and the runtime's drop for ever.
fn unanswered_api_calls(kube: &Kube) {
    let timeout = Duration::from_secs(2);
    let mut config = kube.config();
    config.kubernetes.api_call_timeout_secs = timeout.as_secs_f64();
    let rt = runtime(config);
    let emulator = kube.emulator();
    emulator.stall_writes(true);
    let p = Process::new(noop, ());
    let asked = Instant::now();
    let refused = p.start();
    let took = asked.elapsed();
    println!("start() with the API server silent: {refused:?} after {took:?}");
    match &refused {
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("creating "), "names the call: {message}");
            assert!(
                message.contains("no answer from the Kubernetes API server within 2s"),
                "{message}"
            );
        }
        Ok(()) => panic!("start() succeeded with every write unanswered"),
    }
    assert!(took >= timeout, "gave up before the timeout: {took:?}");
    assert!(took < timeout + Duration::from_secs(15), "took {took:?}");

    // Answered again: the next process runs.
    emulator.stall_writes(false);
    let q = Process::new(noop, ());
    q.start().expect("start with the API server answering");
    assert_eq!(exit_code(&q), Some(0));

    // The drop's deletes go unanswered: it gives up on each after the timeout.
    emulator.stall_writes(true);
    let dropped = Instant::now();
    drop((p, q, rt));
    let took = dropped.elapsed();
    println!("the runtime's drop with the API server silent took {took:?}");
    assert!(
        took < 2 * timeout + Duration::from_secs(15),
        "drop took {took:?}"
    );
    emulator.stall_writes(false);
}

/// `kill()` of a worker whose pod the executor has not seen yet (the emulator holds the
/// watches, as a lagging watch connection would) deletes that pod with grace 0 all the same:
/// the function, which outlives a `SIGTERM`, has no side effect after `join()` returned -9.
/// And a worker that has no pod at all (refused by the cluster) ends with -9 at once.
fn stop_before_the_pod_is_seen(kube: &Kube) {
    let work = Duration::from_secs(3);
    let list = format!("shoal-test:{}:outlives", kube.keys);
    let emulator = kube.emulator();
    let rt = runtime(kube.config());
    emulator.hold_watches(true);
    let p = Process::new(
        outlives_sigterm,
        (
            kube.worker_redis_url.clone(),
            list.clone(),
            work.as_millis() as u64,
        ),
    );
    p.start().expect("start");
    let mut redis = kube.redis();
    let mut recorded = Vec::new();
    let ran = wait(patience(), || {
        recorded = redis::cmd("LRANGE")
            .arg(&list)
            .arg(0)
            .arg(-1)
            .query::<Vec<String>>(&mut redis)
            .expect("LRANGE");
        !recorded.is_empty()
    });
    assert!(ran, "the function never started");
    p.kill().expect("kill");
    emulator.hold_watches(false);
    assert_eq!(exit_code(&p), Some(-9));
    let own = format!("shoal.dev/process={}", p.get_name());
    let left = kube.pods(&own);
    std::thread::sleep(work + Duration::from_millis(1500));
    let recorded: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query(&mut redis)
        .expect("LRANGE");
    assert_eq!(
        recorded,
        ["started"],
        "the function ran on after join() returned -9"
    );
    assert!(
        left.is_empty(),
        "join() returned with the pod still there: {left:?}"
    );
    drop(p);
    drop(rt);

    let mut refused = kube.config();
    refused.kubernetes.service_account = Some(NO_SUCH_ACCOUNT.into());
    let _rt = runtime(refused);
    let p = Process::new(noop, ());
    p.start().expect("start");
    let asked = Instant::now();
    p.kill().expect("kill");
    assert_eq!(exit_code(&p), Some(-9));
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "a worker without a pod waited {:?} to end",
        asked.elapsed()
    );
}

/// A worker whose pod ran while the executor's pod watch lagged (the emulator holds the
/// watches) past `kubernetes.pod_start_timeout_secs` is not taken for one that never started:
/// it is neither deleted nor ended with 1, and ends with its own code once the watch tells it.
fn start_timeout_while_the_watch_lags(kube: &Kube) {
    let timeout = Duration::from_secs(2);
    let emulator = kube.emulator();
    let mut config = kube.config();
    config.kubernetes.pod_start_timeout_secs = timeout.as_secs_f64();
    let _rt = runtime(config);
    emulator.hold_watches(true);
    let p = Process::new(noop, ());
    let started = Instant::now();
    p.start().expect("start");
    kube.claimed(p.get_name());
    std::thread::sleep((timeout + Duration::from_secs(1)).saturating_sub(started.elapsed()));
    emulator.hold_watches(false);
    assert_eq!(
        exit_code(&p),
        Some(0),
        "a worker that ran while the pod watch lagged past its start timeout"
    );
}

/// `kill()` while the API server leaves every write unanswered (the emulator stalls them; the
/// API call timeout is 1 s) and the pod watch lags: the deletes fail, so the worker is not
/// reported killed while its pod runs on; once the API server answers again, a later try of
/// the delete lands (the pod goes while the watch still lags) and the worker ends with -9,
/// its Job gone.
fn kill_while_the_api_server_is_silent(kube: &Kube) {
    let emulator = kube.emulator();
    let mut config = kube.config();
    config.kubernetes.api_call_timeout_secs = 1.0;
    let _rt = runtime(config);
    emulator.hold_watches(true);
    let p = Process::new(sleeps, (120_000u64,));
    p.start().expect("start");
    kube.claimed(p.get_name());
    let pod = kube.running_pod(p.get_name());
    emulator.stall_writes(true);
    p.kill().expect("kill");
    p.join(Some(Duration::from_secs(6))).expect("join");
    let running = emulator.pod_pid(&kube.namespace, &pod).is_some();
    let code = p.exitcode();
    emulator.stall_writes(false);
    assert!(running, "the pod ended while every delete went unanswered");
    assert_eq!(
        code, None,
        "the worker was reported killed while its pod ran on"
    );
    // A later try of the delete lands: the pod goes while the watch still lags.
    assert!(
        wait(patience(), || emulator
            .pod_pid(&kube.namespace, &pod)
            .is_none()),
        "the kill's delete was not made again once the API server answered"
    );
    emulator.hold_watches(false);
    assert_eq!(exit_code(&p), Some(-9));
    let own = format!("shoal.dev/process={}", p.get_name());
    assert!(
        wait(patience(), || kube.jobs(&own).is_empty()),
        "the Job of the killed worker is left behind"
    );
}

/// `terminate()` of a worker whose node stopped answering (the emulator freezes its kubelet,
/// which then carries out no graceful delete, reports nothing and sends no signal): the pod
/// stays `Terminating`, its process running, past its grace period; the executor then
/// force-deletes it (grace 0), saying why, and the worker ends with -15, the signal asked for,
/// within the grace (the terminate's 30 s, shortened to the pod's own 2 s by its Job's garbage
/// collection) + the executor's 30 s margin, its pod gone.
fn terminate_on_a_node_that_stopped_answering(kube: &Kube) {
    let emulator = kube.emulator();
    let _rt = runtime(kube.config());
    let p = Process::new(sleeps, (600_000u64,));
    p.start().expect("start");
    kube.claimed(p.get_name());
    let pod = kube.running_pod(p.get_name());
    let own = format!("shoal.dev/process={}", p.get_name());
    emulator.freeze_kubelet(true);
    let asked = Instant::now();
    p.terminate().expect("terminate");
    // The node confirms nothing: the pod stays, being deleted, its process running on.
    assert!(
        wait(patience(), || kube
            .pods(&own)
            .iter()
            .any(|p| p.metadata.deletion_timestamp.is_some())),
        "the pod was not being deleted: {:?}",
        kube.pods(&own)
    );
    p.join(Some(Duration::from_secs(5))).expect("join");
    assert_eq!(
        p.exitcode(),
        None,
        "ended while its pod's deletion was unconfirmed"
    );
    assert!(
        emulator.pod_pid(&kube.namespace, &pod).is_some(),
        "the frozen kubelet stopped the process"
    );
    assert_eq!(kube.pods(&own).len(), 1, "the pod went unconfirmed");

    // The terminate's grace (30 s) + the executor's margin (30 s) + slack.
    let limit = Duration::from_secs(30 + 30 + 15);
    p.join(Some(limit.saturating_sub(asked.elapsed())))
        .expect("join");
    let took = asked.elapsed();
    let code = p.exitcode();
    let left = kube.pods(&own);
    let running = emulator.pod_pid(&kube.namespace, &pod).is_some();
    emulator.freeze_kubelet(false);
    println!("terminate() on a frozen node: {code:?} after {took:?}");
    assert_eq!(
        code,
        Some(-15),
        "join() after terminate() on a node that does not answer (after {took:?})"
    );
    assert!(
        left.is_empty(),
        "the unconfirmed pod is still there: {left:?}"
    );
    assert!(!running, "the force-deleted pod's process runs on");
}

/// A Job the API server made although it answered its creation with an error: answered `504`
/// (kube's client sends it again, and gets `409 AlreadyExists`), the Job is this launch's and
/// the process runs; answered `500` (not sent again), `start()` fails, and the function does
/// not run untracked: its task record is gone and its pod is deleted.
fn job_creates_answered_with_errors(kube: &Kube) {
    let emulator = kube.emulator();
    let _rt = runtime(kube.config());
    emulator.fail_job_creates_after_storing(504, 1);
    let p = Process::new(noop, ());
    p.start()
        .expect("start() with the Job made and its creation answered 504, then 409");
    assert_eq!(exit_code(&p), Some(0));
    let own = format!("shoal.dev/process={}", p.get_name());
    assert_eq!(kube.jobs(&own).len(), 1, "one Job for the process");

    let list = format!("shoal-test:{}:untracked", kube.keys);
    emulator.fail_job_creates_after_storing(500, 1);
    let q = Process::new(
        records_and_sleeps,
        (kube.worker_redis_url.clone(), list.clone(), 60_000u64),
    );
    assert!(q.start().is_err(), "start() with the creation answered 500");
    let own = format!("shoal.dev/process={}", q.get_name());
    assert!(
        wait(patience(), || !kube.jobs(&own).is_empty()),
        "the emulator did not make the Job"
    );
    std::thread::sleep(Duration::from_secs(5));
    let mut redis = kube.redis();
    let recorded: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query(&mut redis)
        .expect("LRANGE");
    assert!(
        recorded.is_empty(),
        "the function of a launch reported failed ran: {recorded:?}"
    );
    let alive: Vec<String> = kube
        .pods(&own)
        .iter()
        .filter(|p| matches!(phase(p), "Pending" | "Running"))
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        alive.is_empty(),
        "the pod of a launch reported failed is left running: {alive:?}"
    );
}

/// A Job whose `activeDeadlineSeconds` passes has its pod deleted (`SIGTERM`): the process
/// ends with -15, and the driver's log says why (the Job's `DeadlineExceeded`).
fn job_deadline(kube: &Kube) {
    let mut config = kube.config();
    config.kubernetes.active_deadline_seconds = Some(2);
    let _rt = runtime(config);
    let p = Process::new(sleeps, (60_000u64,));
    p.start().expect("start");
    assert_eq!(exit_code(&p), Some(-15));
}

/// Waits for `go`, then ends: by returning for `code` 0 (the worker records its exit in its
/// status hash), by `std::process::exit(code)` otherwise (nothing recorded).
#[shoal::remote]
fn ends_when_told(go: shoal::Event, code: i32) {
    go.wait(Some(Duration::from_secs(60))).expect("wait");
    if code != 0 {
        std::process::exit(code);
    }
}

/// How long a join may wait in [`ends_while_the_watch_is_cut`]: a worker the executor forgot
/// waits for ever, and the driver's deadline must leave room to say so.
const AFTER_THE_CUT: Duration = Duration::from_secs(30);

/// Workers that end while the executor's pod watch is cut off (the emulator holds the
/// watches), their Jobs and pods deleted at once by `ttlSecondsAfterFinished: 0`, after which
/// the watch's resource version is compacted away: the watch gets 410 and relists, and the pods
/// are not in the list. A worker whose pod the watch had shown running and one whose pod it
/// never saw (made, run and deleted in the gap) both end with the code their status hash
/// records, 0; one that `std::process::exit(3)`s records nothing, and with its Job gone its
/// code is lost: -9, logged as unknown. A worker whose Job is there but has no pod yet (the
/// cluster refuses it until its service account exists) is left waiting by the relist, and
/// runs once its pod is made.
fn ends_while_the_watch_is_cut(kube: &Kube) {
    let emulator = kube.emulator();
    let mut config = kube.config();
    config.kubernetes.ttl_seconds_after_finished = Some(0);
    let rt = runtime(config);
    let go = shoal::Event::new().expect("event");
    let seen = Process::new(ends_when_told, (go.clone(), 0));
    let exits_3 = Process::new(ends_when_told, (go.clone(), 3));
    for p in [&seen, &exits_3] {
        p.start().expect("start");
        kube.running_pod(p.get_name());
    }
    // Nothing is held yet: what the watch has to tell of the running pods reaches the executor.
    std::thread::sleep(Duration::from_millis(500));
    emulator.hold_watches(true);
    let unseen = Process::new(noop, ());
    unseen.start().expect("start");
    go.set().expect("go");
    let gone = wait(patience(), || {
        kube.jobs("").is_empty() && kube.pods("").is_empty()
    });
    assert!(
        gone,
        "the Jobs never finished and went: {:?}",
        kube.jobs("")
    );
    assert_eq!(
        emulator.pods_started(),
        3,
        "the unseen worker's pod never ran"
    );
    emulator.expire_watches();
    emulator.hold_watches(false);
    let codes: Vec<Option<i32>> = [&seen, &unseen, &exits_3]
        .into_iter()
        .map(|p| {
            p.join(Some(AFTER_THE_CUT)).expect("join");
            p.exitcode()
        })
        .collect();
    assert_eq!(
        codes,
        [Some(0), Some(0), Some(-9)],
        "the exits of a worker seen running, one never seen, one that exit(3)ed"
    );
    drop((seen, unseen, exits_3, rt));

    let account = format!("shoal-test-late-{}", kube.keys);
    let mut config = kube.config();
    config.kubernetes.service_account = Some(account.clone());
    config.kubernetes.pod_create_grace_secs = 60.0;
    let _rt = runtime(config);
    let waiting = Process::new(noop, ());
    waiting.start().expect("start");
    let own = format!("shoal.dev/process={}", waiting.get_name());
    assert!(
        wait(patience(), || !kube.jobs(&own).is_empty()),
        "no Job for {own}"
    );
    emulator.hold_watches(true);
    emulator.expire_watches();
    emulator.hold_watches(false);
    // The watch's back-off after the 410 (under a second, jittered), its list, the answers.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        waiting.is_alive(),
        "the relist ended a worker whose Job has no pod yet: {:?}",
        waiting.exitcode()
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let late: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": account}})).expect("an account");
    kube.tokio
        .block_on(accounts.create(&PostParams::default(), &late))
        .expect("create the service account");
    assert_eq!(exit_code(&waiting), Some(0), "its pod, made later, runs");
}

/// Pods that run another program than the driver (another build, as an outdated image would
/// be), `program`, which lacks the functions: a Process ends with 1, a pool map fails with the
/// task's error naming the function and the program.
fn program_without_the_function(kube: &Kube, program: &str) {
    let mut config = kube.config();
    config.kubernetes.command = Some(program.to_string());
    let _rt = runtime(config);
    let p = Process::new(noop, ());
    p.start().expect("start");
    assert_eq!(exit_code(&p), Some(1));

    let pool = Pool::new(1).expect("pool");
    let outcome = pool.map(square, vec![1u64, 2]);
    let Err(Error::Task(e)) = &outcome else {
        panic!("a pool map of a function the workers lack: {outcome:?}");
    };
    assert!(
        e.message.contains("function `") && e.message.contains("square"),
        "{e}"
    );
    assert!(
        e.message
            .contains(&format!("is not registered in {program}")),
        "the error names the program: {e}"
    );
}

/// After [`program_without_the_function`]: the Process's error reached the driver's log, naming
/// the program and the function.
fn the_driver_names_the_missing_function(driven: &Driven, program: &str) {
    assert!(
        driven.stderr.contains(&format!(
            "is not registered in {program}, the program this worker runs"
        )),
        "the process's error reaches the driver, naming the program"
    );
    assert!(driven.stderr.contains("noop"), "and the function");
}

/// Reports this process's authkey on `out`, then waits for `go` (its task record stays in
/// Redis meanwhile).
#[shoal::remote]
fn report_authkey(out: SimpleQueue<Vec<u8>>, go: shoal::Event) {
    out.put(current_process().authkey.as_bytes().to_vec())
        .expect("report");
    go.wait(Some(Duration::from_secs(60))).expect("wait");
}

#[shoal::remote]
fn authkey_of_worker(_: u32) -> Vec<u8> {
    current_process().authkey.as_bytes().to_vec()
}

/// Pods inherit the driver's authkey through a Secret of the runtime, which the runtime's drop
/// deletes; no Job and nothing in Redis holds the key.
fn authkey_through_a_secret(kube: &Kube) {
    let rt = runtime(kube.config());
    let key = current_process().authkey.as_bytes().to_vec();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let out: SimpleQueue<Vec<u8>> = SimpleQueue::new().expect("queue");
    let go = shoal::Event::new().expect("event");
    let child = Process::new(report_authkey, (out.clone(), go.clone()));
    child.start().expect("start");
    assert_eq!(
        out.get_timeout(patience()).expect("the pod's key"),
        key,
        "a process's pod has the driver's authkey"
    );
    let pool = Pool::new(1).expect("pool");
    assert_eq!(
        pool.apply(authkey_of_worker, (0,)).expect("apply"),
        key,
        "so has a pool worker's"
    );
    let secrets = kube.secrets("");
    assert_eq!(
        secrets.len(),
        1,
        "one Secret for the runtime's key: {secrets:?}"
    );
    let held = secrets[0]
        .data
        .as_ref()
        .and_then(|d| d.get("authkey"))
        .map(|b| b.0.clone());
    assert_eq!(held, Some(hex.clone().into_bytes()));
    let jobs = serde_json::to_string(&kube.jobs("")).expect("json");
    assert!(!jobs.contains(&hex), "a Job holds the key");
    // The child still runs, so its task record is there too; neither form of the key is.
    let holding = every_value_in_redis(&mut kube.redis())
        .into_iter()
        .filter(|v| contains_bytes(v, &key) || contains_bytes(v, hex.as_bytes()))
        .count();
    assert_eq!(holding, 0, "the key is in Redis");
    go.set().expect("go");
    assert_eq!(exit_code(&child), Some(0));
    pool.close().expect("close");
    pool.join().expect("join");
    drop(pool);
    drop(child);
    drop(rt);
    assert!(
        kube.secrets("").is_empty(),
        "the runtime's drop leaves its Secret"
    );
}

/// Dropping the runtime deletes every Job it started (finished ones included) and their pods.
fn drop_deletes_jobs(kube: &Kube) {
    let rt = runtime(kube.config());
    let finished = Process::new(noop, ());
    finished.start().expect("start");
    assert_eq!(exit_code(&finished), Some(0));
    let daemon = Process::new(sleeps, (60_000u64,)).daemon(true);
    daemon.start().expect("start");
    kube.running_pod(daemon.get_name());
    let pool = Pool::new(1).expect("pool");
    assert_eq!(pool.map(square, vec![3u64]).expect("map"), vec![9]);
    assert_eq!(
        kube.jobs("").len(),
        3,
        "a Job per process and pool worker: {:?}",
        kube.jobs("")
    );
    // A pool's workers (and their Jobs) go with the pool.
    drop(pool);
    assert!(
        wait(patience(), || kube
            .jobs("shoal.dev/process=PoolWorker-1")
            .is_empty()),
        "the pool worker's Job stays"
    );
    assert_eq!(kube.jobs("").len(), 2, "the processes' Jobs stay");
    drop(finished);
    drop(daemon);
    drop(rt);
    // The drop waited for the delete request; the pods follow (background propagation).
    assert!(kube.jobs("").is_empty(), "Jobs left: {:?}", kube.jobs(""));
    assert!(
        wait(patience(), || kube.pods("").is_empty()),
        "pods left: {:?}",
        kube.pods("")
    );
}

/// How long the nested process of [`nested_processes_go_with_their_parent_pod`] may outlive
/// its parent pod: the garbage collector deletes its Job once the parent pod is gone, and the
/// pod of that Job with it (its worker dies of that deletion's SIGTERM). Without owner
/// references nothing would: the nested worker would see its runtime's liveness key lapse
/// (7 s) and exit 76, its pod and Job left behind until the Job's TTL (300 s).
const NESTED_GONE_WITHIN: Duration = Duration::from_secs(30);

/// A `Process` started by a worker pod's own code goes with that pod: its Job (labelled with
/// the worker's runtime, not the driver's) names the parent pod as its owner (not the
/// controller, not blocking the pod's deletion), and so does the worker runtime's authkey
/// Secret; `kill()` on the parent deletes the parent pod, and the garbage collector then
/// deletes the nested Job, its pod (the process ends) and the Secret. The workers run as the
/// `shoal-worker` service account, as the README says to configure them, and reach the API
/// through `KUBECONFIG` (the emulator's kubeconfig for pods, on the bridge, in a directory they
/// see; in a real cluster the service account's token does).
fn nested_processes_go_with_their_parent_pod(kube: &Kube) {
    let emulator = kube.emulator();
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "shoal-worker"}})).expect("an account");
    kube.tokio
        .block_on(accounts.create(&PostParams::default(), &account))
        .expect("create the service account");
    // Outside /tmp, which is each pod's own.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a directory pods see");
    let kubeconfig = dir.path().join("kubeconfig");
    emulator
        .write_pod_kubeconfig(&kubeconfig)
        .expect("the pods' kubeconfig");
    let mut config = kube.config();
    config.kubernetes.service_account = Some("shoal-worker".into());
    config
        .multiprocessing
        .env_vars
        .insert("KUBECONFIG".into(), kubeconfig.display().to_string());
    let _rt = runtime(config);
    let list = format!("shoal-test:{}:nested", kube.keys);
    let parent = Process::new(
        starts_a_sleeper,
        (kube.worker_redis_url.clone(), list.clone(), 600_000u64),
    );
    parent.start().expect("start");
    let parent_pod = kube.running_pod(parent.get_name());

    // The nested process runs: it said so, naming its pod.
    let mut redis = kube.redis();
    let said: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(&list)
        .arg(patience().as_secs())
        .query(&mut redis)
        .expect("BLPOP");
    let nested_pod = said
        .and_then(|(_, entry)| entry.strip_prefix("nested ").map(str::to_string))
        .expect("the nested process never ran");
    let nested_pid = emulator
        .pod_pid(&kube.namespace, &nested_pod)
        .expect("the nested pod's process");
    let pods = kube.pods_api();
    let nested = kube
        .tokio
        .block_on(pods.get(&nested_pod))
        .expect("the nested pod");
    let nested_job = label(&nested.metadata, "job-name").to_string();
    let jobs = kube.jobs_api();
    let nested_job_then = kube
        .tokio
        .block_on(jobs.get(&nested_job))
        .expect("the nested Job");
    let parent_uid = kube
        .tokio
        .block_on(pods.get(&parent_pod))
        .expect("the parent pod")
        .metadata
        .uid
        .expect("a uid");
    let parent_job = kube
        .jobs(&format!("shoal.dev/process={}", parent.get_name()))
        .pop()
        .expect("the parent's Job");
    let worker_runtime = label(&nested_job_then.metadata, "shoal.dev/runtime").to_string();
    assert_ne!(
        worker_runtime,
        label(&parent_job.metadata, "shoal.dev/runtime"),
        "the nested Job is the worker runtime's"
    );
    let worker_secrets = format!("shoal.dev/runtime={worker_runtime}");
    let secrets_then = kube.secrets(&worker_secrets);

    let killed = Instant::now();
    parent.kill().expect("kill");
    assert_eq!(exit_code(&parent), Some(-9));
    let gone = wait(NESTED_GONE_WITHIN, || {
        kube.tokio
            .block_on(jobs.get_opt(&nested_job))
            .expect("get the nested Job")
            .is_none()
            && kube
                .tokio
                .block_on(pods.get_opt(&nested_pod))
                .expect("get the nested pod")
                .is_none()
            && emulator.pod_pid(&kube.namespace, &nested_pod).is_none()
            && !pid_running(nested_pid)
    });
    assert!(
        gone,
        "the nested process runs on for nobody {:?} after its parent's kill(): Job \
         {nested_job} there: {}, pod {nested_pod} {:?}, its process running: {}",
        killed.elapsed(),
        kube.tokio
            .block_on(jobs.get_opt(&nested_job))
            .ok()
            .flatten()
            .is_some(),
        kube.tokio
            .block_on(pods.get_opt(&nested_pod))
            .ok()
            .flatten()
            .map(|p| (phase(&p).to_string(), p.metadata.deletion_timestamp)),
        pid_running(nested_pid),
    );
    println!(
        "measure: the nested process ended and its Job and pod were deleted {:?} after its \
         parent's kill()",
        killed.elapsed()
    );
    assert!(
        wait(patience(), || kube.secrets(&worker_secrets).is_empty()),
        "the worker runtime's authkey Secret stays: {:?}",
        kube.secrets(&worker_secrets)
    );

    // How: the nested Job, and the Secret, named the parent pod as their owner; the driver's
    // own Job names none.
    let owner = json!([{
        "apiVersion": "v1",
        "kind": "Pod",
        "name": parent_pod,
        "uid": parent_uid,
        "controller": false,
        "blockOwnerDeletion": false,
    }]);
    assert_eq!(
        serde_json::to_value(&nested_job_then.metadata.owner_references).expect("json"),
        owner
    );
    assert_eq!(secrets_then.len(), 1, "{secrets_then:?}");
    assert_eq!(
        serde_json::to_value(&secrets_then[0].metadata.owner_references).expect("json"),
        owner
    );
    assert!(parent_job.metadata.owner_references.is_none());
}

// ---------------------------------------------------------------------------------------------
// Against the emulator.

#[test]
fn processes_exit_with_pythons_codes_and_their_output_reaches_the_driver() {
    let Some(driven) = drive(
        "processes_exit_with_pythons_codes_and_their_output_reaches_the_driver",
        Target::Emulator,
        |kube| {
            process_lifecycle(kube);
            // The worker is PID 2 of its pod (the pause process is PID 1: the pods share their
            // PID namespace), whose parent is outside it; it sees the environment the Job gives
            // it, not the driver's.
            let _rt = runtime({
                let mut config = kube.config();
                config
                    .multiprocessing
                    .env_vars
                    .insert("GREETING".into(), "from the config".into());
                config
            });
            let p = Process::new(describe, ("GREETING".to_string(),));
            p.start().expect("start");
            assert_eq!(exit_code(&p), Some(0));
            let q = Process::new(describe, (ROLE.to_string(),));
            q.start().expect("start");
            assert_eq!(exit_code(&q), Some(0));
        },
    ) else {
        return;
    };
    assert!(
        driven.stdout.contains("hello k8s from shoal-process-"),
        "the pod's stdout reaches the driver's stdout"
    );
    assert!(
        driven.stderr.contains("greeting k8s on stderr"),
        "the pod's stderr reaches the driver's stderr"
    );
    assert!(
        driven.stderr.contains("boom from a pod"),
        "a panic's message reaches the driver"
    );
    assert!(
        driven
            .stdout
            .contains("pid=2 ppid=0 GREETING=from the config")
    );
    assert!(
        driven.stdout.contains(&format!("{ROLE}=<unset>")),
        "the driver's environment does not leak into a pod"
    );
}

#[test]
fn terminate_ends_a_pod_with_minus_15_and_kill_with_minus_9() {
    let Some(driven) = drive(
        "terminate_ends_a_pod_with_minus_15_and_kill_with_minus_9",
        Target::Emulator,
        terminate_and_kill,
    ) else {
        return;
    };
    // kill() deletes the pod with grace 0, which (as on a real API server) removes it at once,
    // before its container has ended: the -9 comes from the deletion, not from a final status.
    assert!(
        driven
            .stderr
            .contains("ended: its pod was deleted, exit code -9"),
        "kill()'s -9 comes from the pod's deletion"
    );
}

#[test]
fn a_pool_map_completes_exactly_once_when_a_worker_pod_is_sigkilled() {
    drive(
        "a_pool_map_completes_exactly_once_when_a_worker_pod_is_sigkilled",
        Target::Emulator,
        pool_survives_a_killed_worker,
    );
}

#[test]
fn an_actor_survives_its_host_pod_being_sigkilled() {
    drive(
        "an_actor_survives_its_host_pod_being_sigkilled",
        Target::Emulator,
        actor_survives_a_killed_host_pod,
    );
}

#[test]
fn a_worker_that_sigkills_itself_ends_as_a_local_one_would() {
    let Some(driven) = drive(
        "a_worker_that_sigkills_itself_ends_as_a_local_one_would",
        Target::Emulator,
        workers_that_sigkill_themselves,
    ) else {
        return;
    };
    assert!(
        !driven.stdout.contains("SIGKILL did nothing"),
        "a worker survived its own SIGKILL"
    );
}

#[test]
fn a_program_without_the_function_fails_naming_the_function_and_the_program() {
    let scenario = env!("CARGO_BIN_EXE_scenario");
    let Some(driven) = drive(
        "a_program_without_the_function_fails_naming_the_function_and_the_program",
        Target::Emulator,
        |kube| program_without_the_function(kube, scenario),
    ) else {
        return;
    };
    the_driver_names_the_missing_function(&driven, scenario);
}

#[test]
fn pods_that_cannot_start_are_reported_not_waited_for() {
    let Some(driven) = drive(
        "pods_that_cannot_start_are_reported_not_waited_for",
        Target::Emulator,
        |kube| unstartable_pods(kube, true),
    ) else {
        return;
    };
    driven.assert_logged(
        &[
            "cannot start yet: ErrImagePull",
            "registry.invalid/shoal/none:1",
            "cannot start yet: CreateContainerConfigError",
            "shoal-test-no-such-secret",
            "StartError",
            "/nonexistent/shoal-worker",
            "cannot start: InvalidImageName",
            "Shoal-Invalid-Image-Name:1",
        ],
        "the driver's log says why a pod cannot start",
    );
}

#[test]
fn pods_the_cluster_refuses_to_create_end_their_process_after_the_grace() {
    let Some(driven) = drive(
        "pods_the_cluster_refuses_to_create_end_their_process_after_the_grace",
        Target::Emulator,
        |kube| {
            refused_pods(kube);
            refused_then_admitted(kube);
        },
    ) else {
        return;
    };
    driven.assert_logged(
        &[
            "cannot start: FailedCreate: Error creating: pods",
            &format!("serviceaccount \"{NO_SUCH_ACCOUNT}\" not found"),
        ],
        "the driver's log says why the pod is refused",
    );
}

#[test]
fn failures_to_start_that_clear_within_the_grace_let_the_process_run() {
    let Some(driven) = drive(
        "failures_to_start_that_clear_within_the_grace_let_the_process_run",
        Target::Emulator,
        transient_start_failures,
    ) else {
        return;
    };
    driven.assert_logged(
        &[
            "cannot start yet: ErrImagePull",
            "429 Too Many Requests",
            "cannot start yet: CreateContainerConfigError",
        ],
        "the driver's log says what the kubelet retries",
    );
}

#[test]
fn a_pod_that_cannot_be_scheduled_ends_its_process_after_the_start_timeout() {
    let Some(driven) = drive(
        "a_pod_that_cannot_be_scheduled_ends_its_process_after_the_start_timeout",
        Target::Emulator,
        unschedulable_pods,
    ) else {
        return;
    };
    let unschedulable = "Unschedulable: 0/1 nodes are available: 1 node(s) didn't match Pod's \
                         node affinity/selector";
    for said in [
        format!("cannot be scheduled yet: {unschedulable}"),
        format!("did not start within 3s: PodScheduled=False: {unschedulable}"),
    ] {
        assert!(
            driven.stderr.contains(&said),
            "the driver's log says why the pod never started ({said})"
        );
    }
}

#[test]
fn api_calls_left_unanswered_fail_after_the_timeout_instead_of_blocking() {
    let Some(driven) = drive(
        "api_calls_left_unanswered_fail_after_the_timeout_instead_of_blocking",
        Target::Emulator,
        unanswered_api_calls,
    ) else {
        return;
    };
    assert!(
        driven
            .stderr
            .contains("deleting this runtime's Jobs (shoal.dev/runtime="),
        "the driver's log names the delete that went unanswered"
    );
}

#[test]
fn a_kill_before_the_pod_is_seen_deletes_the_pod_at_once() {
    drive(
        "a_kill_before_the_pod_is_seen_deletes_the_pod_at_once",
        Target::Emulator,
        stop_before_the_pod_is_seen,
    );
}

#[test]
fn a_worker_that_ran_while_the_pod_watch_lagged_is_not_ended_by_the_start_timeout() {
    drive(
        "a_worker_that_ran_while_the_pod_watch_lagged_is_not_ended_by_the_start_timeout",
        Target::Emulator,
        start_timeout_while_the_watch_lags,
    );
}

#[test]
fn a_kill_whose_deletes_fail_is_retried_and_not_reported_until_it_lands() {
    drive(
        "a_kill_whose_deletes_fail_is_retried_and_not_reported_until_it_lands",
        Target::Emulator,
        kill_while_the_api_server_is_silent,
    );
}

#[test]
fn a_terminate_whose_node_does_not_confirm_the_deletion_force_deletes_the_pod() {
    let Some(driven) = drive(
        "a_terminate_whose_node_does_not_confirm_the_deletion_force_deletes_the_pod",
        Target::Emulator,
        terminate_on_a_node_that_stopped_answering,
    ) else {
        return;
    };
    driven.assert_logged(
        &[
            "its node did not confirm the deletion (a node that stopped answering?); \
             force-deleting it (grace 0)",
            "ended: its pod was force-deleted (its node did not confirm the deletion), exit \
             code -15",
        ],
        "the executor says why it force-deleted the pod and how the worker ended",
    );
}

#[test]
fn a_job_made_although_its_creation_failed_runs_tracked_or_not_at_all() {
    drive(
        "a_job_made_although_its_creation_failed_runs_tracked_or_not_at_all",
        Target::Emulator,
        job_creates_answered_with_errors,
    );
}

#[test]
fn a_job_past_its_deadline_ends_its_process_with_minus_15_and_says_why() {
    let Some(driven) = drive(
        "a_job_past_its_deadline_ends_its_process_with_minus_15_and_says_why",
        Target::Emulator,
        job_deadline,
    ) else {
        return;
    };
    assert!(
        driven.stderr.contains("its Job failed: DeadlineExceeded"),
        "the driver's log says the Job's deadline ended the process"
    );
}

#[test]
fn workers_that_end_while_the_pod_watch_is_cut_off_report_their_recorded_exit() {
    let Some(driven) = drive(
        "workers_that_end_while_the_pod_watch_is_cut_off_report_their_recorded_exit",
        Target::Emulator,
        ends_while_the_watch_is_cut,
    ) else {
        return;
    };
    assert!(
        driven.stderr.contains("the code is unknown"),
        "the driver's log says the -9 of a worker whose end went unseen is a guess"
    );
}

#[test]
fn workers_can_read_the_redis_url_from_a_secret() {
    drive(
        "workers_can_read_the_redis_url_from_a_secret",
        Target::Emulator,
        |kube| {
            // The driver reaches Redis on loopback (as through `kubectl port-forward`); the pods
            // cannot, and read the bridge address from the Secret.
            kube.create_secret("shoal-redis-url", json!({"url": kube.redis_url}));
            let mut config = kube.config();
            config.redis.url = kube.redis.as_ref().map(TestRedis::url);
            config.kubernetes.redis_url_secret = Some(SecretKeyRef {
                name: "shoal-redis-url".into(),
                key: "url".into(),
            });
            let _rt = runtime(config);
            let job = a_process_and_a_map_run(kube);
            let env = serde_json::to_string(&job).expect("json");
            assert!(
                !env.contains(&kube.redis_url),
                "the workers' URL is not written in the Job"
            );
        },
    );
}

/// Runs a `Process` and a pool map on the current runtime, checks both, and returns the
/// Process's Job.
fn a_process_and_a_map_run(kube: &Kube) -> Vec<Job> {
    let p = Process::new(noop, ());
    p.start().expect("start");
    assert_eq!(exit_code(&p), Some(0));
    let pool = Pool::new(2).expect("pool");
    assert_eq!(
        pool.map(square, 0..10u64).expect("map"),
        (0..10u64).map(|x| x * x).collect::<Vec<_>>()
    );
    kube.jobs(&format!("shoal.dev/process={}", p.get_name()))
}

#[test]
fn workers_can_read_the_redis_password_from_a_secret() {
    drive(
        "workers_can_read_the_redis_password_from_a_secret",
        Target::Emulator,
        |kube| {
            // A Redis that wants a password; the Job carries its address, the Secret the
            // password.
            const PASSWORD: &str = "s3cret-for-workers";
            let mut admin = redis::Client::open(kube.redis_url.as_str())
                .and_then(|c| c.get_connection())
                .expect("a connection to the test's Redis");
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("requirepass")
                .arg(PASSWORD)
                .query::<()>(&mut admin)
                .expect("requirepass");
            kube.create_secret("shoal-redis", json!({"password": PASSWORD}));
            let mut config = kube.config();
            let with_password =
                kube.redis_url
                    .replacen("redis://", &format!("redis://:{PASSWORD}@"), 1);
            config.redis.url = Some(with_password);
            config.kubernetes.redis_password_secret = Some(SecretKeyRef {
                name: "shoal-redis".into(),
                key: "password".into(),
            });
            let _rt = runtime(config);
            let job = a_process_and_a_map_run(kube);
            let written = serde_json::to_string(&job).expect("json");
            assert!(
                !written.contains(PASSWORD),
                "the password is not written in the Job"
            );
            assert!(
                written.contains(&kube.redis_url),
                "the address is: {written}"
            );
        },
    );
}

#[test]
fn pods_get_the_authkey_from_a_secret_the_runtime_deletes() {
    drive(
        "pods_get_the_authkey_from_a_secret_the_runtime_deletes",
        Target::Emulator,
        authkey_through_a_secret,
    );
}

#[test]
fn dropping_the_runtime_deletes_its_jobs_and_pods() {
    drive(
        "dropping_the_runtime_deletes_its_jobs_and_pods",
        Target::Emulator,
        drop_deletes_jobs,
    );
}

#[test]
fn a_process_started_in_a_worker_pod_is_deleted_with_that_pod() {
    drive(
        "a_process_started_in_a_worker_pod_is_deleted_with_that_pod",
        Target::Emulator,
        nested_processes_go_with_their_parent_pod,
    );
}

#[test]
fn the_jobs_the_executor_makes_pass_the_api_servers_validation() {
    drive(
        "the_jobs_the_executor_makes_pass_the_api_servers_validation",
        Target::Emulator,
        |kube| {
            // Every field the executor sets, from a configuration that uses all of them.
            let yaml = r#"
kubernetes:
  image_pull_policy: Never
  service_account: default
  resources:
    requests: {cpu: 250m, memory: 64Mi, example.com/widget: "1"}
    limits: {memory: 1Gi, example.com/widget: "1"}
  node_selector: {kubernetes.io/os: linux, disktype: ssd}
  tolerations:
    - {key: spot, operator: Equal, value: "true", effect: NoSchedule}
    - {operator: Exists, effect: NoExecute, toleration_seconds: 60}
  labels: {team: data, example.com/tier: batch}
  annotations: {example.com/note: "anything: at all, even spaces"}
  ttl_seconds_after_finished: 60
  active_deadline_seconds: 600
multiprocessing:
  env_vars: {GREETING: hi, my.setting-1: x}
"#;
            // The emulator's node has `kubernetes.io/os: linux`; the selector wants a disk too.
            kube.emulator().label_node("disktype", "ssd");
            let mut config = Config::from_yaml_str(yaml, "test").expect("config");
            let base = kube.config();
            config.shoal = base.shoal;
            config.redis = base.redis;
            config.kubernetes.image = base.kubernetes.image;
            config.kubernetes.command = base.kubernetes.command;
            let _rt = runtime(config);
            // Names that are not DNS labels or label values become ones.
            let p = Process::new(noop, ()).name("Weird name: ü/1 ☃ ".repeat(4));
            p.start().expect("the API server accepts the Job");
            assert_eq!(exit_code(&p), Some(0));
            let pool = Pool::new(1).expect("pool");
            assert_eq!(pool.map(square, vec![4u64]).expect("map"), vec![16]);

            // And the emulator does check what a real API server checks: a Job like the
            // executor's with each field wrong is refused, naming the field.
            let jobs = kube.jobs_api();
            let base = kube
                .jobs("")
                .into_iter()
                .find(|j| {
                    j.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("shoal.dev/process-name"))
                        == Some(&p.get_name().to_string())
                })
                .expect("the process's Job, its name in an annotation");
            let mut base = serde_json::to_value(&base).expect("json");
            let clean = |v: &mut serde_json::Value| {
                v["metadata"] = json!({"name": "shoal-validation", "labels": {"team": "data"}});
                v["spec"]["selector"] = serde_json::Value::Null;
                if let Some(labels) = v["spec"]["template"]["metadata"]["labels"].as_object_mut() {
                    labels.retain(|k, _| k.starts_with("shoal.dev/") || k == "team");
                }
                v["status"] = serde_json::Value::Null;
            };
            clean(&mut base);
            let container = "/spec/template/spec/containers/0";
            let cases: Vec<(&str, serde_json::Value, &str)> = vec![
                (
                    "/metadata/labels/team",
                    json!("data science"),
                    "metadata.labels",
                ),
                (
                    "/spec/template/metadata/labels/shoal.dev~1process",
                    json!("Process-1:2"),
                    "spec.template.metadata.labels",
                ),
                ("/metadata/name", json!("Shoal_Job"), "metadata.name"),
                (
                    "/spec/template/spec/restartPolicy",
                    json!("Always"),
                    "spec.template.spec.restartPolicy",
                ),
                (
                    &format!("{container}/name"),
                    json!("Worker"),
                    "containers[0].name",
                ),
                (
                    &format!("{container}/env/0/name"),
                    json!("SHOAL=TASK"),
                    "containers[0].env[0].name",
                ),
                (
                    &format!("{container}/resources/requests/cpu"),
                    json!("250 m"),
                    "containers[0].resources.requests[cpu]",
                ),
                (
                    &format!("{container}/resources/requests/memory"),
                    json!("2Gi"),
                    "containers[0].resources.requests[memory]",
                ),
                (
                    &format!("{container}/imagePullPolicy"),
                    json!("Sometimes"),
                    "containers[0].imagePullPolicy",
                ),
            ]
            .into_iter()
            .map(|(path, value, field)| (leak(path), value, field))
            .collect();
            for (path, value, field) in cases {
                let mut job = base.clone();
                *job.pointer_mut(path)
                    .unwrap_or_else(|| panic!("{path} not in the Job")) = value;
                let job: Job = serde_json::from_value(job).expect("a Job");
                let refused = kube
                    .tokio
                    .block_on(jobs.create(&PostParams::default(), &job));
                match refused {
                    Err(kube::Error::Api(status)) => {
                        assert_eq!(status.code, 422, "{path}: {status:?}");
                        assert!(status.message.contains(field), "{path}: {}", status.message);
                    }
                    other => panic!("{path}: accepted: {other:?}"),
                }
            }
            // The unchanged copy is accepted (so each refusal above is the field's).
            let job: Job = serde_json::from_value(base).expect("a Job");
            kube.tokio
                .block_on(jobs.create(&PostParams::default(), &job))
                .expect("the executor's Job, renamed, is valid");
            kube.tokio
                .block_on(jobs.delete("shoal-validation", &DeleteParams::background()))
                .expect("delete it");
        },
    );
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

#[test]
fn a_partitioned_worker_host_loses_its_chunks_to_the_others_exactly_once() {
    let Some(driven) = drive(
        "a_partitioned_worker_host_loses_its_chunks_to_the_others_exactly_once",
        Target::Emulator,
        |kube| {
            let mut config = kube.config();
            // A cut worker gives up on Redis after 2 s (then 2 s of retries) instead of 30 s.
            config.redis.response_timeout_secs = 2.0;
            let _rt = runtime(config);
            let lease = Duration::from_millis(1500);
            let pool = Pool::builder()
                .processes(3)
                .task_lease(lease)
                .build()
                .expect("pool");
            let mut starts = Starts::new(kube, "partition");
            let result = pool
                .starmap_async_with(
                    recorded_square,
                    starts.args(0..60, 100),
                    AsyncOptions::new().chunksize(1),
                )
                .expect("map");
            let victim = starts.fresh_start(3);
            assert!(kube.emulator().cut_pod(&kube.namespace, &victim.pod), "cut");
            let cut_at = now_ms();
            // Its chunk goes to another worker once its lease lapses.
            let mut rerun = None;
            let redelivered = wait(patience(), || {
                rerun = starts.rerun(victim.item, cut_at, &victim.pod);
                rerun.is_some()
            });
            assert!(
                redelivered,
                "item {} of the cut pod {} never ran elsewhere: {:?}",
                victim.item,
                victim.pod,
                starts.all()
            );
            let rerun = rerun.unwrap_or_default();
            assert!(
                rerun.at_ms - cut_at >= lease.as_millis() as u64,
                "redelivered before the lease lapsed: {rerun:?}, cut at {cut_at}"
            );
            println!(
                "partition: item {} redelivered {} ms after the cut (lease {lease:?})",
                victim.item,
                rerun.at_ms - cut_at
            );
            // The cut worker may still hold its outcome: let it through now, while the map runs.
            kube.emulator().restore_pod(&kube.namespace, &victim.pod);
            let results = result.get(Some(patience())).expect("the map completes");
            assert_eq!(
                results,
                (0..60u64).map(|x| x * x).collect::<Vec<_>>(),
                "every result once, in order"
            );
            // The pool goes on working, and no late outcome of the first map leaks into this one.
            assert_eq!(
                pool.starmap(slow_square, (0..30u64).map(|x| (x, 20u64)))
                    .expect("the pool still works"),
                (0..30u64).map(|x| x * x).collect::<Vec<_>>()
            );
        },
    ) else {
        return;
    };
    // Only the cut worker lost its lease: the others kept reaching Redis throughout (they did
    // not while hosts coming and going changed the bridge's MAC address).
    assert_eq!(
        driven.stderr.matches("stopped renewing its lease").count(),
        1,
        "one worker lost its lease"
    );
}

/// `INFO commandstats` of the Redis at `url`: command → calls.
fn command_counts(redis: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(redis)
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
        .collect()
}

fn reset_counts(redis: &mut redis::Connection) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(redis)
        .expect("CONFIG RESETSTAT");
}

/// Commands per unit (`counts / units`), formatted.
fn per_unit(counts: &BTreeMap<String, u64>, units: u64) -> String {
    counts
        .iter()
        .map(|(name, calls)| format!("{name}={:.2}", *calls as f64 / units as f64))
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Commands whose count depends on time, not on the work: the parent's output reader polls with
/// `XREAD BLOCK 100 ms` while a child runs, pool workers block in `XREADGROUP` for 500 ms at a
/// time and renew leases on a timer, the supervisor refreshes the driver's liveness key.
const POLLING: &[&str] = &[
    "xread",
    "xreadgroup",
    "xclaim",
    "xpending",
    "set",
    "hset",
    "pexpire",
];

#[test]
fn measurements_claim_latency_redis_commands_and_redelivery() {
    drive(
        "measurements_claim_latency_redis_commands_and_redelivery",
        Target::Emulator,
        |kube| {
            let mut redis = kube.redis();

            // The container starting (the kubelet's clock; the pod is Running from then) to the
            // worker's claim (`started_ms` in its status hash).
            let rt = runtime(kube.config());
            let mut latencies = Vec::new();
            for _ in 0..5 {
                let p = Process::new(sleeps, (400u64,));
                p.start().expect("start");
                let pod = kube.running_pod(p.get_name());
                let claimed = kube.claimed(p.get_name());
                let running = kube
                    .emulator()
                    .pod_running_since(&kube.namespace, &pod)
                    .expect("the pod ran");
                let running_ms = running
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                assert!(claimed >= running_ms, "claimed before the pod ran");
                latencies.push(claimed - running_ms);
                assert_eq!(exit_code(&p), Some(0));
            }
            println!(
                "measure: container start -> task claimed: {latencies:?} ms, median {} ms",
                median(latencies.clone())
            );
            drop(rt);

            // Redis commands per Process lifecycle and per map chunk, Kubernetes vs local (both
            // streaming output, which a remote backend always does).
            const PROCESSES: u64 = 10;
            const CHUNKS: u64 = 100;
            let mut lifecycle = BTreeMap::new();
            let mut chunks = BTreeMap::new();
            for backend in [Backend::Kubernetes, Backend::Local] {
                let mut config = kube.config();
                config.shoal.backend = backend;
                config.multiprocessing.stream_stdout = true;
                let rt = runtime(config);
                let warm = Process::new(noop, ());
                warm.start().expect("start");
                assert_eq!(exit_code(&warm), Some(0));
                std::thread::sleep(Duration::from_millis(300));
                reset_counts(&mut redis);
                for _ in 0..PROCESSES {
                    let p = Process::new(noop, ());
                    p.start().expect("start");
                    assert_eq!(exit_code(&p), Some(0));
                }
                // The parent deletes a finished process's keys off the caller's path.
                std::thread::sleep(Duration::from_millis(300));
                lifecycle.insert(format!("{backend:?}"), command_counts(&mut redis));

                let pool = Pool::new(2).expect("pool");
                pool.starmap(slow_square, (0..4u64).map(|x| (x, 2u64)))
                    .expect("warm-up map");
                reset_counts(&mut redis);
                let squares = pool
                    .starmap_with(slow_square, (0..CHUNKS).map(|x| (x, 2u64)), 1)
                    .expect("map");
                assert_eq!(squares.len() as u64, CHUNKS);
                chunks.insert(format!("{backend:?}"), command_counts(&mut redis));
                drop(pool);
                drop(rt);
            }
            for (backend, counts) in &lifecycle {
                println!(
                    "measure: per Process lifecycle on {backend}: {}",
                    per_unit(counts, PROCESSES)
                );
            }
            for (backend, counts) in &chunks {
                println!(
                    "measure: per map chunk on {backend}: {}",
                    per_unit(counts, CHUNKS)
                );
            }
            // The backend moves no data: apart from polling, the same commands, as often.
            let data = |counts: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
                counts
                    .iter()
                    .filter(|(name, _)| !POLLING.contains(&name.as_str()))
                    .map(|(n, c)| (n.clone(), *c))
                    .collect()
            };
            assert_eq!(
                data(&lifecycle["Kubernetes"]),
                data(&lifecycle["Local"]),
                "commands per process lifecycle"
            );
            // A chunk of one 2 ms item: fed (XADD), answered (XADD), acknowledged (XACK), one
            // chunk per read, never deleted one by one (the supervisor trims the acknowledged
            // prefix of the stream with XTRIM); the rest is polling and heartbeats.
            let per_chunk = |counts: &BTreeMap<String, u64>| -> Vec<u64> {
                ["xadd", "xack", "xdel"]
                    .iter()
                    .map(|name| counts.get(*name).copied().unwrap_or(0))
                    .collect()
            };
            assert_eq!(
                per_chunk(&chunks["Kubernetes"]),
                vec![2 * CHUNKS, CHUNKS, 0]
            );
            assert_eq!(per_chunk(&chunks["Local"]), vec![2 * CHUNKS, CHUNKS, 0]);

            // SIGKILL of a worker pod to its chunk running again on an idle worker.
            let _rt = runtime(kube.config());
            let pool = Pool::new(3).expect("pool");
            let mut redeliveries = Vec::new();
            for round in 0..3u64 {
                let mut starts = Starts::new(kube, &format!("redelivery-{round}"));
                let result = pool
                    .starmap_async_with(
                        recorded_square,
                        starts.args(0..2, 1500),
                        AsyncOptions::new().chunksize(1),
                    )
                    .expect("map");
                // Both items run (each for 1.5 s), the third worker waits in XREADGROUP.
                let victim = starts.at_least(2).remove(0);
                std::thread::sleep(Duration::from_millis(200));
                kube.kill_pod(&victim.pod);
                let killed_at = now_ms();
                let mut rerun = None;
                wait(patience(), || {
                    rerun = starts.rerun(victim.item, killed_at, &victim.pod);
                    rerun.is_some()
                });
                let rerun = rerun.expect("the killed pod's chunk ran again");
                redeliveries.push(rerun.at_ms - killed_at);
                assert_eq!(result.get(Some(patience())).expect("map"), vec![0, 1]);
            }
            println!(
                "measure: worker pod SIGKILL -> its chunk running on an idle worker: \
                 {redeliveries:?} ms, median {} ms",
                median(redeliveries.clone())
            );
        },
    );
}

#[test]
fn the_readme_examples_run_unchanged_on_the_cluster() {
    // What the README's "Run on Kubernetes" does: the unchanged `process`, `pool` and
    // `fault_tolerant_map` programs, configured by environment variables only, as drivers
    // whose every Process and Pool worker is a pod running the same program.
    drive(
        "the_readme_examples_run_unchanged_on_the_cluster",
        Target::Emulator,
        |kube| {
            for (program, expected) in [
                (env!("CARGO_BIN_EXE_example-process"), "hello bob"),
                (env!("CARGO_BIN_EXE_example-pool"), "[2, 4, 6, 8]"),
                (
                    env!("CARGO_BIN_EXE_example-fault-tolerant-map"),
                    "each present exactly once, in order",
                ),
            ] {
                let pods_before = kube.emulator().pods_started();
                let out = Command::new(program)
                    .env("SHOAL_BACKEND", "kubernetes")
                    .env("SHOAL_NAMESPACE", &kube.keys)
                    .env("SHOAL_REDIS_URL", &kube.redis_url)
                    .env("SHOAL_KUBERNETES_IMAGE", &kube.image)
                    .env("SHOAL_KUBERNETES_COMMAND", program)
                    .env_remove(ROLE)
                    .env_remove(TARGET)
                    .stdin(Stdio::null())
                    .output()
                    .expect("the example runs");
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success() && stdout.contains(expected),
                    "{program}: {}\nstdout: {stdout}\nstderr: {stderr}",
                    out.status
                );
                // Its workers were pods.
                let pods = kube.emulator().pods_started() - pods_before;
                assert!(pods > 0, "{program} ran no pod\nstdout: {stdout}");
                if stdout.contains("fault_tolerant_map") {
                    // Its two killed workers really died (a pod's PID 1 would survive its own
                    // SIGKILL) and were replaced: two pods more than its pool's two.
                    assert!(pods >= 4, "{pods} pods\nstdout: {stdout}");
                }
            }
        },
    );
}

#[test]
fn a_pool_tasks_output_reaches_the_driver() {
    let Some(driven) = drive(
        "a_pool_tasks_output_reaches_the_driver",
        Target::Emulator,
        |kube| {
            let _rt = runtime(kube.config());
            let pool = Pool::new(1).expect("pool");
            assert_eq!(pool.map(loud, 0..3u64).expect("map"), vec![0, 1, 2]);
            let pods: Vec<String> = kube
                .pods("shoal.dev/process=PoolWorker-1")
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect();
            assert_eq!(pods.len(), 1, "{pods:?}");
            pool.close().expect("close");
            pool.join().expect("join");
            // The supervisor printed the worker's output stream here, as Python's pool workers
            // print on the terminal they share with their parent; the pod's log keeps none of
            // it.
            let log = kube
                .emulator()
                .pod_log(&kube.namespace, &pods[0])
                .unwrap_or_default();
            assert!(!log.contains("speaking"), "log: {log}");
        },
    ) else {
        return;
    };
    for x in 0..3 {
        assert!(
            driven.stdout.contains(&format!("pool task {x} speaking")),
            "stdout: {}",
            driven.stdout
        );
    }
}

#[test]
fn an_oom_killed_pod_ends_its_process_with_minus_9_and_says_so() {
    let Some(driven) = drive(
        "an_oom_killed_pod_ends_its_process_with_minus_9_and_says_so",
        Target::Emulator,
        |kube| {
            let mut config = kube.config();
            config.kubernetes.annotations.insert(
                shoal_integration_tests::kube_emulator::OOM_KILL_AFTER_MS.into(),
                "300".into(),
            );
            let _rt = runtime(config);
            let p = Process::new(sleeps, (60_000u64,));
            p.start().expect("start");
            assert_eq!(exit_code(&p), Some(-9));
        },
    ) else {
        return;
    };
    assert!(
        driven.stderr.contains("OOMKilled"),
        "the driver's log says why"
    );
}

/// Runs `scenario <args>` as a driver program on the Kubernetes backend of `kube` (another
/// program, a user's `main`, so that it can be killed while this one watches its pods), waits
/// until it says `ready` and two of its pods run, SIGKILLs it and asserts that every pod then
/// ends with 76 (its driver is gone) within the patience.
fn pods_exit_when_their_driver_is_killed(kube: &Kube, args: &[&str], what: &str) {
    let scenario = env!("CARGO_BIN_EXE_scenario");
    let mut driver = Command::new(scenario)
        .args(args)
        .env("SHOAL_BACKEND", "kubernetes")
        .env("SHOAL_NAMESPACE", &kube.keys)
        .env("SHOAL_REDIS_URL", &kube.redis_url)
        .env("SHOAL_KUBERNETES_IMAGE", &kube.image)
        .env("SHOAL_KUBERNETES_COMMAND", scenario)
        .env_remove(ROLE)
        .env_remove(TARGET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the scenario driver starts");
    let stdout = driver.stdout.take().expect("stdout");
    let ready = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "ready")
    });
    assert!(ready.join().unwrap_or(false), "the driver never got ready");
    let mut pids = Vec::new();
    let running = wait(patience(), || {
        pids = kube
            .pods("")
            .iter()
            .filter(|p| phase(p) == "Running")
            .filter_map(|p| p.metadata.name.clone())
            .filter_map(|name| kube.emulator().pod_pid(&kube.namespace, &name))
            .collect();
        pids.len() == 2
    });
    assert!(running, "two {what} pods never ran: {:?}", kube.pods(""));
    driver.kill().expect("SIGKILL the driver");
    let killed = Instant::now();
    let _ = driver.wait();
    // Their 60 s tasks notwithstanding, they see the driver's liveness key lapse and exit 76.
    let gone = wait(patience(), || {
        kube.pods("")
            .iter()
            .all(|p| matches!(phase(p), "Failed" | "Succeeded"))
    });
    let pods = kube.pods("");
    assert!(gone, "{what} pods run on for nobody: {pods:?}");
    println!(
        "measure: {what} pods ended {:?} after their driver's SIGKILL",
        killed.elapsed()
    );
    for pod in &pods {
        let code = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        assert_eq!(
            code,
            Some(76),
            "a {what} whose driver is gone exits with 76"
        );
    }
}

#[test]
fn pool_worker_pods_exit_when_their_driver_is_killed() {
    drive(
        "pool_worker_pods_exit_when_their_driver_is_killed",
        Target::Emulator,
        |kube| pods_exit_when_their_driver_is_killed(kube, &["pool-sleep", "2"], "pool worker"),
    );
}

/// A `Process` pod, daemon or not, does not outlive its driver either (locally the
/// parent-death signal ends it; a pod watches the runtime's liveness key).
#[test]
fn process_pods_exit_when_their_driver_is_killed() {
    drive(
        "process_pods_exit_when_their_driver_is_killed",
        Target::Emulator,
        |kube| pods_exit_when_their_driver_is_killed(kube, &["process-sleep"], "process"),
    );
}

#[test]
fn init_refuses_a_store_the_workers_cannot_reach_naming_the_key() {
    // No cluster needed: the configuration is refused before the executor starts.
    let base = || {
        let mut config = Config::default();
        config.shoal.backend = Backend::Kubernetes;
        config.kubernetes.image = Some("registry.example.com/app:1".into());
        config
    };
    for url in [
        "unix:///tmp/redis.sock",
        "redis://127.0.0.1:6379",
        "redis://localhost:6379",
    ] {
        let mut config = base();
        config.redis.url = Some(url.into());
        match shoal::init_with(config) {
            Err(Error::Config { key, reason, .. }) => {
                assert_eq!(key, "redis.url", "{url}: {reason}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    let mut no_image = base();
    no_image.redis.url = Some("redis://10.0.0.5:6379".into());
    no_image.kubernetes.image = None;
    match shoal::init_with(no_image) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "kubernetes.image"),
        other => panic!("without an image: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Against a real cluster (`make test-kubernetes`).

/// The real-cluster tests below, as `make test-kubernetes` runs them (`--ignored`, with
/// `KUBECONFIG`, `SHOAL_TEST_IMAGE`, `SHOAL_TEST_REDIS_URL`, here also
/// `SHOAL_TEST_WORKER_REDIS_URL` through a Secret, `SHOAL_TEST_COMMAND` and
/// `SHOAL_TEST_OTHER_COMMAND`), against an
/// emulator standing in for the cluster: so their harness is known to work before anyone has a
/// cluster to run them on. Its pods run in this machine's network.
#[test]
fn the_real_cluster_tests_pass_against_an_emulator_standing_in_for_the_cluster() {
    let redis = TestRedis::tcp();
    let emulator = Emulator::start(None);
    let dir = tempfile::tempdir().expect("a directory for the kubeconfig");
    let kubeconfig = dir.path().join("kubeconfig");
    emulator
        .write_kubeconfig(&kubeconfig)
        .expect("the emulator's kubeconfig");
    let program = std::env::current_exe().expect("this test binary");
    let output = Command::new(&program)
        .args(["--ignored", "--test-threads=1", "--nocapture", "cluster_"])
        .env("KUBECONFIG", &kubeconfig)
        .env(
            "SHOAL_TEST_IMAGE",
            "registry.example.com/shoal-kubernetes-tests:1",
        )
        .env("SHOAL_TEST_REDIS_URL", redis.url())
        .env("SHOAL_TEST_WORKER_REDIS_URL", redis.url())
        .env("SHOAL_TEST_COMMAND", &program)
        .env("SHOAL_TEST_OTHER_COMMAND", env!("CARGO_BIN_EXE_scenario"))
        .env_remove(ROLE)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .expect("the real-cluster tests run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the real-cluster tests failed");
    // Every `cluster_` test of this file, as scripts/test-kubernetes.sh selects them.
    let cluster_tests = include_str!("kubernetes.rs")
        .lines()
        .filter(|line| line.starts_with("fn cluster_") && line.ends_with("() {"))
        .count();
    assert!(
        stdout.contains(&format!("test result: ok. {cluster_tests} passed")),
        "all {cluster_tests} real-cluster tests ran"
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_processes_exit_with_pythons_codes() {
    let Some(driven) = drive(
        "cluster_processes_exit_with_pythons_codes",
        Target::Cluster,
        process_lifecycle,
    ) else {
        return;
    };
    assert!(driven.stdout.contains("hello k8s from shoal-process-"));
    assert!(driven.stderr.contains("boom from a pod"));
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_an_actor_survives_its_host_pod_being_killed() {
    drive(
        "cluster_an_actor_survives_its_host_pod_being_killed",
        Target::Cluster,
        actor_survives_a_killed_host_pod,
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_terminate_and_kill() {
    drive(
        "cluster_terminate_and_kill",
        Target::Cluster,
        terminate_and_kill,
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_pool_map_survives_a_killed_worker_pod() {
    drive(
        "cluster_pool_map_survives_a_killed_worker_pod",
        Target::Cluster,
        pool_survives_a_killed_worker,
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_pods_that_cannot_start_are_reported() {
    drive(
        "cluster_pods_that_cannot_start_are_reported",
        Target::Cluster,
        |kube| unstartable_pods(kube, false),
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_pods_the_cluster_refuses_to_create_end_their_process() {
    let Some(driven) = drive(
        "cluster_pods_the_cluster_refuses_to_create_end_their_process",
        Target::Cluster,
        refused_pods,
    ) else {
        return;
    };
    assert!(
        driven
            .stderr
            .contains(&format!("serviceaccount \"{NO_SUCH_ACCOUNT}\" not found")),
        "the driver's log says why the pod is refused"
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_a_worker_that_sigkills_itself_ends_with_minus_9() {
    drive(
        "cluster_a_worker_that_sigkills_itself_ends_with_minus_9",
        Target::Cluster,
        workers_that_sigkill_themselves,
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_a_program_without_the_function_fails_naming_it() {
    let program = cluster_settings().other_command;
    let Some(driven) = drive(
        "cluster_a_program_without_the_function_fails_naming_it",
        Target::Cluster,
        |kube| program_without_the_function(kube, &program),
    ) else {
        return;
    };
    the_driver_names_the_missing_function(&driven, &program);
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_pods_get_the_authkey_from_a_secret() {
    drive(
        "cluster_pods_get_the_authkey_from_a_secret",
        Target::Cluster,
        authkey_through_a_secret,
    );
}

#[test]
#[ignore = "needs a cluster: make test-kubernetes"]
fn cluster_dropping_the_runtime_deletes_its_jobs() {
    drive(
        "cluster_dropping_the_runtime_deletes_its_jobs",
        Target::Cluster,
        drop_deletes_jobs,
    );
}
