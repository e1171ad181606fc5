//! `Queue`, `SimpleQueue` and `JoinableQueue`: FIFO queues shared by processes.
//!
//! # Semantics (Python's)
//!
//! * [`Queue`]`::new()` is unbounded; [`Queue::with_maxsize`] bounds it. `put` blocks while a
//!   bounded queue is full; `put_timeout` gives up with [`Error::Full`], `put_nowait` at once.
//!   `get` blocks while the queue is empty; `get_timeout` gives up with [`Error::Empty`],
//!   `get_nowait` at once. `qsize`, `empty` and `full` are approximate, as in Python (other
//!   processes move items meanwhile).
//! * Puts on an unbounded `Queue` are buffered and written by this process's feeder thread in
//!   pipelined batches (one `RPUSH` of many items per round trip), as Python's feeder thread
//!   writes to its pipe: `put` returns at once, and another process may see the item a moment
//!   later. [`Queue::close`] says this process will put (and get) no more; after it,
//!   [`Queue::join_thread`] waits until everything this process put has reached Redis. The
//!   runtime does that at exit and a worker at the end of its task, unless
//!   [`Queue::cancel_join_thread`] was called (buffered items may then be lost, as in Python).
//!   Items put by one process arrive in the order it put them.
//! * [`SimpleQueue`] has no feeder and no bound: `put` writes at once; `get`, `empty`, `close`.
//! * [`JoinableQueue`] adds [`JoinableQueue::task_done`] and [`JoinableQueue::join`]: `join`
//!   blocks until every item put has been marked done; one `task_done` too many is
//!   [`Error::InvalidState`]. Its `put` writes at once (the unfinished count must include the
//!   item before `put` returns).
//! * A queue whose keys were deleted or expired is [`Error::InvalidState`] (checked at least once
//!   a second while a call waits); an item that does not decode as `T` is [`Error::Codec`]
//!   naming the key and the type.
//!
//! # Keys (hash tag `{<ns>:queue:<id>}`)
//!
//! `items` (list of codec payloads), `state` (hash: `maxsize`), `putters`/`putting`/`put:<waiter>`
//! (writers waiting for room), `unfinished` (counter), `joiners`/`joining`/`join:<waiter>`.
//!
//! # Round trips
//!
//! Unbounded `put`: none on the caller's thread; the feeder writes each batch in 1. Bounded or
//! joinable `put`: 1 (`queue_put.lua`). `get`: 1 (`BLPOP`, Redis's own timeout), plus 1 on a
//! bounded queue to wake a waiting writer. `qsize`/`empty`/`full`: 1. `task_done`: 1.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_core::context;
use shoal_core::error::{Error, Result};
use shoal_core::store::Store;

use crate::common::{self, Address, blpop, deadline, next_slice, now_ms, ttl};
use crate::event::{WAKE, check_in, liveness};

static PUT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("queue_put.lua")));
static TASK_DONE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("queue_task_done.lua")));

/// Most items in one feeder `RPUSH`.
const FEED_BATCH: usize = 10_000;
/// How long exit waits for the feeder to flush.
const EXIT_FLUSH: Duration = Duration::from_secs(30);

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

    fn qsize(&self, store: &Store) -> Result<usize> {
        let keys = self.keys();
        let (exists, len): (bool, usize) = store
            .with_conn(
                || format!("measuring {}", self.address.describe()),
                |c| redis::pipe().exists(&keys.state).llen(&keys.items).query(c),
            )
            .map_err(|e| self.address.error(e))?;
        if !exists {
            return Err(self.address.gone());
        }
        Ok(len + FEEDER.pending(&keys.items))
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

        /// The approximate number of items (those this process's feeder still buffers
        /// included).
        pub fn qsize(&self) -> Result<usize> {
            let store = common::store()?;
            self.core.qsize(&store)
        }

        /// Whether the queue is (approximately) empty.
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
                return Err(Error::invalid_state(format!(
                    "{} is closed in this process",
                    self.core.address.describe()
                )));
            }
            Ok(())
        }

        /// Says this process will use the queue no more; puts already made still reach Redis
        /// (see [`Self::join_thread`]).
        pub fn close(&self) -> Result<()> {
            FEEDER.close(&self.core.keys().items);
            Ok(())
        }

        /// After [`Self::close`], waits until every item this process put has reached Redis.
        pub fn join_thread(&self) -> Result<()> {
            let items = self.core.keys().items.clone();
            if !FEEDER.is_closed(&items) {
                return Err(Error::invalid_state("join_thread() needs close() first"));
            }
            FEEDER.flush(&items, None)
        }

        /// Lets this process exit without waiting for its buffered puts (they may be lost).
        pub fn cancel_join_thread(&self) {
            FEEDER.cancel(&self.core.keys().items);
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

    fn put_until(&self, item: &T, wait: bool, deadline: Option<Instant>) -> Result<()> {
        self.check_open()?;
        let store = common::store()?;
        let bytes = self.core.encode(&store, item)?;
        if self.core.maxsize == 0 {
            FEEDER.push(&self.core, bytes);
            Ok(())
        } else {
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

    /// Puts an item (written at once: 1 round trip).
    pub fn put(&self, item: T) -> Result<()> {
        self.check_open()?;
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

    fn put_until(&self, item: &T, wait: bool, deadline: Option<Instant>) -> Result<()> {
        self.check_open()?;
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

/// This process's feeder: buffered puts of unbounded queues, written in batches.
struct Feeder {
    state: Mutex<FeederState>,
    changed: Condvar,
}

#[derive(Default)]
struct FeederState {
    queues: HashMap<String, Pending>,
}

struct Pending {
    core: QueueCore,
    items: VecDeque<Vec<u8>>,
    /// Items taken by the feeder thread and not yet confirmed written.
    writing: usize,
    closed: bool,
    cancelled: bool,
    /// The last write failed; retried until it succeeds.
    error: Option<Error>,
}

static FEEDER: LazyLock<Arc<Feeder>> = LazyLock::new(|| {
    Arc::new(Feeder {
        state: Mutex::new(FeederState::default()),
        changed: Condvar::new(),
    })
});

impl Feeder {
    fn lock(&self) -> std::sync::MutexGuard<'_, FeederState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(state: &'a mut FeederState, core: &QueueCore) -> &'a mut Pending {
        state
            .queues
            .entry(core.keys().items.clone())
            .or_insert_with(|| Pending {
                core: core.clone(),
                items: VecDeque::new(),
                writing: 0,
                closed: false,
                cancelled: false,
                error: None,
            })
    }

    fn push(&self, core: &QueueCore, item: Vec<u8>) {
        start_feeder();
        Self::entry(&mut self.lock(), core).items.push_back(item);
        self.changed.notify_all();
    }

    fn pending(&self, items: &str) -> usize {
        self.lock()
            .queues
            .get(items)
            .map(|p| p.items.len() + p.writing)
            .unwrap_or(0)
    }

    fn is_closed(&self, items: &str) -> bool {
        self.lock().queues.get(items).is_some_and(|p| p.closed)
    }

    fn close(&self, items: &str) {
        self.mark(items, |p| p.closed = true);
    }

    fn cancel(&self, items: &str) {
        self.mark(items, |p| p.cancelled = true);
    }

    fn mark(&self, items: &str, f: impl FnOnce(&mut Pending)) {
        let mut state = self.lock();
        if let Some(p) = state.queues.get_mut(items) {
            f(p);
        } else {
            // A queue this process never put on: remember the mark all the same.
            let Some(core) = core_from_items_key(items) else {
                return;
            };
            f(Self::entry(&mut state, &core));
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Waits until the items buffered for `items` (every queue when `None`) are written.
    fn flush(&self, items: &str, timeout: Option<Duration>) -> Result<()> {
        let deadline = deadline(timeout);
        let mut state = self.lock();
        loop {
            let Some(p) = state.queues.get(items) else {
                return Ok(());
            };
            if p.items.is_empty() && p.writing == 0 {
                return Ok(());
            }
            if let Some(deadline) = deadline
                && Instant::now() >= deadline
            {
                return Err(p
                    .error
                    .clone()
                    .unwrap_or(Error::Timeout(timeout.unwrap_or_default())));
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The exit hook: flush every queue whose join was not cancelled.
    fn flush_all(&self) {
        let keys: Vec<String> = self
            .lock()
            .queues
            .iter()
            .filter(|(_, p)| !p.cancelled && (!p.items.is_empty() || p.writing > 0))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Err(e) = self.flush(&key, Some(EXIT_FLUSH)) {
                tracing::error!("items put on {key} were not written before exit: {e}");
            }
        }
    }

    fn run(&self) {
        loop {
            let batch: Vec<(QueueCore, Vec<Vec<u8>>)> = {
                let mut state = self.lock();
                while !state.queues.values().any(|p| !p.items.is_empty()) {
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                state
                    .queues
                    .values_mut()
                    .filter(|p| !p.items.is_empty())
                    .map(|p| {
                        let n = p.items.len().min(FEED_BATCH);
                        p.writing += n;
                        (p.core.clone(), p.items.drain(..n).collect())
                    })
                    .collect()
            };
            let result = common::store().and_then(|store| {
                store.with_conn(
                    || "writing buffered queue items".into(),
                    |c| {
                        let mut pipe = redis::pipe();
                        for (core, items) in &batch {
                            let keys = core.keys();
                            pipe.rpush(&keys.items, items).ignore();
                            pipe.expire(&keys.items, ttl(&store) as i64).ignore();
                            pipe.expire(&keys.state, ttl(&store) as i64).ignore();
                        }
                        pipe.query::<()>(c)
                    },
                )
            });
            let mut state = self.lock();
            let failed = result.is_err();
            for (core, items) in batch {
                let p = Self::entry(&mut state, &core);
                p.writing -= items.len();
                match &result {
                    Ok(()) => p.error = None,
                    Err(e) => {
                        // Put them back in front, in order, and try again.
                        for item in items.into_iter().rev() {
                            p.items.push_front(item);
                        }
                        p.error = Some(e.clone());
                    }
                }
            }
            drop(state);
            self.changed.notify_all();
            if let (true, Err(e)) = (failed, &result) {
                tracing::warn!("queue feeder: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Rebuilds a queue's core from its items key (for a close before any put).
fn core_from_items_key(items: &str) -> Option<QueueCore> {
    let inner = items.strip_prefix("shoal:{")?.strip_suffix("}:items")?;
    let mut parts = inner.splitn(3, ':');
    let (namespace, kind, id) = (parts.next()?, parts.next()?, parts.next()?);
    Some(QueueCore {
        address: Address {
            namespace: namespace.to_string(),
            kind: kind.to_string(),
            id: id.to_string(),
        },
        maxsize: 0,
        joinable: false,
        cached_keys: Arc::default(),
    })
}

/// Starts the feeder thread and registers its exit flush (once per process).
fn start_feeder() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let feeder = FEEDER.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-queue-feeder".into())
            .spawn(move || feeder.run());
        if let Err(e) = spawned {
            tracing::error!("cannot start the queue feeder: {e}");
        }
        context::register_exit_hook(|| FEEDER.flush_all());
    });
}
