//! Batched gets of unbounded queues: a get takes items from Redis a batch at a time, each item
//! *claimed* by this process until a get returns it, and returns them one by one.
//!
//! # Semantics
//!
//! An item is returned by exactly one `get`, or it is still in the queue, whatever process dies
//! (`SIGKILL`, a lost host) while it holds a batch.
//!
//! * A get that holds nothing runs `claim_fetch.lua` (1 round trip). The script first gives back
//!   whatever this process still claims (see below), then claims up to a batch from the head of
//!   the queue: the items move to this process's claim, a sorted set numbered in this process's
//!   sequence, held for the process's allowance (below) + `sync.lease_secs` on Redis's clock.
//! * A get returns the next held item after writing its *ack*, `ZREMRANGEBYSCORE <claim> -inf
//!   <number>`, on this process's claims connection. The ack's reply is not waited for: it is
//!   read before the next script on that connection, so every ack is applied before the next
//!   fetch (same connection, same order). An ack covers every number up to its own, and Redis
//!   applies it even at `maxmemory` (the command frees memory; Redis does not refuse it with
//!   `OOM`). When the connection fails, no connection is open, or a reply was an error (read
//!   before the next fetch), the acks not known to be applied are written again as
//!   `claim_ack.lua`, waited for, and recorded (`<holder>:acked`), before anything else is sent:
//!   a refused ack is never followed by a fetch that would give its item back. The item whose
//!   own ack could not be written is *in doubt*: only a get decides it (`claim_ack.lua`: it is
//!   this process's when an ack of it applied, now or before, and not when it was given back
//!   first), and a give-back meanwhile (`close()`, the keeper, exit) passes it to
//!   `claim_release.lua`, which puts it back at the head when its ack applied and it is not in
//!   the claim any more (once: the record of that ack is dropped with it). The keeper and the
//!   exit hooks write unconfirmed acks again, so none is left behind when the process stops
//!   getting.
//! * This process returns a held item only within its *allowance* of sending the fetch (its own
//!   monotonic clock, checked again right before the ack is written): [`HOLD`], or 4 fetch round
//!   trips when that is more (a slow Redis, large items), plus the wait of a `BLMOVE` sent
//!   before the fetch. After that, what it still holds is *given back*: pushed to the head of
//!   the queue in order, by its next get, its keeper thread (within half a [`HOLD`]), `close()`,
//!   the keeper again when the process's last handle of the queue is dropped (the consumer
//!   goes with it: the table of consumers keeps none alive; a drop makes no round trip; a
//!   handle of the queue made again in the process before the keeper ran takes that consumer
//!   up again), or its exit hooks. Redis lets any get give a claim back once its hold lapsed, the allowance
//!   plus `sync.lease_secs` after the fetch ran: an ack written while the holder could still
//!   return items had a lease to reach Redis. (This assumes Redis does not stall, and its clock
//!   does not jump, by more than a lease, as every lease in shoal does.) So a consumer that died
//!   holding items gives them back within the allowance plus `sync.lease_secs`; every waiting get
//!   checks once a second.
//! * Numbers are never used twice: a fetch reserves as many as it asks, and the holder's fence
//!   (`<holder>:fence`, the first number of its latest fetch) makes a fetch or a give-back that
//!   reaches Redis late (sent on a connection given up for lost) do nothing.
//! * A get that finds nothing waits in slices of a second: `BLMOVE` from the queue into this
//!   holder's landing list (`claim:<holder>:in`) with the fetch written behind it whole (`EVAL`,
//!   which cannot meet `NOSCRIPT`), and the holder's record for the wait before it
//!   (`claim_wait.lua`), one round trip: Redis runs the fetch right after the `BLMOVE` and it
//!   claims what was moved, so an item that arrives is never in flight unowned. A get whose last
//!   fetch found the queue empty waits at once (it would only find it empty again). The
//!   consumer's lock is held during the slice, since the fetch gives back what it claims.
//! * A `get_nowait` that finds the consumer's lock held by another get finds the queue empty,
//!   as Python's does on its reader lock; held by the keeper, `close()` or the exit hooks (a
//!   give-back), it waits for them.
//! * An async get takes a held item first when that needs no round trip and no wait (no other
//!   thread holds the consumer or the claims connection, the batch is fresh, the connection
//!   open and its ack written; otherwise the keeper or the next sync get deals with the batch,
//!   and the async get may receive a later item first; an ack whose write failed was not
//!   applied, so its item stays held, and the acks before it are confirmed by them), else
//!   claims one item under a holder of its own and waits for its ack (`async_get.rs`): exact
//!   in the same way.
//! * The batch: 1 item at first; twice the last one each time the last one was all returned
//!   within the allowance, up to [`MOST_ITEMS`] items and [`MOST_BYTES`] bytes (at least one item);
//!   back to 1 when a batch went stale; 1 whenever another process's hold on the queue is
//!   running, so that consumers share the items (batches are for one consumer draining a queue).
//! * `qsize` counts claimed items (they are not returned yet); it first reads the replies of this
//!   process's acks, so that they are counted out.
//! * Another process does not see the items this process holds: meanwhile its gets return later
//!   items (or `get_nowait` finds the queue empty while `qsize` counts them), and the held items
//!   it receives once given back come after those. That lasts until this process returns them
//!   or, when it stops getting, at most [`HOLD`] and a half; when it died, until its hold lapses
//!   (the allowance + `sync.lease_secs`). One consumer alone sees every item in the order put.
//!
//! A bounded queue's gets claim one item at a time (the same path, exact in the same way), and
//! each get then wakes a writer waiting for room (`QueueCore::get`). A writer counts the items
//! in the list only, so an item given back (a stale claim, a dead holder's) may briefly make
//! it `maxsize + 1`, and `qsize` counts claimed items with the list.
//!
//! At `maxmemory` (`noeviction`) the scripts still run (`allow-oom`): gets drain a full Redis,
//! though a get that must wait fails (`BLMOVE` is refused).
//!
//! # Keys (the queue's hash tag)
//!
//! `claims` (hash: holder → hold deadline, ms on Redis's clock), `claim:<holder>` (sorted set:
//! number → `"<number>:<payload>"`), `claim:<holder>:in` (list: what a waiting get's `BLMOVE`
//! moved), `claim_fences` (hash: `<holder>:fence`, `<holder>:acked`), `claim_refreshed` (a
//! marker: the claims' TTLs were refreshed less than a tenth of the TTL ago). A process's two
//! fields in `claim_fences` go when it will get no more: its consumer retired (the keeper's
//! give-back, which `claim_release.lua` runs with `forget`: one round trip on the keeper's thread,
//! or in the exit hooks, for a consumer that ever fetched), `close()` or the exit hooks giving
//! back what it held; a later fetch sets them again. A process killed (or exiting with a handle
//! of the queue still alive, holding nothing) leaves them until the queue expires, and so does
//! each of its async gets' holders (`async_get.rs`: as many as ran at once). Their TTL is the
//! queue's and a tenth more: every claim script gives it to what it writes, and puts and
//! fetches refresh every holder's at most once per tenth of the TTL (`claims_ttl.lua`), so
//! the claims outlive the items, whose TTL every put refreshes.
//!
//! # Round trips
//!
//! A get with an item held: none waited for (one write). A fetch: 1 (the replies of earlier acks
//! are read first; they arrived long before). A get that waits: 1 per slice (`BLMOVE` + fetch).
//! Redis commands per item for one consumer draining a long queue: the ack, plus a fetch per
//! batch of up to 1,024 items.

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// How long after sending a fetch this process may return the items it got, at least (the
/// allowance grows with the fetch round trip).
pub(super) const HOLD: Duration = Duration::from_millis(200);

/// The largest batch, in items.
pub(super) const MOST_ITEMS: usize = 1024;

/// The largest batch, in bytes (a first item larger than this comes alone).
pub(super) const MOST_BYTES: usize = 8 << 20;

/// The claims scripts run when Redis is out of memory (`maxmemory` with `noeviction`): they move
/// items out of the queue, so a consumer can drain a full Redis. Their own writes are a few
/// small fields.
const ALLOW_OOM: &str = "#!lua flags=allow-oom";

/// `body` with `refresh_claims` (`claims_ttl.lua`) defined before it: the queue scripts that
/// refresh TTLs keep the claims alive too.
pub(super) fn with_claims_ttl(body: &str) -> String {
    format!("{}\n{body}", include_str!("claims_ttl.lua"))
}

fn script(body: &str) -> redis::Script {
    redis::Script::new(&script_source(body))
}

fn script_source(body: &str) -> String {
    format!(
        "{ALLOW_OOM}\n{}",
        with_claims_ttl(&format!("{}\n{body}", include_str!("claims_prelude.lua")))
    )
}

mod link;

use link::*;

static FETCH: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("claim_fetch.lua")));
static RELEASE: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("claim_release.lua")));
static SIZE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("../size.lua")));
static ACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!("{ALLOW_OOM}\n{}", include_str!("claim_ack.lua")))
});

/// The fetch's source, sent whole (`EVAL`) behind a waiting get's `BLMOVE`: it cannot meet
/// `NOSCRIPT` there, so what the `BLMOVE` moved is always claimed in the same round trip.
static FETCH_SOURCE: LazyLock<String> =
    LazyLock::new(|| script_source(include_str!("claim_fetch.lua")));

/// The longest a holder may take to return a batch: its allowance grows with the fetch round
/// trip (4 of them) up to this.
const MOST_ALLOWANCE: Duration = Duration::from_secs(10);

/// One consumer: this process's gets of one queue on one Redis.
pub(super) struct Consumer {
    keys: Arc<QueueKeys>,
    store: Arc<Store>,
    /// The items fetched and not returned, with their numbers.
    held: VecDeque<(u64, Vec<u8>)>,
    /// The end of this consumer's last reservation: a fetch reserves as many numbers as it asks
    /// items from the process's [`SEQUENCE`], and no number is used twice (a fetch that arrives
    /// late finds its numbers fenced off).
    next: u64,
    /// Until when the items held may be returned; `None`: nothing fetched.
    usable_until: Option<Instant>,
    /// How long after its sending a batch may be returned: [`HOLD`], or 4 fetch round trips when
    /// more, up to [`MOST_ALLOWANCE`].
    allowance: Duration,
    /// The size of the next fetch.
    batch: usize,
    /// Whether the last fetch filled its batch.
    filled: bool,
    /// Whether the last fetch found the queue empty (a waiting get then waits at once).
    found_empty: bool,
    /// The ack of the first held item was written again after a failure and its outcome is
    /// not known: it is asked (`claim_ack.lua`) before anything else is done with the batch.
    in_doubt: bool,
    /// A bounded queue: one item per fetch (each get makes room for one writer).
    bounded: bool,
    /// The claim in Redis may hold items this process does not know of: a fetch or a give-back
    /// failed (its reply lost, or not sent) since the last one that answered. `close()` gives
    /// back only then, or when items are held: otherwise it makes no round trip (Python's
    /// `close()` never waits for the network).
    unsure: bool,
    /// A fetch was sent since this holder's fields in the fences hash (`<holder>:fence`,
    /// `<holder>:acked`) were last forgotten: they may be there. A consumer retired with it
    /// set is handed to the keeper, whose give-back forgets them.
    fenced: bool,
    /// Its last handle is gone: the keeper gives back what it holds (its drop does nothing).
    retired: bool,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("items", &self.keys.items)
            .field("held", &self.held.len())
            .finish()
    }
}

/// A consumer behind its lock, with a mark of whether a get holds that lock.
#[derive(Debug)]
pub(super) struct ConsumerCell {
    state: Mutex<Consumer>,
    /// A get holds `state` (set once it has the lock, cleared before it lets go): a
    /// `get_nowait` that finds the lock taken by a get gives up, as Python's does on its reader
    /// lock, but waits for the keeper, `close()` or the exit hooks, which hold it only to give
    /// back a batch (an internal thread must not make the queue look empty).
    getting: AtomicBool,
}

impl ConsumerCell {
    fn try_lock(&self) -> std::sync::TryLockResult<MutexGuard<'_, Consumer>> {
        self.state.try_lock()
    }
}

type Shared<T> = Arc<T>;

/// A consumer, as its queue handles keep it.
pub(super) type SharedConsumer = Shared<ConsumerCell>;

/// A consumer locked by a get: the cell's `getting` mark is set while it is held.
struct GetGuard<'a> {
    cell: &'a ConsumerCell,
    consumer: MutexGuard<'a, Consumer>,
}

impl<'a> GetGuard<'a> {
    fn new(cell: &'a ConsumerCell, consumer: MutexGuard<'a, Consumer>) -> Self {
        cell.getting.store(true, Ordering::Release);
        Self { cell, consumer }
    }
}

impl std::ops::Deref for GetGuard<'_> {
    type Target = Consumer;
    fn deref(&self) -> &Consumer {
        &self.consumer
    }
}

impl std::ops::DerefMut for GetGuard<'_> {
    fn deref_mut(&mut self) -> &mut Consumer {
        &mut self.consumer
    }
}

impl Drop for GetGuard<'_> {
    /// Cleared before the lock is let go (the fields drop after this).
    fn drop(&mut self) {
        self.cell.getting.store(false, Ordering::Release);
    }
}

/// Locks `cell` for a get: waiting until `deadline` at most (`None`: as long as it takes), or,
/// for a get that does not wait (`wait` false), for as long as no other get holds it. `None`
/// when the get gives up.
fn lock_for_get(
    cell: &ConsumerCell,
    wait: bool,
    deadline: Option<Instant>,
) -> Option<GetGuard<'_>> {
    if wait {
        return lock_until(&cell.state, deadline).map(|guard| GetGuard::new(cell, guard));
    }
    loop {
        match cell.state.try_lock() {
            Ok(guard) => return Some(GetGuard::new(cell, guard)),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                return Some(GetGuard::new(cell, p.into_inner()));
            }
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if cell.getting.load(Ordering::Acquire) {
            return None;
        }
        // The keeper, `close()` or an exit hook: a give-back, one round trip at most.
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A consumer's Redis URL and items key.
type ConsumerId = (String, String);

/// The numbers this process's consumers give the items they fetch, whatever the queue: one
/// sequence that only grows, so that a consumer made again for a queue never reuses a number
/// (its holder's fence there is above every number it used).
static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// This process's consumers, as long as a queue handle keeps them: a consumer whose handles are
/// all gone gives back what it holds (its `Drop`) and leaves the table.
static CONSUMERS: LazyLock<Mutex<HashMap<ConsumerId, Weak<ConsumerCell>>>> =
    LazyLock::new(Mutex::default);

/// The consumers alive now (taken out of the table's lock: dropping the last handle of one
/// gives its items back, which takes the links' lock).
fn live_consumers() -> Vec<SharedConsumer> {
    lock(&CONSUMERS)
        .values()
        .filter_map(Weak::upgrade)
        .collect()
}

/// Claims connections by Redis URL.
static LINKS: LazyLock<Mutex<HashMap<String, Link>>> = LazyLock::new(Mutex::default);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks `mutex`, waiting until `deadline` at most (`None`: as long as it takes); `None` when
/// the deadline passed first. Another thread of this process holds a consumer's lock for a
/// slice at most while it waits for items; this polls every millisecond meanwhile.
fn lock_until<T>(mutex: &Mutex<T>, deadline: Option<Instant>) -> Option<MutexGuard<'_, T>> {
    let Some(deadline) = deadline else {
        return Some(lock(mutex));
    };
    loop {
        match mutex.try_lock() {
            Ok(guard) => return Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `f` on the claims connection of `store`'s Redis.
fn with_link<T>(store: &Arc<Store>, f: impl FnOnce(&mut Link) -> Result<T>) -> Result<T> {
    let mut links = lock(&LINKS);
    let link = links.entry(store.url().to_string()).or_default();
    if link.store.is_none() {
        link.store = Some(store.clone());
    }
    f(link)
}

/// The consumer of `core` in this process (kept by the handle for its next gets).
fn consumer(core: &QueueCore, store: &Arc<Store>) -> SharedConsumer {
    if let Some((url, consumer)) = core.cached_consumer.get()
        && url == store.url()
    {
        return consumer.clone();
    }
    let consumer = register(core, store);
    let _ = core
        .cached_consumer
        .set((store.url().to_string(), consumer.clone()));
    consumer
}

/// Finds or makes the consumer of `core` in this process's table.
fn register(core: &QueueCore, store: &Arc<Store>) -> SharedConsumer {
    register_exit_hook();
    let keys = core.keys();
    let id = (store.url().to_string(), keys.items.clone());
    if let Some(consumer) = lock(&CONSUMERS).get(&id).and_then(Weak::upgrade) {
        return consumer;
    }
    // A consumer of this queue whose last handle went and that still holds items (or an item
    // in doubt) is taken up again rather than left to the keeper: a new consumer's fetch would
    // fence off its give-back, and an item in doubt whose ack applied would then be returned
    // by no get and never go back. The keeper is not giving it back meanwhile (`RETIRING`).
    let _retiring = lock(&RETIRING);
    let mut consumers = lock(&CONSUMERS);
    if let Some(consumer) = consumers.get(&id).and_then(Weak::upgrade) {
        return consumer;
    }
    // The consumers of queues this process no longer has a handle of leave the table.
    consumers.retain(|_, consumer| consumer.strong_count() > 0);
    let adopted = {
        let mut retired = lock(&RETIRED);
        retired
            .iter()
            .position(|c| c.store.url() == store.url() && c.keys.items == keys.items)
            .map(|i| retired.swap_remove(i))
    };
    let state = match adopted {
        Some(mut consumer) => {
            consumer.retired = false;
            consumer
        }
        None => Consumer {
            keys,
            store: store.clone(),
            held: VecDeque::new(),
            next: 0,
            usable_until: None,
            allowance: HOLD,
            batch: 1,
            filled: false,
            found_empty: false,
            in_doubt: false,
            bounded: core.maxsize > 0,
            unsure: false,
            fenced: false,
            retired: false,
        },
    };
    let consumer = Arc::new(ConsumerCell {
        state: Mutex::new(state),
        getting: AtomicBool::new(false),
    });
    consumers.insert(id, Arc::downgrade(&consumer));
    consumer
}

/// Registers, once, the exit hook that gives back what this process holds, confirms its acks
/// and settles the async gets' doubts.
pub(super) fn register_exit_hook() {
    static HOOKS: Once = Once::new();
    HOOKS.call_once(|| context::register_exit_hook(give_back_all));
}

/// A get of an unbounded queue: a held item, else a fetch, else (when `wait`) a wait of one
/// slice for an item pushed meanwhile, then again, until `deadline`.
pub(super) fn get(
    core: &QueueCore,
    store: &Arc<Store>,
    wait: bool,
    deadline: Option<Instant>,
) -> Result<Vec<u8>> {
    let consumer = consumer(core, store);
    let mut blocking = false;
    let mut retried = false;
    loop {
        // The consumer's lock is held while waiting (a slice at most): the fetch behind the
        // BLMOVE gives back what the consumer claims, which must not be held by another
        // thread's get meanwhile. `close()`, the keeper and the exit hooks only try it, and a
        // get with a deadline waits for it until then (Python's reader lock, taken with the
        // get's timeout).
        let Some(mut consumer) = lock_for_get(&consumer, wait, deadline) else {
            return Err(Error::Empty);
        };
        if let Some(item) = consumer.take().map_err(|e| core.address.error(e))? {
            return Ok(item);
        }
        let slice = if wait { next_slice(deadline) } else { None };
        let fetched = match (blocking, slice) {
            (true, Some(slice)) => consumer.fetch_blocking(slice),
            (true, None) => return Err(Error::Empty),
            // The last fetch found the queue empty: wait at once (one round trip, not two).
            (false, Some(slice)) if consumer.found_empty => consumer.fetch_blocking(slice),
            (false, slice) => consumer.fetch(slice),
        };
        match fetched {
            // A wait a stop signal interrupted (see `Error::is_interrupted`): what its `BLMOVE`
            // may have moved is this holder's, and the next fetch claims it. Wait again.
            Err(e) if e.is_interrupted() => {
                blocking = true;
                continue;
            }
            fetched => fetched.map_err(|e| core.address.error(e))?,
        }
        let fetched_some = !consumer.held.is_empty();
        if let Some(item) = consumer.take().map_err(|e| core.address.error(e))? {
            return Ok(item);
        }
        if fetched_some && !retried {
            // The batch was stale on arrival (a round trip longer than the allowance): once
            // more, with the allowance grown to fit.
            retried = true;
            continue;
        }
        if slice.is_none() {
            return Err(Error::Empty);
        }
        blocking = true;
    }
}

/// A held item of `core`, if this process has one it may still return without waiting for a
/// lock or a reply (the async gets take it before waiting, on their executor's thread, so that
/// one process's gets keep the queue's order).
pub(super) fn take_held(core: &QueueCore, store: &Arc<Store>) -> Option<Vec<u8>> {
    let consumer = consumer(core, store);
    // Another thread holds the lock (a blocking get, the keeper): the async get does not wait
    // for it.
    let mut consumer = match consumer.try_lock() {
        Ok(consumer) => consumer,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return None,
    };
    consumer.take_quick()
}

/// Gives back what this process holds of `core` (its `close()`). A failure is logged: the items
/// come back when the hold lapses. No round trip when the consumer holds nothing and Redis
/// claims nothing it does not know of (no fetch or give-back failed since the last answer).
pub(super) fn give_back(core: &QueueCore, store: &Store) {
    let consumer = lock(&CONSUMERS)
        .get(&(store.url().to_string(), core.keys().items.clone()))
        .and_then(Weak::upgrade);
    // A blocking get of another thread holds the lock: it holds no item then, and what its
    // BLMOVE takes is claimed by its own fetch.
    if let Some(Ok(mut consumer)) = consumer.as_ref().map(|c| c.try_lock())
        && (!consumer.held.is_empty() || consumer.in_doubt || consumer.unsure)
    {
        // This process uses the queue no more: its fences go with the give-back.
        consumer.give_back_and_forget();
    }
}

/// Reads the replies of this process's acks, so that Redis has applied them before a read on
/// another connection (`qsize`). It waits for the links' lock, which a fetch of another
/// thread holds across its round trip, reads from a socket, and after a failure confirms the
/// acks on a new connection: never on an executor's thread (see [`settle_request`]).
pub(super) fn settle(store: &Store) -> Result<()> {
    let mut links = lock(&LINKS);
    match links.get_mut(store.url()) {
        Some(link) => link.settle(store),
        None => Ok(()),
    }
}

/// [`settle`] if that needs neither a wait nor I/O (no reply pending, no failure, the links'
/// lock free): for the async `qsize`, on its executor's thread. Whether it was done.
pub(super) fn settle_at_once(store: &Store) -> bool {
    let mut links = match LINKS.try_lock() {
        Ok(links) => links,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return false,
    };
    match links.get_mut(store.url()) {
        None => true,
        // No reply to read and nothing to confirm: `settle` only forgets the acks confirmed.
        Some(link) if !link.needs_settling() => link.settle(store).is_ok(),
        Some(_) => false,
    }
}

/// [`settle`] as a request of an async operation: run on the actor runtime's blocking pool
/// (`Request::local`), so that its waits never block the caller's executor.
pub(super) fn settle_request(store: Arc<Store>) -> Request {
    Request::local(
        "settling this process's acknowledgements before measuring",
        move || settle(&store).map(|()| redis::Value::Nil),
    )
}

/// The keeper: a thread that gives back the held items that went stale, within half a [`HOLD`]
/// of it. It sleeps (parked) while no consumer holds anything; a fetch that got items wakes it.
pub(super) fn wake_keeper() {
    static KEEPER: LazyLock<Option<std::thread::Thread>> = LazyLock::new(|| {
        let spawned = std::thread::Builder::new()
            .name("shoal-queue-keeper".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(HOLD / 2);
                    if !give_back_stale() {
                        std::thread::park();
                    }
                }
            });
        match spawned {
            Ok(handle) => Some(handle.thread().clone()),
            Err(e) => {
                tracing::warn!(
                    "cannot start the queue keeper thread: {e}; items a process stops getting \
                     come back when its hold lapses"
                );
                None
            }
        }
    });
    if let Some(keeper) = KEEPER.as_ref() {
        keeper.unpark();
    }
}

/// Gives back the held items that went stale, and writes again the acks whose connection
/// failed (so that a process that returned its last items and then stops getting leaves none
/// unapplied); whether there is still something to watch.
fn give_back_stale() -> bool {
    let consumers = live_consumers();
    let mut watching = false;
    for consumer in consumers {
        let Ok(mut consumer) = consumer.try_lock() else {
            // Busy getting: look again next round.
            watching = true;
            continue;
        };
        if consumer.needs_keeper() {
            consumer.give_back();
        }
        if !consumer.held.is_empty() {
            watching = true;
        }
    }
    watching | give_back_retired() | settle_links() | super::async_get::settle_doubts()
}

/// Settles every claims connection that has acks to confirm; whether one still has.
fn settle_links() -> bool {
    let stores: Vec<Arc<Store>> = lock(&LINKS)
        .values()
        .filter(|link| link.needs_settling())
        .filter_map(|link| link.store.clone())
        .collect();
    let mut unsettled = false;
    for store in stores {
        if let Err(e) = settle(&store) {
            tracing::warn!("confirming the acks of items taken from queues: {e}");
            unsettled = true;
        }
    }
    unsettled
}

/// At exit: everything held goes back to the queue (a consumer whose lock a waiting get holds
/// holds nothing; what its BLMOVE may take is reaped when its hold lapses), and every ack is
/// confirmed.
fn give_back_all() {
    // A thread child (a pool worker thread of its driver, which runs the hooks after each batch
    // of tasks): the consumers are the whole process's, which goes on using what they hold.
    if context::in_thread_process() {
        return;
    }
    let consumers = live_consumers();
    for consumer in consumers {
        let Ok(mut consumer) = consumer.try_lock() else {
            continue;
        };
        if !consumer.held.is_empty() {
            // Its fences go with the give-back (a later fetch sets them again).
            consumer.give_back_and_forget();
        }
    }
    give_back_retired();
    settle_links();
    super::async_get::settle_doubts();
}

/// The TTL the claim scripts give what they write (and the items and state they touch): the
/// queue's and a tenth more, so that the claims outlive the items, whose TTL every put
/// refreshes while the refresh of every holder's claim is throttled (`claims_ttl.lua`).
fn claims_ttl(store: &Store) -> u64 {
    let ttl = ttl(store);
    ttl + ttl / 10 + 1
}

/// The claims script `script` on `keys`, for this process's holder, with the TTL given.
fn claims_invocation(
    script: &'static redis::Script,
    keys: &QueueKeys,
    store: &Store,
) -> redis::ScriptInvocation<'static> {
    holder_invocation(script, keys, store, process_holder(), &keys.claim)
}

/// The claims script `script` on `keys`, for `holder`, whose claim is `claim`.
fn holder_invocation(
    script: &'static redis::Script,
    keys: &QueueKeys,
    store: &Store,
    holder: &str,
    claim: &str,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = script.prepare_invoke();
    invocation
        .key(&keys.items)
        .key(&keys.state)
        .key(&keys.claims)
        .key(claim)
        .key(&keys.claim_fences)
        .arg(claims_ttl(store))
        .arg(&keys.claim_prefix)
        .arg(holder);
    invocation
}

/// `claim_release.lua` for `holder` (another than this process's: an async get's), whose
/// claim is `claim` and whose next unreserved number is `next`; `doubt`: its item whose ack's
/// outcome is not known (number, payload).
pub(super) fn release_invocation(
    keys: &QueueKeys,
    store: &Store,
    holder: &str,
    claim: &str,
    next: u64,
    doubt: Option<(u64, &[u8])>,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = holder_invocation(&RELEASE, keys, store, holder, claim);
    invocation.arg(next);
    match doubt {
        Some((number, item)) => invocation.arg("doubt").arg(number).arg(item),
        None => invocation.arg("").arg(0).arg(""),
    };
    invocation
}

/// `claim_ack.lua` for `holder` (an async get's), whose claim is `claim`: takes item `number`
/// out of it, records the ack, and drops the holder's record in the claims hash.
pub(super) fn ack_invocation(
    keys: &QueueKeys,
    store: &Store,
    holder: &str,
    claim: &str,
    number: u64,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = ACK.prepare_invoke();
    invocation
        .key(claim)
        .key(&keys.claim_fences)
        .key(&keys.claims)
        .arg(holder)
        .arg(number)
        .arg(claims_ttl(store));
    invocation
}

/// `claim_fetch.lua` for `holder`, whose claim is `claim` (a script invocation: `EVALSHA`,
/// loaded again after `NOSCRIPT`; for a fetch nothing is written behind).
pub(super) fn fetch_invocation(
    keys: &QueueKeys,
    store: &Store,
    holder: &str,
    claim: &str,
    args: &FetchArgs,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = holder_invocation(&FETCH, keys, store, holder, claim);
    invocation
        .arg(args.first)
        .arg(args.most)
        .arg(args.hold_ms)
        .arg(MOST_BYTES)
        .arg(args.wait_ms);
    invocation
}

/// `claim_fetch.lua` sent whole (`EVAL`: it cannot meet `NOSCRIPT`) for `holder`, whose claim
/// is `claim`.
pub(super) fn fetch_eval(
    keys: &QueueKeys,
    store: &Store,
    holder: &str,
    claim: &str,
    args: &FetchArgs,
) -> redis::Cmd {
    let mut eval = redis::cmd("EVAL");
    eval.arg(FETCH_SOURCE.as_str())
        .arg(5)
        .arg(&keys.items)
        .arg(&keys.state)
        .arg(&keys.claims)
        .arg(claim)
        .arg(&keys.claim_fences)
        .arg(claims_ttl(store))
        .arg(&keys.claim_prefix)
        .arg(holder)
        .arg(args.first)
        .arg(args.most)
        .arg(args.hold_ms)
        .arg(MOST_BYTES)
        .arg(args.wait_ms);
    eval
}

/// A waiting get's slice for `holder` (claim `claim`): its record for the wait
/// (`claim_wait.lua`), a `BLMOVE` of at most `block` from the queue into its landing list, and
/// `fetch` behind it, as one pipeline whose one reply is the fetch's.
pub(super) fn wait_pipe(
    keys: &QueueKeys,
    store: &Store,
    holder: &str,
    claim: &str,
    hold_ms: u64,
    block: Duration,
    fetch: redis::Cmd,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL")
        .arg(include_str!("claim_wait.lua"))
        .arg(1)
        .arg(&keys.claims)
        .arg(holder)
        .arg(hold_ms)
        .arg(claims_ttl(store))
        .ignore()
        .cmd("BLMOVE")
        .arg(&keys.items)
        .arg(format!("{claim}:in"))
        .arg("LEFT")
        .arg("RIGHT")
        .arg(common::blpop_seconds(block))
        .ignore()
        .add_command(fetch);
    pipe
}

impl Consumer {
    /// Whether the items held may no longer be returned.
    fn stale(&self) -> bool {
        self.usable_until
            .is_none_or(|until| Instant::now() >= until)
    }

    /// The next held item, after its ack was written; `None` when nothing may be returned (what
    /// is held then went stale and was given back).
    fn take(&mut self) -> Result<Option<Vec<u8>>> {
        let Some(&(number, _)) = self.held.front() else {
            return Ok(None);
        };
        if self.in_doubt {
            let ours = with_link(&self.store, |link| {
                link.resolve(&self.store, &self.keys, number)
            })?;
            self.in_doubt = false;
            if !ours {
                // Given back to the queue (with the rest of the batch) before any ack of it
                // applied: not ours.
                self.held.clear();
                self.usable_until = None;
                return Ok(None);
            }
            // Its ack applied: it is this process's, however late.
            return Ok(self.held.pop_front().map(|(_, item)| item));
        }
        if self.stale() {
            self.give_back();
            return Ok(None);
        }
        let usable_until = self.usable_until;
        let acked = with_link(&self.store, |link| {
            // Checked again here: the link's lock may have been waited for.
            if usable_until.is_none_or(|until| Instant::now() >= until) {
                return Ok(Ack::TooLate);
            }
            link.ack(&self.store, &self.keys, number)
        });
        match acked {
            Ok(Ack::Written) | Ok(Ack::Applied) => Ok(self.held.pop_front().map(|(_, item)| item)),
            Ok(Ack::NotOurs) => {
                // Only a reaper takes items out of a claim other than by acks: the whole batch
                // was given back.
                self.held.clear();
                self.usable_until = None;
                Ok(None)
            }
            Ok(Ack::TooLate) => {
                self.give_back();
                Ok(None)
            }
            Err(e) => {
                // The ack may have been applied: ask before anything else.
                self.in_doubt = true;
                Err(e)
            }
        }
    }

    /// The next held item if that needs no round trip (for an async get, on its executor's
    /// thread): one whose ack is written without waiting on an open connection. `None`
    /// otherwise (the batch went stale, an ack is in doubt, the connection failed, or another
    /// thread holds the links' lock): the keeper or the next sync get deals with those. Nothing
    /// here waits: not for a lock, not for Redis (a failed write is not followed by the
    /// confirmation `Link::ack` would wait for; the item stays held, its ack not applied).
    fn take_quick(&mut self) -> Option<Vec<u8>> {
        let &(number, _) = self.held.front()?;
        if self.in_doubt || self.stale() {
            return None;
        }
        let usable_until = self.usable_until;
        // The links' lock may be held across a round trip (a fetch of another thread): an
        // async get does not wait for it.
        let mut links = match LINKS.try_lock() {
            Ok(links) => links,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let link = links.get_mut(self.store.url())?;
        // Checked under the lock, right before the write, as `take` does.
        let written = usable_until.is_some_and(|until| Instant::now() < until)
            && link.write_ack(&self.keys, number);
        drop(links);
        if !written {
            // The batch went stale meanwhile, or the connection failed (acks written before
            // may need confirming): the keeper sees to both.
            wake_keeper();
            return None;
        }
        self.held.pop_front().map(|(_, item)| item)
    }

    /// Claims the next batch (giving back what was held first). `wait`: the caller waits that
    /// long for items if none come (the holder's record stays for it).
    fn fetch(&mut self, wait: Option<Duration>) -> Result<()> {
        if self.in_doubt {
            // `take` settles the first item before anything else.
            return Ok(());
        }
        let args = self.next_batch(wait, Duration::ZERO);
        let invocation = self.fetch_invocation(&args);
        let (reply, sent_at) = with_link(&self.store, |link| {
            link.settle(&self.store)?;
            let sent_at = Instant::now();
            let reply = link.invoke(&self.store, "claiming items of", &invocation)?;
            Ok((reply, sent_at))
        })
        .inspect_err(|_| self.unsure = true)?;
        self.fetched(sent_at, &args, reply)?;
        // The allowance follows the round trip (a slow or distant Redis, large items), from the
        // next fetch on: this one's hold was sent with the old one.
        self.allowance = (sent_at.elapsed() * 4).clamp(HOLD, MOST_ALLOWANCE);
        Ok(())
    }

    /// Waits at most `block` for an item (`BLMOVE` into this holder's landing list), and claims
    /// the next batch in the same round trip (the fetch sent whole, `EVAL`, so that it runs
    /// whatever scripts Redis lost). An item the `BLMOVE` moved stays this holder's until a
    /// fetch claims it or, if this process dies first, a reaper gives it back.
    fn fetch_blocking(&mut self, block: Duration) -> Result<()> {
        if self.in_doubt {
            return Ok(());
        }
        // The fetch gives back what this holder claims: its acks must be applied first.
        with_link(&self.store, |link| link.settle(&self.store))?;
        let args = self.next_batch(Some(block), block);
        let eval = fetch_eval(
            &self.keys,
            &self.store,
            process_holder(),
            &self.keys.claim,
            &args,
        );
        let pipe = wait_pipe(
            &self.keys,
            &self.store,
            process_holder(),
            &self.keys.claim,
            args.hold_ms,
            block,
            eval,
        );
        let sent_at = Instant::now();
        let reply = self
            .store
            .with_blocking_conn(
                Some(block),
                || "waiting for items of a queue".to_string(),
                |conn| {
                    let (fetched,): (redis::Value,) = pipe.query(conn)?;
                    Ok(fetched)
                },
            )
            .inspect_err(|_| self.unsure = true)?;
        self.fetched(sent_at, &args, reply)
    }

    /// The next batch's arguments (1 item after a stale batch or a give-back, twice the last
    /// one after a full batch all returned in time), its numbers reserved. `extra`: how much
    /// later than its sending the fetch may run (a `BLMOVE`'s wait first).
    fn next_batch(&mut self, wait: Option<Duration>, extra: Duration) -> FetchArgs {
        self.batch =
            if self.bounded || self.usable_until.is_none() || !self.held.is_empty() || self.stale()
            {
                1
            } else if self.filled {
                (self.batch * 2).min(MOST_ITEMS)
            } else {
                self.batch
            };
        self.held.clear();
        self.usable_until = None;
        // The fetch sets this holder's fence (and its acks may record `<holder>:acked`).
        self.fenced = true;
        // From the process's one sequence: a consumer made again for a queue (its last handle
        // was dropped) goes on above every number this holder used there.
        let first = SEQUENCE.fetch_add(self.batch as u64, Ordering::Relaxed);
        self.next = first + self.batch as u64;
        // Redis holds the batch a lease longer than this process may return it.
        let allowance = extra + self.allowance;
        let hold = allowance + crate::grants::lease();
        FetchArgs {
            first,
            most: self.batch,
            allowance,
            hold_ms: hold.as_millis() as u64,
            wait_ms: wait.map_or(0, |w| (w.as_millis() as u64).max(1)),
        }
    }

    /// `claim_fetch.lua` with `args`, as a script invocation.
    fn fetch_invocation(&self, args: &FetchArgs) -> redis::ScriptInvocation<'static> {
        fetch_invocation(
            &self.keys,
            &self.store,
            process_holder(),
            &self.keys.claim,
            args,
        )
    }

    /// Takes in a fetch's reply; `sent_at`: when the fetch was sent (how much later it may have
    /// run, a `BLMOVE`'s wait, is in `args.allowance`).
    fn fetched(&mut self, sent_at: Instant, args: &FetchArgs, reply: redis::Value) -> Result<()> {
        let (replied_first, items) = parse_batch(reply).inspect_err(|_| self.unsure = true)?;
        if replied_first != args.first || items.len() > args.most {
            self.unsure = true;
            return Err(Error::invalid_state(
                "a queue fetch answered for another batch than it asked",
            ));
        }
        self.usable_until = Some(sent_at + args.allowance);
        self.unsure = false;
        self.filled = items.len() >= args.most;
        self.found_empty = items.is_empty();
        let first = args.first;
        self.held = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| (first + i as u64, item))
            .collect();
        if !self.held.is_empty() {
            wake_keeper();
        }
        Ok(())
    }

    /// Gives back what is held (logged when it fails: it comes back when the hold lapses). The
    /// first item, when its ack's outcome is in doubt, goes with it: `claim_release.lua` puts it
    /// back at the head when an ack of it applied (and forgets that ack, so that a release run
    /// twice, its first reply lost, puts it back once), and otherwise leaves it to the claim
    /// (given back with it) or to the reaper that gave it back already.
    fn give_back(&mut self) {
        self.give_back_with(false);
    }

    /// [`Consumer::give_back`] when this process will get no more through this consumer (its
    /// last handle went, `close()`, exit): the same script also forgets this holder's fields in
    /// the fences hash (`<holder>:fence`, `<holder>:acked`), so that the hash does not keep two
    /// fields for every process that ever fetched from the queue. Safe: the release settles
    /// every doubt it is given, a later fetch of this holder sets its fence again (above every
    /// number used before), and a message of this holder that reaches Redis late (sent on a
    /// connection given up for lost) then finds either that fence or an empty claim: at worst
    /// a late fetch claims items that come back when its hold lapses.
    fn give_back_and_forget(&mut self) {
        self.give_back_with(true);
    }

    fn give_back_with(&mut self, forget: bool) {
        let mut invocation = claims_invocation(&RELEASE, &self.keys, &self.store);
        invocation.arg(self.next);
        match (self.in_doubt, self.held.front()) {
            (true, Some((number, item))) => {
                invocation.arg("doubt").arg(*number).arg(item.as_slice());
            }
            _ => {
                invocation.arg("").arg(0).arg("");
            }
        }
        invocation.arg(if forget { "forget" } else { "" });
        let held_some = !self.held.is_empty() || self.in_doubt;
        let given = with_link(&self.store, |link| {
            link.invoke(&self.store, "giving back items of", &invocation)
        });
        match given {
            Ok(_) => {
                self.held.clear();
                self.usable_until = None;
                self.in_doubt = false;
                self.unsure = false;
                if forget {
                    self.fenced = false;
                }
            }
            Err(e) if !held_some && !self.unsure => {
                // Only the fences were to go: they stay until the queue expires.
                tracing::debug!(
                    "forgetting this process's fences of {}: {e}",
                    self.keys.items
                );
            }
            Err(e) => {
                self.unsure = true;
                tracing::warn!(
                    "giving back the items this process fetched from {}: {e}; tried again \
                     later, or they come back when its hold lapses",
                    self.keys.items
                );
                if !self.in_doubt {
                    // Nothing of this process's own to keep: the claim is what is left.
                    self.held.clear();
                    self.usable_until = None;
                }
            }
        }
    }

    /// Whether the keeper has something to do here: held items that went stale (or whose
    /// first item's ack is in doubt).
    fn needs_keeper(&self) -> bool {
        !self.held.is_empty() && (self.in_doubt || self.stale())
    }
}

impl Drop for Consumer {
    /// The queue's last handle in this process is gone: what the consumer holds (an item in
    /// doubt included) is handed to the keeper, which gives it back to the queue (within half a
    /// [`HOLD`], and again until Redis answers) and confirms the acks: a drop, which may happen
    /// on an executor's thread, makes no round trip. A consumer that ever fetched is handed
    /// over too, holding nothing: the keeper's give-back (one round trip, on the keeper's
    /// thread or at exit) forgets its fields in the fences hash.
    fn drop(&mut self) {
        if self.retired {
            return;
        }
        if !self.held.is_empty() || self.in_doubt || self.fenced {
            lock(&RETIRED).push(Consumer {
                keys: self.keys.clone(),
                store: self.store.clone(),
                held: std::mem::take(&mut self.held),
                next: self.next,
                usable_until: self.usable_until,
                allowance: self.allowance,
                batch: self.batch,
                filled: self.filled,
                found_empty: self.found_empty,
                in_doubt: self.in_doubt,
                bounded: self.bounded,
                unsure: self.unsure,
                fenced: self.fenced,
                retired: true,
            });
        }
        // Its acks, if some are not confirmed yet, are settled by the keeper too.
        wake_keeper();
    }
}

/// Consumers whose last handle is gone and that still hold items (or an item in doubt), or
/// whose fields in the fences hash may be there, for the keeper to give back (and forget).
static RETIRED: LazyLock<Mutex<Vec<Consumer>>> = LazyLock::new(Mutex::default);

/// Held while the keeper (or an exit hook) gives back what retired consumers hold, and while
/// [`register`] looks for one to take up again: one is never given back and taken up at once.
static RETIRING: Mutex<()> = Mutex::new(());

/// Gives back what the retired consumers hold; whether some are still left (Redis did not
/// answer, or an item's ack is still in doubt).
fn give_back_retired() -> bool {
    let _retiring = lock(&RETIRING);
    let retired = std::mem::take(&mut *lock(&RETIRED));
    let mut left = Vec::new();
    for mut consumer in retired {
        consumer.give_back_and_forget();
        if consumer.in_doubt {
            left.push(consumer);
        }
    }
    let some_left = !left.is_empty();
    lock(&RETIRED).extend(left);
    some_left
}

/// What a fetch asks.
pub(super) struct FetchArgs {
    /// The first number it may use (it reserved `most` from it).
    pub(super) first: u64,
    pub(super) most: usize,
    /// How long after its sending the batch may be returned.
    pub(super) allowance: Duration,
    /// How long Redis holds the batch.
    pub(super) hold_ms: u64,
    /// How long the holder waits if nothing comes (0: it does not).
    pub(super) wait_ms: u64,
}

/// Reads `{first number, item...}`.
pub(super) fn parse_batch(reply: redis::Value) -> Result<(u64, Vec<Vec<u8>>)> {
    let malformed = || Error::invalid_state("a queue fetch returned a malformed reply");
    let redis::Value::Array(values) = reply else {
        return Err(malformed());
    };
    let mut values = values.into_iter();
    let first = match values.next() {
        Some(redis::Value::Int(first)) => u64::try_from(first).map_err(|_| malformed())?,
        _ => return Err(malformed()),
    };
    let items = values
        .map(|value| match value {
            redis::Value::BulkString(item) => Ok(item),
            _ => Err(malformed()),
        })
        .collect::<Result<_>>()?;
    Ok((first, items))
}

/// `qsize`'s request: `{1, length, claimed, items applied by this process's feeder}`, the
/// last from the feeder's record `fed` (`None`: the feeder has no record of the queue; any
/// key of the queue then, its count unused).
pub(super) fn size(keys: &QueueKeys, fed: Option<&str>) -> Request {
    let mut invocation = SIZE.prepare_invoke();
    invocation
        .key(&keys.items)
        .key(&keys.state)
        .key(&keys.claims)
        .key(fed.unwrap_or(&keys.state))
        .arg(&keys.claim_prefix);
    Request::script("measuring", invocation)
}
