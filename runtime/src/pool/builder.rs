//! A pool's configuration: [`PoolBuilder`] (what `Pool::builder` returns), the plan it checks
//! and launches, and the options of the async calls ([`AsyncOptions`]).

use super::*;

/// A success callback.
type Callback<R> = Box<dyn FnOnce(&R) + Send>;
/// A failure callback.
type ErrorCallback = Box<dyn FnOnce(&Error) + Send>;

/// Options of `map_async`, `starmap_async` and `apply_async`.
pub struct AsyncOptions<R> {
    pub(super) chunksize: Option<usize>,
    pub(super) callback: Option<Callback<R>>,
    pub(super) error_callback: Option<ErrorCallback>,
    pub(super) deadline: Option<Duration>,
}

impl<R> Default for AsyncOptions<R> {
    fn default() -> Self {
        AsyncOptions {
            chunksize: None,
            callback: None,
            error_callback: None,
            deadline: None,
        }
    }
}

impl<R> std::fmt::Debug for AsyncOptions<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncOptions")
            .field("chunksize", &self.chunksize)
            .field("callback", &self.callback.is_some())
            .field("error_callback", &self.error_callback.is_some())
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl<R> AsyncOptions<R> {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Items per chunk (map forms only).
    pub fn chunksize(mut self, chunksize: usize) -> Self {
        self.chunksize = Some(chunksize);
        self
    }

    /// Called with the result when the call succeeds.
    pub fn callback(mut self, callback: impl FnOnce(&R) + Send + 'static) -> Self {
        self.callback = Some(Box::new(callback));
        self
    }

    /// Called with the error when the call fails.
    pub fn error_callback(mut self, callback: impl FnOnce(&Error) + Send + 'static) -> Self {
        self.error_callback = Some(Box::new(callback));
        self
    }

    /// Cancels the call if it has not completed within `deadline` of its start: it then fails
    /// with [`Error::Timeout`], and its work stops as with [`AsyncResult::cancel`].
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// The shortest task lease [`PoolBuilder::task_lease`] takes: `pool.task_lease_secs`'s minimum.
const MIN_TASK_LEASE: Duration = Duration::from_millis(100);
/// The longest task lease [`PoolBuilder::task_lease`] takes: `pool.task_lease_secs`'s maximum
/// (a day), far from where the lease's arithmetic could overflow.
const MAX_TASK_LEASE: Duration = Duration::from_secs(86_400);

/// Builds a [`Pool`]; unset options come from the configuration (`local.workers`, `pool.*`).
#[derive(Debug, Default)]
pub struct PoolBuilder {
    processes: Option<usize>,
    initializer: Option<(String, Result<Vec<u8>>)>,
    maxtasksperchild: Option<u64>,
    retries: Option<u32>,
    task_lease: Option<Duration>,
    restart_budget: Option<(u32, Duration)>,
    start_method: Option<StartMethod>,
    progress: Option<bool>,
}

impl PoolBuilder {
    /// Number of workers (default `local.workers`, else the CPU count).
    pub fn processes(mut self, processes: usize) -> Self {
        self.processes = Some(processes);
        self
    }

    /// Runs `f(args...)` once in each worker before its first task. A failing initializer ends
    /// the worker (and counts against the restart budget).
    pub fn initializer<F, A>(mut self, f: F, args: A) -> Self
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
    {
        let name = f.name().to_string();
        let encoded = shoal_core::codec::encode(&args, &format!("arguments of {name}"), usize::MAX);
        self.initializer = Some((name, encoded));
        self
    }

    /// Replaces a worker after it ran this many chunks (Python's `maxtasksperchild`); at least
    /// 1 ([`Pool::builder`]`...build()` fails with [`Error::InvalidState`] on 0).
    pub fn maxtasksperchild(mut self, tasks: u64) -> Self {
        self.maxtasksperchild = Some(tasks);
        self
    }

    /// Redeliveries of a chunk whose worker died (default `pool.retries`, 3).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    /// How long a chunk stays with a worker that stopped renewing its lease (default
    /// `pool.task_lease_secs`). The same range as that key's, 0.1 s to 86400 s: the build fails
    /// with [`Error::InvalidState`] otherwise.
    pub fn task_lease(mut self, lease: Duration) -> Self {
        self.task_lease = Some(lease);
        self
    }

    /// At most `max_restarts` worker failures within `period` (default `pool.max_restarts`
    /// within `pool.restart_period_secs`), or, while calls wait, failures of workers that lived
    /// less than 10 minutes (or `period`, if longer) since the last chunk completed, however far
    /// apart (workers that take long to start and fail, a crashing initializer on pods); one
    /// more breaks the pool.
    pub fn restart_budget(mut self, max_restarts: u32, period: Duration) -> Self {
        self.restart_budget = Some((max_restarts, period));
        self
    }

    /// Runs the workers with `method` instead of `local.start_method`.
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// Shows a progress bar for `map` calls when stderr is a terminal (default `pool.progress`).
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = Some(on);
        self
    }

    /// Starts the pool.
    pub fn build(self) -> Result<Pool> {
        let plan = PoolPlan::new(self)?;
        protocol::create_streams(&plan.store, &plan.keys)?;
        let (pool, started) = plan.launch()?;
        let started = futures::executor::block_on(started);
        pool.started(started)
    }

    /// The async form of [`PoolBuilder::build`], for async code: the pool's stream is made from
    /// shoal's actor runtime (one round trip) and no thread waits; any executor. Errors as
    /// `build`. The workers start in the background, as with `build`.
    ///
    /// Dropping the future before it returns terminates the pool made so far, on a thread of
    /// shoal's (the caller's is not blocked).
    ///
    /// ```no_run
    /// use shoal::prelude::*;
    ///
    /// #[shoal::remote]
    /// fn double(x: u64) -> u64 {
    ///     2 * x
    /// }
    ///
    /// # async fn service() -> shoal::Result<()> {
    /// let pool = Pool::builder().processes(4).build_async().await?;
    /// assert_eq!(pool.map_async(double, 0..3u64)?.await?, vec![0, 2, 4]);
    /// pool.close_async().await?;
    /// pool.join_async().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn build_async(self) -> Result<Pool> {
        let plan = PoolPlan::new(self)?;
        plan.create_streams_async().await?;
        let (pool, started) = plan.launch()?;
        // Until the reply: dropped with this future, the pool is terminated elsewhere, as a
        // `Pool`'s own drop may block this thread (on an executor that is not Tokio's) while
        // its workers stop.
        struct Unfinished(Option<Pool>);
        impl Drop for Unfinished {
            fn drop(&mut self) {
                if let Some(pool) = self.0.take() {
                    runtime::drop_elsewhere(pool);
                }
            }
        }
        let mut unfinished = Unfinished(Some(pool));
        let started = started.await;
        match unfinished.0.take() {
            Some(pool) => pool.started(started),
            None => Err(Error::invalid_state("the pool was taken")),
        }
    }
}

/// A pool checked and configured, before anything is started: what both
/// [`PoolBuilder::build`] and [`PoolBuilder::build_async`] make, then launch.
struct PoolPlan {
    runtime: RuntimeRef,
    settings: PoolSettings,
    processes: usize,
    progress: bool,
    id: String,
    keys: PoolKeys,
    store: Arc<Store>,
}

impl PoolPlan {
    /// Checks the builder's settings against the process and the configuration.
    fn new(builder: PoolBuilder) -> Result<PoolPlan> {
        let me = shoal_core::context::current_process();
        if me.daemon {
            return Err(Error::invalid_state(format!(
                "daemonic processes are not allowed to have children ({} is daemonic)",
                me.name
            )));
        }
        let runtime = runtime::current_runtime()?;
        runtime.check_accepting()?;
        let context = runtime.context().clone();
        let config = context.config();
        let processes = builder
            .processes
            .unwrap_or_else(|| config.local.default_workers());
        if processes == 0 {
            return Err(Error::invalid_state("a pool needs at least 1 process"));
        }
        if builder.maxtasksperchild == Some(0) {
            return Err(Error::invalid_state(
                "maxtasksperchild must be at least 1 (or unset: workers live as long as the pool)",
            ));
        }
        let lease = builder
            .task_lease
            .unwrap_or_else(|| config.pool.task_lease());
        if !(MIN_TASK_LEASE..=MAX_TASK_LEASE).contains(&lease) {
            return Err(Error::invalid_state(format!(
                "the task lease must be within {} ..= {} seconds (the range of \
                 pool.task_lease_secs), not {lease:?}",
                MIN_TASK_LEASE.as_secs_f64(),
                MAX_TASK_LEASE.as_secs_f64(),
            )));
        }
        if lease.as_secs_f64() > config.redis.expiry_secs as f64 {
            return Err(Error::invalid_state(format!(
                "the task lease ({lease:?}) is longer than redis.expiry_secs ({} s): keys held \
                 under it would expire between its renewals",
                config.redis.expiry_secs
            )));
        }
        let initializer = match builder.initializer {
            None => None,
            Some((function, args)) => {
                registry::resolve(&function)?;
                Some(Initializer {
                    function,
                    args: args?,
                })
            }
        };
        let (max_restarts, restart_period) = builder
            .restart_budget
            .unwrap_or((config.pool.max_restarts, config.pool.restart_period()));
        let settings = PoolSettings {
            processes,
            retries: builder.retries.unwrap_or(config.pool.retries),
            lease,
            maxtasksperchild: builder.maxtasksperchild,
            initializer,
            start_method: builder.start_method.unwrap_or(config.local.start_method),
            max_restarts,
            restart_period,
            config: config.clone(),
            creator: me,
        };
        let progress = builder.progress.unwrap_or(config.pool.progress);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let store = context.store().clone();
        let keys = PoolKeys::new(store.keys(), &id);
        Ok(PoolPlan {
            runtime,
            settings,
            processes,
            progress,
            id,
            keys,
            store,
        })
    }

    /// [`protocol::create_streams`] sent from shoal's actor runtime: the task stream and its
    /// group (one existing already is fine) and their TTL, in one round trip.
    async fn create_streams_async(&self) -> Result<()> {
        let pipe = protocol::streams_creation(&self.store, &self.keys);
        let keys = self.keys.clone();
        self.runtime
            .context()
            .spawn(move |store, caller| async move {
                let replies = match store.shared().await {
                    Ok(mut conn) => {
                        match pipe
                            .query_async::<protocol::StreamsCreated>(&mut conn)
                            .await
                        {
                            Ok(replies) => protocol::streams_created(&keys, replies),
                            Err(e) => Err(Error::redis(
                                format!("creating pool stream {}", keys.tasks),
                                e,
                            )),
                        }
                    }
                    Err(e) => Err(e),
                };
                caller.finish(replies);
            })
            .await
    }

    /// Starts the supervisor and asks it to start the workers; the pool is returned with that
    /// request, which answers once the workers' launches are under way. The pool is tracked by
    /// the runtime from here: dropping it (or the runtime) stops what was started.
    fn launch(self) -> Result<(Pool, actix::dev::Request<PoolSupervisor, StartWorkers>)> {
        let PoolPlan {
            runtime,
            settings,
            processes,
            progress,
            id,
            keys,
            store,
        } = self;
        // Checked again: a shutdown may have begun while the stream was made.
        runtime.check_accepting()?;
        let shared = PoolShared::new();
        let callbacks = spawn_callback_thread()?;
        let supervisor = {
            let (id, keys, store, executor, shared) = (
                id.clone(),
                keys.clone(),
                store.clone(),
                runtime.executor().clone(),
                shared.clone(),
            );
            PoolSupervisor::start_in_arbiter(&runtime.arbiter(), move |_| {
                PoolSupervisor::new(id, keys, store, executor, settings, shared, callbacks)
            })
        };
        let started = supervisor.send(StartWorkers);
        runtime.track_pool(PoolEntry {
            supervisor: supervisor.clone(),
            shared: shared.clone(),
        });
        let pool = Pool {
            id,
            processes,
            keys,
            store,
            supervisor,
            shared,
            next_call: AtomicU64::new(1),
            progress,
            task_writer: std::sync::Mutex::new(None),
            _runtime: runtime,
        };
        Ok((pool, started))
    }
}
