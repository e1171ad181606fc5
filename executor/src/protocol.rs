//! The executor protocol: the messages every backend answers.
//!
//! A backend moves no data itself. It is asked to [`Launch`] a worker for a task (the worker
//! reads the task from Redis) or a thread body, to [`SignalWorker`] one it launched, and
//! whether one still runs ([`QueryWorker`]); it reports each worker's end with [`WorkerExited`] to the recipient named at launch. Exit codes
//! follow Python: the process's own code when it exits, `-N` when signal `N` ended it.
//! [`Executor`] bundles the recipients so backends are interchangeable.

use std::collections::BTreeMap;

use actix::{Message, Recipient};
use shoal_core::context::ProcessInfo;
use shoal_core::error::{Error, Result};

/// The body of a thread child: runs the target and returns its exit code.
pub type ThreadBody = Box<dyn FnOnce() -> i32 + Send>;

/// What to run.
pub enum Workload {
    /// This binary in worker mode, reading the task `task_id` from the store.
    Subprocess {
        /// The task (process) id.
        task_id: String,
    },
    /// A thread of this process. Only the local backend runs these.
    Thread {
        /// The target.
        body: ThreadBody,
        /// Who the thread runs as (for `current_process()`).
        info: ProcessInfo,
    },
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Subprocess { task_id } => f
                .debug_struct("Subprocess")
                .field("task_id", task_id)
                .finish(),
            Workload::Thread { info, .. } => f.debug_struct("Thread").field("info", info).finish(),
        }
    }
}

/// Launches one worker.
#[derive(Message)]
#[rtype(result = "Result<Launched>")]
pub struct Launch {
    /// The worker's id (the process id in the key schema); unique per executor.
    pub id: String,
    /// The process's name, for thread names and logs.
    pub name: String,
    /// What to run.
    pub workload: Workload,
    /// Environment variables for subprocesses: `multiprocessing.env_vars`, and the parent's
    /// authkey in `SHOAL_WORKER_AUTHKEY` (see `task::hand_over_authkey`: a backend that
    /// cannot keep a variable private, as a Kubernetes Job's spec, passes this one otherwise).
    pub env: BTreeMap<String, String>,
    /// The worker must not outlive the process that launched it: pool workers and daemon
    /// children. A local subprocess gets the parent-death signal (`SIGTERM` when this process
    /// dies, even by `SIGKILL`); remote backends rely on the worker watching its driver's
    /// liveness key instead.
    pub die_with_parent: bool,
    /// Who is told when the worker ends.
    pub notify: Recipient<WorkerExited>,
}

/// A launched worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launched {
    /// The OS process id, for subprocesses.
    pub pid: Option<u32>,
}

/// How to stop a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// `SIGTERM`; exit code -15.
    Terminate,
    /// `SIGKILL`; exit code -9.
    Kill,
}

impl StopSignal {
    /// The exit code a worker stopped this way reports.
    pub fn exit_code(self) -> i32 {
        match self {
            StopSignal::Terminate => -15,
            StopSignal::Kill => -9,
        }
    }
}

/// Sends a stop signal to a launched worker. Signalling a worker that already ended is not an
/// error (Python's `terminate()` on an exited process does nothing).
#[derive(Debug, Message)]
#[rtype(result = "Result<()>")]
pub struct SignalWorker {
    /// The worker's id.
    pub id: String,
    /// The signal.
    pub signal: StopSignal,
}

/// Asks whether a launched worker is still running.
#[derive(Debug, Message)]
#[rtype(result = "WorkerStatus")]
pub struct QueryWorker {
    /// The worker's id.
    pub id: String,
}

/// What an executor knows of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerStatus {
    /// Launched and not known to have ended.
    Running {
        /// The OS process id, for subprocesses.
        pid: Option<u32>,
    },
    /// Ended (its [`WorkerExited`] was sent) or never launched by this executor.
    NotRunning,
}

/// A worker ended.
#[derive(Clone, Debug, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub struct WorkerExited {
    /// The worker's id.
    pub id: String,
    /// Its exit code (negative: ended by that signal).
    pub code: i32,
    /// Its program never ran: the backend could not start it (a pod the cluster refused to
    /// create, an image that cannot be pulled). `code` is then 1. A pool counts these apart:
    /// they say the deployment is wrong, not the work.
    pub never_started: bool,
}

/// Asks an executor to remove what it started that outlives its workers (a remote backend's
/// Jobs), before the runtime stops. Answered once that is done (or failed: logged).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// A handle to one backend's executor actor.
#[derive(Clone, Debug)]
pub struct Executor {
    backend: &'static str,
    launch: Recipient<Launch>,
    signal: Recipient<SignalWorker>,
    query: Recipient<QueryWorker>,
    shutdown: Option<Recipient<Shutdown>>,
}

impl Executor {
    /// An executor from a backend's recipients.
    pub fn new(
        backend: &'static str,
        launch: Recipient<Launch>,
        signal: Recipient<SignalWorker>,
        query: Recipient<QueryWorker>,
    ) -> Self {
        Executor {
            backend,
            launch,
            signal,
            query,
            shutdown: None,
        }
    }

    /// The same executor, told when the runtime shuts down (see [`Shutdown`]).
    pub fn with_shutdown(mut self, shutdown: Recipient<Shutdown>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// Lets the backend remove what it started; returns when it is done. Nothing to do for a
    /// backend that did not ask to be told.
    pub async fn shutdown(&self) {
        if let Some(shutdown) = &self.shutdown {
            let _ = shutdown.send(Shutdown).await;
        }
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Launches a worker.
    pub async fn launch(&self, launch: Launch) -> Result<Launched> {
        self.launch
            .send(launch)
            .await
            .map_err(|e| self.mailbox_error(e))?
    }

    /// Signals a worker.
    pub async fn signal(&self, id: String, signal: StopSignal) -> Result<()> {
        self.signal
            .send(SignalWorker { id, signal })
            .await
            .map_err(|e| self.mailbox_error(e))?
    }

    /// Whether a worker is still running.
    pub async fn status(&self, id: String) -> Result<WorkerStatus> {
        self.query
            .send(QueryWorker { id })
            .await
            .map_err(|e| self.mailbox_error(e))
    }

    fn mailbox_error(&self, e: actix::MailboxError) -> Error {
        Error::Backend(format!("the {} executor is not running: {e}", self.backend))
    }
}
