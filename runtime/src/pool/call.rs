//! One call on a pool (`map`, `imap`, `apply_async`...): its shared state, its feeder, and the
//! typed handles a caller holds ([`AsyncResult`], [`IMapIterator`]).
//!
//! # Flow control
//!
//! A call keeps at most `window` chunks in flight: sent to the task stream and not yet
//! released. A chunk is released when its result reaches the supervisor (`map`, `apply`:
//! results are collected anyway) or when the caller takes it from the iterator (`imap`,
//! `imap_unordered`: a slow consumer slows the feeder down). The feeder thread pulls the
//! caller's iterator only when there is room, so `imap` over a million items holds a window's
//! worth of items and results, and yields its first result before the last item is read.
//!
//! # Results
//!
//! A chunk's results come back as MessagePack arrays (one per part of a long chunk; see
//! `shoal_executor::pool`). A collected call's handle ([`AsyncResult`]) decodes them on the
//! caller's side as they arrive (its `get()` wakes every [`DECODE_EVERY`] results, or an async
//! caller's task is woken), so that the results are typed by the time the last chunk is in; the
//! first `get()` moves that value out, and a later `get()` decodes the kept arrays again (a
//! result is not `Clone`). `imap` decodes one chunk when its iterator takes it. The feeder
//! sends its first chunk alone, at once, then doubles its batches up to a quarter of the window
//! (at most [`MAX_BATCH`]).
//!
//! # A failing input
//!
//! The caller's iterator runs on the feeder thread, behind [`GuardedInput`]: when it panics (or
//! an item cannot be encoded), the feeder sends the items read before, as their chunks, and
//! ends the call's input with that error. The call then delivers those items' results first and
//! the error last, as Python's `imap` re-raises the iterator's exception after the results
//! before it; nothing waits for items that will never come.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::Addr;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_core::codec::{ArrayReader, ArrayWriter};
use shoal_core::error::{Error, Result, TaskError};
use shoal_core::registry::panic_message;
use shoal_core::store::Store;
use shoal_executor::pool::{ChunkEntry, PoolKeys};

use super::supervisor::{CancelCall, FeedDone, FeedFailed, PoolSupervisor};

/// How a call's results reach its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// All at once, in order (`map`, `starmap`, `apply` and their async forms).
    Collect,
    /// One chunk at a time, in order (`imap`).
    Ordered,
    /// One chunk at a time, as they arrive (`imap_unordered`).
    Unordered,
}

/// The results of one chunk.
#[derive(Clone, Debug)]
pub(crate) struct ChunkResult {
    /// The results of the items that succeeded: MessagePack arrays, in order.
    pub(crate) outputs: Vec<Vec<u8>>,
    /// How many results `outputs` holds.
    pub(crate) count: u64,
    /// The item that failed (the rest of the chunk did not run).
    pub(crate) failure: Option<TaskError>,
}

/// A collected call's results that reached the caller's side: chunk index → its arrays.
pub(crate) type Arrived = Vec<(u64, Vec<Vec<u8>>)>;

/// A collected call's caller is woken when this many results arrived since it last took them
/// (and when the call completes), to decode them while the rest runs.
pub(crate) const DECODE_EVERY: u64 = 4096;

/// State shared by the caller's handle, the feeder and the supervisor.
pub(crate) struct CallShared {
    state: Mutex<CallState>,
    /// The caller's side: an outcome, results to decode, a chunk to yield.
    changed: Condvar,
    /// The feeder's side: room in the window, or feeding must stop.
    room: Condvar,
    /// Async callers waiting for a change (registered while the state lock is held, woken
    /// after every change).
    wakers: Mutex<Vec<std::task::Waker>>,
}

#[derive(Default)]
struct CallState {
    window: usize,
    in_flight: usize,
    /// The feeder waits for room (so a released chunk must wake it).
    feeder_waiting: bool,
    /// Feeding must stop: the call is complete, failed, or its caller went away.
    cancelled: bool,
    /// Every chunk was sent; this many.
    total: Option<usize>,
    /// `Collect`: the outcome, once known (the results are in `arrived` or were taken).
    outcome: Option<Result<()>>,
    /// `Collect`: results arrived and not yet taken by the caller's handle.
    arrived: Arrived,
    /// `Collect`: how many results `arrived` holds.
    arrived_count: u64,
    /// Streaming: chunks received and not yet taken.
    ready: BTreeMap<usize, ChunkResult>,
    /// Streaming: chunks taken.
    taken: usize,
    /// Streaming, ordered: the next chunk to yield.
    next: usize,
    /// Streaming: the call ended without all its chunks (pool terminated or broken).
    ended: Option<Error>,
    /// Streaming: the input failed after the chunks sent; yielded after the last of them.
    input_error: Option<Error>,
}

impl CallShared {
    pub(crate) fn new(window: usize) -> Arc<CallShared> {
        Arc::new(CallShared {
            state: Mutex::new(CallState {
                window: window.max(1),
                ..CallState::default()
            }),
            changed: Condvar::new(),
            room: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, CallState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter, blocking and async, after a change.
    fn notify(&self) {
        self.changed.notify_all();
        self.room.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in wakers {
            waker.wake();
        }
    }

    /// Registers `waker` for the next change; called with the state lock held, so that a
    /// change cannot slip between the check and the registration.
    fn register(&self, _held: &MutexGuard<'_, CallState>, waker: &std::task::Waker) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// `Collect`: takes the results that arrived, with the outcome if known; registers `waker`
    /// when the outcome is not known.
    fn poll_arrived(&self, waker: &std::task::Waker) -> (Arrived, Option<Result<()>>) {
        let mut s = self.lock();
        let taken = Self::take_arrived(&mut s);
        if taken.1.is_none() {
            self.register(&s, waker);
        }
        taken
    }

    fn take_arrived(s: &mut CallState) -> (Arrived, Option<Result<()>>) {
        s.arrived_count = 0;
        (std::mem::take(&mut s.arrived), s.outcome.clone())
    }

    /// `Collect`: waits until the outcome is known or [`DECODE_EVERY`] results arrived, at most
    /// until `deadline`.
    fn wait_arrivals(&self, deadline: Option<Instant>) {
        let mut s = self.lock();
        while s.outcome.is_none() && s.arrived_count < DECODE_EVERY {
            s = match deadline {
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    self.changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// `Collect`: takes the results that arrived, with the outcome if known.
    fn take_arrivals(&self) -> (Arrived, Option<Result<()>>) {
        Self::take_arrived(&mut self.lock())
    }

    /// Streaming: the next chunk without waiting: `Ready(None)` at the end; `Pending` (and
    /// `waker` registered) when nothing is there yet.
    fn poll_chunk(
        &self,
        ordered: bool,
        waker: &std::task::Waker,
    ) -> std::task::Poll<Option<std::result::Result<ChunkResult, Error>>> {
        let mut s = self.lock();
        match self.try_take(&mut s, ordered) {
            Some(taken) => std::task::Poll::Ready(taken),
            None => {
                self.register(&s, waker);
                std::task::Poll::Pending
            }
        }
    }

    /// Streaming: takes the next chunk if it is there (`Some(Some(Ok))`), or the end
    /// (`Some(None)`) or the error that ends the call (`Some(Some(Err))`); `None`: wait.
    fn try_take(
        &self,
        s: &mut MutexGuard<'_, CallState>,
        ordered: bool,
    ) -> Option<Option<std::result::Result<ChunkResult, Error>>> {
        let taken = if ordered {
            let next = s.next;
            s.ready.remove(&next).inspect(|_| s.next += 1)
        } else {
            s.ready.pop_first().map(|(_, r)| r)
        };
        if let Some(chunk) = taken {
            s.taken += 1;
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.feeder_waiting {
                // Room for the feeder: wake it (the lock is held; it re-checks).
                self.room.notify_all();
            }
            return Some(Some(Ok(chunk)));
        }
        if s.total.is_some_and(|total| s.taken >= total) {
            // The input's failure comes after the results of the items read before it.
            return Some(s.input_error.take().map(Err));
        }
        if let Some(error) = s.ended.take() {
            // Yield the error once; the iterator ends after it.
            s.total = Some(s.taken);
            return Some(Some(Err(error)));
        }
        None
    }

    /// Feeder: waits for room; `None` when feeding must stop.
    fn wait_for_room(&self) -> Option<usize> {
        let mut guard = self.lock();
        while !guard.cancelled && guard.in_flight >= guard.window {
            guard.feeder_waiting = true;
            guard = self.room.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        guard.feeder_waiting = false;
        if guard.cancelled {
            None
        } else {
            Some(guard.window - guard.in_flight)
        }
    }

    /// The most chunks a feeder sends at once (see [`MAX_BATCH`]).
    fn batch_limit(&self) -> usize {
        (self.lock().window / 4).clamp(MIN_BATCH, MAX_BATCH)
    }

    /// Feeder: `n` chunks are about to be sent (counted first, so that a fast result can never
    /// release a chunk that was not counted).
    fn reserve(&self, n: usize) {
        self.lock().in_flight += n;
    }

    /// Feeder: every chunk was sent; `input_error` when the input failed after them.
    pub(crate) fn set_total(&self, total: usize, input_error: Option<Error>) {
        let mut s = self.lock();
        s.total = Some(total);
        s.input_error = input_error;
        drop(s);
        self.notify();
    }

    /// Supervisor (`Collect`): `n` chunks' outcomes arrived (room for the feeder).
    pub(crate) fn release(&self, n: usize) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(n);
        if s.feeder_waiting {
            self.room.notify_all();
        }
    }

    /// Supervisor (`Collect`): a chunk's results, for the caller to decode; the caller is woken
    /// once [`DECODE_EVERY`] results are waiting.
    pub(crate) fn arrive(&self, chunk: u64, outputs: Vec<Vec<u8>>, count: u64) {
        let mut s = self.lock();
        s.arrived.push((chunk, outputs));
        s.arrived_count += count;
        let wake = s.arrived_count >= DECODE_EVERY;
        drop(s);
        if wake {
            self.notify_caller();
        }
    }

    /// Wakes the caller's side only.
    fn notify_caller(&self) {
        self.changed.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in wakers {
            waker.wake();
        }
    }

    /// Supervisor (`Collect`): the outcome, with results not handed over yet; stops the feeder.
    pub(crate) fn complete(&self, outcome: Result<()>, arrived: Arrived) {
        let mut s = self.lock();
        s.cancelled = true;
        if s.outcome.is_none() {
            s.outcome = Some(outcome);
            s.arrived.extend(arrived);
        }
        drop(s);
        self.notify();
    }

    /// Supervisor (streaming): a chunk's result arrived.
    pub(crate) fn push(&self, chunk: usize, result: ChunkResult) {
        self.lock().ready.insert(chunk, result);
        self.notify();
    }

    /// Supervisor: the call cannot finish (pool terminated or broken).
    pub(crate) fn end(&self, error: Error) {
        let mut s = self.lock();
        s.cancelled = true;
        if s.outcome.is_none() {
            s.outcome = Some(Err(error.clone()));
            s.arrived.clear();
        }
        s.ended.get_or_insert(error);
        drop(s);
        self.notify();
    }

    /// Caller: stop feeding (the iterator was dropped).
    fn cancel(&self) {
        self.lock().cancelled = true;
        self.notify();
    }

    fn is_ready(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Waits for the `Collect` outcome; false on timeout.
    fn wait_outcome(&self, timeout: Option<Duration>) -> bool {
        let guard = self.lock();
        let ready = |s: &mut CallState| s.outcome.is_none();
        match timeout {
            None => self
                .changed
                .wait_while(guard, ready)
                .map(|g| g.outcome.is_some())
                .unwrap_or(true),
            Some(t) => self
                .changed
                .wait_timeout_while(guard, t, ready)
                .map(|(g, _)| g.outcome.is_some())
                .unwrap_or(true),
        }
    }

    fn outcome(&self) -> Option<Result<()>> {
        self.lock().outcome.clone()
    }

    /// Caller (streaming): the next chunk, `Ok(None)` at the end, `Err(Timeout)` after
    /// `timeout`.
    fn take_chunk(
        &self,
        ordered: bool,
        timeout: Option<Duration>,
    ) -> Result<Option<std::result::Result<ChunkResult, Error>>> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut s = self.lock();
        loop {
            if let Some(taken) = self.try_take(&mut s, ordered) {
                return Ok(taken);
            }
            s = match deadline {
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout(timeout.unwrap_or_default()));
                    }
                    self.changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

/// Most chunks sent in one pipeline: a quarter of the call's window, within these bounds. Workers
/// blocked in `XREADGROUP` share a batch, each taking as many as it asks for.
const MIN_BATCH: usize = 64;
const MAX_BATCH: usize = 1024;
/// A batch is sent once its chunks hold this many bytes, however few they are: large chunks go
/// one by one, as soon as each is encoded, so that workers start on them while the next are.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// What a feeder needs.
pub(crate) struct Feeder {
    pub(crate) store: Arc<Store>,
    pub(crate) keys: PoolKeys,
    pub(crate) call: u64,
    pub(crate) function: String,
    pub(crate) chunksize: usize,
    pub(crate) shared: Arc<CallShared>,
    pub(crate) supervisor: Addr<PoolSupervisor>,
}

impl Feeder {
    /// Sends the items (argument tuples) on a thread of their own.
    pub(crate) fn spawn<A, I>(self, items: I) -> Result<()>
    where
        A: Serialize,
        I: Iterator<Item = Result<A>> + Send + 'static,
    {
        std::thread::Builder::new()
            .name("shoal-feeder".into())
            .stack_size(256 * 1024)
            .spawn(move || self.run(items))
            .map(|_| ())
            .map_err(|e| Error::io("starting a feeder thread", e))
    }

    /// Sends the items on this thread.
    pub(crate) fn run<A, I>(self, mut items: I)
    where
        A: Serialize,
        I: Iterator<Item = Result<A>>,
    {
        match self.feed(&mut items) {
            Ok(Some((total, input_error))) => {
                self.shared.set_total(total, input_error.clone());
                self.supervisor.do_send(FeedDone {
                    call: self.call,
                    total: total as u64,
                    input_error,
                });
            }
            // Cancelled: the supervisor already knows.
            Ok(None) => {}
            Err(error) => self.supervisor.do_send(FeedFailed {
                call: self.call,
                error,
            }),
        }
    }

    /// Returns the number of chunks sent and the input's failure, if it failed part way; `None`
    /// when the call was cancelled; `Err` when Redis failed. Each chunk's items are encoded
    /// straight into its arguments array. The first chunk is sent alone, as soon as it is read,
    /// so that a worker starts on it while the next are encoded; batches then double up to a
    /// quarter of the window (64 to [`MAX_BATCH`] chunks, or [`MAX_BATCH_BYTES`]).
    fn feed<A, I>(&self, items: &mut I) -> Result<Option<(usize, Option<Error>)>>
    where
        A: Serialize,
        I: Iterator<Item = Result<A>>,
    {
        let limit = self.store.settings().max_message_bytes;
        let function = self.function.as_str();
        let mut chunk = 0usize;
        let mut input_error = None;
        let mut exhausted = false;
        let mut refreshed: Option<Instant> = None;
        let mut batch_size = 1;
        let batch_limit = self.shared.batch_limit();
        // Room for a chunk's arguments: as much as the last chunk took.
        let mut chunk_bytes = 0;
        while !exhausted {
            let Some(room) = self.shared.wait_for_room() else {
                return Ok(None);
            };
            let mut batch: Vec<ChunkEntry> = Vec::new();
            let mut batch_bytes = 0;
            while batch.len() < room.min(batch_size) && batch_bytes < MAX_BATCH_BYTES {
                let mut args = ArrayWriter::payload_with_capacity(chunk_bytes);
                while (args.len() as usize) < self.chunksize {
                    match items.next() {
                        Some(Ok(item)) => {
                            if let Err(e) =
                                args.push(&item, limit, || format!("arguments of {function}"))
                            {
                                // The input ends here, as with an iterator that fails.
                                input_error = Some(e);
                                exhausted = true;
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            input_error = Some(e);
                            exhausted = true;
                            break;
                        }
                        None => {
                            exhausted = true;
                            break;
                        }
                    }
                }
                if args.is_empty() {
                    break;
                }
                if args.byte_len() > limit {
                    return Err(Error::TooLarge {
                        key: self.keys.tasks.clone(),
                        size: args.byte_len(),
                        limit,
                    });
                }
                batch_bytes += args.byte_len();
                chunk_bytes = args.byte_len();
                batch.push(ChunkEntry {
                    call: self.call,
                    chunk: chunk as u64,
                    function: self.function.clone(),
                    payload: args.finish(),
                    first_item: (chunk as u64).saturating_mul(self.chunksize as u64),
                });
                chunk += 1;
                if exhausted {
                    break;
                }
            }
            if batch.is_empty() {
                break;
            }
            self.shared.reserve(batch.len());
            // The streams' TTL is refreshed at most once a second, not per batch.
            let refresh = refreshed.is_none_or(|t| t.elapsed() >= TTL_REFRESH);
            send_chunks(&self.store, &self.keys, &batch, refresh)?;
            if refresh {
                refreshed = Some(Instant::now());
            }
            batch_size = (batch_size * 2).min(batch_limit);
        }
        Ok(Some((chunk, input_error)))
    }
}

/// The caller's input, read so that a panic in its iterator ends the input with
/// [`Error::Input`] instead of killing the thread that reads it. Nothing is read after a
/// failure.
pub(crate) struct GuardedInput<I> {
    inner: I,
    failed: bool,
}

impl<I> GuardedInput<I> {
    pub(crate) fn new(inner: I) -> Self {
        GuardedInput {
            inner,
            failed: false,
        }
    }
}

impl<I: Iterator> Iterator for GuardedInput<I> {
    type Item = Result<I::Item>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.next())) {
            Ok(item) => item.map(Ok),
            Err(payload) => {
                self.failed = true;
                Some(Err(Error::Input(format!(
                    "its iterator panicked: {}",
                    panic_message(payload.as_ref())
                ))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.failed {
            (0, Some(0))
        } else {
            self.inner.size_hint()
        }
    }
}

/// How often a feeder refreshes the streams' TTL.
const TTL_REFRESH: Duration = Duration::from_secs(1);

/// Sends chunks in one pipeline (one round trip), refreshing the streams' TTL if asked. When
/// Redis cannot be reached the send is repeated (see `Store::retry_unreachable`): a chunk added
/// twice runs twice and its outcome is kept once. Several chunks are added in one
/// `MULTI`/`EXEC`: a worker blocked in `XREADGROUP` is then served once, with as many of them as
/// it asked for, rather than once per chunk (which would cost a read and an acknowledgement per
/// chunk when many workers wait).
pub(crate) fn send_chunks(
    store: &Store,
    keys: &PoolKeys,
    chunks: &[ChunkEntry],
    refresh_ttl: bool,
) -> Result<()> {
    store.retry_unreachable(|| send_chunks_once(store, keys, chunks, refresh_ttl))
}

fn send_chunks_once(
    store: &Store,
    keys: &PoolKeys,
    chunks: &[ChunkEntry],
    refresh_ttl: bool,
) -> Result<()> {
    store.with_conn(
        || format!("sending chunks to {}", keys.tasks),
        |c| {
            let mut pipe = redis::pipe();
            if chunks.len() > 1 {
                pipe.atomic();
            }
            for chunk in chunks {
                chunk.add_to(&mut pipe, keys);
            }
            if refresh_ttl {
                pipe.expire(&keys.tasks, store.expiry_secs() as i64)
                    .ignore();
                pipe.expire(&keys.results, store.expiry_secs() as i64)
                    .ignore();
            }
            pipe.query::<()>(c)
        },
    )
}

/// Decodes a collected call's results (arrays, in order) into its result type: those of one
/// chunk, or of all of them.
pub(crate) type Decoder<R> = Arc<dyn Fn(&[Vec<u8>]) -> Result<R> + Send + Sync>;

/// Puts the values of a collected call's chunks together, in chunk order.
pub(crate) type Merger<R> = fn(Vec<R>) -> Result<R>;

/// The caller's side of a collected call's results.
struct Gathered<R> {
    /// Each chunk's decoded results, until the first `get()` moves them out.
    typed: BTreeMap<u64, R>,
    /// The first decoding failure, by chunk.
    decode_error: Option<(u64, Error)>,
    /// Each chunk's results as they came, for a later `get()`.
    kept: BTreeMap<u64, Vec<Vec<u8>>>,
    /// The first `get()` took the typed results.
    moved: bool,
}

/// Decodes every chunk of `arrived` (in chunk order) and puts them together.
pub(crate) fn decode_all<R>(
    decode: &Decoder<R>,
    merge: Merger<R>,
    arrived: &[(u64, Vec<Vec<u8>>)],
) -> Result<R> {
    let parts = arrived
        .iter()
        .map(|(_, arrays)| decode(arrays))
        .collect::<Result<Vec<R>>>()?;
    merge(parts)
}

/// The result of an asynchronous call (`apply_async`, `map_async`, `starmap_async`), Python's
/// `AsyncResult`. It decodes the results as they arrive (while `get()` waits, or when an awaiting
/// task is woken), so the first `get()` hands over a value already built and moves it out; a
/// later `get()` decodes the results again.
///
/// `AsyncResult<R>` is `Send` and `Sync` when `R` is `Send` (it holds the decoded results).
pub struct AsyncResult<R> {
    shared: Arc<CallShared>,
    decode: Decoder<R>,
    merge: Merger<R>,
    gathered: Mutex<Gathered<R>>,
    supervisor: Addr<PoolSupervisor>,
    call: u64,
}

impl<R> std::fmt::Debug for AsyncResult<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish()
    }
}

impl<R> AsyncResult<R> {
    pub(crate) fn new(
        shared: Arc<CallShared>,
        decode: Decoder<R>,
        merge: Merger<R>,
        supervisor: Addr<PoolSupervisor>,
        call: u64,
    ) -> Self {
        AsyncResult {
            shared,
            decode,
            merge,
            gathered: Mutex::new(Gathered {
                typed: BTreeMap::new(),
                decode_error: None,
                kept: BTreeMap::new(),
                moved: false,
            }),
            supervisor,
            call,
        }
    }

    fn gathered(&self) -> MutexGuard<'_, Gathered<R>> {
        self.gathered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes the results that arrived; with the outcome, the call's result. Called with the
    /// `gathered` lock held from the moment they were taken, so that whoever sees the outcome
    /// has every result before it.
    fn absorb(
        &self,
        g: &mut Gathered<R>,
        (arrived, outcome): (Arrived, Option<Result<()>>),
    ) -> Option<Result<R>> {
        for (chunk, arrays) in arrived {
            if !g.moved {
                match (self.decode)(&arrays) {
                    Ok(value) => {
                        g.typed.insert(chunk, value);
                    }
                    Err(e) => {
                        if g.decode_error.as_ref().is_none_or(|(c, _)| chunk < *c) {
                            g.decode_error = Some((chunk, e));
                        }
                    }
                }
            }
            g.kept.insert(chunk, arrays);
        }
        let outcome = outcome?;
        Some(outcome.and_then(|()| {
            if let Some((_, e)) = &g.decode_error {
                return Err(e.clone());
            }
            if !g.moved {
                g.moved = true;
                return (self.merge)(std::mem::take(&mut g.typed).into_values().collect());
            }
            // A later get(): the value was moved out; decode the results again.
            let parts = g
                .kept
                .values()
                .map(|arrays| (self.decode)(arrays))
                .collect::<Result<Vec<R>>>()?;
            (self.merge)(parts)
        }))
    }

    /// Cancels the call if it has not completed: its items that did not start are not run, its
    /// running tasks see `shoal::termination_requested()` (a worker that does not stop within
    /// the task lease is replaced), and `get()` returns [`Error::Cancelled`]; `error_callback`
    /// runs with it. Does nothing once the call completed. The pool stays usable.
    pub fn cancel(&self) {
        if !self.ready() {
            self.supervisor.do_send(CancelCall {
                call: self.call,
                error: Error::Cancelled("cancel() was called".into()),
            });
        }
    }

    /// The result, waiting for it at most `timeout` ([`Error::Timeout`] then). The call's
    /// failure is returned as its error: [`Error::Task`] for a panic or a crash (the first
    /// failing item, in item order, for a map). Can be called again.
    pub fn get(&self, timeout: Option<Duration>) -> Result<R> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            self.shared.wait_arrivals(deadline);
            let mut g = self.gathered();
            let taken = self.shared.take_arrivals();
            if let Some(result) = self.absorb(&mut g, taken) {
                return result;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::Timeout(timeout.unwrap_or_default()));
            }
        }
    }

    /// Waits until the result is ready, at most `timeout`.
    pub fn wait(&self, timeout: Option<Duration>) {
        self.shared.wait_outcome(timeout);
    }

    /// Whether the call has completed.
    pub fn ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Whether the call completed without failing; [`Error::InvalidState`] before it is ready
    /// (Python's `ValueError`).
    pub fn successful(&self) -> Result<bool> {
        match self.shared.outcome() {
            Some(outcome) => Ok(outcome.is_ok()),
            None => Err(Error::invalid_state("the result is not ready")),
        }
    }

    /// The result if the call completed; else `waker` is woken when there is news.
    fn poll_result(&self, waker: &std::task::Waker) -> std::task::Poll<Result<R>> {
        let mut g = self.gathered();
        let taken = self.shared.poll_arrived(waker);
        match self.absorb(&mut g, taken) {
            Some(result) => std::task::Poll::Ready(result),
            None => std::task::Poll::Pending,
        }
    }
}

impl<R> AsyncResult<R> {
    /// The result as a future, for async code: it resolves when the call completes, on any
    /// executor (the pool's supervisor wakes it; no thread waits). Dropping it before it
    /// resolves does not cancel the call (see [`AsyncResult::cancel`]). `.await` on the
    /// `AsyncResult` itself does the same.
    pub fn wait_async(&self) -> AsyncResultFuture<'_, R> {
        AsyncResultFuture { result: self }
    }
}

/// The future of [`AsyncResult::wait_async`] (and of `.await` on an [`AsyncResult`]).
#[must_use = "futures do nothing unless awaited"]
pub struct AsyncResultFuture<'a, R> {
    result: &'a AsyncResult<R>,
}

impl<R> std::fmt::Debug for AsyncResultFuture<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResultFuture").finish_non_exhaustive()
    }
}

impl<R> std::future::Future for AsyncResultFuture<'_, R> {
    type Output = Result<R>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<R>> {
        self.result.poll_result(cx.waker())
    }
}

/// `.await` an [`AsyncResult`] for its outcome. The call is owned by the future: dropping it
/// before it resolves cancels the call (a request that timed out or whose client went away
/// stops its work: see [`AsyncResult::cancel`]).
impl<R> std::future::IntoFuture for AsyncResult<R> {
    type Output = Result<R>;
    type IntoFuture = AsyncCall<R>;

    fn into_future(self) -> AsyncCall<R> {
        AsyncCall {
            result: self,
            done: false,
        }
    }
}

/// An [`AsyncResult`] being awaited; dropping it before it resolves cancels the call.
#[must_use = "futures do nothing unless awaited"]
pub struct AsyncCall<R> {
    result: AsyncResult<R>,
    done: bool,
}

impl<R> std::fmt::Debug for AsyncCall<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncCall")
            .field("done", &self.done)
            .finish()
    }
}

// Nothing in an `AsyncCall` is pinned in place: its state is behind the `AsyncResult`'s lock.
impl<R> Unpin for AsyncCall<R> {}

impl<R> std::future::Future for AsyncCall<R> {
    type Output = Result<R>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<R>> {
        let this = self.get_mut();
        let polled = this.result.poll_result(cx.waker());
        if polled.is_ready() {
            this.done = true;
        }
        polled
    }
}

impl<R> Drop for AsyncCall<R> {
    fn drop(&mut self) {
        if !self.done {
            self.result.cancel();
        }
    }
}

/// The decoder of a collected `map`: every result as a `T`.
pub(crate) fn decode_each<T: DeserializeOwned>(function: &str) -> Decoder<Vec<T>> {
    let function = function.to_string();
    Arc::new(move |arrays: &[Vec<u8>]| {
        let key = || format!("results of {function}");
        let count = arrays
            .iter()
            .map(|a| shoal_core::codec::array_len(a).unwrap_or(0) as usize)
            .sum();
        let mut values = Vec::with_capacity(count);
        for array in arrays {
            let mut reader = ArrayReader::array(array, key)?;
            while reader.remaining() > 0 {
                values.push(reader.next(key)?);
            }
        }
        Ok(values)
    })
}

/// Puts a `map`'s chunks together (moved, not copied, when there is one).
pub(crate) fn merge_each<T>(parts: Vec<Vec<T>>) -> Result<Vec<T>> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().flatten().collect());
    }
    let mut values = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for part in parts {
        values.extend(part);
    }
    Ok(values)
}

/// The decoder of a collected `apply`: the single result as a `T`.
pub(crate) fn decode_one<T: DeserializeOwned>(function: &str) -> Decoder<T> {
    let function = function.to_string();
    Arc::new(move |arrays: &[Vec<u8>]| {
        let key = || format!("result of {function}");
        for array in arrays {
            let mut reader = ArrayReader::array(array, key)?;
            if reader.remaining() > 0 {
                return reader.next(key);
            }
        }
        Err(Error::invalid_state(format!("{}: no output", key())))
    })
}

/// An `apply` has one chunk.
pub(crate) fn merge_one<T>(parts: Vec<T>) -> Result<T> {
    parts
        .into_iter()
        .next()
        .ok_or_else(|| Error::invalid_state("the call has no result"))
}

/// Decodes a chunk's results for an iterator: one entry per result (a result that does not
/// decode is its error).
fn decode_chunk<T: DeserializeOwned>(arrays: &[Vec<u8>], key: &str) -> VecDeque<Result<T>> {
    let mut values = VecDeque::new();
    for array in arrays {
        match ArrayReader::array(array, || key.to_string()) {
            Ok(mut reader) => {
                while reader.remaining() > 0 {
                    values.push_back(reader.next(|| key.to_string()));
                }
            }
            Err(e) => values.push_back(Err(e)),
        }
    }
    values
}

/// The iterator of `imap` (ordered) and `imap_unordered`: one `Result` per item. An item that
/// failed yields its error; the items after it in its chunk did not run (as in Python, where an
/// exception ends a chunk), and the iteration goes on with the next chunk. Dropping the iterator
/// stops feeding the call.
pub struct IMapIterator<T> {
    shared: Arc<CallShared>,
    ordered: bool,
    current: VecDeque<Result<T>>,
    pending_failure: Option<TaskError>,
    key: String,
    finished: bool,
    cancel: Option<(Addr<PoolSupervisor>, u64)>,
}

impl<T> std::fmt::Debug for IMapIterator<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IMapIterator")
            .field("ordered", &self.ordered)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<T: DeserializeOwned> IMapIterator<T> {
    pub(crate) fn new(
        shared: Arc<CallShared>,
        ordered: bool,
        function: &str,
        supervisor: Addr<PoolSupervisor>,
        call: u64,
    ) -> Self {
        IMapIterator {
            shared,
            ordered,
            current: VecDeque::new(),
            pending_failure: None,
            key: format!("results of {function}"),
            finished: false,
            cancel: Some((supervisor, call)),
        }
    }

    /// The next item, waiting at most `timeout` for it: `Some(Err(Error::Timeout))` when it did
    /// not come (Python's `next(timeout)`); the iteration can go on after a timeout.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<T>> {
        self.advance(Some(timeout))
    }

    fn advance(&mut self, timeout: Option<Duration>) -> Option<Result<T>> {
        loop {
            if let Some(value) = self.current.pop_front() {
                return Some(value);
            }
            if let Some(failure) = self.pending_failure.take() {
                return Some(Err(Error::Task(failure)));
            }
            if self.finished {
                return None;
            }
            match self.shared.take_chunk(self.ordered, timeout) {
                Ok(Some(Ok(chunk))) => {
                    self.current = decode_chunk(&chunk.outputs, &self.key);
                    self.pending_failure = chunk.failure;
                }
                Ok(Some(Err(error))) => {
                    self.finished = true;
                    return Some(Err(error));
                }
                Ok(None) => {
                    self.finished = true;
                    self.cancel = None;
                    return None;
                }
                Err(timeout) => return Some(Err(timeout)),
            }
        }
    }
}

impl<T> IMapIterator<T> {
    /// The same results as an async [`Stream`](futures::Stream), for async code: no thread waits
    /// (the pool's supervisor wakes the task), on any executor. Dropping it stops the call as
    /// dropping the iterator does.
    pub fn into_stream(self) -> IMapStream<T> {
        IMapStream(self)
    }
}

/// `imap`'s results as an async stream ([`IMapIterator::into_stream`]).
pub struct IMapStream<T>(IMapIterator<T>);

impl<T> std::fmt::Debug for IMapStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("IMapStream").field(&self.0).finish()
    }
}

// The decoded items waiting in the iterator are never pinned.
impl<T> Unpin for IMapStream<T> {}

impl<T: DeserializeOwned> futures::Stream for IMapStream<T> {
    type Item = Result<T>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<T>>> {
        use std::task::Poll;
        let this = &mut self.get_mut().0;
        loop {
            if let Some(value) = this.current.pop_front() {
                return Poll::Ready(Some(value));
            }
            if let Some(failure) = this.pending_failure.take() {
                return Poll::Ready(Some(Err(Error::Task(failure))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.shared.poll_chunk(this.ordered, cx.waker()) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.current = decode_chunk(&chunk.outputs, &this.key);
                    this.pending_failure = chunk.failure;
                }
                Poll::Ready(Some(Err(error))) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    this.finished = true;
                    this.cancel = None;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: DeserializeOwned> Iterator for IMapIterator<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        self.advance(None)
    }
}

impl<T> Drop for IMapIterator<T> {
    fn drop(&mut self) {
        if let Some((supervisor, call)) = self.cancel.take() {
            self.shared.cancel();
            supervisor.do_send(CancelCall {
                call,
                error: Error::Cancelled("its iterator or stream was dropped".into()),
            });
        }
    }
}
