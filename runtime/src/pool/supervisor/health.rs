//! What the supervisor watches besides its workers' exits: chunk leases, its own liveness key
//! (for the workers), and the store.
//!
//! * **Leases.** Every half lease, `pool/requeue.lua` moves the chunks idle for longer than the
//!   lease (their worker stopped renewing: hung, paused or cut off) and the supervisor kills those
//!   workers, which are then replaced. While Redis does not answer, no worker can renew, so an
//!   outage longer than the lease would make every busy worker look silent once it ends. Hence the
//!   check is made only when Redis answers: not while it is unreachable, nor for one lease after it
//!   answers again (the workers renew first, every third of a lease), and each check first sends a
//!   probe (which refreshes the streams' TTL) and moves nothing when that is slow (an outage is
//!   going on or just ended). An outage is an operation failing because Redis is unreachable, or
//!   one whose answer took longer than a quarter of the lease ([`StoreHealth::slow`]: paused,
//!   stalled, cut off without an error). One check at a time, so none piles up behind an outage.
//!   Should a check still run across an outage (one sent just as it began), the workers whose
//!   leases it found expired are not killed at once: only if their heartbeat does not stamp the
//!   `workers` hash within a lease (a worker alive and busy goes on; whichever outcome of its chunk
//!   comes first is kept), so a live worker is not killed nor charged to the restart budget for it.
//! * **Driver liveness.** Every quarter of its TTL ([`driver_ttl`]), the supervisor sets the
//!   pool's `driver` key with that TTL. Workers exit when it lapses: a driver killed with
//!   `SIGKILL`, or cut off from Redis, leaves nothing running for nobody.
//! * **Store health.** Every Redis operation of the supervisor reports its outcome. When Redis
//!   has been unreachable (refused, dropped, timed out) for `redis.response_timeout_secs`,
//!   counted from the start of the first operation that failed, the store is lost: calls fail
//!   with the store's error, later calls too, and the workers are stopped. Workers that exit for
//!   the same reason are not counted as crashes, nor are leases that lapsed during an outage.
//!   Workers that keep exiting so while the supervisor reaches Redis (they are told an address
//!   they cannot reach) break the pool after a bound instead (see [`super::budget`]).

use std::time::{Duration, Instant};

use actix::prelude::*;
use shoal_core::error::{Error, RedisContext, Result};
use shoal_core::store::Store;
use shoal_executor::pool::{self, Blame, Requeued, driver_ttl};
use shoal_executor::protocol::StopSignal;

use super::{Breakdown, PoolSupervisor};

/// A worker's exit charged to the restart budget once its chunks were redelivered.
pub(super) struct WorkerFailure {
    /// What to say if it breaks the pool.
    pub(super) reason: String,
    /// How long the worker lived.
    pub(super) lived: Duration,
}

/// Whether Redis answers, as the supervisor's operations see it.
#[derive(Debug)]
pub(super) struct StoreHealth {
    response_timeout: Duration,
    /// The task lease: lease checks wait this long after an outage.
    lease: Duration,
    /// Start of the first failed operation since Redis last answered.
    unreachable_since: Option<Instant>,
    last_error: Option<Error>,
    /// When the last outage ended (Redis answered after failures, or an answer was slow).
    recovered_at: Option<Instant>,
}

impl StoreHealth {
    /// The health of a store whose operations time out after `response_timeout`, for a pool
    /// whose task lease is `lease`.
    pub(super) fn new(response_timeout: Duration, lease: Duration) -> Self {
        StoreHealth {
            response_timeout,
            lease,
            unreachable_since: None,
            last_error: None,
            recovered_at: None,
        }
    }

    /// An answer slower than this means Redis was not answering (paused, stalled, cut off): a
    /// quarter of the lease, well under the two thirds that a busy worker, which renews every
    /// third of a lease, needs Redis to be silent for to look as if it stopped renewing.
    pub(super) fn slow(&self) -> Duration {
        (self.lease / 4).max(Duration::from_millis(10))
    }

    /// Records the outcome of an operation started at `started` and ended at `ended`.
    pub(super) fn report(
        &mut self,
        started: Instant,
        ended: Instant,
        outcome: std::result::Result<(), &Error>,
    ) {
        match outcome {
            Err(e) if e.is_store_unreachable() => {
                let since = self.unreachable_since.get_or_insert(started);
                *since = (*since).min(started);
                self.last_error = Some(e.clone());
            }
            // Redis answered (an error too is an answer): it is reachable; if it had failed or
            // took long, an outage just ended.
            Ok(()) | Err(_) => {
                let failed = self.unreachable_since.take().is_some();
                if failed || ended.saturating_duration_since(started) > self.slow() {
                    self.recovered_at = Some(self.recovered_at.map_or(ended, |r| r.max(ended)));
                }
                self.last_error = None;
            }
        }
    }

    /// Whether a lease check may run at `now`: Redis answers, and did for a lease since its
    /// last outage, so that every live worker renewed its lease since (see the module docs).
    pub(super) fn leases_checkable(&self, now: Instant) -> bool {
        self.unreachable_since.is_none()
            && self
                .recovered_at
                .is_none_or(|at| now.saturating_duration_since(at) >= self.lease)
    }

    /// Whether an operation started at `started`, whose outcome was reported already, may have
    /// met an outage: Redis is unreachable, or an outage ended since it started.
    pub(super) fn overlaps_outage(&self, started: Instant) -> bool {
        self.unreachable_since.is_some() || self.recovered_at.is_some_and(|at| at >= started)
    }

    /// The error calls get when Redis has been unreachable for the response timeout.
    pub(super) fn lost(&self, now: Instant) -> Option<Error> {
        let since = self.unreachable_since?;
        let down = now.saturating_duration_since(since);
        if down < self.response_timeout {
            return None;
        }
        Some(match &self.last_error {
            Some(Error::Redis { context, source }) => Error::Redis {
                context: format!(
                    "the store was unreachable for {:.1} s (redis.response_timeout_secs = {}), \
                     last while {context}",
                    down.as_secs_f64(),
                    self.response_timeout.as_secs_f64()
                ),
                source: source.clone(),
            },
            Some(other) => other.clone(),
            None => Error::invalid_state("the store is unreachable"),
        })
    }
}

impl PoolSupervisor {
    /// Starts the periodic lease check and the driver key refresh.
    pub(super) fn start_health_checks(&mut self, ctx: &mut Context<Self>) {
        let every = (self.settings.lease / 2).max(Duration::from_millis(50));
        ctx.run_interval(every, |act, ctx| act.check_leases(ctx));
        let ttl = driver_ttl(self.settings.lease);
        self.refresh_driver_key(ctx, ttl);
        ctx.run_interval(ttl / 4, move |act, ctx| {
            act.refresh_driver_key(ctx, ttl);
            act.check_store(ctx);
        });
    }

    /// Records an operation's outcome and breaks the pool if the store is lost.
    pub(super) fn store_report(
        &mut self,
        ctx: &mut Context<Self>,
        started: Instant,
        outcome: std::result::Result<(), &Error>,
    ) {
        self.health.report(started, Instant::now(), outcome);
        self.check_store(ctx);
    }

    fn check_store(&mut self, ctx: &mut Context<Self>) {
        if let Some(error) = self.health.lost(Instant::now()) {
            self.break_pool(ctx, Breakdown::StoreLost(error));
        }
    }

    fn refresh_driver_key(&mut self, ctx: &mut Context<Self>, ttl: Duration) {
        if !self.phase.supervises() {
            return;
        }
        let store = self.store.clone();
        let key = self.keys.driver.clone();
        let started = Instant::now();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("PX")
                    .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| Error::redis(format!("refreshing {key}"), e))
            }
            .into_actor(self)
            .map(move |result: Result<()>, act, ctx| {
                if let Err(e) = &result {
                    tracing::warn!("pool {}: {e}", act.id);
                }
                act.store_report(ctx, started, result.as_ref().map(|_| ()));
            }),
        );
    }

    /// Moves the chunks whose lease expired and kills their workers (see the module docs).
    fn check_leases(&mut self, ctx: &mut Context<Self>) {
        if !self.phase.supervises()
            || self.lease_check_running
            || !self.health.leases_checkable(Instant::now())
        {
            return;
        }
        self.lease_check_running = true;
        let store = self.store.clone();
        let keys = self.keys.clone();
        let lease = self.settings.lease;
        let attempts = self.attempts_allowed();
        let slow = self.health.slow();
        let started = Instant::now();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                // Redis answers now, so the workers' renewals went through: a check sent while
                // it does not would be run once it answers again, maybe before the renewals
                // waiting with it. The probe refreshes the streams' TTL, which the check's
                // script does too: an idle pool whose checks keep being skipped (a slow Redis)
                // keeps its streams all the same.
                let expiry = store.expiry_secs() as i64;
                redis::pipe()
                    .expire(&keys.tasks, expiry)
                    .ignore()
                    .expire(&keys.results, expiry)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
                    .context(|| format!("checking the leases of {}", keys.tasks))?;
                if started.elapsed() > slow {
                    return Ok(None);
                }
                pool::requeue_idle(&mut conn, &store, &keys, lease, attempts)
                    .await
                    .map(Some)
            }
            .into_actor(self)
            .map(move |result: Result<Option<Requeued>>, act, ctx| {
                act.lease_check_running = false;
                act.store_report(ctx, started, result.as_ref().map(|_| ()));
                match result {
                    Ok(None) => tracing::debug!(
                        pool = %act.id,
                        "the store answered slowly: lease checks wait for a lease"
                    ),
                    Ok(Some(moved)) => {
                        act.record_deaths(&moved.chunks);
                        let across_an_outage = act.health.overlaps_outage(started);
                        for worker in moved.workers {
                            if !act.workers.contains_key(&worker) {
                                continue;
                            }
                            if across_an_outage {
                                tracing::warn!(
                                    "pool {}: the lease of worker {worker} expired while the \
                                     store did not answer; it is killed if it stays silent",
                                    act.id
                                );
                                act.kill_if_silent(ctx, worker);
                            } else {
                                tracing::warn!(
                                    "pool {}: worker {worker} stopped renewing its lease; \
                                     killing it",
                                    act.id
                                );
                                act.kill_worker(worker);
                            }
                        }
                    }
                    // Redis lost the pool's state: nothing in flight can complete.
                    Err(e) if pool::is_state_lost(&e) => {
                        act.break_pool(ctx, Breakdown::StoreLost(pool::state_lost(&act.keys)));
                    }
                    Err(e) => tracing::warn!("pool {}: checking leases: {e}", act.id),
                }
            }),
        );
    }

    /// Kills `worker` (its exit is then handled as any: a failure, replaced).
    fn kill_worker(&self, worker: String) {
        let executor = self.executor.clone();
        actix::spawn(async move {
            let _ = executor.signal(worker, StopSignal::Kill).await;
        });
    }

    /// Kills `worker`, whose lease expired across an outage of the store, unless its heartbeat
    /// stamps the `workers` hash within the next lease (it renews every third of one). When the
    /// store fails or stalls meanwhile, that cannot tell: it looks again.
    fn kill_if_silent(&mut self, ctx: &mut Context<Self>, worker: String) {
        let lease = self.settings.lease;
        let started = Instant::now();
        let first = heartbeat_stamp(
            self.store.clone(),
            self.keys.workers.clone(),
            worker.clone(),
        );
        ctx.spawn(first.into_actor(self).map(move |before, _, ctx| {
            ctx.run_later(lease, move |act, ctx| {
                let second =
                    heartbeat_stamp(act.store.clone(), act.keys.workers.clone(), worker.clone());
                ctx.spawn(second.into_actor(act).map(move |after, act, ctx| {
                    if !act.phase.supervises() || !act.workers.contains_key(&worker) {
                        return;
                    }
                    match (before, after) {
                        (Ok(before), Ok(after)) if !act.health.overlaps_outage(started) => {
                            if before == after {
                                tracing::warn!(
                                    "pool {}: worker {worker} stayed silent after the store \
                                     answered again; killing it",
                                    act.id
                                );
                                act.kill_worker(worker);
                            } else {
                                tracing::debug!(pool = %act.id, worker, "worker alive");
                            }
                        }
                        _ => act.kill_if_silent(ctx, worker),
                    }
                }));
            });
        }));
    }

    /// Moves the chunks a worker that exited still held, charging the one it ran as `blame`
    /// says ([`pool::requeue_consumer`]); then, for a worker that `failed` (the reason), charges
    /// the failure ([`PoolSupervisor::worker_failed`]), so that a pool that gives up then knows
    /// the attempts its calls' chunks had reached.
    pub(super) fn requeue_worker_chunks(
        &mut self,
        ctx: &mut Context<Self>,
        worker: String,
        failed: Option<WorkerFailure>,
        blame: Blame,
    ) {
        let store = self.store.clone();
        let keys = self.keys.clone();
        let attempts = self.attempts_allowed();
        let started = Instant::now();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                pool::requeue_consumer(&mut conn, &store, &keys, &worker, attempts, blame).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                // A chunk left behind here is moved later by the lease check.
                let state_lost = matches!(&result, Err(e) if pool::is_state_lost(e));
                match &result {
                    Ok(moved) => act.record_deaths(&moved.chunks),
                    Err(_) if state_lost => {}
                    Err(e) => {
                        tracing::warn!("pool {}: redelivering a dead worker's chunks: {e}", act.id)
                    }
                }
                act.store_report(ctx, started, result.as_ref().map(|_| ()));
                if state_lost {
                    // Redis lost the pool's state: nothing in flight can complete.
                    act.break_pool(ctx, Breakdown::StoreLost(pool::state_lost(&act.keys)));
                } else if let Some(failure) = failed {
                    act.worker_failed(ctx, failure.reason, failure.lived);
                }
            }),
        );
    }
}

/// The last stamp of `worker`'s heartbeat in the pool's `workers` hash (`key`).
async fn heartbeat_stamp(
    store: std::sync::Arc<Store>,
    key: String,
    worker: String,
) -> Result<Option<String>> {
    let mut conn = store.multiplexed().await?;
    redis::cmd("HGET")
        .arg(&key)
        .arg(&worker)
        .query_async(&mut conn)
        .await
        .context(|| format!("reading the heartbeat of {worker} in {key}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(600);

    fn unreachable() -> Error {
        Error::redis(
            "reading results",
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        )
    }

    #[test]
    fn the_store_is_lost_after_the_response_timeout_of_failures() {
        let mut health = StoreHealth::new(Duration::from_secs(2), LEASE);
        let t0 = Instant::now();
        health.report(t0, t0, Err(&unreachable()));
        assert!(health.lost(t0 + Duration::from_millis(1999)).is_none());
        let lost = health.lost(t0 + Duration::from_secs(2)).expect("lost");
        assert!(lost.is_store_unreachable(), "{lost}");
        assert!(lost.to_string().contains("unreachable for 2.0 s"), "{lost}");
        assert!(lost.to_string().contains("reading results"), "{lost}");
    }

    #[test]
    fn an_answer_clears_the_failures() {
        let mut health = StoreHealth::new(Duration::from_secs(1), LEASE);
        let t0 = Instant::now();
        health.report(t0, t0, Err(&unreachable()));
        health.report(
            t0 + Duration::from_millis(500),
            t0 + Duration::from_millis(500),
            Ok(()),
        );
        assert!(health.lost(t0 + Duration::from_secs(5)).is_none());
        // A reply that is an error is an answer too.
        health.report(t0, t0, Err(&unreachable()));
        let reply = Error::redis(
            "x",
            redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "WRONGTYPE",
            )),
        );
        health.report(t0, t0, Err(&reply));
        assert!(health.lost(t0 + Duration::from_secs(5)).is_none());
    }

    #[test]
    fn the_earliest_failed_start_counts() {
        let mut health = StoreHealth::new(Duration::from_secs(1), LEASE);
        let t0 = Instant::now();
        // A slow operation started first reports last.
        health.report(
            t0 + Duration::from_millis(900),
            t0 + Duration::from_millis(900),
            Err(&unreachable()),
        );
        health.report(t0, t0, Err(&unreachable()));
        assert!(health.lost(t0 + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn lease_checks_wait_a_lease_after_failures() {
        let mut health = StoreHealth::new(Duration::from_secs(30), LEASE);
        let t0 = Instant::now();
        assert!(health.leases_checkable(t0));
        health.report(t0, t0, Err(&unreachable()));
        assert!(!health.leases_checkable(t0 + Duration::from_secs(5)));
        // Redis answers at 5 s: the workers renew during the next lease, checks wait for it.
        let back = t0 + Duration::from_secs(5);
        health.report(back, back, Ok(()));
        assert!(!health.leases_checkable(back + LEASE / 2));
        assert!(health.leases_checkable(back + LEASE));
        // A check started during the outage met it; one started after the wait did not.
        assert!(health.overlaps_outage(t0));
        assert!(!health.overlaps_outage(back + LEASE));
    }

    #[test]
    fn a_slow_answer_is_an_outage_too() {
        let mut health = StoreHealth::new(Duration::from_secs(30), LEASE);
        let t0 = Instant::now();
        // Quick answers: nothing happened.
        health.report(t0, t0 + health.slow(), Ok(()));
        assert!(health.leases_checkable(t0 + health.slow()));
        assert!(!health.overlaps_outage(t0));
        // Paused for 2 s (no error, the response timeout is longer): checks wait a lease from
        // the answer, and an operation that started before it ended met it.
        let answered = t0 + Duration::from_secs(2);
        health.report(t0, answered, Ok(()));
        assert!(health.lost(answered).is_none());
        assert!(!health.leases_checkable(answered));
        assert!(health.leases_checkable(answered + LEASE));
        assert!(health.overlaps_outage(t0 + Duration::from_secs(1)));
        assert!(!health.overlaps_outage(answered + Duration::from_millis(1)));
        // An earlier slow answer reported later does not bring the end of the outage back.
        health.report(t0, t0 + Duration::from_secs(1), Ok(()));
        assert!(!health.leases_checkable(answered + LEASE / 2));
    }
}
