//! `Process`: run a function in a child process, Python's `multiprocessing.Process`.
//!
//! # Semantics
//!
//! * [`Process::new`] takes a `#[shoal::remote]` function and its arguments as a tuple (`(x,)`
//!   for one argument, `()` for none) and checks their types at compile time; a function without
//!   the attribute, or a closure, does not compile. [`Process::thread`] takes any function or
//!   closure, and always runs it on a thread. The child gets a name at construction: `Process-N`
//!   (`Process-1:2` for the second child of a child), unless [`Process::name`] gives one.
//! * [`Process::start`] starts the child with the start method of the configuration
//!   (`local.start_method`) or of [`Process::start_method`]:
//!   * `process`: a subprocess running this binary in worker mode.
//!   * `thread`: a thread of this process. A registered function runs through its registry
//!     entry, so it behaves exactly as in a subprocess (arguments encoded and decoded, `Err`
//!     returns give exit code 1).
//! * [`Process::exitcode`] follows Python: `None` while running, `0` when the function returned,
//!   `1` when it panicked or returned `Err`, `n` when it called `std::process::exit(n)`, `-15`
//!   after [`Process::terminate`] and `-9` after [`Process::kill`] (for a subprocess, `-N` for any
//!   signal `N` that ended it, also one sent from outside).
//! * [`Process::join`] waits for the exit, or at most the timeout (then returns `Ok(())` with the
//!   child still running, as Python does; check [`Process::is_alive`]).
//! * Starting twice, or joining, terminating or killing a process that was never started, is
//!   [`Error::InvalidState`]; so is changing the daemon flag of a started process
//!   ([`Process::set_daemon`]).
//! * [`Process::close`] releases a process that exited (or never started); it is
//!   [`Error::InvalidState`] while the process runs, and closing again does nothing (Python's
//!   `close()`). After it, `start`, `join`/`join_async`, `terminate` and `kill` are
//!   [`Error::InvalidState`] ("process … is closed"), while the name and the daemon flag stay
//!   readable and settable, as in Python. Python's `is_alive()`, `exitcode` and `pid` raise
//!   `ValueError` after `close()`; here they keep their plain return types (no `Result`), so they
//!   report `false`, `None` and `None` instead: a closed process's exit code and pid are no
//!   longer known. [`Process::is_closed`] tells a closed process apart from one that never
//!   started.
//! * [`active_children`] lists the children the calling process started that still run
//!   (Python's `multiprocessing.active_children()`: direct children only, so a thread child
//!   sees its own; pool workers are the pool's and are not listed); [`crate::parent_process`]
//!   tells a child who started it.
//! * Daemon children are terminated when the runtime shuts down; the runtime waits for
//!   non-daemon children first (Python's exit behaviour). A child never outlives a parent that
//!   dies without shutting down (killed, even by `SIGKILL`): it gets `SIGTERM` then (unlike
//!   Python, whose non-daemon children run on), unless the program is setuid or has file
//!   capabilities (the kernel clears that signal when it starts such a program). Children run in their own process group, so a
//!   terminal's Ctrl-C reaches the parent only. A daemonic process (a daemon child, or
//!   a pool worker) may not start children: `start()` is [`Error::InvalidState`], as Python's
//!   `AssertionError`.
//!
//! # Thread children
//!
//! A thread cannot be stopped from outside. [`Process::terminate`]/[`Process::kill`] on a thread
//! child set its termination flag, which the target reads with
//! [`termination_requested`](crate::termination_requested), and record the exit code (-15/-9)
//! at once: `join` returns and `is_alive` is false, while the thread itself runs on until its
//! target returns. A thread child has no pid of its own ([`Process::pid`] is `None`), shares the
//! parent's environment (`multiprocessing.env_vars` does not apply) and writes to the parent's
//! stdout. `std::process::exit` in a thread child ends the whole program.
//!
//! # Actors and Redis
//!
//! Each started process is backed by a `ProcessActor` on the runtime's actor system. It owns
//! the lifecycle (starting → running → exited), asks the executor to launch the worker, learns
//! of the exit from the executor, prints the child's output stream when
//! `multiprocessing.stream_stdout` is on, and records execution details when
//! `multiprocessing.export_execution_details` is set. The handle waits on a condition variable
//! the actor updates.
//!
//! Redis round trips per subprocess lifecycle: the parent writes the task (1) and deletes the
//! process's keys after the exit (1, off the caller's path); the worker claims the task (1) and
//! records its exit (1). A thread child makes none. Keys: see `shoal_executor::task`.

use std::collections::BTreeMap;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use futures::FutureExt;
use serde::Serialize;
use shoal_core::config::StartMethod;
use shoal_core::context::{self, ParentInfo, ProcessInfo};
use shoal_core::error::{Error, Result};
use shoal_core::registry::{self, Callable, RemoteFn};
use shoal_core::store::Store;
use shoal_core::{TaskErrorKind, codec};
use shoal_executor::output::print_stream;
use shoal_executor::protocol::{
    Executor, Launch, Launched, StopSignal, ThreadBody, WorkerExited, Workload,
};
use shoal_executor::task::{ProcessKeys, TaskKind, TaskRecord, hand_over_authkey};
use shoal_primitives::pipe::{SentTransfers, collect_transfers, encode_without_round_trips};

use crate::runtime::{self, ChildEntry, RuntimeRef};

mod actor;
mod target;

use actor::*;
use target::*;

/// Children constructed so far by each process running here, by its identity (Python's
/// process counter, which each child starts afresh): the main process's and each thread
/// child's.
static CONSTRUCTED: Mutex<BTreeMap<Vec<u32>, u32>> = Mutex::new(BTreeMap::new());

/// A function to run in a child process, with its arguments.
///
/// ```no_run
/// use shoal::prelude::*;
///
/// #[shoal::remote]
/// fn work(n: u64) -> u64 {
///     n * 2
/// }
///
/// fn main() -> shoal::Result<()> {
///     let _rt = shoal::init()?;
///     let p = Process::new(work, (21u64,)).name("worker").daemon(true);
///     p.start()?;
///     assert!(p.set_daemon(false).is_err(), "a started process keeps its flag");
///     p.join(None)?;
///     assert_eq!(p.exitcode(), Some(0));
///     p.close()?;
///     Ok(())
/// }
/// ```
pub struct Process {
    name: String,
    identity: Vec<u32>,
    daemon: AtomicBool,
    start_method: Option<StartMethod>,
    /// Shared with the task that finishes an async start (see [`Process::start_async`]).
    slot: Arc<Mutex<Slot>>,
}

enum Slot {
    Created(Box<dyn Target>),
    Started(Started),
    Failed(String),
    /// Transient: `start()` is running.
    Starting,
    /// `close()` released it.
    Closed,
}

/// A started child as its handles see it.
struct Started {
    child: StartedChild,
    // Keeps the runtime alive while a handle to a started process exists.
    _runtime: RuntimeRef,
}

impl std::ops::Deref for Started {
    type Target = StartedChild;

    fn deref(&self) -> &StartedChild {
        &self.child
    }
}

/// A started child as the runtime tracks it (without keeping the runtime alive).
#[derive(Clone)]
pub(crate) struct StartedChild {
    state: Arc<ProcessState>,
    actor: Addr<ProcessActor>,
    pid: Option<u32>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("daemon", &self.is_daemon())
            .field("pid", &self.pid())
            .field("exitcode", &self.exitcode())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Process {
    /// A process that will run `target(args...)`. Nothing runs until [`Process::start`].
    ///
    /// `target` is a function marked `#[shoal::remote]`; anything else (a plain function, a
    /// closure) is a compile error, because it could not run in another process. Use
    /// [`Process::thread`] for a closure.
    pub fn new<F, A>(target: F, args: A) -> Process
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
    {
        Process::with_target(Box::new(RemoteTarget { target, args }), None)
    }

    /// A process that runs `target(args...)` on a thread of this process (the `thread` start
    /// method, always): any function or closure, capturing what it likes. It has a name, a
    /// daemon flag, `join`, `is_alive` and an exit code like any process (`1` if it panicked);
    /// [`Process::terminate`] and [`Process::kill`] cannot stop a thread, so they only mark it.
    /// Asking it for another start method makes `start()` fail with [`Error::InvalidState`].
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use shoal::prelude::*;
    ///
    /// fn main() -> shoal::Result<()> {
    ///     let _rt = shoal::init()?;
    ///     let hits = Arc::new(AtomicU32::new(0));
    ///     let counted = hits.clone();
    ///     let p = Process::thread(move |n: u32| counted.fetch_add(n, Ordering::SeqCst), (2u32,));
    ///     p.start()?;
    ///     p.join(None)?;
    ///     assert_eq!((p.exitcode(), hits.load(Ordering::SeqCst)), (Some(0), 2));
    ///     Ok(())
    /// }
    /// ```
    pub fn thread<F, A>(target: F, args: A) -> Process
    where
        F: Callable<A>,
        A: Send + 'static,
    {
        Process::with_target(
            Box::new(ThreadTarget { target, args }),
            Some(StartMethod::Thread),
        )
    }

    fn with_target(target: Box<dyn Target>, start_method: Option<StartMethod>) -> Process {
        let mut identity = context::current_process().identity;
        let n = {
            let mut constructed = CONSTRUCTED.lock().unwrap_or_else(|p| p.into_inner());
            let count = constructed.entry(identity.clone()).or_insert(0);
            *count = count.saturating_add(1);
            *count
        };
        identity.push(n);
        let name = format!(
            "Process-{}",
            identity
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(":")
        );
        Process {
            name,
            identity,
            daemon: AtomicBool::new(false),
            start_method,
            slot: Arc::new(Mutex::new(Slot::Created(target))),
        }
    }

    /// Sets the process's name (default `Process-N`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Makes the process a daemon: it is terminated when the runtime shuts down, instead of
    /// being waited for, and it dies with its parent. For a process that was started already,
    /// the flag does not change (see [`Process::set_daemon`], which says so with an error).
    pub fn daemon(self, daemon: bool) -> Self {
        if let Err(e) = self.set_daemon(daemon) {
            tracing::error!("Process::daemon: {e}");
        }
        self
    }

    /// Sets the daemon flag before `start()`; [`Error::InvalidState`] once the process was
    /// started (Python: "process has already started"). After [`Process::close`] the flag is
    /// plain metadata again and may be set, as in Python.
    pub fn set_daemon(&self, daemon: bool) -> Result<()> {
        match &*self.lock_slot() {
            Slot::Created(_) | Slot::Closed => {
                self.daemon.store(daemon, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(Error::invalid_state(format!(
                "process {} has already started: its daemon flag cannot change",
                self.name
            ))),
        }
    }

    /// Runs this process with `method` instead of the configured `local.start_method`.
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// The process's name.
    pub fn get_name(&self) -> &str {
        &self.name
    }

    /// Whether the process is a daemon.
    pub fn is_daemon(&self) -> bool {
        self.daemon.load(Ordering::Relaxed)
    }

    fn closed(&self) -> Error {
        Error::invalid_state(format!("process {} is closed", self.name))
    }

    /// Releases the process once it has exited (or if it never started): Python's
    /// `Process.close()`. [`Error::InvalidState`] while it still runs (or starts); closing a
    /// closed process does nothing. After it, `start`, `join`, `terminate` and `kill` are
    /// [`Error::InvalidState`]; `is_alive`, `exitcode` and `pid` answer `false`/`None` (Python
    /// raises `ValueError` there: see the module docs).
    pub fn close(&self) -> Result<()> {
        let mut slot = self.lock_slot();
        match &*slot {
            Slot::Started(s) if !s.state.has_exited() => Err(Error::invalid_state(format!(
                "cannot close process {} while it is still running: join() or terminate() it first",
                self.name
            ))),
            Slot::Starting => Err(Error::invalid_state(format!(
                "cannot close process {} while it is starting",
                self.name
            ))),
            _ => {
                *slot = Slot::Closed;
                Ok(())
            }
        }
    }

    /// Starts the child. Errors: [`Error::InvalidState`] if it was started before (or if a
    /// [`Process::thread`] target was given the `process` start method; it stays startable),
    /// or what the backend reports.
    pub fn start(&self) -> Result<()> {
        let target = self.take_target()?;
        let prepared = match self.spec().prepare_blocking(target) {
            Ok(prepared) => prepared,
            Err(failure) => return self.not_started(failure),
        };
        let reply = futures::executor::block_on(prepared.actor.send(StartChild));
        settle(&self.slot, prepared.finish(reply))
    }

    /// The async form of [`Process::start`], for async code: the launch (the task record's
    /// write, the backend's call: a fork and exec, or a Kubernetes Job) runs on shoal's actor
    /// runtime and no thread waits for it; any executor. Errors as [`Process::start`].
    ///
    /// Dropping the future does not cancel the start once it has begun (the first poll): the
    /// child is launched all the same, and this handle shows it started (`is_alive`, `join`,
    /// `terminate`...) as soon as the launch returns, as it would have after `start()`.
    /// The arguments are encoded in the first poll; arguments that carry pipe ends are encoded
    /// on shoal's actor runtime's blocking pool instead, where passing each end makes its round
    /// trip to Redis (see `Connection`'s serialization), so the caller's thread never waits on
    /// Redis.
    ///
    /// ```no_run
    /// use shoal::prelude::*;
    ///
    /// #[shoal::remote]
    /// fn work(n: u64) {
    ///     println!("{n}");
    /// }
    ///
    /// # async fn handler() -> shoal::Result<()> {
    /// let p = Process::new(work, (7u64,));
    /// p.start_async().await?;
    /// p.join_async().await?;
    /// assert_eq!(p.exitcode(), Some(0));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_async(&self) -> Result<()> {
        let target = self.take_target()?;
        let spec = self.spec();
        let (tell, told) = futures::channel::oneshot::channel();
        let (arbiter, finish) = match spec.prepare(target, Encoding::WithoutRoundTrips) {
            Ok(prepared) => {
                // Sent now: the start goes ahead whatever happens to this future; the task
                // below records how it went in the slot, and tells this future if it is still
                // there.
                let request = prepared.actor.send(StartChild);
                let arbiter = prepared.runtime.arbiter();
                let mut task = StartTask {
                    slot: Some(self.slot.clone()),
                    runtime: Some(prepared.runtime.clone()),
                    settled: false,
                };
                let finish = async move {
                    let reply = request.await;
                    let _ = tell.send(task.settle(prepared.finish(reply)));
                };
                (arbiter, finish.boxed())
            }
            Err(Unprepared::Failed(failure)) => return self.not_started(failure),
            Err(Unprepared::CarriesPipeEnds(target)) => {
                // Encoded on the blocking pool, where passing a pipe end may wait on Redis;
                // the start goes ahead from there whatever happens to this future, as above.
                let runtime = match runtime::current_runtime() {
                    Ok(runtime) => runtime,
                    Err(e) => return self.not_started((Some(target), e)),
                };
                let arbiter = runtime.arbiter();
                let mut task = StartTask {
                    slot: Some(self.slot.clone()),
                    runtime: Some(runtime),
                    settled: false,
                };
                let finish = async move {
                    let prepared =
                        tokio::task::spawn_blocking(move || spec.prepare_blocking(target)).await;
                    let outcome = match prepared {
                        Ok(Ok(prepared)) => {
                            let reply = prepared.actor.send(StartChild).await;
                            task.settle(prepared.finish(reply))
                        }
                        Ok(Err(failure)) => task.unstart(failure),
                        Err(e) => task.settle(Err(Error::Backend(format!(
                            "encoding the arguments of the process failed: {e}"
                        )))),
                    };
                    let _ = tell.send(outcome);
                };
                (arbiter, finish.boxed())
            }
        };
        if !arbiter.spawn(finish) {
            let e =
                Error::Backend("shoal's actor runtime stopped: the process cannot start".into());
            *self.lock_slot() = Slot::Failed(e.to_string());
            return Err(e);
        }
        told.await.unwrap_or_else(|_| {
            Err(Error::Backend(
                "shoal's actor runtime stopped while the process started".into(),
            ))
        })
    }

    /// Takes the target out of a process that may start (the slot is `Starting` then).
    fn take_target(&self) -> Result<Box<dyn Target>> {
        let mut slot = self.lock_slot();
        match std::mem::replace(&mut *slot, Slot::Starting) {
            Slot::Created(target) => Ok(target),
            Slot::Closed => {
                *slot = Slot::Closed;
                Err(self.closed())
            }
            other => {
                *slot = other;
                Err(Error::invalid_state(format!(
                    "cannot start process {} twice",
                    self.name
                )))
            }
        }
    }

    /// A start that failed before the launch: the process may start again when the target
    /// came back, else it failed.
    fn not_started(&self, failure: Failure) -> Result<()> {
        not_started(&self.slot, failure)
    }

    /// What a start needs of this handle and of the calling thread (who is starting it).
    fn spec(&self) -> StartSpec {
        StartSpec {
            name: self.name.clone(),
            identity: self.identity.clone(),
            daemon: self.is_daemon(),
            start_method: self.start_method,
            me: context::current_process(),
        }
    }
}

/// A start that failed before the launch: the target, when the process may start again, and
/// why.
type Failure = (Option<Box<dyn Target>>, Error);

/// Records a start that failed before the launch in `slot` (see [`Process::not_started`]).
fn not_started(slot: &Mutex<Slot>, (target, e): Failure) -> Result<()> {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = match target {
        Some(target) => Slot::Created(target),
        None => Slot::Failed(e.to_string()),
    };
    Err(e)
}

/// How [`StartSpec::prepare`] encodes a child's arguments.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// On the calling thread, passing the pipe ends among them (a blocking round trip each).
    Blocking,
    /// On the calling thread unless pipe ends are among them: the target comes back then
    /// ([`Unprepared::CarriesPipeEnds`]), nothing done.
    WithoutRoundTrips,
}

/// Why [`StartSpec::prepare`] did not prepare a start.
enum Unprepared {
    Failed(Failure),
    /// The arguments carry pipe ends, and the encoding was [`Encoding::WithoutRoundTrips`].
    CarriesPipeEnds(Box<dyn Target>),
}

/// A start as the handle and the calling thread asked for it: what preparing it needs, on any
/// thread.
struct StartSpec {
    name: String,
    identity: Vec<u32>,
    daemon: bool,
    start_method: Option<StartMethod>,
    /// The process that starts the child (a thread child has its own: read on its thread).
    me: ProcessInfo,
}

impl StartSpec {
    /// [`StartSpec::prepare`], the arguments encoded on this thread whatever they carry.
    fn prepare_blocking(&self, target: Box<dyn Target>) -> std::result::Result<Prepared, Failure> {
        match self.prepare(target, Encoding::Blocking) {
            Ok(prepared) => Ok(prepared),
            Err(Unprepared::Failed(failure)) => Err(failure),
            // Not made by a blocking encoding; a failure rather than a panic all the same.
            Err(Unprepared::CarriesPipeEnds(target)) => Err((
                Some(target),
                Error::invalid_state("the arguments' pipe ends were not passed"),
            )),
        }
    }

    /// Everything a start does before the launch: the checks, the arguments encoded, the task
    /// record built, the process's actor started (it launches on [`StartChild`]). A failure
    /// gives the target back when the process may start again.
    fn prepare(
        &self,
        target: Box<dyn Target>,
        encoding: Encoding,
    ) -> std::result::Result<Prepared, Unprepared> {
        let me = self.me.clone();
        if me.daemon {
            let e = Error::invalid_state(format!(
                "daemonic processes are not allowed to have children ({} is daemonic)",
                me.name
            ));
            return Err(Unprepared::Failed((Some(target), e)));
        }
        let runtime = match runtime::current_runtime().and_then(|r| {
            r.check_accepting()?;
            Ok(r)
        }) {
            Ok(r) => r,
            Err(e) => return Err(Unprepared::Failed((Some(target), e))),
        };
        let context = runtime.context().clone();
        let config = context.config();
        let method = self.start_method.unwrap_or(config.local.start_method);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let keys = ProcessKeys::new(context.store().keys(), &id);
        let function = target.function_name();
        let daemon = self.daemon;
        let info = ProcessInfo {
            name: self.name.clone(),
            identity: self.identity.clone(),
            daemon,
            authkey: me.authkey.clone(),
            parent: Some(ParentInfo {
                name: me.name.clone(),
                pid: Some(std::process::id()),
            }),
        };
        let mut sent_transfers = None;
        let mut env = config.multiprocessing.env_vars.clone();
        let (workload, record) = match method {
            StartMethod::Process => {
                if !target.runs_elsewhere() {
                    let e = Error::invalid_state(format!(
                        "process {} was made with Process::thread: its function ({function}) \
                         can only run on a thread of this process",
                        self.name
                    ));
                    return Err(Unprepared::Failed((Some(target), e)));
                }
                if let Err(e) = registry::resolve(function) {
                    return Err(Unprepared::Failed((Some(target), e)));
                }
                let encode = || target.encode_args(context.store(), &keys.task);
                let (args, transfers) = match encoding {
                    Encoding::Blocking => collect_transfers(encode),
                    Encoding::WithoutRoundTrips => match encode_without_round_trips(encode) {
                        Some(args) => (args, SentTransfers::default()),
                        None => return Err(Unprepared::CarriesPipeEnds(target)),
                    },
                };
                sent_transfers = Some(transfers);
                let args = match args {
                    Ok(args) => args,
                    Err(e) => {
                        release_now(sent_transfers.take());
                        return Err(Unprepared::Failed((Some(target), e)));
                    }
                };
                let mut record_config = config.clone();
                record_config.redis.url = None;
                // The key goes in the worker's environment, never in its record in Redis.
                hand_over_authkey(&info.authkey, &mut env);
                let record = TaskRecord {
                    kind: TaskKind::Call {
                        function: function.to_string(),
                        args,
                    },
                    name: self.name.clone(),
                    identity: self.identity.clone(),
                    daemon,
                    config: record_config,
                    // A remote child's terminal is not ours: its output comes back as a stream.
                    stream_output: config.multiprocessing.stream_stdout
                        || config.shoal.backend.is_remote(),
                    parent: info.parent.clone(),
                    // A pod gets no parent-death signal: it watches this runtime's key.
                    driver: config
                        .shoal
                        .backend
                        .is_remote()
                        .then(|| runtime.driver_liveness()),
                };
                (
                    Workload::Subprocess {
                        task_id: id.clone(),
                    },
                    Some(record),
                )
            }
            StartMethod::Thread => {
                let limit = context.store().settings().max_message_bytes;
                let body = target.into_thread_body(self.name.clone(), limit);
                (Workload::Thread { body, info }, None)
            }
        };
        let state = Arc::new(ProcessState::new());
        let actor = ProcessActor {
            id: id.clone(),
            name: self.name.clone(),
            function: function.to_string(),
            method,
            store: context.store().clone(),
            executor: runtime.executor().clone(),
            keys,
            state: state.clone(),
            pending: Some(PendingLaunch {
                workload,
                record,
                env,
            }),
            output: None,
            exit_code: None,
            started_at: SystemTime::now(),
            started_instant: Instant::now(),
            pid: None,
            details_dir: config.multiprocessing.export_execution_details.clone(),
            sent_transfers,
            finishing: false,
        };
        let addr = ProcessActor::start_in_arbiter(&runtime.arbiter(), move |_| actor);
        Ok(Prepared {
            id,
            name: self.name.clone(),
            daemon,
            parent: me.identity,
            state,
            actor: addr,
            runtime,
        })
    }
}

impl Process {
    /// Waits until the process exits, or at most `timeout`. Returns `Ok(())` in both cases (the
    /// process may still be running after a timeout: see [`Process::is_alive`]).
    pub fn join(&self, timeout: Option<Duration>) -> Result<()> {
        let state = self.started_state("join")?;
        state.wait_exited(timeout);
        Ok(())
    }

    /// Waits until the process exits, for async code: no thread waits (the process's actor wakes
    /// the task), on any executor. Errors as [`Process::join`]; bound it with your runtime's
    /// timeout (`tokio::time::timeout`) for Python's `join(timeout)`.
    pub async fn join_async(&self) -> Result<()> {
        let state = self.started_state("join")?;
        std::future::poll_fn(|cx| state.poll_exited(cx.waker())).await;
        Ok(())
    }

    /// Whether [`Process::close`] released this process.
    pub fn is_closed(&self) -> bool {
        matches!(&*self.lock_slot(), Slot::Closed)
    }

    /// True from a successful `start()` until the process exits.
    ///
    /// After [`Process::close`]: `false`. Python raises `ValueError` there; this method keeps a
    /// plain `bool`, so check [`Process::is_closed`] to tell the cases apart.
    pub fn is_alive(&self) -> bool {
        match &*self.lock_slot() {
            Slot::Started(s) => !s.state.has_exited(),
            _ => false,
        }
    }

    /// The exit code once the process has exited (see the module docs), `None` before.
    ///
    /// After [`Process::close`]: `None`, the exit code is released with the process. Python
    /// raises `ValueError` there; this method keeps a plain `Option`, so check
    /// [`Process::is_closed`] to tell a closed process from a running one.
    pub fn exitcode(&self) -> Option<i32> {
        match &*self.lock_slot() {
            Slot::Started(s) => s.state.exit_code(),
            _ => None,
        }
    }

    /// The child's OS process id, for a subprocess that was started.
    ///
    /// After [`Process::close`]: `None` (Python raises `ValueError`; see
    /// [`Process::is_closed`]).
    pub fn pid(&self) -> Option<u32> {
        match &*self.lock_slot() {
            Slot::Started(s) => s.pid,
            _ => None,
        }
    }

    /// Asks the process to stop: `SIGTERM` for a subprocess (exit code -15); for a thread, see
    /// the module docs. Does nothing if it already exited.
    pub fn terminate(&self) -> Result<()> {
        self.stop(StopSignal::Terminate)
    }

    /// Stops the process with `SIGKILL` (exit code -9); for a thread, see the module docs.
    pub fn kill(&self) -> Result<()> {
        self.stop(StopSignal::Kill)
    }

    /// The async form of [`Process::terminate`]: the signal is sent by a task on shoal's actor
    /// runtime and no thread waits for it; any executor. Once polled, dropping the future does
    /// not take the signal back (the task sends it all the same). Await
    /// [`Process::join_async`] for the exit.
    ///
    /// ```no_run
    /// # async fn stop(p: shoal::Process) -> shoal::Result<()> {
    /// p.terminate_async().await?;
    /// p.join_async().await?;
    /// assert_eq!(p.exitcode(), Some(-15));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn terminate_async(&self) -> Result<()> {
        self.started_child()?
            .stop_async(StopSignal::Terminate)
            .await
    }

    /// The async form of [`Process::kill`] (see [`Process::terminate_async`]).
    pub async fn kill_async(&self) -> Result<()> {
        self.started_child()?.stop_async(StopSignal::Kill).await
    }

    fn stop(&self, signal: StopSignal) -> Result<()> {
        self.started_child()?.stop(signal)
    }

    /// The started child, to signal: [`Error::InvalidState`] before a start, after a failed
    /// one, and after `close()`.
    fn started_child(&self) -> Result<StartedChild> {
        match &*self.lock_slot() {
            Slot::Started(s) => Ok(s.child.clone()),
            Slot::Closed => Err(self.closed()),
            _ => Err(Error::invalid_state(format!(
                "process {} was not started",
                self.name
            ))),
        }
    }

    fn started_state(&self, what: &str) -> Result<Arc<ProcessState>> {
        match &*self.lock_slot() {
            Slot::Started(s) => Ok(s.state.clone()),
            Slot::Closed => Err(self.closed()),
            Slot::Failed(reason) => Err(Error::invalid_state(format!(
                "cannot {what} process {}: its start failed ({reason})",
                self.name
            ))),
            _ => Err(Error::invalid_state(format!(
                "can only {what} a started process ({} was not started)",
                self.name
            ))),
        }
    }

    fn lock_slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A process ready to launch: its actor runs and waits for [`StartChild`].
struct Prepared {
    id: String,
    name: String,
    daemon: bool,
    /// The identity of the process that starts it.
    parent: Vec<u32>,
    state: Arc<ProcessState>,
    actor: Addr<ProcessActor>,
    runtime: RuntimeRef,
}

impl Prepared {
    /// The started process, from its actor's answer to [`StartChild`] (tracked as a child of
    /// the runtime), or why it did not start.
    fn finish(
        self,
        reply: std::result::Result<Result<Option<u32>>, actix::MailboxError>,
    ) -> Result<Started> {
        let pid = match reply {
            Ok(Ok(pid)) => pid,
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(Error::Backend(format!(
                    "the process actor is not running: {e}"
                )));
            }
        };
        let child = StartedChild {
            state: self.state,
            actor: self.actor,
            pid,
        };
        self.runtime.track_child(ChildEntry {
            id: self.id,
            name: self.name,
            daemon: self.daemon,
            parent: self.parent,
            started: child.clone(),
        });
        Ok(Started {
            child,
            _runtime: self.runtime,
        })
    }
}

/// What the task that finishes a [`Process::start_async`] holds, on shoal's actor thread. If
/// the task ends without settling the start (the runtime stopped), the process is marked
/// failed rather than left starting for good. Its references go to another thread to drop: with
/// the caller, the `Process` and the runtime's guard gone, they may be the last ones, and a
/// runtime's teardown must not run on the actor thread it waits on.
struct StartTask {
    slot: Option<Arc<Mutex<Slot>>>,
    runtime: Option<RuntimeRef>,
    settled: bool,
}

impl StartTask {
    /// Records the start's outcome in the slot (see [`settle`]).
    fn settle(&mut self, outcome: Result<Started>) -> Result<()> {
        self.settled = true;
        match &self.slot {
            Some(slot) => settle(slot, outcome),
            None => outcome.map(|_| ()),
        }
    }

    /// Records a start that failed before the launch in the slot (see [`not_started`]).
    fn unstart(&mut self, failure: Failure) -> Result<()> {
        self.settled = true;
        match &self.slot {
            Some(slot) => not_started(slot, failure),
            None => Err(failure.1),
        }
    }
}

impl Drop for StartTask {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if !self.settled {
                let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
                if matches!(*slot, Slot::Starting) {
                    *slot = Slot::Failed("shoal's actor runtime stopped during the start".into());
                }
            }
            runtime::drop_elsewhere((slot, self.runtime.take()));
        }
    }
}

/// Records how a launch went in the process's slot: started, or failed (a launch that was
/// tried is not tried again).
fn settle(slot: &Mutex<Slot>, outcome: Result<Started>) -> Result<()> {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        Ok(started) => {
            *slot = Slot::Started(started);
            Ok(())
        }
        Err(e) => {
            *slot = Slot::Failed(e.to_string());
            Err(e)
        }
    }
}

impl StartedChild {
    pub(crate) fn state(&self) -> &ProcessState {
        &self.state
    }

    fn stop(&self, signal: StopSignal) -> Result<()> {
        if self.state.has_exited() {
            return Ok(());
        }
        stopped(futures::executor::block_on(
            self.actor.send(StopChild(signal)),
        ))
    }

    /// [`StartedChild::stop`] from a task of shoal's actor runtime: an actor skips a message
    /// whose reply nobody waits for any more, so the request must not live in the caller's
    /// future, which may be dropped.
    async fn stop_async(&self, signal: StopSignal) -> Result<()> {
        if self.state.has_exited() {
            return Ok(());
        }
        let actor = self.actor.clone();
        context::current()?
            .spawn(move |_, caller| async move {
                caller.finish(stopped(actor.send(StopChild(signal)).await));
            })
            .await
    }
}

/// The outcome of a [`StopChild`] request.
fn stopped(reply: std::result::Result<Result<()>, actix::MailboxError>) -> Result<()> {
    match reply {
        Ok(result) => result,
        // The actor stops once the exit is recorded: nothing left to stop.
        Err(_) => Ok(()),
    }
}

/// A child that still runs, as [`active_children`] lists it: a handle to watch, join or stop
/// it without the [`Process`] that started it.
#[derive(Clone)]
pub struct ChildProcess {
    name: String,
    daemon: bool,
    started: StartedChild,
    _runtime: RuntimeRef,
}

impl std::fmt::Debug for ChildProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildProcess")
            .field("name", &self.name)
            .field("pid", &self.started.pid)
            .field("exitcode", &self.exitcode())
            .finish()
    }
}

impl ChildProcess {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it is a daemon.
    pub fn is_daemon(&self) -> bool {
        self.daemon
    }

    /// Its OS process id, for a subprocess.
    pub fn pid(&self) -> Option<u32> {
        self.started.pid
    }

    /// True until it exits.
    pub fn is_alive(&self) -> bool {
        !self.started.state.has_exited()
    }

    /// Its exit code once it exited (see [`Process::exitcode`]).
    pub fn exitcode(&self) -> Option<i32> {
        self.started.state.exit_code()
    }

    /// Waits for its exit, at most `timeout`.
    pub fn join(&self, timeout: Option<Duration>) {
        self.started.state.wait_exited(timeout);
    }

    /// `SIGTERM` (see [`Process::terminate`]).
    pub fn terminate(&self) -> Result<()> {
        self.started.stop(StopSignal::Terminate)
    }

    /// `SIGKILL` (see [`Process::kill`]).
    pub fn kill(&self) -> Result<()> {
        self.started.stop(StopSignal::Kill)
    }
}

/// The children the calling process started that have not exited (Python's
/// `multiprocessing.active_children()`), oldest first: in a thread child, those it started
/// itself (not itself, nor its siblings, nor their children). Pool workers are not listed.
///
/// ```no_run
/// # use shoal::prelude::*;
/// # #[shoal::remote] fn nap() { std::thread::sleep(std::time::Duration::from_secs(1)); }
/// # fn main() -> shoal::Result<()> {
/// let _rt = shoal::init()?;
/// let p = Process::new(nap, ()).name("napper");
/// p.start()?;
/// let names: Vec<String> = shoal::active_children().iter().map(|c| c.name().to_string()).collect();
/// assert_eq!(names, ["napper"]);
/// # Ok(())
/// # }
/// ```
pub fn active_children() -> Vec<ChildProcess> {
    let me = context::current_process().identity;
    runtime::running_runtime()
        .map(|r| {
            r.live_children()
                .into_iter()
                .filter(|c| c.parent == me)
                .map(|c| ChildProcess {
                    name: c.name,
                    daemon: c.daemon,
                    started: c.started,
                    _runtime: r.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Gives back, on this thread, the pipe handles encoded for a child that will not start.
fn release_now(sent: Option<SentTransfers>) {
    if let Some(Err(e)) = sent.map(SentTransfers::release) {
        tracing::warn!("giving back the pipe handles of a process that did not start: {e}");
    }
}

/// The lifecycle as the handle sees it; only the actor changes it.
pub(crate) struct ProcessState {
    exit: Mutex<Option<i32>>,
    changed: Condvar,
    /// Async joiners, registered while `exit` is locked.
    wakers: Mutex<Vec<std::task::Waker>>,
}

impl ProcessState {
    fn new() -> Self {
        ProcessState {
            exit: Mutex::new(None),
            changed: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn has_exited(&self) -> bool {
        self.exit_code().is_some()
    }

    pub(crate) fn exit_code(&self) -> Option<i32> {
        *self.exit.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_exited(&self, code: i32) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(code);
        }
        drop(exit);
        self.changed.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in wakers {
            waker.wake();
        }
    }

    /// Ready once the process exited; registers `waker` otherwise.
    fn poll_exited(&self, waker: &std::task::Waker) -> std::task::Poll<()> {
        let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_some() {
            return std::task::Poll::Ready(());
        }
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
        std::task::Poll::Pending
    }

    /// Waits for the exit; returns whether it happened.
    pub(crate) fn wait_exited(&self, timeout: Option<Duration>) -> bool {
        let guard = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        match timeout {
            None => {
                let guard = self
                    .changed
                    .wait_while(guard, |exit| exit.is_none())
                    .unwrap_or_else(|p| p.into_inner());
                guard.is_some()
            }
            Some(timeout) => {
                let (guard, _) = self
                    .changed
                    .wait_timeout_while(guard, timeout, |exit| exit.is_none())
                    .unwrap_or_else(|p| p.into_inner());
                guard.is_some()
            }
        }
    }
}
