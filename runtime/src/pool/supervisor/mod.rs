//! The pool supervisor: an actix actor that keeps `processes` workers alive, collects results,
//! and redelivers the work of workers that die.
//!
//! One concern per module:
//!
//! * this module: the actor, its settings, its lifecycle and the messages that drive it;
//! * [`workers`]: launching workers through the executor, and what a worker's exit means;
//! * [`budget`]: the restart budget and the back-off between restarts;
//! * [`calls`]: the calls in progress, their results and outcomes;
//! * [`results`]: the task that reads the results stream;
//! * [`health`]: chunk leases, the driver's liveness key and the store's health.
//!
//! # Lifecycle
//!
//! `Running` → `close()` → `Closing` (no new calls; streaming calls no longer wait for their
//! callers to take results, which wait in their iterators; when the last call completes, one stop
//! entry per worker goes to the task stream) → `Stopping` (workers exit, none is replaced) →
//! finished, once the callbacks queued by then ran on the pool's callback thread (a last job
//! there marks it, so `join()` returns after every callback, as CPython's). `terminate()` (or
//! dropping the pool) → `Terminated` from any phase: workers are sent `SIGTERM`, calls still
//! running fail with [`Error::InvalidState`], the pool's keys are deleted.
//! `Broken` from `Running` or `Closing`: the restart budget is spent (calls fail with kind
//! `Crashed`), the store was lost (calls fail with the store's error), or the pool's state in
//! Redis was lost (its task stream or consumer group gone: a lease check, or the redelivery of
//! a dead worker's chunks, meets `NOGROUP`; calls fail with
//! `pool::state_lost`'s error); workers are stopped.
//!
//! # Supervision
//!
//! * A worker that exits while the pool runs is replaced, and the chunks it held are moved by
//!   `pool/requeue.lua` (another attempt, or a `Crashed` failure when `1 + retries` attempts are
//!   used up).
//! * Every half lease, chunks idle for longer than the lease (their worker stopped renewing) are
//!   moved the same way and their worker is killed and replaced; not while Redis does not
//!   answer, nor for a lease after it answers again, when no worker could renew (see
//!   [`health`]).
//! * Worker failures are charged to a restart budget only while the pool makes no progress
//!   (see [`budget`]); restarts back off. A failure is charged once its worker's chunks moved,
//!   so that a pool that gives up fails each call naming a real attempt: the chunk failure the
//!   call recorded, else the last of its chunks that died with its worker.
//! * Redis being unreachable is not a worker failure: the supervisor watches the store and, when
//!   it stayed unreachable for `redis.response_timeout_secs`, fails the calls with the store's
//!   error (see [`health`]).
//! * A chunk's outcome is kept once: a duplicate (from a worker presumed dead) is dropped.

mod budget;
mod calls;
mod health;
mod results;
mod workers;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

use actix::prelude::*;
use shoal_core::config::{Config, StartMethod};
use shoal_core::context::ProcessInfo;
use shoal_core::error::{Error, RedisContext, Result};
use shoal_core::store::Store;
use shoal_executor::pool::{self, Initializer, PoolKeys};
use shoal_executor::protocol::{Executor, StopSignal};

use budget::RestartBudget;
use calls::CallRecord;
pub(crate) use calls::{CancelCall, Completion, FeedDone, FeedFailed, RegisterCall, Registration};
use health::StoreHealth;
use workers::WorkerSlot;

/// How a pool is run.
#[derive(Clone, Debug)]
pub(crate) struct PoolSettings {
    pub(crate) processes: usize,
    pub(crate) retries: u32,
    pub(crate) lease: Duration,
    pub(crate) maxtasksperchild: Option<u64>,
    pub(crate) initializer: Option<Initializer>,
    pub(crate) start_method: StartMethod,
    pub(crate) max_restarts: u32,
    pub(crate) restart_period: Duration,
    /// The configuration written into each worker's task record.
    pub(crate) config: Config,
    /// The process that created the pool: its workers' parent.
    pub(crate) creator: ProcessInfo,
}

/// Where the pool is in its life.
#[derive(Clone, Debug)]
pub(crate) enum Phase {
    Running,
    Closing,
    Stopping,
    Terminated,
    /// The error later calls get: [`Error::InvalidState`] when the restart budget was spent,
    /// the store's error when it was lost.
    Broken(Error),
}

impl Phase {
    /// `Ok` when the pool takes new calls, else the error a new call gets.
    pub(crate) fn accepts_calls(&self) -> Result<()> {
        match self {
            Phase::Running => Ok(()),
            Phase::Broken(e) => Err(e.clone()),
            Phase::Terminated => Err(Error::invalid_state("the pool was terminated")),
            Phase::Closing | Phase::Stopping => Err(Error::invalid_state("the pool is closed")),
        }
    }

    /// Running or closing: workers are kept alive.
    fn supervises(&self) -> bool {
        matches!(self, Phase::Running | Phase::Closing)
    }
}

/// Why a pool broke.
enum Breakdown {
    /// Worker failures without progress exceeded the restart budget.
    GaveUp(String),
    /// Redis stayed unreachable.
    StoreLost(Error),
}

/// What the pool handle sees.
pub(crate) struct PoolShared {
    state: Mutex<PoolStatus>,
    changed: Condvar,
    /// The async waits for the pool's end ([`PoolShared::finished`]), woken with `changed`.
    wakers: Mutex<Vec<std::task::Waker>>,
    /// The pool's callback thread, set by its first job.
    callback_thread: OnceLock<ThreadId>,
}

#[derive(Debug)]
pub(crate) struct PoolStatus {
    pub(crate) phase: Phase,
    pub(crate) live_workers: usize,
    /// Set when no worker will run any more (all exited after stop or terminate, and their
    /// output is printed).
    pub(crate) workers_exited: bool,
    /// Set once the workers exited and then every callback queued by then ran: what `join()`
    /// waits for (see [`PoolShared::is_finished`]).
    pub(crate) finished: bool,
}

impl PoolShared {
    pub(crate) fn new() -> Arc<PoolShared> {
        Arc::new(PoolShared {
            state: Mutex::new(PoolStatus {
                phase: Phase::Running,
                live_workers: 0,
                workers_exited: false,
                finished: false,
            }),
            changed: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
            callback_thread: OnceLock::new(),
        })
    }

    /// Whether the pool is done, for the calling thread: it is finished; or, on the pool's own
    /// callback thread (a callback that joins, terminates or drops its pool), its workers
    /// exited, since the callbacks queued after the one running cannot run before it returns.
    pub(crate) fn is_finished(&self) -> bool {
        self.done(&self.lock())
    }

    fn done(&self, status: &PoolStatus) -> bool {
        status.finished
            || (status.workers_exited
                && self.callback_thread.get() == Some(&std::thread::current().id()))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PoolStatus> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut PoolStatus)) {
        f(&mut self.lock());
        self.changed.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in wakers {
            waker.wake();
        }
    }

    /// Resolves once the pool is done ([`PoolShared::is_finished`]), on any executor (a waker,
    /// no thread parked).
    pub(crate) fn finished(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_finished() {
                return std::task::Poll::Ready(());
            }
            // Registered (once per task) before the state is read again: an update in between
            // wakes it.
            {
                let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
            }
            if self.is_finished() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// Waits until the pool's workers exited (or it is done); false on timeout.
    pub(crate) fn wait_workers_exited(&self, timeout: Duration) -> bool {
        let exited = |s: &PoolStatus| s.workers_exited || self.done(s);
        self.changed
            .wait_timeout_while(self.lock(), timeout, |s| !exited(s))
            .map(|(g, _)| exited(&g))
            .unwrap_or(true)
    }

    /// Waits until the pool is done ([`PoolShared::is_finished`]); false on timeout.
    pub(crate) fn wait_finished(&self, timeout: Option<Duration>) -> bool {
        let guard = self.lock();
        match timeout {
            None => self
                .changed
                .wait_while(guard, |s| !self.done(s))
                .map(|g| self.done(&g))
                .unwrap_or(true),
            Some(t) => self
                .changed
                .wait_timeout_while(guard, t, |s| !self.done(s))
                .map(|(g, _)| self.done(&g))
                .unwrap_or(true),
        }
    }
}

/// The supervisor actor.
pub(crate) struct PoolSupervisor {
    id: String,
    keys: PoolKeys,
    store: Arc<Store>,
    executor: Executor,
    settings: PoolSettings,
    shared: Arc<PoolShared>,
    workers: HashMap<String, WorkerSlot>,
    /// Workers whose output is still being printed (see `workers`' module docs).
    printing: HashSet<String>,
    workers_started: u64,
    budget: RestartBudget,
    health: StoreHealth,
    /// A lease check is under way (one at a time: none piles up behind an outage).
    lease_check_running: bool,
    calls: HashMap<u64, CallRecord>,
    phase: Phase,
    callbacks: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl PoolSupervisor {
    pub(crate) fn new(
        id: String,
        keys: PoolKeys,
        store: Arc<Store>,
        executor: Executor,
        settings: PoolSettings,
        shared: Arc<PoolShared>,
        callbacks: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
    ) -> Self {
        let budget = RestartBudget::new(
            settings.max_restarts,
            settings.restart_period,
            settings.processes,
        )
        .with_response_timeout(store.settings().response_timeout);
        let health = StoreHealth::new(store.settings().response_timeout, settings.lease);
        // The first job, before any callback: a callback that waits for its own pool is told
        // apart (see `PoolShared::is_finished`).
        let marked = shared.clone();
        let mark: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = marked.callback_thread.set(std::thread::current().id());
        });
        let _ = callbacks.send(mark);
        PoolSupervisor {
            id,
            keys,
            store,
            executor,
            settings,
            shared,
            workers: HashMap::new(),
            printing: HashSet::new(),
            workers_started: 0,
            budget,
            health,
            lease_check_running: false,
            calls: HashMap::new(),
            phase: Phase::Running,
            callbacks,
        }
    }

    fn attempts_allowed(&self) -> u32 {
        self.settings.retries.saturating_add(1)
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase.clone();
        self.shared.update(|s| s.phase = phase);
    }

    /// Fails every call and stops the workers; later calls fail too.
    fn break_pool(&mut self, ctx: &mut Context<Self>, why: Breakdown) {
        if !self.phase.supervises() {
            return;
        }
        // The phase first: a caller woken by its call's end and calling again at once must
        // find the pool broken (not a call refused later by a supervisor gone).
        match why {
            Breakdown::GaveUp(reason) => {
                tracing::error!("pool {} is broken: {reason}", self.id);
                self.set_phase(Phase::Broken(Error::invalid_state(format!(
                    "the pool is broken: it gave up: {reason}"
                ))));
                self.end_calls_gave_up(&reason);
            }
            Breakdown::StoreLost(error) => {
                tracing::error!("pool {}: {error}", self.id);
                self.set_phase(Phase::Broken(error.clone()));
                self.end_calls(|_| error.clone());
            }
        }
        self.stop_all_workers(ctx);
    }

    /// Fails every call still running with the error `error(function)` gives.
    fn end_calls(&mut self, error: impl Fn(&str) -> Error) {
        let calls: Vec<u64> = self.calls.keys().copied().collect();
        for call in calls {
            if let Some(record) = self.calls.remove(&call) {
                let e = error(&record.function);
                self.finish_call(record, Err(e));
            }
        }
    }

    /// Sends `SIGTERM` to every launched worker; one still starting is signalled when its
    /// launch completes.
    fn stop_all_workers(&mut self, ctx: &mut Context<Self>) {
        if self.workers.is_empty() {
            self.workers_gone(ctx);
            return;
        }
        self.signal_workers(ctx, StopSignal::Terminate);
    }

    /// Sends `signal` to every launched worker.
    fn signal_workers(&mut self, ctx: &mut Context<Self>, signal: StopSignal) {
        let ids: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, slot)| slot.launched)
            .map(|(id, _)| id.clone())
            .collect();
        let executor = self.executor.clone();
        ctx.spawn(
            async move {
                for id in ids {
                    let _ = executor.signal(id, signal).await;
                }
            }
            .into_actor(self),
        );
    }

    /// Every worker has exited and its output is printed: the pool is done once the callbacks
    /// queued so far have run.
    fn workers_gone(&mut self, ctx: &mut Context<Self>) {
        if !self.printing.is_empty() {
            // The last printer to finish comes back here.
            return;
        }
        let store = self.store.clone();
        let keys = self.keys.clone();
        let delete = move || {
            if let Err(e) = pool::delete_streams(&store, &keys) {
                tracing::debug!("deleting a finished pool's keys: {e}");
            }
        };
        // Off shoal's actor thread, which the synchronous connection would hold (every pool,
        // process and actor with it) for up to the connect and response timeouts while Redis
        // does not answer. Synchronous all the same: after an outage it is what finds the
        // store's idle synchronous connections dead and drops them, before the next pool's
        // creation takes one.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(delete)),
            Err(_) => {
                if let Err(e) = std::thread::Builder::new()
                    .name("shoal-pool-cleanup".into())
                    .spawn(delete)
                {
                    tracing::debug!("deleting a finished pool's keys: {e}");
                }
            }
        }
        self.shared.update(|s| {
            s.live_workers = 0;
            s.workers_exited = true;
        });
        // `join()` returns once every callback ran, as CPython's joins its result handler: the
        // pool is finished by a last job on the callback thread, after those queued before it.
        let shared = self.shared.clone();
        let last: Box<dyn FnOnce() + Send> = Box::new(move || shared.update(|s| s.finished = true));
        if let Err(returned) = self.callbacks.send(last) {
            // The callback thread is gone: no callback is left to wait for.
            (returned.0)();
        }
        ctx.stop();
    }

    /// Sends the stop entries once a closing pool has no call left.
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.phase, Phase::Closing) || !self.calls.is_empty() {
            return;
        }
        self.set_phase(Phase::Stopping);
        if self.workers.is_empty() {
            self.workers_gone(ctx);
            return;
        }
        let stops = self.workers.len();
        let store = self.store.clone();
        let keys = self.keys.clone();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                let mut pipe = redis::pipe();
                for _ in 0..stops {
                    pool::add_stop_entry(&mut pipe, &keys.tasks);
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .context(|| format!("stopping the workers of {}", keys.tasks))
            }
            .into_actor(self)
            .map(|result: Result<()>, act, ctx| {
                if let Err(e) = result {
                    tracing::warn!("pool {}: {e}; terminating its workers", act.id);
                    act.stop_all_workers(ctx);
                }
            }),
        );
    }
}

impl Actor for PoolSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.start_reader(ctx);
        self.start_health_checks(ctx);
    }
}

/// Start the first `processes` workers.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StartWorkers;

impl Handler<StartWorkers> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, _: StartWorkers, ctx: &mut Context<Self>) {
        for _ in 0..self.settings.processes {
            self.spawn_worker(ctx);
        }
    }
}

/// `close()`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Close;

impl Handler<Close> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Running) {
            self.set_phase(Phase::Closing);
            self.lift_stream_windows();
            self.maybe_stop(ctx);
        }
    }
}

/// `terminate()`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Terminate;

impl Handler<Terminate> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, _: Terminate, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Terminated) {
            return;
        }
        self.end_calls(|_| {
            Error::invalid_state("the pool was terminated before this call finished")
        });
        if !matches!(self.phase, Phase::Broken(_)) {
            self.set_phase(Phase::Terminated);
        }
        self.stop_all_workers(ctx);
    }
}

/// Kill the workers that are left (after `terminate()` they did not exit in time).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct KillWorkers;

impl Handler<KillWorkers> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, _: KillWorkers, ctx: &mut Context<Self>) {
        self.signal_workers(ctx, StopSignal::Kill);
    }
}
