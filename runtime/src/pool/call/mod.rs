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
//! Once the pool is closed, a streaming call's window is lifted ([`CallShared::lift_window`]):
//! `join()` returns once every task is done, as in Python, so the feeder must not wait for a
//! caller that may only read the iterator after `join()`. The rest of the input is then read
//! and sent at once, and every result not yet taken waits in the iterator: an unconsumed `imap`
//! over `n` items on a closed pool holds up to `n` results in the caller's memory (and its
//! chunks in the task stream until the workers take them), as CPython's does.
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

use super::supervisor::{CancelCall, FeedDone, FeedFailed, PoolSupervisor, Registration};

mod feed;
mod result;

pub(crate) use feed::*;
pub use result::*;

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
    /// The window no longer holds the feeder back (the pool was closed; see *Flow control*).
    unbounded: bool,
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
        while !guard.cancelled && !guard.unbounded && guard.in_flight >= guard.window {
            guard.feeder_waiting = true;
            guard = self.room.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        guard.feeder_waiting = false;
        if guard.cancelled {
            None
        } else if guard.unbounded {
            // Batches are still bounded by the feeder's batch size.
            Some(usize::MAX)
        } else {
            Some(guard.window.saturating_sub(guard.in_flight).max(1))
        }
    }

    /// Supervisor (streaming, the pool was closed): the window no longer holds the feeder back,
    /// so that the call's every chunk is sent and `join()` can return while nobody takes the
    /// results (they wait in the iterator; see *Flow control*).
    pub(crate) fn lift_window(&self) {
        let mut s = self.lock();
        s.unbounded = true;
        if s.feeder_waiting {
            self.room.notify_all();
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
        self.stop_feeding();
    }

    /// The feeder stops taking items (the call is cancelled), without an outcome for the
    /// caller yet: the supervisor gives that after the call's callbacks ran.
    pub(crate) fn stop_feeding(&self) {
        let mut s = self.lock();
        s.cancelled = true;
        if s.feeder_waiting {
            self.room.notify_all();
        }
    }

    fn is_ready(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Whether the call stopped taking work: cancelled, ended, or complete.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.lock().cancelled
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
