//! What every primitive shares: its address, the store, who holds things, and how a blocked
//! caller waits.
//!
//! A handle is an [`Address`] (namespace, kind, id) plus the primitive's fixed settings; it is a
//! serde value, so it can be an argument of a process and works there as it did here. Its keys
//! are `shoal:{<namespace>:<kind>:<id>}:<field>`.
//!
//! A caller that must wait blocks with `BLPOP` on a key with Redis's own timeout, in slices of
//! at most [`SLICE`], and checks in between slices: a primitive whose keys were deleted (or
//! expired) is reported instead of waited on forever, and the async form of a call whose future
//! was dropped gives up there (see `op.rs`).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_core::context::{self, Context};
use shoal_core::error::{Error, Result};
use shoal_core::store::{KeySpace, ObjectKeys, Store};

/// The acquire family shared by `Lock`, `RLock`, `Semaphore`, `BoundedSemaphore` and
/// `Condition`: each has `fn object(&self) -> &GrantObject`. `$what` names what is acquired in
/// the docs ("the lock", "a permit").
macro_rules! hold_methods {
    ($what:literal) => {
        #[doc = concat!("Acquires ", $what, ", waiting as long as it takes.")]
        pub fn acquire(&self) -> Result<()> {
            self.object().acquire(Some(None)).map(|_| ())
        }

        #[doc = concat!("Acquires ", $what, ", waiting at most `timeout`; returns whether it was acquired.")]
        pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
            Ok(self
                .object()
                .acquire(Some($crate::common::deadline(Some(timeout))))?
                .is_some())
        }

        #[doc = concat!("Acquires ", $what, " only if that needs no waiting; returns whether it was acquired.")]
        pub fn try_acquire(&self) -> Result<bool> {
            Ok(self.object().acquire(None)?.is_some())
        }

        #[doc = concat!("Acquires ", $what, " and returns a guard that releases it on drop (Python's `with`).")]
        pub fn lock(&self) -> Result<$crate::lock::Guard<'_>> {
            let holder = $crate::grants::holder(self.object().kind);
            let grant = self
                .object()
                .acquire_as(holder.clone(), Some(None))?
                .ok_or_else(|| {
                    Error::invalid_state("a blocking acquire returned without a grant")
                })?;
            Ok($crate::lock::Guard::new(self.object(), grant.token, holder))
        }

        #[doc = concat!("The async form of `acquire`: acquires ", $what, " without blocking the caller's thread. ")]
        #[doc = "The wait runs on shoal's actor runtime; any executor can await the future. A hold granted after"]
        #[doc = "the future was dropped is released (see the module docs)."]
        pub fn acquire_async(
            &self,
        ) -> impl std::future::Future<Output = Result<()>> + Send + use<> {
            let acquiring = self.object().acquire_async(Some(None));
            async move { acquiring.await.map(|_| ()) }
        }

        #[doc = concat!("The async form of `acquire_timeout`: acquires ", $what, ", waiting at most `timeout` ")]
        #[doc = "from the first poll; returns whether it was acquired."]
        pub fn acquire_timeout_async(
            &self,
            timeout: Duration,
        ) -> impl std::future::Future<Output = Result<bool>> + Send + use<> {
            let acquiring = self.object().acquire_async(Some(Some(timeout)));
            async move { Ok(acquiring.await?.is_some()) }
        }

        #[doc = concat!("The async form of `try_acquire`: acquires ", $what, " only if that needs no waiting.")]
        pub fn try_acquire_async(
            &self,
        ) -> impl std::future::Future<Output = Result<bool>> + Send + use<> {
            let acquiring = self.object().acquire_async(None);
            async move { Ok(acquiring.await?.is_some()) }
        }

        #[doc = concat!("The async form of `lock`: acquires ", $what, " and returns a guard that releases it ")]
        #[doc = "when dropped, on shoal's actor runtime (a drop never blocks the caller's thread)."]
        pub fn lock_async(
            &self,
        ) -> impl std::future::Future<Output = Result<$crate::lock::Guard<'_>>> + Send + '_ {
            let object = self.object();
            let acquiring = object.acquire_async(Some(None));
            async move {
                let (grant, holder) = acquiring.await?.ok_or_else(|| {
                    Error::invalid_state("a blocking acquire returned without a grant")
                })?;
                Ok($crate::lock::Guard::new_async(object, grant.token, holder))
            }
        }

        #[doc = concat!("The fencing token of ", $what, " this process (for an `RLock`: this thread) holds, if any.")]
        pub fn fencing_token(&self) -> Option<u64> {
            self.object().token()
        }
    };
}
pub(crate) use hold_methods;

/// The longest a blocked call waits before it checks in.
pub(crate) const SLICE: Duration = Duration::from_secs(1);

/// The first wait slice of a call that writes its wait behind a script whose reply it reads
/// after writing both (a barrier's arrival): short, because if Redis had lost the script
/// (`NOSCRIPT`, nothing ran) the wait can only end by its timeout before the script is loaded
/// and run again. Later slices are [`SLICE`]s.
pub(crate) const PIPELINED_SLICE: Duration = Duration::from_millis(100);

/// Where a primitive lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Address {
    pub(crate) namespace: String,
    pub(crate) kind: String,
    pub(crate) id: String,
}

impl Address {
    /// A new address of `kind` in the current runtime's namespace.
    pub(crate) fn create(kind: &str) -> Result<(Arc<Context>, Address)> {
        let context = context::current()?;
        let address = Address {
            namespace: context.store().keys().namespace().to_string(),
            kind: kind.to_string(),
            id: uuid::Uuid::new_v4().simple().to_string(),
        };
        Ok((context, address))
    }

    /// The keys of this primitive.
    pub(crate) fn keys(&self) -> ObjectKeys {
        KeySpace::new(self.namespace.clone()).object(&self.kind, &self.id)
    }

    /// `lock 1a2b3c4d`, for messages.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} {}",
            self.kind,
            self.id.chars().take(8).collect::<String>()
        )
    }

    /// The error for a primitive whose keys are gone.
    pub(crate) fn gone(&self) -> Error {
        Error::invalid_state(format!(
            "{} no longer exists in Redis (deleted, or idle longer than redis.expiry_secs)",
            self.describe()
        ))
    }

    /// Turns a script's or command's error into a clear one.
    pub(crate) fn error(&self, e: Error) -> Error {
        let Error::Redis { source, context } = &e else {
            return e;
        };
        match source.code() {
            Some("GONE") => self.gone(),
            Some("CORRUPT") | Some("WRONGTYPE") => Error::invalid_state(format!(
                "{}: its Redis keys hold data shoal did not write ({context}: {source})",
                self.describe()
            )),
            _ => e,
        }
    }
}

/// The store of the current runtime.
pub(crate) fn store() -> Result<Arc<Store>> {
    Ok(context::current()?.store().clone())
}

/// This process, as a holder of locks and permits: unique across machines and restarts.
pub(crate) fn process_holder() -> &'static str {
    static HOLDER: OnceLock<String> = OnceLock::new();
    HOLDER.get_or_init(|| {
        format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )
    })
}

/// A waiter id unique to this call: this process and a counter (no system call).
pub(crate) fn waiter_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{n}", process_holder())
}

/// This thread of this process, as the owner of an `RLock`; inside a Tokio task, the task
/// (a task moves between the threads of a multi-thread runtime at each `.await`, and its hold
/// must move with it).
pub(crate) fn thread_holder() -> String {
    match tokio::task::try_id() {
        Some(task) => format!("{}:task:{task}", process_holder()),
        None => format!("{}:{:?}", process_holder(), std::thread::current().id()),
    }
}

/// How long a queued waiter counts as alive without checking in: three slices from now.
pub(crate) fn liveness() -> u64 {
    now_ms() + 3 * SLICE.as_millis() as u64
}

pub(crate) use shoal_core::clock::now_ms;

/// The TTL of every key, in seconds.
pub(crate) fn ttl(store: &Store) -> u64 {
    store.expiry_secs()
}

/// A `BLPOP` timeout in seconds: Redis reads decimals; never 0 (which means forever).
pub(crate) fn blpop_seconds(block: Duration) -> f64 {
    block.as_secs_f64().max(0.001)
}

/// The time left until `deadline`, capped at [`SLICE`]; `None` when it passed.
pub(crate) fn next_slice(deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        None => Some(SLICE),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                None
            } else {
                Some(left.min(SLICE))
            }
        }
    }
}

/// A deadline `timeout` from now; `None` (no deadline) when there is no timeout or it is too far
/// to represent (`Duration::MAX` means forever).
pub(crate) fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// Runs `work`, which may block (a round trip, a lock held across one), off the calling thread:
/// on the blocking pool of shoal's actor runtime, where the blocking work of async calls runs,
/// or on a thread of its own when there is no actor runtime or it drops the task unrun (it is
/// shutting down); on the calling thread only when no thread can be started. For a drop in
/// async code, which must not block its executor's thread. Nobody waits for `work`: it reports
/// its own failures; `what` names it in a log.
pub(crate) fn run_in_background(what: &'static str, work: impl FnOnce() + Send + 'static) {
    let job = Background {
        what,
        work: Some(Box::new(work)),
    };
    match context::current().and_then(|c| c.async_store()) {
        // A task the runtime drops unrun drops `job`, which then runs on a thread of its own.
        Ok(store) => drop(store.runtime().spawn_blocking(move || job.run())),
        Err(_) => drop(job),
    }
}

/// Work for [`run_in_background`]; dropped before it ran, it runs on a thread of its own.
struct Background {
    what: &'static str,
    work: Option<Box<dyn FnOnce() + Send>>,
}

impl Background {
    fn run(mut self) {
        if let Some(work) = self.work.take() {
            work();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        // Shared with the thread: a thread that cannot start drops its closure, and the work
        // must still run.
        let slot = Arc::new(std::sync::Mutex::new(Some(work)));
        let take = |slot: &std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>| {
            slot.lock().unwrap_or_else(|p| p.into_inner()).take()
        };
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-background".into())
            .spawn(move || {
                if let Some(work) = take(&theirs) {
                    work();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "cannot start a thread for {}: {e}; it runs on this thread",
                self.what
            );
            if let Some(work) = take(&slot) {
                work();
            }
        }
    }
}

/// Work done by this process's heartbeat thread every third of the lease (`sync.lease_secs`):
/// renewing the holds it has, so that they lapse only when the process is gone.
pub(crate) type HeartbeatTask = fn();

/// Adds `task` to this process's heartbeat (started on first use). A task is added once however
/// often this is called with it.
pub(crate) fn on_heartbeat(task: HeartbeatTask) {
    static TASKS: std::sync::Mutex<Vec<HeartbeatTask>> = std::sync::Mutex::new(Vec::new());
    static STARTED: std::sync::Once = std::sync::Once::new();
    {
        let mut tasks = TASKS.lock().unwrap_or_else(|p| p.into_inner());
        if !tasks.iter().any(|t| std::ptr::fn_addr_eq(*t, task)) {
            tasks.push(task);
        }
    }
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("shoal-heartbeat".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(crate::grants::lease() / 3);
                    let tasks = TASKS.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    for task in tasks {
                        task();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the heartbeat thread: {e}; holds will lapse");
        }
    });
}

/// A count of work handed to the background that this process's exit waits for (a lease at
/// most): background lock releases, closes of dropped pipe handles. Each piece holds an
/// [`InFlight`] from when it is handed over until it ends, however it ends.
pub(crate) struct BackgroundWork {
    /// What the work is, for the warning when the wait gives up ("closes of dropped pipe
    /// handles").
    what: &'static str,
    under_way: std::sync::Mutex<usize>,
    ended: std::sync::Condvar,
}

impl BackgroundWork {
    pub(crate) const fn new(what: &'static str) -> Self {
        BackgroundWork {
            what,
            under_way: std::sync::Mutex::new(0),
            ended: std::sync::Condvar::new(),
        }
    }

    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        self.under_way.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a piece of work about to be handed over; move the result into it.
    pub(crate) fn start(&'static self) -> InFlight {
        *self.count() += 1;
        InFlight(self)
    }

    /// Waits, `within` at most, for the work under way to end; warns of what is left.
    pub(crate) fn wait(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut under_way = self.count();
        while *under_way > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "{} {} still under way: their holds lapse after the lease once this process \
                     is gone",
                    *under_way,
                    self.what
                );
                return;
            }
            under_way = self
                .ended
                .wait_timeout(under_way, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One piece of [`BackgroundWork`] under way; dropped, it counts as ended.
pub(crate) struct InFlight(&'static BackgroundWork);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut under_way = self.0.count();
        *under_way = under_way.saturating_sub(1);
        drop(under_way);
        self.0.ended.notify_all();
    }
}
