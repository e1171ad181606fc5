//! The local backend: subprocesses of this binary, or threads of this process.
//!
//! [`LocalExecutor`] is an actix actor. A subprocess is `current_exe()` with the task address in
//! `SHOAL_WORKER_TASK`/`SHOAL_WORKER_REDIS`, the parent's authkey in `SHOAL_WORKER_AUTHKEY`
//! (the launcher adds it to the launch's environment; the worker removes the three from its own
//! environment as it starts), `multiprocessing.env_vars` set, stdin from `/dev/null` and
//! stdout/stderr inherited, so a child's output reaches the parent's terminal.
//! Its exit is observed by waiting on the child (`waitpid`), which gives the real code, negative
//! when a signal ended it. Every subprocess runs in a process group of its own, so that a
//! terminal's Ctrl-C (sent to the foreground group) reaches this program only, which can then
//! shut down in order. A worker launched with [`Launch::die_with_parent`] (every child the
//! runtime starts) gets `PR_SET_PDEATHSIG = SIGTERM`: the kernel terminates it when this
//! process dies, even by `SIGKILL` (not when the program is setuid or has file capabilities:
//! `exec` of such a program clears it). The signal is tied to the thread that forked the child; that
//! is the actor system's thread, which lives as long as the runtime that owns the child. Signals go to the pid while the child is known not to have been
//! reaped (the actor removes a child in the same step that reaps it), so a recycled pid is never
//! signalled.
//!
//! A test binary runs every test when started plainly. When it invoked `shoal::test_support!()`,
//! the subprocess is started as that one test (`<entry> --exact --nocapture -q
//! --test-threads=1`), and the one line libtest prints before the test (`running 1 test`) is
//! filtered from its stdout.
//!
//! A thread child runs its body on a named thread. Threads cannot be stopped from outside:
//! `terminate()`/`kill()` set the child's termination flag (which
//! `shoal::termination_requested()` reads), and record the exit code -15/-9 at once; the thread
//! itself runs on until its target returns.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::prelude::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal_core::context;
use shoal_core::error::{Error, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::protocol::{
    Executor, Launch, Launched, QueryWorker, SignalWorker, StopSignal, WorkerExited, WorkerStatus,
    Workload,
};
use crate::task::{ENV_WORKER_REDIS, ENV_WORKER_TASK, TaskAddress};

/// What the local executor needs to start workers.
#[derive(Clone, Debug)]
pub struct LocalSettings {
    /// The store's URL, passed to workers.
    pub redis_url: String,
    /// The key namespace.
    pub namespace: String,
    /// The program workers run: this binary.
    pub program: PathBuf,
    /// The libtest name of the worker entry test, in a test binary.
    pub test_entry: Option<String>,
}

impl LocalSettings {
    /// Settings for workers of this binary.
    pub fn for_current_exe(redis_url: String, namespace: String) -> Result<Self> {
        let program = std::env::current_exe()
            .map_err(|e| Error::io("finding this program's path for worker processes", e))?;
        Ok(LocalSettings {
            redis_url,
            namespace,
            program,
            test_entry: shoal_core::registry::test_worker_entry(),
        })
    }

    /// The arguments a worker of this program is started with: none for a program, the worker
    /// entry test alone for a test binary (`<entry> --exact --nocapture -q --test-threads=1`).
    pub fn worker_args(&self) -> Vec<String> {
        match &self.test_entry {
            Some(entry) => [
                entry.as_str(),
                "--exact",
                "--nocapture",
                "-q",
                "--test-threads=1",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect(),
            None => Vec::new(),
        }
    }
}

enum Child {
    Subprocess {
        /// `None` only if the child was reaped before its pid was read: never signalled then.
        pid: Option<u32>,
    },
    Thread {
        terminate: Arc<AtomicBool>,
    },
}

/// The local executor actor.
pub struct LocalExecutor {
    settings: LocalSettings,
    children: HashMap<String, (Child, Recipient<WorkerExited>)>,
}

impl LocalExecutor {
    /// Starts the executor on `arbiter` and returns its handle.
    pub fn start(settings: LocalSettings, arbiter: &ArbiterHandle) -> Executor {
        let addr = LocalExecutor::start_in_arbiter(arbiter, move |_| LocalExecutor {
            settings,
            children: HashMap::new(),
        });
        Executor::new(
            "local",
            addr.clone().recipient(),
            addr.clone().recipient(),
            addr.recipient(),
        )
    }

    fn spawn_subprocess(
        &mut self,
        launch: Launch,
        task_id: String,
        ctx: &mut Context<Self>,
    ) -> Result<Launched> {
        let address = TaskAddress {
            redis_url: self.settings.redis_url.clone(),
            namespace: self.settings.namespace.clone(),
            id: task_id,
        };
        let mut command = tokio::process::Command::new(&self.settings.program);
        command
            .envs(&launch.env)
            .env(ENV_WORKER_TASK, address.task_env_value())
            .env(ENV_WORKER_REDIS, &address.redis_url)
            .stdin(Stdio::null())
            .kill_on_drop(false)
            // A terminal's Ctrl-C reaches the program only: it decides how children end.
            .process_group(0);
        if launch.die_with_parent {
            let parent = std::process::id();
            // SAFETY: the closure runs in the forked child before exec, where only
            // async-signal-safe operations are allowed. It makes two system calls, prctl and
            // getppid, both async-signal-safe; it allocates nothing and takes no lock (the
            // error it may build wraps an errno value, without allocating).
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(move || {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                        .map_err(std::io::Error::from)?;
                    // This process may have died before prctl took effect.
                    if nix::unistd::getppid().as_raw() as u32 != parent {
                        return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        if self.settings.test_entry.is_some() {
            command
                .args(self.settings.worker_args())
                .stdout(Stdio::piped());
        }
        let mut child = command.spawn().map_err(|e| {
            Error::io(
                format!(
                    "starting worker {} ({})",
                    launch.name,
                    self.settings.program.display()
                ),
                e,
            )
        })?;
        let pid = child.id();
        if let Some(stdout) = child.stdout.take() {
            actix_rt::spawn(forward_test_stdout(stdout));
        }
        let id = launch.id.clone();
        self.children
            .insert(id.clone(), (Child::Subprocess { pid }, launch.notify));
        ctx.spawn(
            async move { child.wait().await }
                .into_actor(self)
                .map(move |status, act, _| {
                    let code = match status {
                        Ok(status) => status
                            .code()
                            .or_else(|| status.signal().map(|s| -s))
                            .unwrap_or(1),
                        Err(e) => {
                            tracing::error!("waiting for worker {id}: {e}");
                            1
                        }
                    };
                    if let Some((_, notify)) = act.children.remove(&id) {
                        notify.do_send(WorkerExited {
                            id,
                            code,
                            never_started: false,
                        });
                    }
                }),
        );
        Ok(Launched { pid })
    }

    fn spawn_thread(&mut self, launch: Launch, ctx: &mut Context<Self>) -> Result<Launched> {
        let Workload::Thread { body, info } = launch.workload else {
            return Err(Error::Backend("not a thread workload".into()));
        };
        let terminate = Arc::new(AtomicBool::new(false));
        let flag = terminate.clone();
        let id = launch.id.clone();
        let me = ctx.address();
        std::thread::Builder::new()
            // The OS thread's name only (the process keeps its own): std panics on a NUL in it.
            .name(launch.name.replace('\0', ""))
            .spawn(move || {
                // Reports the end however the thread ends: a panic that escapes the body (a
                // target's return value whose drop panics, arguments whose encoding panics)
                // reports exit code 1, so that joins and the runtime's shutdown do not wait for
                // ever. Made first, dropped last: after the thread child's identity is gone.
                let mut ended = ThreadEndGuard {
                    executor: me,
                    id: Some(id),
                    code: 1,
                };
                let process = context::enter_thread_process(info, flag);
                ended.code = body();
                drop(process);
                drop(ended);
            })
            .map_err(|e| Error::io(format!("starting thread {}", launch.name), e))?;
        self.children
            .insert(launch.id, (Child::Thread { terminate }, launch.notify));
        Ok(Launched { pid: None })
    }
}

impl Actor for LocalExecutor {
    type Context = Context<Self>;
}

impl Handler<Launch> for LocalExecutor {
    type Result = Result<Launched>;

    fn handle(&mut self, launch: Launch, ctx: &mut Context<Self>) -> Self::Result {
        if self.children.contains_key(&launch.id) {
            return Err(Error::invalid_state(format!(
                "worker {} is already running",
                launch.id
            )));
        }
        match &launch.workload {
            Workload::Subprocess { task_id } => {
                let task_id = task_id.clone();
                self.spawn_subprocess(launch, task_id, ctx)
            }
            Workload::Thread { .. } => self.spawn_thread(launch, ctx),
        }
    }
}

impl Handler<SignalWorker> for LocalExecutor {
    type Result = Result<()>;

    fn handle(&mut self, msg: SignalWorker, _: &mut Context<Self>) -> Self::Result {
        match self.children.get(&msg.id) {
            None => Ok(()),
            Some((Child::Subprocess { pid }, _)) => {
                let signal = match msg.signal {
                    StopSignal::Terminate => Signal::SIGTERM,
                    StopSignal::Kill => Signal::SIGKILL,
                };
                // Never 0 or a negative number: kill() would signal a whole process group.
                let Some(target) = pid
                    .and_then(|pid| i32::try_from(pid).ok())
                    .filter(|pid| *pid > 0)
                else {
                    return Err(Error::Backend(format!(
                        "cannot send {signal} to worker {}: no pid to signal ({pid:?})",
                        msg.id
                    )));
                };
                match kill(Pid::from_raw(target), signal) {
                    Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
                    Err(e) => Err(Error::Backend(format!(
                        "sending {signal} to worker {} (pid {target}): {e}",
                        msg.id
                    ))),
                }
            }
            Some((Child::Thread { terminate }, _)) => {
                terminate.store(true, Ordering::Release);
                if let Some((_, notify)) = self.children.remove(&msg.id) {
                    notify.do_send(WorkerExited {
                        id: msg.id,
                        code: msg.signal.exit_code(),
                        never_started: false,
                    });
                }
                Ok(())
            }
        }
    }
}

impl Handler<QueryWorker> for LocalExecutor {
    type Result = MessageResult<QueryWorker>;

    fn handle(&mut self, msg: QueryWorker, _: &mut Context<Self>) -> Self::Result {
        MessageResult(match self.children.get(&msg.id) {
            Some((Child::Subprocess { pid }, _)) => WorkerStatus::Running { pid: *pid },
            Some((Child::Thread { .. }, _)) => WorkerStatus::Running { pid: None },
            None => WorkerStatus::NotRunning,
        })
    }
}

/// A thread child's body returned.
#[derive(Message)]
#[rtype(result = "()")]
struct ThreadEnded {
    id: String,
    code: i32,
}

/// Sends [`ThreadEnded`] with `code` when dropped: at the end of a thread child's thread, also
/// one that a panic unwinds.
struct ThreadEndGuard {
    executor: Addr<LocalExecutor>,
    /// Taken by the drop.
    id: Option<String>,
    code: i32,
}

impl Drop for ThreadEndGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.executor.do_send(ThreadEnded {
                id,
                code: self.code,
            });
        }
    }
}

impl Handler<ThreadEnded> for LocalExecutor {
    type Result = ();

    fn handle(&mut self, msg: ThreadEnded, _: &mut Context<Self>) {
        // Absent when terminate()/kill() already recorded the exit.
        if let Some((_, notify)) = self.children.remove(&msg.id) {
            notify.do_send(WorkerExited {
                id: msg.id,
                code: msg.code,
                never_started: false,
            });
        }
    }
}

/// Copies a test-binary worker's stdout to ours, without libtest's `running 1 test` preamble.
async fn forward_test_stdout(stdout: tokio::process::ChildStdout) {
    let mut lines = BufReader::new(stdout);
    let mut out = tokio::io::stdout();
    let mut line = Vec::new();
    let mut in_preamble = true;
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if in_preamble {
            let text = String::from_utf8_lossy(&line);
            let trimmed = text.trim();
            if trimmed.is_empty() {
                continue;
            }
            in_preamble = false;
            if trimmed.starts_with("running ") && trimmed.ends_with(" test") {
                continue;
            }
        }
        if out.write_all(&line).await.is_err() {
            break;
        }
        let _ = out.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ThreadBody;
    use shoal_core::actors::ActorSystem;
    use shoal_core::context::ProcessInfo;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Forwards exits to a channel.
    struct Collector(mpsc::Sender<WorkerExited>);

    impl Actor for Collector {
        type Context = Context<Self>;
    }

    impl Handler<WorkerExited> for Collector {
        type Result = ();

        fn handle(&mut self, msg: WorkerExited, _: &mut Context<Self>) {
            let _ = self.0.send(msg);
        }
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    fn thread_launch(id: &str, body: ThreadBody, notify: Recipient<WorkerExited>) -> Launch {
        Launch {
            id: id.into(),
            name: format!("test-{id}"),
            workload: Workload::Thread {
                body,
                info: ProcessInfo::main(),
            },
            env: Default::default(),
            die_with_parent: false,
            notify,
        }
    }

    #[test]
    fn launch_status_signal_and_exit_for_threads() {
        let system = ActorSystem::start("test-actors").expect("actors");
        let settings = LocalSettings {
            redis_url: "unix:///nonexistent".into(),
            namespace: "t".into(),
            program: "/nonexistent".into(),
            test_entry: None,
        };
        let executor = LocalExecutor::start(settings, system.arbiter());
        let (tx, rx) = mpsc::channel();
        let collector = Collector::start_in_arbiter(system.arbiter(), move |_| Collector(tx));

        let quick = block(executor.launch(thread_launch(
            "a",
            Box::new(|| 7),
            collector.clone().recipient(),
        )));
        assert_eq!(quick.expect("launch"), Launched { pid: None });
        let exited = rx.recv_timeout(Duration::from_secs(5)).expect("exit");
        assert_eq!(
            exited,
            WorkerExited {
                id: "a".into(),
                code: 7,
                never_started: false,
            }
        );
        assert_eq!(
            block(executor.status("a".into())).expect("status"),
            WorkerStatus::NotRunning
        );

        let slow: ThreadBody = Box::new(|| {
            while !context::termination_requested() {
                std::thread::sleep(Duration::from_millis(5));
            }
            0
        });
        block(executor.launch(thread_launch("b", slow, collector.clone().recipient())))
            .expect("launch");
        assert_eq!(
            block(executor.status("b".into())).expect("status"),
            WorkerStatus::Running { pid: None }
        );
        let again =
            block(executor.launch(thread_launch("b", Box::new(|| 0), collector.recipient())));
        assert!(matches!(again, Err(Error::InvalidState(_))));
        block(executor.signal("b".into(), StopSignal::Kill)).expect("signal");
        let exited = rx.recv_timeout(Duration::from_secs(5)).expect("exit");
        assert_eq!(
            exited,
            WorkerExited {
                id: "b".into(),
                code: -9,
                never_started: false,
            }
        );
        assert_eq!(
            block(executor.status("b".into())).expect("status"),
            WorkerStatus::NotRunning
        );
        // Signalling a worker that ended is not an error.
        block(executor.signal("b".into(), StopSignal::Terminate)).expect("signal after exit");
    }

    #[test]
    fn a_missing_program_is_a_launch_error() {
        let system = ActorSystem::start("test-actors").expect("actors");
        let settings = LocalSettings {
            redis_url: "unix:///nonexistent".into(),
            namespace: "t".into(),
            program: "/nonexistent/program".into(),
            test_entry: None,
        };
        let executor = LocalExecutor::start(settings, system.arbiter());
        let (tx, _rx) = mpsc::channel();
        let collector = Collector::start_in_arbiter(system.arbiter(), move |_| Collector(tx));
        let launch = Launch {
            id: "x".into(),
            name: "x".into(),
            workload: Workload::Subprocess {
                task_id: "x".into(),
            },
            env: Default::default(),
            die_with_parent: false,
            notify: collector.recipient(),
        };
        match futures::executor::block_on(executor.launch(launch)) {
            Err(Error::Io { context, .. }) => {
                assert!(context.contains("/nonexistent/program"), "{context}")
            }
            other => panic!("{other:?}"),
        }
    }
}
