//! The runtime's actor hosts: `actors.hosts` worker processes (or threads) started through the
//! executor when the runtime spawns its first actor, kept alive, and stopped with the runtime.
//!
//! When a host exits, the supervisor frees the leases it held (its death is known: no need to
//! wait for them to lapse), asks the other hosts, or its replacement, to take its actors over,
//! and takes it out of the live hosts and of the hosts' consumer group, whose requests it read
//! and did not acknowledge are made again (`shoal_executor::actor::orphan_host`, tried again
//! while Redis is out of reach; the runtime's shutdown waits for it, up to the grace period of
//! [`StopHosts`]). A host is always replaced, as a pool's worker is (see
//! `pool::supervisor::workers`); its exit code says after how long:
//!
//! | exit | meaning | replacement |
//! | --- | --- | --- |
//! | [`EXIT_STORE_LOST`], [`EXIT_DRIVER_GONE`], or a launch that could not reach Redis | Redis is out of reach | backs off from 100 ms to [`MAX_STORE_BACKOFF`], not charged |
//! | anything else | a failure (crash, kill, a host that cannot start) | after 100 ms while at most [`MAX_HOST_FAILURES`] came within [`HOST_FAILURE_PERIOD`]; past that, backed off up to [`MAX_CRASH_BACKOFF`] (logged) |
//!
//! So a Redis outage, however long, never ends hosting: hosts come back once Redis does. A host
//! that cannot start, or one that something keeps killing, does not loop fast, and hosts keep
//! being started at the backed-off pace rather than never again. A message whose handler aborts
//! its host's process takes down a few hosts (the one that ran it in a batch, then
//! `HOST_DEATHS_PER_MESSAGE` that ran it alone) before it is answered as a panicking message
//! and skipped (see "Host deaths" in `shoal_executor::actor`); the other actors are served
//! between those crashes. A host that lived longer than [`HOST_FAILURE_PERIOD`] clears the
//! back-offs. The supervisor keeps a liveness key the hosts watch, as a pool's workers do,
//! so a host never outlives its runtime.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::FutureExt;
use shoal_core::config::{Config, StartMethod};
use shoal_core::context::{ParentInfo, ProcessInfo};
use shoal_core::store::Store;
use shoal_executor::actor::host::{self, HostSpec};
use shoal_executor::actor::{self as protocol, HostKeys};
use shoal_executor::pool::{EXIT_DRIVER_GONE, EXIT_STORE_LOST, driver_ttl};
use shoal_executor::protocol::{Executor, Launch, StopSignal, WorkerExited, Workload};
use shoal_executor::task::{ProcessKeys, TaskKind, TaskRecord, hand_over_authkey};

/// Host failures within [`HOST_FAILURE_PERIOD`] after which replacements back off.
const MAX_HOST_FAILURES: usize = 10;
/// The window of [`MAX_HOST_FAILURES`]; a host that lived longer clears the back-offs.
const HOST_FAILURE_PERIOD: Duration = Duration::from_secs(10);
/// The pause before a replacement while failures stay within the budget.
const REPLACE_AFTER: Duration = Duration::from_millis(100);
/// Longest pause before replacing a host past the failure budget.
const MAX_CRASH_BACKOFF: Duration = Duration::from_secs(5);
/// Longest pause before replacing a host that could not reach Redis.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(2);
/// How long the supervisor tries to move a dead host's actors while Redis is out of reach.
const ORPHAN_RETRY: Duration = Duration::from_secs(60);

/// A host the supervisor started.
struct HostSlot {
    /// Numbers its name (`ActorHost-<n>`).
    number: u64,
    /// When it was started.
    started: Instant,
}

/// How a host ended, for its replacement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostEnd {
    /// It could not reach Redis (or could not be launched for that): not charged.
    StoreLost,
    /// A failure: charged to the budget.
    Failed,
}

/// What the replacements of hosts are charged (see the module docs).
#[derive(Debug, Default)]
struct ReplaceBudget {
    /// Charged failures within [`HOST_FAILURE_PERIOD`].
    failures: VecDeque<Instant>,
    /// Replacements backed off past the budget since a host last lived long.
    crash_streak: u32,
    /// Exits for an unreachable store since a host last lived long.
    store_failures: u32,
}

impl ReplaceBudget {
    /// The pause before a host that ended so at `now`, after it `lived` so long, is replaced
    /// (see the module docs).
    fn pause(&mut self, now: Instant, end: HostEnd, lived: Duration) -> Duration {
        if lived >= HOST_FAILURE_PERIOD {
            // It was healthy: what came before is forgiven.
            self.failures.clear();
            self.crash_streak = 0;
            self.store_failures = 0;
        }
        match end {
            HostEnd::StoreLost => {
                self.store_failures = self.store_failures.saturating_add(1);
                backoff(REPLACE_AFTER, self.store_failures - 1, MAX_STORE_BACKOFF)
            }
            HostEnd::Failed => {
                self.failures.push_back(now);
                while self
                    .failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > HOST_FAILURE_PERIOD)
                {
                    self.failures.pop_front();
                }
                if self.failures.len() <= MAX_HOST_FAILURES && self.crash_streak == 0 {
                    return REPLACE_AFTER;
                }
                self.crash_streak = self.crash_streak.saturating_add(1);
                let after = backoff(REPLACE_AFTER, self.crash_streak, MAX_CRASH_BACKOFF);
                if self.crash_streak == 1 {
                    tracing::error!(
                        "{} actor host failures within {HOST_FAILURE_PERIOD:?}: their \
                         replacements back off, up to {MAX_CRASH_BACKOFF:?} apart, until a host \
                         runs for {HOST_FAILURE_PERIOD:?} (a host that cannot start, or an \
                         actor that kills its host?)",
                        self.failures.len()
                    );
                }
                after
            }
        }
    }
}

/// The supervisor of one runtime's actor hosts.
pub(crate) struct HostSupervisor {
    store: Arc<Store>,
    executor: Executor,
    config: Config,
    creator: ProcessInfo,
    driver_key: String,
    hosts: HashMap<String, HostSlot>,
    started: u64,
    stopping: bool,
    /// Exited hosts whose actors and keys are being moved (`orphan_host`) on threads of their
    /// own: stopping waits for them (see [`StopHosts`]).
    orphaning: usize,
    budget: ReplaceBudget,
    stopped: Vec<futures::channel::oneshot::Sender<()>>,
}

impl HostSupervisor {
    pub(crate) fn new(
        store: Arc<Store>,
        executor: Executor,
        config: Config,
        creator: ProcessInfo,
        runtime_id: &str,
    ) -> Self {
        let driver_key = store
            .keys()
            .object("actors", "hosts")
            .key(&format!("driver:{runtime_id}"));
        HostSupervisor {
            store,
            executor,
            config,
            creator,
            driver_key,
            hosts: HashMap::new(),
            started: 0,
            stopping: false,
            orphaning: 0,
            budget: ReplaceBudget::default(),
            stopped: Vec::new(),
        }
    }

    fn driver_ttl(&self) -> Duration {
        driver_ttl(self.config.actors.lease())
    }

    fn spawn_host(&mut self, ctx: &mut Context<Self>) {
        self.started += 1;
        let number = self.started;
        let host_id = uuid::Uuid::new_v4().simple().to_string();
        let subprocess = self.config.local.start_method == StartMethod::Process;
        let actors = &self.config.actors;
        let spec = HostSpec {
            host_id: host_id.clone(),
            lease_ms: actors.lease().as_millis() as u64,
            idle_ms: actors.idle().as_millis() as u64,
            max_restarts: actors.max_restarts,
            restart_period_ms: actors.restart_period().as_millis() as u64,
            driver: subprocess.then(|| {
                (
                    self.driver_key.clone(),
                    self.driver_ttl().as_millis() as u64,
                )
            }),
        };
        let name = format!("ActorHost-{number}");
        let info = ProcessInfo {
            name: name.clone(),
            identity: vec![number as u32],
            daemon: true,
            authkey: self.creator.authkey.clone(),
            parent: Some(ParentInfo {
                name: self.creator.name.clone(),
                pid: Some(std::process::id()),
            }),
        };
        self.hosts.insert(
            host_id.clone(),
            HostSlot {
                number,
                started: Instant::now(),
            },
        );
        let notify = ctx.address().recipient();
        let executor = self.executor.clone();
        let store = self.store.clone();
        let mut env = self.config.multiprocessing.env_vars.clone();
        let launch = if subprocess {
            let mut config = self.config.clone();
            config.redis.url = None;
            // The key goes in the host's environment, never in its record in Redis.
            hand_over_authkey(&info.authkey, &mut env);
            let record = TaskRecord {
                kind: TaskKind::ActorHost(spec),
                name: name.clone(),
                identity: info.identity.clone(),
                daemon: true,
                stream_output: config.multiprocessing.stream_stdout
                    || config.shoal.backend.is_remote(),
                config,
                parent: info.parent.clone(),
                // Watched through its own spec's driver key.
                driver: None,
            };
            let keys = ProcessKeys::new(store.keys(), &host_id);
            let launch = Launch {
                id: host_id.clone(),
                name,
                workload: Workload::Subprocess {
                    task_id: host_id.clone(),
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
            let body = Box::new(move || match host::run_host(&body_store, &spec) {
                Ok(()) => 0,
                Err(e) if e.is_store_unreachable() => {
                    eprintln!("shoal actor host: {e}");
                    EXIT_STORE_LOST
                }
                Err(e) => {
                    eprintln!("shoal actor host: {e}");
                    1
                }
            });
            let launch = Launch {
                id: host_id.clone(),
                name,
                workload: Workload::Thread { body, info },
                env,
                die_with_parent: true,
                notify,
            };
            async move { executor.launch(launch).await }.boxed_local()
        };
        ctx.spawn(launch.into_actor(self).map(move |result, act, ctx| {
            if let Err(e) = result {
                tracing::warn!("starting an actor host failed: {e}");
                act.hosts.remove(&host_id);
                let end = if e.is_store_unreachable() {
                    HostEnd::StoreLost
                } else {
                    HostEnd::Failed
                };
                act.host_gone(ctx, end, Duration::ZERO);
            } else if act.stopping {
                let executor = act.executor.clone();
                actix::spawn(async move {
                    let _ = executor.signal(host_id, StopSignal::Terminate).await;
                });
            }
        }));
    }

    /// A host is gone after it `lived` so long: replace it (after the pause its end calls for)
    /// or finish stopping.
    fn host_gone(&mut self, ctx: &mut Context<Self>, end: HostEnd, lived: Duration) {
        if self.stopping {
            self.finish_stopping(ctx);
            return;
        }
        let after = self.budget.pause(Instant::now(), end, lived);
        ctx.run_later(after, |act, ctx| {
            if !act.stopping && act.hosts.len() < act.config.actors.hosts as usize {
                act.spawn_host(ctx);
            }
        });
    }

    /// Once stopping, and every host exited and was orphaned: answers [`StopHosts`] and stops.
    fn finish_stopping(&mut self, ctx: &mut Context<Self>) {
        if self.stopping && self.hosts.is_empty() && self.orphaning == 0 {
            for done in self.stopped.drain(..) {
                let _ = done.send(());
            }
            ctx.stop();
        }
    }

    fn refresh_driver_key(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let key = self.driver_key.clone();
        let ttl = self.driver_ttl();
        ctx.spawn(
            async move {
                if let Ok(mut conn) = store.multiplexed().await {
                    let _ = redis::cmd("SET")
                        .arg(&key)
                        .arg(1)
                        .arg("PX")
                        .arg(ttl.as_millis() as u64)
                        .query_async::<()>(&mut conn)
                        .await;
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for HostSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.refresh_driver_key(ctx);
        let ttl = self.driver_ttl();
        ctx.run_interval(ttl / 4, |act, ctx| act.refresh_driver_key(ctx));
    }
}

/// Start the hosts.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StartHosts;

impl Handler<StartHosts> for HostSupervisor {
    type Result = ();

    fn handle(&mut self, _: StartHosts, ctx: &mut Context<Self>) {
        for _ in 0..self.config.actors.hosts {
            self.spawn_host(ctx);
        }
    }
}

impl Handler<WorkerExited> for HostSupervisor {
    type Result = ();

    fn handle(&mut self, msg: WorkerExited, ctx: &mut Context<Self>) {
        let Some(slot) = self.hosts.remove(&msg.id) else {
            return;
        };
        tracing::debug!(
            host = %msg.id,
            number = slot.number,
            code = msg.code,
            "actor host exited"
        );
        // A host that never started (the backend could not start it) is a failure, whatever
        // its code.
        let end = if !msg.never_started && matches!(msg.code, EXIT_STORE_LOST | EXIT_DRIVER_GONE) {
            HostEnd::StoreLost
        } else {
            HostEnd::Failed
        };
        let lived = if msg.never_started {
            Duration::ZERO
        } else {
            slot.started.elapsed()
        };
        // Its actors go to another host now, not when their leases lapse.
        let store = self.store.clone();
        let host_id = msg.id.clone();
        let process_keys = ProcessKeys::new(store.keys(), &host_id);
        let stopping = self.stopping;
        let supervisor = ctx.address();
        let spawned = std::thread::Builder::new()
            .name("shoal-host-orphans".into())
            .spawn(move || {
                let hosts = HostKeys::new(store.keys());
                let since = Instant::now();
                let orphaned = loop {
                    match protocol::orphan_host(&store, &hosts, &host_id) {
                        // Redis is away (the host may have exited for that): its actors move
                        // once it is back, rather than when a message comes for them.
                        Err(e)
                            if e.is_store_unreachable()
                                && !stopping
                                && since.elapsed() < ORPHAN_RETRY =>
                        {
                            tracing::debug!("moving the actors of host {host_id}: {e}; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        outcome => break outcome,
                    }
                };
                match orphaned {
                    Ok(actors) if !actors.is_empty() => {
                        tracing::info!("actor host {host_id} exited; its actors move: {actors:?}")
                    }
                    Ok(_) => {}
                    // At shutdown the store may be going away too.
                    Err(e) if stopping => {
                        tracing::debug!("moving the actors of host {host_id}: {e}")
                    }
                    Err(e) => tracing::warn!("moving the actors of host {host_id}: {e}"),
                }
                let _ = store.with_conn(
                    || "deleting a host's task".into(),
                    |c| {
                        redis::cmd("DEL")
                            .arg(&process_keys.task)
                            .arg(&process_keys.status)
                            .arg(&process_keys.output)
                            .query::<()>(c)
                    },
                );
                supervisor.do_send(Orphaned);
            });
        match spawned {
            Ok(_) => self.orphaning += 1,
            Err(e) => tracing::warn!("cannot move the actors of an exited host: {e}"),
        }
        self.host_gone(ctx, end, lived);
    }
}

/// An exited host's actors and keys were moved (see [`HostSupervisor::orphaning`]).
#[derive(Message)]
#[rtype(result = "()")]
struct Orphaned;

impl Handler<Orphaned> for HostSupervisor {
    type Result = ();

    fn handle(&mut self, _: Orphaned, ctx: &mut Context<Self>) {
        self.orphaning = self.orphaning.saturating_sub(1);
        self.finish_stopping(ctx);
    }
}

/// Stop every host; answered once they exited and their actors and keys were moved (their
/// leases freed, their heartbeats and consumers of the hosts' group gone: nothing is left
/// behind by a runtime that ends), or after a grace period.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopHosts;

impl Handler<StopHosts> for HostSupervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StopHosts, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if self.hosts.is_empty() && self.orphaning == 0 {
            ctx.stop();
            return Box::pin(async {});
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        self.stopped.push(tx);
        let executor = self.executor.clone();
        let ids: Vec<String> = self.hosts.keys().cloned().collect();
        Box::pin(async move {
            for id in &ids {
                let _ = executor.signal(id.clone(), StopSignal::Terminate).await;
            }
            if actix::clock::timeout(Duration::from_secs(5), rx)
                .await
                .is_err()
            {
                for id in ids {
                    let _ = executor.signal(id, StopSignal::Kill).await;
                }
            }
        })
    }
}

/// `base × 2^doublings`, at most `max`.
fn backoff(base: Duration, doublings: u32, max: Duration) -> Duration {
    base.checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_outages_never_stop_the_replacements_and_back_off() {
        let mut budget = ReplaceBudget::default();
        let now = Instant::now();
        let pauses: Vec<Duration> = (0..1000)
            .map(|i| {
                budget.pause(
                    now + Duration::from_millis(i),
                    HostEnd::StoreLost,
                    Duration::ZERO,
                )
            })
            .collect();
        assert_eq!(pauses[0], REPLACE_AFTER);
        assert_eq!(pauses[1], 2 * REPLACE_AFTER);
        assert_eq!(pauses[999], MAX_STORE_BACKOFF);
        // Not charged: a failure after them is replaced at the usual pace.
        assert_eq!(
            budget.pause(now, HostEnd::Failed, Duration::ZERO),
            REPLACE_AFTER
        );
    }

    #[test]
    fn failures_past_the_budget_back_off_until_a_host_lives_long() {
        let mut budget = ReplaceBudget::default();
        let now = Instant::now();
        let mut pause = |at_ms: u64, lived: Duration| {
            budget.pause(now + Duration::from_millis(at_ms), HostEnd::Failed, lived)
        };
        for i in 0..MAX_HOST_FAILURES as u64 {
            assert_eq!(pause(i, Duration::ZERO), REPLACE_AFTER);
        }
        assert_eq!(pause(20, Duration::ZERO), 2 * REPLACE_AFTER);
        assert_eq!(pause(21, Duration::ZERO), 4 * REPLACE_AFTER);
        // Slow failures past the period still back off (never a burst again), up to the cap.
        let mut last = Duration::ZERO;
        for i in 0..100u64 {
            last = pause(60_000 * (i + 1), Duration::from_secs(1));
        }
        assert_eq!(last, MAX_CRASH_BACKOFF);
        // A host that ran long clears them.
        assert_eq!(pause(10_000_000, HOST_FAILURE_PERIOD), REPLACE_AFTER);
    }
}
