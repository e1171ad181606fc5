//! `Pool`: a set of worker processes that run a function over many inputs, Python's
//! `multiprocessing.Pool`, supervised and crash-safe.
//!
//! # Semantics
//!
//! * [`Pool::new`]`(n)` starts `n` workers (subprocesses, or threads with the `thread` start
//!   method); [`Pool::builder`] adds an initializer, `maxtasksperchild`, `retries`, the task lease
//!   and the restart budget. Functions are `#[shoal::remote]` handles, also in thread mode (the
//!   workers find them by name); a plain function or a closure does not compile.
//! * `map`, `starmap` and their `_async` forms split the input into chunks (default: as CPython,
//!   `ceil(len / (4 * processes))`, with `len` from an exact `size_hint` or by collecting the
//!   input first, as Python's `list()` does) and return the results in input order. The
//!   blocking forms read the whole input in the caller before they start, so it may borrow
//!   (`pool.map(f, xs.iter().copied())`); the `_async` forms and `imap` read theirs on a feeder
//!   thread after they return, so it must own its data (`Send + 'static`). `imap` and
//!   `imap_unordered` read their input lazily (default chunksize 1, as in Python) and yield as
//!   results arrive; `_with` forms take a chunksize.
//! * A function's return value is the item's result, `Result` included: `pool.map(f, xs)` with
//!   `f: fn(u32) -> Result<u32, String>` gives `Vec<Result<u32, String>>`.
//! * A panic is a task error, not a crash, and is not retried. A map completes when every chunk
//!   has finished, as in Python (no chunk is abandoned because another failed), and then fails
//!   with the failure of its first failing item in input order as [`Error::Task`] (function,
//!   message with the panic's `file:line`, kind `Panic`, the item's index in the input); its
//!   `error_callback` runs once, then. `imap` yields every result before the failing item, then
//!   the error, and goes on with the next chunk.
//! * An input iterator that panics part way: the items read before it run and their results
//!   are delivered (by `imap`), then the call fails with [`Error::Input`]; nothing hangs. An
//!   item that cannot be encoded ends the input the same way, with its codec error, and one
//!   whose `Serialize` panics with [`Error::Input`] (Python's `map` of an unpicklable item
//!   raises, and the pool stays usable); `apply_async` returns that error itself.
//! * A chunksize of 0 and `maxtasksperchild(0)` are [`Error::InvalidState`] (Python's
//!   `ValueError`).
//! * A worker that dies (killed, `std::process::exit`, a lost lease) has its chunk redelivered to
//!   a live worker and is replaced; a chunk whose `1 + retries` attempts all died fails with kind
//!   `Crashed` and its attempt count. A result that arrives twice is kept once. Worker deaths
//!   count against the restart budget only while no chunk completes, so workers killed at a
//!   steady rate do not break a map that makes progress, while workers that die before getting
//!   anything done (a crashing initializer, a function that kills its worker) break the pool
//!   after `pool.max_restarts` failures, with kind `Crashed`. Workers the backend cannot start
//!   at all (a pod the cluster refuses, an image that cannot be pulled) break it after two in a
//!   row per worker, however slowly those failures come.
//! * The initializer runs once in each worker when it starts, before (and whether or not) it
//!   gets a task.
//! * Workers never outlive their driver: a pool worker that finds its driver gone (killed, even
//!   with `SIGKILL`) exits within the task lease plus a second, whatever it runs.
//! * When Redis becomes unreachable, the pool's calls fail with the store's error
//!   ([`Error::Redis`]) once it stayed unreachable for `redis.response_timeout_secs`; that is
//!   not counted as worker crashes. A shorter outage (unreachable, or not answering) is not
//!   either: no worker can renew its task lease meanwhile, so leases are checked again only a
//!   lease after Redis answers again, and a busy worker is not killed for it.
//! * When Redis loses the pool's state (its task stream or the stream's consumer group is
//!   gone: a restart without persistence, a failover to a replica that lagged, eviction), the
//!   pool breaks at once: its calls fail with [`Error::InvalidState`] saying so, rather than
//!   wait for chunks that went with the stream.
//! * A call returns without waiting for the pool's supervisor (an actor on shoal's own thread),
//!   so an async call never holds a Tokio worker thread for it. A call made while another
//!   thread closes or terminates the pool may therefore be refused after it returned: its
//!   result (`get()`, the iterator, the awaited future) is then the refusal, and none of its
//!   input is read or run.
//! * `close()` refuses new calls; `join()` (after `close()` or `terminate()`, else
//!   [`Error::InvalidState`]) waits for the workers to exit, after finishing the outstanding
//!   calls when closed, and then for every callback to have run (CPython's joins its result
//!   handler). An `imap` the caller has not read yet does not hold `join()` back: once
//!   the pool is closed its whole input is sent and its results wait in its iterator (memory
//!   for all of them, as in CPython). `terminate()` stops the workers at once (`SIGTERM`) and
//!   fails the calls still running. Dropping a pool terminates it (Python's `with Pool() as
//!   p:`): on a thread of a Tokio runtime (an async service), on a thread of its own, rather
//!   than holding the runtime's thread while the workers exit (the runtime's teardown finishes
//!   it, if it is still going then); elsewhere, before the drop returns.
//! * `callback` and `error_callback` of the async forms run in the parent, once per call, on the
//!   pool's callback thread, before `get()` returns (as in Python).
//! * Pool workers are daemonic, as in Python: a task cannot start processes or pools of its own,
//!   and a daemonic process cannot create a pool ([`Error::InvalidState`]).
//!
//! The supervisor actor is in the private `supervisor` module; the Redis protocol, its keys and
//! round trips are in `shoal_executor::pool`.

mod builder;
mod call;
mod supervisor;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use actix::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_core::codec::ArrayWriter;
use shoal_core::config::StartMethod;
use shoal_core::error::{Error, Result};
use shoal_core::registry::{self, RemoteFn};
use shoal_core::store::Store;
use shoal_executor::pool::{self as protocol, ChunkEntry, Initializer, PoolKeys};

pub use builder::{AsyncOptions, PoolBuilder};
use call::{
    Arrived, CallShared, Decoder, Delivery, Feeder, GuardedInput, Merger, decode_all, decode_each,
    decode_one, merge_each, merge_one, send_chunks,
};
pub use call::{AsyncCall, AsyncResult, AsyncResultFuture, IMapIterator, IMapStream};
use supervisor::{
    Close, Completion, FeedDone, FeedFailed, KillWorkers, Phase, PoolSettings, PoolShared,
    PoolSupervisor, RegisterCall, Registration, StartWorkers, Terminate,
};

use crate::runtime::{self, RuntimeRef};

/// A call's input as the feeder reads it: items, or the error that ended the input.
type Input<A> = Box<dyn Iterator<Item = Result<A>> + Send>;

/// Items a call of small chunks may have in flight (see `Pool::window`).
const WINDOW_ITEMS: usize = 4096;

/// How long `terminate()` waits for workers to exit before killing them.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// A pool of worker processes.
///
/// Dropping a pool terminates it (see the [module docs](self)): on a thread of a Tokio runtime
/// the termination goes on on a thread of its own and the drop returns at once (the runtime's
/// teardown finishes it); elsewhere the drop returns once the workers exited and the callbacks
/// queued by then ran (waiting for those at most 5 s).
pub struct Pool {
    id: String,
    processes: usize,
    keys: PoolKeys,
    store: Arc<Store>,
    supervisor: Addr<PoolSupervisor>,
    shared: Arc<PoolShared>,
    next_call: AtomicU64,
    progress: bool,
    /// The thread that writes `apply_async`'s tasks to Redis, in call order (started by the
    /// first one): the call returns without waiting for Redis.
    task_writer: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    _runtime: RuntimeRef,
}

/// Work for one of the pool's threads of jobs (its callbacks, its task writer).
type Job = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("id", &self.id)
            .field("processes", &self.processes)
            .finish()
    }
}

impl Pool {
    /// The pool once its supervisor answered the start of its workers; if it could not (the
    /// actor runtime stopped), nothing runs for it and it is done at once, not waited for.
    fn started(self, reply: std::result::Result<(), actix::MailboxError>) -> Result<Pool> {
        match reply {
            Ok(()) => Ok(self),
            Err(e) => {
                self.shared.update(|s| {
                    s.workers_exited = true;
                    s.finished = true;
                });
                Err(Error::Backend(format!(
                    "the pool supervisor did not start: {e}"
                )))
            }
        }
    }

    /// A pool of `processes` workers.
    pub fn new(processes: usize) -> Result<Pool> {
        Pool::builder().processes(processes).build()
    }

    /// The async form of [`Pool::new`] (see [`PoolBuilder::build_async`]).
    pub async fn new_async(processes: usize) -> Result<Pool> {
        Pool::builder().processes(processes).build_async().await
    }

    /// A builder.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of workers.
    pub fn processes(&self) -> usize {
        self.processes
    }

    /// Calls `f(args...)` in a worker and waits for its result.
    pub fn apply<F, A>(&self, f: F, args: A) -> Result<F::Output>
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
        F::Output: DeserializeOwned,
    {
        self.apply_async(f, args)?.get(None)
    }

    /// Calls `f(args...)` in a worker; returns at once. The arguments are encoded on the
    /// calling thread (an encoding error is this call's); the task is written to Redis by the
    /// pool's task writer, a thread that writes the `apply_async` calls in their order, so the
    /// call does not wait for Redis (a failure to write it fails the returned result). A call
    /// cancelled before its write is never written. `apply_async` calls keep their order, but a
    /// `map_async` or `imap` made after one may reach the workers first (its feeder writes its
    /// first chunks at once).
    ///
    /// ```no_run
    /// use shoal::prelude::*;
    ///
    /// #[shoal::remote]
    /// fn add(a: u64, b: u64) -> u64 {
    ///     a + b
    /// }
    ///
    /// # async fn handler(pool: &Pool) -> shoal::Result<()> {
    /// let sum = pool.apply_async(add, (2u64, 3u64))?;
    /// assert_eq!(sum.await?, 5);
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply_async<F, A>(&self, f: F, args: A) -> Result<AsyncResult<F::Output>>
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
        F::Output: DeserializeOwned,
    {
        self.apply_async_with(f, args, AsyncOptions::new())
    }

    /// [`Pool::apply_async`] with callbacks.
    pub fn apply_async_with<F, A>(
        &self,
        f: F,
        args: A,
        options: AsyncOptions<F::Output>,
    ) -> Result<AsyncResult<F::Output>>
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        let limit = self.limit();
        let mut payload = ArrayWriter::payload();
        // The arguments' `Serialize` is the caller's code: a panic in it is this call's error,
        // as it is for an item of a map (see the module docs).
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            payload.push(&args, limit, || format!("arguments of {function}"))
        }))
        .unwrap_or_else(|panic| {
            Err(Error::Input(format!(
                "encoding the arguments of {function} panicked: {}",
                registry::panic_message(panic.as_ref())
            )))
        })?;
        let payload = payload.finish();
        if payload.len() > limit {
            return Err(Error::TooLarge {
                key: self.keys.tasks.clone(),
                size: payload.len(),
                limit,
            });
        }
        let decode = decode_one::<F::Output>(function);
        let merge: Merger<F::Output> = merge_one;
        let deadline = options.deadline;
        let (call, shared, registration) = self.register(
            function,
            Delivery::Collect,
            None,
            completion(&decode, merge, options),
            None,
            deadline,
        )?;
        let chunk = ChunkEntry {
            call,
            chunk: 0,
            function: function.to_string(),
            payload,
            first_item: 0,
        };
        let (store, keys) = (self.store.clone(), self.keys.clone());
        let (supervisor, written) = (self.supervisor.clone(), shared.clone());
        self.write_task(Box::new(move || {
            if !registration.confirm() {
                return;
            }
            if written.is_cancelled() {
                // Cancelled (or ended by the pool) before its turn: not written at all. A
                // cancel that lands after this check is seen by the script that writes the
                // chunk, which adds nothing for a call in the cancelled set; a chunk written
                // after the pool's keys were deleted finds no stream, and fails its call.
                return;
            }
            let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                send_chunks(&store, &keys, &[chunk], true)
            }))
            .unwrap_or_else(|_| Err(Error::invalid_state("writing the task panicked")));
            match sent {
                // Cancelled in Redis before the write: the supervisor that cancelled the call
                // ended it.
                Ok(protocol::ChunksAdded::Cancelled) => {}
                Ok(protocol::ChunksAdded::Added) => {
                    written.set_total(1, None);
                    supervisor.do_send(FeedDone {
                        call,
                        total: 1,
                        input_error: None,
                    });
                }
                Err(e) => supervisor.do_send(FeedFailed { call, error: e }),
            }
        }));
        Ok(AsyncResult::new(
            shared,
            decode,
            merge,
            self.supervisor.clone(),
            call,
        ))
    }

    /// `f(item)` for every item, in order.
    ///
    /// The input may borrow (`xs.iter().copied()`): like Python's `map`, which takes
    /// `list(iterable)`, this reads the whole input in the calling thread before the call
    /// starts, and returns only when every item has run. (The `_async` forms and `imap` read
    /// their input lazily on a feeder thread, after they return, so theirs must own its data:
    /// `Send + 'static`.)
    pub fn map<F, A, I>(&self, f: F, iterable: I) -> Result<Vec<F::Output>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        let items = iterable.into_iter().map(|a| (a,));
        self.read_then_call(function, items, AsyncOptions::new())?
            .get(None)
    }

    /// [`Pool::map`] with a chunksize.
    pub fn map_with<F, A, I>(&self, f: F, iterable: I, chunksize: usize) -> Result<Vec<F::Output>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        let items = iterable.into_iter().map(|a| (a,));
        self.read_then_call(function, items, AsyncOptions::new().chunksize(chunksize))?
            .get(None)
    }

    /// [`Pool::map`] returning at once.
    pub fn map_async<F, A, I>(&self, f: F, iterable: I) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        self.map_async_with(f, iterable, AsyncOptions::new())
    }

    /// [`Pool::map_async`] with a chunksize and callbacks.
    pub fn map_async_with<F, A, I>(
        &self,
        f: F,
        iterable: I,
        options: AsyncOptions<Vec<F::Output>>,
    ) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        let items = iterable.into_iter().map(|a| (a,));
        self.collect_call(function, items, options)
    }

    /// `f(args...)` for every argument tuple, in order (Python's `starmap`). The input may
    /// borrow, as [`Pool::map`]'s.
    pub fn starmap<F, A, I>(&self, f: F, iterable: I) -> Result<Vec<F::Output>>
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        self.read_then_call(function, iterable.into_iter(), AsyncOptions::new())?
            .get(None)
    }

    /// [`Pool::starmap`] with a chunksize.
    pub fn starmap_with<F, A, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<Vec<F::Output>>
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        let options = AsyncOptions::new().chunksize(chunksize);
        self.read_then_call(function, iterable.into_iter(), options)?
            .get(None)
    }

    /// [`Pool::starmap`] returning at once.
    pub fn starmap_async<F, A, I>(&self, f: F, iterable: I) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        self.starmap_async_with(f, iterable, AsyncOptions::new())
    }

    /// [`Pool::starmap_async`] with a chunksize and callbacks.
    pub fn starmap_async_with<F, A, I>(
        &self,
        f: F,
        iterable: I,
        options: AsyncOptions<Vec<F::Output>>,
    ) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: RemoteFn<A>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        self.collect_call(function, iterable.into_iter(), options)
    }

    /// `f(item)` for every item, yielded in order as the results arrive; the input is read
    /// lazily. Chunksize 1.
    pub fn imap<F, A, I>(&self, f: F, iterable: I) -> Result<IMapIterator<F::Output>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        self.imap_with(f, iterable, 1)
    }

    /// [`Pool::imap`] with a chunksize.
    ///
    /// A task that fails yields its error in its place: the items before it in its chunk yield
    /// their results, the rest of its chunk does not run, and later chunks yield theirs (chunks
    /// of 4, item 5 failing: `0..=4`, the error, then `8..`). CPython differs for a chunksize
    /// above 1: the chunk fails as a whole (its earlier results are lost too) and the iterator
    /// ends after that error (`[0, 1, 2, 3, ValueError]`, then `StopIteration`).
    pub fn imap_with<F, A, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<IMapIterator<F::Output>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        let items = iterable.into_iter().map(|a| (a,));
        self.stream_call(function, items, chunksize, Delivery::Ordered)
    }

    /// `f(item)` for every item, yielded as the results arrive, in any order.
    pub fn imap_unordered<F, A, I>(&self, f: F, iterable: I) -> Result<IMapIterator<F::Output>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        self.imap_unordered_with(f, iterable, 1)
    }

    /// [`Pool::imap_unordered`] with a chunksize.
    pub fn imap_unordered_with<F, A, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<IMapIterator<F::Output>>
    where
        F: RemoteFn<(A,)>,
        A: Serialize + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: Send + 'static,
        F::Output: DeserializeOwned,
    {
        let function = self.registered(&f)?;
        let items = iterable.into_iter().map(|a| (a,));
        self.stream_call(function, items, chunksize, Delivery::Unordered)
    }

    /// Refuses new calls; the workers exit once the outstanding calls are done.
    pub fn close(&self) -> Result<()> {
        if self.shared.is_finished() {
            return Ok(());
        }
        let _ = futures::executor::block_on(self.supervisor.send(Close));
        Ok(())
    }

    /// Stops the workers now and fails the calls still running; waits for the workers to exit
    /// (`SIGTERM`, then `SIGKILL` after 5 s), then for the callbacks queued by then (the failed
    /// calls' error callbacks), at most 5 s more.
    pub fn terminate(&self) -> Result<()> {
        terminate(&self.supervisor, &self.shared);
        Ok(())
    }

    /// The async form of [`Pool::close`]: the same message to the pool's supervisor, awaited
    /// without blocking the caller's thread.
    ///
    /// ```no_run
    /// # async fn done(pool: shoal::Pool) -> shoal::Result<()> {
    /// pool.close_async().await?;
    /// pool.join_async().await
    /// # }
    /// ```
    pub fn close_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        let finished = self.shared.is_finished();
        let supervisor = self.supervisor.clone();
        async move {
            if finished {
                return Ok(());
            }
            // Sent by a task of shoal's: an actor skips a request whose reply nobody waits for
            // any more, and a future dropped after its first poll must still close the pool.
            shoal_core::context::current()?
                .spawn(move |_, caller| async move {
                    let _ = supervisor.send(Close).await;
                    caller.finish(Ok(()));
                })
                .await
        }
    }

    /// The async form of [`Pool::terminate`]: stops the workers now, fails the calls still
    /// running, and waits for the workers to exit (a worker still there after 5 s is killed,
    /// and waited for 5 s more), as a task on shoal's actor runtime: no thread is blocked.
    pub fn terminate_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        let shared = self.shared.clone();
        let supervisor = self.supervisor.clone();
        // Nothing happens before the first poll, as for `close_async`.
        async move {
            if shared.is_finished() {
                return Ok(());
            }
            shoal_core::context::current()?
                .spawn(move |_, caller| async move {
                    let _ = supervisor.send(Terminate).await;
                    if tokio::time::timeout(TERMINATE_GRACE, shared.finished())
                        .await
                        .is_err()
                    {
                        let _ = supervisor.send(KillWorkers).await;
                        let _ = tokio::time::timeout(TERMINATE_GRACE, shared.finished()).await;
                    }
                    caller.finish(Ok(()));
                })
                .await
        }
    }

    /// The async form of [`Pool::join`]: resolves once the workers exited and the callbacks
    /// ran, on any executor, without blocking a thread. Call [`Pool::close_async`] or
    /// [`Pool::terminate_async`] (or their blocking forms) first ([`Error::InvalidState`]
    /// otherwise).
    pub fn join_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        let shared = self.shared.clone();
        async move {
            if matches!(shared.lock().phase, Phase::Running) {
                return Err(Error::invalid_state(
                    "join() needs close() or terminate() first",
                ));
            }
            shared.finished().await;
            Ok(())
        }
    }

    /// Waits for the workers to exit, then for the callbacks of the calls that completed to run
    /// (as CPython's joins its result handler). Call [`Pool::close`] or [`Pool::terminate`]
    /// first ([`Error::InvalidState`] otherwise). A callback that joins its own pool waits for
    /// the workers only: the callbacks after it cannot run before it returns.
    pub fn join(&self) -> Result<()> {
        if matches!(self.shared.lock().phase, Phase::Running) {
            return Err(Error::invalid_state(
                "join() needs close() or terminate() first",
            ));
        }
        self.shared.wait_finished(None);
        Ok(())
    }

    fn limit(&self) -> usize {
        self.store.settings().max_message_bytes
    }

    /// Runs `write` (an `apply_async`'s task written to Redis) on the pool's task writer, after
    /// the writes asked before it; on this thread if that thread cannot start.
    fn write_task(&self, write: Job) {
        let mut writer = self.task_writer.lock().unwrap_or_else(|p| p.into_inner());
        if writer.is_none() {
            match spawn_job_thread("shoal-pool-tasks", "writing a pool's task") {
                Ok(thread) => *writer = Some(thread),
                Err(e) => tracing::warn!("{e}; the task is written on the calling thread"),
            }
        }
        let write = match writer.as_ref() {
            Some(thread) => match thread.send(write) {
                Ok(()) => return,
                // The thread is gone: written here, and a new one started next time.
                Err(mpsc::SendError(write)) => {
                    *writer = None;
                    write
                }
            },
            None => write,
        };
        drop(writer);
        write();
    }

    fn registered<F: RemoteFn<A>, A>(&self, f: &F) -> Result<&'static str> {
        let name = f.name();
        registry::resolve(name)?;
        Ok(name)
    }

    /// Chunks in flight per call: 32 per worker (at least 64), enough for every worker to have
    /// chunks in hand and find more waiting, few enough to bound memory. A call of small chunks
    /// gets more (up to 4×, within [`WINDOW_ITEMS`] items), so that its feeder sends them in
    /// bigger batches and its workers take more at once: a round trip and a wake-up per batch,
    /// not per few chunks.
    fn window(&self, chunksize: Option<usize>) -> usize {
        let base = (32 * self.processes).max(64);
        (WINDOW_ITEMS / chunksize.unwrap_or(1).max(1)).clamp(base, 4 * base)
    }

    fn register(
        &self,
        function: &str,
        delivery: Delivery,
        chunksize: Option<usize>,
        completion: Option<Completion>,
        progress: Option<ProgressBar>,
        deadline: Option<Duration>,
    ) -> Result<(u64, Arc<CallShared>, Registration)> {
        self._runtime.check_accepting()?;
        self.shared.lock().phase.accepts_calls()?;
        if !self.supervisor.connected() {
            return Err(Error::invalid_state("the pool is no longer running"));
        }
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let shared = CallShared::new(self.window(chunksize));
        let (message, registration) = RegisterCall::new(
            call,
            function.to_string(),
            shared.clone(),
            delivery,
            chunksize.map(|c| c as u64),
            completion,
            progress,
            deadline,
        );
        // Not awaited here (see `RegisterCall`): the caller's thread, maybe a Tokio worker,
        // never waits for shoal's actor thread. A refusal that crosses this call (the pool
        // closed in between) reaches the caller through the call's result.
        self.supervisor.do_send(message);
        Ok((call, shared, registration))
    }

    /// A `map`-like call: every item's result, collected in order.
    fn collect_call<A, R, It>(
        &self,
        function: &'static str,
        items: It,
        options: AsyncOptions<Vec<R>>,
    ) -> Result<AsyncResult<Vec<R>>>
    where
        A: Serialize + Send + 'static,
        R: DeserializeOwned + 'static,
        It: Iterator<Item = A> + Send + 'static,
    {
        check_chunksize(options.chunksize)?;
        // Python's map takes list(iterable): the length decides the default chunksize. A panic
        // while reading it ends the input there (see the module docs).
        let items = GuardedInput::new(items);
        let (len, items): (usize, Input<A>) = match items.size_hint() {
            (low, Some(high)) if low == high => (low, Box::new(items)),
            _ => {
                let all: Vec<Result<A>> = items.collect();
                let readable = all.iter().filter(|item| item.is_ok()).count();
                (readable, Box::new(all.into_iter()))
            }
        };
        self.collect_input(function, len, items, options)
    }

    /// A `map`-like call whose input is read here, in the caller, before the call starts (the
    /// blocking forms, whose input may borrow). A panic in the input ends it there, as in
    /// [`Pool::collect_call`].
    fn read_then_call<A, R>(
        &self,
        function: &'static str,
        items: impl Iterator<Item = A>,
        options: AsyncOptions<Vec<R>>,
    ) -> Result<AsyncResult<Vec<R>>>
    where
        A: Serialize + Send + 'static,
        R: DeserializeOwned + 'static,
    {
        check_chunksize(options.chunksize)?;
        let mut items = items;
        let mut read: Vec<A> = Vec::with_capacity(items.size_hint().0);
        // `extend` keeps what it pushed before a panic (its length is set as it goes).
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read.extend(&mut items)));
        let failure = outcome.err().map(|payload| {
            Error::Input(format!(
                "its iterator panicked: {}",
                registry::panic_message(payload.as_ref())
            ))
        });
        let len = read.len();
        let items: Input<A> = Box::new(read.into_iter().map(Ok).chain(failure.map(Err)));
        self.collect_input(function, len, items, options)
    }

    /// A `map`-like call over `len` items read (an error item ends the input).
    fn collect_input<A, R>(
        &self,
        function: &'static str,
        len: usize,
        items: Input<A>,
        options: AsyncOptions<Vec<R>>,
    ) -> Result<AsyncResult<Vec<R>>>
    where
        A: Serialize + Send + 'static,
        R: DeserializeOwned + 'static,
    {
        let chunksize = options
            .chunksize
            .unwrap_or_else(|| len.div_ceil(4 * self.processes))
            .max(1);
        let decode = decode_each::<R>(function);
        let merge: Merger<Vec<R>> = merge_each;
        let progress = self.progress_bar(len);
        let deadline = options.deadline;
        let (call, shared, registration) = self.register(
            function,
            Delivery::Collect,
            Some(chunksize),
            completion(&decode, merge, options),
            progress,
            deadline,
        )?;
        self.feed(call, function, chunksize, items, &shared, registration)?;
        Ok(AsyncResult::new(
            shared,
            decode,
            merge,
            self.supervisor.clone(),
            call,
        ))
    }

    /// An `imap`-like call.
    fn stream_call<A, R, It>(
        &self,
        function: &'static str,
        items: It,
        chunksize: usize,
        delivery: Delivery,
    ) -> Result<IMapIterator<R>>
    where
        A: Serialize + Send + 'static,
        R: DeserializeOwned,
        It: Iterator<Item = A> + Send + 'static,
    {
        check_chunksize(Some(chunksize))?;
        let (call, shared, registration) =
            self.register(function, delivery, Some(chunksize), None, None, None)?;
        self.feed(
            call,
            function,
            chunksize,
            GuardedInput::new(items),
            &shared,
            registration,
        )?;
        Ok(IMapIterator::new(
            shared,
            delivery == Delivery::Ordered,
            function,
            self.supervisor.clone(),
            call,
        ))
    }

    fn feed<A, It>(
        &self,
        call: u64,
        function: &'static str,
        chunksize: usize,
        items: It,
        shared: &Arc<CallShared>,
        registration: Registration,
    ) -> Result<()>
    where
        A: Serialize + Send + 'static,
        It: Iterator<Item = Result<A>> + Send + 'static,
    {
        let feeder = Feeder {
            registration: Some(registration),
            store: self.store.clone(),
            keys: self.keys.clone(),
            call,
            function: function.to_string(),
            chunksize,
            shared: shared.clone(),
            supervisor: self.supervisor.clone(),
        };
        if let Err(e) = feeder.spawn(items) {
            self.supervisor.do_send(FeedFailed {
                call,
                error: e.clone(),
            });
            return Err(e);
        }
        Ok(())
    }

    fn progress_bar(&self, items: usize) -> Option<ProgressBar> {
        use std::io::IsTerminal;
        if !self.progress || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(items as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} items  {per_sec}  eta {eta}")
        {
            bar.set_style(style);
        }
        Some(bar)
    }
}

/// A pool as its runtime sees it, to drain it at shutdown.
pub(crate) struct PoolEntry {
    supervisor: Addr<PoolSupervisor>,
    shared: Arc<PoolShared>,
}

impl PoolEntry {
    pub(crate) fn finished(&self) -> bool {
        self.shared.is_finished()
    }

    /// `close()`: no new call; the workers stop after the calls in flight.
    pub(crate) fn close(&self) {
        if !self.finished() {
            let _ = futures::executor::block_on(self.supervisor.send(Close));
        }
    }

    /// Waits until the workers exited, at most `timeout`; false then.
    pub(crate) fn wait_finished(&self, timeout: Duration) -> bool {
        self.shared.wait_finished(Some(timeout))
    }

    /// `terminate()`: stops the workers now, fails the calls still running.
    pub(crate) fn terminate(&self) {
        terminate(&self.supervisor, &self.shared);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.shared.is_finished() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // A thread of an async runtime: the wait for the workers' exit (up to twice
            // `TERMINATE_GRACE`) would hold its tasks, or wait forever on shoal's own actor
            // thread, where the supervisor runs. The termination goes on on a thread of its
            // own. It holds no handle of the runtime: the runtime's teardown, when its last
            // handle goes, terminates what is left of the pool itself, before the process
            // exits (`RuntimeInner`'s drop).
            let (supervisor, shared) = (self.supervisor.clone(), self.shared.clone());
            let started = std::thread::Builder::new()
                .name("shoal-pool-drop".into())
                .spawn(move || terminate(&supervisor, &shared));
            if started.is_ok() {
                return;
            }
        }
        terminate(&self.supervisor, &self.shared);
    }
}

/// Stops the workers (`SIGTERM`) and waits for them to exit, killing those still there after
/// `TERMINATE_GRACE`; then waits for the callbacks queued meanwhile (as CPython's `terminate()`
/// joins its result handler), at most `TERMINATE_GRACE` more: a callback that blocks does not
/// hold a drop for ever. Returns at once when the pool finished already.
fn terminate(supervisor: &Addr<PoolSupervisor>, shared: &PoolShared) {
    if shared.is_finished() {
        return;
    }
    let _ = futures::executor::block_on(supervisor.send(Terminate));
    if !shared.wait_workers_exited(TERMINATE_GRACE) {
        let _ = futures::executor::block_on(supervisor.send(KillWorkers));
        shared.wait_workers_exited(TERMINATE_GRACE);
    }
    shared.wait_finished(Some(TERMINATE_GRACE));
}

/// A chunksize given by the caller must be at least 1 (Python: `ValueError`).
fn check_chunksize(chunksize: Option<usize>) -> Result<()> {
    match chunksize {
        Some(0) => Err(Error::invalid_state("chunksize must be at least 1, not 0")),
        _ => Ok(()),
    }
}

/// Turns the typed callbacks into an untyped completion, or `None` when there are none.
fn completion<R: 'static>(
    decode: &Decoder<R>,
    merge: Merger<R>,
    options: AsyncOptions<R>,
) -> Option<Completion> {
    let AsyncOptions {
        callback,
        error_callback,
        ..
    } = options;
    if callback.is_none() && error_callback.is_none() {
        return None;
    }
    let decode = decode.clone();
    Some(Box::new(
        move |outcome: std::result::Result<&Arrived, &Error>| {
            // Decoded here, on the callback thread: `get()` decodes its own copy.
            let typed = match outcome {
                Ok(arrived) => decode_all(&decode, merge, arrived),
                Err(e) => Err(e.clone()),
            };
            match typed {
                Ok(value) => {
                    if let Some(callback) = callback {
                        callback(&value);
                    }
                }
                Err(error) => {
                    if let Some(callback) = error_callback {
                        callback(&error);
                    }
                }
            }
        },
    ))
}

/// The thread that runs a pool's callbacks, in completion order.
fn spawn_callback_thread() -> Result<mpsc::Sender<Job>> {
    spawn_job_thread("shoal-pool-callbacks", "a pool callback")
}

/// A thread named `name` that runs the jobs sent to it, in order, until every sender is gone;
/// a job that panics (`what` says whose) is logged and the next one runs.
fn spawn_job_thread(name: &str, what: &'static str) -> Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for job in rx {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    tracing::error!("{what} panicked");
                }
            }
        })
        .map_err(|e| Error::io(format!("starting the thread {name}"), e))?;
    Ok(tx)
}
