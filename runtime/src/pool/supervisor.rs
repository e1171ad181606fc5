//! The pool supervisor: an actix actor that keeps `processes` workers alive, collects results,
//! and redelivers the work of workers that die.
//!
//! # Lifecycle
//!
//! `Running` → `close()` → `Closing` (no new calls; when the last call completes, one stop
//! entry per worker goes to the task stream) → `Stopping` (workers exit, none is replaced) →
//! finished. `terminate()` (or dropping the pool) → `Terminated` from any phase: workers are sent
//! `SIGTERM`, calls still running fail with [`Error::InvalidState`], the pool's keys are deleted.
//!
//! # Supervision
//!
//! * A worker that exits while the pool runs is replaced, and the chunks it held are moved by
//!   `pool_requeue.lua` (another attempt, or a `Crashed` failure when `1 + retries` attempts are
//!   used up).
//! * Every half lease, chunks idle for longer than the lease (their worker stopped renewing) are
//!   moved the same way and their worker is killed and replaced.
//! * Restarts after failures (a non-zero exit) are bounded, as an OTP supervisor's are: more than
//!   `pool.max_restarts` within `pool.restart_period_secs` breaks the pool: its calls fail with
//!   kind `Crashed` and later calls with [`Error::InvalidState`]. So a worker that dies at once
//!   (a crashing initializer) does not restart forever.
//! * A chunk's outcome is kept once: a duplicate (from a worker presumed dead) is dropped.
//!
//! # Results
//!
//! One reader task reads the results stream with `XREAD BLOCK` on a dedicated connection, 512
//! entries at a time, and trims what it read in the pipeline of a later read, every 1024 entries
//! or once a second (one round trip per batch).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::FutureExt;
use indicatif::ProgressBar;
use redis::streams::StreamReadReply;
use serde_bytes::ByteBuf;
use shoal_core::config::{Config, StartMethod};
use shoal_core::context::ProcessInfo;
use shoal_core::error::{Error, RedisContext, Result, TaskError, TaskErrorKind};
use shoal_core::store::Store;
use shoal_executor::pool::{
    self, ChunkOutcome, Initializer, PoolKeys, PoolWorkerSpec, ResultBody, ResultEntry,
};
use shoal_executor::protocol::{Executor, Launch, StopSignal, WorkerExited, Workload};
use shoal_executor::task::{ProcessKeys, TaskKind, TaskRecord};

use super::call::{CallShared, ChunkResult, Delivery};

/// Most results read per round trip.
const READ_BATCH: usize = 512;
/// Results read between two trims of the results stream.
const TRIM_EVERY: usize = 1024;
/// How long the reader blocks before it checks that the pool still exists.
const READ_BLOCK: Duration = Duration::from_millis(200);

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
}

/// Where the pool is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Closing,
    Stopping,
    Terminated,
    Broken(String),
}

/// What the pool handle sees.
pub(crate) struct PoolShared {
    state: Mutex<PoolStatus>,
    changed: Condvar,
}

#[derive(Debug)]
pub(crate) struct PoolStatus {
    pub(crate) phase: Phase,
    pub(crate) live_workers: usize,
    /// Set when no worker will run any more (all exited after stop or terminate).
    pub(crate) finished: bool,
}

impl PoolShared {
    pub(crate) fn new() -> Arc<PoolShared> {
        Arc::new(PoolShared {
            state: Mutex::new(PoolStatus {
                phase: Phase::Running,
                live_workers: 0,
                finished: false,
            }),
            changed: Condvar::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PoolStatus> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut PoolStatus)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Waits until every worker exited; false on timeout.
    pub(crate) fn wait_finished(&self, timeout: Option<Duration>) -> bool {
        let guard = self.lock();
        match timeout {
            None => self
                .changed
                .wait_while(guard, |s| !s.finished)
                .map(|g| g.finished)
                .unwrap_or(true),
            Some(t) => self
                .changed
                .wait_timeout_while(guard, t, |s| !s.finished)
                .map(|(g, _)| g.finished)
                .unwrap_or(true),
        }
    }
}

/// Runs a completed call's callback, then publishes its outcome.
pub(crate) type Completion = Box<dyn FnOnce(&Result<Vec<ByteBuf>>) + Send>;

/// Chunk indexes received, compactly: all below `prefix`, plus `above`.
#[derive(Default)]
struct SeenChunks {
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
}

/// The supervisor's record of one call.
struct CallRecord {
    function: String,
    shared: Arc<CallShared>,
    delivery: Delivery,
    total: Option<u64>,
    seen: SeenChunks,
    collected: BTreeMap<u64, Vec<ByteBuf>>,
    /// `Collect`: the earliest failing chunk so far and its failure.
    failure: Option<(u64, TaskError)>,
    completion: Option<Completion>,
    progress: Option<ProgressBar>,
}

struct WorkerSlot {
    number: u64,
    /// The executor launched it (until then it cannot be signalled).
    launched: bool,
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
    workers_started: u64,
    failures: VecDeque<Instant>,
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
        PoolSupervisor {
            id,
            keys,
            store,
            executor,
            settings,
            shared,
            workers: HashMap::new(),
            workers_started: 0,
            failures: VecDeque::new(),
            calls: HashMap::new(),
            phase: Phase::Running,
            callbacks,
        }
    }

    fn attempts_allowed(&self) -> u32 {
        self.settings.retries.saturating_add(1)
    }

    fn spawn_worker(&mut self, ctx: &mut Context<Self>) {
        self.workers_started += 1;
        let number = self.workers_started;
        let worker_id = uuid::Uuid::new_v4().simple().to_string();
        let spec = PoolWorkerSpec {
            pool_id: self.id.clone(),
            worker_id: worker_id.clone(),
            initializer: self.settings.initializer.clone(),
            maxtasksperchild: self.settings.maxtasksperchild,
            lease_ms: self.settings.lease.as_millis() as u64,
        };
        let name = format!("PoolWorker-{number}");
        self.workers.insert(
            worker_id.clone(),
            WorkerSlot {
                number,
                launched: false,
            },
        );
        self.shared.update(|s| s.live_workers = self.workers.len());
        let notify = ctx.address().recipient();
        let executor = self.executor.clone();
        let store = self.store.clone();
        let env = self.settings.config.multiprocessing.env_vars.clone();
        let launch = match self.settings.start_method {
            StartMethod::Process => {
                let mut config = self.settings.config.clone();
                config.redis.url = None;
                let record = TaskRecord {
                    kind: TaskKind::PoolWorker(spec),
                    name: name.clone(),
                    identity: vec![number as u32],
                    // Pool workers are daemonic, as in Python.
                    daemon: true,
                    stream_output: config.multiprocessing.stream_stdout,
                    config,
                };
                let keys = ProcessKeys::new(store.keys(), &worker_id);
                let launch = Launch {
                    id: worker_id.clone(),
                    name,
                    workload: Workload::Subprocess {
                        task_id: worker_id.clone(),
                    },
                    env,
                    notify,
                };
                async move {
                    record.write(&store, &keys).await?;
                    executor.launch(launch).await
                }
                .boxed_local()
            }
            StartMethod::Thread => {
                let info = ProcessInfo {
                    name: name.clone(),
                    identity: vec![number as u32],
                    daemon: true,
                };
                let body_store = store.clone();
                let body = Box::new(move || match pool::run_worker(&body_store, &spec) {
                    Ok(_) => 0,
                    Err(e) => {
                        eprintln!("shoal pool worker: {e}");
                        1
                    }
                });
                let launch = Launch {
                    id: worker_id.clone(),
                    name,
                    workload: Workload::Thread { body, info },
                    env,
                    notify,
                };
                async move { executor.launch(launch).await }.boxed_local()
            }
        };
        ctx.spawn(
            launch
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(_) => {
                        if let Some(slot) = act.workers.get_mut(&worker_id) {
                            slot.launched = true;
                        }
                        // terminate() came while it was starting.
                        if !matches!(act.phase, Phase::Running | Phase::Closing) {
                            let executor = act.executor.clone();
                            actix::spawn(async move {
                                let _ = executor.signal(worker_id, StopSignal::Terminate).await;
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!("pool {}: starting a worker failed: {e}", act.id);
                        act.workers.remove(&worker_id);
                        act.shared.update(|s| s.live_workers = act.workers.len());
                        if matches!(act.phase, Phase::Running | Phase::Closing) {
                            act.worker_failed(ctx, format!("a worker could not start: {e}"));
                        } else if act.workers.is_empty() {
                            act.workers_gone(ctx);
                        }
                    }
                }),
        );
    }

    /// Counts a worker failure against the restart budget; replaces the worker or breaks the
    /// pool.
    fn worker_failed(&mut self, ctx: &mut Context<Self>, reason: String) {
        let now = Instant::now();
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.settings.restart_period)
        {
            self.failures.pop_front();
        }
        if self.failures.len() > self.settings.max_restarts as usize {
            let why = format!(
                "{} worker failures within {:?} exceed pool.max_restarts = {} (last: {reason})",
                self.failures.len(),
                self.settings.restart_period,
                self.settings.max_restarts
            );
            self.break_pool(ctx, why);
        } else {
            self.replace_worker(ctx);
        }
    }

    fn replace_worker(&mut self, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Running | Phase::Closing)
            && self.workers.len() < self.settings.processes
        {
            self.spawn_worker(ctx);
        }
    }

    fn break_pool(&mut self, ctx: &mut Context<Self>, reason: String) {
        tracing::error!("pool {} is broken: {reason}", self.id);
        self.end_calls(|function| {
            Error::Task(TaskError {
                function: function.to_string(),
                message: format!("the pool gave up: {reason}"),
                kind: TaskErrorKind::Crashed,
                attempts: 0,
            })
        });
        self.phase = Phase::Broken(reason.clone());
        self.shared.update(|s| s.phase = Phase::Broken(reason));
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

    /// Every worker has exited: the pool is done.
    fn workers_gone(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let keys = self.keys.clone();
        actix::spawn(async move {
            if let Err(e) = pool::delete_streams(&store, &keys) {
                tracing::debug!("deleting a finished pool's keys: {e}");
            }
        });
        self.shared.update(|s| {
            s.live_workers = 0;
            s.finished = true;
        });
        ctx.stop();
    }

    /// Completes a `Collect` call: the callback runs first, then `get()` sees the outcome (the
    /// order Python keeps).
    fn finish_call(&mut self, mut record: CallRecord, outcome: Result<Vec<ByteBuf>>) {
        if let Some(progress) = record.progress.take() {
            progress.finish_and_clear();
        }
        match record.delivery {
            Delivery::Collect => match record.completion.take() {
                Some(completion) => {
                    let shared = record.shared.clone();
                    let job: Box<dyn FnOnce() + Send> = Box::new(move || {
                        // A panicking callback must not leave get() waiting forever.
                        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            completion(&outcome)
                        }));
                        if ran.is_err() {
                            tracing::error!("a pool callback panicked");
                        }
                        shared.complete(outcome);
                    });
                    if let Err(returned) = self.callbacks.send(job) {
                        (returned.0)();
                    }
                }
                None => record.shared.complete(outcome),
            },
            Delivery::Ordered | Delivery::Unordered => {
                if let Err(e) = outcome {
                    record.shared.end(e);
                }
            }
        }
    }

    fn on_result(&mut self, entry: ResultEntry) {
        let Some(record) = self.calls.get_mut(&entry.call) else {
            return;
        };
        if !record.seen.insert(entry.chunk) {
            tracing::debug!(
                call = entry.call,
                chunk = entry.chunk,
                "duplicate result dropped"
            );
            return;
        }
        let result = match entry.body {
            ResultBody::Outcome(bytes) => {
                match self
                    .store
                    .decode::<ChunkOutcome>(&bytes, &self.keys.results)
                {
                    Ok(outcome) => ChunkResult {
                        outputs: outcome.outputs,
                        failure: outcome.failure.map(|f| TaskError {
                            function: record.function.clone(),
                            message: f.message,
                            kind: f.kind,
                            attempts: entry.attempt,
                        }),
                    },
                    Err(e) => ChunkResult {
                        outputs: Vec::new(),
                        failure: Some(TaskError {
                            function: record.function.clone(),
                            message: e.to_string(),
                            kind: TaskErrorKind::Error,
                            attempts: entry.attempt,
                        }),
                    },
                }
            }
            ResultBody::Crashed(message) => ChunkResult {
                outputs: Vec::new(),
                failure: Some(TaskError {
                    function: record.function.clone(),
                    message: format!("{message} (worker {})", entry.worker),
                    kind: TaskErrorKind::Crashed,
                    attempts: entry.attempt,
                }),
            },
        };
        if let Some(progress) = &record.progress {
            progress.inc(result.outputs.len() as u64 + u64::from(result.failure.is_some()));
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
                } else {
                    record.collected.insert(entry.chunk, result.outputs);
                }
            }
            Delivery::Ordered | Delivery::Unordered => {
                record.shared.push(entry.chunk as usize, result);
            }
        }
        self.check_call(entry.call);
    }

    /// Completes a call whose outcome is known.
    fn check_call(&mut self, call: u64) {
        let Some(record) = self.calls.get(&call) else {
            return;
        };
        let all_seen = record.total.is_some_and(|t| record.seen.count() >= t);
        let done = match record.delivery {
            Delivery::Collect => {
                let failure_settled = record
                    .failure
                    .as_ref()
                    .is_some_and(|(chunk, _)| record.seen.prefix >= *chunk);
                failure_settled || all_seen
            }
            Delivery::Ordered | Delivery::Unordered => all_seen,
        };
        if !done {
            return;
        }
        let Some(mut record) = self.calls.remove(&call) else {
            return;
        };
        let outcome = match record.failure.take() {
            Some((_, failure)) => Err(Error::Task(failure)),
            None => Ok(std::mem::take(&mut record.collected)
                .into_values()
                .flatten()
                .collect()),
        };
        self.finish_call(record, outcome);
    }

    /// Sends the stop entries once a closing pool has no call left.
    fn maybe_stop(&mut self, ctx: &mut Context<Self>) {
        if self.phase != Phase::Closing || !self.calls.is_empty() {
            return;
        }
        self.phase = Phase::Stopping;
        self.shared.update(|s| s.phase = Phase::Stopping);
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
                    pipe.cmd("XADD")
                        .arg(&keys.tasks)
                        .arg("*")
                        .arg("s")
                        .arg(1)
                        .ignore();
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

    fn start_reader(&self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let key = self.keys.results.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let mut conn = match store.dedicated(Some(READ_BLOCK)).await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::error!("pool result reader: {e}");
                    return;
                }
            };
            let mut last = "0-0".to_string();
            let mut untrimmed = 0usize;
            let mut trimmed_at = Instant::now();
            while me.connected() {
                let mut pipe = redis::pipe();
                // Entries read are trimmed in the next read's round trip, every TRIM_EVERY
                // entries or once a second.
                if untrimmed > 0
                    && (untrimmed >= TRIM_EVERY || trimmed_at.elapsed() >= Duration::from_secs(1))
                {
                    pipe.cmd("XTRIM").arg(&key).arg("MINID").arg(&last).ignore();
                    untrimmed = 0;
                    trimmed_at = Instant::now();
                }
                pipe.cmd("XREAD")
                    .arg("COUNT")
                    .arg(READ_BATCH)
                    .arg("BLOCK")
                    .arg(READ_BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last);
                let read: redis::RedisResult<(Option<StreamReadReply>,)> =
                    pipe.query_async(&mut conn).await;
                let reply = match read {
                    Ok((reply,)) => reply,
                    Err(e) => {
                        tracing::warn!("pool result reader: {e}");
                        actix::clock::sleep(READ_BLOCK).await;
                        continue;
                    }
                };
                let entries: Vec<ResultEntry> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .filter_map(|id| {
                        last = id.id.clone();
                        ResultEntry::parse(&id)
                    })
                    .collect();
                untrimmed += entries.len();
                if !entries.is_empty() && me.send(Results(entries)).await.is_err() {
                    break;
                }
            }
        });
    }
}

impl Actor for PoolSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.start_reader(ctx);
        let every = (self.settings.lease / 2).max(Duration::from_millis(50));
        ctx.run_interval(every, |act, ctx| act.check_leases(ctx));
    }
}

impl PoolSupervisor {
    fn check_leases(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.phase, Phase::Running | Phase::Closing) {
            return;
        }
        let store = self.store.clone();
        let keys = self.keys.clone();
        let lease = self.settings.lease;
        let attempts = self.attempts_allowed();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                pool::requeue_idle(&mut conn, &store, &keys, lease, attempts).await
            }
            .into_actor(self)
            .map(|result, act, _ctx| match result {
                Ok(moved) => {
                    for worker in moved.workers {
                        if act.workers.contains_key(&worker) {
                            tracing::warn!(
                                "pool {}: worker {worker} stopped renewing its lease; killing it",
                                act.id
                            );
                            let executor = act.executor.clone();
                            actix::spawn(async move {
                                let _ = executor.signal(worker, StopSignal::Kill).await;
                            });
                        }
                    }
                }
                Err(e) => tracing::warn!("pool {}: checking leases: {e}", act.id),
            }),
        );
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

/// A new call; sent before its first chunk.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct RegisterCall {
    pub(crate) call: u64,
    pub(crate) function: String,
    pub(crate) shared: Arc<CallShared>,
    pub(crate) delivery: Delivery,
    pub(crate) completion: Option<Completion>,
    pub(crate) progress: Option<ProgressBar>,
}

impl Handler<RegisterCall> for PoolSupervisor {
    type Result = Result<()>;

    fn handle(&mut self, msg: RegisterCall, _: &mut Context<Self>) -> Result<()> {
        match &self.phase {
            Phase::Running => {}
            Phase::Broken(reason) => {
                return Err(Error::invalid_state(format!(
                    "the pool is broken: {reason}"
                )));
            }
            Phase::Terminated => return Err(Error::invalid_state("the pool was terminated")),
            Phase::Closing | Phase::Stopping => {
                return Err(Error::invalid_state("the pool is closed"));
            }
        }
        self.calls.insert(
            msg.call,
            CallRecord {
                function: msg.function,
                shared: msg.shared,
                delivery: msg.delivery,
                total: None,
                seen: SeenChunks::default(),
                collected: BTreeMap::new(),
                failure: None,
                completion: msg.completion,
                progress: msg.progress,
            },
        );
        Ok(())
    }
}

/// A feeder sent every chunk of a call.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FeedDone {
    pub(crate) call: u64,
    pub(crate) total: u64,
}

impl Handler<FeedDone> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: FeedDone, ctx: &mut Context<Self>) {
        if let Some(record) = self.calls.get_mut(&msg.call) {
            record.total = Some(msg.total);
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

/// A feeder could not send a call's items.
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

/// The caller dropped a streaming call.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CancelCall {
    pub(crate) call: u64,
}

impl Handler<CancelCall> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: CancelCall, ctx: &mut Context<Self>) {
        if let Some(mut record) = self.calls.remove(&msg.call)
            && let Some(progress) = record.progress.take()
        {
            progress.finish_and_clear();
        }
        self.maybe_stop(ctx);
    }
}

/// A batch from the results stream.
#[derive(Message)]
#[rtype(result = "()")]
struct Results(Vec<ResultEntry>);

impl Handler<Results> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Results, ctx: &mut Context<Self>) {
        for entry in msg.0 {
            self.on_result(entry);
        }
        self.maybe_stop(ctx);
    }
}

impl Handler<WorkerExited> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: WorkerExited, ctx: &mut Context<Self>) {
        let Some(slot) = self.workers.remove(&msg.id) else {
            return;
        };
        self.shared.update(|s| s.live_workers = self.workers.len());
        tracing::debug!(pool = %self.id, worker = slot.number, code = msg.code, "pool worker exited");
        // The worker's own task record is no longer needed.
        let store = self.store.clone();
        let process_keys = ProcessKeys::new(store.keys(), &msg.id);
        actix::spawn(async move {
            if let Ok(mut conn) = store.multiplexed().await {
                let _ = redis::cmd("DEL")
                    .arg(&process_keys.task)
                    .arg(&process_keys.status)
                    .arg(&process_keys.output)
                    .query_async::<()>(&mut conn)
                    .await;
            }
        });
        match self.phase {
            Phase::Running | Phase::Closing => {
                // Whatever it held goes to another worker (or fails, out of attempts).
                let store = self.store.clone();
                let keys = self.keys.clone();
                let attempts = self.attempts_allowed();
                let worker = msg.id.clone();
                ctx.spawn(
                    async move {
                        let mut conn = store.multiplexed().await?;
                        pool::requeue_consumer(&mut conn, &store, &keys, &worker, attempts).await
                    }
                    .into_actor(self)
                    .map(|result, act, _| {
                        if let Err(e) = result {
                            tracing::warn!(
                                "pool {}: redelivering a dead worker's chunks: {e}",
                                act.id
                            );
                        }
                    }),
                );
                if msg.code == 0 {
                    self.replace_worker(ctx);
                } else {
                    self.worker_failed(ctx, format!("worker exited with code {}", msg.code));
                }
            }
            Phase::Stopping | Phase::Terminated | Phase::Broken(_) => {
                if self.workers.is_empty() {
                    self.workers_gone(ctx);
                }
            }
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
        if self.phase == Phase::Running {
            self.phase = Phase::Closing;
            self.shared.update(|s| s.phase = Phase::Closing);
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
            self.phase = Phase::Terminated;
            self.shared.update(|s| s.phase = Phase::Terminated);
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

#[cfg(test)]
mod tests {
    use super::SeenChunks;

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
