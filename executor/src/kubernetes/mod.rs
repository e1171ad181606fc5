//! The Kubernetes backend: every worker is a Kubernetes Job (`shoal.backend: kubernetes`).
//!
//! # One Job per worker
//!
//! A `Process` is one Job; so is each Pool worker. The alternative for pools, one Indexed Job
//! with a pod per index, ties the workers together: its backoff limit and its completion are
//! the Job's, a failed index is restarted by Kubernetes (retries are the Pool's business: it
//! redelivers the chunks a dead worker held, and decides whether to start another), and
//! replacing one worker means patching the shared Job. With a Job per worker, the supervisor
//! starts, replaces and stops workers one by one exactly as on the local backend, every worker
//! has its own task record and exit code, and `backoffLimit: 0` + `restartPolicy: Never` leave
//! every restart decision to shoal. The cost is one API object per worker, cleaned up by
//! `ttlSecondsAfterFinished` and when the runtime is dropped.
//!
//! # What the executor does
//!
//! * **Launch**: creates the Job (`spec.rs`); the pod reads its task from Redis like any worker
//!   (the backend moves no data). Before the first Job that carries a given authkey, it
//!   creates the runtime's Secret for that key ([`JobTemplate::authkey_secret`], its name with
//!   a random suffix; `AlreadyExists` is fine: two launches may race to make it), which the
//!   Job's `SHOAL_WORKER_AUTHKEY` refers to. Thread workloads (start method `thread`) run in this process,
//!   through the local executor.
//! * **Exit**: one watch on the pods of this runtime (label `shoal.dev/runtime`, through
//!   `kube::runtime::watcher`, which relists and resumes after errors) tells each worker's end
//!   (`status.rs`): its exit code, Python's way (`-9` for `SIGKILL`, `-15` for `SIGTERM`,
//!   `OOMKilled` logged as such), or that it cannot start (an image that cannot be pulled, a
//!   missing Secret, a command the container runtime cannot execute), which is logged with the
//!   kubelet's message, deletes the Job and ends the worker with code 1. A pod deleted without
//!   a final status (or with `ContainerStatusUnknown`) ends its worker with the signal that was
//!   asked for, else `-9`. Container runtimes report a signal `N` as exit code `128 + N`, so a
//!   function that calls `std::process::exit(n)` with `n` in 129..=192 reads as `-(n - 128)`
//!   here (the local backend tells them apart).
//! * **Refused pods**: a Job whose pod the cluster refuses to create (a missing service
//!   account, an exhausted quota, an admission policy) never gets a pod, so the pod watch alone
//!   would wait forever; the Job controller only says so in `FailedCreate` Warning Events on the
//!   Job. A second watch, on the Events of the namespace with the field selector
//!   `involvedObject.kind=Job,reason=FailedCreate,type=Warning` (Events carry no labels of
//!   their Job, so the selector cannot name this runtime: the executor keeps the Events whose
//!   Job is one of its workers'), notes the first such Event of a worker that has no pod yet.
//!   The refusal may be transient (a quota freed, an account created a moment later; the Job
//!   controller keeps retrying with back-off), so the worker ends only if it still has no pod
//!   `kubernetes.pod_create_grace_secs` (default 30) after the executor saw that first Event:
//!   then the latest Event's message is logged, the Job deleted and the worker ended with code
//!   1, as for a pod that cannot start. A pod seen before then clears it. The grace counts from
//!   when the Event reached this process, not from its timestamps (no dependence on clock
//!   skew). A watcher that may not read Events (RBAC: `list` and `watch` on `events`, see
//!   `deploy/kubernetes/rbac.yaml`) logs a warning and leaves such workers waiting, as before.
//! * **Signal**: `terminate()` deletes the pod with its grace period (`SIGTERM`, then `SIGKILL`
//!   after `terminationGracePeriodSeconds`) and the Job; `kill()` deletes the pod with grace 0,
//!   which the API server takes as a force deletion: the pod object goes at once, before its
//!   container has ended (the kubelet stops it behind it), so the worker ends with `-9` when
//!   the watch sees the pod deleted, not from a final status.
//!   The pods share one PID namespace between their containers (`shareProcessNamespace: true`,
//!   see `spec.rs`): the pause container is PID 1 and the worker an ordinary process, so
//!   signals do what they do on the local backend. The kubelet's `SIGTERM` ends the worker by
//!   its default action (the container runtime reports 143, read as `-15`) at any moment of
//!   its life, before the worker's code runs included; and a function that kills its own
//!   worker (`raise(SIGKILL)`, as `examples/fault_tolerant_map.rs` does) ends it with `-9`. As
//!   PID 1 (its container's own PID namespace) the kernel would shield the worker from every
//!   signal it has no handler for, its own `SIGKILL` included; for a worker run that way
//!   regardless (an image run by hand), the worker path installs a `SIGTERM` handler that
//!   exits with 143 when it finds itself PID 1 (see `crate::worker`).
//! * **Shutdown**: the runtime being dropped deletes every Job it started (label selector),
//!   finished ones included, then its authkey Secrets (same selector), once the launches under
//!   way have returned (at most 30 s; later ones are refused). A driver killed before that
//!   leaves its Secrets behind (small objects, labelled with the runtime).
//!
//! A remote worker cannot get a parent-death signal: a pool worker watches its driver's
//! liveness key instead (see `crate::pool`).
//!
//! Authentication is `kube::Config::infer` (the kubeconfig's current context, or the pod's
//! service account inside the cluster), or the kubeconfig context `kubernetes.context` names.

mod spec;
mod status;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as ClusterEvent, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use shoal_core::error::{Error, Result};

pub use spec::{
    ANNOTATION_PROCESS_NAME, AUTHKEY_SECRET_KEY, CONTAINER, JobTemplate, LABEL_NAMESPACE,
    LABEL_PROCESS, LABEL_RUNTIME, LABEL_WORKER, WorkerJob, label_value,
};
pub use status::{PodOutcome, outcome};

use crate::protocol::{
    Executor, Launch, Launched, QueryWorker, Shutdown, SignalWorker, StopSignal, WorkerExited,
    WorkerStatus, Workload,
};
use crate::task::ENV_WORKER_AUTHKEY;

/// A worker the executor started and has not seen end.
struct RemoteWorker {
    name: String,
    job: String,
    /// Its pod, once the watch saw it.
    pod: Option<String>,
    notify: Recipient<WorkerExited>,
    /// The signal asked for, if any.
    stopping: Option<StopSignal>,
    /// While it has no pod: the cluster refused to create one.
    refused: Option<Refusal>,
}

/// `FailedCreate` Events seen on a worker's Job while it had no pod.
struct Refusal {
    /// When the first one reached this executor.
    since: Instant,
    /// The latest one's message (the API's reason for refusing the pod).
    message: String,
}

/// The field selector of the Events the executor watches: the Job controller failing to
/// create a pod.
const REFUSED_POD_EVENTS: &str = "involvedObject.kind=Job,reason=FailedCreate,type=Warning";

/// The Kubernetes executor actor.
pub struct KubernetesExecutor {
    template: JobTemplate,
    local: Executor,
    client: Option<Client>,
    namespace: String,
    workers: HashMap<String, RemoteWorker>,
    /// During a relist of the watch: the workers whose pods were listed.
    relisted: Option<HashSet<String>>,
    /// `kubernetes.pod_create_grace_secs`.
    pod_create_grace: Duration,
    /// The random suffix of the authkey Secret of each key (by its hex form) this runtime's
    /// Jobs were given (see `spec.rs`), and whether that Secret was made.
    authkey_secrets: HashMap<String, (String, bool)>,
    /// Launches whose API calls have not returned yet: the shutdown waits for them, lest a
    /// Job or a Secret be made after it deleted this runtime's.
    launching: Arc<AtomicUsize>,
    /// Shutting down: no more launches.
    stopping: bool,
}

impl KubernetesExecutor {
    /// Starts the executor on `arbiter`, connects to the API server (kubeconfig or in-cluster
    /// service account) and starts watching this runtime's pods. Thread workloads go to `local`.
    pub fn start(
        template: JobTemplate,
        local: Executor,
        arbiter: &ArbiterHandle,
    ) -> Result<Executor> {
        let addr = KubernetesExecutor::start_in_arbiter(arbiter, move |_| KubernetesExecutor {
            namespace: template.config.namespace.clone().unwrap_or_default(),
            pod_create_grace: template.config.pod_create_grace(),
            template,
            local,
            client: None,
            workers: HashMap::new(),
            relisted: None,
            authkey_secrets: HashMap::new(),
            launching: Arc::new(AtomicUsize::new(0)),
            stopping: false,
        });
        futures::executor::block_on(addr.send(Connect))
            .map_err(|e| Error::Backend(format!("the kubernetes executor did not start: {e}")))??;
        Ok(Executor::new(
            "kubernetes",
            addr.clone().recipient(),
            addr.clone().recipient(),
            addr.clone().recipient(),
        )
        .with_shutdown(addr.recipient()))
    }

    fn client(&self) -> Result<Client> {
        self.client
            .clone()
            .ok_or_else(|| Error::Backend("the kubernetes executor is not connected".into()))
    }

    fn selector(&self) -> String {
        format!("{LABEL_RUNTIME}={}", self.template.runtime_id)
    }

    /// A worker ended: tells its owner once.
    fn exited(&mut self, id: &str, code: i32, reason: Option<String>) {
        self.ended(id, code, reason, false);
    }

    /// A worker whose program never ran (its pod could not be created or started) ends with 1.
    fn never_started(&mut self, id: &str) {
        self.ended(id, 1, None, true);
    }

    fn ended(&mut self, id: &str, code: i32, reason: Option<String>, never_started: bool) {
        let Some(worker) = self.workers.remove(id) else {
            return;
        };
        if let Some(reason) = reason {
            tracing::warn!(
                "{} (Job {}) ended: {reason}, exit code {code}",
                worker.name,
                worker.job
            );
        }
        worker.notify.do_send(WorkerExited {
            id: id.to_string(),
            code,
            never_started,
        });
    }

    fn on_pod(&mut self, pod: &Pod, deleted: bool, ctx: &mut Context<Self>) {
        let Some(id) = pod.labels().get(LABEL_WORKER).cloned() else {
            return;
        };
        if let Some(relisted) = &mut self.relisted {
            relisted.insert(id.clone());
        }
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.pod = Some(pod.name_any());
        match outcome(pod) {
            PodOutcome::Exited { code, reason } => {
                // A kubelet that lost track of a container it was told to stop reports
                // `ContainerStatusUnknown` with 137: the end is the one this executor asked for.
                let code = match (reason.as_deref(), worker.stopping) {
                    (Some("ContainerStatusUnknown"), Some(signal)) => signal.exit_code(),
                    _ => code,
                };
                self.exited(&id, code, reason);
            }
            PodOutcome::Unstartable(why) => {
                tracing::error!(
                    "{} (Job {}) cannot start: {why}; deleting it",
                    worker.name,
                    worker.job
                );
                self.delete(ctx, &id, Some(0));
                self.never_started(&id);
            }
            PodOutcome::Pending if deleted => {
                let code = worker.stopping.map_or(-9, StopSignal::exit_code);
                self.exited(&id, code, Some("its pod was deleted".into()));
            }
            PodOutcome::Pending => {}
        }
    }

    /// A `FailedCreate` Event on a Job: if it is a worker's that has no pod yet, the first one
    /// starts the grace period ([`KubernetesExecutor::end_refused`] after it).
    fn on_refused_pod(&mut self, event: &ClusterEvent, ctx: &mut Context<Self>) {
        let Some(job) = event.involved_object.name.as_deref() else {
            return;
        };
        let Some((id, worker)) = self.workers.iter_mut().find(|(_, w)| w.job == job) else {
            return;
        };
        if worker.pod.is_some() {
            return;
        }
        let message = event.message.clone().unwrap_or_default();
        match &mut worker.refused {
            Some(refusal) => refusal.message = message,
            None => {
                tracing::warn!(
                    "{} (Job {}): the cluster refuses to create its pod: {message}; ending it \
                     unless a pod appears within {:?}",
                    worker.name,
                    worker.job,
                    self.pod_create_grace
                );
                worker.refused = Some(Refusal {
                    since: Instant::now(),
                    message,
                });
                let id = id.clone();
                ctx.run_later(self.pod_create_grace, move |act, ctx| {
                    act.end_refused(&id, ctx)
                });
            }
        }
    }

    /// The grace after a worker's first `FailedCreate` is over: if it still has no pod, logs
    /// why, deletes its Job and ends it with code 1.
    fn end_refused(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        let (None, Some(refusal)) = (&worker.pod, &worker.refused) else {
            return;
        };
        tracing::error!(
            "{} (Job {}) cannot start: FailedCreate: {} (no pod within {:?} of the first \
             refusal); deleting it",
            worker.name,
            worker.job,
            refusal.message,
            refusal.since.elapsed()
        );
        self.delete(ctx, id, Some(0));
        self.never_started(id);
    }

    /// Deletes a worker's pod (when known) with `grace` seconds (`None`: the pod's own) and
    /// its Job, in the background.
    fn delete(&mut self, ctx: &mut Context<Self>, id: &str, grace: Option<u32>) {
        let (Some(worker), Ok(client)) = (self.workers.get(id), self.client()) else {
            return;
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        let jobs: Api<Job> = Api::namespaced(client, &self.namespace);
        let (pod, job) = (worker.pod.clone(), worker.job.clone());
        ctx.spawn(
            async move {
                let pod_params = DeleteParams {
                    grace_period_seconds: grace,
                    ..DeleteParams::default()
                };
                if let Some(pod) = &pod
                    && let Err(e) = pods.delete(pod, &pod_params).await
                    && !not_found(&e)
                {
                    tracing::warn!("deleting pod {pod}: {e}");
                }
                let job_params = DeleteParams {
                    grace_period_seconds: grace,
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..DeleteParams::default()
                };
                if let Err(e) = jobs.delete(&job, &job_params).await
                    && !not_found(&e)
                {
                    tracing::warn!("deleting Job {job}: {e}");
                }
            }
            .into_actor(self),
        );
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

/// How long the shutdown waits for launches under way.
const LAUNCHES_SETTLE: Duration = Duration::from_secs(30);

/// One launch under way, counted in the executor's `launching` until it is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Actor for KubernetesExecutor {
    type Context = Context<Self>;
}

/// Connect to the API server and start the watch.
#[derive(Message)]
#[rtype(result = "Result<()>")]
struct Connect;

impl Handler<Connect> for KubernetesExecutor {
    type Result = ResponseActFuture<Self, Result<()>>;

    fn handle(&mut self, _: Connect, _: &mut Context<Self>) -> Self::Result {
        let context = self.template.config.context.clone();
        Box::pin(
            async move {
                let config = match context {
                    Some(context) => {
                        let options = kube::config::KubeConfigOptions {
                            context: Some(context.clone()),
                            ..Default::default()
                        };
                        kube::Config::from_kubeconfig(&options).await.map_err(|e| {
                            Error::Backend(format!("kubeconfig context {context:?}: {e}"))
                        })?
                    }
                    None => kube::Config::infer().await.map_err(|e| {
                        Error::Backend(format!(
                            "no Kubernetes configuration (KUBECONFIG, ~/.kube/config or an \
                             in-cluster service account): {e}"
                        ))
                    })?,
                };
                let namespace = config.default_namespace.clone();
                let client = Client::try_from(config)
                    .map_err(|e| Error::Backend(format!("the Kubernetes client: {e}")))?;
                Ok((client, namespace))
            }
            .into_actor(self)
            .map(|result: Result<(Client, String)>, act, ctx| {
                let (client, default_namespace) = result?;
                if act.namespace.is_empty() {
                    act.namespace = default_namespace;
                }
                let pods: Api<Pod> = Api::namespaced(client.clone(), &act.namespace);
                let config = watcher::Config::default().labels(&act.selector());
                ctx.add_stream(watcher(pods, config).default_backoff());
                let events: Api<ClusterEvent> = Api::namespaced(client.clone(), &act.namespace);
                let config = watcher::Config::default().fields(REFUSED_POD_EVENTS);
                ctx.add_stream(watcher(events, config).default_backoff());
                act.client = Some(client);
                Ok(())
            }),
        )
    }
}

impl StreamHandler<std::result::Result<watcher::Event<Pod>, watcher::Error>>
    for KubernetesExecutor
{
    fn handle(
        &mut self,
        item: std::result::Result<watcher::Event<Pod>, watcher::Error>,
        ctx: &mut Context<Self>,
    ) {
        match item {
            Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => {
                self.on_pod(&pod, false, ctx);
            }
            Ok(watcher::Event::Delete(pod)) => self.on_pod(&pod, true, ctx),
            Ok(watcher::Event::Init) => self.relisted = Some(HashSet::new()),
            Ok(watcher::Event::InitDone) => {
                // A pod seen before that the relist no longer has was deleted meanwhile.
                let listed = self.relisted.take().unwrap_or_default();
                let gone: Vec<(String, i32)> = self
                    .workers
                    .iter()
                    .filter(|(id, w)| w.pod.is_some() && !listed.contains(*id))
                    .map(|(id, w)| (id.clone(), w.stopping.map_or(-9, StopSignal::exit_code)))
                    .collect();
                for (id, code) in gone {
                    self.exited(&id, code, Some("its pod disappeared".into()));
                }
            }
            Err(e) => tracing::warn!("watching worker pods: {e}"),
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        tracing::error!("the watch on worker pods ended; worker exits will not be seen");
    }
}

impl StreamHandler<std::result::Result<watcher::Event<ClusterEvent>, watcher::Error>>
    for KubernetesExecutor
{
    fn handle(
        &mut self,
        item: std::result::Result<watcher::Event<ClusterEvent>, watcher::Error>,
        ctx: &mut Context<Self>,
    ) {
        match item {
            Ok(watcher::Event::Apply(event)) | Ok(watcher::Event::InitApply(event)) => {
                self.on_refused_pod(&event, ctx);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "watching FailedCreate Events ({e}): a Job whose pod the cluster refuses to \
                 create leaves its worker waiting (the driver needs list and watch on events)"
            ),
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        tracing::error!(
            "the watch on FailedCreate Events ended; pods the cluster refuses will not be seen"
        );
    }
}

impl Handler<Launch> for KubernetesExecutor {
    type Result = ResponseActFuture<Self, Result<Launched>>;

    fn handle(&mut self, launch: Launch, _: &mut Context<Self>) -> Self::Result {
        let task_id = match &launch.workload {
            Workload::Subprocess { task_id } => task_id.clone(),
            Workload::Thread { .. } => {
                let local = self.local.clone();
                return Box::pin(async move { local.launch(launch).await }.into_actor(self));
            }
        };
        let client = match self.client() {
            Ok(client) => client,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        if self.workers.contains_key(&launch.id) {
            let e = Error::invalid_state(format!("worker {} is already running", launch.id));
            return Box::pin(fut::ready(Err(e)));
        }
        if self.stopping {
            let e = Error::invalid_state("the runtime is shutting down: no more workers");
            return Box::pin(fut::ready(Err(e)));
        }
        let task = format!("{}/{task_id}", self.template.namespace);
        // The authkey goes through a Secret of this runtime, made before its first Job.
        let key_hex = launch.env.get(ENV_WORKER_AUTHKEY).cloned();
        let (secret_name, new_secret) = match &key_hex {
            None => (None, None),
            Some(hex) => {
                let (suffix, made) = self.authkey_secrets.entry(hex.clone()).or_insert_with(|| {
                    let random = uuid::Uuid::new_v4().simple().to_string();
                    (random[..12].to_string(), false)
                });
                let new = (!*made).then(|| self.template.authkey_secret(hex, suffix));
                (Some(self.template.authkey_secret_name(suffix)), new)
            }
        };
        let worker = WorkerJob {
            id: &launch.id,
            name: &launch.name,
            task: &task,
            env: &launch.env,
            authkey_secret: secret_name.as_deref(),
        };
        let job = self.template.job(&worker);
        let job_name = self.template.job_name(&worker);
        let launching = InFlight::new(&self.launching);
        self.workers.insert(
            launch.id.clone(),
            RemoteWorker {
                name: launch.name.clone(),
                job: job_name.clone(),
                pod: None,
                notify: launch.notify,
                stopping: None,
                refused: None,
            },
        );
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let jobs: Api<Job> = Api::namespaced(client, &self.namespace);
        let (id, name, namespace) = (launch.id, launch.name, self.namespace.clone());
        Box::pin(
            async move {
                let _launching = launching;
                if let Some(secret) = new_secret {
                    let secret_name = secret.metadata.name.clone().unwrap_or_default();
                    match secrets.create(&PostParams::default(), &secret).await {
                        // Or another launch made it meanwhile.
                        Ok(_) => {}
                        Err(e) if already_exists(&e) => {}
                        Err(e) => {
                            let message = format!(
                                "creating Secret {secret_name} (the authkey of this runtime's \
                                 workers; the driver needs create on secrets) for {name} in \
                                 namespace {namespace}: {e}"
                            );
                            return (false, Err(message));
                        }
                    }
                }
                let created = jobs
                    .create(&PostParams::default(), &job)
                    .await
                    .map_err(|e| {
                        format!("creating Job {job_name} for {name} in namespace {namespace}: {e}")
                    });
                (true, created)
            }
            .into_actor(self)
            .map(move |(secret_there, created), act, _| {
                if secret_there
                    && let Some(entry) = key_hex.and_then(|hex| act.authkey_secrets.get_mut(&hex))
                {
                    entry.1 = true;
                }
                match created {
                    Ok(_) => Ok(Launched { pid: None }),
                    Err(message) => {
                        act.workers.remove(&id);
                        Err(Error::Backend(message))
                    }
                }
            }),
        )
    }
}

impl Handler<SignalWorker> for KubernetesExecutor {
    type Result = ResponseActFuture<Self, Result<()>>;

    fn handle(&mut self, msg: SignalWorker, ctx: &mut Context<Self>) -> Self::Result {
        let Some(worker) = self.workers.get_mut(&msg.id) else {
            // A thread child, or a worker that already ended.
            let local = self.local.clone();
            return Box::pin(
                async move { local.signal(msg.id, msg.signal).await }.into_actor(self),
            );
        };
        worker.stopping = Some(msg.signal);
        let pod_known = worker.pod.is_some();
        let grace = match msg.signal {
            StopSignal::Terminate => None,
            StopSignal::Kill => Some(0),
        };
        self.delete(ctx, &msg.id, grace);
        if !pod_known {
            // No pod yet: deleting the Job is enough, and no pod event may ever come.
            self.exited(&msg.id, msg.signal.exit_code(), None);
        }
        Box::pin(fut::ready(Ok(())))
    }
}

impl Handler<QueryWorker> for KubernetesExecutor {
    type Result = ResponseActFuture<Self, WorkerStatus>;

    fn handle(&mut self, msg: QueryWorker, _: &mut Context<Self>) -> Self::Result {
        if self.workers.contains_key(&msg.id) {
            return Box::pin(fut::ready(WorkerStatus::Running { pid: None }));
        }
        let local = self.local.clone();
        Box::pin(
            async move {
                local
                    .status(msg.id)
                    .await
                    .unwrap_or(WorkerStatus::NotRunning)
            }
            .into_actor(self),
        )
    }
}

impl Handler<Shutdown> for KubernetesExecutor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let Ok(client) = self.client() else {
            return Box::pin(fut::ready(()));
        };
        let jobs: Api<Job> = Api::namespaced(client.clone(), &self.namespace);
        let secrets: Api<Secret> = Api::namespaced(client, &self.namespace);
        let made_secrets = !self.authkey_secrets.is_empty();
        let selector = self.selector();
        self.stopping = true;
        let launching = self.launching.clone();
        Box::pin(
            async move {
                // A launch under way makes its Secret and Job after any delete made now.
                let deadline = Instant::now() + LAUNCHES_SETTLE;
                while launching.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                    actix_rt::time::sleep(Duration::from_millis(10)).await;
                }
                let params = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..DeleteParams::default()
                };
                let list = ListParams::default().labels(&selector);
                if let Err(e) = jobs.delete_collection(&params, &list).await {
                    tracing::warn!("deleting this runtime's Jobs ({selector}): {e}");
                }
                // After the Jobs: a container's environment is set when it starts, so running
                // pods no longer need the Secret.
                if made_secrets
                    && let Err(e) = secrets
                        .delete_collection(&DeleteParams::default(), &list)
                        .await
                {
                    tracing::warn!(
                        "deleting this runtime's authkey Secrets ({selector}; the driver needs \
                         deletecollection on secrets): {e}"
                    );
                }
            }
            .into_actor(self),
        )
    }
}
