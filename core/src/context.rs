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
//!
//! # Async calls
//!
//! The context knows where async work runs ([`Context::spawn`], [`Context::async_store`]): on the
//! actor system of the runtime, which hands its Tokio runtime over when it starts
//! ([`Context::set_actor_runtime`]) and takes it back when it stops. A process without a running
//! runtime (a worker whose task started no process of its own) starts a small actor system of
//! its own (thread `shoal-async`) at its first async call, and keeps it as long as the context.
//!
//! Calls made only of Redis requests, with nothing to undo if the caller goes, may run on the
//! caller's own Tokio runtime instead, from a task of it ([`Context::spawn_near_caller`]): the
//! context keeps connections for each runtime that called in, until it shuts down.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::actors::{ActorSystem, AsyncCall, Caller};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{AsyncStore, Store};

/// Who a process is, as Python's `current_process()` tells: name, place in the process tree,
/// daemon flag, authentication key and parent.
///
/// ```
/// let me = shoal_core::context::current_process();
/// assert_eq!(me.name, "MainProcess");
/// assert_eq!(me.pid(), std::process::id());
/// assert!(me.is_alive() && me.exitcode().is_none());
/// assert!(me.parent.is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// `MainProcess`, or the child's name (`Process-1`, `Process-1:2`, or the name it was given).
    pub name: String,
    /// Position in the process tree: empty for the main process, `[1]` for its first child,
    /// `[1, 2]` for that child's second child.
    pub identity: Vec<u32>,
    /// A daemonic process (a daemon child, or a pool worker) may not start children.
    pub daemon: bool,
    /// The authentication key: made at random by the main process, inherited by its children
    /// (Python's `authkey`).
    pub authkey: AuthKey,
    /// The process that started this one; `None` in the main process.
    pub parent: Option<ParentInfo>,
}

impl ProcessInfo {
    /// The main process (with this process's authentication key).
    pub fn main() -> Self {
        ProcessInfo {
            name: "MainProcess".into(),
            identity: Vec::new(),
            daemon: false,
            authkey: AuthKey::of_this_process(),
            parent: None,
        }
    }

    /// The operating system's id of the process the code runs in (a thread child shares its
    /// parent's).
    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// The same as [`ProcessInfo::pid`] (Python's `ident`).
    pub fn ident(&self) -> u32 {
        self.pid()
    }

    /// Always true: the code asking is running (Python's `current_process().is_alive()`).
    pub fn is_alive(&self) -> bool {
        true
    }

    /// Always `None`: the process asking has not exited.
    pub fn exitcode(&self) -> Option<i32> {
        None
    }
}

/// A process's authentication key (Python's `current_process().authkey`): 32 random bytes made
/// by the main process and inherited by every process it starts, which uses it to sign what it
/// sends to managers and actors. Its `Debug` output does not show the bytes.
///
/// ```
/// use shoal_core::context::AuthKey;
/// let key = AuthKey::from_bytes(b"secret".to_vec());
/// assert_eq!(key.as_bytes(), b"secret");
/// assert_eq!(format!("{key:?}"), "AuthKey(6 bytes)");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AuthKey(#[serde(with = "serde_bytes")] Vec<u8>);

impl AuthKey {
    /// A new random key of 32 bytes.
    pub fn generate() -> AuthKey {
        let mut bytes = Vec::with_capacity(32);
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        AuthKey(bytes)
    }

    /// A key with these bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> AuthKey {
        AuthKey(bytes.into())
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key this process was started with: its parent's, or one made at random once in a
    /// main process.
    pub fn of_this_process() -> AuthKey {
        static MAIN: std::sync::LazyLock<AuthKey> = std::sync::LazyLock::new(AuthKey::generate);
        if let Some(key) = AUTHKEY.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return key;
        }
        try_current()
            .map(|c| c.process.authkey.clone())
            .unwrap_or_else(|| MAIN.clone())
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

/// The process that started this one (Python's `parent_process()`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParentInfo {
    /// Its name.
    pub name: String,
    /// Its operating-system id, when it runs on this host.
    pub pid: Option<u32>,
}

impl ParentInfo {
    /// Whether the parent still runs. Known on the local backend (by its pid); `true` when
    /// the parent runs elsewhere (its pool or process handles notice its death instead).
    pub fn is_alive(&self) -> bool {
        match self.pid {
            Some(pid) if pid == std::process::id() => true,
            Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| {
                    let state = stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next());
                    !matches!(state, Some("Z") | Some("X"))
                })
                .unwrap_or(false),
            None => true,
        }
    }
}

/// The runtime this process belongs to.
pub struct Context {
    config: Config,
    store: Arc<Store>,
    process: ProcessInfo,
    /// Where async calls run: the runtime's actor system, or this context's own.
    async_store: RwLock<Option<Arc<AsyncStore>>>,
    /// The actor system started for async calls when no runtime handed one over.
    own_actors: Mutex<Option<ActorSystem>>,
    /// The Tokio runtimes of the application that called in ([`Context::spawn_near_caller`]),
    /// each until it shuts down.
    caller_runtimes: Arc<Mutex<HashMap<tokio::runtime::Id, CallerRuntime>>>,
}

/// What a caller's Tokio runtime is to [`Context::spawn_near_caller`].
enum CallerRuntime {
    /// Calls run there, with this async access opened there.
    Usable(Arc<AsyncStore>),
    /// Built without IO or timers (or in a build where a panic aborts, which the check needs
    /// to catch): calls run on the actor system.
    Unusable,
}

/// Held by a task that never ends, spawned on each caller's runtime: Tokio drops it when that
/// runtime shuts down, and with it the runtime's entry (its connections, and its id, which
/// Tokio may give to a later runtime).
struct ForgetAtShutdown {
    id: tokio::runtime::Id,
    runtimes: std::sync::Weak<Mutex<HashMap<tokio::runtime::Id, CallerRuntime>>>,
}

impl Drop for ForgetAtShutdown {
    fn drop(&mut self) {
        if let Some(runtimes) = self.runtimes.upgrade() {
            runtimes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.id);
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .field("store", &self.store)
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `process`, using `store`.
    pub fn new(config: Config, store: Arc<Store>, process: ProcessInfo) -> Self {
        Context {
            config,
            store,
            process,
            async_store: RwLock::new(None),
            own_actors: Mutex::new(None),
            caller_runtimes: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The runtime's actor system started on `runtime`: async calls run there from now on.
    pub fn set_actor_runtime(&self, runtime: tokio::runtime::Handle) {
        let async_store = AsyncStore::new(self.store.clone(), runtime);
        *self.async_store.write().unwrap_or_else(|p| p.into_inner()) = Some(async_store);
    }

    /// The runtime's actor system is stopping: later async calls run on an actor system of this
    /// context's own. Calls still running on the stopped one end with an error.
    pub fn clear_actor_runtime(&self) {
        *self.async_store.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Async access to the store, on the runtime's actor system (or this context's own,
    /// started now if there is none; see the module docs).
    pub fn async_store(&self) -> Result<Arc<AsyncStore>> {
        if let Some(async_store) = &*self.async_store.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(async_store.clone());
        }
        let mut own = self.own_actors.lock().unwrap_or_else(|p| p.into_inner());
        let mut current = self.async_store.write().unwrap_or_else(|p| p.into_inner());
        if let Some(async_store) = &*current {
            return Ok(async_store.clone());
        }
        let system = match own.take() {
            Some(system) => system,
            None => ActorSystem::start("shoal-async")?,
        };
        let async_store = AsyncStore::new(self.store.clone(), system.runtime().clone());
        *own = Some(system);
        *current = Some(async_store.clone());
        Ok(async_store)
    }

    /// Runs `work` as a task on the actor system ([`Context::async_store`]); the returned
    /// future, which any executor can await, resolves to what `work` answers through its
    /// [`Caller`].
    pub fn spawn<T, F, Fut>(&self, work: F) -> AsyncCall<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<AsyncStore>, Caller<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        match self.async_store() {
            Ok(async_store) => async_store.spawn(work),
            Err(e) => AsyncCall::failed(e),
        }
    }

    /// As [`Context::spawn`], but on the caller's own Tokio runtime when it is called from a
    /// task of one (`tokio::spawn`, an axum or actix handler), with connections opened there:
    /// the call's requests and replies then wake no thread of shoal's (a hop to the actor
    /// system and one back cost about as much as a Redis round trip on a busy machine).
    /// Elsewhere it is [`Context::spawn`]: on another executor, on a thread that only entered
    /// a runtime, in `block_on`'s own future (no task: nothing may drive the runtime while it
    /// waits), on a runtime built without IO or timers, and in a build where a panic aborts.
    /// A task that blocks its runtime on the call (`futures::executor::block_on` in a task, a
    /// `spawn_blocking` closure's `block_on` while nothing drives a current-thread runtime)
    /// waits forever.
    ///
    /// Only for work made of Redis calls with nothing to undo: the task does not run on the
    /// actor system, and it ends with the caller's runtime if that shuts down first.
    pub fn spawn_near_caller<T, F, Fut>(&self, work: F) -> AsyncCall<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<AsyncStore>, Caller<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let near = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if tokio::task::try_id().is_some() => self.caller_store(runtime),
            _ => None,
        };
        match near {
            Some(store) => store.spawn(work),
            None => self.spawn(work),
        }
    }

    /// Async access to the store from `runtime` (the actor system's own when it is that one),
    /// or `None` when calls cannot run there.
    fn caller_store(&self, runtime: tokio::runtime::Handle) -> Option<Arc<AsyncStore>> {
        let id = runtime.id();
        if let Some(actors) = &*self.async_store.read().unwrap_or_else(|p| p.into_inner())
            && actors.runtime().id() == id
        {
            return Some(actors.clone());
        }
        let known = |runtimes: &HashMap<tokio::runtime::Id, CallerRuntime>| {
            runtimes.get(&id).map(|known| match known {
                CallerRuntime::Usable(store) => Some(store.clone()),
                CallerRuntime::Unusable => None,
            })
        };
        if let Some(known) = known(
            &self
                .caller_runtimes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
            return known;
        }
        // Checked unlocked: a panic hook may take its time, or end the process.
        let adopted = match drivers_of_current_runtime() {
            Drivers::Both => {
                CallerRuntime::Usable(AsyncStore::new(self.store.clone(), runtime.clone()))
            }
            Drivers::Missing => {
                tracing::debug!(
                    "async calls from Tokio runtime {id} run on shoal's actor runtime: it has \
                     no IO or no timers (or a panic aborts in this build)"
                );
                CallerRuntime::Unusable
            }
            // Not known (no socket to try with): this call only runs on shoal's runtime.
            Drivers::Unknown => return None,
        };
        let mut runtimes = self
            .caller_runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Another call from the same runtime got here first: its entry stands.
        if let Some(known) = known(&runtimes) {
            return known;
        }
        let store = match &adopted {
            CallerRuntime::Usable(store) => Some(store.clone()),
            CallerRuntime::Unusable => None,
        };
        runtimes.insert(id, adopted);
        // Unlocked first: a runtime already shutting down drops the task, and so the entry,
        // inside `spawn`.
        drop(runtimes);
        let forget = ForgetAtShutdown {
            id,
            runtimes: Arc::downgrade(&self.caller_runtimes),
        };
        drop(runtime.spawn(async move {
            let _forget = forget;
            std::future::pending::<()>().await
        }));
        store
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

/// What the Tokio runtime entered on this thread has of the drivers that connections opened on
/// it need.
enum Drivers {
    /// IO and timers.
    Both,
    /// No IO or no timers, or a build where a panic aborts (nothing was tried).
    Missing,
    /// The check could not be made (no socket pair to try IO with: out of descriptors).
    Unknown,
}

/// Tokio has no query for its drivers: using a missing one panics, so this tries each once,
/// catching the panic (whose message the panic hook still gets, once per runtime). In a build
/// where a panic aborts, nothing is tried.
fn drivers_of_current_runtime() -> Drivers {
    if !cfg!(panic = "unwind") {
        return Drivers::Missing;
    }
    let Ok((one, _other)) = std::os::unix::net::UnixStream::pair() else {
        return Drivers::Unknown;
    };
    if one.set_nonblocking(true).is_err() {
        return Drivers::Unknown;
    }
    let tried = std::panic::catch_unwind(move || {
        drop(tokio::time::sleep(std::time::Duration::ZERO));
        tokio::net::UnixStream::from_std(one).map(drop)
    });
    match tried {
        Ok(Ok(())) => Drivers::Both,
        Ok(Err(_)) => Drivers::Unknown,
        Err(_) => Drivers::Missing,
    }
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

/// True on a thread that runs a thread child (between [`enter_thread_process`] and the drop of
/// its guard).
pub fn in_thread_process() -> bool {
    THREAD_PROCESS.with(|t| t.borrow().is_some())
}

fn current_process_info() -> Option<ProcessInfo> {
    THREAD_PROCESS.with(|t| t.borrow().as_ref().map(|p| p.info.clone()))
}

/// Who the calling code runs as: a thread child, the worker's task, or the main process.
pub fn current_process() -> ProcessInfo {
    let mut info = current_process_info()
        .or_else(|| try_current().map(|c| c.process.clone()))
        .unwrap_or_else(ProcessInfo::main);
    if let Some(key) = AUTHKEY.read().unwrap_or_else(|p| p.into_inner()).clone() {
        info.authkey = key;
    }
    info
}

/// The authkey [`set_authkey`] gave this process, if any.
static AUTHKEY: RwLock<Option<AuthKey>> = RwLock::new(None);

/// Sets this process's authkey (Python's `current_process().authkey = key`): what it signs with
/// and checks against from now on, and what the children, pool workers and actor hosts it starts
/// afterwards inherit. Set it before starting them.
pub fn set_authkey(key: AuthKey) {
    *AUTHKEY.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
}

thread_local! {
    /// The cancellation flag of the pool task this thread runs, set by the pool worker.
    static TASK_CANCEL: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Makes `flag` the cancellation flag of the pool tasks this thread runs (`None`: none); the
/// pool worker sets it when the call its task belongs to is cancelled.
pub fn set_task_cancel_flag(flag: Option<Arc<AtomicBool>>) {
    TASK_CANCEL.with(|t| *t.borrow_mut() = flag);
}

/// True when the calling code should stop: it runs in a thread child whose `terminate()` or
/// `kill()` was called (threads cannot be stopped from outside), or in a pool task whose call
/// was cancelled (`AsyncResult::cancel`, a dropped future or stream, a deadline). Long-running
/// code polls this and returns.
pub fn termination_requested() -> bool {
    let task_cancelled = TASK_CANCEL.with(|t| {
        t.borrow()
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    });
    task_cancelled
        || THREAD_PROCESS.with(|t| {
            t.borrow()
                .as_ref()
                .is_some_and(|p| p.terminate.load(Ordering::Acquire))
        })
}

thread_local! {
    /// This thread runs a pool task (between [`enter_pool_task`] and the drop of its guard).
    static IN_POOL_TASK: Cell<bool> = const { Cell::new(false) };
    /// This thread runs the exit hooks at the end of a pool worker's batch of tasks
    /// ([`run_pool_batch_end_hooks`]), not at the end of a process.
    static ENDING_POOL_BATCH: Cell<bool> = const { Cell::new(false) };
}

/// How many threads of this process run a pool task now.
static POOL_TASKS_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Marks the calling thread as running a pool task until the guard is dropped (the pool worker
/// calls it around each chunk it runs): what the task makes meanwhile belongs to the task, not
/// to the worker (see [`in_pool_task`]).
pub fn enter_pool_task() -> PoolTaskGuard {
    IN_POOL_TASK.with(|t| t.set(true));
    POOL_TASKS_RUNNING.fetch_add(1, Ordering::AcqRel);
    PoolTaskGuard {
        _not_send: std::marker::PhantomData,
    }
}

/// Ends what [`enter_pool_task`] began, on the thread that began it.
pub struct PoolTaskGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for PoolTaskGuard {
    fn drop(&mut self) {
        IN_POOL_TASK.with(|t| t.set(false));
        POOL_TASKS_RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// True when the calling code runs as part of a pool task: on the thread that runs it, or, in a
/// pool worker that is a process of its own, on any thread of it (threads a task started) while
/// a task runs. A pool worker's initializer, and code that runs between tasks, are not. In a
/// thread child (a worker of a pool whose workers are threads), only its own thread counts.
pub fn in_pool_task() -> bool {
    IN_POOL_TASK.with(Cell::get)
        || (!in_thread_process() && POOL_TASKS_RUNNING.load(Ordering::Acquire) > 0)
}

/// Runs the exit hooks at the end of a pool worker's batch of tasks (what the tasks did must be
/// done before their results are sent): [`ending_pool_batch`] is true in them, on this thread,
/// so a hook can end only what the tasks made and leave what lives as long as the worker
/// process (what its initializer made).
pub fn run_pool_batch_end_hooks() {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ENDING_POOL_BATCH.with(|t| t.set(false));
        }
    }
    ENDING_POOL_BATCH.with(|t| t.set(true));
    let _reset = Reset;
    run_exit_hooks();
}

/// True in the exit hooks [`run_pool_batch_end_hooks`] runs (the end of a pool worker's batch of
/// tasks, not the end of the process or thread child).
pub fn ending_pool_batch() -> bool {
    ENDING_POOL_BATCH.with(Cell::get)
}

/// Work that must finish before this process's runtime goes away (a queue feeder's last
/// flush), run by [`run_exit_hooks`].
type ExitHook = Arc<dyn Fn() + Send + Sync>;

static EXIT_HOOKS: std::sync::Mutex<Vec<ExitHook>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run when the runtime shuts down or a worker's task ends (and after each
/// batch of a pool worker's tasks: see [`ending_pool_batch`]).
pub fn register_exit_hook(hook: impl Fn() + Send + Sync + 'static) {
    EXIT_HOOKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::new(hook));
}

/// Runs the registered exit hooks (each may run several times; hooks are idempotent).
///
/// They run outside the registry's lock, one at a time in their order of registration, a hook
/// registered meanwhile included: a hook waits (for a feeder's flush, for background
/// releases), and what it waits for may register a hook of its own (which must run in this
/// pass too), or another thread may run the hooks meanwhile.
pub fn run_exit_hooks() {
    let mut next = 0;
    loop {
        let hook = EXIT_HOOKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(next)
            .cloned();
        let Some(hook) = hook else {
            return;
        };
        hook();
        next += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_hook_may_wait_for_work_that_registers_a_hook_which_runs_too() {
        use std::sync::atomic::AtomicU32;
        static LATE_HOOK_RAN: AtomicU32 = AtomicU32::new(0);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let registered = std::sync::Once::new();
            register_exit_hook(move || {
                // Work on another thread that registers its own hook (a first background
                // release), waited for by this hook; once.
                registered.call_once(|| {
                    let _ = std::thread::spawn(|| {
                        register_exit_hook(|| {
                            LATE_HOOK_RAN.fetch_add(1, Ordering::SeqCst);
                        })
                    })
                    .join();
                });
            });
            run_exit_hooks();
            let _ = done.send(());
        });
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_ok(),
            "the hooks deadlocked on their own registry"
        );
        assert_eq!(
            LATE_HOOK_RAN.load(Ordering::SeqCst),
            1,
            "the hook registered during the pass did not run in it"
        );
    }

    fn drivers_of(runtime: &tokio::runtime::Runtime) -> Drivers {
        let _entered = runtime.enter();
        drivers_of_current_runtime()
    }

    #[test]
    fn a_runtime_is_usable_only_with_io_and_timers() {
        let build = |io: bool, time: bool| {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            if io {
                builder.enable_io();
            }
            if time {
                builder.enable_time();
            }
            builder.build().expect("runtime")
        };
        assert!(matches!(drivers_of(&build(true, true)), Drivers::Both));
        // Tokio panics on the missing driver; the check catches it (its message is printed).
        assert!(matches!(drivers_of(&build(true, false)), Drivers::Missing));
        assert!(matches!(drivers_of(&build(false, true)), Drivers::Missing));
        assert!(matches!(drivers_of(&build(false, false)), Drivers::Missing));
    }
}
