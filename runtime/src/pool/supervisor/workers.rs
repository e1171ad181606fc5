//! Launching pool workers through the executor, and what a worker's exit means.
//!
//! Workers run with the pool's start method: a subprocess of this binary reading a task record
//! (it gets the parent-death signal and watches the driver's liveness key, so it never outlives
//! the driver), or a thread of this process. When one exits while the pool runs, the chunks it
//! held are redelivered and a replacement is started; its exit code says how to count it:
//!
//! | exit | meaning | replacement |
//! | --- | --- | --- |
//! | 0 | `maxtasksperchild` reached, or stopped | at once |
//! | [`EXIT_STORE_LOST`] | it could not reach Redis | after the store back-off, not charged; too many in a row while the supervisor reaches Redis break the pool (see `budget`) |
//! | [`EXIT_DRIVER_GONE`] | it saw no driver (the liveness key lapsed) | as a store failure |
//! | [`EXIT_POOL_GONE`] | the pool's state is gone from Redis | none: the pool breaks, once the redelivery meets `NOGROUP` (else as a failure) |
//! | anything else | a failure (crash, kill, lost lease) | charged to the budget, backed off |
//!
//! A worker that found the pool's task stream or its consumer group gone (Redis restarted
//! without persistence, failed over to a replica that lagged, evicted the key) is not replaced:
//! the chunks of every call went with the stream, so no call can complete, and a replacement
//! would find the same at once. The redelivery of its chunks confirms it (`NOGROUP`), and the
//! pool breaks instead: its calls, and later ones, fail with [`pool::state_lost`], and its
//! workers are stopped. Without that confirmation (a task that called `exit(77)` itself) the
//! exit is an ordinary failure.
//!
//! A worker whose output is streamed (`multiprocessing.stream_stdout`, and always on a remote
//! backend, where a worker's terminal is its pod's log) has a printer task: it prints the
//! worker's output stream here, as a process's parent does, until the worker's `eof` or its
//! exit, then deletes the worker's keys. The pool is finished (`join` returns) only once every
//! printer is done, so what the workers printed is on this terminal by then.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::FutureExt;
use shoal_core::config::StartMethod;
use shoal_core::context::{ParentInfo, ProcessInfo};
use shoal_executor::output::print_stream;
use shoal_executor::pool::{
    self, Blame, EXIT_DRIVER_GONE, EXIT_POOL_GONE, EXIT_STORE_LOST, PoolWorkerSpec, WorkerEnd,
    driver_ttl,
};
use shoal_executor::protocol::{Launch, StopSignal, WorkerExited, Workload};
use shoal_executor::task::{ProcessKeys, TaskKind, TaskRecord, hand_over_authkey};

use super::budget::{self, Verdict};
use super::health::WorkerFailure;
use super::{Breakdown, Phase, PoolSupervisor};

/// A worker the supervisor started.
pub(super) struct WorkerSlot {
    pub(super) number: u64,
    /// The executor launched it (until then it cannot be signalled).
    pub(super) launched: bool,
    /// It was killed because it did not stop a cancelled task: not a failure.
    pub(super) stopped_for_cancel: bool,
    /// Its output printer's view of it (a worker whose output is streamed).
    pub(super) output: Option<Arc<PrintedWorker>>,
    /// When it was started: a worker that fails soon after counts against the budget while
    /// calls wait, however far apart such failures are (see `budget`).
    pub(super) started: Instant,
}

impl PoolSupervisor {
    pub(super) fn spawn_worker(&mut self, ctx: &mut Context<Self>) {
        self.workers_started += 1;
        let number = self.workers_started;
        let worker_id = uuid::Uuid::new_v4().simple().to_string();
        let subprocess = self.settings.start_method == StartMethod::Process;
        let spec = PoolWorkerSpec {
            pool_id: self.id.clone(),
            worker_id: worker_id.clone(),
            initializer: self.settings.initializer.clone(),
            maxtasksperchild: self.settings.maxtasksperchild,
            lease_ms: millis(self.settings.lease),
            // A worker thread lives and dies with its driver: nothing to watch.
            driver_ttl_ms: if subprocess {
                millis(driver_ttl(self.settings.lease))
            } else {
                0
            },
        };
        let name = format!("PoolWorker-{number}");
        self.workers.insert(
            worker_id.clone(),
            WorkerSlot {
                number,
                launched: false,
                stopped_for_cancel: false,
                output: None,
                started: Instant::now(),
            },
        );
        self.shared.update(|s| s.live_workers = self.workers.len());
        let streamed = subprocess
            && (self.settings.config.multiprocessing.stream_stdout
                || self.settings.config.shoal.backend.is_remote());
        if streamed {
            // Printing starts before the launch: a worker that ends at once (before the
            // launch's result is handled) still has its output printed.
            let output = Arc::new(PrintedWorker::default());
            if let Some(slot) = self.workers.get_mut(&worker_id) {
                slot.output = Some(output.clone());
            }
            self.print_worker_output(ctx, worker_id.clone(), output);
        }
        let notify = ctx.address().recipient();
        let executor = self.executor.clone();
        let store = self.store.clone();
        let mut env = self.settings.config.multiprocessing.env_vars.clone();
        let info = ProcessInfo {
            name: name.clone(),
            identity: vec![number as u32],
            // Pool workers are daemonic, as in Python.
            daemon: true,
            authkey: self.settings.creator.authkey.clone(),
            parent: Some(ParentInfo {
                name: self.settings.creator.name.clone(),
                pid: Some(std::process::id()),
            }),
        };
        let launch = if subprocess {
            let mut config = self.settings.config.clone();
            config.redis.url = None;
            // The key goes in the worker's environment, never in its record in Redis.
            hand_over_authkey(&info.authkey, &mut env);
            let record = TaskRecord {
                kind: TaskKind::PoolWorker(spec),
                name: name.clone(),
                identity: info.identity.clone(),
                daemon: info.daemon,
                stream_output: streamed,
                config,
                parent: info.parent.clone(),
                // Watched through its own spec's driver key.
                driver: None,
            };
            let keys = ProcessKeys::new(store.keys(), &worker_id);
            let launch = Launch {
                id: worker_id.clone(),
                name,
                workload: Workload::Subprocess {
                    task_id: worker_id.clone(),
                },
                env,
                die_with_parent: true,
                notify,
            };
            async move {
                record.write(&store, &keys).await?;
                executor.launch(launch).await
            }
            .boxed_local()
        } else {
            let body_store = store.clone();
            let body = Box::new(move || match pool::run_worker(&body_store, &spec) {
                // As a worker process does (see the module docs): not replaced.
                Ok(WorkerEnd::PoolGone) => EXIT_POOL_GONE,
                Ok(_) => 0,
                Err(e) if e.is_store_unreachable() => {
                    eprintln!("shoal pool worker: {e}");
                    EXIT_STORE_LOST
                }
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
                die_with_parent: true,
                notify,
            };
            async move { executor.launch(launch).await }.boxed_local()
        };
        ctx.spawn(
            launch
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(_) => {
                        if let Some(slot) = act.workers.get_mut(&worker_id) {
                            slot.launched = true;
                        }
                        // terminate() came while it was starting (a closing pool lets it run
                        // its initializer and read its stop entry).
                        if matches!(act.phase, Phase::Terminated | Phase::Broken(_)) {
                            let executor = act.executor.clone();
                            actix::spawn(async move {
                                let _ = executor.signal(worker_id, StopSignal::Terminate).await;
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!("pool {}: starting a worker failed: {e}", act.id);
                        if let Some(output) =
                            act.workers.remove(&worker_id).and_then(|slot| slot.output)
                        {
                            // Nothing will print: its printer ends at its next empty read.
                            output.exited.store(true, Ordering::Release);
                            if output.one_side_done() {
                                delete_worker_keys(&act.store, &worker_id);
                            }
                        }
                        act.shared.update(|s| s.live_workers = act.workers.len());
                        if !act.phase.supervises() {
                            if act.workers.is_empty() {
                                act.workers_gone(ctx);
                            }
                        } else if e.is_store_unreachable() {
                            let after = act.budget.store_failure();
                            act.replace_worker(ctx, after);
                        } else {
                            act.worker_failed(
                                ctx,
                                format!("a worker could not start: {e}"),
                                Duration::ZERO,
                            );
                        }
                    }
                }),
        );
    }

    /// Charges a worker failure to the restart budget; replaces the worker (after the
    /// back-off) or breaks the pool.
    pub(super) fn worker_failed(
        &mut self,
        ctx: &mut Context<Self>,
        reason: String,
        lived: Duration,
    ) {
        // With calls waiting, failures of short-lived workers count whatever their timing (see
        // the module docs of `budget`): slow ones (an initializer that crashes after a long
        // start) would otherwise restart workers forever while the calls hang; a worker that
        // ran long and then died (an eviction) is not such a one.
        let calls_waiting = !self.calls.is_empty();
        let soon = lived < self.settings.restart_period.max(budget::SHORT_LIVED);
        match self.budget.failure(Instant::now(), calls_waiting, soon) {
            Verdict::Restart { after } => self.replace_worker(ctx, after),
            Verdict::GiveUp { failures } => {
                let why = format!(
                    "{failures} worker failures without a completed chunk (within {:?}, or while \
                     calls waited) exceed pool.max_restarts = {} (last: {reason})",
                    self.settings.restart_period, self.settings.max_restarts
                );
                self.break_pool(ctx, Breakdown::GaveUp(why));
            }
        }
    }

    /// Charges a worker the backend could not start (see the module docs of `budget`);
    /// replaces it (after the back-off) or breaks the pool.
    fn worker_never_started(&mut self, ctx: &mut Context<Self>, reason: String) {
        let calls_waiting = !self.calls.is_empty();
        match self.budget.never_started(Instant::now(), calls_waiting) {
            Verdict::Restart { after } => self.replace_worker(ctx, after),
            Verdict::GiveUp { failures } => {
                let why = format!(
                    "{failures} workers in a row could not be started by the backend, none ran in \
                     between (last: {reason})"
                );
                self.break_pool(ctx, Breakdown::GaveUp(why));
            }
        }
    }

    /// Prints worker `worker_id`'s output stream until it ends (see the module docs).
    fn print_worker_output(
        &mut self,
        ctx: &mut Context<Self>,
        worker_id: String,
        output: Arc<PrintedWorker>,
    ) {
        self.printing.insert(worker_id.clone());
        let store = self.store.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let key = ProcessKeys::new(store.keys(), &worker_id).output;
            print_stream(&store, key, &output.exited).await;
            if output.one_side_done() {
                delete_worker_keys(&store, &worker_id);
            }
            me.do_send(OutputPrinted { worker_id });
        });
    }

    /// Starts a worker after `after` if the pool still supervises and lacks one then.
    pub(super) fn replace_worker(&mut self, ctx: &mut Context<Self>, after: Duration) {
        if !after.is_zero() {
            ctx.run_later(after, |act, ctx| act.replace_worker(ctx, Duration::ZERO));
            return;
        }
        if self.phase.supervises() && self.workers.len() < self.settings.processes {
            self.spawn_worker(ctx);
        }
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
        match &slot.output {
            Some(output) => {
                output.exited.store(true, Ordering::Release);
                // The worker wrote its exit after its output's end: whichever of this exit
                // and the printer's end comes last deletes its keys.
                if output.one_side_done() {
                    delete_worker_keys(&self.store, &msg.id);
                }
            }
            None => delete_worker_keys(&self.store, &msg.id),
        }
        if !self.phase.supervises() {
            if self.workers.is_empty() {
                self.workers_gone(ctx);
            }
            return;
        }
        // Whatever it held goes to another worker (or fails, out of attempts); a failure is
        // charged once that is done (see `requeue_worker_chunks`).
        if msg.never_started {
            self.requeue_worker_chunks(ctx, msg.id.clone(), None, Blame::Running);
            let reason = format!(
                "PoolWorker-{} could not be started by the backend (see its log)",
                slot.number
            );
            return self.worker_never_started(ctx, reason);
        }
        self.budget.started();
        match msg.code {
            _ if slot.stopped_for_cancel => {
                // Killed for a cancelled chunk, which the sweep removed: the chunks it held
                // behind it (other calls') are none of its doing.
                self.requeue_worker_chunks(ctx, msg.id.clone(), None, Blame::Nobody);
                self.replace_worker(ctx, Duration::ZERO);
            }
            0 => {
                self.requeue_worker_chunks(ctx, msg.id.clone(), None, Blame::Running);
                self.replace_worker(ctx, Duration::ZERO);
            }
            EXIT_POOL_GONE => {
                // The worker says the pool's state is gone from Redis; the redelivery finds
                // out (`NOGROUP` breaks the pool) and, if the state is there after all (a task
                // that called `exit(77)` itself), it is an ordinary failure.
                self.requeue_worker_chunks(
                    ctx,
                    msg.id.clone(),
                    Some(WorkerFailure {
                        reason: format!(
                            "PoolWorker-{} exited with code {EXIT_POOL_GONE} (it found the \
                             pool's state gone from Redis, or its task exited so)",
                            slot.number
                        ),
                        lived: slot.started.elapsed(),
                    }),
                    Blame::Running,
                );
            }
            EXIT_STORE_LOST | EXIT_DRIVER_GONE => {
                self.requeue_worker_chunks(ctx, msg.id.clone(), None, Blame::Running);
                if msg.code == EXIT_STORE_LOST {
                    // Redis answers the supervisor but not the workers: they are told an
                    // address they cannot reach (see the module docs of `budget`).
                    let reached = !self.health.overlaps_outage(slot.started);
                    if let Some(exits) = self.budget.cut_off(Instant::now(), reached) {
                        let why = format!(
                            "{exits} workers in a row exited with code {EXIT_STORE_LOST} (they \
                             could not reach Redis) without a completed chunk, although this \
                             driver reaches Redis: check the Redis URL the workers get \
                             (kubernetes.redis_url_secret on Kubernetes, else redis.url) and \
                             that its address is reachable from where they run"
                        );
                        return self.break_pool(ctx, Breakdown::GaveUp(why));
                    }
                }
                let after = self.budget.store_failure();
                self.replace_worker(ctx, after);
            }
            code => self.requeue_worker_chunks(
                ctx,
                msg.id.clone(),
                Some(WorkerFailure {
                    reason: format!("PoolWorker-{} exited with code {code}", slot.number),
                    lived: slot.started.elapsed(),
                }),
                Blame::Running,
            ),
        }
    }
}

/// `duration` in whole milliseconds, saturating at `u64::MAX` rather than truncating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What a worker's output printer and its exit share.
#[derive(Debug, Default)]
pub(super) struct PrintedWorker {
    /// Set once the worker's exit is known: the printer stops at its next empty read.
    exited: AtomicBool,
    /// How many of the two (the printer's end, the worker's exit) happened.
    done: std::sync::atomic::AtomicU8,
}

impl PrintedWorker {
    /// Records one side's end; true for the second, which deletes the worker's keys (the worker
    /// writes its exit status after its output's end, so they go only when both are over).
    fn one_side_done(&self) -> bool {
        self.done.fetch_add(1, Ordering::AcqRel) == 1
    }
}

/// A worker's output printer is done.
#[derive(Message)]
#[rtype(result = "()")]
struct OutputPrinted {
    worker_id: String,
}

impl Handler<OutputPrinted> for PoolSupervisor {
    type Result = ();

    fn handle(&mut self, msg: OutputPrinted, ctx: &mut Context<Self>) {
        self.printing.remove(&msg.worker_id);
        if !self.phase.supervises() && self.workers.is_empty() && self.printing.is_empty() {
            self.workers_gone(ctx);
        }
    }
}

/// Deletes a finished worker's own task record, status and output stream.
fn delete_worker_keys(store: &Arc<shoal_core::store::Store>, worker_id: &str) {
    let store = store.clone();
    let keys = ProcessKeys::new(store.keys(), worker_id);
    actix::spawn(async move {
        if let Ok(mut conn) = store.multiplexed().await {
            let _ = redis::cmd("DEL")
                .arg(&keys.task)
                .arg(&keys.status)
                .arg(&keys.output)
                .query_async::<()>(&mut conn)
                .await;
        }
    });
}
