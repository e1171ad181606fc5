//! The runtime: what `shoal::init()` starts and what dropping [`Runtime`] stops.
//!
//! A runtime owns, for one process:
//!
//! * the store: an embedded `redis-server` on a private Unix socket when no `redis.url` is set
//!   and the backend is local (see `shoal_core::store::embedded`), or a connection to the
//!   configured URL;
//! * the actor system (one thread, `shoal-actors`) with the executor actor of the backend; the
//!   async forms of the primitives run their Redis work there too (it is handed to the process
//!   context at start and taken back at shutdown);
//! * the children started through it, for the shutdown rules below.
//!
//! One runtime exists per process. `init()` while one is running returns another guard to it if
//! the configuration is the same (so tests running on several threads can each call `init()`;
//! a configuration without `redis.url` accepts the running store), and
//! [`Error::InvalidState`] otherwise. The runtime shuts down when the last guard and the last
//! started [`Process`](crate::Process) handle are dropped, or at [`Runtime::shutdown`]:
//!
//! 1. daemon children still running are terminated (and killed if they ignore it for 5 s);
//! 2. non-daemon children are joined: the program waits for them, as Python does at exit;
//! 3. the actor system stops, then the embedded `redis-server` (its directory is removed).
//!
//! A worker process (a child) gets a runtime lazily, the first time its task starts a process of
//! its own; the worker shuts it down when the task ends, joining those grandchildren.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use shoal_core::actors::ActorSystem;
use shoal_core::config::{Backend, Config};
use shoal_core::context::{self, Context, ProcessInfo};
use shoal_core::error::{Error, Result};
use shoal_core::store::embedded::EmbeddedRedis;
use shoal_core::store::{Store, StoreSettings};
use shoal_executor::local::{LocalExecutor, LocalSettings};
use shoal_executor::protocol::{Executor, StopSignal};
use shoal_executor::task::TaskAddress;

use crate::actor::HostSupervisor;
use crate::actor::hosts::{StartHosts, StopHosts};
use crate::process::ProcessState;
use actix::Actor as _;
use shoal_executor::actor::HostKeys;

/// How long a terminated daemon child gets before it is killed at shutdown.
const DAEMON_GRACE: Duration = Duration::from_secs(5);

static ACTIVE: Mutex<Weak<RuntimeInner>> = Mutex::new(Weak::new());
static WORKER_RUNTIME: Mutex<Option<RuntimeRef>> = Mutex::new(None);
/// Set once this process runs its worker task: a later `init()` (in the task's own code) is
/// not a second worker start.
static IN_WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A guard on the running runtime; the runtime shuts down when the last guard (and the last
/// started `Process` handle) is dropped.
#[derive(Debug)]
pub struct Runtime {
    inner: RuntimeRef,
    /// Handed to a child's own code (a worker's task, a thread child): the runtime belongs to
    /// the process (or thread) that started the child, and this handle never shuts it down.
    borrowed: bool,
}

/// An owning reference to the running runtime: what [`Runtime`] and every other holder that
/// keeps the runtime alive (a `Pool`, a started `Process`, a worker's runtime) owns instead of a
/// bare `Arc<RuntimeInner>`, so that the rule of its drop below holds for each of them.
///
/// The last reference shuts the runtime down where it is dropped, except on a thread child's
/// own thread: that shutdown joins the thread children, that very one among them (it ends only
/// after its body returns), so there it would wait for itself forever; the runtime is dropped
/// on a thread of its own instead ([`drop_elsewhere`]). Any other reference lets go here and
/// now, so that the main thread's drop, when it is the last, runs the whole shutdown before
/// the process exits.
///
/// It dereferences to the `RuntimeInner`, never to the `Arc`: a holder can only clone the
/// `RuntimeRef` (or take a [`RuntimeRef::downgrade`]d reference), not the `Arc` in it.
pub(crate) struct RuntimeRef {
    /// Taken out only by `Drop` (see there).
    inner: std::mem::ManuallyDrop<Arc<RuntimeInner>>,
}

impl RuntimeRef {
    /// Owns `inner` under the drop rule above.
    fn new(inner: Arc<RuntimeInner>) -> RuntimeRef {
        RuntimeRef {
            inner: std::mem::ManuallyDrop::new(inner),
        }
    }
}

impl RuntimeRef {
    /// A weak reference to the runtime (which keeps it from nothing).
    pub(crate) fn downgrade(&self) -> Weak<RuntimeInner> {
        Arc::downgrade(&self.inner)
    }
}

impl Clone for RuntimeRef {
    fn clone(&self) -> RuntimeRef {
        RuntimeRef::new(Arc::clone(&self.inner))
    }
}

impl std::ops::Deref for RuntimeRef {
    type Target = RuntimeInner;

    fn deref(&self) -> &RuntimeInner {
        &self.inner
    }
}

impl std::fmt::Debug for RuntimeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self.inner, f)
    }
}

impl Drop for RuntimeRef {
    fn drop(&mut self) {
        // SAFETY: `inner` is taken out here, once, as the reference is dropped; nothing reads
        // it afterwards (this is the last use of `self`, and `ManuallyDrop` keeps the field's
        // own drop from running), so it is neither used nor dropped twice.
        #[allow(unsafe_code)]
        let inner = unsafe { std::mem::ManuallyDrop::take(&mut self.inner) };
        // `Arc::into_inner` (not a count read first) so that of two references dropped at once
        // exactly one sees that it is the last.
        if let Some(inner) = Arc::into_inner(inner)
            && context::in_thread_process()
        {
            drop_elsewhere(inner);
        }
    }
}

/// The state of a running runtime.
pub(crate) struct RuntimeInner {
    /// This runtime's id: what its remote workers are labelled with.
    id: String,
    context: Arc<Context>,
    actors: Mutex<ActorSystem>,
    executor: Executor,
    children: Mutex<Vec<ChildEntry>>,
    embedded: Mutex<Option<EmbeddedRedis>>,
    /// The actor hosts, once this runtime spawned an actor.
    actor_hosts: Mutex<Option<actix::Addr<HostSupervisor>>>,
    /// The liveness key remote `Process` workers watch, once one was started.
    liveness: Mutex<Option<(actix::Addr<crate::liveness::DriverLiveness>, String, u64)>>,
    /// The pools started through this runtime (to drain them at shutdown).
    pools: Mutex<Vec<crate::pool::PoolEntry>>,
    /// `Runtime::shutdown_within` began: no new pool, call or process.
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RuntimeInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeInner")
            .field("id", &self.id)
            .field("store", self.context.store())
            .finish_non_exhaustive()
    }
}

/// A child the runtime must terminate or join at shutdown.
pub(crate) struct ChildEntry {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) daemon: bool,
    /// The identity of the process that started it (`[]` for the main process, a thread
    /// child's own otherwise): whose `active_children()` lists it.
    pub(crate) parent: Vec<u32>,
    pub(crate) started: crate::process::StartedChild,
}

impl ChildEntry {
    fn state(&self) -> &ProcessState {
        self.started.state()
    }
}

/// Starts the runtime from the configuration found by [`Config::load`].
///
/// In a worker process (a child started by shoal) this never returns: it runs the child's task
/// and exits with its exit code. Call it first thing in `main`. Called again by the task's own
/// code (a child's function, or a library it calls), it returns the worker's runtime, which
/// the task already runs in; so it does in a thread child, which gets the runtime that started
/// it. Such a handle never shuts that runtime down.
pub fn init() -> Result<Runtime> {
    run_worker_if_requested();
    if let Some(own) = childs_runtime() {
        return own;
    }
    init_with(Config::load()?)
}

/// The runtime a child's own code runs in, when the caller is one (see [`init`]): the worker's,
/// in a worker process; the one that started it, in a thread child.
fn childs_runtime() -> Option<Result<Runtime>> {
    let in_child =
        IN_WORKER.load(std::sync::atomic::Ordering::Acquire) || context::in_thread_process();
    in_child.then(|| {
        current_runtime().map(|inner| Runtime {
            inner,
            borrowed: true,
        })
    })
}

/// Starts the runtime with `config` (see [`init`]).
pub fn init_with(config: Config) -> Result<Runtime> {
    run_worker_if_requested();
    if let Some(own) = childs_runtime() {
        // A child runs with its parent's configuration, whatever its code asks.
        return own;
    }
    config.validate()?;
    let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(inner) = active.upgrade().map(RuntimeRef::new) {
        // A URL asked for must be the running store's; none (the embedded store, or whatever
        // runs) accepts the running one.
        let same_store = config
            .redis
            .url
            .as_ref()
            .is_none_or(|url| Some(url) == inner.context.config().redis.url.as_ref());
        return if same_store && inner.config_without_url() == config_without_url(&config) {
            Ok(Runtime {
                inner,
                borrowed: false,
            })
        } else {
            Err(Error::invalid_state(
                "a shoal runtime with a different configuration is already running in this process",
            ))
        };
    }
    let inner = Arc::new(RuntimeInner::start_main(config)?);
    *active = Arc::downgrade(&inner);
    Ok(Runtime {
        inner: RuntimeRef::new(inner),
        borrowed: false,
    })
}

impl Runtime {
    /// The effective configuration (for an embedded store, `redis.url` is its socket).
    pub fn config(&self) -> &Config {
        self.inner.context.config()
    }

    /// The store's URL with any password hidden.
    pub fn store_url(&self) -> String {
        self.inner.context.store().display_url()
    }

    /// The pid of the embedded `redis-server`, when the runtime started one.
    pub fn embedded_redis_pid(&self) -> Option<u32> {
        self.inner
            .embedded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(EmbeddedRedis::pid)
    }

    /// Shuts the runtime down now if this is the last guard and no started `Process` handle is
    /// left; otherwise only drops this guard.
    pub fn shutdown(self) {
        drop(self);
    }

    /// Shuts down in order, for a service: stops accepting work (new pools, pool calls and
    /// processes fail with [`Error::InvalidState`]), lets the pool calls in flight finish and
    /// non-daemon children exit for at most `drain` (`Duration::MAX`: as long as they take),
    /// then terminates what is left (pool workers; children get `SIGTERM`, then `SIGKILL` after
    /// one grace of 5 s they share), the actor hosts and, when the last handle is gone, the
    /// embedded store. Returns once that is done.
    ///
    /// ```no_run
    /// # fn main() -> shoal::Result<()> {
    /// let rt = shoal::init()?;
    /// // ... serve until shoal::shutdown_signal() resolves ...
    /// rt.shutdown_within(std::time::Duration::from_secs(30));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// On the handle `init()` returns to a child's own code (a worker's task, a thread child),
    /// this only drops the handle: the runtime is its parent's (a worker's ends with its task).
    pub fn shutdown_within(self, drain: Duration) {
        if !self.borrowed && !IN_WORKER.load(std::sync::atomic::Ordering::Acquire) {
            self.inner.drain(drain);
        }
        drop(self);
    }

    /// [`Runtime::shutdown_within`] for async code: the draining runs on a thread of its own and
    /// no executor thread waits.
    pub async fn shutdown_async(self, drain: Duration) {
        let (done, finished) = futures::channel::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("shoal-shutdown".into())
            .spawn(move || {
                self.shutdown_within(drain);
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => {
                let _ = finished.await;
            }
            Err(e) => tracing::error!("cannot start the shutdown thread: {e}"),
        }
    }
}

/// Resolves when this process is asked to stop: `SIGINT` (Ctrl-C) or `SIGTERM` (what
/// Kubernetes and systemd send). Pass it to your server's graceful shutdown (axum's
/// `with_graceful_shutdown`), then call [`Runtime::shutdown_within`]. Needs a tokio runtime
/// with its I/O driver (`#[tokio::main]` has one). If the handlers cannot be installed (no
/// I/O driver, not in a Tokio runtime), it never resolves (and logs why).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    // Tokio panics, rather than failing, without a runtime or its I/O driver.
    let installed = std::panic::catch_unwind(|| {
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    });
    let Ok((Ok(mut interrupt), Ok(mut terminate))) = installed else {
        tracing::error!(
            "cannot install SIGINT/SIGTERM handlers (is this a Tokio runtime with its I/O \
             driver?): shutdown_signal() never resolves"
        );
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}

impl RuntimeInner {
    fn start_main(mut config: Config) -> Result<RuntimeInner> {
        let (url, embedded) = match &config.redis.url {
            Some(url) => (url.clone(), None),
            None => {
                let server = EmbeddedRedis::start(
                    &config.redis.server_binary,
                    config.redis.connect_timeout(),
                )?;
                (server.url(), Some(server))
            }
        };
        let store = Arc::new(Store::connect(&url, StoreSettings::from_config(&config))?);
        config.redis.url = Some(url);
        let context = Arc::new(Context::new(config, store, ProcessInfo::main()));
        context::install(context.clone());
        // A runtime that fails to start leaves no context behind: later calls say "call
        // shoal::init() first" instead of using a store whose embedded server is gone.
        let inner =
            RuntimeInner::start_actors(context, embedded).inspect_err(|_| context::clear())?;
        tracing::debug!(store = %inner.context.store().display_url(), "shoal runtime started");
        Ok(inner)
    }

    fn start_actors(
        context: Arc<Context>,
        embedded: Option<EmbeddedRedis>,
    ) -> Result<RuntimeInner> {
        let actors = ActorSystem::start("shoal-actors")?;
        let settings = LocalSettings::for_current_exe(
            context.store().url().to_string(),
            context.store().keys().namespace().to_string(),
        )?;
        let local = LocalExecutor::start(settings.clone(), actors.arbiter());
        let id = uuid::Uuid::new_v4().simple().to_string();
        let executor = match context.config().shoal.backend {
            Backend::Local => local,
            Backend::Kubernetes => kubernetes_executor(&context, &settings, &id, local, &actors)?,
        };
        // The primitives' async forms run on this system from now on.
        context.set_actor_runtime(actors.runtime().clone());
        Ok(RuntimeInner {
            id,
            context,
            actors: Mutex::new(actors),
            executor,
            children: Mutex::new(Vec::new()),
            embedded: Mutex::new(embedded),
            actor_hosts: Mutex::new(None),
            liveness: Mutex::new(None),
            pools: Mutex::new(Vec::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn context(&self) -> &Arc<Context> {
        &self.context
    }

    pub(crate) fn executor(&self) -> &Executor {
        &self.executor
    }

    pub(crate) fn arbiter(&self) -> actix::prelude::ArbiterHandle {
        self.actors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arbiter()
            .clone()
    }

    /// Refuses new work once the runtime is draining.
    pub(crate) fn check_accepting(&self) -> Result<()> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::invalid_state(
                "the runtime is shutting down: no new pool, call or process",
            ));
        }
        Ok(())
    }

    /// Remembers a pool, to drain it at shutdown.
    pub(crate) fn track_pool(&self, pool: crate::pool::PoolEntry) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|p| !p.finished());
        pools.push(pool);
    }

    /// The orderly part of a shutdown: refuse new work, let the work in flight finish for at
    /// most `drain`, then stop what is left.
    fn drain(&self, drain: Duration) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        // `Duration::MAX` (no limit) has no instant: it stays a limit never reached.
        let deadline = std::time::Instant::now().checked_add(drain);
        let left = || {
            deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(std::time::Instant::now())
            })
        };
        let pools: Vec<crate::pool::PoolEntry> =
            std::mem::take(&mut *self.pools.lock().unwrap_or_else(|p| p.into_inner()));
        for pool in &pools {
            pool.close();
        }
        for pool in &pools {
            if !pool.wait_finished(left()) {
                pool.terminate();
            }
        }
        let children: Vec<ChildEntry> = self.live_children();
        let running: Vec<&ChildEntry> = children
            .iter()
            .filter(|c| !c.daemon && !c.state().wait_exited(Some(left())))
            .collect();
        // Those still running at the deadline are terminated together and share one grace,
        // so that several which ignore SIGTERM do not add a grace each.
        for child in &running {
            self.signal_blocking(&child.id, StopSignal::Terminate);
        }
        let grace_end = std::time::Instant::now() + DAEMON_GRACE;
        for child in &running {
            let grace = grace_end.saturating_duration_since(std::time::Instant::now());
            if !child.state().wait_exited(Some(grace)) {
                self.signal_blocking(&child.id, StopSignal::Kill);
            }
        }
        self.shutdown_children();
        let hosts = self
            .actor_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(hosts) = hosts {
            let _ = futures::executor::block_on(hosts.send(StopHosts));
        }
    }

    /// This runtime's liveness key and its TTL in milliseconds, refreshed from now on (at the
    /// first call) for as long as the runtime runs: what a remote `Process` worker watches.
    pub(crate) fn driver_liveness(&self) -> (String, u64) {
        let mut liveness = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, key, ttl_ms)) = liveness.as_ref() {
            return (key.clone(), *ttl_ms);
        }
        let store = self.context.store().clone();
        let key = store.keys().object("processes", "drivers").key(&self.id);
        let ttl = crate::liveness::DRIVER_TTL;
        let refreshed = key.clone();
        let addr = crate::liveness::DriverLiveness::start_in_arbiter(&self.arbiter(), move |_| {
            crate::liveness::DriverLiveness::new(store, refreshed, ttl)
        });
        let ttl_ms = ttl.as_millis() as u64;
        *liveness = Some((addr, key.clone(), ttl_ms));
        (key, ttl_ms)
    }

    /// Starts this runtime's actor hosts, once (the first time, after one blocking round trip
    /// that makes the activations stream's group).
    pub(crate) fn actor_hosts(&self) -> Result<()> {
        if self.actor_hosts_started() {
            return Ok(());
        }
        self.check_accepting()?;
        let store = self.context.store().clone();
        shoal_executor::actor::create_activations(&store, &HostKeys::new(store.keys()))?;
        self.start_actor_hosts(context::current_process());
        Ok(())
    }

    /// Whether this runtime's actor hosts were started.
    pub(crate) fn actor_hosts_started(&self) -> bool {
        self.actor_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Starts this runtime's actor hosts, as children of `creator` (the process that made the
    /// first actor, as it was when it asked), unless they were started or the runtime is
    /// draining (its drain stops the hosts it finds). The activations stream's group must
    /// exist (`shoal_executor::actor::create_activations`).
    pub(crate) fn start_actor_hosts(&self, creator: ProcessInfo) {
        let mut hosts = self.actor_hosts.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock the drain takes the hosts with: a start either comes before
        // that (and is stopped by it) or sees the flag.
        if hosts.is_some() || self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let store = self.context.store().clone();
        let (executor, config, id) = (
            self.executor.clone(),
            self.context.config().clone(),
            self.id.clone(),
        );
        let addr = HostSupervisor::start_in_arbiter(&self.arbiter(), move |_| {
            HostSupervisor::new(store, executor, config, creator, &id)
        });
        addr.do_send(StartHosts);
        *hosts = Some(addr);
    }

    pub(crate) fn track_child(&self, child: ChildEntry) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.retain(|c| !c.state().has_exited());
        children.push(child);
    }

    /// The children that have not exited, oldest first (and forgets the others).
    pub(crate) fn live_children(&self) -> Vec<ChildEntry> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children.retain(|c| !c.state().has_exited());
        children
            .iter()
            .map(|c| ChildEntry {
                id: c.id.clone(),
                name: c.name.clone(),
                daemon: c.daemon,
                parent: c.parent.clone(),
                started: c.started.clone(),
            })
            .collect()
    }

    fn config_without_url(&self) -> Config {
        config_without_url(self.context.config())
    }

    fn shutdown_children(&self) {
        let children: Vec<ChildEntry> =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        let live: Vec<&ChildEntry> = children
            .iter()
            .filter(|c| !c.state().has_exited())
            .collect();
        for child in live.iter().filter(|c| c.daemon) {
            self.signal_blocking(&child.id, StopSignal::Terminate);
        }
        for child in live.iter().filter(|c| c.daemon) {
            if !child.state().wait_exited(Some(DAEMON_GRACE)) {
                self.signal_blocking(&child.id, StopSignal::Kill);
                child.state().wait_exited(Some(DAEMON_GRACE));
            }
        }
        for child in live.iter().filter(|c| !c.daemon) {
            child.state().wait_exited(None);
        }
    }

    fn signal_blocking(&self, id: &str, signal: StopSignal) {
        if let Err(e) = futures::executor::block_on(self.executor.signal(id.to_string(), signal)) {
            tracing::warn!("stopping child {id} at shutdown: {e}");
        }
    }
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        // Items a queue feeder still buffers reach Redis first (Python's join_thread at exit).
        context::run_exit_hooks();
        // A pool dropped on a thread of an async runtime terminates on a thread of its own
        // (see `Pool`'s drop): what is left of that ends here, while its supervisor runs.
        let pools: Vec<crate::pool::PoolEntry> =
            std::mem::take(&mut *self.pools.lock().unwrap_or_else(|p| p.into_inner()));
        for pool in &pools {
            pool.terminate();
        }
        self.shutdown_children();
        let hosts = self
            .actor_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(hosts) = hosts {
            let _ = futures::executor::block_on(hosts.send(StopHosts));
        }
        // A remote backend deletes what it started (finished Jobs included).
        futures::executor::block_on(self.executor.shutdown());
        if context::try_current().is_some_and(|c| Arc::ptr_eq(&c, &self.context)) {
            context::clear();
        }
        self.context.clear_actor_runtime();
        self.actors.lock().unwrap_or_else(|p| p.into_inner()).stop();
        if let Some(mut server) = self
            .embedded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            server.stop();
        }
        tracing::debug!("shoal runtime stopped");
    }
}

/// The Kubernetes executor for this runtime's configuration, or why there is none.
#[cfg(feature = "kubernetes")]
fn kubernetes_executor(
    context: &Context,
    local: &LocalSettings,
    runtime_id: &str,
    threads: Executor,
    actors: &ActorSystem,
) -> Result<Executor> {
    use shoal_executor::kubernetes::{JobTemplate, KubernetesExecutor};
    let config = context.config();
    let program = match &config.kubernetes.command {
        Some(command) => command.clone(),
        None => {
            let name = local
                .program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "shoal-worker".into());
            format!("/usr/local/bin/{name}")
        }
    };
    let template = JobTemplate {
        config: config.kubernetes.clone(),
        runtime_id: runtime_id.to_string(),
        namespace: context.store().keys().namespace().to_string(),
        program,
        args: local.worker_args(),
        redis_url: context.store().url().to_string(),
    };
    KubernetesExecutor::start(template, threads, actors.arbiter())
}

/// Without the `kubernetes` feature, the backend is a configuration error.
#[cfg(not(feature = "kubernetes"))]
fn kubernetes_executor(
    _: &Context,
    _: &LocalSettings,
    _: &str,
    _: Executor,
    _: &ActorSystem,
) -> Result<Executor> {
    Err(Error::Config {
        origin: "shoal.backend".into(),
        key: "shoal.backend".into(),
        reason: "this program was built without shoal's `kubernetes` feature: add \
                 `features = [\"kubernetes\"]` to its shoal dependency"
            .into(),
    })
}

fn config_without_url(config: &Config) -> Config {
    let mut c = config.clone();
    c.redis.url = None;
    c
}

/// Drops `value` on a thread of its own (one, started at first use, for every such value):
/// for what a task on shoal's actor thread may hold last and whose drop must not run there. A
/// runtime's teardown, or a pool's, waits on actors of that very thread, so run there it would
/// wait forever.
pub(crate) fn drop_elsewhere<T: Send + 'static>(value: T) {
    type Leftover = Box<dyn Send>;
    static REAPER: Mutex<Option<std::sync::mpsc::Sender<Leftover>>> = Mutex::new(None);
    let mut reaper = REAPER.lock().unwrap_or_else(|p| p.into_inner());
    if reaper.is_none() {
        let (send, receive) = std::sync::mpsc::channel::<Leftover>();
        let started = std::thread::Builder::new()
            .name("shoal-reaper".into())
            .spawn(move || receive.into_iter().for_each(drop));
        match started {
            Ok(_) => *reaper = Some(send),
            Err(e) => tracing::warn!("starting the thread that drops leftovers: {e}"),
        }
    }
    let leftover: Leftover = Box::new(value);
    let refused = match reaper.as_ref() {
        Some(send) => send.send(leftover).err().map(|e| e.0),
        None => Some(leftover),
    };
    drop(reaper);
    if let Some(leftover) = refused {
        // No thread to take it: a thread of its own (if none can start, the closure and the
        // value drop here, the last resort).
        let _ = std::thread::Builder::new()
            .name("shoal-reaper".into())
            .spawn(move || drop(leftover));
    }
}

/// The runtime running in this process, if any (never starts one).
pub(crate) fn running_runtime() -> Option<RuntimeRef> {
    let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).upgrade();
    active.map(RuntimeRef::new)
}

/// The running runtime; in a worker, one is started on first use and kept until the task ends.
/// In the main process, none is started once the runtime is being dropped (an error then).
pub(crate) fn current_runtime() -> Result<RuntimeRef> {
    let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(inner) = active.upgrade() {
        return Ok(RuntimeRef::new(inner));
    }
    // Without a context (no init(), or a runtime dropped already) this says so.
    let context = context::current()?;
    if !IN_WORKER.load(std::sync::atomic::Ordering::Acquire) {
        // The main process's runtime is being dropped (its context is still set while it waits
        // for its children): a new runtime started here would never be dropped.
        return Err(Error::invalid_state(
            "the shoal runtime of this process is shutting down: no new process or pool",
        ));
    }
    let inner = RuntimeRef::new(Arc::new(RuntimeInner::start_actors(context, None)?));
    *active = inner.downgrade();
    *WORKER_RUNTIME.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner.clone());
    Ok(inner)
}

/// Sends shoal's log to stderr (Python's `multiprocessing.log_to_stderr()`): installs a
/// `tracing` subscriber reading `RUST_LOG` (default `warn`) unless the program has one. Returns
/// whether it installed one. `init()` never installs a subscriber in the main process, so a
/// service keeps its own; workers (which run only shoal's code) log to stderr this way.
///
/// ```
/// let installed = shoal::log_to_stderr();
/// // A second call finds the subscriber installed.
/// assert!(!shoal::log_to_stderr() || !installed);
/// ```
pub fn log_to_stderr() -> bool {
    init_tracing()
}

fn init_tracing() -> bool {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .is_ok()
}

/// If this process was started by shoal as a worker, runs its task and exits (never returns);
/// otherwise returns at once, and so it does when the task's own code calls it again. Call it first
/// thing in `main`, before anything with side effects (a server, a tokio runtime, a log line): a
/// worker is this same program, and everything before this call runs again in every worker.
/// [`init`] calls it too; `#[shoal::main]` puts it in front of your `main` for you.
///
/// A worker removes the variables it was started with (`SHOAL_WORKER_*`: its task's address,
/// the authkey) from its environment here, so that the programs its task runs do not inherit
/// them. It can do that only while no other thread runs, one more reason to call this first.
///
/// ```no_run
/// fn main() -> shoal::Result<()> {
///     shoal::worker_main(); // a worker stops here
///     println!("only the parent prints this");
///     let _rt = shoal::init()?;
///     Ok(())
/// }
/// ```
pub fn worker_main() {
    run_worker_if_requested();
}

/// Runs the worker and exits if this process was started as a worker; returns otherwise.
pub(crate) fn run_worker_if_requested() {
    let Some(address) = TaskAddress::from_env() else {
        return;
    };
    if IN_WORKER.swap(true, std::sync::atomic::Ordering::AcqRel) {
        // Called again by the task's own code: the worker runs already.
        return;
    }
    // First, before the worker starts a thread: the programs the task runs must not inherit
    // the task's address (a shoal program would take itself for this worker) or the authkey.
    // In a test binary the worker runs as the entry test, on the thread libtest names after it.
    let in_test_harness = shoal_core::registry::test_worker_entry()
        .is_some_and(|entry| std::thread::current().name() == Some(entry.as_str()));
    let forgotten = shoal_executor::task::forget_worker_env(in_test_harness);
    // A worker runs shoal's code only: its warnings go to stderr (the parent's terminal).
    init_tracing();
    if !forgotten {
        tracing::warn!(
            "this worker keeps its SHOAL_WORKER_* variables, which the programs it runs see: \
             other threads ran when it started (call shoal::init() or shoal::worker_main() \
             first in main)"
        );
    }
    let code = match address {
        Ok(address) => shoal_executor::worker::run(&address, &|| {
            // Flush what queue feeders buffer, then join this worker's own children (Python
            // does both at exit).
            context::run_exit_hooks();
            let runtime = WORKER_RUNTIME
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(runtime);
        }),
        Err(e) => {
            eprintln!("shoal worker: {e}");
            1
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn shutdown_signal_without_an_io_driver_waits_instead_of_panicking() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime without drivers");
        let polled = rt.block_on(async { shutdown_signal().now_or_never() });
        assert!(polled.is_none(), "it resolved");
        assert!(
            shutdown_signal().now_or_never().is_none(),
            "outside a runtime"
        );
    }
}
