//! The service example (`examples/service.rs`) as a user runs it: an axum server with a Pool.
//! Under 200 concurrent requests its health endpoint keeps answering, a request that times out
//! stops its work, and SIGINT to its process group (a terminal's Ctrl-C) lets the requests in
//! flight finish, then leaves no worker and no redis-server behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal_integration_tests::{children_of, free_port, pid_running, wait_for};

const SERVICE: &str = env!("CARGO_BIN_EXE_service");

struct Service {
    child: Child,
    addr: SocketAddr,
    output: std::sync::mpsc::Receiver<String>,
}

impl Service {
    fn start() -> Service {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut child = Command::new(SERVICE)
            .arg(addr.to_string())
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::piped())
            // Its own process group, as a shell gives a foreground job.
            .process_group(0)
            .spawn()
            .expect("the service starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let service = Service {
            child,
            addr,
            output: rx,
        };
        let line = service
            .output
            .recv_timeout(Duration::from_secs(30))
            .expect("the service prints its address");
        assert!(line.starts_with("listening on"), "{line}");
        service
    }

    fn get(&self, path: &str) -> (u16, String) {
        get(self.addr, path)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    (status, body)
}

fn sum_of_squares(n: u64) -> u64 {
    (0..n).map(|x| x * x).sum()
}

#[test]
fn concurrent_requests_succeed_and_health_keeps_answering() {
    let service = Service::start();
    let addr = service.addr;
    let requests: Vec<_> = (0..200)
        .map(|_| std::thread::spawn(move || get(addr, "/sum-of-squares?n=20&ms=1")))
        .collect();
    let mut health = Vec::new();
    while requests.iter().any(|r| !r.is_finished()) {
        let t = Instant::now();
        assert_eq!(service.get("/health"), (200, "ok".into()));
        health.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    for r in requests {
        assert_eq!(
            r.join().expect("request"),
            (200, sum_of_squares(20).to_string())
        );
    }
    health.sort();
    let p99 = health[(health.len() * 99 / 100).min(health.len() - 1)];
    eprintln!("health over {} probes: p99 {p99:?}", health.len());
    // A blocked async runtime would hold health behind whole maps (hundreds of ms).
    assert!(p99 < Duration::from_millis(100), "health p99 {p99:?}");
}

/// A request for more than the service takes is a 400 saying so, served at once: it neither
/// makes the service hold millions of items nor overflows a sum or a deadline.
#[test]
fn requests_beyond_the_bounds_are_refused() {
    let service = Service::start();
    for path in [
        "/squares?n=4000000",
        "/sum-of-squares?n=10000000000",
        "/sum-of-squares?n=1&ms=18446744073709551615",
    ] {
        let (status, body) = service.get(path);
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("at most"), "{path}: {body}");
    }
    assert_eq!(
        service.get("/sum-of-squares?n=10"),
        (200, sum_of_squares(10).to_string())
    );
}

#[test]
fn a_request_that_times_out_stops_its_work() {
    let service = Service::start();
    let (status, _) = service.get("/sum-of-squares?n=400&ms=100&timeout_ms=300");
    assert_eq!(status, 504);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, at_first) = service.get("/started");
    std::thread::sleep(Duration::from_millis(1000));
    let (_, later) = service.get("/started");
    let (at_first, later): (u64, u64) = (
        at_first.parse().expect("count"),
        later.parse().expect("count"),
    );
    eprintln!("items started: {at_first}, then {later}");
    assert!(
        at_first < 40,
        "{at_first} of 400 items ran after the cancel"
    );
    assert_eq!(at_first, later, "items kept starting after the cancel");
    // The pool serves the next request.
    assert_eq!(
        service.get("/sum-of-squares?n=10"),
        (200, sum_of_squares(10).to_string())
    );
}

#[test]
fn ctrl_c_drains_in_flight_requests_and_leaves_nothing_behind() {
    let mut service = Service::start();
    let addr = service.addr;
    // Every child of the service: its pool workers and its embedded redis-server.
    assert!(wait_for(Duration::from_secs(10), || {
        children_of(service.child.id()).len() >= 5
    }));
    let requests: Vec<_> = (0..10)
        .map(|_| std::thread::spawn(move || get(addr, "/sum-of-squares?n=20&ms=50")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let children = children_of(service.child.id());
    // Ctrl-C in a terminal: SIGINT to the whole foreground process group.
    kill(Pid::from_raw(-(service.child.id() as i32)), Signal::SIGINT).expect("SIGINT");
    for r in requests {
        assert_eq!(
            r.join().expect("request"),
            (200, sum_of_squares(20).to_string()),
            "a request in flight failed"
        );
    }
    let status = service.child.wait().expect("the service exits");
    assert!(status.success(), "{status:?}");
    let lines: Vec<String> = service.output.try_iter().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("stopped: workers and store are gone")),
        "{lines:?}"
    );
    for pid in children {
        assert!(
            wait_for(Duration::from_secs(5), || !pid_running(pid)),
            "child {pid} of the service outlived it"
        );
    }
}
