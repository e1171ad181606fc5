//! What the supervisor watches besides its workers' exits: chunk leases, its own liveness key
//! (for the workers), and the store.
//!
//! * **Leases.** Every half lease, `pool/requeue.lua` moves the chunks idle for longer than the
//!   lease (their worker stopped renewing: hung, paused or cut off) and the supervisor kills
//!   those workers, which are then replaced.
//! * **Driver liveness.** Every quarter of its TTL ([`driver_ttl`]), the supervisor sets the
//!   pool's `driver` key with that TTL. Workers exit when it lapses: a driver killed with
//!   `SIGKILL`, or cut off from Redis, leaves nothing running for nobody.
//! * **Store health.** Every Redis operation of the supervisor reports its outcome. When Redis
//!   has been unreachable (refused, dropped, timed out) for `redis.response_timeout_secs`,
//!   counted from the start of the first operation that failed, the store is lost: calls fail
//!   with the store's error, later calls too, and the workers are stopped. Workers that exit for
//!   the same reason are not counted as crashes.

use std::time::{Duration, Instant};

use actix::prelude::*;
use shoal_core::error::{Error, Result};
use shoal_executor::pool::{self, driver_ttl};
use shoal_executor::protocol::StopSignal;

use super::{Breakdown, PoolSupervisor};

/// Whether Redis answers, as the supervisor's operations see it.
#[derive(Debug)]
pub(super) struct StoreHealth {
    response_timeout: Duration,
    /// Start of the first failed operation since Redis last answered.
    unreachable_since: Option<Instant>,
    last_error: Option<Error>,
}

impl StoreHealth {
    pub(super) fn new(response_timeout: Duration) -> Self {
        StoreHealth {
            response_timeout,
            unreachable_since: None,
            last_error: None,
        }
    }

    /// Records the outcome of an operation started at `started`.
    pub(super) fn report(&mut self, started: Instant, outcome: std::result::Result<(), &Error>) {
        match outcome {
            Ok(()) => {
                self.unreachable_since = None;
                self.last_error = None;
            }
            Err(e) if e.is_store_unreachable() => {
                let since = self.unreachable_since.get_or_insert(started);
                *since = (*since).min(started);
                self.last_error = Some(e.clone());
            }
            // Redis answered, with an error: it is reachable.
            Err(_) => {
                self.unreachable_since = None;
                self.last_error = None;
            }
        }
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
        self.health.report(started, outcome);
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

    fn check_leases(&mut self, ctx: &mut Context<Self>) {
        if !self.phase.supervises() {
            return;
        }
        let store = self.store.clone();
        let keys = self.keys.clone();
        let lease = self.settings.lease;
        let attempts = self.attempts_allowed();
        let started = Instant::now();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                pool::requeue_idle(&mut conn, &store, &keys, lease, attempts).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.store_report(ctx, started, result.as_ref().map(|_| ()));
                match result {
                    Ok(moved) => {
                        act.record_deaths(&moved.chunks);
                        for worker in moved.workers {
                            if act.workers.contains_key(&worker) {
                                tracing::warn!(
                                    "pool {}: worker {worker} stopped renewing its lease; \
                                     killing it",
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
                }
            }),
        );
    }

    /// Moves the chunks a worker that exited still held; then, for a worker that `failed`
    /// (the reason), charges the failure ([`PoolSupervisor::worker_failed`]), so that a pool
    /// that gives up then knows the attempts its calls' chunks had reached.
    pub(super) fn requeue_worker_chunks(
        &mut self,
        ctx: &mut Context<Self>,
        worker: String,
        failed: Option<String>,
    ) {
        let store = self.store.clone();
        let keys = self.keys.clone();
        let attempts = self.attempts_allowed();
        let started = Instant::now();
        ctx.spawn(
            async move {
                let mut conn = store.multiplexed().await?;
                pool::requeue_consumer(&mut conn, &store, &keys, &worker, attempts).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                // A chunk left behind here is moved later by the lease check.
                match &result {
                    Ok(moved) => act.record_deaths(&moved.chunks),
                    Err(e) => {
                        tracing::warn!("pool {}: redelivering a dead worker's chunks: {e}", act.id)
                    }
                }
                act.store_report(ctx, started, result.as_ref().map(|_| ()));
                if let Some(reason) = failed {
                    act.worker_failed(ctx, reason);
                }
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> Error {
        Error::redis(
            "reading results",
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        )
    }

    #[test]
    fn the_store_is_lost_after_the_response_timeout_of_failures() {
        let mut health = StoreHealth::new(Duration::from_secs(2));
        let t0 = Instant::now();
        health.report(t0, Err(&unreachable()));
        assert!(health.lost(t0 + Duration::from_millis(1999)).is_none());
        let lost = health.lost(t0 + Duration::from_secs(2)).expect("lost");
        assert!(lost.is_store_unreachable(), "{lost}");
        assert!(lost.to_string().contains("unreachable for 2.0 s"), "{lost}");
        assert!(lost.to_string().contains("reading results"), "{lost}");
    }

    #[test]
    fn an_answer_clears_the_failures() {
        let mut health = StoreHealth::new(Duration::from_secs(1));
        let t0 = Instant::now();
        health.report(t0, Err(&unreachable()));
        health.report(t0 + Duration::from_millis(500), Ok(()));
        assert!(health.lost(t0 + Duration::from_secs(5)).is_none());
        // A reply that is an error is an answer too.
        health.report(t0, Err(&unreachable()));
        let reply = Error::redis(
            "x",
            redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "WRONGTYPE",
            )),
        );
        health.report(t0, Err(&reply));
        assert!(health.lost(t0 + Duration::from_secs(5)).is_none());
    }

    #[test]
    fn the_earliest_failed_start_counts() {
        let mut health = StoreHealth::new(Duration::from_secs(1));
        let t0 = Instant::now();
        // A slow operation started first reports last.
        health.report(t0 + Duration::from_millis(900), Err(&unreachable()));
        health.report(t0, Err(&unreachable()));
        assert!(health.lost(t0 + Duration::from_secs(1)).is_some());
    }
}
