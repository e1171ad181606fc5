//! This process's queue feeder: the puts of unbounded queues, buffered and written in numbered
//! batches by one thread (see *Feeder* in the module docs of `queue`), and this process's
//! `closed`/`cancelled` marks of every queue.

use super::*;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};

static FEED: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&claims::with_claims_ttl(include_str!("feed.lua"))));

/// Most items in one feeder batch.
const FEED_BATCH: usize = 10_000;
/// Most bytes in one feeder batch (a batch has at least one item, whatever its size).
const FEED_BATCH_BYTES: usize = 8 << 20;
/// Wait before a batch that failed transiently is sent again.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long the exit hook waits for every queue's feeder writes, in all.
const EXIT_FLUSH: Duration = Duration::from_secs(30);
/// How long `join_thread` waits through uninterrupted transient failures before it reports them.
pub(super) const JOIN_GIVE_UP: Duration = Duration::from_secs(30);
/// How often the feeder drops the records of queues this process has no handle of.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// This process's handles of one queue, as the feeder counts them: every handle that put on
/// the queue, marked it or looked at its marks holds the one `Handles` of the queue (found
/// through [`HANDLES`], so that handles deserialized apart share it with the clones of the
/// first). The feeder's record of the queue holds it weakly: once no handle is left and the
/// record has nothing to write, the record goes (a process that makes a queue per request
/// would otherwise keep one per queue for as long as it lives). A handle that puts on the queue again later makes
/// a new record, with a writer hash of its own (`fed:<process>:<record>`): its batches are
/// numbered from 1 again, which the old hash, where earlier batches were applied, would skip.
#[derive(Debug)]
pub(super) struct Handles {
    items: String,
}

/// The [`Handles`] of every queue with a live handle in this process, by items key.
static HANDLES: LazyLock<Mutex<HashMap<String, Weak<Handles>>>> = LazyLock::new(Default::default);

impl Handles {
    /// The `Handles` of the queue whose items key is `items`: the live one, or a new one.
    pub(super) fn of(items: &str) -> Arc<Handles> {
        let mut handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = handles.get(items).and_then(Weak::upgrade) {
            return live;
        }
        let new = Arc::new(Handles {
            items: items.to_string(),
        });
        handles.insert(items.to_string(), Arc::downgrade(&new));
        new
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        let mut handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
        // Unless a handle made a new one meanwhile.
        if handles
            .get(&self.items)
            .is_some_and(|h| h.strong_count() == 0)
        {
            handles.remove(&self.items);
        }
    }
}

/// This process's feeder: buffered puts of unbounded queues, written in numbered batches; and
/// this process's `closed`/`cancelled` marks of every queue.
pub(super) struct Feeder {
    state: Mutex<FeederState>,
    changed: Condvar,
}

#[derive(Default)]
struct FeederState {
    /// By items key.
    queues: HashMap<String, Pending>,
    /// When records of queues without handles were last dropped.
    pruned: Option<Instant>,
    /// Threads waiting on `changed` (the feeder, joiners, the exit hook): a put wakes them only
    /// when there are some (a wake-up is a system call, and puts come by the thousand).
    waiting: usize,
}

/// One queue as this process sees it.
pub(super) struct Pending {
    core: QueueCore,
    /// This record's writer hash (`feed.lua`): `fed:<process>:<record number>`.
    fed: String,
    /// This process's handles of the queue (see [`Handles`]).
    handles: Weak<Handles>,
    /// Put and not yet in a batch, in order.
    items: VecDeque<Vec<u8>>,
    /// The transfers of the pipe ends in the items not known to be written, by the item's
    /// ordinal (its place among the `queued_total` items given to the feeder, from 0), in
    /// order; only the items that have some (none is allocated for the others). Forgotten
    /// (kept for the receivers) once their batch is written; given back when their items are
    /// dropped unwritten (a permanent failure), unless their batch may have been written.
    transfers: VecDeque<(u64, Unsent)>,
    /// The batch being written, or to be written again after a transient failure.
    inflight: Option<Batch>,
    /// The number of the next batch (the first is 1: `feed.lua` starts from 0).
    next_batch: u64,
    /// Items given to the feeder and not dropped, since the process started.
    queued_total: u64,
    /// Items given to the feeder and dropped unwritten (a permanent failure): with
    /// `queued_total`, every item this record was ever given.
    dropped_total: u64,
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
    pub(super) closed: bool,
    pub(super) cancelled: bool,
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
    /// A write of it failed in a way that may have applied it (a lost reply).
    ambiguous: bool,
}

impl Pending {
    fn new(core: &QueueCore) -> Pending {
        static RECORDS: AtomicU64 = AtomicU64::new(0);
        let record = RECORDS.fetch_add(1, Ordering::Relaxed);
        Pending {
            core: core.detached(),
            fed: core
                .address
                .keys()
                .key(&format!("fed:{}:{record}", process_holder())),
            handles: Weak::new(),
            items: VecDeque::new(),
            transfers: VecDeque::new(),
            inflight: None,
            next_batch: 1,
            queued_total: 0,
            dropped_total: 0,
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

    fn enqueue(&mut self, item: Vec<u8>, unsent: Unsent) {
        if !unsent.is_empty() {
            self.transfers.push_back((self.queued_total, unsent));
        }
        self.items.push_back(item);
        self.queued_total += 1;
    }

    /// Every item this record was given (written, to write, or dropped): the ordinal, plus one,
    /// of the last one.
    fn given_total(&self) -> u64 {
        self.queued_total + self.dropped_total
    }

    /// Whether the first `given` items this record was given are done with: written or dropped
    /// (the unwritten ones are the last given).
    fn settled_through(&self, given: u64) -> bool {
        self.given_total().saturating_sub(self.unwritten() as u64) >= given
    }

    /// Items put and not known to be written.
    fn unwritten(&self) -> usize {
        self.items.len() + self.inflight.as_ref().map_or(0, |b| b.items.len())
    }

    fn is_flushed(&self) -> bool {
        self.items.is_empty() && self.inflight.is_none()
    }

    /// No handle of the queue is left in this process, and the record has nothing to write
    /// (a failure not reported yet has nobody left to report it to: it was logged).
    fn is_forgotten(&self) -> bool {
        self.handles.strong_count() == 0 && self.is_flushed()
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
                ambiguous: false,
            });
            self.next_batch += 1;
        }
        let batch = self.inflight.as_mut()?;
        batch.sending = true;
        Some(Outgoing {
            core: self.core.clone(),
            fed: self.fed.clone(),
            number: batch.number,
            through: batch.through,
            items: batch.items.clone(),
        })
    }

    /// Applies what happened to the batch in flight. Returns the transfers of the items dropped
    /// unwritten, to give back once the feeder's lock is let go (dropping them does it: it
    /// takes round trips).
    fn settle(&mut self, outcome: Outcome) -> Vec<Unsent> {
        let what = self.core.address.describe();
        let mut unwritten = Vec::new();
        match outcome {
            Outcome::Written => {
                if let Some(batch) = &self.inflight {
                    while self
                        .transfers
                        .front()
                        .is_some_and(|(ordinal, _)| *ordinal < batch.through)
                    {
                        if let Some((_, unsent)) = self.transfers.pop_front() {
                            unsent.keep();
                        }
                    }
                }
                self.inflight = None;
                self.retry_at = None;
                self.failing_since = None;
                self.last_error = None;
            }
            Outcome::Permanent(e) => {
                // Every item not written goes: the batch in flight and the buffered ones. The
                // batch's own transfers stay if an earlier attempt may have applied it.
                let kept_below = self
                    .inflight
                    .as_ref()
                    .filter(|batch| batch.ambiguous)
                    .map_or(0, |batch| batch.through);
                for (ordinal, unsent) in self.transfers.drain(..) {
                    if ordinal < kept_below {
                        unsent.keep();
                    } else {
                        unwritten.push(unsent);
                    }
                }
                let lost = self.unwritten();
                self.queued_total = self.queued_total.saturating_sub(lost as u64);
                self.dropped_total += lost as u64;
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
                    batch.ambiguous = true;
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
        unwritten
    }
}

/// A batch on its way to Redis.
struct Outgoing {
    core: QueueCore,
    /// The record's writer hash.
    fed: String,
    number: u64,
    through: u64,
    items: Arc<Vec<Vec<u8>>>,
}

/// A queue's feeder counts, for `qsize`.
pub(super) struct Queued {
    /// The record's writer hash, where `feed.lua` counts what it applied.
    pub(super) fed: String,
    /// Items given to the feeder and not dropped.
    pub(super) total: u64,
    /// Of those, the ones not known to be written.
    pub(super) unwritten: u64,
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

pub(super) static FEEDER: LazyLock<Arc<Feeder>> = LazyLock::new(|| {
    Arc::new(Feeder {
        state: Mutex::new(FeederState::default()),
        changed: Condvar::new(),
    })
});

impl Feeder {
    fn lock(&self) -> MutexGuard<'_, FeederState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue's record, made if there is none, held by `handles` (see [`Handles`]).
    fn entry<'a>(
        state: &'a mut FeederState,
        core: &QueueCore,
        handles: &Arc<Handles>,
    ) -> &'a mut Pending {
        // Whatever the queue: a process may make queues that never feed the feeder thread
        // (simple, joinable or bounded ones, whose puts are written at once).
        Self::prune(state, Instant::now());
        let p = state
            .queues
            .entry(core.keys().items.clone())
            .or_insert_with(|| Pending::new(core));
        if p.handles.strong_count() == 0 {
            p.handles = Arc::downgrade(handles);
        }
        p
    }

    /// Drops the records of queues this process has no handle of and nothing to write for (at
    /// most once per [`PRUNE_EVERY`]).
    fn prune(state: &mut FeederState, now: Instant) {
        if state
            .pruned
            .is_some_and(|at| now.duration_since(at) < PRUNE_EVERY)
        {
            return;
        }
        state.pruned = Some(now);
        state.queues.retain(|_, p| !p.is_forgotten());
    }

    /// Waits on `changed` (at most `timeout`), counted in `waiting`.
    fn wait<'a>(
        &self,
        mut state: MutexGuard<'a, FeederState>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, FeederState> {
        state.waiting += 1;
        let mut state = match timeout {
            Some(timeout) => {
                self.changed
                    .wait_timeout(state, timeout)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
        };
        state.waiting -= 1;
        state
    }

    /// Buffers an item for the feeder thread, with the transfers of its pipe ends; reports a
    /// closed queue, or a permanent failure of earlier puts (once): the item is not buffered
    /// then, and its transfers are given back (after the feeder's lock is let go).
    pub(super) fn push(&self, core: &QueueCore, item: Vec<u8>, unsent: Unsent) -> Result<()> {
        start_feeder();
        let handles = core.feeder_handles();
        let mut state = self.lock();
        let p = Self::entry(&mut state, core, &handles);
        let refused = if p.closed {
            Some(core.closed())
        } else {
            p.failure.take()
        };
        if let Some(refused) = refused {
            drop(state);
            drop(unsent);
            return Err(refused);
        }
        p.used = true;
        p.enqueue(item, unsent);
        if context::in_thread_process() {
            let (items, fed, given) = (core.keys().items.clone(), p.fed.clone(), p.given_total());
            PUT_BY_THIS_THREAD.with(|puts| puts.borrow_mut().insert(items, (fed, given)));
        }
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.changed.notify_all();
        }
        Ok(())
    }

    /// Before a put written at once: a closed queue is an error; the queue counts as used.
    pub(super) fn begin_put(&self, core: &QueueCore) -> Result<()> {
        register_exit_hook();
        let handles = core.feeder_handles();
        let mut state = self.lock();
        let p = Self::entry(&mut state, core, &handles);
        if p.closed {
            return Err(core.closed());
        }
        p.used = true;
        Ok(())
    }

    /// What the feeder was given for `items`'s queue, if anything.
    pub(super) fn queued(&self, items: &str) -> Option<Queued> {
        self.lock().queues.get(items).map(|p| Queued {
            fed: p.fed.clone(),
            total: p.queued_total,
            unwritten: p.unwritten() as u64,
        })
    }

    /// Whether this process closed the queue. The handle then counts among the queue's
    /// (see [`Handles`]), so that the mark stays while it lives.
    pub(super) fn is_closed(&self, core: &QueueCore) -> bool {
        let _handles = core.feeder_handles();
        self.lock()
            .queues
            .get(&core.keys().items)
            .is_some_and(|p| p.closed)
    }

    /// Whether this process called `cancel_join_thread()` on the queue: `join_thread` then
    /// returns at once, as Python's does (its joining finalizer is cancelled).
    pub(super) fn is_join_cancelled(&self, core: &QueueCore) -> bool {
        let _handles = core.feeder_handles();
        self.lock()
            .queues
            .get(&core.keys().items)
            .is_some_and(|p| p.cancelled)
    }

    /// Whether `qsize`/`empty` must report the queue closed: after a use (Python), or at once.
    pub(super) fn closed_for_size(&self, core: &QueueCore, at_once: bool) -> bool {
        let _handles = core.feeder_handles();
        self.lock()
            .queues
            .get(&core.keys().items)
            .is_some_and(|p| p.closed && (at_once || p.used))
    }

    pub(super) fn mark(&self, core: &QueueCore, f: impl FnOnce(&mut Pending)) {
        register_exit_hook();
        let handles = core.feeder_handles();
        f(Self::entry(&mut self.lock(), core, &handles));
        self.changed.notify_all();
    }

    /// `join_thread`: waits until `items`'s queue is written; see the module docs.
    pub(super) fn join(&self, items: &str) -> Result<()> {
        let mut state = self.lock();
        loop {
            if let Some(outcome) = Self::joined(&mut state, items) {
                return outcome;
            }
            state = self.wait(state, Some(Duration::from_millis(100)));
        }
    }

    /// `join`'s outcome if it has one now (`None`: items still to write), without waiting.
    pub(super) fn try_join(&self, items: &str) -> Option<Result<()>> {
        Self::joined(&mut self.lock(), items)
    }

    fn joined(state: &mut FeederState, items: &str) -> Option<Result<()>> {
        let Some(p) = state.queues.get_mut(items) else {
            return Some(Ok(()));
        };
        if let Some(failure) = p.failure.take() {
            return Some(Err(failure));
        }
        if p.is_flushed() {
            return Some(Ok(()));
        }
        if let (Some(since), Some(e)) = (p.failing_since, &p.last_error)
            && since.elapsed() >= JOIN_GIVE_UP
        {
            return Some(Err(e.clone()));
        }
        None
    }

    /// The exit hook: waits (at most [`EXIT_FLUSH`] in all) until every queue whose join was not
    /// cancelled is written or failed, logs what was not written, then forgets this process's
    /// `closed`/`cancelled` marks (a pool worker's next task starts with its queues open).
    ///
    /// In a thread child (a pool worker thread of its driver, which runs the hooks after each
    /// batch of tasks), the queues and their marks are the whole process's, not the child's:
    /// it only waits, as long at most, until the items this thread put are written (so that
    /// they are in Redis before the tasks' results), and leaves every mark as it is.
    fn at_exit(&self) {
        if context::in_thread_process() {
            self.flush_this_thread();
            return;
        }
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
            state = self.wait(
                state,
                Some((deadline - now).min(Duration::from_millis(100))),
            );
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
        // A pool worker's task let its handles go.
        state.pruned = None;
        Self::prune(&mut state, Instant::now());
    }

    /// For a thread child's exit hook: waits (at most [`EXIT_FLUSH`]) until the items this
    /// thread put are written or dropped, and forgets them; the other threads' are not waited
    /// for (the driver's may be failing, or waiting for room in Redis).
    fn flush_this_thread(&self) {
        let puts = PUT_BY_THIS_THREAD.with(|puts| std::mem::take(&mut *puts.borrow_mut()));
        if puts.is_empty() {
            return;
        }
        let deadline = Instant::now() + EXIT_FLUSH;
        let mut state = self.lock();
        loop {
            // A record that is gone, or was made again (its hash differs), had written them.
            let waiting: Vec<&String> = puts
                .iter()
                .filter(|(items, (fed, given))| {
                    state
                        .queues
                        .get(*items)
                        .is_some_and(|p| p.fed == *fed && !p.settled_through(*given))
                })
                .map(|(items, _)| items)
                .collect();
            let now = Instant::now();
            if waiting.is_empty() {
                return;
            }
            if now >= deadline {
                for items in waiting {
                    tracing::error!(
                        "{items}: items this thread put were not written within                          {EXIT_FLUSH:?} of the end of its task"
                    );
                }
                return;
            }
            state = self.wait(
                state,
                Some((deadline - now).min(Duration::from_millis(100))),
            );
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
                    state = self.wait(
                        state,
                        next_retry.map(|at| at.saturating_duration_since(now)),
                    );
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
            let mut unwritten = Vec::new();
            for (sent, outcome) in work.iter().zip(outcomes) {
                if let Some(p) = state.queues.get_mut(&sent.core.keys().items) {
                    unwritten.extend(p.settle(outcome));
                }
            }
            Self::prune(&mut state, Instant::now());
            drop(state);
            self.changed.notify_all();
            // The transfers of the items dropped unwritten go back, off the lock.
            drop(unwritten);
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
                        .key(&sent.fed)
                        .key(&keys.claims)
                        .arg(ttl)
                        .arg(sent.number)
                        .arg(sent.through)
                        .arg(&keys.claim_prefix);
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

thread_local! {
    /// In a thread child: the queues this thread put on since its last exit hook, by items key,
    /// each with its feeder record's hash and the record's [`Pending::given_total`] after the
    /// thread's last put (what its exit hook waits for).
    static PUT_BY_THIS_THREAD: std::cell::RefCell<HashMap<String, (String, u64)>> =
        std::cell::RefCell::new(HashMap::new());
}

/// Starts the feeder thread (once per process).
pub(super) fn start_feeder() {
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

/// Registers the feeder's exit hook (once per process), before the feeder's lock is taken (a
/// hook must not be registered under a lock an exit hook takes).
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
            cached_consumer: Arc::default(),
            cached_handles: Arc::default(),
        }
    }

    #[test]
    fn a_record_goes_with_the_last_handle_once_written_and_a_new_one_has_its_own_hash() {
        let mut state = FeederState::default();
        let (idle, busy, failed) = (core(), core(), core());
        for q in [&idle, &busy, &failed] {
            Feeder::entry(&mut state, q, &q.feeder_handles());
        }
        Feeder::entry(&mut state, &busy, &busy.feeder_handles())
            .enqueue(vec![1], Unsent::default());
        Feeder::entry(&mut state, &failed, &failed.feeder_handles()).failure =
            Some(Error::invalid_state("lost"));
        let old_hash = state.queues[&idle.keys().items].fed.clone();
        let start = Instant::now();
        // A clone is of the same handles: the record stays while it lives.
        let clone = idle.clone();
        drop(idle);
        Feeder::prune(&mut state, start + PRUNE_EVERY);
        assert_eq!(state.queues.len(), 3, "a handle is left");
        // A failure nobody is left to be told of (it was logged) does not keep its record,
        // but the feeder looks at most once per PRUNE_EVERY.
        let failed_items = failed.keys().items.clone();
        drop(failed);
        Feeder::prune(&mut state, start + PRUNE_EVERY);
        assert_eq!(state.queues.len(), 3, "pruned twice within PRUNE_EVERY");
        Feeder::prune(&mut state, start + 2 * PRUNE_EVERY);
        assert_eq!(state.queues.len(), 2);
        assert!(!state.queues.contains_key(&failed_items));
        // Unwritten items keep their record; a written one goes with its last handle.
        drop(busy);
        let items = clone.keys().items.clone();
        // What a handle deserialized later is: the same queue, none of the caches.
        let deserialized = clone.detached();
        drop(clone);
        Feeder::prune(&mut state, start + 3 * PRUNE_EVERY);
        assert_eq!(state.queues.len(), 1, "the busy record stays");
        assert!(!state.queues.contains_key(&items));
        // A handle that comes back makes a new record, with a writer hash of its own.
        let p = Feeder::entry(&mut state, &deserialized, &deserialized.feeder_handles());
        assert_eq!(p.next_batch, 1);
        assert_ne!(p.fed, old_hash);
        Feeder::prune(&mut state, start + 4 * PRUNE_EVERY);
        assert!(state.queues.contains_key(&items), "its handle lives");
    }

    #[test]
    fn an_item_is_settled_once_written_or_dropped_whatever_came_after_it() {
        let q = core();
        let mut state = FeederState::default();
        let p = Feeder::entry(&mut state, &q, &q.feeder_handles());
        p.enqueue(vec![1], Unsent::default());
        let first = p.given_total();
        p.enqueue(vec![2], Unsent::default());
        let second = p.given_total();
        assert_eq!((first, second), (1, 2));
        assert!(!p.settled_through(first));
        assert!(p.next_send().is_some());
        assert!(!p.settled_through(first), "in flight");
        let _ = p.settle(Outcome::Written);
        assert!(p.settled_through(second));
        p.enqueue(vec![3], Unsent::default());
        let third = p.given_total();
        assert!(p.settled_through(second) && !p.settled_through(third));
        let refused = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        let _ = p.settle(Outcome::Permanent(refused));
        assert!(p.settled_through(third), "dropped");
        p.enqueue(vec![4], Unsent::default());
        assert_eq!(p.given_total(), 4, "the dropped one still counts");
        assert!(!p.settled_through(4));
    }

    #[test]
    fn the_exit_hook_forgets_this_process_marks() {
        let q = core();
        FEEDER.begin_put(&q).expect("open");
        FEEDER.mark(&q, |p| p.closed = true);
        FEEDER.mark(&q, |p| p.cancelled = true);
        assert!(FEEDER.is_closed(&q));
        assert!(FEEDER.closed_for_size(&q, false));
        assert!(matches!(FEEDER.begin_put(&q), Err(Error::InvalidState(_))));
        // What a pool worker runs after each task.
        context::run_exit_hooks();
        assert!(!FEEDER.is_closed(&q));
        assert!(!FEEDER.closed_for_size(&q, true));
        FEEDER.begin_put(&q).expect("open again");
    }

    /// A transfer that records whether it was given back.
    #[derive(Debug)]
    struct Recorded(u8, Arc<Mutex<Vec<u8>>>);

    impl shoal_core::transfers::Transfer for Recorded {
        fn give_back(self: Box<Self>) -> Result<()> {
            self.1.lock().expect("record").push(self.0);
            Ok(())
        }
    }

    fn transfer(n: u8, given: &Arc<Mutex<Vec<u8>>>) -> Unsent {
        let given = given.clone();
        let ((), sent) = crate::pipe::collect_transfers(|| {
            shoal_core::transfers::note(Box::new(Recorded(n, given)))
        });
        Unsent::of(sent)
    }

    #[test]
    fn transfers_stay_with_items_written_and_go_back_with_items_dropped_unwritten() {
        let given = Arc::new(Mutex::new(Vec::new()));
        let mut p = Pending::new(&core());
        // Items 0..4; 1 and 3 carry pipe ends. The first batch is written: its transfers stay
        // for the receivers.
        for i in 0..4u8 {
            let unsent = if i % 2 == 1 {
                transfer(i, &given)
            } else {
                Unsent::default()
            };
            p.enqueue(vec![i], unsent);
        }
        assert_eq!(p.transfers.len(), 2, "only the items with pipe ends");
        p.next_send().expect("a batch");
        drop(p.settle(Outcome::Written));
        assert!(p.transfers.is_empty());
        assert!(given.lock().expect("record").is_empty(), "written: kept");
        // A batch that failed transiently may have been written: a permanent failure after it
        // keeps its transfers, and gives back those of the items still buffered.
        p.enqueue(vec![4], transfer(4, &given));
        p.next_send().expect("a batch");
        drop(p.settle(Outcome::Transient(Error::invalid_state("a lost reply"))));
        p.enqueue(vec![5], transfer(5, &given));
        let unwritten = p.settle(Outcome::Permanent(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "wrong type",
        ))));
        assert_eq!(unwritten.len(), 1);
        assert!(
            given.lock().expect("record").is_empty(),
            "given back only once the feeder's lock is let go"
        );
        drop(unwritten);
        assert_eq!(*given.lock().expect("record"), vec![5]);
        assert!(p.transfers.is_empty());
        // The ordinals go on from what was written: a batch refused at its first attempt gives
        // its transfers back.
        p.enqueue(vec![6], transfer(6, &given));
        p.next_send().expect("a batch");
        drop(p.settle(Outcome::Permanent(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "gone",
        )))));
        assert_eq!(*given.lock().expect("record"), vec![5, 6]);
    }

    #[test]
    fn batches_are_numbered_in_order_and_bounded() {
        let mut p = Pending::new(&core());
        for i in 0..(FEED_BATCH + 5) {
            p.enqueue(vec![i as u8], Unsent::default());
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
        big.enqueue(vec![0; FEED_BATCH_BYTES], Unsent::default());
        big.enqueue(vec![0; 1], Unsent::default());
        assert_eq!(big.next_send().expect("one").items.len(), 1);
    }
}
