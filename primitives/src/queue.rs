//! `Queue`, `SimpleQueue` and `JoinableQueue`: FIFO queues shared by processes.
//!
//! # Semantics (Python's)
//!
//! * [`Queue`]`::new()` is unbounded; [`Queue::with_maxsize`] bounds it. `put` blocks while a
//!   bounded queue is full; `put_timeout` gives up with [`Error::Full`], `put_nowait` at once.
//!   `get` blocks while the queue is empty; `get_timeout` gives up with [`Error::Empty`],
//!   `get_nowait` at once. `full` is approximate, as in Python (other processes move items
//!   meanwhile). `qsize` and `empty` count the items in Redis plus those this process's feeder
//!   has not written yet, read together (one round trip tells how far the feeder got), so they are
//!   exact when no other process uses the queue.
//! * Puts on an unbounded `Queue` are buffered and written by this process's feeder thread, as
//!   Python's feeder thread writes to its pipe: `put` returns at once, and another process may
//!   see the item a moment later. Items put by one process arrive in the order it put them, each
//!   exactly once whatever fails (see *Feeder* below). [`Queue::close`] says this process will
//!   put (and get) no more; after it, [`Queue::join_thread`] waits until everything this process
//!   put has reached Redis. The runtime does that at exit and a worker at the end of its task,
//!   unless [`Queue::cancel_join_thread`] was called (buffered items may then be lost, as in
//!   Python).
//! * A closed queue: `put` and `get` in this process are [`Error::InvalidState`] saying it is
//!   closed (Python's `ValueError: Queue is closed`); so are `empty` and `qsize` once this process
//!   has put on it (Python: `OSError ... is closed`; a queue closed before any use answers them,
//!   as in Python). The marks are this process's: other processes are not affected, and the
//!   exit hook that a pool worker runs after each task forgets them, so the next task finds the
//!   queue open.
//! * [`SimpleQueue`] has no feeder and no bound: `put` writes at once; `get`, `empty`, `close`;
//!   after `close`, `put`, `get` and `empty` are errors at once (Python closes both pipe ends).
//! * [`JoinableQueue`] adds [`JoinableQueue::task_done`] and [`JoinableQueue::join`]: `join`
//!   blocks until every item put has been marked done; one `task_done` too many is
//!   [`Error::InvalidState`]. Its `put` writes at once (the unfinished count must include the
//!   item before `put` returns).
//! * A queue whose keys were deleted or expired is [`Error::InvalidState`] (checked at least once
//!   a second while a call waits); an item that does not decode as `T` is [`Error::Codec`]
//!   naming the key and the type.
//!
//! # Feeder
//!
//! Each cycle, the feeder takes up to 10,000 items (8 MiB) of every queue that has some and
//! writes them in one pipelined round trip: one `queue_feed.lua` call per queue, each a *batch*
//! numbered 1, 2, 3... per queue and process. The script appends a batch only if its number is
//! above the highest this process applied to that queue (kept in `fed:<writer>` under the queue's
//! hash tag, with the queue's TTL), so a batch sent again after an ambiguous failure (a response
//! timeout or a dropped connection: Redis may have applied it) is skipped, never duplicated. A
//! queue has at most one batch in flight, and later items wait behind it, which keeps the order.
//! Each queue's reply is read on its own (`ignore_errors`), so one queue's failure neither blocks
//! nor repeats another's batch.
//!
//! * A transient failure (Redis unreachable, a timeout, an error reply that may pass) keeps the
//!   batch and sends it again, same number, every 200 ms.
//! * A permanent failure (a key of the queue holds another type, the queue was deleted) drops
//!   that queue's batch and buffered items, logs it, and is returned, naming the queue and the
//!   number of items lost, by the next `put` or `join_thread` on that queue.
//! * `join_thread` returns once everything is written, at the first permanent failure, or after
//!   30 s of uninterrupted transient failures (the items stay buffered and are retried).
//! * The exit hook waits at most 30 s in all for every queue whose join was not cancelled, then
//!   logs each queue's unwritten items and what failed.
//!
//! # Keys (hash tag `{<ns>:queue:<id>}`)
//!
//! `items` (list of codec payloads), `state` (hash: `maxsize`), `fed:<writer>` (the last feeder
//! batch applied from each writing process), `putters`/`putting`/`put:<waiter>` (writers waiting
//! for room), `unfinished` (counter), `joiners`/`joining`/`join:<waiter>`.
//!
//! # Round trips
//!
//! Unbounded `put`: none on the caller's thread; the feeder writes the batches of every queue in
//! one per cycle. Bounded or joinable `put`: 1 (`queue_put.lua`); a writer that finds the queue
//! full waits on its wake key (one `BLPOP` slice, then a check-in, per second) and puts again
//! when a get makes room; one that gives up with a wake-up (room) in hand passes it on to the
//! next writer (1 more), so no waiting writer misses room. `get`: 1 (`BLPOP`, Redis's own
//! timeout, plus a check that the queue exists per second of waiting), plus 1 on a bounded queue
//! to wake a waiting writer (if that fails the item is returned all the same and the failure
//! logged: an item taken is never dropped). `get_nowait`: 1. `qsize`/`empty`/`full`: 1.
//! `task_done`: 1. `join`: 1, then a `BLPOP` that returns at the last `task_done` (plus a
//! check-in and an existence check per second).
//!
//! # Async forms
//!
//! `put_async`, `put_timeout_async`, `put_nowait_async`, `get_async`, `get_timeout_async`,
//! `get_nowait_async`, `qsize_async`, `empty_async`, `full_async`, and
//! `JoinableQueue::join_async`/`task_done_async` run the same round trips (the same state machines, `op.rs`) as a task on shoal's actor runtime, blocking
//! commands on dedicated connections of that runtime, and hand the result back through a
//! oneshot channel: any executor (Tokio's current-thread or multi-thread runtime, actix's) can
//! await them, and no thread is parked per call. Timeouts run from the first poll. An unbounded
//! `Queue`'s `put_async` only hands the item to the feeder, as `put` does (no round trip).
//!
//! Dropping the future (a `select!`, a `tokio::time::timeout`) never loses an item:
//!
//! * `get_async`: the task stops before its next wait slice (within a second) without taking
//!   anything; an item it took meanwhile (or that arrived with the future already gone) is
//!   pushed back to the head of the queue (`LPUSH`). Until then another reader may see the next
//!   item first; a bounded queue may briefly hold one item above `maxsize` (a writer woken by
//!   that get may have filled the place).
//! * `put_async` (bounded or joinable): a put still waiting for room leaves the writers' queue
//!   before its next slice and passes on a wake-up it had consumed; an item already written
//!   stays written (it is the queue's now, like a sent message).
//! * `join_async`: the joiner leaves the joiners' queue.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_core::context;
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, Address, deadline, liveness, next_slice, process_holder, ttl};
use crate::event::{Recheck, WaitList, WakeWait, Woke};
use crate::op::{self, Operation, Request, Step};

static PUT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("queue_put.lua")));
static TASK_DONE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("queue_task_done.lua")));
static FEED: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("queue_feed.lua")));

/// Most items in one feeder batch.
const FEED_BATCH: usize = 10_000;
/// Most bytes in one feeder batch (a batch has at least one item, whatever its size).
const FEED_BATCH_BYTES: usize = 8 << 20;
/// Wait before a batch that failed transiently is sent again.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long the exit hook waits for every queue's feeder writes, in all.
const EXIT_FLUSH: Duration = Duration::from_secs(30);
/// How long `join_thread` waits through uninterrupted transient failures before it reports them.
const JOIN_GIVE_UP: Duration = Duration::from_secs(30);

/// The shared part of the three queues.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct QueueCore {
    address: Address,
    maxsize: u64,
    joinable: bool,
    /// The key names, computed once per handle (and shared by its clones).
    #[serde(skip)]
    cached_keys: Arc<std::sync::OnceLock<Arc<QueueKeys>>>,
}

impl PartialEq for QueueCore {
    fn eq(&self, other: &Self) -> bool {
        (&self.address, self.maxsize, self.joinable)
            == (&other.address, other.maxsize, other.joinable)
    }
}

impl Eq for QueueCore {}

#[derive(Debug)]
struct QueueKeys {
    items: String,
    state: String,
    /// Writers waiting for room (`putters`, `putting`, `put:<waiter>`).
    putters: WaitList,
    unfinished: String,
    /// `join` callers waiting (`joiners`, `joining`, `join:<waiter>`).
    joiners: WaitList,
    /// What this process's feeder applied (`queue_feed.lua`).
    fed: String,
}

impl QueueCore {
    fn create(maxsize: u64, joinable: bool) -> Result<QueueCore> {
        let (context, address) = Address::create("queue")?;
        let core = QueueCore {
            address,
            maxsize,
            joinable,
            cached_keys: Arc::default(),
        };
        let keys = core.keys();
        let store = context.store();
        store
            .with_conn(
                || format!("creating {}", core.address.describe()),
                |c| {
                    redis::pipe()
                        .hset(&keys.state, "maxsize", maxsize)
                        .ignore()
                        .expire(&keys.state, ttl(store) as i64)
                        .ignore()
                        .query::<()>(c)
                },
            )
            .map_err(|e| core.address.error(e))?;
        Ok(core)
    }

    fn keys(&self) -> Arc<QueueKeys> {
        self.cached_keys
            .get_or_init(|| Arc::new(self.compute_keys()))
            .clone()
    }

    fn compute_keys(&self) -> QueueKeys {
        let keys = self.address.keys();
        QueueKeys {
            items: keys.key("items"),
            state: keys.key("state"),
            putters: WaitList {
                waiters: keys.key("putters"),
                waiting: keys.key("putting"),
                wake_prefix: keys.key("put:"),
            },
            unfinished: keys.key("unfinished"),
            joiners: WaitList {
                waiters: keys.key("joiners"),
                waiting: keys.key("joining"),
                wake_prefix: keys.key("join:"),
            },
            fed: keys.key(&format!("fed:{}", process_holder())),
        }
    }

    fn encode<T: Serialize>(&self, store: &Store, item: &T) -> Result<Vec<u8>> {
        store.encode(item, &self.keys().items)
    }

    fn decode<T: DeserializeOwned>(&self, store: &Store, bytes: &[u8]) -> Result<T> {
        store.decode(bytes, &self.keys().items)
    }

    /// A put that writes now: waits for room until `deadline` (`None`: forever) when `wait`.
    fn put_now(
        &self,
        store: &Store,
        item: Vec<u8>,
        wait: bool,
        deadline: Option<Instant>,
    ) -> Result<()> {
        op::run(store, &mut Put::new(self, item, wait, deadline))
    }

    /// The async form of [`QueueCore::put_now`]; `timeout` runs from the first poll.
    fn put_now_async(
        &self,
        item: Vec<u8>,
        wait: bool,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<()>> + Send + use<> {
        let core = self.clone();
        async move {
            let put = Put::new(&core, item, wait, deadline(timeout));
            op::spawn(put, None).await
        }
    }

    /// Takes an item: once (`wait` false) or until `deadline`.
    fn get(&self, store: &Store, wait: bool, deadline: Option<Instant>) -> Result<Vec<u8>> {
        op::run(store, &mut Get::new(self, wait, deadline))
    }

    /// The async form of [`QueueCore::get`]; `timeout` runs from the first poll. An item taken
    /// for a caller that dropped the future goes back to the head of the queue.
    fn get_async(
        &self,
        wait: bool,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send + use<> {
        let core = self.clone();
        async move {
            let get = Get::new(&core, wait, deadline(timeout));
            let undo: op::Undo<Vec<u8>> = Box::new(move |store, item| {
                Box::pin(async move {
                    let keys = core.keys();
                    let mut cmd = redis::cmd("LPUSH");
                    cmd.arg(&keys.items).arg(item);
                    op::undo_request(
                        &store,
                        || core.address.describe(),
                        Request::cmd("giving an item back to", cmd),
                    )
                    .await;
                })
            });
            op::spawn(get, Some(undo)).await
        }
    }

    /// Errors when the queue's keys are gone (read with [`QueueCore::exists`]); refreshes their
    /// TTL otherwise.
    fn check_exists(&self, store: &Store) -> Request {
        let keys = self.keys();
        let mut pipe = redis::pipe();
        pipe.exists(&keys.state)
            .expire(&keys.state, ttl(store) as i64)
            .ignore()
            .expire(&keys.items, ttl(store) as i64)
            .ignore();
        Request::pipe("checking", pipe)
    }

    /// Reads the reply to [`QueueCore::check_exists`].
    fn exists(&self, reply: Result<redis::Value>) -> Result<()> {
        let (exists,): (bool,) =
            op::parse(reply, "a queue check").map_err(|e| self.address.error(e))?;
        if exists {
            Ok(())
        } else {
            Err(self.address.gone())
        }
    }

    /// The items in Redis plus those this process's feeder has not written. The feeder counts
    /// the items it was given (`queued`, read first) and `queue_feed.lua` records how many of
    /// them Redis has (`applied`, read atomically with the length), so an item being written is
    /// counted once, in Redis or in the feeder, whenever the feeder's write lands.
    fn qsize(&self, store: &Store) -> Result<usize> {
        let queued = FEEDER.queued(&self.keys().items);
        op::run_single(
            store,
            || self.address.describe(),
            self.qsize_request(),
            |reply| self.qsize_from(queued, reply),
        )
    }

    /// The async form of [`QueueCore::qsize`]: the feeder's count is read at the first poll,
    /// before the request is sent.
    fn qsize_async(&self) -> impl Future<Output = Result<usize>> + Send + use<> {
        let core = self.clone();
        async move {
            let queued = FEEDER.queued(&core.keys().items);
            let request = core.qsize_request();
            let address = core.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| core.qsize_from(queued, reply),
            )
            .await
        }
    }

    /// Whether the queue exists, its length and what this process's feeder applied to it, read
    /// atomically (the feeder's script must not run between the reads).
    fn qsize_request(&self) -> Request {
        let keys = self.keys();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .exists(&keys.state)
            .llen(&keys.items)
            .hget(&keys.fed, "items");
        Request::pipe("measuring", pipe)
    }

    /// Reads the reply to [`QueueCore::qsize_request`], `queued` the feeder's count read before.
    fn qsize_from(&self, queued: Option<Queued>, reply: Result<redis::Value>) -> Result<usize> {
        let (exists, len, applied): (bool, u64, Option<u64>) =
            op::parse(reply, "a queue size").map_err(|e| self.address.error(e))?;
        if !exists {
            return Err(self.address.gone());
        }
        let unwritten = match (queued, applied) {
            (Some(queued), Some(applied)) => queued.total.saturating_sub(applied),
            // Nothing of this process's applied yet (or its record expired).
            (Some(queued), None) => queued.unwritten,
            (None, _) => 0,
        };
        Ok(usize::try_from(len + unwritten).unwrap_or(usize::MAX))
    }

    /// Whether `size` items fill a bounded queue.
    fn is_full(&self, size: usize) -> bool {
        size >= self.maxsize as usize
    }

    /// A queue this process closed is an error.
    fn check_open(&self) -> Result<()> {
        if FEEDER.is_closed(&self.keys().items) {
            return Err(self.closed());
        }
        Ok(())
    }

    /// Before a put: an unbounded `Queue`'s item (`buffered`) goes to the feeder (`None`);
    /// otherwise the queue counts as used and the item is returned, to be written now.
    fn stage_put(&self, item: Vec<u8>, buffered: bool) -> Result<Option<Vec<u8>>> {
        if buffered && self.maxsize == 0 {
            FEEDER.push(self, item)?;
            return Ok(None);
        }
        FEEDER.begin_put(self)?;
        Ok(Some(item))
    }

    /// `queue_task_done.lua`: `done` (task_done) or `join` (queue `waiter` unless nothing is
    /// unfinished).
    fn task_done_request(&self, store: &Store, op: &str, waiter: &str) -> Request {
        let keys = self.keys();
        let mut invocation = TASK_DONE.prepare_invoke();
        invocation
            .key(&keys.unfinished)
            .key(&keys.joiners.waiters)
            .key(&keys.joiners.waiting)
            .key(&keys.state)
            .arg(ttl(store))
            .arg(&keys.joiners.wake_prefix)
            .arg(op)
            .arg(waiter)
            .arg(liveness());
        Request::script(
            if op == "join" {
                "joining"
            } else {
                "task_done on"
            },
            invocation,
        )
    }

    fn task_done_reply(&self, reply: Result<redis::Value>) -> Result<()> {
        match op::parse::<i64>(reply, "an unfinished count") {
            Ok(_) => Ok(()),
            Err(Error::Redis { source, .. }) if source.code() == Some("TOOMANY") => Err(
                Error::invalid_state("task_done() called more times than items were put"),
            ),
            Err(e) => Err(self.address.error(e)),
        }
    }

    /// The error of an operation on a queue this process closed.
    fn closed(&self) -> Error {
        Error::invalid_state(format!(
            "{} is closed in this process",
            self.address.describe()
        ))
    }
}

/// Implements `Clone`, `Debug`, `PartialEq` without bounds on `T`.
macro_rules! queue_handle {
    ($name:ident) => {
        impl<T> Clone for $name<T> {
            fn clone(&self) -> Self {
                $name {
                    core: self.core.clone(),
                    _item: PhantomData,
                }
            }
        }

        impl<T> std::fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("queue", &self.core.address.describe())
                    .field("maxsize", &self.core.maxsize)
                    .finish()
            }
        }

        impl<T> PartialEq for $name<T> {
            fn eq(&self, other: &Self) -> bool {
                self.core == other.core
            }
        }
    };
}

macro_rules! getters {
    () => {
        /// Takes an item, waiting while the queue is empty.
        pub fn get(&self) -> Result<T> {
            self.get_until(true, None)
        }

        /// Takes an item, waiting at most `timeout` ([`Error::Empty`] then).
        pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
            self.get_until(true, deadline(Some(timeout)))
        }

        /// Takes an item if one is there ([`Error::Empty`] otherwise).
        pub fn get_nowait(&self) -> Result<T> {
            self.get_until(false, None)
        }

        fn get_until(&self, wait: bool, deadline: Option<Instant>) -> Result<T> {
            self.core.check_open()?;
            let store = common::store()?;
            let bytes = self.core.get(&store, wait, deadline)?;
            self.core.decode(&store, &bytes)
        }

        /// The async form of [`Self::get`]: waits on shoal's actor runtime without blocking the
        /// caller's thread; any executor can await it. An item taken for a future that was
        /// dropped goes back to the head of the queue (see the module docs).
        pub fn get_async(&self) -> impl Future<Output = Result<T>> + Send + use<T> {
            self.get_async_with(true, None)
        }

        /// The async form of [`Self::get_timeout`] (`timeout` runs from the first poll).
        pub fn get_timeout_async(
            &self,
            timeout: Duration,
        ) -> impl Future<Output = Result<T>> + Send + use<T> {
            self.get_async_with(true, Some(timeout))
        }

        /// The async form of [`Self::get_nowait`] (1 round trip on shoal's actor runtime).
        pub fn get_nowait_async(&self) -> impl Future<Output = Result<T>> + Send + use<T> {
            self.get_async_with(false, None)
        }

        fn get_async_with(
            &self,
            wait: bool,
            timeout: Option<Duration>,
        ) -> impl Future<Output = Result<T>> + Send + use<T> {
            let core = self.core.clone();
            async move {
                core.check_open()?;
                let store = common::store()?;
                let bytes = core.get_async(wait, timeout).await?;
                core.decode(&store, &bytes)
            }
        }

        /// The number of items: those in Redis and those this process's feeder has not
        /// written yet (exact when no other process uses the queue). An error once this process
        /// closed the queue after using it.
        pub fn qsize(&self) -> Result<usize> {
            if FEEDER.closed_for_size(&self.core, Self::CLOSE_ENDS_EVERYTHING) {
                return Err(self.core.closed());
            }
            let store = common::store()?;
            self.core.qsize(&store)
        }

        /// The async form of [`Self::qsize`] (1 round trip on shoal's actor runtime; the
        /// closed check and this process's feeder count are read at the first poll).
        pub fn qsize_async(&self) -> impl Future<Output = Result<usize>> + Send + use<T> {
            let core = self.core.clone();
            async move {
                if FEEDER.closed_for_size(&core, Self::CLOSE_ENDS_EVERYTHING) {
                    return Err(core.closed());
                }
                core.qsize_async().await
            }
        }

        /// Whether the queue is empty (see [`Self::qsize`]).
        pub fn empty(&self) -> Result<bool> {
            Ok(self.qsize()? == 0)
        }

        /// The async form of [`Self::empty`] (see [`Self::qsize_async`]).
        pub fn empty_async(&self) -> impl Future<Output = Result<bool>> + Send + use<T> {
            let size = self.qsize_async();
            async move { Ok(size.await? == 0) }
        }

        /// Whether a bounded queue is (approximately) full.
        pub fn full(&self) -> Result<bool> {
            Ok(self.core.maxsize > 0 && self.core.is_full(self.qsize()?))
        }

        /// The async form of [`Self::full`] (see [`Self::qsize_async`]; an unbounded queue
        /// answers without a round trip, as `full` does).
        pub fn full_async(&self) -> impl Future<Output = Result<bool>> + Send + use<T> {
            let core = self.core.clone();
            let size = (core.maxsize > 0).then(|| self.qsize_async());
            async move {
                match size {
                    Some(size) => Ok(core.is_full(size.await?)),
                    None => Ok(false),
                }
            }
        }

        /// The bound given at creation (0: unbounded).
        pub fn maxsize(&self) -> u64 {
            self.core.maxsize
        }

        /// Says this process will use the queue no more; puts already made still reach Redis
        /// (see [`Self::join_thread`]). Other processes are not affected.
        pub fn close(&self) -> Result<()> {
            FEEDER.mark(&self.core, |p| p.closed = true);
            Ok(())
        }

        /// After [`Self::close`], waits until every item this process put has reached Redis.
        /// Errors: [`Error::InvalidState`] naming the queue when items could never be written
        /// (they are dropped), or the Redis error after 30 s of failing writes (the items stay
        /// buffered).
        pub fn join_thread(&self) -> Result<()> {
            let items = self.core.keys().items.clone();
            if !FEEDER.is_closed(&items) {
                return Err(Error::invalid_state("join_thread() needs close() first"));
            }
            FEEDER.join(&items)
        }

        /// Lets this process exit without waiting for its buffered puts (they may be lost).
        pub fn cancel_join_thread(&self) {
            FEEDER.mark(&self.core, |p| p.cancelled = true);
        }
    };
}

macro_rules! putters {
    () => {
        /// Puts an item, waiting while a bounded queue is full.
        pub fn put(&self, item: T) -> Result<()> {
            self.put_until(&item, true, None)
        }

        /// Puts an item, waiting at most `timeout` for room ([`Error::Full`] then).
        pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<()> {
            self.put_until(&item, true, deadline(Some(timeout)))
        }

        /// Puts an item if there is room now ([`Error::Full`] otherwise).
        pub fn put_nowait(&self, item: T) -> Result<()> {
            self.put_until(&item, false, None)
        }

        fn put_until(&self, item: &T, wait: bool, deadline: Option<Instant>) -> Result<()> {
            self.core.check_open()?;
            let store = common::store()?;
            let bytes = self.core.encode(&store, item)?;
            match self.core.stage_put(bytes, Self::BUFFERED)? {
                None => Ok(()),
                Some(bytes) => self.core.put_now(&store, bytes, wait, deadline),
            }
        }

        /// The async form of [`Self::put`]: waits for room on shoal's actor runtime without
        /// blocking the caller's thread (an unbounded `Queue` never waits: its feeder writes).
        /// A put whose future was dropped while it waited for room is withdrawn.
        pub fn put_async(&self, item: T) -> impl Future<Output = Result<()>> + Send + use<T> {
            self.put_async_with(&item, true, None)
        }

        /// The async form of [`Self::put_timeout`] (`timeout` runs from the first poll).
        pub fn put_timeout_async(
            &self,
            item: T,
            timeout: Duration,
        ) -> impl Future<Output = Result<()>> + Send + use<T> {
            self.put_async_with(&item, true, Some(timeout))
        }

        /// The async form of [`Self::put_nowait`].
        pub fn put_nowait_async(
            &self,
            item: T,
        ) -> impl Future<Output = Result<()>> + Send + use<T> {
            self.put_async_with(&item, false, None)
        }

        /// The item is encoded now; the rest happens at the first poll.
        fn put_async_with(
            &self,
            item: &T,
            wait: bool,
            timeout: Option<Duration>,
        ) -> impl Future<Output = Result<()>> + Send + use<T> {
            let core = self.core.clone();
            let encoded = common::store().and_then(|store| core.encode(&store, item));
            async move {
                core.check_open()?;
                match core.stage_put(encoded?, Self::BUFFERED)? {
                    None => Ok(()),
                    Some(bytes) => core.put_now_async(bytes, wait, timeout).await,
                }
            }
        }
    };
}

/// A FIFO queue shared by processes.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Queue<T> {
    core: QueueCore,
    #[serde(skip)]
    _item: PhantomData<fn() -> T>,
}
queue_handle!(Queue);

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// An unbounded queue.
    pub fn new() -> Result<Self> {
        Self::with_maxsize(0)
    }

    /// A queue holding at most `maxsize` items (0: unbounded).
    pub fn with_maxsize(maxsize: u64) -> Result<Self> {
        Ok(Queue {
            core: QueueCore::create(maxsize, false)?,
            _item: PhantomData,
        })
    }

    putters!();

    /// A closed queue still answers `empty` and `qsize` until this process uses it.
    const CLOSE_ENDS_EVERYTHING: bool = false;

    /// Puts on an unbounded queue go through the feeder.
    const BUFFERED: bool = true;

    getters!();
}

/// A queue without a feeder thread or a bound: Python's `SimpleQueue`.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct SimpleQueue<T> {
    core: QueueCore,
    #[serde(skip)]
    _item: PhantomData<fn() -> T>,
}
queue_handle!(SimpleQueue);

impl<T: Serialize + DeserializeOwned> SimpleQueue<T> {
    /// A new queue.
    pub fn new() -> Result<Self> {
        Ok(SimpleQueue {
            core: QueueCore::create(0, false)?,
            _item: PhantomData,
        })
    }

    /// Python's `SimpleQueue.close()` closes both ends of its pipe at once.
    const CLOSE_ENDS_EVERYTHING: bool = true;

    /// Written at once.
    const BUFFERED: bool = false;

    /// Puts an item (written at once: 1 round trip).
    pub fn put(&self, item: T) -> Result<()> {
        self.put_until(&item, false, None)
    }

    /// The async form of [`SimpleQueue::put`] (1 round trip on shoal's actor runtime).
    pub fn put_async(&self, item: T) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.put_async_with(&item, false, None)
    }

    fn put_until(&self, item: &T, wait: bool, deadline: Option<Instant>) -> Result<()> {
        self.core.check_open()?;
        let store = common::store()?;
        let bytes = self.core.encode(&store, item)?;
        match self.core.stage_put(bytes, Self::BUFFERED)? {
            None => Ok(()),
            Some(bytes) => self.core.put_now(&store, bytes, wait, deadline),
        }
    }

    fn put_async_with(
        &self,
        item: &T,
        wait: bool,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        let core = self.core.clone();
        let encoded = common::store().and_then(|store| core.encode(&store, item));
        async move {
            core.check_open()?;
            match core.stage_put(encoded?, Self::BUFFERED)? {
                None => Ok(()),
                Some(bytes) => core.put_now_async(bytes, wait, timeout).await,
            }
        }
    }

    getters!();
}

/// A queue whose consumers mark items done, and whose `join` waits for all of them: Python's
/// `JoinableQueue`.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct JoinableQueue<T> {
    core: QueueCore,
    #[serde(skip)]
    _item: PhantomData<fn() -> T>,
}
queue_handle!(JoinableQueue);

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// An unbounded joinable queue.
    pub fn new() -> Result<Self> {
        Self::with_maxsize(0)
    }

    /// A joinable queue of at most `maxsize` items (0: unbounded).
    pub fn with_maxsize(maxsize: u64) -> Result<Self> {
        Ok(JoinableQueue {
            core: QueueCore::create(maxsize, true)?,
            _item: PhantomData,
        })
    }

    putters!();

    /// A closed queue still answers `empty` and `qsize` until this process uses it.
    const CLOSE_ENDS_EVERYTHING: bool = false;

    /// Written at once (the unfinished count must include the item before `put` returns).
    const BUFFERED: bool = false;

    /// Marks one item taken with `get` as processed.
    pub fn task_done(&self) -> Result<()> {
        let store = common::store()?;
        op::run_single(
            &store,
            || self.core.address.describe(),
            self.core.task_done_request(&store, "done", ""),
            |reply| self.core.task_done_reply(reply),
        )
    }

    /// The async form of [`JoinableQueue::task_done`] (1 round trip on shoal's actor runtime).
    pub fn task_done_async(&self) -> impl Future<Output = Result<()>> + Send + use<T> {
        let core = self.core.clone();
        async move {
            let store = common::store()?;
            let request = core.task_done_request(&store, "done", "");
            let address = core.address.clone();
            op::spawn_single(
                move || address.describe(),
                request,
                move |reply| core.task_done_reply(reply),
            )
            .await
        }
    }

    /// Waits until every item put has been marked done.
    pub fn join(&self) -> Result<()> {
        let store = common::store()?;
        op::run(&store, &mut Join::new(&self.core))
    }

    /// The async form of [`JoinableQueue::join`]: waits on shoal's actor runtime without
    /// blocking the caller's thread. A dropped future leaves the joiners' queue.
    pub fn join_async(&self) -> impl Future<Output = Result<()>> + Send + use<T> {
        let core = self.core.clone();
        async move { op::spawn(Join::new(&core), None).await }
    }

    getters!();
}

/// A put written now (`queue_put.lua`); while a bounded queue is full, the writer queues and
/// waits on its wake key ([`WakeWait`] on `putters`), and puts again when woken. At the
/// deadline, or when the async caller left, it leaves the writers' queue; a wake-up (room) that
/// had reached it is passed on to the next writer.
struct Put {
    core: QueueCore,
    keys: Arc<QueueKeys>,
    item: Vec<u8>,
    wait: bool,
    deadline: Option<Instant>,
    waiter: String,
    phase: PutPhase,
    abandoned: bool,
}

enum PutPhase {
    Putting,
    Waiting(WakeWait<()>),
    PassingOn,
}

impl Put {
    fn new(core: &QueueCore, item: Vec<u8>, wait: bool, deadline: Option<Instant>) -> Put {
        Put {
            keys: core.keys(),
            core: core.clone(),
            item,
            wait,
            deadline,
            waiter: String::new(),
            phase: PutPhase::Putting,
            abandoned: false,
        }
    }

    fn put(&mut self, store: &Store) -> Step<()> {
        self.waiter = if self.wait {
            common::waiter_id()
        } else {
            String::new()
        };
        self.phase = PutPhase::Putting;
        let keys = &self.keys;
        let mut invocation = PUT.prepare_invoke();
        invocation
            .key(&keys.items)
            .key(&keys.state)
            .key(&keys.putters.waiters)
            .key(&keys.putters.waiting)
            .key(&keys.unfinished)
            .arg(ttl(store))
            .arg(self.item.as_slice())
            .arg(&self.waiter)
            .arg(liveness())
            .arg(if self.core.joinable { "1" } else { "0" });
        Step::Next(Request::script("putting on", invocation))
    }

    fn gave_up(&self) -> Error {
        if self.abandoned {
            op::abandoned()
        } else {
            Error::Full
        }
    }

    fn after_wait(&mut self, store: &Store, step: Step<Woke>) -> Step<()> {
        match step {
            Step::Next(request) => Step::Next(request),
            Step::Done(Err(e)) => Step::Done(Err(self.core.address.error(e))),
            // Room was made: try again.
            Step::Done(Ok(Woke { gave_up: false, .. })) => self.put(store),
            Step::Done(Ok(Woke { woken: true, .. })) => {
                self.phase = PutPhase::PassingOn;
                Step::Next(self.keys.putters.wake(store, 1))
            }
            Step::Done(Ok(_)) => Step::Done(Err(self.gave_up())),
        }
    }
}

impl Operation for Put {
    type Output = ();

    fn describe(&self) -> String {
        self.core.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<()> {
        self.put(store)
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<()> {
        match &mut self.phase {
            PutPhase::Putting => match op::parse::<u64>(reply, "a put") {
                Err(e) => Step::Done(Err(self.core.address.error(e))),
                Ok(1) => Step::Done(Ok(())),
                Ok(_) if !self.wait => Step::Done(Err(Error::Full)),
                Ok(_) => {
                    let mut waiting = WakeWait::new(
                        self.keys.putters.clone(),
                        self.waiter.clone(),
                        self.deadline,
                        (),
                    );
                    let step = waiting.start(store);
                    self.phase = PutPhase::Waiting(waiting);
                    self.after_wait(store, step)
                }
            },
            PutPhase::Waiting(waiting) => {
                let step = waiting.reply(store, reply);
                self.after_wait(store, step)
            }
            PutPhase::PassingOn => {
                if let Err(e) = reply {
                    tracing::warn!("passing on room to the next writer: {e}");
                }
                Step::Done(Err(self.gave_up()))
            }
        }
    }

    fn abandon(&mut self, store: &Store) -> Step<()> {
        self.abandoned = true;
        match &mut self.phase {
            PutPhase::Waiting(waiting) => {
                let step = waiting.cancel(store);
                self.after_wait(store, step)
            }
            PutPhase::Putting | PutPhase::PassingOn => Step::Done(Err(op::abandoned())),
        }
    }
}

/// A get: `LPOP` once (nowait), or slices of `BLPOP` on the items (Redis's own timeout) with a
/// check that the queue still exists after each; then, on a bounded queue, one waiting writer
/// is woken (`waiters_wake.lua`). The item is returned even when waking the writer failed (it is
/// logged): an item taken is never dropped.
struct Get {
    core: QueueCore,
    keys: Arc<QueueKeys>,
    wait: bool,
    deadline: Option<Instant>,
    state: GetState,
    item: Option<Vec<u8>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GetState {
    Taking,
    Popping,
    Checking,
    Waking,
}

impl Get {
    fn new(core: &QueueCore, wait: bool, deadline: Option<Instant>) -> Get {
        Get {
            keys: core.keys(),
            core: core.clone(),
            wait,
            deadline,
            state: GetState::Taking,
            item: None,
        }
    }

    fn slice(&mut self) -> Step<Vec<u8>> {
        match next_slice(self.deadline) {
            None => Step::Done(Err(Error::Empty)),
            Some(block) => {
                self.state = GetState::Popping;
                Step::Next(Request::blpop(&self.keys.items, block))
            }
        }
    }

    fn got(&mut self, store: &Store, item: Vec<u8>) -> Step<Vec<u8>> {
        if self.core.maxsize == 0 {
            return Step::Done(Ok(item));
        }
        self.item = Some(item);
        self.state = GetState::Waking;
        Step::Next(self.keys.putters.wake(store, 1))
    }
}

impl Operation for Get {
    type Output = Vec<u8>;

    fn describe(&self) -> String {
        self.core.address.describe()
    }

    fn start(&mut self, _: &Store) -> Step<Vec<u8>> {
        if self.wait {
            return self.slice();
        }
        self.state = GetState::Taking;
        let mut pipe = redis::pipe();
        pipe.exists(&self.keys.state).lpop(&self.keys.items, None);
        Step::Next(Request::pipe("getting from", pipe))
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<Vec<u8>> {
        let address = &self.core.address;
        match self.state {
            GetState::Taking => match op::parse::<(bool, Option<Vec<u8>>)>(reply, "a get") {
                Err(e) => Step::Done(Err(address.error(e))),
                Ok((false, _)) => Step::Done(Err(address.gone())),
                Ok((true, None)) => Step::Done(Err(Error::Empty)),
                Ok((true, Some(item))) => self.got(store, item),
            },
            GetState::Popping => match op::parse::<Option<(String, Vec<u8>)>>(reply, "a get") {
                Err(e) => Step::Done(Err(address.error(e))),
                Ok(Some((_, item))) => self.got(store, item),
                Ok(None) => {
                    self.state = GetState::Checking;
                    Step::Next(self.core.check_exists(store))
                }
            },
            GetState::Checking => match self.core.exists(reply) {
                Err(e) => Step::Done(Err(e)),
                Ok(()) => self.slice(),
            },
            GetState::Waking => {
                if let Err(e) = reply {
                    tracing::warn!(
                        "waking a writer of {}: {e}; it checks in within a second",
                        address.describe()
                    );
                }
                match self.item.take() {
                    Some(item) => Step::Done(Ok(item)),
                    None => Step::Done(Err(Error::invalid_state("a get lost track of its item"))),
                }
            }
        }
    }
}

/// `JoinableQueue::join`: `queue_task_done.lua` (`join`: done already, or queue the joiner),
/// then a [`WakeWait`] on `joiners` that also checks the queue still exists after each
/// check-in. A dropped async join leaves the joiners' queue.
struct Join {
    core: QueueCore,
    waiter: String,
    waiting: Option<WakeWait<QueueExists>>,
}

struct QueueExists(QueueCore);

impl Recheck for QueueExists {
    fn request(&self, store: &Store) -> Option<Request> {
        Some(self.0.check_exists(store))
    }

    fn read(&self, reply: Result<redis::Value>) -> Result<bool> {
        self.0.exists(reply).map(|()| false)
    }
}

impl Join {
    fn new(core: &QueueCore) -> Join {
        Join {
            core: core.clone(),
            waiter: common::waiter_id(),
            waiting: None,
        }
    }
}

fn joined(address: &Address, step: Step<Woke>) -> Step<()> {
    step.then(|woke| match woke {
        Err(e) => Step::Done(Err(address.error(e))),
        Ok(Woke { woken: true, .. }) => Step::Done(Ok(())),
        Ok(_) => Step::Done(Err(op::abandoned())),
    })
}

impl Operation for Join {
    type Output = ();

    fn describe(&self) -> String {
        self.core.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<()> {
        Step::Next(self.core.task_done_request(store, "join", &self.waiter))
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<()> {
        let address = &self.core.address;
        match &mut self.waiting {
            None => match op::parse::<i64>(reply, "a join") {
                Err(e) => Step::Done(Err(address.error(e))),
                Ok(1) => Step::Done(Ok(())),
                Ok(_) => {
                    let waiting = self.waiting.insert(WakeWait::new(
                        self.core.keys().joiners.clone(),
                        std::mem::take(&mut self.waiter),
                        None,
                        QueueExists(self.core.clone()),
                    ));
                    joined(address, waiting.start(store))
                }
            },
            Some(waiting) => joined(address, waiting.reply(store, reply)),
        }
    }

    fn abandon(&mut self, store: &Store) -> Step<()> {
        match &mut self.waiting {
            Some(waiting) => joined(&self.core.address, waiting.cancel(store)),
            None => Step::Done(Err(op::abandoned())),
        }
    }
}

/// This process's feeder: buffered puts of unbounded queues, written in numbered batches; and
/// this process's `closed`/`cancelled` marks of every queue.
struct Feeder {
    state: Mutex<FeederState>,
    changed: Condvar,
}

#[derive(Default)]
struct FeederState {
    /// By items key.
    queues: HashMap<String, Pending>,
}

/// One queue as this process sees it.
struct Pending {
    core: QueueCore,
    /// Put and not yet in a batch, in order.
    items: VecDeque<Vec<u8>>,
    /// The batch being written, or to be written again after a transient failure.
    inflight: Option<Batch>,
    /// The number of the next batch (the first is 1: `queue_feed.lua` starts from 0).
    next_batch: u64,
    /// Items given to the feeder and not dropped, since the process started.
    queued_total: u64,
    /// Of those, the items put in batches.
    batched_total: u64,
    /// A batch that failed transiently is not sent again before this.
    retry_at: Option<Instant>,
    /// When writes of this queue started failing without a success since.
    failing_since: Option<Instant>,
    /// The last transient failure.
    last_error: Option<Error>,
    /// A permanent failure not yet reported to the caller.
    failure: Option<Error>,
    closed: bool,
    cancelled: bool,
    /// This process put on the queue (since its last exit hook).
    used: bool,
}

/// A numbered batch of one queue's items.
struct Batch {
    number: u64,
    /// `batched_total` through this batch.
    through: u64,
    items: Arc<Vec<Vec<u8>>>,
    /// The feeder thread is writing it now.
    sending: bool,
}

impl Pending {
    fn new(core: &QueueCore) -> Pending {
        Pending {
            core: core.clone(),
            items: VecDeque::new(),
            inflight: None,
            next_batch: 1,
            queued_total: 0,
            batched_total: 0,
            retry_at: None,
            failing_since: None,
            last_error: None,
            failure: None,
            closed: false,
            cancelled: false,
            used: false,
        }
    }

    fn enqueue(&mut self, item: Vec<u8>) {
        self.items.push_back(item);
        self.queued_total += 1;
    }

    /// Items put and not known to be written.
    fn unwritten(&self) -> usize {
        self.items.len() + self.inflight.as_ref().map_or(0, |b| b.items.len())
    }

    fn is_flushed(&self) -> bool {
        self.items.is_empty() && self.inflight.is_none()
    }

    /// Whether the feeder thread has something to send for this queue now.
    fn ready(&self, now: Instant) -> bool {
        let has_work = match &self.inflight {
            Some(batch) => !batch.sending,
            None => !self.items.is_empty(),
        };
        has_work && self.retry_at.is_none_or(|at| at <= now)
    }

    /// The batch to send now: the one in flight (again), or a new one from the buffered items.
    fn next_send(&mut self) -> Option<Outgoing> {
        if self.inflight.is_none() {
            let mut bytes = 0;
            let mut n = 0;
            for item in self.items.iter().take(FEED_BATCH) {
                if n > 0 && bytes + item.len() > FEED_BATCH_BYTES {
                    break;
                }
                bytes += item.len();
                n += 1;
            }
            if n == 0 {
                return None;
            }
            self.batched_total += n as u64;
            self.inflight = Some(Batch {
                number: self.next_batch,
                through: self.batched_total,
                items: Arc::new(self.items.drain(..n).collect()),
                sending: false,
            });
            self.next_batch += 1;
        }
        let batch = self.inflight.as_mut()?;
        batch.sending = true;
        Some(Outgoing {
            core: self.core.clone(),
            number: batch.number,
            through: batch.through,
            items: batch.items.clone(),
        })
    }

    /// Applies what happened to the batch in flight.
    fn settle(&mut self, outcome: Outcome) {
        let what = self.core.address.describe();
        match outcome {
            Outcome::Written => {
                self.inflight = None;
                self.retry_at = None;
                self.failing_since = None;
                self.last_error = None;
            }
            Outcome::Permanent(e) => {
                let lost = self.unwritten();
                self.queued_total = self.queued_total.saturating_sub(lost as u64);
                if let Some(batch) = self.inflight.take() {
                    self.batched_total =
                        self.batched_total.saturating_sub(batch.items.len() as u64);
                }
                self.items.clear();
                self.retry_at = None;
                self.failing_since = None;
                self.last_error = None;
                let error = Error::invalid_state(format!(
                    "{what}: {lost} item(s) put in this process could not be written and were \
                     dropped: {e}"
                ));
                tracing::error!("{error}");
                self.failure = Some(error);
            }
            Outcome::Transient(e) => {
                if let Some(batch) = self.inflight.as_mut() {
                    batch.sending = false;
                }
                let now = Instant::now();
                self.retry_at = Some(now + RETRY_DELAY);
                if self.failing_since.is_none() {
                    tracing::warn!("{e}; retrying every {RETRY_DELAY:?}");
                    self.failing_since = Some(now);
                }
                self.last_error = Some(e);
            }
        }
    }
}

/// A batch on its way to Redis.
struct Outgoing {
    core: QueueCore,
    number: u64,
    through: u64,
    items: Arc<Vec<Vec<u8>>>,
}

/// A queue's feeder counts, for `qsize`.
struct Queued {
    /// Items given to the feeder and not dropped.
    total: u64,
    /// Of those, the ones not known to be written.
    unwritten: u64,
}

/// What became of a batch.
enum Outcome {
    /// Appended now or before (a batch sent again).
    Written,
    /// It can never be written (a key holds another type, the queue is gone).
    Permanent(redis::RedisError),
    /// It may be written if sent again (and may have been written already).
    Transient(Error),
}

/// Error codes after which sending a batch again cannot help.
fn is_permanent(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("WRONGTYPE" | "GONE" | "CORRUPT"))
}

static FEEDER: LazyLock<Arc<Feeder>> = LazyLock::new(|| {
    Arc::new(Feeder {
        state: Mutex::new(FeederState::default()),
        changed: Condvar::new(),
    })
});

impl Feeder {
    fn lock(&self) -> MutexGuard<'_, FeederState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(state: &'a mut FeederState, core: &QueueCore) -> &'a mut Pending {
        state
            .queues
            .entry(core.keys().items.clone())
            .or_insert_with(|| Pending::new(core))
    }

    /// Buffers an item for the feeder thread; reports a closed queue, or a permanent failure of
    /// earlier puts (once).
    fn push(&self, core: &QueueCore, item: Vec<u8>) -> Result<()> {
        start_feeder();
        let mut state = self.lock();
        let p = Self::entry(&mut state, core);
        if p.closed {
            return Err(core.closed());
        }
        if let Some(failure) = p.failure.take() {
            return Err(failure);
        }
        p.used = true;
        p.enqueue(item);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Before a put written at once: a closed queue is an error; the queue counts as used.
    fn begin_put(&self, core: &QueueCore) -> Result<()> {
        register_exit_hook();
        let mut state = self.lock();
        let p = Self::entry(&mut state, core);
        if p.closed {
            return Err(core.closed());
        }
        p.used = true;
        Ok(())
    }

    /// What the feeder was given for `items`'s queue, if anything.
    fn queued(&self, items: &str) -> Option<Queued> {
        self.lock().queues.get(items).map(|p| Queued {
            total: p.queued_total,
            unwritten: p.unwritten() as u64,
        })
    }

    fn is_closed(&self, items: &str) -> bool {
        self.lock().queues.get(items).is_some_and(|p| p.closed)
    }

    /// Whether `qsize`/`empty` must report the queue closed: after a use (Python), or at once.
    fn closed_for_size(&self, core: &QueueCore, at_once: bool) -> bool {
        self.lock()
            .queues
            .get(&core.keys().items)
            .is_some_and(|p| p.closed && (at_once || p.used))
    }

    fn mark(&self, core: &QueueCore, f: impl FnOnce(&mut Pending)) {
        register_exit_hook();
        f(Self::entry(&mut self.lock(), core));
        self.changed.notify_all();
    }

    /// `join_thread`: waits until `items`'s queue is written; see the module docs.
    fn join(&self, items: &str) -> Result<()> {
        let mut state = self.lock();
        loop {
            let Some(p) = state.queues.get_mut(items) else {
                return Ok(());
            };
            if let Some(failure) = p.failure.take() {
                return Err(failure);
            }
            if p.is_flushed() {
                return Ok(());
            }
            if let (Some(since), Some(e)) = (p.failing_since, &p.last_error)
                && since.elapsed() >= JOIN_GIVE_UP
            {
                return Err(e.clone());
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The exit hook: waits (at most [`EXIT_FLUSH`] in all) until every queue whose join was not
    /// cancelled is written or failed, logs what was not written, then forgets this process's
    /// `closed`/`cancelled` marks (a pool worker's next task starts with its queues open).
    fn at_exit(&self) {
        let deadline = Instant::now() + EXIT_FLUSH;
        let mut state = self.lock();
        loop {
            for p in state.queues.values_mut() {
                if let Some(failure) = p.failure.take() {
                    tracing::error!("at exit: {failure}");
                }
            }
            let now = Instant::now();
            let waiting = state
                .queues
                .values()
                .any(|p| !p.cancelled && !p.is_flushed());
            if !waiting || now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        for p in state.queues.values_mut() {
            if !p.cancelled && !p.is_flushed() {
                let cause = p
                    .last_error
                    .as_ref()
                    .map_or_else(|| "still being written".to_string(), |e| e.to_string());
                tracing::error!(
                    "{}: {} item(s) put in this process were not written within {EXIT_FLUSH:?} \
                     of exit ({cause}); they are lost if the process ends now",
                    p.core.address.describe(),
                    p.unwritten()
                );
            }
            p.closed = false;
            p.cancelled = false;
            p.used = false;
        }
    }

    fn run(&self) {
        loop {
            let work: Vec<Outgoing> = {
                let mut state = self.lock();
                loop {
                    let now = Instant::now();
                    if state.queues.values().any(|p| p.ready(now)) {
                        break;
                    }
                    let next_retry = state
                        .queues
                        .values()
                        .filter(|p| p.inflight.as_ref().is_some_and(|b| !b.sending))
                        .filter_map(|p| p.retry_at)
                        .min();
                    state = match next_retry {
                        Some(at) => {
                            self.changed
                                .wait_timeout(state, at.saturating_duration_since(now))
                                .unwrap_or_else(|p| p.into_inner())
                                .0
                        }
                        None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                    };
                }
                let now = Instant::now();
                state
                    .queues
                    .values_mut()
                    .filter(|p| p.ready(now))
                    .filter_map(Pending::next_send)
                    .collect()
            };
            let outcomes = write_batches(&work);
            let mut state = self.lock();
            for (sent, outcome) in work.iter().zip(outcomes) {
                if let Some(p) = state.queues.get_mut(&sent.core.keys().items) {
                    p.settle(outcome);
                }
            }
            drop(state);
            self.changed.notify_all();
        }
    }
}

/// Writes one batch per queue in one pipelined round trip; one outcome per batch, in order.
fn write_batches(work: &[Outgoing]) -> Vec<Outcome> {
    let context = |sent: &Outgoing| {
        format!(
            "writing {} buffered item(s) to {}",
            sent.items.len(),
            sent.core.address.describe()
        )
    };
    let store = match common::store() {
        Ok(store) => store,
        Err(e) => return work.iter().map(|_| Outcome::Transient(e.clone())).collect(),
    };
    let ttl = ttl(&store);
    let replies = store.with_conn(
        || "writing buffered queue items".into(),
        |c| {
            let invocations: Vec<redis::ScriptInvocation<'_>> = work
                .iter()
                .map(|sent| {
                    let keys = sent.core.keys();
                    let mut invocation = FEED.prepare_invoke();
                    invocation
                        .key(&keys.items)
                        .key(&keys.state)
                        .key(&keys.fed)
                        .arg(ttl)
                        .arg(sent.number)
                        .arg(sent.through);
                    for item in sent.items.iter() {
                        invocation.arg(item.as_slice());
                    }
                    invocation
                })
                .collect();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for invocation in &invocations {
                pipe.invoke_script(invocation);
            }
            let replies: Vec<redis::RedisResult<i64>> = pipe.query(c)?;
            let no_script = |r: &redis::RedisResult<i64>| {
                r.as_ref().is_err_and(|e| {
                    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                })
            };
            if replies.iter().any(no_script) {
                // First use on this server: load the script and send everything again (a batch
                // already applied is skipped).
                FEED.load(c)?;
                return pipe.query(c);
            }
            Ok(replies)
        },
    );
    match replies {
        Ok(replies) => work
            .iter()
            .zip(replies)
            .map(|(sent, reply)| match reply {
                Ok(_) => Outcome::Written,
                Err(e) if is_permanent(&e) => Outcome::Permanent(e),
                Err(e) => Outcome::Transient(Error::redis(context(sent), e)),
            })
            .collect(),
        Err(Error::Redis { source, .. }) => work
            .iter()
            .map(|sent| {
                Outcome::Transient(Error::Redis {
                    context: context(sent),
                    source: source.clone(),
                })
            })
            .collect(),
        Err(e) => work.iter().map(|_| Outcome::Transient(e.clone())).collect(),
    }
}

/// Starts the feeder thread (once per process).
fn start_feeder() {
    static STARTED: Once = Once::new();
    register_exit_hook();
    STARTED.call_once(|| {
        let feeder = FEEDER.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-queue-feeder".into())
            .spawn(move || feeder.run());
        if let Err(e) = spawned {
            tracing::error!("cannot start the queue feeder: {e}");
        }
    });
}

/// Registers the feeder's exit hook (once per process). Called before the feeder's lock is
/// taken: `run_exit_hooks` holds the hooks' lock while the hook takes the feeder's.
fn register_exit_hook() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| context::register_exit_hook(|| FEEDER.at_exit()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> QueueCore {
        QueueCore {
            address: Address {
                namespace: "test".into(),
                kind: "queue".into(),
                id: uuid::Uuid::new_v4().simple().to_string(),
            },
            maxsize: 0,
            joinable: false,
            cached_keys: Arc::default(),
        }
    }

    #[test]
    fn the_exit_hook_forgets_this_process_marks() {
        let q = core();
        FEEDER.begin_put(&q).expect("open");
        FEEDER.mark(&q, |p| p.closed = true);
        FEEDER.mark(&q, |p| p.cancelled = true);
        assert!(FEEDER.is_closed(&q.keys().items));
        assert!(FEEDER.closed_for_size(&q, false));
        assert!(matches!(FEEDER.begin_put(&q), Err(Error::InvalidState(_))));
        // What a pool worker runs after each task.
        context::run_exit_hooks();
        assert!(!FEEDER.is_closed(&q.keys().items));
        assert!(!FEEDER.closed_for_size(&q, true));
        FEEDER.begin_put(&q).expect("open again");
    }

    #[test]
    fn batches_are_numbered_in_order_and_bounded() {
        let mut p = Pending::new(&core());
        for i in 0..(FEED_BATCH + 5) {
            p.enqueue(vec![i as u8]);
        }
        let first = p.next_send().expect("a batch");
        assert_eq!((first.number, first.items.len()), (1, FEED_BATCH));
        assert!(!p.ready(Instant::now()), "one batch in flight at a time");
        p.settle(Outcome::Transient(Error::invalid_state("down")));
        let again = {
            p.retry_at = None;
            p.next_send().expect("the same batch")
        };
        assert_eq!((again.number, again.items.len()), (1, FEED_BATCH));
        assert_eq!(p.unwritten(), FEED_BATCH + 5);
        p.settle(Outcome::Written);
        let second = p.next_send().expect("the rest");
        assert_eq!((second.number, second.items.len()), (2, 5));
        assert_eq!(second.items[0], vec![FEED_BATCH as u8]);
        p.settle(Outcome::Permanent(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "wrong type",
        ))));
        assert!(p.is_flushed());
        assert_eq!(
            (p.queued_total, p.batched_total),
            (FEED_BATCH as u64, FEED_BATCH as u64)
        );
        let failure = p.failure.take().expect("reported");
        assert!(failure.to_string().contains("5 item(s)"), "{failure}");

        let mut big = Pending::new(&core());
        big.enqueue(vec![0; FEED_BATCH_BYTES]);
        big.enqueue(vec![0; 1]);
        assert_eq!(big.next_send().expect("one").items.len(), 1);
    }
}
