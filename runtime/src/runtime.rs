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
//! the configuration is the same (so tests running on several threads can each call `init()`),
//! and [`Error::InvalidState`] otherwise. The runtime shuts down when the last guard and the last
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
static WORKER_RUNTIME: Mutex<Option<Arc<RuntimeInner>>> = Mutex::new(None);

/// A guard on the running runtime; the runtime shuts down when the last guard (and the last
/// started `Process` handle) is dropped.
#[derive(Debug)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
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
/// and exits with its exit code. Call it first thing in `main`.
pub fn init() -> Result<Runtime> {
    run_worker_if_requested();
    init_with(Config::load()?)
}

/// Starts the runtime with `config` (see [`init`]).
pub fn init_with(config: Config) -> Result<Runtime> {
    run_worker_if_requested();
    init_tracing();
    config.validate()?;
    let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(inner) = active.upgrade() {
        return if inner.config_without_url() == config_without_url(&config) {
            Ok(Runtime { inner })
        } else {
            Err(Error::invalid_state(
                "a shoal runtime with a different configuration is already running in this process",
            ))
        };
    }
    let inner = Arc::new(RuntimeInner::start_main(config)?);
    *active = Arc::downgrade(&inner);
    Ok(Runtime { inner })
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
        let inner = RuntimeInner::start_actors(context, embedded)?;
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

    /// Starts this runtime's actor hosts, once.
    pub(crate) fn actor_hosts(&self) -> Result<()> {
        let mut hosts = self.actor_hosts.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.is_some() {
            return Ok(());
        }
        let store = self.context.store().clone();
        shoal_executor::actor::create_activations(&store, &HostKeys::new(store.keys()))?;
        let (executor, config, creator, id) = (
            self.executor.clone(),
            self.context.config().clone(),
            context::current_process(),
            self.id.clone(),
        );
        let addr = HostSupervisor::start_in_arbiter(&self.arbiter(), move |_| {
            HostSupervisor::new(store, executor, config, creator, &id)
        });
        addr.do_send(StartHosts);
        *hosts = Some(addr);
        Ok(())
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

/// The runtime running in this process, if any (never starts one).
pub(crate) fn running_runtime() -> Option<Arc<RuntimeInner>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).upgrade()
}

/// The running runtime; in a worker, one is started on first use and kept until the task ends.
pub(crate) fn current_runtime() -> Result<Arc<RuntimeInner>> {
    let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(inner) = active.upgrade() {
        return Ok(inner);
    }
    let context = context::current()?;
    let inner = Arc::new(RuntimeInner::start_actors(context, None)?);
    *active = Arc::downgrade(&inner);
    *WORKER_RUNTIME.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner.clone());
    Ok(inner)
}

/// Installs a `tracing` subscriber reading `RUST_LOG` (default `warn`), unless the program has
/// one already.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs the worker and exits if this process was started as a worker; returns otherwise.
pub(crate) fn run_worker_if_requested() {
    let Some(address) = TaskAddress::from_env() else {
        return;
    };
    init_tracing();
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
