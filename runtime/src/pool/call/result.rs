//! The handles a caller holds on a call's results: [`AsyncResult`] (and its futures) for a
//! collected call, [`IMapIterator`]/[`IMapStream`] for `imap`, and the decoders that type the
//! results (see *Results* in the module docs of `call`).

use super::*;

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
            // The feeder reads no more input from now on, before the supervisor hears of it.
            self.shared.stop_feeding();
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
