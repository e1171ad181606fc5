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
//!   sequence, held for [`HOLD`] + `sync.lease_secs` on Redis's clock.
//! * A get returns the next held item after writing its *ack*, `ZREMRANGEBYSCORE <claim> -inf
//!   <number>`, on this process's claims connection. The ack's reply is not waited for: it is
//!   read before the next script on that connection, so every ack is applied before the next
//!   fetch (same connection, same order). An ack is idempotent and covers every number up to its
//!   own, so one sent again after a failure is harmless, and Redis applies it even at
//!   `maxmemory` (the command frees memory; Redis does not refuse it with `OOM`). When the ack
//!   cannot be written (Redis unreachable), the get fails and keeps the item.
//! * This process returns a held item only within [`HOLD`] of sending its fetch (its own
//!   monotonic clock). After that, what it still holds is *given back*: pushed to the head of the
//!   queue in order, by its next fetch, its keeper thread (within half a [`HOLD`]), `close()`,
//!   or its exit hooks. Redis lets any get give a claim back once its hold lapsed,
//!   [`HOLD`] + lease after the fetch ran: an ack written while the holder could still return
//!   items had a lease to reach Redis. So a consumer that died holding items gives them back
//!   within `HOLD` + `sync.lease_secs`; every waiting get checks once a second.
//! * A get that finds nothing waits in slices of a second: `BLMOVE` from the queue into this
//!   holder's landing list (`claim:<holder>:in`) with the fetch written behind it, one round trip:
//!   the fetch claims what the `BLMOVE` moved, so an item that arrives is never in flight
//!   unowned. If the fetch does not run (`NOSCRIPT`: it is loaded and run again; a dropped
//!   connection: the next fetch), the item stays in the landing list, which the next fetch, or a
//!   reaper after the holder's hold (kept for the wait by the fetch before it), gives back. The
//!   consumer's lock is held during the slice, since the fetch gives back what it claims.
//! * An async get takes a held item first (when no blocking get of this process holds the
//!   consumer), else waits as a bounded queue's get does (`BLPOP` slices with a check-in that
//!   gives back lapsed claims, `claim_check_in.lua`); the item a `BLPOP` returns is not claimed,
//!   so a process killed between Redis's pop and reading the reply loses it.
//! * The batch: 1 item at first; twice the last one each time the last one was all returned
//!   within [`HOLD`], up to [`MOST_ITEMS`] items and [`MOST_BYTES`] bytes (at least one item);
//!   back to 1 when a batch went stale; 1 whenever another process's hold on the queue is
//!   running, so that consumers share the items (batches are for one consumer draining a queue).
//! * `qsize` counts claimed items (they are not returned yet); it first reads the replies of this
//!   process's acks, so that they are counted out.
//! * Another process does not see the items this process holds: meanwhile its gets return later
//!   items (or `get_nowait` finds the queue empty while `qsize` counts them), and the held items
//!   it receives once given back come after those. That lasts until this process returns them
//!   or, when it stops getting, at most [`HOLD`] and a half; when it died, until its hold lapses
//!   ([`HOLD`] + `sync.lease_secs`). One consumer alone sees every item in the order put.
//!
//! Bounded queues do not batch: each get takes one item and wakes a writer waiting for room.
//!
//! # Keys (the queue's hash tag)
//!
//! `claims` (hash: holder → hold deadline, ms on Redis's clock), `claim:<holder>` (sorted set:
//! number → `"<number>:<payload>"`), `claim:<holder>:in` (list: what a waiting get's `BLMOVE`
//! moved). Their TTL is the queue's: every fetch, check-in and put refreshes it.
//!
//! # Round trips
//!
//! A get with an item held: none waited for (one write). A fetch: 1 (the replies of earlier acks
//! are read first; they arrived long before). A get that waits: 1 per slice (`BLMOVE` + fetch).
//! Redis commands per item for one consumer draining a long queue: the ack, plus a fetch per
//! batch of up to 1,024 items.

use super::*;

/// How long after sending a fetch this process may return the items it got.
pub(super) const HOLD: Duration = Duration::from_millis(200);

/// The largest batch, in items.
pub(super) const MOST_ITEMS: usize = 1024;

/// The largest batch, in bytes (a first item larger than this comes alone).
pub(super) const MOST_BYTES: usize = 8 << 20;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{}\n{}", include_str!("claims_prelude.lua"), body))
}

static FETCH: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("claim_fetch.lua")));
static RELEASE: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("claim_release.lua")));
static CHECK_IN: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("claim_check_in.lua")));
static SIZE: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("size.lua")));

/// One consumer: this process's gets of one queue on one Redis.
pub(super) struct Consumer {
    keys: Arc<QueueKeys>,
    store: Arc<Store>,
    /// The items fetched and not returned, with their numbers.
    held: VecDeque<(u64, Vec<u8>)>,
    /// The number of the next item fetched.
    next: u64,
    /// When the fetch of `held` was sent.
    fetched_at: Option<Instant>,
    /// The size of the next fetch.
    batch: usize,
    /// Whether the last fetch filled its batch.
    filled: bool,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("items", &self.keys.items)
            .field("held", &self.held.len())
            .finish()
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// A consumer, as its queue handles keep it.
pub(super) type SharedConsumer = Shared<Consumer>;

/// A consumer's Redis URL and items key.
type ConsumerId = (String, String);

/// This process's consumers.
static CONSUMERS: LazyLock<Mutex<HashMap<ConsumerId, Shared<Consumer>>>> =
    LazyLock::new(Mutex::default);

/// Claims connections by Redis URL.
static LINKS: LazyLock<Mutex<HashMap<String, Link>>> = LazyLock::new(Mutex::default);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on the claims connection of `store`'s Redis.
fn with_link<T>(store: &Store, f: impl FnOnce(&mut Link) -> Result<T>) -> Result<T> {
    let mut links = lock(&LINKS);
    if !links.contains_key(store.url()) {
        links.insert(store.url().to_string(), Link::default());
    }
    match links.get_mut(store.url()) {
        Some(link) => f(link),
        None => Err(Error::invalid_state(
            "the queue claims connection went missing",
        )),
    }
}

/// The consumer of `core` in this process (kept by the handle for its next gets).
fn consumer(core: &QueueCore, store: &Arc<Store>) -> Shared<Consumer> {
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
fn register(core: &QueueCore, store: &Arc<Store>) -> Shared<Consumer> {
    static HOOKS: Once = Once::new();
    HOOKS.call_once(|| context::register_exit_hook(give_back_all));
    let keys = core.keys();
    let mut consumers = lock(&CONSUMERS);
    consumers
        .entry((store.url().to_string(), keys.items.clone()))
        .or_insert_with(|| {
            Arc::new(Mutex::new(Consumer {
                keys,
                store: store.clone(),
                held: VecDeque::new(),
                next: 0,
                fetched_at: None,
                batch: 1,
                filled: false,
            }))
        })
        .clone()
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
    loop {
        // The consumer's lock is held while waiting (a slice at most): the fetch behind the
        // BLMOVE gives back what the consumer claims, which must not be held by another
        // thread's get meanwhile. `close()`, the keeper and the exit hooks only try it.
        let mut consumer = lock(&consumer);
        if let Some(item) = consumer.take().map_err(|e| core.address.error(e))? {
            return Ok(item);
        }
        let slice = if wait { next_slice(deadline) } else { None };
        let fetched = match (blocking, slice) {
            (true, Some(slice)) => consumer.fetch_blocking(slice),
            (true, None) => return Err(Error::Empty),
            (false, slice) => consumer.fetch(slice),
        };
        fetched.map_err(|e| core.address.error(e))?;
        if let Some(item) = consumer.take().map_err(|e| core.address.error(e))? {
            return Ok(item);
        }
        if slice.is_none() {
            return Err(Error::Empty);
        }
        blocking = true;
    }
}

/// A held item of `core`, if this process has one it may still return (the async gets take it
/// before waiting, so that one process's gets keep the queue's order).
pub(super) fn take_held(core: &QueueCore, store: &Arc<Store>) -> Result<Option<Vec<u8>>> {
    let consumer = consumer(core, store);
    // A blocking get of another thread holds the lock: it holds no item then.
    let Ok(mut consumer) = consumer.try_lock() else {
        return Ok(None);
    };
    consumer.take().map_err(|e| core.address.error(e))
}

/// Gives back what this process holds of `core` (its `close()`). A failure is logged: the items
/// come back when the hold lapses.
pub(super) fn give_back(core: &QueueCore, store: &Store) {
    let consumer = lock(&CONSUMERS)
        .get(&(store.url().to_string(), core.keys().items.clone()))
        .cloned();
    // A blocking get of another thread holds the lock: it holds no item then, and what its
    // BLMOVE takes is claimed by its own fetch.
    if let Some(Ok(mut consumer)) = consumer.as_ref().map(|c| c.try_lock()) {
        consumer.give_back();
    }
}

/// Reads the replies of this process's acks, so that Redis has applied them before a read on
/// another connection (`qsize`).
pub(super) fn settle(store: &Store) -> Result<()> {
    let mut links = lock(&LINKS);
    match links.get_mut(store.url()) {
        Some(link) => link.settle(store),
        None => Ok(()),
    }
}

/// The keeper: a thread that gives back the held items that went stale, within half a [`HOLD`]
/// of it. It sleeps (parked) while no consumer holds anything; a fetch that got items wakes it.
fn wake_keeper() {
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

/// Gives back the held items that went stale; whether some consumer still holds items.
fn give_back_stale() -> bool {
    let consumers: Vec<_> = lock(&CONSUMERS).values().cloned().collect();
    let mut holding = false;
    for consumer in consumers {
        let Ok(mut consumer) = consumer.try_lock() else {
            // Busy getting: look again next round.
            holding = true;
            continue;
        };
        if !consumer.held.is_empty() {
            if consumer.stale() {
                consumer.give_back();
            } else {
                holding = true;
            }
        }
    }
    holding
}

/// At exit: everything held goes back to the queue (a consumer whose lock a waiting get holds
/// holds nothing; what its BLMOVE may take is reaped when its hold lapses).
fn give_back_all() {
    let consumers: Vec<_> = lock(&CONSUMERS).values().cloned().collect();
    for consumer in consumers {
        let Ok(mut consumer) = consumer.try_lock() else {
            continue;
        };
        if !consumer.held.is_empty() {
            consumer.give_back();
        }
    }
}

/// The claims script `script` on `keys`, the holder and the TTL given.
fn claims_invocation(
    script: &'static redis::Script,
    keys: &QueueKeys,
    store: &Store,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = script.prepare_invoke();
    invocation
        .key(&keys.items)
        .key(&keys.state)
        .key(&keys.claims)
        .key(&keys.claim)
        .arg(ttl(store))
        .arg(&keys.claim_prefix)
        .arg(process_holder());
    invocation
}

impl Consumer {
    fn stale(&self) -> bool {
        self.fetched_at.is_none_or(|at| at.elapsed() >= HOLD)
    }

    /// The next held item, after its ack was written; `None` when nothing may be returned.
    fn take(&mut self) -> Result<Option<Vec<u8>>> {
        let Some(&(number, _)) = self.held.front() else {
            return Ok(None);
        };
        if self.stale() {
            // The next fetch gives them back.
            self.held.clear();
            return Ok(None);
        }
        with_link(&self.store, |link| {
            link.ack(&self.store, &self.keys.claim, number)
        })?;
        Ok(self.held.pop_front().map(|(_, item)| item))
    }

    /// Claims the next batch (giving back what was held first). `wait`: the caller waits that
    /// long for items if none come (the holder's record stays for it).
    fn fetch(&mut self, wait: Option<Duration>) -> Result<()> {
        let invocation = self.fetch_invocation(wait);
        let sent_at = Instant::now();
        let reply = with_link(&self.store, |link| {
            link.invoke(&self.store, "claiming items of", &invocation)
        })?;
        self.fetched(sent_at, reply)
    }

    /// Waits at most `block` for an item (`BLMOVE` into this holder's landing list), and claims
    /// the next batch in the same round trip. An item the `BLMOVE` moved stays this holder's
    /// until a fetch claims it (this one, or the next when this one failed) or, if this process
    /// dies first, a reaper gives it back.
    fn fetch_blocking(&mut self, block: Duration) -> Result<()> {
        // The fetch gives back what this holder claims: its acks must be applied first.
        with_link(&self.store, |link| link.settle(&self.store))?;
        let invocation = self.fetch_invocation(Some(block));
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .cmd("BLMOVE")
            .arg(&self.keys.items)
            .arg(format!("{}:in", self.keys.claim))
            .arg("LEFT")
            .arg("RIGHT")
            .arg(common::blpop_seconds(block))
            .invoke_script(&invocation);
        let sent_at = Instant::now();
        let reply = self.store.with_blocking_conn(
            Some(block),
            || "waiting for items of a queue".to_string(),
            |conn| {
                let (moved, fetched): (redis::Value, redis::Value) = pipe.query(conn)?;
                moved.extract_error()?;
                match fetched.extract_error() {
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        // Redis lost its scripts (a restart, SCRIPT FLUSH): what the BLMOVE
                        // took is in the landing list, and the fetch claims it.
                        invocation.invoke(conn)
                    }
                    other => other,
                }
            },
        )?;
        self.fetched(sent_at, reply)
    }

    /// `claim_fetch.lua` for the next batch: 1 item after a stale batch or a give-back, twice the
    /// last one after a full batch all returned in time.
    fn fetch_invocation(&mut self, wait: Option<Duration>) -> redis::ScriptInvocation<'static> {
        self.batch = if self.fetched_at.is_none() || !self.held.is_empty() || self.stale() {
            1
        } else if self.filled {
            (self.batch * 2).min(MOST_ITEMS)
        } else {
            self.batch
        };
        self.held.clear();
        self.fetched_at = None;
        let hold = HOLD + crate::grants::lease();
        let mut invocation = claims_invocation(&FETCH, &self.keys, &self.store);
        invocation
            .arg(self.next)
            .arg(self.batch)
            .arg(hold.as_millis() as u64)
            .arg(MOST_BYTES)
            .arg(wait.map_or(0, |w| w.as_millis() as u64));
        invocation
    }

    /// Takes in a fetch's reply; `sent_at`: when the fetch was sent.
    fn fetched(&mut self, sent_at: Instant, reply: redis::Value) -> Result<()> {
        let (first, items) = parse_batch(reply)?;
        self.fetched_at = Some(sent_at);
        self.filled = items.len() >= self.batch;
        self.next = first + items.len() as u64;
        self.held = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| (first + i as u64, item))
            .collect();
        if self.held.len() > 1 {
            wake_keeper();
        }
        Ok(())
    }

    /// Gives back what is held (logged when it fails: it comes back when the hold lapses).
    fn give_back(&mut self) {
        self.held.clear();
        self.fetched_at = None;
        let invocation = claims_invocation(&RELEASE, &self.keys, &self.store);
        let given = with_link(&self.store, |link| {
            link.invoke(&self.store, "giving back items of", &invocation)
        });
        if let Err(e) = given {
            tracing::warn!(
                "giving back the items this process fetched from {}: {e}; they come back when \
                 its hold lapses",
                self.keys.items
            );
        }
    }
}

/// Reads `{first number, item...}`.
fn parse_batch(reply: redis::Value) -> Result<(u64, Vec<Vec<u8>>)> {
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

/// This process's claims connection to one Redis: acks are written without waiting, and their
/// replies read before the next script.
#[derive(Default)]
struct Link {
    conn: Option<redis::Connection>,
    /// Replies not read yet.
    pending: usize,
    /// The last ack written per claim since the replies were last all read.
    unconfirmed: HashMap<String, u64>,
    /// Whether a reply read was an error: the unconfirmed acks are written again.
    failed: bool,
}

impl Link {
    fn conn(&mut self, store: &Store) -> redis::RedisResult<&mut redis::Connection> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let settings = store.settings();
                let conn = redis::Client::open(store.url())?
                    .get_connection_with_timeout(settings.connect_timeout)?;
                conn.set_read_timeout(Some(settings.response_timeout))?;
                conn.set_write_timeout(Some(settings.response_timeout))?;
                conn
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Forgets the connection (a reply may be pending on it).
    fn drop_conn(&mut self) {
        self.conn = None;
        self.pending = 0;
        if !self.unconfirmed.is_empty() {
            self.failed = true;
        }
    }

    /// Writes the ack of `number` on `claim` (and, after a failure, the unconfirmed ones again).
    fn ack(&mut self, store: &Store, claim: &str, number: u64) -> Result<()> {
        self.unconfirmed.insert(claim.to_string(), number);
        if self.failed {
            return self.confirm(store);
        }
        let packed = ack_command(claim, number).get_packed_command();
        let written = self
            .conn(store)
            .and_then(|conn| conn.send_packed_command(&packed));
        match written {
            Ok(()) => {
                self.pending += 1;
                Ok(())
            }
            Err(_) => {
                // On a new connection, with the others written again.
                self.drop_conn();
                self.confirm(store)
            }
        }
    }

    /// Writes every unconfirmed ack again and waits for the replies.
    fn confirm(&mut self, store: &Store) -> Result<()> {
        self.read_pending();
        let mut pipe = redis::pipe();
        for (claim, number) in &self.unconfirmed {
            pipe.add_command(ack_command(claim, *number)).ignore();
        }
        let result = self.conn(store).and_then(|conn| pipe.query::<()>(conn));
        match result {
            Ok(()) => {
                self.unconfirmed.clear();
                self.failed = false;
                Ok(())
            }
            Err(e) => {
                if !is_reply(&e) {
                    self.drop_conn();
                }
                self.failed = true;
                Err(Error::redis("acknowledging items taken from a queue", e))
            }
        }
    }

    /// Reads the replies pending; notes an error reply, forgets the connection on a failure.
    fn read_pending(&mut self) {
        while self.pending > 0 {
            let Some(conn) = self.conn.as_mut() else {
                self.pending = 0;
                break;
            };
            match conn.recv_response() {
                Ok(_) => self.pending -= 1,
                Err(e) if is_reply(&e) => {
                    self.pending -= 1;
                    self.failed = true;
                }
                Err(_) => self.drop_conn(),
            }
        }
    }

    /// Makes sure every ack written was applied.
    fn settle(&mut self, store: &Store) -> Result<()> {
        self.read_pending();
        if self.failed {
            self.confirm(store)
        } else {
            self.unconfirmed.clear();
            Ok(())
        }
    }

    /// Runs a claims script once every ack written was applied.
    fn invoke(
        &mut self,
        store: &Store,
        what: &str,
        invocation: &redis::ScriptInvocation<'static>,
    ) -> Result<redis::Value> {
        self.settle(store)?;
        let result = self
            .conn(store)
            .and_then(|conn| invocation.invoke::<redis::Value>(conn));
        result.map_err(|e| {
            if !is_reply(&e) {
                self.drop_conn();
            }
            Error::redis(what, e)
        })
    }
}

/// The ack of every item numbered up to `number` in `claim`.
fn ack_command(claim: &str, number: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("ZREMRANGEBYSCORE");
    cmd.arg(claim).arg("-inf").arg(number);
    cmd
}

/// The check-in of a waiting get: the queue exists, lapsed claims are given back, TTLs refreshed.
pub(super) fn check_in(keys: &QueueKeys, store: &Store) -> Request {
    let mut invocation = CHECK_IN.prepare_invoke();
    invocation
        .key(&keys.items)
        .key(&keys.state)
        .key(&keys.claims)
        .arg(ttl(store))
        .arg(&keys.claim_prefix);
    Request::script("checking", invocation)
}

/// `qsize`'s request: `{1, length, claimed, items applied by this process's feeder}`.
pub(super) fn size(keys: &QueueKeys) -> Request {
    let mut invocation = SIZE.prepare_invoke();
    invocation
        .key(&keys.items)
        .key(&keys.state)
        .key(&keys.claims)
        .key(&keys.fed)
        .arg(&keys.claim_prefix);
    Request::script("measuring", invocation)
}

/// Whether `e` is Redis's reply (the connection is still in step) rather than a failure to talk.
fn is_reply(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error())
}
