//! The process-wide context: the configuration and store of the runtime this process belongs to,
//! and who this process is.
//!
//! `shoal::init()` installs a context in the parent; a worker installs one built from its task
//! record. Handles that travel between processes (queues, locks, ...) carry only their address
//! and find the store here, so a handle received as an argument works in the child as it did in
//! the parent.
//!
//! A thread child (start method `thread`) shares the parent's context but has its own
//! [`ProcessInfo`] and a termination flag, kept in a thread-local while its target runs.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::Store;

/// Who a process is, as Python's `current_process()` tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// `MainProcess`, or the child's name (`Process-1`, `Process-1:2`, or the name it was given).
    pub name: String,
    /// Position in the process tree: empty for the main process, `[1]` for its first child,
    /// `[1, 2]` for that child's second child.
    pub identity: Vec<u32>,
    /// A daemonic process (a daemon child, or a pool worker) may not start children.
    pub daemon: bool,
}

impl ProcessInfo {
    /// The main process.
    pub fn main() -> Self {
        ProcessInfo {
            name: "MainProcess".into(),
            identity: Vec::new(),
            daemon: false,
        }
    }
}

/// The runtime this process belongs to.
#[derive(Debug)]
pub struct Context {
    config: Config,
    store: Arc<Store>,
    process: ProcessInfo,
}

impl Context {
    /// A context for `process`, using `store`.
    pub fn new(config: Config, store: Arc<Store>, process: ProcessInfo) -> Self {
        Context {
            config,
            store,
            process,
        }
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// This process.
    pub fn process(&self) -> &ProcessInfo {
        &self.process
    }
}

static CURRENT: RwLock<Option<Arc<Context>>> = RwLock::new(None);

/// Installs the context of this process, replacing any previous one.
pub fn install(context: Arc<Context>) {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(context);
}

/// Removes the context (the runtime shut down).
pub fn clear() {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = None;
}

/// The context, if a runtime is running in this process.
pub fn try_current() -> Option<Arc<Context>> {
    CURRENT.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The context, or [`Error::InvalidState`] telling the caller to start a runtime.
pub fn current() -> Result<Arc<Context>> {
    try_current().ok_or_else(|| {
        Error::invalid_state("no shoal runtime in this process: call shoal::init() first")
    })
}

struct ThreadProcess {
    info: ProcessInfo,
    terminate: Arc<AtomicBool>,
}

thread_local! {
    static THREAD_PROCESS: RefCell<Option<ThreadProcess>> = const { RefCell::new(None) };
}

/// Marks the current thread as running the thread child `info` until the guard is dropped.
pub fn enter_thread_process(info: ProcessInfo, terminate: Arc<AtomicBool>) -> ThreadProcessGuard {
    THREAD_PROCESS.with(|t| *t.borrow_mut() = Some(ThreadProcess { info, terminate }));
    ThreadProcessGuard { _private: () }
}

/// Ends a thread child's identity on drop.
#[derive(Debug)]
pub struct ThreadProcessGuard {
    _private: (),
}

impl Drop for ThreadProcessGuard {
    fn drop(&mut self) {
        THREAD_PROCESS.with(|t| *t.borrow_mut() = None);
    }
}

fn current_process_info() -> Option<ProcessInfo> {
    THREAD_PROCESS.with(|t| t.borrow().as_ref().map(|p| p.info.clone()))
}

/// Who the calling code runs as: a thread child, the worker's task, or the main process.
pub fn current_process() -> ProcessInfo {
    current_process_info()
        .or_else(|| try_current().map(|c| c.process.clone()))
        .unwrap_or_else(ProcessInfo::main)
}

/// True when the calling code runs in a thread child whose `terminate()` or `kill()` was called.
/// Thread children cannot be stopped from outside; long-running targets poll this.
pub fn termination_requested() -> bool {
    THREAD_PROCESS.with(|t| {
        t.borrow()
            .as_ref()
            .is_some_and(|p| p.terminate.load(Ordering::Acquire))
    })
}

/// Work that must finish before this process's runtime goes away (a queue feeder's last
/// flush), run by [`run_exit_hooks`].
type ExitHook = Box<dyn Fn() + Send + Sync>;

static EXIT_HOOKS: std::sync::Mutex<Vec<ExitHook>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run when the runtime shuts down or a worker's task ends.
pub fn register_exit_hook(hook: impl Fn() + Send + Sync + 'static) {
    EXIT_HOOKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Box::new(hook));
}

/// Runs the registered exit hooks (each may run several times; hooks are idempotent).
pub fn run_exit_hooks() {
    let hooks = EXIT_HOOKS.lock().unwrap_or_else(|p| p.into_inner());
    for hook in hooks.iter() {
        hook();
    }
}
