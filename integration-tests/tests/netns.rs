//! The multi-host fixture (`shoal_integration_tests::netns`): hosts in their own network and PID
//! namespaces reach a Redis on the bridge over TCP and nothing else, a cut host is partitioned
//! until restored, and everything is removed on drop (also after a panic, also after a crash).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use shoal_integration_tests::netns::{Host, Network};
use shoal_integration_tests::{TestRedis, free_port, pid_running, text, wait_for};

fn redis_cli(host: &Host, address: IpAddr, port: u16, command: &[&str]) -> (bool, String) {
    let output = host
        .output(
            Command::new("redis-cli")
                .args(["-h", &address.to_string(), "-p", &port.to_string()])
                .args(command),
        )
        .expect("redis-cli runs on the host");
    let printed = format!("{}{}", text(&output.stdout), text(&output.stderr));
    (
        output.status.success() && !printed.contains("refused"),
        printed.trim().to_string(),
    )
}

fn links() -> String {
    text(
        &Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip")
            .stdout,
    )
}

fn namespaces() -> String {
    text(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
}

#[test]
fn two_hosts_reach_redis_on_the_bridge_over_tcp_but_not_each_others_loopback() {
    let network = Network::new();
    let bridge = IpAddr::V4(network.host_address());
    let redis = TestRedis::tcp_also_on(&[bridge]);
    let a = network.host();
    let b = network.host();
    assert_ne!(a.address(), b.address());

    // Each host reaches the Redis on the bridge, from its own address.
    for host in [&a, &b] {
        let (ok, reply) = redis_cli(host, bridge, redis.port(), &["CLIENT", "INFO"]);
        assert!(ok, "{} could not reach redis: {reply}", host.address());
        assert!(
            reply.contains(&format!("addr={}:", host.address())),
            "{reply}"
        );
    }
    // The test itself still reaches it on 127.0.0.1.
    let client = redis::Client::open(redis.url()).expect("url");
    let mut connection = client.get_connection().expect("redis on 127.0.0.1");
    let pong: String = redis::cmd("PING").query(&mut connection).expect("ping");
    assert_eq!(pong, "PONG");
    assert_eq!(
        redis.url_at(bridge),
        format!("redis://{bridge}:{}", redis.port())
    );

    // A host's 127.0.0.1 is its own: the parent's Redis is not there...
    let (ok, reply) = redis_cli(&a, "127.0.0.1".parse().unwrap(), redis.port(), &["PING"]);
    assert!(!ok, "host a reached the parent's loopback: {reply}");

    // ...and a server on host a's loopback is reachable from a only.
    let port = free_port();
    let mut server = a
        .spawn(
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("redis-server on host a");
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || redis_cli(
            &a,
            loopback,
            port,
            &["PING"]
        )
        .0),
        "redis-server on host a's loopback never answered on a"
    );
    let (ok, reply) = redis_cli(&b, loopback, port, &["PING"]);
    assert!(!ok, "host b reached host a's loopback: {reply}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the parent reached host a's loopback"
    );
    server.kill().expect("kill");
    server.wait().expect("reap");

    // Only loopback and eth0, and no route beyond the network's subnet.
    let output = a
        .output(Command::new("ip").args(["-o", "link", "show"]))
        .expect("ip");
    let interfaces: Vec<String> = text(&output.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect();
    assert_eq!(interfaces, ["lo", "eth0"]);
    let output = a
        .output(Command::new("ip").args(["-4", "route", "show"]))
        .expect("ip");
    let routes = text(&output.stdout);
    assert!(!routes.contains("default"), "{routes}");
    assert!(routes.starts_with(&network.subnet()), "{routes}");

    // A program on a host is PID 1 of its own PID namespace: no parent pid to use.
    let output = a
        .output(Command::new("sh").args(["-c", "echo $$ $PPID"]))
        .expect("sh");
    assert_eq!(text(&output.stdout).trim(), "1 0");
}

#[test]
fn a_cut_host_cannot_reach_redis_and_a_restored_one_can() {
    let network = Network::new();
    let redis = TestRedis::tcp_also_on(&[network.host_address().into()]);
    let target = SocketAddr::new(network.host_address().into(), redis.port());
    let host = network.host();
    let connect = |timeout| {
        host.run(move || TcpStream::connect_timeout(&target, timeout))
            .expect("run on the host")
    };
    let ping = |stream: &mut TcpStream, timeout| -> std::io::Result<String> {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };

    // The parent reaches the host: a port nobody listens on is refused.
    let from_parent = SocketAddr::new(host.address().into(), free_port());
    let error = TcpStream::connect_timeout(&from_parent, Duration::from_secs(5))
        .expect_err("nothing listens there");
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");

    // A connection made before the cut.
    let mut open = connect(Duration::from_secs(5)).expect("connects before the cut");
    assert_eq!(
        ping(&mut open, Duration::from_secs(5)).expect("ping"),
        "+PONG\r\n"
    );

    host.cut().expect("cut");
    assert!(host.is_cut());
    // Partitioned, not refused: new connections time out, the open one gets no reply.
    let error = connect(Duration::from_secs(1)).expect_err("connected while cut");
    assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
    let error = ping(&mut open, Duration::from_secs(1)).expect_err("reply while cut");
    assert!(
        matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{error}"
    );
    // Nor does the parent side reach the host: what was refused (no listener) now times out.
    let error = TcpStream::connect_timeout(&from_parent, Duration::from_secs(1))
        .expect_err("nothing listens there");
    assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");

    host.restore().expect("restore");
    assert!(!host.is_cut());
    // The open connection's unanswered PING is retransmitted and answered.
    let mut reply = [0u8; 7];
    open.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    open.read_exact(&mut reply)
        .expect("the reply arrives after the restore");
    assert_eq!(&reply, b"+PONG\r\n");
    let mut fresh = connect(Duration::from_secs(5)).expect("connects after the restore");
    assert_eq!(
        ping(&mut fresh, Duration::from_secs(5)).expect("ping"),
        "+PONG\r\n"
    );
}

#[test]
fn everything_is_removed_on_drop_also_after_a_panic() {
    let network = Network::new();
    let bridge = network.bridge().to_string();
    let host = network.host();
    let other = network.host();
    let names = [host.namespace().to_string(), other.namespace().to_string()];
    let veths = [host.veth().to_string(), other.veth().to_string()];
    let mut sleeper = host
        .spawn(Command::new("sleep").arg("600"))
        .expect("sleep on the host");
    let pid = sleeper.id();
    assert!(links().contains(&format!(" {bridge}:")));
    assert!(names.iter().all(|n| namespaces().contains(n.as_str())));
    assert_eq!(host.pids(), [pid]);

    // A host goes on its own: its process, namespace and veth.
    drop(host);
    assert!(wait_for(Duration::from_secs(5), || !pid_running(pid)));
    let _ = sleeper.wait();
    assert!(!namespaces().contains(names[0].as_str()));
    assert!(!links().contains(&format!(" {}", veths[0])));
    assert!(namespaces().contains(names[1].as_str()));
    // The network's clone keeps it alive; the last handle removes the rest.
    let clone = network.clone();
    drop(network);
    assert!(links().contains(&format!(" {bridge}:")));
    drop(other);
    drop(clone);
    assert!(!links().contains(&format!(" {bridge}:")), "{}", links());
    assert!(!links().contains(&format!(" {}", veths[1])));
    assert!(!namespaces().contains(names[1].as_str()));

    // Unwinding from a panic drops them too.
    let created = std::panic::catch_unwind(|| {
        let network = Network::new();
        let host = network.host();
        let names = (network.bridge().to_string(), host.namespace().to_string());
        std::panic::panic_any(names);
    })
    .expect_err("panicked");
    let (bridge, namespace) = *created.downcast::<(String, String)>().expect("the names");
    assert!(!links().contains(&format!(" {bridge}:")));
    assert!(!namespaces().contains(namespace.as_str()));
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() {
    // Play a crashed test process: hold an index's lock, create a bridge and a namespace with
    // a process in it under that index, then let go of the lock without cleaning up.
    std::fs::create_dir_all("/run/shoal-netns-test").expect("lock dir");
    let (index, lock) = (100..=255u32)
        .map(|i| (i, format!("/run/shoal-netns-test/{i}.lock")))
        .find_map(|(i, path)| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .ok()?;
            Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .ok()
                .map(|lock| (i, lock))
        })
        .expect("a free index");
    let bridge = format!("shoaln{index}br");
    let namespace = format!("shoaln{index}h7");
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().expect("ip");
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["netns", "add", &namespace]);
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &namespace, "sleep", "600"])
        .spawn()
        .expect("sleep in the leftover namespace");
    assert!(wait_for(Duration::from_secs(5), || {
        text(
            &Command::new("ip")
                .args(["netns", "pids", &namespace])
                .output()
                .expect("ip")
                .stdout,
        )
        .contains(&orphan.id().to_string())
    }));
    drop(lock);

    let _network = Network::new();
    assert!(!links().contains(&format!(" {bridge}:")), "{}", links());
    assert!(!namespaces().contains(namespace.as_str()));
    assert!(wait_for(Duration::from_secs(5), || !pid_running(
        orphan.id()
    )));
    let _ = orphan.wait();
}

/// Run by `a_network_without_privileges_fails_with_the_reason` without CAP_NET_ADMIN.
#[test]
#[ignore = "run by a_network_without_privileges_fails_with_the_reason"]
fn network_without_privileges_child() {
    let _network = Network::new();
}

#[test]
fn a_network_without_privileges_fails_with_the_reason() {
    let output = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-net_admin,-sys_admin",
            "--inh-caps",
            "-all",
        ])
        .arg(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "network_without_privileges_child",
            "--ignored",
            "--nocapture",
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("setpriv (util-linux) runs the child test");
    let printed = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(!output.status.success(), "{printed}");
    assert!(
        printed.contains("network namespaces cannot be created here")
            && printed.contains("lacks CAP_NET_ADMIN and CAP_SYS_ADMIN")
            && printed.contains("needs root"),
        "{printed}"
    );
}
