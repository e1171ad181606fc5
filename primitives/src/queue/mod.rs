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
//!   closed (Python's `ValueError: Queue is closed`); `empty` is [`Error::Closed`] once this
//!   process has put on it (Python: `OSError ... is closed`, it polls the closed pipe; a queue
//!   closed before any use answers it, as in Python), while `qsize` and `full` still answer
//!   (Python's read a count). The marks are this process's: other processes are not affected, and
//!   the exit hook that a pool worker runs after each task forgets them, so the next task finds the
//!   queue open.
//! * [`SimpleQueue`] has no feeder and no bound: `put` writes at once; `get`, `empty`, `close`;
//!   after `close`, `put`, `get` and `empty` are [`Error::Closed`] at once (Python closes both
//!   pipe ends: `OSError`).
//! * [`JoinableQueue`] adds [`JoinableQueue::task_done`] and [`JoinableQueue::join`]: `join`
//!   blocks until every item put has been marked done; one `task_done` too many is
//!   [`Error::InvalidState`]. Its `put` writes at once (the unfinished count must include the
//!   item before `put` returns).
//! * An item holding pipe [`Connection`](crate::pipe::Connection) ends registers a transfer of
//!   each when it is encoded (see `pipe`'s module docs). An item certainly not written gives
//!   them back before the put returns (the async puts: in the background), so those ends close
//!   as soon as their real holders let go: `Full` (`put_nowait`, a `put_timeout` that gave
//!   up), a closed queue, a queue whose keys are gone, an encoding that failed, and the items
//!   the feeder drops after a permanent failure (given back by the feeder thread; a batch whose
//!   earlier write may have been applied keeps them). A put whose outcome Redis could not tell
//!   keeps them, as do the items still buffered when the process exits after
//!   [`Queue::cancel_join_thread`] (they lapse a lease after the process).
//! * A queue whose keys were deleted or expired is [`Error::InvalidState`] (checked at least once
//!   a second while a call waits); an item that does not decode as `T` is [`Error::Codec`]
//!   naming the key and the type.
//!
//! # Feeder
//!
//! Each cycle, the feeder takes up to 10,000 items (8 MiB) of every queue that has some and
//! writes them in one pipelined round trip: one `feed.lua` call per queue, each a *batch*
//! numbered 1, 2, 3... per queue and process. The script appends a batch only if its number is
//! above the highest this process applied to that queue (kept in its writer hash,
//! `fed:<process>:<record>` under the queue's hash tag, with the queue's TTL), so a batch sent
//! again after an ambiguous failure (a response timeout or a dropped connection: Redis may have
//! applied it) is skipped, never duplicated. The feeder's record of a queue (its buffer, its
//! numbering, this process's `closed` mark) goes once the process has no handle of the queue
//! left and everything put was written (checked at most once a second, at a put or a mark of
//! any queue, and at the exit hook that ends a pool worker's task): a process that makes a
//! queue per request does not keep one record per queue. A handle of the queue that comes back
//! later makes a new record, numbered from 1 again under a new writer hash. A queue has at most
//! one batch in flight, and later items wait behind it, which keeps the order.
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
//! `items` (list of codec payloads), `state` (hash: `maxsize`), `fed:<process>:<record>` (the
//! last feeder batch applied from each record of each writing process, and its count of
//! items), `putters`/`putting`/`put:<waiter>` (writers waiting for room), `unfinished`
//! (counter), `joiners`/`joining`/`join:<waiter>`.
//!
//! # Round trips
//!
//! Unbounded `put`: none on the caller's thread; the feeder writes the batches of every queue in
//! one per cycle. Bounded or joinable `put`: 1 (`put.lua`); a writer that finds the queue full
//! waits on its wake key (one `BLPOP` slice, then a check-in and a room check, `room.lua`, per
//! second) and puts again when a get makes room, or when the room check finds room that no wake-up
//! brought (a writer woken for it died): that writer may then put before the one woken, which
//! queues again; one that gives up with a wake-up (room) in hand passes it on to the next writer (1
//! more), so no waiting writer misses room. `get` of an unbounded queue: items come in batches
//! claimed by this process and are returned one by one, none waited for while the batch lasts (see
//! *Batched gets* below). `get` of a bounded queue: 1 (the claim of one item; while the queue is
//! empty, one `BLMOVE` and claim per second of waiting), plus 1 to wake a waiting writer (if that
//! fails the item is returned all the same and the failure logged: an item taken is never dropped).
//! `get_nowait`: 1, or none while a batch lasts. The async gets claim one item at a time and wait
//! for its ack: 2 (fetch or wait, ack; 1 more on a bounded queue to wake a writer; none when this
//! process's blocking gets hold an item it can take; see *Async forms*). `qsize`/`empty`/`full`: 1.
//! `task_done`: 1. `join`: 1, then a `BLPOP` that returns at the last `task_done` (plus a check-in
//! and an existence check per second).
//!
//! # Batched gets
//!
//! A get of an unbounded queue (`Queue`, `SimpleQueue`, `JoinableQueue` without a bound) takes
//! up to a batch of items from the head of the queue into this process's *claim* and returns
//! them one by one, each after writing an acknowledgement that Redis applies before this
//! process's next fetch. Every item is returned by exactly one get or is still in the queue,
//! whatever process is killed while it holds a batch: what a process fetched and did not return
//! goes back to the head of the queue, in order, when it stops getting (within 0.3 s), closes
//! the queue, drops its last handle of it or exits, or, when it died, once its hold lapses
//! (0.2 s + `sync.lease_secs`).
//! Batches grow only while one consumer drains the queue; with several consumers, and on a
//! bounded queue, each get takes one item (claimed the same way). The items one process holds
//! are not seen by another meanwhile: the other receives them after the later items it took.
//! The details are in `claims/mod.rs`.
//!
//! # Async forms
//!
//! `put_async`, `put_timeout_async`, `put_nowait_async`, `get_async`, `get_timeout_async`,
//! `get_nowait_async`, `qsize_async`, `empty_async`, `full_async`, and
//! `JoinableQueue::join_async`/`task_done_async` run as a task on shoal's actor runtime (the
//! puts, `join` and the sizes the same round trips as their blocking forms, the same state
//! machines, `op.rs`; the gets claim one item at a time, `async_get.rs`), blocking
//! commands on dedicated connections of that runtime, and hand the result back through a
//! oneshot channel: any executor (Tokio's current-thread or multi-thread runtime, actix's) can
//! await them, and no thread is parked per call. Timeouts run from the first poll. An unbounded
//! `Queue`'s `put_async` only hands the item to the feeder, as `put` does (no round trip).
//! Nothing on the caller's thread waits for a lock another thread may hold across a round trip
//! or reads a socket: the sizes settle this process's acknowledgements on the actor runtime's
//! blocking pool when that needs either, and an async get takes a held item on the caller's
//! thread only when its acknowledgement is written without waiting. The one exception is
//! decoding a pipe handle in an item (`get_async`'s docs).
//!
//! Dropping the future (a `select!`, a `tokio::time::timeout`) does not lose an item:
//!
//! * `get_async`: its items are claimed as a blocking get's are, so a process killed while one
//!   waits loses nothing (the claim goes back to the queue when its hold lapses; see
//!   `async_get.rs` for the instant between the ack and the caller, and for an ack whose
//!   outcome Redis could not tell). A dropped future stops the task before its next wait slice
//!   (within a second) without taking anything; an item claimed for it goes back to the head
//!   of the queue before its ack, and one acked as the caller left is pushed back to the head
//!   (`LPUSH`, which also renews the items' TTL: the queue's keys may have expired meanwhile).
//!   Until then another reader may see the next item first; a bounded queue may briefly hold
//!   one item above `maxsize` (a writer woken by that get may have filled the place).
//! * `put_async` (bounded or joinable): a put still waiting for room leaves the writers' queue
//!   before its next slice and passes on a wake-up it had consumed; one woken (or finding room)
//!   after its caller left writes nothing and passes the wake-up on too; an item already
//!   written stays written (it is the queue's now, like a sent message).
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

mod async_get;
mod claims;
mod feeder;
mod ops;

use feeder::{FEEDER, Queued};
use ops::{Join, Measure, Put};

use crate::common::{self, Address, deadline, liveness, next_slice, process_holder, ttl};
use crate::event::{Recheck, WaitList, WakeWait, Woke};
use crate::op::{self, Operation, Request, Step};
use crate::pipe::Unsent;

static PUT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&claims::with_claims_ttl(include_str!("put.lua"))));
static ROOM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("room.lua")));
static TASK_DONE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("task_done.lua")));

/// The shared part of the three queues.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct QueueCore {
    address: Address,
    maxsize: u64,
    joinable: bool,
    /// The key names, computed once per handle (and shared by its clones).
    #[serde(skip)]
    cached_keys: Arc<std::sync::OnceLock<Arc<QueueKeys>>>,
    /// This process's consumer of the queue (`claims`), found once per handle, with its Redis
    /// URL.
    #[serde(skip)]
    cached_consumer: Arc<std::sync::OnceLock<(String, claims::SharedConsumer)>>,
    /// This process's handles of the queue as its feeder counts them (`feeder::Handles`),
    /// found once per handle.
    #[serde(skip)]
    cached_handles: Arc<std::sync::OnceLock<Arc<feeder::Handles>>>,
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
    /// The holds of batched gets (`claims`): holder → hold deadline.
    claims: String,
    /// The prefix of a holder's claim (`claim:`).
    claim_prefix: String,
    /// This process's claim.
    claim: String,
    /// Per holder: the first number of its latest fetch, and its highest ack written again
    /// after a failure (`claim_fences`).
    claim_fences: String,
}

impl QueueCore {
    fn create(maxsize: u64, joinable: bool) -> Result<QueueCore> {
        let (context, address) = Address::create("queue")?;
        let core = QueueCore {
            address,
            maxsize,
            joinable,
            cached_keys: Arc::default(),
            cached_consumer: Arc::default(),
            cached_handles: Arc::default(),
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

    /// A clone that does not keep this process's consumer of the queue, or its feeder record,
    /// alive (the feeder keeps one while it has the queue's record; both must go with the last
    /// handle).
    fn detached(&self) -> QueueCore {
        QueueCore {
            address: self.address.clone(),
            maxsize: self.maxsize,
            joinable: self.joinable,
            cached_keys: self.cached_keys.clone(),
            cached_consumer: Arc::default(),
            cached_handles: Arc::default(),
        }
    }

    /// This process's handles of the queue as the feeder counts them (see `feeder::Handles`).
    fn feeder_handles(&self) -> Arc<feeder::Handles> {
        self.cached_handles
            .get_or_init(|| feeder::Handles::of(&self.keys().items))
            .clone()
    }

    fn keys(&self) -> Arc<QueueKeys> {
        self.cached_keys
            .get_or_init(|| Arc::new(self.compute_keys()))
            .clone()
    }

    fn compute_keys(&self) -> QueueKeys {
        let keys = self.address.keys();
        let (items, state, unfinished) =
            (keys.key("items"), keys.key("state"), keys.key("unfinished"));
        QueueKeys {
            putters: WaitList {
                waiters: keys.key("putters"),
                waiting: keys.key("putting"),
                wake_prefix: keys.key("put:"),
                keep_alive: vec![state.clone(), items.clone()],
            },
            joiners: WaitList {
                waiters: keys.key("joiners"),
                waiting: keys.key("joining"),
                wake_prefix: keys.key("join:"),
                // The count of unfinished tasks too: a join waits on it.
                keep_alive: vec![state.clone(), items.clone(), unfinished.clone()],
            },
            items,
            state,
            unfinished,
            claims: keys.key("claims"),
            claim_prefix: keys.key("claim:"),
            claim: keys.key(&format!("claim:{}", process_holder())),
            claim_fences: keys.key("claim_fences"),
        }
    }

    /// The item encoded, and the transfers of the pipe ends in it (given back if the encoding
    /// fails, or when the item is dropped unwritten: see [`Unsent`]).
    fn encode<T: Serialize>(&self, store: &Store, item: &T) -> Result<(Vec<u8>, Unsent)> {
        Unsent::encode(store, item, &self.keys().items)
    }

    fn decode<T: DeserializeOwned>(&self, store: &Store, bytes: &[u8]) -> Result<T> {
        store.decode(bytes, &self.keys().items)
    }

    /// A put that writes now: waits for room until `deadline` (`None`: forever) when `wait`.
    /// The item's transfers (`unsent`) are given back before this returns when the item was
    /// certainly not written (see [`Put`]).
    fn put_now(
        &self,
        store: &Store,
        item: Vec<u8>,
        unsent: Unsent,
        wait: bool,
        deadline: Option<Instant>,
    ) -> Result<()> {
        op::run(store, &mut Put::new(self, item, unsent, wait, deadline))
    }

    /// The async form of [`QueueCore::put_now`]; `timeout` runs from the first poll.
    fn put_now_async(
        &self,
        item: Vec<u8>,
        unsent: Unsent,
        wait: bool,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<()>> + Send + use<> {
        let core = self.clone();
        async move {
            let put = Put::new(&core, item, unsent, wait, deadline(timeout));
            op::spawn(put, None).await
        }
    }

    /// Takes an item: once (`wait` false) or until `deadline`, claimed by this process until
    /// returned (`claims`: in batches on an unbounded queue, one by one on a bounded one). A
    /// bounded queue's get then wakes one writer waiting for room; if that fails the item is
    /// returned all the same and the failure logged (the writer waits for the next get).
    fn get(&self, store: &Arc<Store>, wait: bool, deadline: Option<Instant>) -> Result<Vec<u8>> {
        let item = claims::get(self, store, wait, deadline)?;
        if self.maxsize > 0 {
            let woken = op::run_single(
                store,
                || self.address.describe(),
                self.keys().putters.wake(store, 1),
                |reply| op::parse::<redis::Value>(reply, "a wake-up").map(|_| ()),
            );
            if let Err(e) = woken {
                tracing::warn!(
                    "waking a writer of {}: {e}; a writer waiting for room waits for the next get",
                    self.address.describe()
                );
            }
        }
        Ok(item)
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
            // An item this process holds comes first, as for a blocking get.
            if core.maxsize == 0 {
                let store = common::store()?;
                if let Some(item) = claims::take_held(&core, &store) {
                    return Ok(item);
                }
            }
            let get = async_get::Get::new(&core, common::store()?, wait, deadline(timeout));
            let undo: op::Undo<Vec<u8>> = Box::new(move |store, item| {
                Box::pin(async move {
                    let keys = core.keys();
                    // The TTL too: the push may have made the list again after it expired.
                    let mut pipe = redis::pipe();
                    pipe.cmd("LPUSH")
                        .arg(&keys.items)
                        .arg(item)
                        .ignore()
                        .expire(&keys.items, ttl(store.store()) as i64)
                        .ignore();
                    op::undo_request(
                        &store,
                        || core.address.describe(),
                        Request::pipe("giving an item back to", pipe),
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

    /// The items in Redis (in the list, or claimed by a get and not returned) plus those this
    /// process's feeder has not written. The feeder counts the items it was given (`queued`, read
    /// first) and `feed.lua` records how many of them Redis has (`applied`, read atomically with
    /// the length), so an item being written is counted once, in Redis or in the feeder, whenever
    /// the feeder's write lands. The replies of this process's acks are read first, so that the
    /// items its gets returned are not counted.
    fn qsize(&self, store: &Store) -> Result<usize> {
        let queued = FEEDER.queued(&self.keys().items);
        claims::settle(store)?;
        op::run_single(
            store,
            || self.address.describe(),
            self.qsize_request(queued.as_ref()),
            |reply| self.qsize_from(queued, reply),
        )
    }

    /// The async form of [`QueueCore::qsize`]: the feeder's count is read at the first poll;
    /// this process's acks are then settled (on the caller's thread only when that needs
    /// neither a wait nor I/O, else on the actor runtime's blocking pool: it may wait for the
    /// claims connection's lock, which another thread's fetch holds across a round trip, and
    /// read replies), and the size is read on the actor runtime.
    fn qsize_async(&self) -> impl Future<Output = Result<usize>> + Send + use<> {
        let core = self.clone();
        async move {
            let queued = FEEDER.queued(&core.keys().items);
            let store = common::store()?;
            let settled = claims::settle_at_once(&store);
            op::spawn(
                Measure::new(core, (!settled).then_some(store), queued),
                None,
            )
            .await
        }
    }

    /// Whether the queue exists, its length, the items claimed and what this process's feeder
    /// applied to it (from the record `queued` was read from), read atomically (`size.lua`:
    /// the feeder's script must not run between the reads).
    fn qsize_request(&self, queued: Option<&Queued>) -> Request {
        claims::size(&self.keys(), queued.map(|q| q.fed.as_str()))
    }

    /// Reads the reply to [`QueueCore::qsize_request`], `queued` the feeder's count read before.
    fn qsize_from(&self, queued: Option<Queued>, reply: Result<redis::Value>) -> Result<usize> {
        let (_, len, claimed, applied): (u64, u64, u64, Option<u64>) =
            op::parse(reply, "a queue size").map_err(|e| self.address.error(e))?;
        let unwritten = match (queued, applied) {
            (Some(queued), Some(applied)) => queued.total.saturating_sub(applied),
            // Nothing of this process's applied yet (or its record expired).
            (Some(queued), None) => queued.unwritten,
            (None, _) => 0,
        };
        Ok(usize::try_from(len + claimed + unwritten).unwrap_or(usize::MAX))
    }

    /// Whether `size` items fill a bounded queue.
    fn is_full(&self, size: usize) -> bool {
        size >= self.maxsize as usize
    }

    /// A queue this process closed is an error: [`Error::Closed`] when closing it closed its
    /// handles (a `SimpleQueue`'s, whose closed pipe raises `OSError` in Python), else the
    /// `ValueError` of a closed `Queue` ([`Error::InvalidState`]).
    fn check_open(&self, closes_handles: bool) -> Result<()> {
        if FEEDER.is_closed(self) {
            return Err(if closes_handles {
                self.closed_handle()
            } else {
                self.closed()
            });
        }
        Ok(())
    }

    /// Before a put: an unbounded `Queue`'s item (`buffered`) goes to the feeder (`None`),
    /// with its transfers; otherwise the queue counts as used and the item is returned, to be
    /// written now. An item refused here (the queue closed, an earlier put's failure reported)
    /// gives its transfers back.
    fn stage_put(
        &self,
        item: Vec<u8>,
        unsent: Unsent,
        buffered: bool,
    ) -> Result<Option<(Vec<u8>, Unsent)>> {
        if buffered && self.maxsize == 0 {
            FEEDER.push(self, item, unsent)?;
            return Ok(None);
        }
        FEEDER.begin_put(self)?;
        Ok(Some((item, unsent)))
    }

    /// A put of `item`: encoded, then handed to the feeder or written now (see
    /// [`QueueCore::stage_put`] and [`QueueCore::put_now`]).
    fn put<T: Serialize>(
        &self,
        item: &T,
        buffered: bool,
        wait: bool,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let store = common::store()?;
        let (bytes, unsent) = self.encode(&store, item)?;
        match self.stage_put(bytes, unsent, buffered)? {
            None => Ok(()),
            Some((bytes, unsent)) => self.put_now(&store, bytes, unsent, wait, deadline),
        }
    }

    /// The async form of [`QueueCore::put`]: the item is encoded now (on the caller's thread),
    /// the rest happens at the first poll; a future dropped before its put was under way gives
    /// the item's transfers back (in the background).
    fn put_async<T: Serialize>(
        &self,
        item: &T,
        closes_handles: bool,
        buffered: bool,
        wait: bool,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        let core = self.clone();
        let encoded = common::store()
            .and_then(|store| core.encode(&store, item))
            .map(|(bytes, unsent)| (bytes, unsent.in_background()));
        async move {
            core.check_open(closes_handles)?;
            let (bytes, unsent) = encoded?;
            match core.stage_put(bytes, unsent, buffered)? {
                None => Ok(()),
                Some((bytes, unsent)) => core.put_now_async(bytes, unsent, wait, timeout).await,
            }
        }
    }

    /// `task_done.lua`: `done` (task_done) or `join` (queue `waiter` unless nothing is
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

    /// What Python raises as `OSError` (the handle is closed): `empty` after `close()`.
    fn closed_handle(&self) -> Error {
        Error::Closed(format!(
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

        /// Takes an item if one is there ([`Error::Empty`] otherwise, and while another
        /// thread's get of this process waits on the queue, as Python's does).
        pub fn get_nowait(&self) -> Result<T> {
            self.get_until(false, None)
        }

        fn get_until(&self, wait: bool, deadline: Option<Instant>) -> Result<T> {
            self.core.check_open(Self::CLOSE_ENDS_EVERYTHING)?;
            let store = common::store()?;
            let bytes = self.core.get(&store, wait, deadline)?;
            self.core.decode(&store, &bytes)
        }

        /// The async form of [`Self::get`]: waits on shoal's actor runtime without blocking the
        /// caller's thread; any executor can await it. An item taken for a future that was
        /// dropped goes back to the head of the queue (see the module docs).
        ///
        /// What runs where: at the first poll, on the caller's thread, an item this process's
        /// blocking gets hold is taken when that needs no wait (no lock held by another
        /// thread, its acknowledgement written without waiting for a reply); the fetch, the
        /// wait and the acknowledgement (and any retry of it) run on the actor runtime. The
        /// item is decoded on the caller's thread once it arrived.
        ///
        /// Known round trip on the caller's thread: decoding an item that contains pipe
        /// [`Connection`](crate::pipe::Connection) handles claims each one's end for this
        /// process (`claim.lua`, 1 blocking round trip per handle). The claim is not put off
        /// to the handle's first use: until then the end is held by the sender's transfer
        /// only, which lapses when the sender exits, and the other end could read end of file
        /// while this process holds a handle.
        pub fn get_async(&self) -> impl Future<Output = Result<T>> + Send + use<T> {
            self.get_async_with(true, None)
        }

        /// The async form of [`Self::get_timeout`] (`timeout` runs from the first poll; what
        /// runs where, and the round trip of a pipe handle in the item: [`Self::get_async`]).
        pub fn get_timeout_async(
            &self,
            timeout: Duration,
        ) -> impl Future<Output = Result<T>> + Send + use<T> {
            self.get_async_with(true, Some(timeout))
        }

        /// The async form of [`Self::get_nowait`] (1 round trip on shoal's actor runtime; what
        /// runs where, and the round trip of a pipe handle in the item: [`Self::get_async`]).
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
                core.check_open(Self::CLOSE_ENDS_EVERYTHING)?;
                let store = common::store()?;
                let bytes = core.get_async(wait, timeout).await?;
                core.decode(&store, &bytes)
            }
        }

        /// The number of items: those in Redis and those this process's feeder has not
        /// written yet (exact when no other process uses the queue). It answers after
        /// `close()` too, as Python's does (it reads a count, not the closed pipe).
        pub fn qsize(&self) -> Result<usize> {
            let store = common::store()?;
            self.core.qsize(&store)
        }

        /// The async form of [`Self::qsize`] (1 round trip on shoal's actor runtime; this
        /// process's feeder count is read at the first poll). Before it, the replies of this
        /// process's acknowledgements of items taken are read (so that those items are not
        /// counted): on the caller's thread only when that takes neither a wait nor I/O,
        /// otherwise on the actor runtime's blocking pool (it may wait for a blocking get of
        /// another thread, and after a connection failure confirm the acknowledgements again).
        /// The caller's thread is never blocked.
        pub fn qsize_async(&self) -> impl Future<Output = Result<usize>> + Send + use<T> {
            let core = self.core.clone();
            async move { core.qsize_async().await }
        }

        /// Whether the queue is empty (see [`Self::qsize`]). [`Error::Closed`] once this
        /// process closed the queue after using it (Python's `OSError`: `empty` polls the
        /// closed pipe).
        pub fn empty(&self) -> Result<bool> {
            if FEEDER.closed_for_size(&self.core, Self::CLOSE_ENDS_EVERYTHING) {
                return Err(self.core.closed_handle());
            }
            Ok(self.qsize()? == 0)
        }

        /// The async form of [`Self::empty`] (see [`Self::qsize_async`]; the closed check is
        /// made at the first poll).
        pub fn empty_async(&self) -> impl Future<Output = Result<bool>> + Send + use<T> {
            let core = self.core.clone();
            async move {
                if FEEDER.closed_for_size(&core, Self::CLOSE_ENDS_EVERYTHING) {
                    return Err(core.closed_handle());
                }
                Ok(core.qsize_async().await? == 0)
            }
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
            // What this process's gets fetched and did not return goes back to the queue.
            if let Ok(store) = common::store() {
                claims::give_back(&self.core, &store);
            }
            Ok(())
        }

        /// After [`Self::close`], waits until every item this process put has reached Redis
        /// (at once after [`Self::cancel_join_thread`], as in Python).
        /// Errors: [`Error::InvalidState`] naming the queue when items could never be written
        /// (they are dropped), or the Redis error after 30 s of failing writes (the items stay
        /// buffered).
        pub fn join_thread(&self) -> Result<()> {
            if !FEEDER.is_closed(&self.core) {
                return Err(Error::invalid_state("join_thread() needs close() first"));
            }
            if FEEDER.is_join_cancelled(&self.core) {
                return Ok(());
            }
            FEEDER.join(&self.core.keys().items)
        }

        /// The async form of [`Self::join_thread`]: the same outcome, awaited without
        /// blocking the caller's thread (it looks at the feeder every 10 ms, on shoal's actor
        /// runtime; dropping the future stops that).
        pub fn join_thread_async(&self) -> impl Future<Output = Result<()>> + Send + use<T> {
            let core = self.core.clone();
            let items = core.keys().items.clone();
            async move {
                if !FEEDER.is_closed(&core) {
                    return Err(Error::invalid_state("join_thread() needs close() first"));
                }
                if FEEDER.is_join_cancelled(&core) {
                    return Ok(());
                }
                context::current()?
                    .spawn(move |_, caller| async move {
                        loop {
                            // Gone first: a failure taken for nobody would be lost to the
                            // next join.
                            if caller.is_gone() {
                                return;
                            }
                            if let Some(outcome) = FEEDER.try_join(&items) {
                                caller.finish(outcome);
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    })
                    .await
            }
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
            self.core.check_open(Self::CLOSE_ENDS_EVERYTHING)?;
            self.core.put(item, Self::BUFFERED, wait, deadline)
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
            self.core.put_async(
                item,
                Self::CLOSE_ENDS_EVERYTHING,
                Self::BUFFERED,
                wait,
                timeout,
            )
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
        self.core.check_open(Self::CLOSE_ENDS_EVERYTHING)?;
        self.core.put(item, Self::BUFFERED, wait, deadline)
    }

    fn put_async_with(
        &self,
        item: &T,
        wait: bool,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.core.put_async(
            item,
            Self::CLOSE_ENDS_EVERYTHING,
            Self::BUFFERED,
            wait,
            timeout,
        )
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
