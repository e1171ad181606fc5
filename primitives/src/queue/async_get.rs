//! The async gets (`get_async`, `get_timeout_async`, `get_nowait_async`) of every queue: each
//! item is *claimed* before it leaves Redis, as the blocking gets' items are
//! (`claims/mod.rs`), so a process killed while an async get waits, or while Redis's answer is
//! on its way, loses nothing.
//!
//! # Semantics
//!
//! An item is returned by exactly one get, or it is still in the queue (claimed, or given back
//! to it), whatever process dies; the one exception is the instant between Redis applying the
//! ack and the caller receiving the item (below), the same instant in which a blocking get
//! could have returned it to a process that then died.
//!
//! * An async get borrows an *async holder* of this process (`<process holder>:a<n>`; idle
//!   ones are kept and reused, for any queue, so they stay as many as the async gets that ever
//!   ran at once, and so do their records in a queue's fences hash). A holder numbers its
//!   fetches in its own sequence, which only grows, fenced as a process's (`claim_fetch.lua`).
//! * `get_nowait_async` (and a get whose timeout passed already): one fetch of at most one item
//!   into the holder's claim (`claim_fetch.lua`). A waiting get: slices of at most a second,
//!   each the holder's record for the wait (`claim_wait.lua`), a `BLMOVE` from the queue into
//!   its landing list and the fetch behind it, in one round trip, as a blocking get's wait:
//!   Redis runs the fetch right after the move, so an item that arrives is never in flight
//!   unowned. Each fetch gives back the claims whose hold lapsed (a dead holder's), and fails
//!   when the queue is gone.
//! * The item is then *acked* and the ack waited for (`claim_ack.lua`, which also drops the
//!   holder's record in the claims hash): the item is returned only when the ack took it out of
//!   the claim, now or in an earlier attempt whose reply was lost (`<holder>:acked`). An item
//!   given back meanwhile (the holder's hold lapsed: the ack came later than the wait's slice
//!   plus [`HOLD`] plus `sync.lease_secs` after the fetch ran) is not this get's: it waits
//!   again (or, without waiting, finds the queue empty).
//! * A process killed with an item claimed (moved, fetched, not acked) leaves it to the
//!   reapers: the next fetch of any process gives it back to the head of the queue once the
//!   hold lapsed.
//! * An ack that fails three times (Redis unreachable; 0.1 s, then 0.2 s apart) leaves its
//!   outcome unknown: the get fails, and the item is handed to the queue keeper thread, which
//!   puts it back at the head of the queue if its ack was applied (`claim_release.lua`,
//!   `doubt`) and gives the rest of the claim back otherwise, as soon as Redis answers (and at
//!   exit). A process killed before that loses the item if its ack had been applied.
//! * Dropping the future: before a slice the get stops, taking nothing; before its ack (the
//!   item claimed, the caller gone) the claim is given back to the head of the queue, or, after
//!   an ack attempt failed, handed to the keeper as above. An item acked as the caller left
//!   goes back to the head (`LPUSH`, the undo of `QueueCore::get_async`; logged and lost if
//!   that write fails).
//! * On a bounded queue, a get that took an item wakes one writer waiting for room.
//!
//! # Round trips
//!
//! `get_nowait_async`: 2 when it finds an item (fetch, ack), 1 when the queue is empty. A
//! waiting async get: 1 per slice of waiting (the last one finds the item), then the ack. On a
//! bounded queue, 1 more to wake a writer. (An unbounded queue's async get first takes an item
//! this process's blocking gets hold, without a round trip, when it can: `claims/mod.rs`.)

use std::sync::atomic::{AtomicU64, Ordering};

use super::claims::{self, FetchArgs, HOLD};
use super::*;

/// An async holder: its id and the next number of its sequence.
pub(super) struct AsyncHolder {
    id: String,
    next: u64,
}

/// The idle async holders of this process, by Redis URL. A holder serves any queue: its
/// numbers only grow, so its fence on each queue (`<holder>:fence` in that queue's fences hash)
/// only grows too.
static IDLE: LazyLock<Mutex<HashMap<String, Vec<AsyncHolder>>>> = LazyLock::new(Mutex::default);

/// Acks whose outcome is not known, for the keeper to settle.
static DOUBTS: LazyLock<Mutex<Vec<Doubt>>> = LazyLock::new(Mutex::default);

/// An item claimed by an async holder whose ack failed: it may or may not have been applied.
struct Doubt {
    store: Arc<Store>,
    keys: Arc<QueueKeys>,
    holder: AsyncHolder,
    number: u64,
    item: Vec<u8>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Borrows an idle async holder, or makes one.
fn borrow_holder(url: &str) -> AsyncHolder {
    static MADE: AtomicU64 = AtomicU64::new(0);
    let idle = lock(&IDLE).get_mut(url).and_then(Vec::pop);
    idle.unwrap_or_else(|| AsyncHolder {
        id: format!(
            "{}:a{}",
            process_holder(),
            MADE.fetch_add(1, Ordering::Relaxed)
        ),
        next: 0,
    })
}

/// Gives a holder back for the next async get.
fn return_holder(url: &str, holder: AsyncHolder) {
    lock(&IDLE).entry(url.to_string()).or_default().push(holder);
}

/// The claim of `holder` on the queue.
fn claim_of(keys: &QueueKeys, holder: &AsyncHolder) -> String {
    format!("{}{}", keys.claim_prefix, holder.id)
}

/// Settles the acks whose outcome was not known (the keeper, and the exit hooks): each item
/// goes back to the head of the queue if its ack was applied, and the rest of its holder's
/// claim is given back; a settled holder is idle again. Whether some are still unsettled.
pub(super) fn settle_doubts() -> bool {
    let doubts = std::mem::take(&mut *lock(&DOUBTS));
    if doubts.is_empty() {
        return false;
    }
    let mut unsettled = Vec::new();
    for doubt in doubts {
        let claim = claim_of(&doubt.keys, &doubt.holder);
        let invocation = claims::release_invocation(
            &doubt.keys,
            &doubt.store,
            &doubt.holder.id,
            &claim,
            doubt.holder.next,
            Some((doubt.number, &doubt.item)),
        );
        let released = doubt.store.with_conn(
            || format!("giving back an item of {}", doubt.keys.items),
            |c| invocation.invoke::<i64>(c),
        );
        match released {
            Ok(_) => return_holder(doubt.store.url(), doubt.holder),
            Err(e) => {
                tracing::warn!(
                    "settling an async get's item of {}: {e}; tried again",
                    doubt.keys.items
                );
                unsettled.push(doubt);
            }
        }
    }
    let left = !unsettled.is_empty();
    lock(&DOUBTS).extend(unsettled);
    left
}

/// Attempts at the ack of one item before its outcome is left to the keeper.
const ACK_ATTEMPTS: u32 = 3;

/// The pause before the second attempt at an ack (twice that before the third).
const ACK_PAUSE: Duration = Duration::from_millis(100);

/// An async get (see the module docs).
pub(super) struct Get {
    core: QueueCore,
    keys: Arc<QueueKeys>,
    store: Arc<Store>,
    wait: bool,
    deadline: Option<Instant>,
    /// `None` once handed to the keeper with a doubt.
    holder: Option<AsyncHolder>,
    state: GetState,
    /// The number of the last fetch (its first and only item's).
    fetched: u64,
    /// Whether the last fetch waited (its reply is then the pipeline's, `[fetch's]`).
    waited: bool,
    /// The item claimed and not acked yet, or acked and kept while a writer is woken.
    item: Option<Vec<u8>>,
    /// Failed attempts at the ack of the item claimed now.
    ack_failures: u32,
    /// The caller left: no new fetch.
    abandoned: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GetState {
    Fetching,
    Acking,
    /// A pause before the ack is written again.
    AckPause,
    GivingBack,
    Waking,
}

impl Get {
    pub(super) fn new(
        core: &QueueCore,
        store: Arc<Store>,
        wait: bool,
        deadline: Option<Instant>,
    ) -> Get {
        let keys = core.keys();
        Get {
            holder: Some(borrow_holder(store.url())),
            keys,
            store,
            core: core.clone(),
            wait,
            deadline,
            state: GetState::Fetching,
            fetched: 0,
            waited: false,
            item: None,
            ack_failures: 0,
            abandoned: false,
        }
    }

    fn holder(&self) -> Result<&AsyncHolder> {
        self.holder
            .as_ref()
            .ok_or_else(|| Error::invalid_state("an async get lost its holder"))
    }

    /// The next fetch: at once (`block` `None`), or behind a wait of at most `block`.
    fn fetch(&mut self, store: &Store, block: Option<Duration>) -> Step<Vec<u8>> {
        let Some(holder) = self.holder.as_mut() else {
            return Step::Done(Err(Error::invalid_state("an async get lost its holder")));
        };
        let first = holder.next;
        holder.next += 1;
        self.fetched = first;
        self.waited = block.is_some();
        self.state = GetState::Fetching;
        let hold = block.unwrap_or_default() + HOLD + crate::grants::lease();
        let args = FetchArgs {
            first,
            most: 1,
            allowance: HOLD,
            hold_ms: hold.as_millis() as u64,
            wait_ms: block.map_or(0, |b| (b.as_millis() as u64).max(1)),
        };
        let claim = claim_of(&self.keys, holder);
        match block {
            None => Step::Next(Request::script(
                "getting from",
                claims::fetch_invocation(&self.keys, store, &holder.id, &claim, &args),
            )),
            Some(block) => {
                // Sent whole behind the BLMOVE: it cannot meet `NOSCRIPT` there.
                let eval = claims::fetch_eval(&self.keys, store, &holder.id, &claim, &args);
                Step::Next(Request::blocking_pipe(
                    "waiting for items of",
                    claims::wait_pipe(
                        &self.keys,
                        store,
                        &holder.id,
                        &claim,
                        args.hold_ms,
                        block,
                        eval,
                    ),
                    block,
                ))
            }
        }
    }

    /// The next slice of waiting, or `Empty` at the deadline.
    fn slice(&mut self, store: &Store) -> Step<Vec<u8>> {
        match next_slice(self.deadline) {
            None => Step::Done(Err(Error::Empty)),
            Some(block) => self.fetch(store, Some(block)),
        }
    }

    /// Nothing (more) for this get: wait again, or find the queue empty (or stop: the caller
    /// left).
    fn again(&mut self, store: &Store) -> Step<Vec<u8>> {
        if self.abandoned {
            Step::Done(Err(op::abandoned()))
        } else if self.wait {
            self.slice(store)
        } else {
            Step::Done(Err(Error::Empty))
        }
    }

    fn ack(&mut self, store: &Store) -> Step<Vec<u8>> {
        let holder = match self.holder() {
            Ok(holder) => holder,
            Err(e) => return Step::Done(Err(e)),
        };
        let claim = claim_of(&self.keys, holder);
        let invocation =
            claims::ack_invocation(&self.keys, store, &holder.id, &claim, self.fetched);
        self.state = GetState::Acking;
        Step::Next(Request::script("acknowledging an item of", invocation).abandon_point())
    }

    /// The item is this get's: returned, after a writer is woken on a bounded queue.
    fn got(&mut self, store: &Store, item: Vec<u8>) -> Step<Vec<u8>> {
        if self.core.maxsize == 0 {
            return Step::Done(Ok(item));
        }
        self.item = Some(item);
        self.state = GetState::Waking;
        Step::Next(self.keys.putters.wake(store, 1))
    }

    /// Hands the claimed item, whose ack's outcome is not known, to the keeper (and to the exit
    /// hooks).
    fn doubt(&mut self, e: Error) -> Step<Vec<u8>> {
        claims::register_exit_hook();
        if let (Some(holder), Some(item)) = (self.holder.take(), self.item.take()) {
            lock(&DOUBTS).push(Doubt {
                store: self.store.clone(),
                keys: self.keys.clone(),
                holder,
                number: self.fetched,
                item,
            });
            claims::wake_keeper();
        }
        Step::Done(Err(self.core.address.error(e)))
    }
}

impl Drop for Get {
    fn drop(&mut self) {
        if let Some(holder) = self.holder.take() {
            return_holder(self.store.url(), holder);
        }
    }
}

impl Operation for Get {
    type Output = Vec<u8>;

    fn describe(&self) -> String {
        self.core.address.describe()
    }

    fn start(&mut self, store: &Store) -> Step<Vec<u8>> {
        // A wait whose deadline passed already (a timeout of zero) still takes an item there,
        // as the blocking get does.
        if self.wait && next_slice(self.deadline).is_some() {
            self.slice(store)
        } else {
            self.fetch(store, None)
        }
    }

    fn reply(&mut self, store: &Store, reply: Result<redis::Value>) -> Step<Vec<u8>> {
        let address = &self.core.address;
        match self.state {
            GetState::Fetching => {
                let waited = self.waited;
                let batch = reply.and_then(|value| {
                    // A waiting slice's reply is the pipeline's one value kept: `[fetch's]`.
                    let value = match value {
                        redis::Value::Array(mut values) if waited && values.len() == 1 => {
                            values.remove(0)
                        }
                        value => value,
                    };
                    claims::parse_batch(value)
                });
                match batch {
                    Err(e) => Step::Done(Err(address.error(e))),
                    Ok((first, _)) if first != self.fetched => Step::Done(Err(
                        Error::invalid_state("a queue fetch answered for another one"),
                    )),
                    Ok((_, mut items)) => match items.pop() {
                        None => self.again(store),
                        Some(item) => {
                            self.item = Some(item);
                            self.ack(store)
                        }
                    },
                }
            }
            GetState::Acking => match op::parse::<i64>(reply, "an acknowledgement") {
                Ok(1) => {
                    self.ack_failures = 0;
                    match self.item.take() {
                        Some(item) => self.got(store, item),
                        None => {
                            Step::Done(Err(Error::invalid_state("a get lost track of its item")))
                        }
                    }
                }
                Ok(_) => {
                    // Given back before the ack (the hold lapsed): not this get's.
                    self.item = None;
                    self.ack_failures = 0;
                    self.again(store)
                }
                Err(e) => {
                    self.ack_failures += 1;
                    if self.ack_failures < ACK_ATTEMPTS {
                        // A short pause, so that a reconnection can finish.
                        let pause = ACK_PAUSE * self.ack_failures;
                        self.state = GetState::AckPause;
                        Step::Next(Request::local("pausing before acknowledging", move || {
                            std::thread::sleep(pause);
                            Ok(redis::Value::Nil)
                        }))
                    } else {
                        self.doubt(e)
                    }
                }
            },
            GetState::AckPause => self.ack(store),
            GetState::GivingBack => {
                if let Err(e) = reply {
                    tracing::warn!(
                        "giving back an item of {} whose async get was dropped: {e}; it comes \
                         back when its hold lapses",
                        address.describe()
                    );
                }
                self.item = None;
                Step::Done(Err(op::abandoned()))
            }
            GetState::Waking => {
                if let Err(e) = reply {
                    tracing::warn!(
                        "waking a writer of {}: {e}; a writer waiting for room waits for the next get",
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

    fn abandon(&mut self, store: &Store) -> Step<Vec<u8>> {
        self.abandoned = true;
        if self.state != GetState::Acking {
            // Before a slice: nothing claimed.
            return Step::Done(Err(op::abandoned()));
        }
        if self.ack_failures > 0 {
            // An ack was written and its outcome is not known: the keeper settles the item.
            return self.doubt(op::abandoned());
        }
        let Ok(holder) = self.holder() else {
            return Step::Done(Err(op::abandoned()));
        };
        let claim = claim_of(&self.keys, holder);
        let invocation =
            claims::release_invocation(&self.keys, store, &holder.id, &claim, holder.next, None);
        self.state = GetState::GivingBack;
        Step::Next(Request::script("giving back an item of", invocation))
    }
}
