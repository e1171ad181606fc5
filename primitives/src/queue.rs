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
//! one per cycle. Bounded or joinable `put`: 1 (`queue_put.lua`). `get`: 1 (`BLPOP`, Redis's own
//! timeout), plus 1 on a bounded queue to wake a waiting writer. `qsize`/`empty`/`full`: 1.
//! `task_done`: 1.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_core::context;
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, Address, blpop, deadline, next_slice, now_ms, process_holder, ttl};
use crate::event::{WAKE, check_in, liveness};

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
    putters: String,
    putting: String,
    put_wake: String,
    unfinished: String,
    joiners: String,
    joining: String,
    join_wake: String,
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
            putters: keys.key("putters"),
            putting: keys.key("putting"),
            put_wake: keys.key("put:"),
            unfinished: keys.key("unfinished"),
            joiners: keys.key("joiners"),
            joining: keys.key("joining"),
            join_wake: keys.key("join:"),
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
        item: &[u8],
        wait: bool,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let keys = self.keys();
        loop {
            let waiter = if wait {
                common::waiter_id()
            } else {
                String::new()
            };
            let added: u64 = store
                .with_conn(
                    || format!("putting on {}", self.address.describe()),
                    |c| {
                        PUT.key(&keys.items)
                            .key(&keys.state)
                            .key(&keys.putters)
                            .key(&keys.putting)
                            .key(&keys.unfinished)
                            .arg(ttl(store))
                            .arg(item)
                            .arg(&waiter)
                            .arg(liveness())
                            .arg(if self.joinable { "1" } else { "0" })
                            .invoke(c)
                    },
                )
                .map_err(|e| self.address.error(e))?;
            if added == 1 {
                return Ok(());
            }
            if !wait {
                return Err(Error::Full);
            }
            // Full: wait for a get to make room, then try again.
            let wake = format!("{}{waiter}", keys.put_wake);
            loop {
                let Some(block) = next_slice(deadline) else {
                    check_in(
                        store,
                        &self.address,
                        &keys.putters,
                        &keys.putting,
                        &keys.put_wake,
                        &waiter,
                        "cancel",
                    )?;
                    return Err(Error::Full);
                };
                if blpop(store, &wake, block)
                    .map_err(|e| self.address.error(e))?
                    .is_some()
                {
                    break;
                }
                if check_in(
                    store,
                    &self.address,
                    &keys.putters,
                    &keys.putting,
                    &keys.put_wake,
                    &waiter,
                    "refresh",
                )? {
                    break;
                }
            }
        }
    }

    /// Takes an item: once (`wait` false) or until `deadline`.
    fn get(&self, store: &Store, wait: bool, deadline: Option<Instant>) -> Result<Vec<u8>> {
        let keys = self.keys();
        if !wait {
            let (exists, item): (bool, Option<Vec<u8>>) = store
                .with_conn(
                    || format!("getting from {}", self.address.describe()),
                    |c| {
                        redis::pipe()
                            .exists(&keys.state)
                            .lpop(&keys.items, None)
                            .query(c)
                    },
                )
                .map_err(|e| self.address.error(e))?;
            if !exists {
                return Err(self.address.gone());
            }
            let item = item.ok_or(Error::Empty)?;
            self.made_room(store)?;
            return Ok(item);
        }
        loop {
            let Some(block) = next_slice(deadline) else {
                return Err(Error::Empty);
            };
            if let Some(item) =
                blpop(store, &keys.items, block).map_err(|e| self.address.error(e))?
            {
                self.made_room(store)?;
                return Ok(item);
            }
            self.check_exists(store)?;
        }
    }

    /// After a get from a bounded queue, wakes one waiting writer.
    fn made_room(&self, store: &Store) -> Result<()> {
        if self.maxsize == 0 {
            return Ok(());
        }
        let keys = self.keys();
        store
            .with_conn(
                || format!("waking a writer of {}", self.address.describe()),
                |c| {
                    WAKE.key(&keys.putters)
                        .key(&keys.putting)
                        .arg(now_ms())
                        .arg(ttl(store))
                        .arg(&keys.put_wake)
                        .arg(1)
                        .invoke::<u64>(c)
                },
            )
            .map(|_| ())
            .map_err(|e| self.address.error(e))
    }

    /// Errors when the queue's keys are gone; refreshes their TTL otherwise.
    fn check_exists(&self, store: &Store) -> Result<()> {
        let keys = self.keys();
        let (exists,): (bool,) = store
            .with_conn(
                || format!("checking {}", self.address.describe()),
                |c| {
                    redis::pipe()
                        .exists(&keys.state)
                        .expire(&keys.state, ttl(store) as i64)
                        .ignore()
                        .expire(&keys.items, ttl(store) as i64)
                        .ignore()
                        .query(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
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
        let keys = self.keys();
        let queued = FEEDER.queued(&keys.items);
        let (exists, len, applied): (bool, u64, Option<u64>) = store
            .with_conn(
                || format!("measuring {}", self.address.describe()),
                |c| {
                    // Atomic: the feeder's script must not run between the two reads.
                    redis::pipe()
                        .atomic()
                        .exists(&keys.state)
                        .llen(&keys.items)
                        .hget(&keys.fed, "items")
                        .query(c)
                },
            )
            .map_err(|e| self.address.error(e))?;
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
            self.check_open()?;
            let store = common::store()?;
            let bytes = self.core.get(&store, wait, deadline)?;
            self.core.decode(&store, &bytes)
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

        /// Whether the queue is empty (see [`Self::qsize`]).
        pub fn empty(&self) -> Result<bool> {
            Ok(self.qsize()? == 0)
        }

        /// Whether a bounded queue is (approximately) full.
        pub fn full(&self) -> Result<bool> {
            Ok(self.core.maxsize > 0 && self.qsize()? >= self.core.maxsize as usize)
        }

        /// The bound given at creation (0: unbounded).
        pub fn maxsize(&self) -> u64 {
            self.core.maxsize
        }

        fn check_open(&self) -> Result<()> {
            if FEEDER.is_closed(&self.core.keys().items) {
                return Err(self.core.closed());
            }
            Ok(())
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

    fn put_until(&self, item: &T, wait: bool, deadline: Option<Instant>) -> Result<()> {
        self.check_open()?;
        let store = common::store()?;
        let bytes = self.core.encode(&store, item)?;
        if self.core.maxsize == 0 {
            FEEDER.push(&self.core, bytes)
        } else {
            FEEDER.begin_put(&self.core)?;
            self.core.put_now(&store, &bytes, wait, deadline)
        }
    }

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

    /// Puts an item (written at once: 1 round trip).
    pub fn put(&self, item: T) -> Result<()> {
        FEEDER.begin_put(&self.core)?;
        let store = common::store()?;
        let bytes = self.core.encode(&store, &item)?;
        self.core.put_now(&store, &bytes, false, None)
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

    fn put_until(&self, item: &T, wait: bool, deadline: Option<Instant>) -> Result<()> {
        FEEDER.begin_put(&self.core)?;
        let store = common::store()?;
        let bytes = self.core.encode(&store, item)?;
        self.core.put_now(&store, &bytes, wait, deadline)
    }

    /// Marks one item taken with `get` as processed.
    pub fn task_done(&self) -> Result<()> {
        let store = common::store()?;
        let keys = self.core.keys();
        let result: std::result::Result<i64, Error> = store.with_conn(
            || format!("task_done on {}", self.core.address.describe()),
            |c| self.task_done_script(&keys, &store, "done", "").invoke(c),
        );
        match result {
            Ok(_) => Ok(()),
            Err(Error::Redis { source, .. }) if source.code() == Some("TOOMANY") => Err(
                Error::invalid_state("task_done() called more times than items were put"),
            ),
            Err(e) => Err(self.core.address.error(e)),
        }
    }

    /// Waits until every item put has been marked done.
    pub fn join(&self) -> Result<()> {
        let store = common::store()?;
        let keys = self.core.keys();
        let waiter = common::waiter_id();
        let done: i64 = store
            .with_conn(
                || format!("joining {}", self.core.address.describe()),
                |c| {
                    self.task_done_script(&keys, &store, "join", &waiter)
                        .invoke(c)
                },
            )
            .map_err(|e| self.core.address.error(e))?;
        if done == 1 {
            return Ok(());
        }
        let wake = format!("{}{waiter}", keys.join_wake);
        loop {
            if blpop(&store, &wake, common::SLICE)
                .map_err(|e| self.core.address.error(e))?
                .is_some()
            {
                return Ok(());
            }
            if check_in(
                &store,
                &self.core.address,
                &keys.joiners,
                &keys.joining,
                &keys.join_wake,
                &waiter,
                "refresh",
            )? {
                return Ok(());
            }
            self.core.check_exists(&store)?;
        }
    }

    fn task_done_script<'a>(
        &self,
        keys: &QueueKeys,
        store: &Store,
        op: &str,
        waiter: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = TASK_DONE.prepare_invoke();
        invocation
            .key(&keys.unfinished)
            .key(&keys.joiners)
            .key(&keys.joining)
            .key(&keys.state)
            .arg(ttl(store))
            .arg(&keys.join_wake)
            .arg(op)
            .arg(waiter)
            .arg(liveness());
        invocation
    }

    getters!();
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
