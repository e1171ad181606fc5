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
//!   Job's `SHOAL_WORKER_AUTHKEY` refers to. Thread workloads (start method `thread`) run in
//!   this process, through the local executor.
//! * **Exit**: one watch on the pods of this runtime (label `shoal.dev/runtime`, through
//!   `kube::runtime::watcher`, which relists and resumes after errors) tells each worker's end
//!   (`status.rs`): its exit code, Python's way (`-9` for `SIGKILL`, `-15` for `SIGTERM`), with
//!   the reason logged when there is one worth telling (`OOMKilled`, or the pod's own reason,
//!   `Evicted`, `DeadlineExceeded`, `Shutdown`, when the container's is only `Error`), or that it
//!   cannot start (an image name that cannot be parsed, an image that may not be pulled, a
//!   command the container runtime cannot execute, a pod that failed before its container ran:
//!   refused by the node's admission, evicted while pending), which is logged with the
//!   kubelet's message, deletes the Job and ends the worker with code 1. A signal nobody asked
//!   for whose pod gives no reason (a Job's `activeDeadlineSeconds` ends its pod with
//!   `SIGTERM`) is logged with the reason of the Job's `Failed` condition, read then. A pod
//!   deleted without a final status (or with `ContainerStatusUnknown`) ends its worker with the
//!   code its status hash records (see **Relists**), else with the signal that was asked for,
//!   else `-9`. Container runtimes report a signal `N` as exit code `128 + N`, so a function that
//!   calls `std::process::exit(n)` with `n` in 129..=192 reads as `-(n - 128)` here (the local
//!   backend tells them apart).
//! * **Relists**: a watch that was cut off longer than the cluster keeps its history (a long
//!   network cut; the API server has etcd compact it every 5 minutes by default) is answered
//!   `410 Gone` when it resumes, and the watcher lists the pods again: what happened between
//!   is lost. A worker may have run and ended meanwhile, and its pod been deleted (by its Job's
//!   `ttlSecondsAfterFinished`, `0` deleting it at once), whether or not the watch had shown
//!   that pod. So, once the list is complete, every worker whose Job was created and whose pod
//!   the list lacks is looked up, in the background: first its status hash in Redis
//!   (`shoal:{<ns>:proc:<id>}:status`, see `crate::task`), where a worker that returned from its
//!   task records `state: exited` and the `code` it exits with just before exiting: that code
//!   is the worker's end. Without it (a function that called `std::process::exit`, a signal, a
//!   hash that expired), its Job (`GET`, bounded as every call): one that succeeded means the
//!   container exited 0; one gone, being deleted unfinished, or failed took the code with it,
//!   and the worker ends with the signal asked for if it was being stopped, else with `-9`, a
//!   guess, logged as one (as for a pod deleted without a final status); one still running
//!   with no pod seen yet has simply not made it (the watch will show it), and the worker
//!   waits; one whose pod was seen makes no other (`backoffLimit: 0`), and the worker ends as
//!   if gone. A pod event for the worker after the list makes the lookup's answer moot, and a
//!   worker is told of its end once: once ended it is forgotten, and later events of its pod
//!   are ignored. A Job that cannot be read leaves a worker never seen waiting (its start
//!   timeout still applies), with a warning.
//! * **Failures the kubelet retries**: an image pull that fails (`ErrImagePull`,
//!   `ImagePullBackOff`: a registry's rate limit, a credential not there yet), a Secret or key
//!   the container needs that is missing (`CreateContainerConfigError`), a container the runtime
//!   failed to create (`CreateContainerError`, `RunContainerError`) may clear on their own, so the
//!   first one seen is logged and starts a grace period, the same as for refused pods below
//!   (`kubernetes.pod_create_grace_secs`): the worker ends with code 1 (its pod and Job
//!   deleted, the latest message logged) only if its container is still failing to start when
//!   the grace is over; a container that gets past it (pulled, created) clears it.
//! * **Pods that never start**: a pod the scheduler cannot place (its `PodScheduled` condition
//!   `False`, `Unschedulable`: a node selector no node matches, a request no node can hold) stays
//!   `Pending` for ever, and so would its worker. The first such condition is logged; a worker
//!   whose container has not started `kubernetes.pod_start_timeout_secs` (default 10 minutes)
//!   after its Job was created is ended with code 1, its pod and Job deleted, and the reason
//!   logged (the `PodScheduled` condition's message when there is one). The pod watch may lag
//!   behind the cluster (a slow or cut connection), so before that the executor asks its
//!   status hash (a worker that claimed its task has started) and lists the pods with its
//!   `shoal.dev/worker` label (taken as watch events): a worker found started is left to run;
//!   when neither can be read, it asks again 30 s later.
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
//!   then (after the same check as for the start timeout: the Events' watch may be ahead of
//!   the pods') the latest Event's message is logged, the Job deleted and the worker ended
//!   with code 1, as for a pod that cannot start. A pod seen before then clears it. The grace
//!   counts from when the Event reached this process, not from its timestamps (no dependence on clock
//!   skew). A watcher that may not read Events (RBAC: `list` and `watch` on `events`, see
//!   `deploy/kubernetes/rbac.yaml`) logs a warning and leaves such workers waiting, as before.
//! * **Signal**: `terminate()` deletes the pod with a grace of 30 s ([`TERMINATE_GRACE_SECS`]:
//!   `SIGTERM`, then `SIGKILL` after it; the pods' own `terminationGracePeriodSeconds` is
//!   [`POD_GRACE_SECS`]) and the Job; `kill()` deletes the pod with grace 0, which the API
//!   server takes as a force deletion: the pod object goes at once, before its
//!   container has ended (the kubelet stops it behind it), so the worker ends with `-9` when
//!   the watch sees the pod deleted, not from a final status. A worker whose pod the watch has
//!   not shown yet (the pod may exist all the same) is stopped by deleting its Job first (no
//!   pod is made after that), then every pod with its `shoal.dev/worker` label, with the same
//!   grace: left to the garbage collector, such a pod would get its own grace period
//!   (`SIGTERM`, `SIGKILL` 2 s later) even after `kill()`, and its function could run on
//!   after `join()` said `-9`. The worker ends when its pod is seen gone, or at once when there was none; a pod
//!   that shows up later all the same is deleted with that grace as soon as it is seen. A
//!   delete that fails or goes unanswered is made again with back-off (1 s, doubling up to
//!   30 s, 8 tries in all), and a worker whose Job could not be deleted is not ended with the
//!   signal's code (its pod may run): the watch tells its end. `terminate()` and `kill()`
//!   return once the deletes are under way; their failures are logged. A `terminate()` whose
//!   pod outlives its grace because its node does not answer ends as below.
//! * **Unconfirmed deletions**: a pod being deleted (`deletionTimestamp` set: a stop, an
//!   eviction, its Job's garbage collection) goes only when its node's kubelet has stopped its
//!   container and confirmed; a node that stopped answering never does, and its pods stay
//!   `Terminating`, their containers `running` as far as their statuses tell, until the Node
//!   object is deleted: the worker would wait for ever (and `terminate()` would not help, the
//!   pod being deleted already). So the first sight of a worker's pod being deleted, its
//!   container not seen to end, sets a deadline: its `deletionGracePeriodSeconds` + 30 s
//!   (`UNCONFIRMED_DELETE_MARGIN`) from then (by this process's clock: no skew with the API
//!   server's counts; a later delete that shortens the grace, as the garbage collector's does
//!   with the pod's own, brings it forward). A pod still there then, as far as the watch
//!   tells, is logged (a warning naming it and saying that its node did not confirm the
//!   deletion) and deleted with grace 0, a force deletion (made again 30 s later if it fails):
//!   the API server removes it without the node, and the worker ends as after `kill()`'s,
//!   when the watch sees it gone, with the code its status hash records, else the signal asked
//!   for (`-15` after `terminate()`), else `-9`. Its process may run on, on that node, until
//!   the node comes back (or is deleted), as for any force deletion.
//! * **Strays**: a pod with this runtime's label whose worker the executor does not track
//!   (its launch was reported failed although the API server made its Job, or it outlived its
//!   worker's end) is deleted with grace 0 as soon as the watch shows it unfinished, and a
//!   launch that fails deletes its task record first, so such a pod finds nothing to run.
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
//! * **Inside a worker pod**: a worker's code may start processes of its own (a non-daemonic
//!   child may, as in Python); its runtime then runs this executor with the driver's settings,
//!   as the pod's service account. Its Jobs (and its authkey Secret) are labelled with that
//!   runtime's id and deleted when the worker's task ends, as any runtime's; but a parent pod
//!   that is killed or deleted (the driver's `terminate()`/`kill()` or shutdown, an eviction, a
//!   node lost) ends that runtime without its drop. So an executor that finds itself in a worker
//!   pod (its name, namespace and UID in the environment, from the downward API: see
//!   [`PodOwner`]) makes every Job and Secret it creates a dependent of that pod, with an
//!   `ownerReferences` entry naming it: Kubernetes' garbage collector deletes them once the pod
//!   is gone (the Jobs in the background: their pods with their grace period), however it went.
//!   Nothing else changes (labels, watches, the clean-up at the end of the task). Owner
//!   references name objects of their dependent's namespace only (the garbage collector would
//!   take one naming a pod of another namespace for a pod that is gone, and delete the Job at
//!   once), so Jobs made in another namespace than the pod's (a `kubernetes.namespace` that
//!   differs) are not owned, and a warning says that they outlive the pod.
//! * **Unanswered calls**: kube's client sets no read timeout, so a request whose connection
//!   was dropped silently (a NAT or load balancer forgetting it) would wait for ever, and with
//!   it `Process::start()` or the runtime's drop. Every call other than the watches (creating a
//!   Secret or a Job, every delete) is given `kubernetes.api_call_timeout_secs` (default 60 s)
//!   and fails with [`Error::Backend`] naming the call after that. A Job whose creation went
//!   unanswered is deleted in the background, in case the API server made it after all. A Job
//!   creation answered `409 AlreadyExists` is a success: kube's client sends a creation
//!   answered `504` (or `503`, `429`) again, and the first one may have made the Job, whose
//!   name (with a random suffix) is this launch's own.
//!
//! A remote worker cannot get a parent-death signal: a pool worker watches its driver's
//! liveness key instead (see `crate::pool`).
//!
//! Authentication is `kube::Config::infer` (the kubeconfig's current context, or the pod's
//! service account inside the cluster), or the kubeconfig context `kubernetes.context` names.
//!

mod spec;
mod status;

use std::collections::{HashMap, HashSet};
use std::future::Future;
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
use shoal_core::config::Config;
use shoal_core::error::{Error, Result};
use shoal_core::store::{Store, StoreSettings};

pub use spec::{
    ANNOTATION_PROCESS_NAME, AUTHKEY_SECRET_KEY, CONTAINER, ENV_POD_NAME, ENV_POD_NAMESPACE,
    ENV_POD_UID, JobTemplate, LABEL_NAMESPACE, LABEL_PROCESS, LABEL_RUNTIME, LABEL_WORKER,
    POD_GRACE_SECS, PodOwner, TERMINATE_GRACE_SECS, WorkerJob, label_value,
};
use status::{Absent, JobState, Recorded};
pub use status::{PodOutcome, outcome, started, unscheduled};

use crate::protocol::{
    Executor, Launch, Launched, QueryWorker, Shutdown, SignalWorker, StopSignal, WorkerExited,
    WorkerStatus, Workload,
};
use crate::task::{ENV_WORKER_AUTHKEY, ProcessKeys};

/// A worker the executor started and has not seen end.
struct RemoteWorker {
    name: String,
    job: String,
    /// Its task's id: the key of its status hash.
    task_id: String,
    /// Its Job was created (the API answered): before that, a Job not found is not one gone.
    created: bool,
    /// The executor's count of pod events when the latest of its pod was seen: an answer
    /// asked for after a relist is stale once the watch has told more.
    last_event: u64,
    /// Its pod, once the watch saw it (or a stop's delete found it).
    pod: Option<String>,
    notify: Recipient<WorkerExited>,
    /// The signal asked for, if any.
    stopping: Option<StopSignal>,
    /// When it was launched (its start timeout counts from then).
    launched: Instant,
    /// Its container has started (or its pod ended): no start timeout any more.
    started: bool,
    /// While it has no pod: the cluster refused to create one.
    refused: Option<Trouble>,
    /// The kubelet fails to start its container and retries.
    retrying: Option<Trouble>,
    /// While its pod is not scheduled: why (the `PodScheduled` condition).
    unscheduled: Option<String>,
    /// Its pod is being deleted and the watch has not shown its container end.
    terminating: Option<Terminating>,
}

/// A worker's pod being deleted (`deletionTimestamp` set) whose container has not been seen to
/// end: unless its node confirms the deletion (the kubelet reports the end, or removes the
/// pod), it is force-deleted at `deadline` ([`KubernetesExecutor::force_unconfirmed`]).
struct Terminating {
    /// The pod.
    pod: String,
    /// When it is force-deleted if it is still there: when this executor saw its deletion
    /// (or its grace shortened) + its `deletionGracePeriodSeconds` +
    /// [`UNCONFIRMED_DELETE_MARGIN`].
    deadline: Instant,
    /// Force deletes made so far.
    forced: u32,
}

/// A reason a worker has not started that may clear: since when it is seen, and the latest
/// word on it.
struct Trouble {
    /// When it was first seen by this executor.
    since: Instant,
    /// The latest message: the API's reason for refusing the pod, or the kubelet's for not
    /// starting its container.
    message: String,
}

/// Which deadline a worker that has not been seen starting has passed.
#[derive(Clone, Copy, Debug)]
enum Deadline {
    /// `kubernetes.pod_start_timeout_secs` after its Job was created.
    Start,
    /// `kubernetes.pod_create_grace_secs` after the first `FailedCreate` Event of its Job.
    Refused,
}

/// What a check of a worker not seen starting found ([`KubernetesExecutor::check_start`]).
enum StartCheck {
    /// Its status hash says it claimed its task: it runs, or ran.
    Claimed,
    /// Its pods, as listed now (none: it has none).
    Pods(Vec<Pod>),
    /// Neither could be read: why.
    Unknown(String),
}

/// How long before a check whose answers could not be read is made again.
const START_RECHECK: Duration = Duration::from_secs(30);

/// How long past its grace period a pod being deleted may stay before the executor takes its
/// node for one that stopped answering and force-deletes it (grace 0): the kubelet may need a
/// moment to report the end and the API server to remove the pod, and the watch to tell.
const UNCONFIRMED_DELETE_MARGIN: Duration = Duration::from_secs(30);

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
    /// How many pod events the watch has delivered (see `RemoteWorker::last_event`).
    pod_events: u64,
    /// The store the workers record their exits in (see `crate::task`), for the workers whose
    /// pods a relist did not find; `None` if its URL cannot be used.
    store: Option<Arc<Store>>,
    /// `kubernetes.pod_create_grace_secs`: also the grace of a container the kubelet retries.
    pod_create_grace: Duration,
    /// `kubernetes.pod_start_timeout_secs`.
    pod_start_timeout: Duration,
    /// `kubernetes.api_call_timeout_secs`.
    api_timeout: Duration,
    /// The random suffix of the authkey Secret of each key (by its hex form) this runtime's
    /// Jobs were given (see `spec.rs`), and whether that Secret was made.
    authkey_secrets: HashMap<String, (String, bool)>,
    /// Launches whose API calls have not returned yet: the shutdown waits for them, lest a
    /// Job or a Secret be made after it deleted this runtime's.
    launching: Arc<AtomicUsize>,
    /// Shutting down: no more launches.
    stopping: bool,
    /// The worker pod this executor runs in, if it runs in one whose namespace is the Jobs':
    /// the owner of every Job and Secret it creates (see the module docs).
    owner: Option<PodOwner>,
}

impl KubernetesExecutor {
    /// Starts the executor on `arbiter`: builds the API client (from the kubeconfig, or the
    /// service account inside a cluster; no request is awaited, so an API server that cannot
    /// be reached shows at the first launch and in the watches' warnings) and starts watching
    /// this runtime's pods. Thread workloads go to `local`.
    pub fn start(
        template: JobTemplate,
        local: Executor,
        arbiter: &ArbiterHandle,
    ) -> Result<Executor> {
        let pod_start_timeout = template.config.pod_start_timeout();
        let api_timeout = template.config.api_call_timeout();
        let store = status_store(&template);
        let addr = KubernetesExecutor::start_in_arbiter(arbiter, move |_| KubernetesExecutor {
            namespace: template.config.namespace.clone().unwrap_or_default(),
            pod_create_grace: template.config.pod_create_grace(),
            pod_start_timeout,
            api_timeout,
            template,
            local,
            client: None,
            workers: HashMap::new(),
            relisted: None,
            pod_events: 0,
            store,
            authkey_secrets: HashMap::new(),
            launching: Arc::new(AtomicUsize::new(0)),
            stopping: false,
            owner: PodOwner::from_env(),
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
            self.on_stray_pod(pod, &id, deleted, ctx);
            return;
        };
        self.pod_events += 1;
        worker.last_event = self.pod_events;
        let name = pod.name_any();
        let first_sight = worker.pod.is_none();
        worker.pod = Some(name.clone());
        worker.started |= started(pod);
        match unscheduled(pod) {
            Some(why) => {
                if worker.unscheduled.is_none() {
                    tracing::warn!(
                        "{} (Job {}): its pod {name} cannot be scheduled yet: {why}; ending it \
                         unless it starts within {:?} of its launch",
                        worker.name,
                        worker.job,
                        self.pod_start_timeout
                    );
                }
                worker.unscheduled = Some(why);
            }
            None => worker.unscheduled = None,
        }
        // A pod made after a stop deleted the worker's pods (the Job controller had not yet
        // seen the Job go): it goes the same way.
        if let Some(signal) = worker.stopping
            && first_sight
            && !deleted
            && pod.metadata.deletion_timestamp.is_none()
        {
            self.delete_pod(ctx, &name, grace(signal));
        }
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match outcome(pod) {
            // A kubelet that lost track of a container reports `ContainerStatusUnknown` with
            // 137, a stand-in: the worker's own record, else the stop asked for, tells more.
            PodOutcome::Exited {
                code,
                reason,
                lost: true,
            } => {
                let fallback = worker.stopping.map_or(code, StopSignal::exit_code);
                self.end_unseen(&id, fallback, reason, ctx);
            }
            // A signal nobody here asked for, and the pod does not say why: its Job may (a
            // deadline, `activeDeadlineSeconds`, ends its pod with `SIGTERM`).
            PodOutcome::Exited {
                code, reason: None, ..
            } if code < 0 && worker.stopping.is_none() => self.end_signalled(&id, code, ctx),
            PodOutcome::Exited { code, reason, .. } => self.exited(&id, code, reason),
            PodOutcome::Unstartable(why) => {
                tracing::error!(
                    "{} (Job {}) cannot start: {why}; deleting it",
                    worker.name,
                    worker.job
                );
                self.delete(ctx, &id, Some(0), None);
                self.never_started(&id);
            }
            PodOutcome::NeverRan(why) => match worker.stopping {
                // Stopped before it ran: it ends as asked.
                Some(signal) => self.exited(&id, signal.exit_code(), None),
                None => {
                    tracing::error!(
                        "{} (Job {}): its pod {name} failed before its container ran: {why}",
                        worker.name,
                        worker.job
                    );
                    self.delete(ctx, &id, Some(0), None);
                    self.never_started(&id);
                }
            },
            PodOutcome::Retrying(why) if !deleted => {
                self.on_retrying(&id, why, ctx);
                self.on_terminating(&id, pod, ctx);
            }
            PodOutcome::Pending | PodOutcome::Retrying(_) if deleted => {
                let fallback = worker.stopping.map_or(-9, StopSignal::exit_code);
                let why = if worker.terminating.as_ref().is_some_and(|t| t.forced > 0) {
                    "its pod was force-deleted (its node did not confirm the deletion)"
                } else {
                    "its pod was deleted"
                };
                self.end_unseen(&id, fallback, Some(why.into()), ctx);
            }
            // Past whatever the kubelet retried (pulled, created), or not there yet.
            PodOutcome::Pending | PodOutcome::Retrying(_) => {
                worker.retrying = None;
                self.on_terminating(&id, pod, ctx);
            }
        }
    }

    /// Worker `id`'s pod, whose container has not been seen to end, as the watch shows it: if
    /// it is being deleted, the first sight of that (or of a shorter grace) sets when it is
    /// force-deleted, should its node not confirm the deletion: its grace period
    /// (`deletionGracePeriodSeconds`) + [`UNCONFIRMED_DELETE_MARGIN`] from now. Counted from
    /// when this executor saw it, not from the `deletionTimestamp` (already the end of the
    /// grace), so that no clock skew between here and the API server counts.
    fn on_terminating(&mut self, id: &str, pod: &Pod, ctx: &mut Context<Self>) {
        let Some(grace) = status::terminating(pod) else {
            return;
        };
        let Some(worker) = self.workers.get_mut(id) else {
            return;
        };
        let name = pod.name_any();
        let now = Instant::now();
        let deadline = now + grace + UNCONFIRMED_DELETE_MARGIN;
        match &mut worker.terminating {
            // Timed already, as early or earlier.
            Some(known) if known.pod == name && known.deadline <= deadline => return,
            // A shorter grace (a later delete, the garbage collector's with the pod's own).
            Some(known) if known.pod == name => known.deadline = deadline,
            _ => {
                worker.terminating = Some(Terminating {
                    pod: name,
                    deadline,
                    forced: 0,
                });
            }
        }
        let (id, launched) = (id.to_string(), worker.launched);
        ctx.run_later(deadline - now, move |act, ctx| {
            act.force_unconfirmed(&id, launched, ctx)
        });
    }

    /// The deadline of worker `id`'s pod being deleted (see
    /// [`KubernetesExecutor::on_terminating`]) has passed and the watch has shown neither its
    /// container's end nor the pod gone: its node has not confirmed the deletion (a node that
    /// stopped answering, whose kubelet can neither stop the container nor say so). Logs why and
    /// deletes it with grace 0 (a force deletion: the API server removes it without the
    /// node), so that the worker ends as a force-deleted pod does, when the watch shows it
    /// gone. A force delete that fails is made again [`DELETE_BACKOFF_MAX`] later.
    fn force_unconfirmed(&mut self, id: &str, launched: Instant, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get_mut(id) else {
            return;
        };
        let Some(terminating) = worker.terminating.as_mut() else {
            return;
        };
        // Another launch under the same id, or a later deadline (its own timer comes).
        if worker.launched != launched || terminating.deadline > Instant::now() {
            return;
        }
        terminating.forced += 1;
        // Made again only if this one fails (see below); the watch tells the end.
        terminating.deadline = Instant::now() + DELETE_BACKOFF_MAX;
        let pod = terminating.pod.clone();
        if terminating.forced == 1 {
            tracing::warn!(
                "{} (Job {}): its pod {pod} is still there {UNCONFIRMED_DELETE_MARGIN:?} past \
                 its deletion's grace period: its node did not confirm the deletion (a node that \
                 stopped answering?); force-deleting it (grace 0)",
                worker.name,
                worker.job
            );
        }
        let Ok(client) = self.client() else {
            return;
        };
        let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
        let timeout = self.api_timeout;
        let id = id.to_string();
        ctx.spawn(
            async move {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                let call = format!("force-deleting pod {pod}");
                answered(
                    &call,
                    bounded(timeout, &call, pods.delete(&pod, &params)).await,
                )
            }
            .into_actor(self)
            .map(move |landed, act, ctx| {
                if landed || act.workers.get(&id).is_none_or(|w| w.launched != launched) {
                    return;
                }
                ctx.run_later(DELETE_BACKOFF_MAX, move |act, ctx| {
                    act.force_unconfirmed(&id, launched, ctx)
                });
            }),
        );
    }

    /// Worker `id`'s pod ended by a signal (`code`) that was not asked for and that its pod
    /// gives no reason for: its Job is read in the background, and the reason of its `Failed`
    /// (or `FailureTarget`) condition, when there is one (`DeadlineExceeded`: the Job's
    /// `activeDeadlineSeconds` passed), is logged with the end.
    fn end_signalled(&mut self, id: &str, code: i32, ctx: &mut Context<Self>) {
        let (Some(worker), Ok(client)) = (self.workers.get(id), self.client()) else {
            self.exited(id, code, None);
            return;
        };
        let jobs: Api<Job> = Api::namespaced(client, &self.namespace);
        let (job, launched, timeout) = (worker.job.clone(), worker.launched, self.api_timeout);
        let id = id.to_string();
        ctx.spawn(
            async move {
                let call = format!("reading Job {job}");
                match bounded(timeout, &call, jobs.get_opt(&job)).await {
                    Ok(Ok(found)) => match status::job_state(found.as_ref()) {
                        JobState::Failed(why) => Some(format!("its Job failed: {why}")),
                        _ => None,
                    },
                    Ok(Err(e)) => {
                        tracing::debug!("{call}: {e}");
                        None
                    }
                    Err(e) => {
                        tracing::debug!("{e}");
                        None
                    }
                }
            }
            .into_actor(self)
            .map(move |reason, act, _| {
                if act.workers.get(&id).is_some_and(|w| w.launched == launched) {
                    act.exited(&id, code, reason);
                }
            }),
        );
    }

    /// Worker `id`'s pod ended without telling how (deleted without a final status, or
    /// `ContainerStatusUnknown`): it ends with the code its status hash records (it returned
    /// from its task, and the code is its own), read in the background; else with `fallback`
    /// (the signal asked for, else `-9`), and `reason` logged when that is a guess.
    fn end_unseen(
        &mut self,
        id: &str,
        fallback: i32,
        reason: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        let Some(store) = self.store.clone() else {
            self.exited(id, fallback, reason);
            return;
        };
        let key = ProcessKeys::new(store.keys(), &worker.task_id).status;
        let launched = worker.launched;
        let timeout = self.api_timeout;
        let id = id.to_string();
        ctx.spawn(
            async move { read_exit(&store, &key, timeout).await }
                .into_actor(self)
                .map(move |recorded, act, _| {
                    if act.workers.get(&id).is_none_or(|w| w.launched != launched) {
                        return;
                    }
                    let (code, guessed) = status::unseen_exit(&recorded, fallback);
                    // The worker's own code needs no explaining.
                    let reason = reason.filter(|_| guessed);
                    act.exited(&id, code, reason);
                }),
        );
    }

    /// A pod of this runtime whose worker (`id`) the executor does not track: one whose launch
    /// was reported failed although its Job was made (a creation that went unanswered, or
    /// answered with an error after the API server stored the Job), or one that outlived the
    /// end of its worker. Unless it has ended or is being deleted, it is deleted at once (grace
    /// 0): no function may run that no process tracks.
    fn on_stray_pod(&mut self, pod: &Pod, id: &str, deleted: bool, ctx: &mut Context<Self>) {
        let finished = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if deleted || finished || pod.metadata.deletion_timestamp.is_some() {
            return;
        }
        let name = pod.name_any();
        tracing::warn!(
            "pod {name} runs worker {id}, which this runtime does not track (its launch failed, \
             or it ended): deleting it"
        );
        self.delete_pod(ctx, &name, Some(0));
    }

    /// The kubelet failed to start a worker's container and retries: the first failure of a
    /// run of them starts the grace period ([`KubernetesExecutor::end_retrying`] after it).
    fn on_retrying(&mut self, id: &str, why: String, ctx: &mut Context<Self>) {
        let grace = self.pod_create_grace;
        let Some(worker) = self.workers.get_mut(id) else {
            return;
        };
        match &mut worker.retrying {
            Some(trouble) => trouble.message = why,
            None => {
                tracing::warn!(
                    "{} (Job {}) cannot start yet: {why}; ending it unless its container \
                     starts within {grace:?}",
                    worker.name,
                    worker.job,
                );
                worker.retrying = Some(Trouble {
                    since: Instant::now(),
                    message: why,
                });
                let id = id.to_string();
                ctx.run_later(grace, move |act, ctx| act.end_retrying(&id, ctx));
            }
        }
    }

    /// The grace after the first of a run of failures to start a worker's container is over:
    /// if the kubelet is still failing, logs the latest failure, deletes the pod and the Job
    /// and ends the worker with code 1.
    fn end_retrying(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        let Some(trouble) = &worker.retrying else {
            return;
        };
        // A later run of failures (the container got past one, then failed again): its own
        // timer ends it. A worker being stopped ends as asked.
        if trouble.since.elapsed() < self.pod_create_grace || worker.stopping.is_some() {
            return;
        }
        tracing::error!(
            "{} (Job {}) cannot start: {} (still failing {:?} after the first failure); \
             deleting it",
            worker.name,
            worker.job,
            trouble.message,
            trouble.since.elapsed()
        );
        self.delete(ctx, id, Some(0), None);
        self.never_started(id);
    }

    /// The start timeout of a worker launched at `launched` is over: if its container has not
    /// started as far as the pod watch tells, asks first whether it did all the same (the watch
    /// may lag: [`KubernetesExecutor::check_start`]); then, if it did not, logs why (the
    /// scheduler's word when there is one), deletes its pod and Job and ends it with code 1.
    fn end_unstarted(&mut self, id: &str, launched: Instant, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        // Started, another launch under the same id, or being stopped (it ends as asked).
        if worker.started || worker.launched != launched || worker.stopping.is_some() {
            return;
        }
        self.check_start(id, launched, Deadline::Start, ctx);
    }

    /// The start timeout of worker `id` is over and the check found no sign that it started.
    fn unstarted(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        if worker.started || worker.stopping.is_some() {
            return;
        }
        let why = match (&worker.unscheduled, &worker.retrying, &worker.pod) {
            (Some(unscheduled), _, _) => format!("PodScheduled=False: {unscheduled}"),
            (None, Some(trouble), _) => format!("its container cannot start: {}", trouble.message),
            (None, None, Some(pod)) => format!("its pod {pod} is still pending"),
            (None, None, None) => "its Job has no pod".to_string(),
        };
        tracing::error!(
            "{} (Job {}) did not start within {:?}: {why}; deleting it",
            worker.name,
            worker.job,
            self.pod_start_timeout
        );
        self.delete(ctx, id, Some(0), None);
        self.never_started(id);
    }

    /// Before a worker is ended as never started (`deadline`), makes sure that it did not start
    /// while the pod watch lagged behind (a watch connection that is slow, or cut off and
    /// waiting to resume): its status hash (a worker that claimed its task has run) and the
    /// pods with its label, listed, which go through [`KubernetesExecutor::on_pod`] as watch
    /// events would. It ends only if neither shows it started (or, refused, a pod); when
    /// neither can be read, the check is made again later.
    fn check_start(
        &mut self,
        id: &str,
        launched: Instant,
        deadline: Deadline,
        ctx: &mut Context<Self>,
    ) {
        let (Some(worker), Ok(client)) = (self.workers.get(id), self.client()) else {
            return;
        };
        let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
        let status = self.store.clone().map(|store| {
            (
                ProcessKeys::new(store.keys(), &worker.task_id).status,
                store,
            )
        });
        let selector = format!("{},{LABEL_WORKER}={}", self.selector(), label_value(id));
        let timeout = self.api_timeout;
        let id = id.to_string();
        ctx.spawn(
            async move {
                let claimed = match status {
                    Some((key, store)) => read_claimed(&store, &key, timeout).await,
                    None => Err("the store's URL cannot be used".to_string()),
                };
                if claimed == Ok(true) {
                    return StartCheck::Claimed;
                }
                let call = format!("listing the pods of {selector}");
                let list = ListParams::default().labels(&selector);
                match bounded(timeout, &call, pods.list(&list)).await {
                    Ok(Ok(listed)) => StartCheck::Pods(listed.items),
                    Ok(Err(e)) => StartCheck::Unknown(format!("{call}: {e}")),
                    Err(e) => StartCheck::Unknown(e.to_string()),
                }
            }
            .into_actor(self)
            .map(move |check, act, ctx| act.start_checked(&id, launched, deadline, check, ctx)),
        );
    }

    /// What [`KubernetesExecutor::check_start`] found of worker `id` (launched at `launched`).
    fn start_checked(
        &mut self,
        id: &str,
        launched: Instant,
        deadline: Deadline,
        check: StartCheck,
        ctx: &mut Context<Self>,
    ) {
        let Some(worker) = self.workers.get_mut(id) else {
            return;
        };
        if worker.launched != launched {
            return;
        }
        match check {
            StartCheck::Claimed => {
                tracing::info!(
                    "{} (Job {}) has claimed its task, which the pod watch has not told yet: it \
                     runs",
                    worker.name,
                    worker.job
                );
                worker.started = true;
                worker.refused = None;
            }
            StartCheck::Pods(pods) => {
                for pod in &pods {
                    self.on_pod(pod, false, ctx);
                }
                match deadline {
                    Deadline::Start => self.unstarted(id, ctx),
                    Deadline::Refused => self.refused(id, ctx),
                }
            }
            StartCheck::Unknown(e) => {
                let again = START_RECHECK.min(self.pod_start_timeout);
                tracing::warn!(
                    "{} (Job {}) has not been seen starting, but neither its status record nor \
                     its pods can be read ({e}): asking again in {again:?}",
                    worker.name,
                    worker.job
                );
                let id = id.to_string();
                ctx.run_later(again, move |act, ctx| {
                    if act.workers.get(&id).is_some_and(|w| w.stopping.is_none()) {
                        act.check_start(&id, launched, deadline, ctx);
                    }
                });
            }
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
                worker.refused = Some(Trouble {
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

    /// The grace after a worker's first `FailedCreate` is over: if it still has no pod as far
    /// as the pod watch tells, makes sure that it has none (the watch may lag behind the
    /// Events': [`KubernetesExecutor::check_start`]); then logs why, deletes its Job and ends it
    /// with code 1.
    fn end_refused(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        // A worker being stopped ends as asked.
        let (None, Some(_), None) = (&worker.pod, &worker.refused, worker.stopping) else {
            return;
        };
        let launched = worker.launched;
        self.check_start(id, launched, Deadline::Refused, ctx);
    }

    /// The grace after worker `id`'s first `FailedCreate` is over and the check found no pod.
    fn refused(&mut self, id: &str, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        let (None, Some(refusal), None) = (&worker.pod, &worker.refused, worker.stopping) else {
            return;
        };
        if worker.started {
            return;
        }
        tracing::error!(
            "{} (Job {}) cannot start: FailedCreate: {} (no pod within {:?} of the first \
             refusal); deleting it",
            worker.name,
            worker.job,
            refusal.message,
            refusal.since.elapsed()
        );
        self.delete(ctx, id, Some(0), None);
        self.never_started(id);
    }

    /// Deletes a worker's pods with `grace` seconds (`None`: the pod's own) and its Job, in the
    /// background. A pod the watch has shown goes first, by name, then the Job. Without one,
    /// the Job goes first (the Job controller makes no pod after that), then every pod with the
    /// worker's label: one may exist that the watch has not shown yet, which the garbage
    /// collector alone would delete with its own grace period. A call that fails or goes
    /// unanswered is made again, with back-off, [`DELETE_ATTEMPTS`] times in all. With `settle`
    /// (a stop asked for while no pod was known), the worker then ends with that signal's code
    /// if no pod was found, or is left to the watch to see its pod go (see
    /// [`KubernetesExecutor::settle`]).
    fn delete(
        &mut self,
        ctx: &mut Context<Self>,
        id: &str,
        grace: Option<u32>,
        settle: Option<StopSignal>,
    ) {
        let (Some(worker), Ok(client)) = (self.workers.get(id), self.client()) else {
            // Nothing can be deleted: a stop that waits for the answer would wait for ever.
            if let Some(signal) = settle {
                self.exited(id, signal.exit_code(), None);
            }
            return;
        };
        let target = DeleteTarget {
            pods: Api::namespaced(client.clone(), &self.namespace),
            jobs: Api::namespaced(client, &self.namespace),
            pod: worker.pod.clone(),
            job: worker.job.clone(),
            selector: format!("{},{LABEL_WORKER}={}", self.selector(), label_value(id)),
            grace,
            timeout: self.api_timeout,
        };
        let what = format!("{} (Job {})", worker.name, worker.job);
        let id = id.to_string();
        ctx.spawn(
            async move {
                let mut deletion = Deletion::default();
                let mut pause = DELETE_BACKOFF;
                for attempt in 1..=DELETE_ATTEMPTS {
                    target.attempt(&mut deletion).await;
                    if deletion.complete() {
                        break;
                    }
                    if attempt == DELETE_ATTEMPTS {
                        tracing::error!(
                            "{what}: deleting its pods and Job failed {DELETE_ATTEMPTS} times; \
                             giving up (its end is left to the pod watch)"
                        );
                        break;
                    }
                    actix_rt::time::sleep(pause).await;
                    pause = (pause * 2).min(DELETE_BACKOFF_MAX);
                }
                deletion
            }
            .into_actor(self)
            .map(move |deletion, act, _| {
                if let Some(signal) = settle {
                    act.settle(&id, signal, deletion);
                }
            }),
        );
    }

    /// A stop asked for while a worker had no known pod has deleted its Job and its pods, or
    /// tried to (`deletion`): with no pod found and its Job gone, the worker ends with the
    /// signal's code; with one, the watch tells its end (and, should the watch miss it, its
    /// next relist: see `InitDone`). A worker whose Job could not be deleted is not ended: its
    /// pod may run (or be made) all the same, and the watch tells its end.
    fn settle(&mut self, id: &str, signal: StopSignal, deletion: Deletion) {
        let Some(worker) = self.workers.get_mut(id) else {
            return;
        };
        if worker.pod.is_some() {
            // The watch has shown its pod meanwhile: it tells the end.
            return;
        }
        if let Some(pod) = deletion.found.first() {
            worker.pod = Some(pod.clone());
            return;
        }
        match (
            deletion.job_gone,
            deletion.pods_gone && !deletion.pods_unlisted,
        ) {
            (true, true) => self.exited(id, signal.exit_code(), None),
            (true, false) => {
                tracing::warn!(
                    "{} (Job {}): ended without knowing its pod; one made meanwhile is left to \
                     the garbage collector (its own grace period)",
                    worker.name,
                    worker.job
                );
                self.exited(id, signal.exit_code(), None);
            }
            (false, _) => tracing::error!(
                "{} (Job {}): its Job could not be deleted: not ended until its pod is seen to \
                 end",
                worker.name,
                worker.job
            ),
        }
    }

    /// A relist of the pod watch did not find the pod of worker `id`: asks its status hash
    /// how it ended, and, when that does not tell, the API server for its Job, in the
    /// background; then ends it or leaves it waiting ([`status::absent`] decides). Meanwhile the
    /// watch goes on: an event of its pod after the relist makes the answer moot.
    fn reconsider(&mut self, id: &str, ctx: &mut Context<Self>) {
        let (Some(worker), Ok(client)) = (self.workers.get(id), self.client()) else {
            return;
        };
        let jobs: Api<Job> = Api::namespaced(client, &self.namespace);
        let job = worker.job.clone();
        let status = self.store.clone().map(|store| {
            (
                ProcessKeys::new(store.keys(), &worker.task_id).status,
                store,
            )
        });
        let (launched, last_event) = (worker.launched, worker.last_event);
        let timeout = self.api_timeout;
        let id = id.to_string();
        ctx.spawn(
            async move {
                let recorded = match status {
                    Some((key, store)) => read_exit(&store, &key, timeout).await,
                    None => Recorded::Unreadable("the store's URL cannot be used".into()),
                };
                if matches!(recorded, Recorded::Exited(_)) {
                    return (recorded, None);
                }
                let call = format!("reading Job {job}");
                let state = match bounded(timeout, &call, jobs.get_opt(&job)).await {
                    Ok(Ok(found)) => status::job_state(found.as_ref()),
                    Ok(Err(e)) => JobState::Unknown(format!("{call}: {e}")),
                    Err(e) => JobState::Unknown(e.to_string()),
                };
                (recorded, Some(state))
            }
            .into_actor(self)
            .map(move |(recorded, state), act, _| {
                act.reconsidered(&id, launched, last_event, &recorded, state.as_ref());
            }),
        );
    }

    /// The answers [`KubernetesExecutor::reconsider`] got for worker `id` (launched at
    /// `launched`, its latest pod event then `last_event`): ends it, unless it ended, or the
    /// watch told more of it, meanwhile.
    fn reconsidered(
        &mut self,
        id: &str,
        launched: Instant,
        last_event: u64,
        recorded: &Recorded,
        job: Option<&JobState>,
    ) {
        let Some(worker) = self.workers.get(id) else {
            return;
        };
        if worker.launched != launched || worker.last_event != last_event {
            return;
        }
        if let Recorded::Unreadable(e) = recorded {
            tracing::warn!(
                "{} (Job {}): its pod was not found when the pod watch relisted, and its exit \
                 record cannot be read ({e}); going by its Job",
                worker.name,
                worker.job
            );
        }
        let seen = worker.pod.is_some();
        let verdict = status::absent(
            recorded,
            job,
            seen,
            worker.stopping.map(StopSignal::exit_code),
        );
        match verdict {
            Absent::Exited { code, reason } => self.exited(id, code, reason),
            Absent::Wait => {
                if let Some(JobState::Unknown(e)) = job {
                    tracing::warn!(
                        "{} (Job {}): its pod was not found when the pod watch relisted and \
                         its Job cannot be read ({e}); waiting for its pod",
                        worker.name,
                        worker.job
                    );
                }
            }
        }
    }

    /// Deletes the pod `name` with `grace` seconds (`None`: its own), in the background.
    fn delete_pod(&mut self, ctx: &mut Context<Self>, name: &str, grace: Option<u32>) {
        let Ok(client) = self.client() else {
            return;
        };
        let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
        let name = name.to_string();
        let timeout = self.api_timeout;
        ctx.spawn(
            async move {
                let params = DeleteParams {
                    grace_period_seconds: grace,
                    ..DeleteParams::default()
                };
                let call = format!("deleting pod {name}");
                match bounded(timeout, &call, pods.delete(&name, &params)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if not_found(&e) => {}
                    Ok(Err(e)) => tracing::warn!("{call}: {e}"),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            .into_actor(self),
        );
    }
}

/// A connection (made at its first use) to the store of `template`'s runtime, where workers
/// record their exits; `None`, logged, if its URL cannot be used.
fn status_store(template: &JobTemplate) -> Option<Arc<Store>> {
    // Only two fields of small hashes are read: the default limits and timeouts do.
    let mut settings = StoreSettings::from_config(&Config::default());
    settings.namespace = template.namespace.clone();
    match Store::connect_lazy(&template.redis_url, settings) {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            tracing::warn!(
                "the Kubernetes executor cannot read its workers' exit records ({e}): a worker \
                 whose pod ends unseen by the pod watch is ended by its Job's word alone"
            );
            None
        }
    }
}

/// The exit recorded in the status hash `key` (`state`, `code`), given at most `timeout`.
async fn read_exit(store: &Store, key: &str, timeout: Duration) -> Recorded {
    let read = async {
        let mut conn = store.multiplexed().await.map_err(|e| e.to_string())?;
        redis::cmd("HMGET")
            .arg(key)
            .arg("state")
            .arg("code")
            .query_async::<(Option<String>, Option<String>)>(&mut conn)
            .await
            .map_err(|e| format!("reading {key}: {e}"))
    };
    match actix_rt::time::timeout(timeout, read).await {
        Ok(Ok((state, code))) => status::recorded(state.as_deref(), code.as_deref()),
        Ok(Err(e)) => Recorded::Unreadable(e),
        Err(_) => Recorded::Unreadable(format!("reading {key}: no answer within {timeout:?}")),
    }
}

/// Whether the worker of status hash `key` has claimed its task (its `state` is set: `running`
/// or `exited`), given at most `timeout`.
async fn read_claimed(
    store: &Store,
    key: &str,
    timeout: Duration,
) -> std::result::Result<bool, String> {
    let read = async {
        let mut conn = store.multiplexed().await.map_err(|e| e.to_string())?;
        redis::cmd("HEXISTS")
            .arg(key)
            .arg("state")
            .query_async::<bool>(&mut conn)
            .await
            .map_err(|e| format!("reading {key}: {e}"))
    };
    match actix_rt::time::timeout(timeout, read).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("reading {key}: no answer within {timeout:?}")),
    }
}

/// How many times a worker's delete is tried ([`KubernetesExecutor::delete`]).
const DELETE_ATTEMPTS: u32 = 8;
/// The pause after a worker's delete first failed; it doubles after each failure.
const DELETE_BACKOFF: Duration = Duration::from_secs(1);
/// The longest pause between two tries of a worker's delete.
const DELETE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What [`KubernetesExecutor::delete`] deletes.
struct DeleteTarget {
    pods: Api<Pod>,
    jobs: Api<Job>,
    /// The pod the watch has shown, if any.
    pod: Option<String>,
    job: String,
    /// The worker's pods' label selector, used when no pod is known.
    selector: String,
    grace: Option<u32>,
    timeout: Duration,
}

/// What a worker's delete has done so far.
#[derive(Debug, Default)]
struct Deletion {
    /// The known pod is deleted (or was not found).
    pod_gone: bool,
    /// The Job is deleted (or was not found).
    job_gone: bool,
    /// Without a known pod: the pods with the worker's label are deleted (or there were none),
    /// or the API server refused to delete them by label.
    pods_gone: bool,
    /// The pods with the worker's label could not be deleted, nor their names learnt.
    pods_unlisted: bool,
    /// The pods with the worker's label that were deleted.
    found: Vec<String>,
}

impl Deletion {
    /// Nothing is left to do.
    fn complete(&self) -> bool {
        self.job_gone && (self.pod_gone || self.pods_gone)
    }
}

impl DeleteTarget {
    /// Makes the calls `deletion` says are still to make, once each; failures are logged.
    async fn attempt(&self, deletion: &mut Deletion) {
        let pod_params = DeleteParams {
            grace_period_seconds: self.grace,
            ..DeleteParams::default()
        };
        let job_params = DeleteParams {
            grace_period_seconds: self.grace,
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let (job, timeout) = (&self.job, self.timeout);
        if let Some(pod) = &self.pod
            && !deletion.pod_gone
        {
            let call = format!("deleting pod {pod}");
            deletion.pod_gone = answered(
                &call,
                bounded(timeout, &call, self.pods.delete(pod, &pod_params)).await,
            );
        }
        if !deletion.job_gone {
            let call = format!("deleting Job {job}");
            let delete = self.jobs.delete(job, &job_params);
            deletion.job_gone = answered(&call, bounded(timeout, &call, delete).await);
        }
        // The pods go after the Job: the Job controller makes no other one then.
        if self.pod.is_some() || deletion.pods_gone || !deletion.job_gone {
            return;
        }
        let call = format!("deleting the pods of Job {job} ({})", self.selector);
        let list = ListParams::default().labels(&self.selector);
        let delete = self.pods.delete_collection(&pod_params, &list);
        match bounded(timeout, &call, delete).await {
            Ok(Ok(answer)) => match answer.left() {
                Some(deleted) => {
                    deletion.pods_gone = true;
                    deletion
                        .found
                        .extend(deleted.items.iter().map(|p| p.name_any()));
                }
                None => {
                    tracing::warn!("{call}: the API server did not list them");
                    (deletion.pods_gone, deletion.pods_unlisted) = (true, true);
                }
            },
            Ok(Err(e)) => {
                tracing::warn!("{call} (the driver needs deletecollection on pods): {e}");
                // A refusal (RBAC) does not change when asked again; an API server's trouble may.
                if let kube::Error::Api(status) = &e
                    && (400..500).contains(&status.code)
                    && status.code != 429
                {
                    (deletion.pods_gone, deletion.pods_unlisted) = (true, true);
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Whether a delete named `call` is done (deleted, or not found); a failure is logged.
fn answered<T>(call: &str, answer: Result<kube::Result<T>>) -> bool {
    match answer {
        Ok(Ok(_)) => true,
        Ok(Err(e)) if not_found(&e) => true,
        Ok(Err(e)) => {
            tracing::warn!("{call}: {e}");
            false
        }
        Err(e) => {
            tracing::warn!("{e}");
            false
        }
    }
}

/// The grace period of a stop: [`TERMINATE_GRACE_SECS`] for `terminate()`, given explicitly
/// (the pod's own, [`POD_GRACE_SECS`], is short: see `spec.rs`), none for `kill()`.
fn grace(signal: StopSignal) -> Option<u32> {
    match signal {
        StopSignal::Terminate => Some(TERMINATE_GRACE_SECS),
        StopSignal::Kill => Some(0),
    }
}

/// `request`, a call to the API server named `call`, given at most `timeout`: kube's client
/// has no read timeout, so a request whose connection was dropped silently would wait for
/// ever. The outer error is the timeout, naming the call; the inner result is the API's.
async fn bounded<T>(
    timeout: Duration,
    call: &str,
    request: impl Future<Output = kube::Result<T>>,
) -> Result<kube::Result<T>> {
    actix_rt::time::timeout(timeout, request)
        .await
        .map_err(|_| {
            Error::Backend(format!(
                "{call}: no answer from the Kubernetes API server within {timeout:?}"
            ))
        })
}

/// The watch's resource version was compacted away (`410 Gone`): the watcher lists again.
fn expired(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(status) if status.code == 410)
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
                if let Some(owner) = act.owner.take_if(|o| o.namespace != act.namespace) {
                    tracing::warn!(
                        "this worker pod ({}/{}) starts its processes' Jobs in namespace {}: an \
                         owner reference cannot name a pod of another namespace, so they are \
                         not deleted with the pod, only when this worker's task ends",
                        owner.namespace,
                        owner.name,
                        act.namespace
                    );
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
            Err(e) if expired(&e) => tracing::info!(
                "watching worker pods: {e}; listing them again (the workers whose pods are gone \
                 meanwhile end as their exit records say)"
            ),
            Ok(watcher::Event::InitDone) => {
                // The events between the last one seen and this list are lost: a worker whose
                // pod the list lacks may have run and ended meanwhile, its pod deleted (a Job's
                // `ttlSecondsAfterFinished: 0`), whether or not the watch ever showed that pod.
                let listed = self.relisted.take().unwrap_or_default();
                let absent: Vec<String> = self
                    .workers
                    .iter()
                    .filter(|(id, w)| (w.created || w.pod.is_some()) && !listed.contains(*id))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in absent {
                    self.reconsider(&id, ctx);
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
            // The watcher lists them again, every current Event included: nothing is lost.
            Err(e) if expired(&e) => tracing::debug!("watching FailedCreate Events: {e}"),
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

    fn handle(&mut self, launch: Launch, _ctx: &mut Context<Self>) -> Self::Result {
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
                let new = (!*made).then(|| {
                    let mut secret = self.template.authkey_secret(hex, suffix);
                    if let Some(owner) = &self.owner {
                        owner.own(&mut secret.metadata);
                    }
                    secret
                });
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
        let mut job = self.template.job(&worker);
        // Inside a worker pod, the Job goes with the pod (see the module docs).
        if let Some(owner) = &self.owner {
            owner.own(&mut job.metadata);
        }
        let job_name = self.template.job_name(&worker);
        let launching = InFlight::new(&self.launching);
        let launched = Instant::now();
        self.workers.insert(
            launch.id.clone(),
            RemoteWorker {
                name: launch.name.clone(),
                job: job_name.clone(),
                task_id,
                created: false,
                last_event: 0,
                pod: None,
                notify: launch.notify,
                stopping: None,
                launched,
                started: false,
                refused: None,
                retrying: None,
                unscheduled: None,
                terminating: None,
            },
        );
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let jobs: Api<Job> = Api::namespaced(client, &self.namespace);
        let (id, name, namespace) = (launch.id, launch.name, self.namespace.clone());
        let timeout = self.api_timeout;
        Box::pin(
            async move {
                let _launching = launching;
                if let Some(secret) = new_secret {
                    let secret_name = secret.metadata.name.clone().unwrap_or_default();
                    let call = format!(
                        "creating Secret {secret_name} (the authkey of this runtime's workers; \
                         the driver needs create on secrets) for {name} in namespace {namespace}"
                    );
                    let post = PostParams::default();
                    let create = secrets.create(&post, &secret);
                    match bounded(timeout, &call, create).await {
                        // Or another launch made it meanwhile.
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) if already_exists(&e) => {}
                        Ok(Err(e)) => return (false, Err(Error::Backend(format!("{call}: {e}")))),
                        Err(timed_out) => return (false, Err(timed_out)),
                    }
                }
                let call = format!("creating Job {job_name} for {name} in namespace {namespace}");
                let created = match bounded(
                    timeout,
                    &call,
                    jobs.create(&PostParams::default(), &job),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    // kube's client sends a create answered `504` (or `503`, `429`) again: the
                    // first try may have made the Job all the same. Its name (a random suffix)
                    // is this launch's own, so the Job there is this one.
                    Ok(Err(e)) if already_exists(&e) => Ok(()),
                    Ok(Err(e)) => Err(Error::Backend(format!("{call}: {e}"))),
                    Err(timed_out) => {
                        // The API server may have made it all the same: it must not run a
                        // worker this process no longer tracks.
                        let params = DeleteParams {
                            grace_period_seconds: Some(0),
                            propagation_policy: Some(PropagationPolicy::Background),
                            ..DeleteParams::default()
                        };
                        let call =
                            format!("deleting Job {job_name} (its creation went unanswered)");
                        match bounded(timeout, &call, jobs.delete(&job_name, &params)).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) if not_found(&e) => {}
                            Ok(Err(e)) => tracing::warn!("{call}: {e}"),
                            Err(e) => tracing::warn!("{e}"),
                        }
                        Err(timed_out)
                    }
                };
                (true, created)
            }
            .into_actor(self)
            .map(move |(secret_there, created), act, ctx| {
                if secret_there
                    && let Some(entry) = key_hex.and_then(|hex| act.authkey_secrets.get_mut(&hex))
                {
                    entry.1 = true;
                }
                match created {
                    Ok(()) => {
                        if let Some(worker) = act.workers.get_mut(&id)
                            && worker.launched == launched
                        {
                            worker.created = true;
                        }
                        // From the Job's creation: a creation slower than the timeout must not
                        // end a worker whose Job then runs untracked.
                        ctx.run_later(act.pod_start_timeout, move |act, ctx| {
                            act.end_unstarted(&id, launched, ctx)
                        });
                        Ok(Launched { pid: None })
                    }
                    Err(e) => {
                        act.workers.remove(&id);
                        Err(e)
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
        // With no pod known, one may exist all the same: the delete looks for it, and ends the
        // worker if there is none.
        let settle = worker.pod.is_none().then_some(msg.signal);
        self.delete(ctx, &msg.id, grace(msg.signal), settle);
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
        let timeout = self.api_timeout;
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
                let call = format!("deleting this runtime's Jobs ({selector})");
                match bounded(timeout, &call, jobs.delete_collection(&params, &list)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("{call}: {e}"),
                    Err(e) => tracing::warn!("{e}"),
                }
                // After the Jobs: a container's environment is set when it starts, so running
                // pods no longer need the Secret.
                if made_secrets {
                    let call = format!(
                        "deleting this runtime's authkey Secrets ({selector}; the driver needs \
                         deletecollection on secrets)"
                    );
                    let all = DeleteParams::default();
                    let delete = secrets.delete_collection(&all, &list);
                    match bounded(timeout, &call, delete).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!("{call}: {e}"),
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
            }
            .into_actor(self),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_left_unanswered_fails_naming_the_call() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let timeout = Duration::from_millis(50);
        let asked = Instant::now();
        let never = futures::future::pending::<kube::Result<()>>();
        match runtime.block_on(bounded(timeout, "creating Job shoal-p-1", never)) {
            Err(Error::Backend(message)) => assert_eq!(
                message,
                "creating Job shoal-p-1: no answer from the Kubernetes API server within 50ms"
            ),
            other => panic!("an unanswered call: {other:?}"),
        }
        assert!(asked.elapsed() >= timeout);
        let answered = async { Ok::<_, kube::Error>(7) };
        let outcome = runtime.block_on(bounded(Duration::from_secs(5), "x", answered));
        assert!(matches!(outcome, Ok(Ok(7))), "{outcome:?}");
    }
}
