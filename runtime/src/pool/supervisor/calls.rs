//! The calls in progress on a pool: their registration, their chunks' outcomes, and how each
//! call completes.
//!
//! A call completes when the outcome of every chunk it sent is in (Python's `MapResult` is
//! ready only once all its chunks are done, failed ones included), or at once when the pool is
//! terminated or breaks. A collected call (`map`, `apply`...) then fails with the failure of its
//! first failing item in input order, else with its input's failure (an iterator that panicked
//! part way), else succeeds with every result in order. A streaming call (`imap`) hands each
//! chunk to its iterator as it arrives; its input's failure comes after the last chunk.
//!
//! A chunk's results are MessagePack arrays, handed over as they are (not decoded here): a
//! collected call's go to its caller's handle as they arrive, which decodes them while the rest
//! runs (or, when the call has callbacks, they are kept until it completes, for the callback
//! thread). A long chunk reports partial outcomes while it runs (see `shoal_executor::pool`);
//! they are kept per chunk until its final outcome arrives and then put in front of it
//! ([`assemble`]). When a chunk was run twice at once (a worker presumed dead went on), its
//! parts may overlap; any chain of parts from the start to the final outcome is a valid run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use futures::channel::oneshot;
use indicatif::ProgressBar;
use shoal_core::codec;
use shoal_core::error::{Error, Result, TaskError, TaskErrorKind};
use shoal_executor::pool::{self, MovedChunk, ResultBody, ResultEntry};
use shoal_executor::protocol::StopSignal;

use super::PoolSupervisor;
use crate::pool::call::{Arrived, CallShared, ChunkResult, Delivery};

/// Runs a completed call's callback with its results (every chunk's, in order) or its error.
pub(crate) type Completion = Box<dyn FnOnce(std::result::Result<&Arrived, &Error>) + Send>;

/// A part of a chunk's results: the offset in the chunk of its first result, the results (one
/// array), and how many there are.
type Part = (u64, Vec<u8>, u64);

/// Chunk indexes received, compactly: all below `prefix`, plus `above`.
#[derive(Default)]
pub(super) struct SeenChunks {
    prefix: u64,
    above: BTreeSet<u64>,
}

impl SeenChunks {
    /// Records `chunk`; false when it was seen before.
    fn insert(&mut self, chunk: u64) -> bool {
        if chunk < self.prefix || !self.above.insert(chunk) {
            return false;
        }
        while self.above.remove(&self.prefix) {
            self.prefix += 1;
        }
        true
    }

    fn count(&self) -> u64 {
        self.prefix + self.above.len() as u64
    }

    fn contains(&self, chunk: u64) -> bool {
        chunk < self.prefix || self.above.contains(&chunk)
    }
}

/// The results `0..end` of a chunk from its partial outcomes, following a chain of parts that
/// starts at 0 and ends at `end`; `None` when there is a gap. The chosen parts' arrays are moved
/// out of `parts`.
///
/// A long chunk has a part per [`pool::PROGRESS_EVERY`] (some 20 000 for a 90-minute chunk), so
/// this is a depth-first search with its own stack, not recursion (the supervisor runs on
/// shoal's actor thread, whose stack is small), over the parts indexed by their first offset:
/// each offset is explored once and each part looked at once, so it is linear in the parts.
/// Among several chains (parts of overlapping attempts), the one it finds takes at each offset
/// the first part reported there that leads to `end`.
fn assemble(mut parts: Vec<Part>, end: u64) -> Option<Vec<Vec<u8>>> {
    // The non-empty parts by their first offset, in the order they arrived (an empty part
    // leads nowhere).
    let mut starting: HashMap<u64, Vec<usize>> = HashMap::with_capacity(parts.len());
    for (i, (offset, _, count)) in parts.iter().enumerate() {
        if *count > 0 {
            starting.entry(*offset).or_default().push(i);
        }
    }
    // Offsets reached so far: each is explored once (offsets only grow along a chain, so one
    // reached again was, or is being, explored from there already).
    let mut reached: HashSet<u64> = HashSet::from([0]);
    // The chain being explored: each offset on it, and how many of the parts starting there
    // were tried (the last one tried leads to the next offset).
    let mut path: Vec<(u64, usize)> = vec![(0, 0)];
    loop {
        let (at, tried) = path.last_mut()?;
        if *at == end {
            break;
        }
        let alternatives = starting.get(at).map(Vec::as_slice).unwrap_or(&[]);
        match alternatives.get(*tried) {
            Some(&i) => {
                *tried += 1;
                if let Some(next) = at.checked_add(parts[i].2)
                    && next <= end
                    && reached.insert(next)
                {
                    path.push((next, 0));
                }
            }
            // A dead end: back to the offset before.
            None => {
                path.pop();
            }
        }
    }
    // The last offset on the chain is `end`: no part was taken from there.
    let (_, chain) = path.split_last()?;
    let chosen = chain.iter().map(|(at, tried)| {
        // The part tried last at `at` led to the next offset on the chain.
        starting
            .get(at)
            .and_then(|alternatives| alternatives.get(tried.checked_sub(1)?))
            .copied()
    });
    chosen
        .map(|i| i.map(|i| std::mem::take(&mut parts[i].1)))
        .collect()
}

/// The supervisor's record of one call.
pub(super) struct CallRecord {
    pub(super) function: String,
    shared: Arc<CallShared>,
    delivery: Delivery,
    /// Items per chunk, to tell a failing item's index in the input (`None` for `apply`).
    chunksize: Option<u64>,
    total: Option<u64>,
    seen: SeenChunks,
    /// `Collect` with a completion: the results, kept for the callback (otherwise they go to
    /// the caller's handle as they arrive).
    collected: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Partial outcomes of long chunks not finished yet: chunk → parts.
    parts: HashMap<u64, Vec<Part>>,
    /// `Collect`: the earliest failing chunk so far and its failure.
    failure: Option<(u64, TaskError)>,
    /// The last attempt of one of its chunks that ended with its worker's death: the attempt
    /// number and, for a chunk of one item, that item's index in the input.
    last_death: Option<(u32, Option<u64>)>,
    /// The input's iterator failed after the chunks sent.
    input_error: Option<Error>,
    completion: Option<Completion>,
    progress: Option<ProgressBar>,
}

impl PoolSupervisor {
    /// Completes a call: for a collected call the callback runs first, then `get()` sees the
    /// outcome (the order Python keeps).
    pub(super) fn finish_call(&mut self, mut record: CallRecord, outcome: Result<()>) {
        if let Some(progress) = record.progress.take() {
            progress.finish_and_clear();
        }
        match record.delivery {
            Delivery::Collect => match record.completion.take() {
                Some(completion) => {
                    let shared = record.shared.clone();
                    let arrived: Arrived =
                        std::mem::take(&mut record.collected).into_iter().collect();
                    let job: Box<dyn FnOnce() + Send> = Box::new(move || {
                        // A panicking callback must not leave get() waiting forever.
                        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            completion(outcome.as_ref().map(|()| &arrived))
                        }));
                        if ran.is_err() {
                            tracing::error!("a pool callback panicked");
                        }
                        shared.complete(outcome, arrived);
                    });
                    if let Err(returned) = self.callbacks.send(job) {
                        (returned.0)();
                    }
                }
                None => record.shared.complete(outcome, Vec::new()),
            },
            Delivery::Ordered | Delivery::Unordered => {
                if let Err(e) = outcome {
                    record.shared.end(e);
                }
            }
        }
    }

    pub(super) fn on_result(&mut self, entry: ResultEntry) {
        let from_a_worker = matches!(entry.body, ResultBody::Outcome(_));
        if from_a_worker {
            // A worker ran a chunk to its end: the pool makes progress.
            self.budget.progress();
        }
        let Some(record) = self.calls.get_mut(&entry.call) else {
            return;
        };
        if entry.partial {
            if let ResultBody::Outcome(Ok(part)) = entry.body
                && !record.seen.contains(entry.chunk)
            {
                let outputs = part.outputs.into_vec();
                let count = u64::from(codec::array_len(&outputs).unwrap_or(0));
                record
                    .parts
                    .entry(entry.chunk)
                    .or_default()
                    .push((entry.offset, outputs, count));
            }
            return;
        }
        if !record.seen.insert(entry.chunk) {
            tracing::debug!(
                call = entry.call,
                chunk = entry.chunk,
                "duplicate result dropped"
            );
            return;
        }
        let parts = record.parts.remove(&entry.chunk).unwrap_or_default();
        // The index in the input of the item at `offset` in this chunk.
        let item = |offset: u64| {
            record
                .chunksize
                .map(|size| entry.chunk.saturating_mul(size) + offset)
        };
        let result = match entry.body {
            ResultBody::Outcome(decoded) => {
                let decoded = decoded.and_then(|outcome| {
                    let mut outputs = if parts.is_empty() && entry.offset == 0 {
                        Vec::with_capacity(1)
                    } else {
                        assemble(parts, entry.offset).ok_or_else(|| {
                            format!(
                                "the results of the first {} items of the chunk are missing",
                                entry.offset
                            )
                        })?
                    };
                    let last = outcome.outputs.into_vec();
                    let count = entry.offset + u64::from(codec::array_len(&last).unwrap_or(0));
                    outputs.push(last);
                    Ok((outputs, count, outcome.failure))
                });
                match decoded {
                    Ok((outputs, count, failure)) => ChunkResult {
                        outputs,
                        count,
                        failure: failure.map(|f| TaskError {
                            function: record.function.clone(),
                            message: f.message,
                            kind: f.kind,
                            attempts: entry.attempt,
                            item: item(entry.offset + u64::from(f.index)),
                        }),
                    },
                    Err(e) => ChunkResult {
                        outputs: Vec::new(),
                        count: 0,
                        failure: Some(TaskError {
                            function: record.function.clone(),
                            message: e,
                            kind: TaskErrorKind::Error,
                            attempts: entry.attempt,
                            item: None,
                        }),
                    },
                }
            }
            ResultBody::Crashed(message) => ChunkResult {
                outputs: Vec::new(),
                count: 0,
                failure: Some(TaskError {
                    function: record.function.clone(),
                    message: format!("{message} (worker {})", entry.worker),
                    kind: TaskErrorKind::Crashed,
                    attempts: entry.attempt,
                    // Which item killed its worker is known for chunks of one item only.
                    item: if record.chunksize == Some(1) {
                        item(0)
                    } else {
                        None
                    },
                }),
            },
        };
        if let Some(progress) = &record.progress {
            progress.inc(result.count + u64::from(result.failure.is_some()));
        }
        match record.delivery {
            Delivery::Collect => {
                record.shared.release(1);
                if let Some(failure) = result.failure {
                    if record
                        .failure
                        .as_ref()
                        .is_none_or(|(c, _)| entry.chunk < *c)
                    {
                        record.failure = Some((entry.chunk, failure));
                    }
                } else if record.completion.is_some() {
                    record.collected.insert(entry.chunk, result.outputs);
                } else {
                    record
                        .shared
                        .arrive(entry.chunk, result.outputs, result.count);
                }
            }
            Delivery::Ordered | Delivery::Unordered => {
                record.shared.push(entry.chunk as usize, result);
            }
        }
        self.check_call(entry.call);
    }

    /// Notes the chunks redelivery charged with their worker's death: their attempts ended with
    /// it (the other chunks of its read were redelivered with their attempt unchanged).
    pub(super) fn record_deaths(&mut self, moved: &[MovedChunk]) {
        for chunk in moved {
            if let Some(record) = self.calls.get_mut(&chunk.call) {
                // Which item killed its worker is known for chunks of one item only.
                let item = (record.chunksize == Some(1)).then_some(chunk.item);
                record.last_death = Some((chunk.attempt, item));
            }
        }
    }

    /// Fails every call still running because the pool gave up (`reason`), with kind
    /// `Crashed`: each names the failure the call already recorded (its attempts and item), else
    /// the last attempt of its chunks that died with its worker, else none (attempts 0: none of
    /// its chunks ran).
    pub(super) fn end_calls_gave_up(&mut self, reason: &str) {
        let calls: Vec<u64> = self.calls.keys().copied().collect();
        for call in calls {
            if let Some(record) = self.calls.remove(&call) {
                let (attempts, item) = match (&record.failure, record.last_death) {
                    (Some((_, failure)), _) => (failure.attempts, failure.item),
                    (None, Some(death)) => death,
                    (None, None) => (0, None),
                };
                let error = Error::Task(TaskError {
                    function: record.function.clone(),
                    message: format!("the pool gave up: {reason}"),
                    kind: TaskErrorKind::Crashed,
                    attempts,
                    item,
                });
                self.finish_call(record, Err(error));
            }
        }
    }

    /// The pool was closed: streaming calls' feeders no longer wait for their callers to take
    /// results (see *Flow control* in the module docs of `call`), or `join()` would wait
    /// forever for an `imap` nobody reads until after it.
    pub(super) fn lift_stream_windows(&mut self) {
        for record in self.calls.values() {
            if matches!(record.delivery, Delivery::Ordered | Delivery::Unordered) {
                record.shared.lift_window();
            }
        }
    }

    /// Completes a call whose every chunk is in.
    fn check_call(&mut self, call: u64) {
        let Some(record) = self.calls.get(&call) else {
            return;
        };
        if record.total.is_none_or(|t| record.seen.count() < t) {
            return;
        }
        let Some(mut record) = self.calls.remove(&call) else {
            return;
        };
        let outcome = match (record.failure.take(), record.input_error.take()) {
            (Some((_, failure)), _) => Err(Error::Task(failure)),
            (None, Some(input)) => Err(input),
            (None, None) => Ok(()),
        };
        match record.delivery {
            Delivery::Collect => self.finish_call(record, outcome),
            // The iterator already has every chunk (and the input's failure, from its feeder).
            Delivery::Ordered | Delivery::Unordered => {
                if let Some(progress) = record.progress.take() {
                    progress.finish_and_clear();
                }
            }
        }
    }
}

/// A new call. The caller queues it (`do_send`, which never waits for room in the mailbox) and
/// goes on; whoever writes the call's first chunk waits first for its acknowledgement
/// ([`Registration::confirm`]). Everything else about the call reaches the supervisor through
/// its mailbox after it (cancels, feeder reports, results read from Redis), so it is handled
/// first.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RegisterCall {
    pub(crate) call: u64,
    pub(crate) function: String,
    pub(crate) shared: Arc<CallShared>,
    pub(crate) delivery: Delivery,
    /// Items per chunk (`None` for `apply`).
    pub(crate) chunksize: Option<u64>,
    pub(crate) completion: Option<Completion>,
    pub(crate) progress: Option<ProgressBar>,
    /// The call is cancelled with [`Error::Timeout`] if it has not completed by then.
    pub(crate) deadline: Option<std::time::Duration>,
    /// When the call was made: its deadline counts from then.
    made: std::time::Instant,
    /// Where the supervisor says whether it took the call (a refused call it ended itself).
    ack: oneshot::Sender<Result<()>>,
}

impl RegisterCall {
    /// The registration of a new call, and the acknowledgement it gets.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        call: u64,
        function: String,
        shared: Arc<CallShared>,
        delivery: Delivery,
        chunksize: Option<u64>,
        completion: Option<Completion>,
        progress: Option<ProgressBar>,
        deadline: Option<std::time::Duration>,
    ) -> (RegisterCall, Registration) {
        let (ack, acknowledged) = oneshot::channel();
        let registration = Registration {
            acknowledged,
            shared: shared.clone(),
        };
        let message = RegisterCall {
            call,
            function,
            shared,
            delivery,
            chunksize,
            completion,
            progress,
            deadline,
            made: std::time::Instant::now(),
            ack,
        };
        (message, registration)
    }
}

/// The supervisor's answer to a [`RegisterCall`], awaited by whoever writes the call's first
/// chunk, so that a call the pool refused writes nothing (and its caller's thread never waits
/// for the supervisor).
pub(crate) struct Registration {
    acknowledged: oneshot::Receiver<Result<()>>,
    shared: Arc<CallShared>,
}

impl Registration {
    /// Waits for the supervisor's answer: true when it took the call; otherwise nothing of the
    /// call may be written, and it is ended with the reason: by the supervisor when it refused
    /// it (the pool stopped taking calls: its error callback runs first), here when the
    /// supervisor stopped with the registration still in its mailbox.
    pub(crate) fn confirm(self) -> bool {
        match futures::executor::block_on(self.acknowledged) {
            Ok(Ok(())) => true,
            Ok(Err(_ended)) => false,
            Err(oneshot::Canceled) => {
                self.shared
                    .end(Error::invalid_state("the pool is no longer running"));
                false
            }
        }
    }
}

impl Handler<RegisterCall> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: RegisterCall, ctx: &mut Context<Self>) {
        let record = CallRecord {
            function: msg.function,
            shared: msg.shared,
            delivery: msg.delivery,
            chunksize: msg.chunksize,
            total: None,
            seen: SeenChunks::default(),
            collected: BTreeMap::new(),
            parts: HashMap::new(),
            failure: None,
            last_death: None,
            input_error: None,
            completion: msg.completion,
            progress: msg.progress,
        };
        if let Err(refused) = self.phase.accepts_calls() {
            // Ended as any failed call is: its bar cleared, its error callback run, then its
            // result.
            self.finish_call(record, Err(refused.clone()));
            let _ = msg.ack.send(Err(refused));
            return;
        }
        if let Some(deadline) = msg.deadline {
            let call = msg.call;
            // From the call's start, not from now: the supervisor may have been busy.
            let left = deadline.saturating_sub(msg.made.elapsed());
            ctx.run_later(left, move |act, ctx| {
                if act.calls.contains_key(&call) {
                    act.handle(
                        CancelCall {
                            call,
                            error: Error::Timeout(deadline),
                        },
                        ctx,
                    );
                }
            });
        }
        self.calls.insert(msg.call, record);
        // Nobody waits when the call's feeder thread could not start: its failure follows.
        let _ = msg.ack.send(Ok(()));
    }
}

/// A feeder sent every chunk of a call it could read: `total` of them; `input_error` when the
/// input's iterator failed after them.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FeedDone {
    pub(crate) call: u64,
    pub(crate) total: u64,
    pub(crate) input_error: Option<Error>,
}

impl Handler<FeedDone> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: FeedDone, ctx: &mut Context<Self>) {
        if let Some(record) = self.calls.get_mut(&msg.call) {
            record.total = Some(msg.total);
            record.input_error = msg.input_error;
            if let Some(progress) = &record.progress
                && progress.length().is_none()
            {
                progress.set_length(progress.position());
            }
            self.check_call(msg.call);
        }
        self.maybe_stop(ctx);
    }
}

/// A feeder could not send a call's chunks (Redis failed): the call fails now.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FeedFailed {
    pub(crate) call: u64,
    pub(crate) error: Error,
}

impl Handler<FeedFailed> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: FeedFailed, ctx: &mut Context<Self>) {
        if let Some(record) = self.calls.remove(&msg.call) {
            self.finish_call(record, Err(msg.error));
        }
        self.maybe_stop(ctx);
    }
}

/// Cancel a call: the caller dropped its stream or its future, called `cancel()`, or its
/// deadline passed. The call ends with `error`; its chunks that did not start are removed, its
/// running tasks are told (`termination_requested()`), and the workers that still run one after
/// a grace period are replaced (that is not counted as a failure).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CancelCall {
    pub(crate) call: u64,
    pub(crate) error: Error,
}

impl Handler<CancelCall> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: CancelCall, ctx: &mut Context<Self>) {
        if let Some(record) = self.calls.remove(&msg.call) {
            // The feeder stops now; the caller sees the outcome from `finish_call`, after the
            // error_callback ran (the documented order, as for `terminate()`).
            record.shared.stop_feeding();
            self.finish_call(record, Err(msg.error));
            self.cancel_chunks(ctx, msg.call);
        }
        self.maybe_stop(ctx);
    }
}

impl PoolSupervisor {
    /// Removes a cancelled call's chunks; after the grace period, replaces the workers still
    /// running one.
    fn cancel_chunks(&mut self, ctx: &mut Context<Self>, call: u64) {
        let store = self.store.clone();
        let keys = self.keys.clone();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                pool::cancel_call(&mut conn, &store, &keys, call, false).await
            }
            .into_actor(self)
            .map(move |result, act, _| match result {
                Ok(cancelled) => {
                    tracing::debug!(pool = %act.id, call, removed = cancelled.removed, "call cancelled")
                }
                Err(e) => tracing::warn!("pool {}: cancelling call {call}: {e}", act.id),
            }),
        );
        self.sweep_cancelled_later(ctx, call);
    }

    /// After the grace period, removes the chunks of the cancelled `call` still running and
    /// replaces their workers; a chunk a worker holds behind another call's chunk is not its
    /// reason to kill it (the worker skips it when it gets there): swept again a grace later,
    /// while the pool supervises.
    fn sweep_cancelled_later(&mut self, ctx: &mut Context<Self>, call: u64) {
        let grace = self.settings.lease.max(std::time::Duration::from_secs(1));
        ctx.run_later(grace, move |act, ctx| {
            if !act.phase.supervises() {
                return;
            }
            let store = act.store.clone();
            let keys = act.keys.clone();
            ctx.spawn(
                async move {
                    let mut conn = store.multiplexed().await?;
                    pool::cancel_call(&mut conn, &store, &keys, call, true).await
                }
                .into_actor(act)
                .map(move |result, act, ctx| match result {
                    Ok(swept) => {
                        for worker in swept.workers {
                            if let Some(slot) = act.workers.get_mut(&worker) {
                                tracing::warn!(
                                    "pool {}: PoolWorker-{} did not stop its cancelled task; \
                                     replacing it",
                                    act.id,
                                    slot.number
                                );
                                slot.stopped_for_cancel = true;
                                let executor = act.executor.clone();
                                actix::spawn(async move {
                                    let _ = executor.signal(worker, StopSignal::Kill).await;
                                });
                            }
                        }
                        if swept.deferred > 0 {
                            act.sweep_cancelled_later(ctx, call);
                        }
                    }
                    Err(e) => tracing::warn!("pool {}: cancelling call {call}: {e}", act.id),
                }),
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{Part, SeenChunks, assemble};
    use shoal_core::codec::ArrayWriter;

    /// A part holding the results `range` (each result is its index).
    fn part(range: std::ops::Range<u8>) -> Part {
        let mut array = ArrayWriter::new();
        for i in range.clone() {
            array.push(&i, 64, String::new).expect("push");
        }
        (u64::from(range.start), array.finish(), range.len() as u64)
    }

    /// The results the arrays hold, in order.
    fn values(arrays: Option<Vec<Vec<u8>>>) -> Option<Vec<u8>> {
        arrays.map(|arrays| {
            arrays
                .iter()
                .flat_map(|a| {
                    let mut r =
                        shoal_core::codec::ArrayReader::array(a, String::new).expect("array");
                    std::iter::from_fn(move || {
                        (r.remaining() > 0).then(|| r.next::<u8>(String::new).expect("u8"))
                    })
                    .collect::<Vec<_>>()
                })
                .collect()
        })
    }

    #[test]
    fn parts_are_chained_from_the_start() {
        assert_eq!(values(assemble(vec![], 0)), Some(vec![]));
        let parts = vec![part(3..5), part(0..3)];
        assert_eq!(values(assemble(parts, 5)), Some((0..5).collect()));
        // A gap: nothing covers 3..4.
        assert_eq!(assemble(vec![part(0..3), part(4..5)], 5), None);
        // Nothing reaches the end exactly.
        assert_eq!(assemble(vec![part(0..3), part(3..6)], 5), None);
    }

    #[test]
    fn overlapping_attempts_find_a_chain() {
        // Attempt 1 reported 0..2 and 2..6; attempt 2, started at 2, reported 2..4 and 4..7.
        let parts = || vec![part(0..2), part(2..6), part(2..4), part(4..7)];
        assert_eq!(values(assemble(parts(), 7)), Some((0..7).collect()));
        assert_eq!(values(assemble(parts(), 6)), Some((0..6).collect()));
        // A dead end first (2..3 leads to 3, where nothing starts), then the way through.
        let parts = vec![part(0..2), part(2..3), part(2..4), part(4..5)];
        assert_eq!(values(assemble(parts, 5)), Some((0..5).collect()));
    }

    /// A 90-minute chunk reports some 20 000 parts: assembling 100 000 on a thread with a small
    /// stack (shoal's actor thread has 2 MiB) takes neither deep recursion nor quadratic time.
    #[test]
    fn a_chunk_of_a_hundred_thousand_parts_is_assembled_on_a_small_stack() {
        const PARTS: u64 = 100_000;
        // One result per part, each its offset; in reverse order, with a decoy at every offset
        // (an empty part, and a part running past the end).
        let mut parts: Vec<Part> = Vec::new();
        for offset in (0..PARTS).rev() {
            let mut array = ArrayWriter::new();
            array.push(&offset, 64, String::new).expect("push");
            parts.push((offset, ArrayWriter::new().finish(), 0));
            parts.push((offset, array.finish(), 1));
        }
        parts.push((PARTS - 1, ArrayWriter::new().finish(), 2));
        let started = std::time::Instant::now();
        let assembled = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || assemble(parts, PARTS))
            .expect("a thread")
            .join()
            .expect("no overflow")
            .expect("a chain");
        assert_eq!(assembled.len() as u64, PARTS);
        for (offset, array) in assembled.iter().enumerate() {
            let mut r = shoal_core::codec::ArrayReader::array(array, String::new).expect("array");
            assert_eq!(r.next::<u64>(String::new).expect("u64"), offset as u64);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn each_chunk_is_kept_once_in_any_order() {
        let mut seen = SeenChunks::default();
        for chunk in [2, 0, 1, 1, 5, 0, 3, 4, 5] {
            seen.insert(chunk);
        }
        assert_eq!(seen.count(), 6);
        assert_eq!(seen.prefix, 6, "contiguous chunks collapse into the prefix");
        assert!(seen.above.is_empty());
        assert!(!seen.insert(3), "a duplicate is refused");
        assert!(seen.insert(9));
        assert_eq!((seen.prefix, seen.count()), (6, 7));
    }
}
