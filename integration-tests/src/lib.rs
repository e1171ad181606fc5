//! Helpers for shoal's integration tests: private `redis-server`s (TCP, ACL, TLS), process
//! checks by pid, and polling; a multi-host fixture ([`netns`]) and a test-only Kubernetes API
//! emulator ([`kube_emulator`]).

pub mod kube_emulator;
pub mod netns;

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` started for one test, on a private loopback port; killed on drop.
pub struct TestRedis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    tls: bool,
    user: Option<(String, String)>,
}

impl TestRedis {
    /// A plain server on 127.0.0.1.
    pub fn tcp() -> TestRedis {
        Self::start(&[], false, None)
    }

    /// A plain server on 127.0.0.1 and also on `addresses` (e.g. a [`netns::Network`]'s
    /// [`host_address`](netns::Network::host_address), so the network's hosts reach it over
    /// TCP), same port everywhere; see [`TestRedis::url_at`].
    pub fn tcp_also_on(addresses: &[IpAddr]) -> TestRedis {
        let mut bind = vec!["--bind".to_string(), "127.0.0.1".to_string()];
        bind.extend(addresses.iter().map(IpAddr::to_string));
        // Without a password, protected mode would refuse clients from non-loopback addresses;
        // these addresses belong to the test's own private network.
        bind.extend(["--protected-mode".to_string(), "no".to_string()]);
        let extra: Vec<&str> = bind.iter().map(String::as_str).collect();
        // A later `--bind` replaces the default one of `start`.
        Self::start(&extra, false, None)
    }

    /// A server whose default user is disabled; `user`/`password` may run every command.
    pub fn with_acl_user(user: &str, password: &str) -> TestRedis {
        let secret = format!(">{password}");
        // redis-server joins the words after --user into one config line.
        Self::start(
            &[
                "--user", user, "on", &secret, "~*", "&*", "+@all", "--user", "default", "off",
            ],
            false,
            Some((user.to_string(), password.to_string())),
        )
    }

    /// A server that only speaks TLS, with a self-signed certificate made by `openssl`.
    pub fn tls() -> TestRedis {
        Self::start(&[], true, None)
    }

    fn start(extra: &[&str], tls: bool, user: Option<(String, String)>) -> TestRedis {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        command.arg("--dir").arg(dir.path());
        if tls {
            make_certificate(dir.path());
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(dir.path().join("cert.pem"))
                .arg("--tls-key-file")
                .arg(dir.path().join("key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(dir.path().join("cert.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            command.args(["--port", &port.to_string()]);
        }
        command.args(extra);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/ensure-redis.sh)");
        let server = TestRedis {
            child,
            port,
            dir,
            tls,
            user,
        };
        assert!(
            wait_for(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "redis-server did not listen on {port}"
        );
        server
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = match &self.user {
            Some((user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        };
        let fragment = if self.tls { "/#insecure" } else { "" };
        format!("{scheme}://{auth}127.0.0.1:{}{fragment}", self.port)
    }

    /// The URL a client reaching the server at `address` uses (one of the addresses given to
    /// [`TestRedis::tcp_also_on`]; [`TestRedis::url`] is the one for 127.0.0.1).
    pub fn url_at(&self, address: IpAddr) -> String {
        self.url().replacen("127.0.0.1", &address.to_string(), 1)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server now (Redis "going away").
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a plain server again on the same port (an empty one: nothing is persisted), after
    /// [`TestRedis::kill`].
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--port", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server restarts");
        self.child = child;
        let port = self.port;
        assert!(
            wait_for(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "redis-server did not listen again on {port}"
        );
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn make_certificate(dir: &Path) {
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req failed");
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// True while `pid` is a live (not zombie) process.
pub fn pid_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Pauses the writes of the Redis at `url` for `ms` (`CLIENT PAUSE <ms> WRITE`, as a failover
/// does): every write and script waits for the end of the pause, and one whose connection
/// closes meanwhile is never run.
pub fn pause_writes(url: &str, ms: u64) {
    let mut admin = redis::Client::open(url)
        .expect("client")
        .get_connection()
        .expect("connection");
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query::<()>(&mut admin)
        .expect("CLIENT PAUSE");
}

/// A plain connection to the Redis of `rt`, to look at (and break) what the runtime stored.
pub fn raw_redis(rt: &shoal::Runtime) -> redis::Connection {
    let url = rt.config().redis.url.clone().expect("url");
    redis::Client::open(url)
        .expect("client")
        .get_connection()
        .expect("connection")
}

/// The Redis key prefix (`shoal:{<ns>:queue:<id>}:`) of the queue whose `Debug` text is `debug`
/// (it shows the id's first characters), found with `KEYS` on `conn`.
pub fn queue_key_prefix(conn: &mut redis::Connection, debug: &str) -> String {
    let short = debug
        .split("queue ")
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .expect("the queue's short id");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("shoal:{{*:queue:{short}*}}:state"))
        .query(conn)
        .expect("keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].trim_end_matches("state").to_string()
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The async form of [`wait_for`]: awaits `condition` every 20 ms until it holds or `timeout`
/// passes (on Tokio's timer: the caller runs under a Tokio runtime).
pub async fn wait_for_async<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh scratch directory.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Reads a file a child wrote, waiting briefly for it to appear.
pub fn read_file(path: impl Into<PathBuf>) -> String {
    let path = path.into();
    wait_for(Duration::from_secs(5), || path.exists());
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parses `key=value` lines printed by the scenario binary.
pub fn field(output: &str, key: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Live children of this process that run this same program (shoal's worker subprocesses; the
/// embedded redis-server is left out).
pub fn child_pids() -> Vec<u32> {
    let exe = std::env::current_exe().ok();
    children_of(std::process::id())
        .into_iter()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok() == exe)
        .collect()
}

/// Live (not zombie) children of `parent`, sorted.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent) && pid_running(*pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The live processes running the program at `exe`.
pub fn pids_running(exe: &Path) -> Vec<u32> {
    let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            pid_running(*pid)
                && std::fs::read_link(format!("/proc/{pid}/exe"))
                    .ok()
                    .as_deref()
                    == Some(&exe)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Runs the `scenario` helper binary at `program` with `args` and extra environment, without
/// backtraces (their output would mix with what the tests read).
pub fn scenario(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(program);
    command.args(args).env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("scenario runs")
}

/// Bytes a program printed, as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a wait that started at `started` lasted at least `timeout` and returned within a
/// second after it.
pub fn assert_timing(started: Instant, timeout: Duration) {
    let waited = started.elapsed();
    assert!(
        waited >= timeout,
        "returned after {waited:?}, before the timeout {timeout:?}"
    );
    assert!(
        waited < timeout + Duration::from_secs(1),
        "returned after {waited:?} for {timeout:?}"
    );
}

/// Every value stored in the Redis of `conn` now, whatever its type, as bytes (a stream's
/// entries as their debug text): for tests that check a secret is not in Redis.
pub fn every_value_in_redis(conn: &mut redis::Connection) -> Vec<Vec<u8>> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(conn).expect("keys");
    let mut values = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query(conn).expect("type");
        let found: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(&key).query(conn).unwrap_or_default()],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query(conn)
                .unwrap_or_default(),
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(conn)
                .unwrap_or_default(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query(conn)
                .unwrap_or_default(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(conn)
                .unwrap_or_default(),
            "stream" => {
                let entries: redis::Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query(conn)
                    .expect("xrange");
                vec![format!("{entries:?}").into_bytes()]
            }
            _ => Vec::new(),
        };
        values.extend(found);
    }
    values
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs `f` with a ticker beside it on the same current-thread runtime; returns `f`'s output
/// and the ticks counted while it ran (a blocked thread would count none).
pub fn with_ticker<T>(f: impl std::future::Future<Output = T>) -> (T, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio");
    rt.block_on(async {
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = ticks.clone();
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(std::time::Duration::from_millis(5));
            // A blocked thread must not be made up for by a burst of late ticks.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                interval.tick().await;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let out = f.await;
        ticker.abort();
        (out, ticks.load(std::sync::atomic::Ordering::Relaxed))
    })
}

/// Awaits `f` as [`with_ticker`] does, with the store's process (`redis_pid`) stopped
/// (`SIGSTOP`) for `frozen` from the start, and checks that `f` left the thread free: it waited
/// for the store (half of `frozen` at least, else the test cannot tell) and the ticker counted
/// at least one tick per 20 ms of it (every 5 ms when free; a call that blocked the thread on
/// the store counts about one). `f` is first polled once the store is stopped: make the call
/// in an `async` block, so that its synchronous part meets the frozen store too. Returns `f`'s
/// output.
pub fn await_with_store_frozen<T>(
    redis_pid: u32,
    frozen: std::time::Duration,
    f: impl std::future::Future<Output = T>,
) -> T {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(redis_pid as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP the store");
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(frozen);
        kill(pid, Signal::SIGCONT)
    });
    let started = std::time::Instant::now();
    let (out, ticks) = with_ticker(f);
    let took = started.elapsed();
    thaw.join().expect("thaw").expect("SIGCONT the store");
    assert!(
        took >= frozen / 2,
        "not frozen long enough to tell: {took:?}"
    );
    let expected = took.as_millis() as u64 / 20;
    assert!(
        ticks >= expected,
        "the thread was blocked: {ticks} ticks in {took:?}"
    );
    out
}

/// Installs a `tracing` subscriber for this test process that keeps what it writes in memory,
/// and returns that buffer (for tests that check what shoal logs). One per process.
pub fn capture_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let captured = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || LogWriter(captured.clone()))
        .init();
    logs
}

/// Appends what the subscriber of [`capture_logs`] writes to its buffer.
struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
