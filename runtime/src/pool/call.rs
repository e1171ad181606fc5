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
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;
use shoal_core::codec;
use shoal_core::error::{Error, Result, TaskError};
use shoal_core::registry::panic_message;
use shoal_core::store::Store;
use shoal_executor::pool::{ChunkEntry, PoolKeys, encode_items};

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
    /// Encoded results of the items that succeeded.
    pub(crate) outputs: Vec<ByteBuf>,
    /// The item that failed (the rest of the chunk did not run).
    pub(crate) failure: Option<TaskError>,
}

/// State shared by the caller's handle, the feeder and the supervisor.
pub(crate) struct CallShared {
    state: Mutex<CallState>,
    changed: Condvar,
    /// Async callers waiting for a change (registered while the state lock is held, woken
    /// after every change).
    wakers: Mutex<Vec<std::task::Waker>>,
}

#[derive(Default)]
struct CallState {
    window: usize,
    in_flight: usize,
    /// Feeding must stop: the call is complete, failed, or its caller went away.
    cancelled: bool,
    /// Every chunk was sent; this many.
    total: Option<usize>,
    /// `Collect`: the outcome, once known.
    outcome: Option<Result<Vec<ByteBuf>>>,
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
            wakers: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, CallState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter, blocking and async, after a change.
    fn notify(&self) {
        self.changed.notify_all();
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

    /// The `Collect` outcome if known, else registers `waker`.
    fn poll_outcome(&self, waker: &std::task::Waker) -> Option<Result<Vec<ByteBuf>>> {
        let s = self.lock();
        match &s.outcome {
            Some(outcome) => Some(outcome.clone()),
            None => {
                self.register(&s, waker);
                None
            }
        }
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
            // Room for the feeder: wake it (the lock is held; the waiters re-check).
            self.changed.notify_all();
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
        let guard = self.lock();
        let guard = self
            .changed
            .wait_while(guard, |s| !s.cancelled && s.in_flight >= s.window)
            .unwrap_or_else(|p| p.into_inner());
        if guard.cancelled {
            None
        } else {
            Some(guard.window - guard.in_flight)
        }
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

    /// Supervisor (`Collect`): a chunk's result arrived.
    pub(crate) fn release(&self, n: usize) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(n);
        drop(s);
        self.notify();
    }

    /// Supervisor (`Collect`): the outcome; stops the feeder.
    pub(crate) fn complete(&self, outcome: Result<Vec<ByteBuf>>) {
        let mut s = self.lock();
        s.cancelled = true;
        if s.outcome.is_none() {
            s.outcome = Some(outcome);
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

    fn outcome(&self) -> Option<Result<Vec<ByteBuf>>> {
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

/// Most chunks sent in one pipeline.
const MAX_BATCH: usize = 64;

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
    /// Sends the items on a thread of their own.
    pub(crate) fn spawn<I>(self, items: I) -> Result<()>
    where
        I: Iterator<Item = Result<ByteBuf>> + Send + 'static,
    {
        std::thread::Builder::new()
            .name("shoal-feeder".into())
            .stack_size(256 * 1024)
            .spawn(move || self.run(items))
            .map(|_| ())
            .map_err(|e| Error::io("starting a feeder thread", e))
    }

    /// Sends the items on this thread.
    pub(crate) fn run<I>(self, mut items: I)
    where
        I: Iterator<Item = Result<ByteBuf>>,
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
    /// when the call was cancelled; `Err` when Redis failed.
    fn feed<I>(&self, items: &mut I) -> Result<Option<(usize, Option<Error>)>>
    where
        I: Iterator<Item = Result<ByteBuf>>,
    {
        let mut chunk = 0usize;
        let mut input_error = None;
        let mut exhausted = false;
        let mut refreshed: Option<Instant> = None;
        while !exhausted {
            let Some(room) = self.shared.wait_for_room() else {
                return Ok(None);
            };
            let mut batch: Vec<ChunkEntry> = Vec::new();
            while batch.len() < room.min(MAX_BATCH) {
                let mut chunk_items = Vec::with_capacity(self.chunksize.min(4096));
                while chunk_items.len() < self.chunksize {
                    match items.next() {
                        Some(Ok(item)) => chunk_items.push(item),
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
                if chunk_items.is_empty() {
                    break;
                }
                let payload = encode_items(&self.store, chunk_items, &self.keys.tasks)?;
                batch.push(ChunkEntry {
                    call: self.call,
                    chunk: chunk as u64,
                    function: self.function.clone(),
                    payload,
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
/// twice runs twice and its outcome is kept once.
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

/// Decodes a call's collected outputs into its result type.
pub(crate) type Decoder<R> = Arc<dyn Fn(&[ByteBuf]) -> Result<R> + Send + Sync>;

/// The result of an asynchronous call (`apply_async`, `map_async`, `starmap_async`), Python's
/// `AsyncResult`.
pub struct AsyncResult<R> {
    shared: Arc<CallShared>,
    decode: Decoder<R>,
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
        supervisor: Addr<PoolSupervisor>,
        call: u64,
    ) -> Self {
        AsyncResult {
            shared,
            decode,
            supervisor,
            call,
        }
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
        if !self.shared.wait_outcome(timeout) {
            return Err(Error::Timeout(timeout.unwrap_or_default()));
        }
        match self.shared.outcome() {
            Some(Ok(outputs)) => (self.decode)(&outputs),
            Some(Err(e)) => Err(e),
            None => Err(Error::invalid_state("the call has no outcome")),
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
        match self.result.shared.poll_outcome(cx.waker()) {
            Some(Ok(outputs)) => std::task::Poll::Ready((self.result.decode)(&outputs)),
            Some(Err(e)) => std::task::Poll::Ready(Err(e)),
            None => std::task::Poll::Pending,
        }
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

impl<R> std::future::Future for AsyncCall<R> {
    type Output = Result<R>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<R>> {
        let this = self.get_mut();
        match this.result.shared.poll_outcome(cx.waker()) {
            Some(outcome) => {
                this.done = true;
                std::task::Poll::Ready(outcome.and_then(|outputs| (this.result.decode)(&outputs)))
            }
            None => std::task::Poll::Pending,
        }
    }
}

impl<R> Drop for AsyncCall<R> {
    fn drop(&mut self) {
        if !self.done {
            self.result.cancel();
        }
    }
}

/// Builds the decoder of a collected `map`: every output as a `T`.
pub(crate) fn decode_each<T: DeserializeOwned>(function: &str, limit: usize) -> Decoder<Vec<T>> {
    let key = format!("results of {function}");
    Arc::new(move |outputs: &[ByteBuf]| {
        outputs
            .iter()
            .map(|b| codec::decode::<T>(b, &key, limit))
            .collect()
    })
}

/// Builds the decoder of a collected `apply`: the single output as a `T`.
pub(crate) fn decode_one<T: DeserializeOwned>(function: &str, limit: usize) -> Decoder<T> {
    let key = format!("result of {function}");
    Arc::new(move |outputs: &[ByteBuf]| match outputs.first() {
        Some(b) => codec::decode::<T>(b, &key, limit),
        None => Err(Error::invalid_state(format!("{key}: no output"))),
    })
}

/// The iterator of `imap` (ordered) and `imap_unordered`: one `Result` per item. An item that
/// failed yields its error; the items after it in its chunk did not run (as in Python, where an
/// exception ends a chunk), and the iteration goes on with the next chunk. Dropping the iterator
/// stops feeding the call.
pub struct IMapIterator<T> {
    shared: Arc<CallShared>,
    ordered: bool,
    current: VecDeque<ByteBuf>,
    pending_failure: Option<TaskError>,
    key: String,
    limit: usize,
    finished: bool,
    cancel: Option<(Addr<PoolSupervisor>, u64)>,
    _marker: std::marker::PhantomData<fn() -> T>,
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
        limit: usize,
        supervisor: Addr<PoolSupervisor>,
        call: u64,
    ) -> Self {
        IMapIterator {
            shared,
            ordered,
            current: VecDeque::new(),
            pending_failure: None,
            key: format!("results of {function}"),
            limit,
            finished: false,
            cancel: Some((supervisor, call)),
            _marker: std::marker::PhantomData,
        }
    }

    /// The next item, waiting at most `timeout` for it: `Some(Err(Error::Timeout))` when it did
    /// not come (Python's `next(timeout)`); the iteration can go on after a timeout.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<T>> {
        self.advance(Some(timeout))
    }

    fn advance(&mut self, timeout: Option<Duration>) -> Option<Result<T>> {
        loop {
            if let Some(bytes) = self.current.pop_front() {
                return Some(codec::decode::<T>(&bytes, &self.key, self.limit));
            }
            if let Some(failure) = self.pending_failure.take() {
                return Some(Err(Error::Task(failure)));
            }
            if self.finished {
                return None;
            }
            match self.shared.take_chunk(self.ordered, timeout) {
                Ok(Some(Ok(chunk))) => {
                    self.current = chunk.outputs.into();
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

impl<T: DeserializeOwned> futures::Stream for IMapStream<T> {
    type Item = Result<T>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<T>>> {
        use std::task::Poll;
        let this = &mut self.get_mut().0;
        loop {
            if let Some(bytes) = this.current.pop_front() {
                return Poll::Ready(Some(codec::decode::<T>(&bytes, &this.key, this.limit)));
            }
            if let Some(failure) = this.pending_failure.take() {
                return Poll::Ready(Some(Err(Error::Task(failure))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.shared.poll_chunk(this.ordered, cx.waker()) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.current = chunk.outputs.into();
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
