//! The runtime's actor hosts: `actors.hosts` worker processes (or threads) started through the
//! executor when the runtime spawns its first actor, kept alive, and stopped with the runtime.
//!
//! When a host exits, the supervisor frees the leases it held (its death is known: no need to
//! wait for them to lapse) and asks the other hosts, or its replacement, to take its actors
//! over (`shoal_executor::actor::orphan_host`). Replacements start 100 ms after an exit; more
//! than [`MAX_HOST_FAILURES`] exits within [`HOST_FAILURE_PERIOD`] stop the replacing (logged),
//! so a host that cannot start does not loop. The supervisor keeps a liveness key the hosts
//! watch, as a pool's workers do, so a host never outlives its runtime.

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
use shoal_executor::pool::{EXIT_STORE_LOST, driver_ttl};
use shoal_executor::protocol::{Executor, Launch, StopSignal, WorkerExited, Workload};
use shoal_executor::task::{ProcessKeys, TaskKind, TaskRecord, hand_over_authkey};

/// Host exits within [`HOST_FAILURE_PERIOD`] after which hosts are no longer replaced.
const MAX_HOST_FAILURES: usize = 10;
/// The window of [`MAX_HOST_FAILURES`].
const HOST_FAILURE_PERIOD: Duration = Duration::from_secs(10);

/// The supervisor of one runtime's actor hosts.
pub(crate) struct HostSupervisor {
    store: Arc<Store>,
    executor: Executor,
    config: Config,
    creator: ProcessInfo,
    driver_key: String,
    hosts: HashMap<String, u64>,
    started: u64,
    stopping: bool,
    failures: VecDeque<Instant>,
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
            failures: VecDeque::new(),
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
        self.hosts.insert(host_id.clone(), number);
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
                act.host_gone(ctx);
            } else if act.stopping {
                let executor = act.executor.clone();
                actix::spawn(async move {
                    let _ = executor.signal(host_id, StopSignal::Terminate).await;
                });
            }
        }));
    }

    /// A host is gone: replace it (within the failure budget) or finish stopping.
    fn host_gone(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            if self.hosts.is_empty() {
                for done in self.stopped.drain(..) {
                    let _ = done.send(());
                }
                ctx.stop();
            }
            return;
        }
        let now = Instant::now();
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > HOST_FAILURE_PERIOD)
        {
            self.failures.pop_front();
        }
        if self.failures.len() > MAX_HOST_FAILURES {
            tracing::error!(
                "{} actor host exits within {HOST_FAILURE_PERIOD:?}: no more hosts are started \
                 by this runtime; actors wait in their mailboxes",
                self.failures.len()
            );
            return;
        }
        ctx.run_later(Duration::from_millis(100), |act, ctx| {
            if !act.stopping && act.hosts.len() < act.config.actors.hosts as usize {
                act.spawn_host(ctx);
            }
        });
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
        if self.hosts.remove(&msg.id).is_none() {
            return;
        }
        tracing::debug!(host = %msg.id, code = msg.code, "actor host exited");
        // Its actors go to another host now, not when their leases lapse.
        let store = self.store.clone();
        let host_id = msg.id.clone();
        let process_keys = ProcessKeys::new(store.keys(), &host_id);
        let stopping = self.stopping;
        let spawned = std::thread::Builder::new()
            .name("shoal-host-orphans".into())
            .spawn(move || {
                let hosts = HostKeys::new(store.keys());
                match protocol::orphan_host(&store, &hosts, &host_id) {
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
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot move the actors of an exited host: {e}");
        }
        self.host_gone(ctx);
    }
}

/// Stop every host; answered once they exited (or after a grace period).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopHosts;

impl Handler<StopHosts> for HostSupervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StopHosts, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if self.hosts.is_empty() {
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
