//! Multi-host fixture: processes that run as if on separate machines, each in a Linux network
//! namespace of its own, all joined by one bridge in this test's ("the parent's") namespace.
//!
//! A [`Network`] is a Linux bridge `shoaln<N>br` holding the address `10.231.<N>.1/24`
//! ([`Network::host_address`]) and a fixed MAC address (so hosts coming and going never change
//! the bridge's, which would leave the other hosts' ARP entries stale): a test binds its servers there (for Redis:
//! [`crate::TestRedis::tcp_also_on`]). Each [`Host`] is a network namespace `shoaln<N>h<M>` with
//! only a loopback and one end of a veth pair (`eth0`, address `10.231.<N>.<M>/24`) whose other
//! end `shoaln<N>v<M>` is a port of the bridge. A host has no default route: it reaches the
//! bridge address and the other hosts of its network, nothing else; its `127.0.0.1` is its
//! own. [`Host::cut`] takes its bridge port down (a partition: packets are dropped, connections
//! hang rather than being refused) and [`Host::restore`] brings it back.
//!
//! Programs started with [`Host::spawn`] (or [`spawn_container`]) also get a PID namespace of
//! their own, as a container's process does: the program is PID 1 there, `getppid()` is 0 and
//! no pid of the parent is visible to it. Like any container's PID 1 it only receives the
//! signals it installed a handler for (SIGKILL always works): a program without a SIGTERM
//! handler ignores `kill -TERM`, exactly as it would as a Kubernetes pod. When it exits, every
//! process it left in its PID namespace is killed. Each program also gets a mount namespace of
//! its own whose `/tmp` is a fresh, empty tmpfs (the rest of the filesystem is the parent's,
//! mounted privately): what the parent or another host keeps under `/tmp` (a Unix socket, a
//! temporary file, the embedded store's directory) is not there, as on another machine, so a
//! program reaches servers over TCP. A
//! [`PidSandbox`] is a pod's shared PID namespace instead: a pause process is its PID 1 and the
//! programs started in it are ordinary processes there, to which signals do what they do
//! outside a container.
//!
//! Naming and collisions: each network takes the lowest free index `N` in 0..=255, where "free"
//! means this process could take the exclusive `flock` on `/run/shoal-netns-test/<N>.lock`
//! (held for the network's life, released by the kernel if the test process dies) and no route
//! or address of this machine overlaps `10.231.<N>.0/24`. Parallel test processes therefore
//! never share an index. Interfaces and namespaces named `shoaln<N>...` whose lock is free are
//! leftovers of a crashed run: they are deleted (with the processes in them) before an index is
//! used, and on every [`Network::new`] for all indexes.
//!
//! Everything a network creates is deleted when it is dropped, also while a test panics: a
//! [`Host`] deletes its namespace and veth (after killing the processes left in it) when it is
//! dropped, and the bridge goes when the last [`Network`] clone and [`Host`] are gone.
//!
//! Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`
//! (`scripts/ensure-netns-tools.sh` installs it). Without them [`Network::new`] panics with a
//! message saying so: a test using this fixture fails, it never passes silently.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Prefix of every interface and namespace this fixture creates.
const PREFIX: &str = "shoaln";
/// Networks use `10.231.<index>.0/24`.
const SUBNET_BASE: [u8; 2] = [10, 231];
/// Where the per-index lock files live (never deleted: deleting a lock file others may have
/// open would break the exclusion).
const LOCK_DIR: &str = "/run/shoal-netns-test";
/// Host numbers (last address byte) a network hands out; `.1` is the bridge.
const FIRST_HOST: u8 = 2;
const LAST_HOST: u8 = 254;

/// Why the fixture could not set something up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// iproute2 is not installed.
    #[error(
        "iproute2's `ip` could not be run (install it with scripts/ensure-netns-tools.sh): {0}"
    )]
    IpMissing(io::Error),
    /// This process may not create namespaces or interfaces.
    #[error(
        "network namespaces cannot be created here: `{command}` failed: {stderr} \
         (the multi-host fixture needs root, i.e. CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    )]
    NotPermitted {
        /// The `ip` command that failed.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// An `ip` command failed for another reason.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The `ip` command that failed.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// Every `10.231.<N>.0/24` is taken by other networks or by this machine's routes.
    #[error(
        "no free subnet in 10.231.0.0/16: 256 networks are in use or overlap this machine's routes"
    )]
    NoFreeSubnet,
    /// Every address of the network's /24 belongs to a live host.
    #[error("all {} host addresses of {subnet} are in use", LAST_HOST - FIRST_HOST + 1)]
    NoFreeAddress {
        /// The network's subnet.
        subnet: String,
    },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

/// A private network of [`Host`]s around a bridge in this namespace; see the module docs.
///
/// Clones share the same network. The bridge is deleted when the last clone and the last of its
/// hosts are dropped.
///
/// ```no_run
/// use shoal_integration_tests::{TestRedis, netns::Network};
/// let network = Network::new();
/// let redis = TestRedis::tcp_also_on(&[network.host_address().into()]);
/// let worker = network.host();
/// let output = worker
///     .output(std::process::Command::new("redis-cli").args([
///         "-h", &network.host_address().to_string(), "-p", &redis.port().to_string(), "ping",
///     ]))
///     .expect("redis-cli runs");
/// assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "PONG");
/// ```
#[derive(Clone)]
pub struct Network {
    inner: Arc<NetworkInner>,
}

struct NetworkInner {
    index: u8,
    bridge: String,
    /// Host numbers in use, and the last one handed out (numbers are handed out round-robin so
    /// a new host does not inherit a just-dropped host's address and stale ARP entries).
    slots: Mutex<Slots>,
    /// Held for the network's life: marks the index as taken.
    _lock: Flock<File>,
}

struct Slots {
    used: BTreeSet<u8>,
    last: u8,
}

impl Network {
    /// Creates a network with its bridge, panicking with the reason when this machine cannot
    /// (not root, no iproute2).
    #[expect(
        clippy::new_without_default,
        reason = "creating a network changes the machine: not something to do by default"
    )]
    pub fn new() -> Network {
        Self::try_new().unwrap_or_else(|e| panic!("cannot create a test network: {e}"))
    }

    /// Creates a network with its bridge.
    pub fn try_new() -> Result<Network, NetnsError> {
        check_capabilities()?;
        remove_all_leftovers()?;
        let start = (std::process::id() % 256) as usize;
        for offset in 0..256 {
            let index = ((start + offset) % 256) as u8;
            let Some(lock) = try_lock(index)? else {
                continue;
            };
            // Ours now: whatever carries this index was left by a process that died.
            remove_leftovers(index)?;
            if subnet_in_use(index)? {
                continue;
            }
            let bridge = format!("{PREFIX}{index}br");
            let inner = NetworkInner {
                index,
                bridge,
                slots: Mutex::new(Slots {
                    used: BTreeSet::new(),
                    last: FIRST_HOST - 1,
                }),
                _lock: lock,
            };
            // From here on, dropping `inner` removes what was created.
            ip(&[
                "link",
                "add",
                &inner.bridge,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ])?;
            // A bridge without an address of its own takes the lowest of its ports' and changes
            // it as hosts come and go: every other host's ARP entry for the bridge (where
            // Redis is) would go stale and its traffic stall for seconds. A fixed one never
            // changes.
            ip(&["link", "set", &inner.bridge, "address", &inner.mac()])?;
            let address = format!("{}/24", inner.address(1));
            ip(&["addr", "add", &address, "dev", &inner.bridge])?;
            ip(&["link", "set", &inner.bridge, "up"])?;
            tracing::debug!(bridge = %inner.bridge, %address, "test network created");
            return Ok(Network {
                inner: Arc::new(inner),
            });
        }
        Err(NetnsError::NoFreeSubnet)
    }

    /// The bridge's address, in this (the parent) namespace: servers the hosts must reach bind
    /// here (as well as on 127.0.0.1 for the test itself).
    pub fn host_address(&self) -> Ipv4Addr {
        self.inner.address(1)
    }

    /// The network's subnet, `10.231.<N>.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}/24", self.inner.address(0))
    }

    /// The bridge interface's name.
    pub fn bridge(&self) -> &str {
        &self.inner.bridge
    }

    /// A new host (namespace, veth, address), panicking when it cannot be created.
    pub fn host(&self) -> Host {
        self.try_host()
            .unwrap_or_else(|e| panic!("cannot create a test host: {e}"))
    }

    /// A new host: a namespace with a loopback and `eth0` on the bridge.
    pub fn try_host(&self) -> Result<Host, NetnsError> {
        let number = self.inner.take_slot()?;
        let index = self.inner.index;
        let host = Host {
            network: Arc::clone(&self.inner),
            number,
            namespace: format!("{PREFIX}{index}h{number}"),
            veth: format!("{PREFIX}{index}v{number}"),
            address: self.inner.address(number),
            cut: AtomicBool::new(false),
        };
        // On error, dropping `host` deletes what was made and frees the slot.
        let peer = format!("{PREFIX}{index}p{number}");
        let address = format!("{}/24", host.address);
        ip(&["netns", "add", &host.namespace])?;
        ip(&[
            "link",
            "add",
            &host.veth,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &host.namespace,
        ])?;
        ip(&[
            "link",
            "set",
            &host.veth,
            "master",
            &self.inner.bridge,
            "up",
        ])?;
        let inside = ["-n", host.namespace.as_str()];
        ip(&[&inside[..], &["link", "set", &peer, "name", "eth0"]].concat())?;
        ip(&[&inside[..], &["addr", "add", &address, "dev", "eth0"]].concat())?;
        ip(&[&inside[..], &["link", "set", "eth0", "up"]].concat())?;
        ip(&[&inside[..], &["link", "set", "lo", "up"]].concat())?;
        tracing::debug!(namespace = %host.namespace, %address, "test host created");
        Ok(host)
    }
}

impl NetworkInner {
    fn address(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], self.index, last)
    }

    /// The bridge's MAC address: locally administered (`02:...`), one per network index.
    fn mac(&self) -> String {
        format!("02:73:68:6e:{:02x}:01", self.index)
    }

    fn take_slot(&self) -> Result<u8, NetnsError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let (first, count) = (u32::from(FIRST_HOST), u32::from(LAST_HOST - FIRST_HOST + 1));
        for step in 1..=count {
            // `last` starts one below FIRST_HOST, so the first host gets FIRST_HOST.
            let offset = (u32::from(slots.last) + step + count - first) % count;
            let candidate = (first + offset) as u8;
            if slots.used.insert(candidate) {
                slots.last = candidate;
                return Ok(candidate);
            }
        }
        Err(NetnsError::NoFreeAddress {
            subnet: format!("{}/24", self.address(0)),
        })
    }

    fn release_slot(&self, number: u8) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.used.remove(&number);
    }
}

impl Drop for NetworkInner {
    fn drop(&mut self) {
        // Hosts are gone (they hold this inner); this also removes anything a failed setup left.
        if let Err(e) = remove_leftovers(self.index) {
            tracing::warn!(bridge = %self.bridge, "removing the test network failed: {e}");
        }
    }
}

/// One "machine" of a [`Network`]: a network namespace whose only interfaces are its loopback
/// and `eth0` on the network's bridge. Dropping it kills the processes left in it and deletes
/// its namespace and veth.
pub struct Host {
    network: Arc<NetworkInner>,
    number: u8,
    namespace: String,
    veth: String,
    address: Ipv4Addr,
    cut: AtomicBool,
}

impl Host {
    /// The host's address on the network (its `eth0`).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The network namespace's name (as `ip netns` lists it).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The parent-side end of the host's veth pair (the bridge port [`Host::cut`] takes down).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// Starts `command` on this host: in its network namespace and in a new PID namespace where
    /// the program is PID 1 (see the module docs for what that means for signals). Everything
    /// else (`stdin`/`stdout`, environment, working directory) is as `command` says.
    pub fn spawn(&self, command: &mut Command) -> io::Result<Child> {
        spawn_container(command, Some(self))
    }

    /// Runs `command` on this host like [`Host::spawn`] and collects its output (stdin is
    /// empty; stdout and stderr are captured).
    pub fn output(&self, command: &mut Command) -> io::Result<Output> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn(command)?.wait_with_output()
    }

    /// Runs `work` on a thread that is inside this host's network namespace (and only there:
    /// no new PID namespace), and returns its result. Sockets it creates belong to the host, so
    /// a test can probe the host's view of the network without starting a program:
    /// `host.run(|| TcpStream::connect_timeout(&addr, timeout))`.
    pub fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> io::Result<R> {
        let namespace = open_namespace(&self.namespace)?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&namespace, CloneFlags::CLONE_NEWNET).map_err(|e| {
                        io::Error::other(format!("setns into {}: {e}", self.namespace))
                    })?;
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the work run on the host panicked")))
        })
    }

    /// Partitions the host from the network: its bridge port goes down, so every packet to or
    /// from it is dropped (connections hang; nothing is refused or reset) until
    /// [`Host::restore`]. Processes on the host keep running.
    pub fn cut(&self) -> Result<(), NetnsError> {
        ip(&["link", "set", &self.veth, "down"])?;
        self.cut.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Ends a [`Host::cut`]: the bridge port comes back up (forwarding at once).
    pub fn restore(&self) -> Result<(), NetnsError> {
        ip(&["link", "set", &self.veth, "up"])?;
        self.cut.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// True between [`Host::cut`] and [`Host::restore`].
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// The (parent-namespace) pids of the processes in this host's network namespace.
    pub fn pids(&self) -> Vec<u32> {
        namespace_pids(&self.namespace)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        kill_namespace_processes(&self.namespace);
        // Deleting one end of a veth pair deletes both, at once (rather than whenever the
        // kernel gets round to destroying the namespace).
        if link_names().contains(&self.veth) {
            let _ = ip(&["link", "del", &self.veth]);
        }
        if namespace_names().contains(&self.namespace) {
            let _ = ip(&["netns", "del", &self.namespace]);
        }
        self.network.release_slot(self.number);
    }
}

/// Starts `command` the way a container runtime starts a container's process: in a new PID
/// namespace (the program is PID 1 there), and in `host`'s network namespace when one is given
/// (else in this one). The returned [`Child`]'s pid is the program's pid in the caller's PID namespace.
pub fn spawn_container(command: &mut Command, host: Option<&Host>) -> io::Result<Child> {
    let namespace = host.map(|h| open_namespace(&h.namespace)).transpose()?;
    // Namespaces are per thread: a short-lived thread enters them and starts the program, which
    // inherits them; the rest of the test process is untouched. A thread may create only one
    // PID namespace's init, hence a new thread per program.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(namespace) = &namespace {
                    nix::sched::setns(namespace, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| io::Error::other(format!("setns(CLONE_NEWNET): {e}")))?;
                }
                nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(|e| {
                    io::Error::other(format!(
                        "unshare(CLONE_NEWPID): {e} (a new PID namespace needs root, CAP_SYS_ADMIN)"
                    ))
                })?;
                private_tmp()?;
                command.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
    })
}

/// A pod's shared PID namespace (`shareProcessNamespace: true`), as a container runtime makes
/// one: its PID 1 is a pause process (`sleep infinity`, which like a pod's pause container does
/// nothing and only ends when killed), and the containers started in it with
/// [`PidSandbox::spawn`] are ordinary processes there (PID 2 and up, `getppid()` 0), to which
/// signals, their own `raise(SIGKILL)` included, do what they do outside a container. Dropping
/// the sandbox kills its PID 1, and with it (the kernel's doing) every process left in the
/// namespace.
#[derive(Debug)]
pub struct PidSandbox {
    pause: Child,
    /// `/proc/<pause>/ns/pid`, open: the namespace to enter.
    namespace: File,
}

impl PidSandbox {
    /// Starts the pause process as PID 1 of a new PID namespace, in `host`'s network namespace
    /// when one is given (else in this one), as [`spawn_container`] starts a program.
    pub fn start(host: Option<&Host>) -> io::Result<PidSandbox> {
        let mut pause = Command::new("sleep");
        pause
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut pause = spawn_container(&mut pause, host)
            .map_err(|e| io::Error::new(e.kind(), format!("the pod's pause process: {e}")))?;
        let path = format!("/proc/{}/ns/pid", pause.id());
        match File::open(&path) {
            Ok(namespace) => Ok(PidSandbox { pause, namespace }),
            Err(e) => {
                let _ = pause.kill();
                let _ = pause.wait();
                Err(io::Error::new(e.kind(), format!("{path}: {e}")))
            }
        }
    }

    /// Starts `command` in this PID namespace (not as its PID 1), in `host`'s network namespace
    /// when one is given. The returned [`Child`]'s pid is the program's pid as the caller sees it
    /// (in the caller's PID namespace, not the sandbox's);
    /// its parent is this process, so it is waited for as any child.
    pub fn spawn(&self, command: &mut Command, host: Option<&Host>) -> io::Result<Child> {
        let network = host.map(|h| open_namespace(&h.namespace)).transpose()?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(network) = &network {
                        nix::sched::setns(network, CloneFlags::CLONE_NEWNET)
                            .map_err(|e| io::Error::other(format!("setns(CLONE_NEWNET): {e}")))?;
                    }
                    // setns(CLONE_NEWPID) moves this thread's future children, not the thread.
                    nix::sched::setns(&self.namespace, CloneFlags::CLONE_NEWPID)
                        .map_err(|e| io::Error::other(format!("setns(CLONE_NEWPID): {e}")))?;
                    private_tmp()?;
                    command.spawn()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
        })
    }

    /// The pause process's pid (in this process's PID namespace).
    pub fn pause_pid(&self) -> u32 {
        self.pause.id()
    }
}

impl Drop for PidSandbox {
    fn drop(&mut self) {
        let _ = self.pause.kill();
        let _ = self.pause.wait();
    }
}

/// Gives the calling thread (and the programs it starts) a mount namespace of its own, every
/// mount private to it, with an empty tmpfs on `/tmp`. Only this thread changes: a thread's
/// mount namespace is its own once it unshared it (with its filesystem context).
fn private_tmp() -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    let fail = |what: &str, e: Errno| io::Error::other(format!("{what}: {e}"));
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| fail("unshare(CLONE_NEWNS) (needs CAP_SYS_ADMIN)", e))?;
    // Nothing mounted here may reach the parent's namespace (systemd makes `/` shared).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail("making / private", e))?;
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(|e| fail("mounting a tmpfs on /tmp", e))
}

fn open_namespace(name: &str) -> io::Result<File> {
    let path = PathBuf::from("/run/netns").join(name);
    File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Runs `ip args...`, returning its stdout.
fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NetnsError::IpMissing(e),
            _ => NetnsError::Io {
                context: format!("running `ip {}`", args.join(" ")),
                source: e,
            },
        })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let command = format!("ip {}", args.join(" "));
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        Err(NetnsError::NotPermitted { command, stderr })
    } else {
        Err(NetnsError::Command { command, stderr })
    }
}

/// Fails with [`NetnsError::NotPermitted`] unless this process has CAP_NET_ADMIN (interfaces,
/// namespaces) and CAP_SYS_ADMIN (mounting namespaces, new PID namespaces).
fn check_capabilities() -> Result<(), NetnsError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| NetnsError::Io {
        context: "reading /proc/self/status".to_string(),
        source,
    })?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(NetnsError::NotPermitted {
        command: "(capability check)".to_string(),
        stderr: format!("this process lacks {}", missing.join(" and ")),
    })
}

/// Tries to take index `index`'s lock without waiting.
fn try_lock(index: u8) -> Result<Option<Flock<File>>, NetnsError> {
    let io_error = |context: String| move |source| NetnsError::Io { context, source };
    std::fs::create_dir_all(LOCK_DIR).map_err(io_error(format!("creating {LOCK_DIR}")))?;
    let path = format!("{LOCK_DIR}/{index}.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(format!("opening {path}")))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(NetnsError::Io {
            context: format!("locking {path}"),
            source: errno.into(),
        }),
    }
}

/// What one of this fixture's names refers to.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    Bridge,
    Veth,
    Namespace,
}

/// Parses `shoaln<index>br`, `shoaln<index>v<n>`, `shoaln<index>p<n>`, `shoaln<index>h<n>`.
fn parse_name(name: &str) -> Option<(u8, Named)> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let index: u8 = rest[..digits].parse().ok()?;
    let suffix = &rest[digits..];
    if suffix == "br" {
        return Some((index, Named::Bridge));
    }
    let (kind, number) = suffix.split_at_checked(1)?;
    number.parse::<u8>().ok()?;
    match kind {
        "v" | "p" => Some((index, Named::Veth)),
        "h" => Some((index, Named::Namespace)),
        _ => None,
    }
}

/// Interface names in this namespace.
fn link_names() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            // "12: shoaln5v2@if3: <BROADCAST,...> ..."
            let name = line.split(": ").nth(1)?;
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .collect()
}

/// Named network namespaces.
fn namespace_names() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

fn namespace_pids(namespace: &str) -> Vec<u32> {
    ip(&["netns", "pids", namespace])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// SIGKILLs every process in `namespace` (never this test process itself).
fn kill_namespace_processes(namespace: &str) {
    let me = std::process::id();
    for pid in namespace_pids(namespace) {
        if pid != me {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Deletes the namespaces (and their processes) and interfaces carrying `index`. The caller
/// holds `index`'s lock.
fn remove_leftovers(index: u8) -> Result<(), NetnsError> {
    let mut bridge = None;
    for name in namespace_names() {
        if parse_name(&name) == Some((index, Named::Namespace)) {
            kill_namespace_processes(&name);
            ip(&["netns", "del", &name])?;
        }
    }
    for name in link_names() {
        match parse_name(&name) {
            Some((i, Named::Veth)) if i == index => {
                // Gone already if its peer's namespace was just deleted.
                if let Err(e) = ip(&["link", "del", &name])
                    && link_names().contains(&name)
                {
                    return Err(e);
                }
            }
            Some((i, Named::Bridge)) if i == index => bridge = Some(name),
            _ => {}
        }
    }
    if let Some(bridge) = bridge {
        ip(&["link", "del", &bridge])?;
    }
    Ok(())
}

/// Removes what crashed runs left, for every index whose lock nobody holds.
fn remove_all_leftovers() -> Result<(), NetnsError> {
    let indexes: BTreeSet<u8> = namespace_names()
        .iter()
        .chain(link_names().iter())
        .filter_map(|name| parse_name(name).map(|(index, _)| index))
        .collect();
    for index in indexes {
        if let Some(_lock) = try_lock(index)? {
            tracing::info!(index, "removing a crashed test run's network");
            remove_leftovers(index)?;
        }
    }
    Ok(())
}

/// True when a route or address of this machine with a prefix of /16 or longer overlaps
/// `10.231.<index>.0/24` (a default route or a /8 does not make a /24 unusable: our more
/// specific route wins locally).
fn subnet_in_use(index: u8) -> Result<bool, NetnsError> {
    let ours = u32::from(Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], index, 0));
    let routes = ip(&["-4", "route", "show", "table", "all"])?;
    let addresses = ip(&["-4", "-o", "addr", "show"])?;
    let prefixes = routes
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|w| w.contains('/') || w.parse::<Ipv4Addr>().is_ok())
        })
        .chain(addresses.lines().filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()
        }))
        .filter_map(|prefix| {
            let (address, length) = prefix.split_once('/').unwrap_or((prefix, "32"));
            Some((
                address.parse::<Ipv4Addr>().ok()?,
                length.parse::<u32>().ok()?,
            ))
        });
    for (address, length) in prefixes {
        if !(16..=32).contains(&length) {
            continue;
        }
        let common = length.min(24);
        let mask = u32::MAX << (32 - common);
        if u32::from(address) & mask == ours & mask {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_their_index_and_kind() {
        assert_eq!(parse_name("shoaln5br"), Some((5, Named::Bridge)));
        assert_eq!(parse_name("shoaln255v254"), Some((255, Named::Veth)));
        assert_eq!(parse_name("shoaln0p2"), Some((0, Named::Veth)));
        assert_eq!(parse_name("shoaln17h3"), Some((17, Named::Namespace)));
        assert_eq!(parse_name("shoaln17x3"), None);
        assert_eq!(parse_name("shoaln256br"), None);
        assert_eq!(parse_name("shoalnbr"), None);
        assert_eq!(parse_name("eth0"), None);
        // Every name fits Linux's 15-character interface names.
        assert!(format!("{PREFIX}255v254").len() <= 15);
        assert!(format!("{PREFIX}255br").len() <= 15);
    }
}
