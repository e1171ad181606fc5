//! The embedded store: a private `redis-server` for the local backend.
//!
//! When no `redis.url` is configured and the backend is local, the runtime starts
//! `redis-server` listening only on a Unix socket (`--port 0`) in a fresh temporary directory
//! (mode 0700), with persistence off (`--save "" --appendonly no`). It is stopped with
//! `SHUTDOWN NOSAVE` when [`EmbeddedRedis`] is dropped, and the directory is removed.
//!
//! It also stops when the program dies without running destructors (Ctrl-C, `SIGTERM`,
//! `SIGKILL`, `panic = "abort"`): the server is started with `PR_SET_PDEATHSIG = SIGTERM`, so the
//! kernel signals it when the thread that forked it exits. That thread is a dedicated one
//! (`shoal-redis`) that lives exactly as long as the server, because the parent-death signal is
//! tied to the forking thread, not to the process. The directory is removed then too, by a
//! watcher (`sh`) that waits for end-of-file on a pipe whose only writer is this process: the
//! kernel closes it when the process dies, however it dies.
//!
//! The server and the watcher run in their own process group, so a terminal's Ctrl-C reaches
//! only the program, which can then shut down in order; if it dies instead, both follow it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// How long a stopping server gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running private `redis-server`; dropping it stops the server.
#[derive(Debug)]
pub struct EmbeddedRedis {
    pid: u32,
    socket: PathBuf,
    dir: Option<tempfile::TempDir>,
    exited: Arc<ExitSignal>,
    reaper: Option<JoinHandle<()>>,
    /// The write end of the directory watcher's pipe: closed when this process dies.
    cleanup: Option<std::io::PipeWriter>,
}

#[derive(Debug, Default)]
struct ExitSignal {
    exited: Mutex<bool>,
    changed: Condvar,
}

impl ExitSignal {
    fn set(&self) {
        let mut exited = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        *exited = true;
        self.changed.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.exited.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |exited| !*exited)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

impl EmbeddedRedis {
    /// Starts `binary` (a path, or a name looked up in `PATH`) and waits until it accepts
    /// connections, for `ready_timeout` clamped to 5 s ..= 1 h (a server that starts takes
    /// longer than a short connect timeout on a loaded machine).
    pub fn start(binary: &str, ready_timeout: Duration) -> Result<EmbeddedRedis> {
        let program = find_program(binary)?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-redis-")
            .tempdir()
            .map_err(|e| Error::io("creating the embedded Redis directory", e))?;
        let socket = dir.path().join("redis.sock");
        let log = dir.path().join("redis.log");
        let cleanup = watch_directory(dir.path())?;
        let mut command = Command::new(&program);
        command
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe operations are allowed. It makes two system calls, prctl and
        // getppid, both async-signal-safe, allocates nothing and takes no lock.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
                // The parent may have died before prctl took effect.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    return Err(std::io::Error::other("parent exited during start"));
                }
                Ok(())
            });
        }

        let exited = Arc::new(ExitSignal::default());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let reaper_exited = exited.clone();
        let reaper = std::thread::Builder::new()
            .name("shoal-redis".into())
            .spawn(move || match command.spawn() {
                Ok(mut child) => {
                    let _ = started_tx.send(Ok(child.id()));
                    let status = child.wait();
                    tracing::debug!(?status, "embedded redis-server exited");
                    reaper_exited.set();
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    reaper_exited.set();
                }
            })
            .map_err(|e| Error::io("starting the shoal-redis thread", e))?;
        let pid = started_rx
            .recv()
            .map_err(|_| Error::Backend("the shoal-redis thread died".into()))?
            .map_err(|e| Error::io(format!("starting {}", program.display()), e))?;

        let mut server = EmbeddedRedis {
            pid,
            socket,
            dir: Some(dir),
            exited,
            reaper: Some(reaper),
            cleanup: Some(cleanup),
        };
        let ready_timeout = ready_timeout.clamp(Duration::from_secs(5), Duration::from_secs(3600));
        let deadline = Instant::now() + ready_timeout;
        loop {
            if server.exited.is_set() {
                let tail = log_tail(&log);
                server.stop();
                return Err(Error::Backend(format!(
                    "embedded redis-server ({}) exited during start: {tail}",
                    program.display()
                )));
            }
            if UnixStream::connect(&server.socket).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                server.stop();
                return Err(Error::Backend(format!(
                    "embedded redis-server ({}) did not accept connections within {:?}",
                    program.display(),
                    ready_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::debug!(pid, socket = %server.socket.display(), "embedded redis-server ready");
        Ok(server)
    }

    /// The URL clients use: `unix://<socket>`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The Unix socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops the server (`SHUTDOWN NOSAVE`, then `SIGKILL` after a grace period) and removes
    /// its directory. Idempotent.
    pub fn stop(&mut self) {
        let Some(reaper) = self.reaper.take() else {
            return;
        };
        if !self.exited.is_set() {
            if let Ok(mut conn) = UnixStream::connect(&self.socket) {
                let _ = conn.write_all(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n");
            }
            if !self.exited.wait(STOP_GRACE) && !self.exited.is_set() {
                tracing::warn!(
                    pid = self.pid,
                    "embedded redis-server ignored SHUTDOWN; killing it"
                );
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                self.exited.wait(STOP_GRACE);
            }
        }
        let _ = reaper.join();
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
        // The watcher sees end-of-file and exits (the directory is gone already).
        self.cleanup.take();
    }
}

/// Starts a watcher that removes `dir` once the returned pipe's write end is closed: when it is
/// dropped, or when this process dies in any way (the kernel closes its descriptors). The write
/// end is close-on-exec, so no child of this process holds it.
fn watch_directory(dir: &Path) -> Result<std::io::PipeWriter> {
    let (reader, writer) =
        std::io::pipe().map_err(|e| Error::io("creating the embedded Redis watcher's pipe", e))?;
    let mut watcher = Command::new("/bin/sh");
    watcher
        .arg("-c")
        // The server gets its parent-death signal at the same moment and logs its shutdown
        // into this directory (it reopens the log file for each line), which can put a file
        // back while `rm -rf` runs: so remove until the directory is gone, at most 10 s.
        .arg(
            r#"read -r _; i=0; while [ -e "$0" ] && [ "$i" -lt 100 ]; do rm -rf -- "$0" 2>/dev/null; [ -e "$0" ] || exit 0; i=$((i+1)); sleep 0.1; done"#,
        )
        .arg(dir)
        .stdin(reader)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = watcher
        .spawn()
        .map_err(|e| Error::io("starting the embedded Redis directory watcher (/bin/sh)", e))?;
    // Reap it when it exits, without making anyone wait for it.
    let _ = std::thread::Builder::new()
        .name("shoal-redis-watcher".into())
        .spawn(move || child.wait());
    Ok(writer)
}

impl Drop for EmbeddedRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds `binary` in `PATH` (and the usual system directories) unless it is a path.
fn find_program(binary: &str) -> Result<PathBuf> {
    let not_found = |looked: String| Error::Config {
        origin: "redis.server_binary".into(),
        key: "redis.url".into(),
        reason: format!(
            "no redis.url is set, so shoal starts its own redis-server, but `{binary}` was not \
             found ({looked}). Install it (Debian/Ubuntu: `apt-get install redis-server`; \
             macOS: `brew install redis`), set redis.server_binary to its path, or set \
             redis.url (SHOAL_REDIS_URL) to a Redis you run"
        ),
    };
    if binary.contains('/') {
        let path = PathBuf::from(binary);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(not_found(format!("{} is not a file", path.display())))
        };
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in [
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/opt/homebrew/bin",
    ] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.iter()
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .ok_or_else(|| not_found("looked in PATH and /usr/bin, /usr/sbin, /usr/local/bin".into()))
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        "no log output".into()
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_how_to_fix() {
        match EmbeddedRedis::start("shoal-no-such-redis-server", Duration::from_secs(1)) {
            Err(Error::Config { key, reason, .. }) => {
                assert_eq!(key, "redis.url");
                assert!(reason.contains("apt-get install redis-server"), "{reason}");
                assert!(reason.contains("SHOAL_REDIS_URL"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn starts_and_stops_by_pid() {
        let mut server =
            EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis-server");
        let pid = server.pid();
        let dir = server.socket().parent().expect("dir").to_path_buf();
        assert!(server.url().starts_with("unix://"));
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        server.stop();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "redis-server {pid} still runs"
        );
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}
