//! A TEST-ONLY stand-in for a Kubernetes cluster: an HTTP server speaking the part of the
//! Kubernetes API that shoal's Kubernetes executor uses, with a job controller and a kubelet
//! that run each pod's container as a real process on this machine. It exists because no API
//! server can run here; it is not a Kubernetes implementation and must never be used outside
//! tests.
//!
//! ```no_run
//! # async fn example() {
//! use k8s_openapi::api::batch::v1::Job;
//! use kube::Api;
//! use shoal_integration_tests::kube_emulator::Emulator;
//! use shoal_integration_tests::netns::Network;
//!
//! let network = Network::new(); // optional: each pod then runs in its own network namespace
//! let emulator = Emulator::start(Some(&network));
//! let jobs: Api<Job> = Api::default_namespaced(emulator.client()); // inside a Tokio runtime
//! // ... jobs.create(&Default::default(), &job).await ...
//! // A program under test finds the emulator through its kubeconfig:
//! std::process::Command::new("my-driver").env("KUBECONFIG", emulator.kubeconfig_path());
//! # }
//! ```
//!
//! # Wire format
//! Objects are `k8s-openapi` (Kubernetes 1.34) types serialized as the API server sends them:
//! single objects with `apiVersion`/`kind`, lists as `JobList`/`PodList`/`SecretList`/
//! `ServiceAccountList`/`EventList` whose
//! items have neither, errors as `Status` objects (`NotFound` 404, `AlreadyExists` 409,
//! `Conflict` 409, `Invalid` 422 with `details.causes`, `BadRequest` 400, `MethodNotAllowed`
//! 405), watch events as newline-delimited `{"type": ..., "object": ...}`. Plain HTTP on
//! 127.0.0.1 ([`Emulator::url`]) and, for the pods of an emulator with a network, which cannot
//! reach this machine's loopback, on the network's bridge address too ([`Emulator::pod_url`];
//! a pod's program finds it through a kubeconfig that [`Emulator::write_pod_kubeconfig`]
//! wrote, given as `KUBECONFIG` in the container's `env`); no authentication. Every namespace
//! exists implicitly.
//!
//! # Endpoints
//! - `batch/v1` Jobs, `/apis/batch/v1/namespaces/{ns}/jobs[/{name}]`: create (`POST`), get,
//!   list, watch, delete, delete a collection (`DELETE` with selectors); `GET .../status`;
//!   cluster-wide list and watch at `/apis/batch/v1/jobs`.
//! - `core/v1` Pods, `/api/v1/namespaces/{ns}/pods[/{name}]`: get, list, watch, delete, delete a
//!   collection; `GET .../status`; `GET .../log` (the output so far); `/api/v1/pods`. Pods are
//!   only made by the job controller (`POST` of a pod is not emulated).
//! - `core/v1` Secrets, `/api/v1/namespaces/{ns}/secrets[/{name}]`: create (`stringData` merged
//!   into `data`), get, list, watch, delete, delete a collection.
//! - `core/v1` ServiceAccounts, `/api/v1/namespaces/{ns}/serviceaccounts[/{name}]`: create, get,
//!   list, watch, delete. `default` exists implicitly in every namespace (creating it is 409
//!   `AlreadyExists`; it is not listed).
//! - `core/v1` Events, `/api/v1/namespaces/{ns}/events[/{name}]` and `/api/v1/events`: get,
//!   list, watch (read-only: only the job controller records them, see below), with field
//!   selectors on their paths (`involvedObject.kind`, `involvedObject.name`, `reason`, `type`...).
//! - `GET /version` (reports v1.34.0).
//!
//! Lists and watches take `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and
//! `fieldSelector` (any dotted path, `=`/`!=`). Lists always answer from the current state and
//! ignore `limit` (everything comes in one page, no `continue`). Watches follow the real
//! `resourceVersion` semantics (`kube::runtime::watcher` with either initial list strategy
//! works): unset or "0" starts with the current objects as ADDED; a version replays the later
//! changes (`410 Expired` once older than the last 10 000 changes, or than the last
//! [`Emulator::expire_watches`]); `sendInitialEvents=true`
//! ends the initial objects with a `k8s.io/initial-events-end` bookmark; `allowWatchBookmarks`
//! adds bookmarks every 10 s; `timeoutSeconds` ends the stream. An object that stops matching a
//! watch's selectors is sent as DELETED, one that starts matching as ADDED. One resource
//! version counter covers every object and increments on every change.
//!
//! Deletes take `gracePeriodSeconds`, `propagationPolicy`, `orphanDependents` and
//! `preconditions` in the query or a `DeleteOptions` body; `dryRun` is refused (400). Not
//! emulated (405 or 404, with a message saying so): create/update/patch of pods, update and
//! patch of Jobs, Secrets and ServiceAccounts, writes of Events, ConfigMaps, Services, every
//! other kind, server-side
//! apply, `exec`/`attach`/`portforward`, log streaming.
//!
//! # Jobs (job controller)
//! On create, the API server's validation and defaults: a name or `generateName`; a DNS-1123
//! name of at most 63 characters; labels, annotations, container names, environment variable
//! names, resource names and quantities, pull policies, the service account, node selectors and
//! tolerations checked with the real server's rules and messages (`validation.rs`; Secrets'
//! labels and annotations too); `restartPolicy` `Never` (`OnFailure` is real but not
//! emulated: 422 saying so); exactly one container with a name, an image and a `command`;
//! `backoffLimit` (default 6) and `ttlSecondsAfterFinished` ≥ 0; `activeDeadlineSeconds` > 0;
//! `selector` generated (`batch.kubernetes.io/controller-uid`), and the template labels
//! `controller-uid`, `job-name`, `batch.kubernetes.io/controller-uid`,
//! `batch.kubernetes.io/job-name` added (the Job's own labels default to the template's);
//! `terminationGracePeriodSeconds` defaults to 30. Features a real cluster has but this one
//! does not are refused with 422 (`FieldValueNotSupported`, "not supported by the shoal test
//! emulator"): `completions`/`parallelism` ≠ 1, indexed Jobs, `suspend: true`,
//! `podFailurePolicy`, `successPolicy`, `podReplacementPolicy: Failed`, manual selectors, init
//! containers, several containers, volumes and volume mounts, containers without a command.
//! Other fields (resources, probes, security contexts, affinity, tolerations, image pull
//! settings, ports...) are accepted and ignored; readiness is "the process runs".
//!
//! Pod admission: a pod whose `serviceAccountName` (or `serviceAccount`; unset: `default`) names
//! no ServiceAccount is refused, as by the real ServiceAccount admission plugin. The controller
//! then records, as the real one does, a Warning Event on the Job (`involvedObject` kind `Job`,
//! reason `FailedCreate`, source `job-controller`, message `Error creating: pods "<job>-" is
//! forbidden: error looking up service account <ns>/<account>: serviceaccount "<account>" not
//! found`; a repeat increments `count` and `lastTimestamp` of the same Event, named
//! `<job>.<hex nanoseconds>`), leaves the Job without a pod and tries again after 0.5 s,
//! doubling up to 4 s (a real controller: 1 s up to 60 s); once the account exists, the pod is
//! made. Events are not deleted with their Job (a real cluster keeps them for an hour).
//!
//! The controller creates one pod named `<job>-<5 random characters>` with the template's
//! labels and annotations and a controller owner reference to the Job (its spec the template's,
//! with the API server's defaults where the template leaves a field unset: `serviceAccountName`
//! from `serviceAccount` or `default`, `enableServiceLinks: true`, `priority: 0`,
//! `preemptionPolicy`), has it scheduled (see "Scheduling" below), sets `startTime`,
//! `active`, `ready`, `terminating`, `uncountedTerminatedPods`, and counts each pod once into
//! `succeeded` or `failed`. A pod deleted before it ended counts as failed (as in a real
//! cluster with the default `podReplacementPolicy: TerminatingOrFailed`, which also replaces a
//! terminating pod without waiting for it to end). After a failure it creates a new pod while
//! `failed` ≤ `backoffLimit` (after 0.2 s, doubling per failure up to 6.4 s; a real cluster
//! waits 10 s, doubling up to 6 min). When `failed` > `backoffLimit` it adds the condition
//! `FailureTarget` (reason `BackoffLimitExceeded`, message "Job has reached the specified
//! backoff limit"), and when `activeDeadlineSeconds` after `startTime` have passed (`startTime`
//! has whole seconds, as in the API) `FailureTarget` with reason `DeadlineExceeded` ("Job was
//! active longer than specified deadline"), deleting its running pods (each with its own grace
//! period); `Failed` with the same reason follows once no pod of the Job is still running. On
//! success: `SuccessCriteriaMet` and `Complete` (reason `CompletionsReached`) and
//! `completionTime` (set on success only, as in the API). `ttlSecondsAfterFinished` after
//! finishing, the Job is deleted with foreground propagation.
//!
//! Deleting a Job follows the garbage collector: with no `propagationPolicy` the API's default
//! for `batch/v1` Jobs is `Orphan` (the response then carries the real server's `Warning`
//! header): the Job goes, its pods keep running with their owner reference removed.
//! `Background`: the Job goes at once (answer: a `Status` with `status: Success`), its pods are
//! deleted after. `Foreground`: the Job gets `deletionTimestamp` and the `foregroundDeletion`
//! finalizer (answer: the Job), its pods are deleted, then it goes. The pods are deleted with
//! their own `terminationGracePeriodSeconds`: a Job delete's `gracePeriodSeconds` is not passed
//! on to them (nor is it by a real garbage collector); delete the pods themselves, or set the
//! template's `terminationGracePeriodSeconds`, to stop them sooner.
//!
//! Owner references that clients set (a Job, Secret or ServiceAccount made a dependent of a
//! pod, say) are followed as the real garbage collector follows them: once every owner an
//! object names is gone from the store (deleted through the API, force-deleted, removed by the
//! kubelet after its grace period, by a TTL), or was already gone when the object was made, the
//! object is deleted, a Job with background propagation (its pods then go with their own grace
//! period); an object with some owners left only loses its references to the others. Owners are
//! matched by uid in the dependent's namespace; an owner of a kind the emulator does not serve
//! counts as present. A pod delete's `propagationPolicy` applies to them: `Orphan` (or
//! `orphanDependents: true`) removes their references to it, `Foreground` deletes them at the
//! delete (the pod does not wait for them), `Background` (the default for pods) deletes them once
//! the pod is gone.
//!
//! # Scheduling
//! One node, [`NODE_NAME`], labelled `kubernetes.io/arch`, `kubernetes.io/hostname` and
//! `kubernetes.io/os: linux` (more with [`Emulator::label_node`]). A pod whose `nodeSelector`
//! the node's labels match is bound to it (`spec.nodeName`) at once; another stays `Pending`,
//! unscheduled, as a real scheduler leaves it: no `nodeName`, `startTime`, host IP or container
//! statuses, and the condition `PodScheduled=False`, reason `Unschedulable`, with the real
//! scheduler's message ("0/1 nodes are available: 1 node(s) didn't match Pod's node
//! affinity/selector. ..."). It is tried again every half second, and bound once the node has
//! the labels. Resource requests, affinity and taints are not considered.
//!
//! # Pods (kubelet)
//! The container runs as PID 1 of its own PID
//! namespace (so, as in any container, SIGTERM is ignored unless the program handles it, and a
//! signal it sends itself, `raise(SIGKILL)` included, does nothing), or, when the pod spec has
//! `shareProcessNamespace: true`, as an ordinary process (PID 2) of the pod's PID namespace,
//! whose PID 1 is a pause process (as a real pod's pause container; killed, with whatever the
//! container left behind, once the container ended), so that signals behave as outside a
//! container; in
//! its own network namespace [`Host`] when the emulator has a network (pod
//! IP: the host's address; host IP: the bridge address) or in this machine's network (pod and
//! host IP 127.0.0.1), with a container-like clean environment: `PATH`, `HOME`, `HOSTNAME` and
//! the container's `env` (values with `$(VAR)` references, `secretKeyRef`, `fieldRef` on
//! `metadata.name|namespace|uid|labels['k']|annotations['k']`, `spec.nodeName`,
//! `spec.serviceAccountName`, `status.podIP`, `status.hostIP`) and `envFrom` Secrets;
//! ConfigMaps and resource fields are not emulated (the pod stays Pending with
//! `CreateContainerConfigError`, as it does while a Secret or key is missing). Phases Pending →
//! Running → Succeeded/Failed with the real container states: `running.startedAt`,
//! `terminated` with `exitCode` (128 + N after signal N), `reason` (`Completed`, `Error`,
//! `OOMKilled`, `StartError` with 128 when the program cannot start), `startedAt`,
//! `finishedAt`.
//!
//! Deleting a pod: one that is not running goes at once; a running one gets
//! `deletionTimestamp`/`deletionGracePeriodSeconds`, SIGTERM, and SIGKILL when the grace
//! period (the delete's `gracePeriodSeconds`, else the pod's `terminationGracePeriodSeconds`)
//! ends; the pod object goes once the process is gone, after a last update with its terminated
//! state. A grace of 0 is a force deletion, as on a real API server: the pod object goes at
//! once (its `DELETED` event carries its last state, the container still running, with
//! `deletionTimestamp` and `deletionGracePeriodSeconds: 0`), and the kubelet SIGKILLs its
//! process behind it; no status ever reports that end.
//!
//! A frozen kubelet ([`Emulator::freeze_kubelet`]) stands for a node that stopped answering:
//! no status updates, no container started, and no graceful delete carried out: the API server
//! sets `deletionTimestamp` (now + grace) and `deletionGracePeriodSeconds`, and the pod stays
//! so, `Terminating`, its container still `running` in its status and its process running on,
//! until the kubelet thaws (it then sends `SIGTERM`, and `SIGKILL` at the `deletionTimestamp`)
//! or a force delete (grace 0) removes the object, which kills the process (as the node would
//! once back). A pod not bound to the node, or ended, is still removed at once.
//!
//! Images are not pulled, with exceptions that let tests see what a cluster does with an
//! image it cannot pull: an image whose registry host ends in `.invalid` (a top-level domain
//! that never resolves, RFC 2606; [`UNPULLABLE_REGISTRY`]) leaves the pod Pending with the
//! container waiting in `ErrImagePull`, then `ImagePullBackOff`, with the kubelet's messages,
//! for as long as the pod exists; the annotation [`PULL_FAILURES`] makes the first pulls fail
//! so (a registry's rate limit), then the container starts; an image name a container runtime
//! cannot parse (whitespace, an upper-case letter in the repository path) leaves it waiting
//! in `InvalidImageName` for as long as the pod exists.
//!
//! # Test controls
//! [`Emulator::pod_pid`] (to signal a pod's process directly), [`Emulator::oom_kill`] and the
//! annotation [`OOM_KILL_AFTER_MS`], the annotations [`START_DELAY_MS`] and [`PULL_FAILURES`],
//! [`Emulator::pod_log`], [`Emulator::pod_running_since`] (when the kubelet saw the container
//! start, to the microsecond), [`Emulator::cut_pod`] and [`Emulator::restore_pod`] (partition
//! a pod's network host, see [`Host::cut`](crate::netns::Host::cut)), [`Emulator::label_node`]
//! (pods whose node selector wants a label stay unscheduled until the node has it),
//! [`Emulator::stall_writes`] (requests that change the cluster go unanswered, as over a
//! connection dropped silently), [`Emulator::fail_job_creates_after_storing`] (a Job is made
//! but its creation answered `504` or `500`), [`Emulator::hold_watches`] (watches send nothing until
//! released: a client's view of the cluster lags behind it) and [`Emulator::expire_watches`]
//! (open watches end and the history is compacted: a client resuming from its last version
//! gets `410 Expired` and relists, missing what happened in between), and
//! [`Emulator::freeze_kubelet`] (the node stops answering: pods being deleted stay
//! `Terminating` until a force delete).

mod api;
mod controller;
mod gc;
mod kubelet;
mod scheduler;
mod selectors;
mod store;
mod validation;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use nix::sys::signal::Signal;

use crate::netns::{Host, Network};
use kubelet::ContainerProcess;
use store::Store;

/// The namespace of [`Emulator::client`] and of the kubeconfig's context.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The node every pod is scheduled on (`spec.nodeName`).
pub const NODE_NAME: &str = "shoal-emulator-node";

/// Pod annotation (set it in the Job's pod template): the kubelet kills the container this many
/// milliseconds after it started, as the kernel's OOM killer would (SIGKILL), and reports
/// `reason: OOMKilled`, `exitCode: 137`.
pub const OOM_KILL_AFTER_MS: &str = "kube-emulator.shoal.test/oom-kill-after-ms";

/// Pod annotation (set it in the Job's pod template): the kubelet waits this many milliseconds
/// before it starts the container, the pod staying Pending in `ContainerCreating` (as while a
/// real node pulls an image); a deletion meanwhile removes the pod at once. A real cluster
/// ignores the annotation.
pub const START_DELAY_MS: &str = "kube-emulator.shoal.test/start-delay-ms";

/// Pod annotation (set it in the Job's pod template): the kubelet's first this many image pulls
/// fail, as behind a registry's rate limit (`ErrImagePull` with a `429 Too Many Requests`
/// message, `ImagePullBackOff` between attempts), then the image is pulled and the container
/// starts. A real cluster ignores the annotation.
pub const PULL_FAILURES: &str = "kube-emulator.shoal.test/pull-failures";

/// Registry hosts under this top-level domain cannot be pulled from (see the module docs):
/// `registry.invalid/app:1` stays in `ErrImagePull`/`ImagePullBackOff`.
pub const UNPULLABLE_REGISTRY: &str = ".invalid";

/// A running emulator; see the module docs. Dropping it stops the server and kills every pod
/// process it started (and removes their network namespaces).
pub struct Emulator {
    core: Arc<Core>,
    address: SocketAddr,
    /// Where pods reach the API (see [`Emulator::pod_url`]).
    pod_address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

/// What the server, the controllers and the kubelet share.
pub(crate) struct Core {
    cluster: Mutex<Cluster>,
    /// The emulator's runtime (timers, watch streams).
    runtime: tokio::runtime::Handle,
    /// Pods run in hosts of this network, when given.
    network: Option<Network>,
    /// The node's address (`status.hostIP`).
    node_ip: String,
    log_dir: PathBuf,
    shutting_down: AtomicBool,
    kubelets: Mutex<Vec<JoinHandle<()>>>,
    /// While true, requests that change the cluster get no answer ([`Emulator::stall_writes`]).
    writes_stalled: tokio::sync::watch::Sender<bool>,
    /// While true, watches send nothing ([`Emulator::hold_watches`]).
    watches_held: tokio::sync::watch::Sender<bool>,
    /// Incremented to end every open watch ([`Emulator::expire_watches`]).
    watches_cut: tokio::sync::watch::Sender<u64>,
    /// The status codes the next Job creations are answered with after they were carried out
    /// ([`Emulator::fail_job_creates_after_storing`]), first first.
    job_create_failures: Mutex<std::collections::VecDeque<u16>>,
}

/// The cluster's state, behind one lock.
pub(crate) struct Cluster {
    store: Store,
    /// The kubelet's container processes, by pod uid.
    containers: HashMap<String, ContainerProcess>,
    /// Pods (by uid) whose outcome the job controller has counted.
    counted: HashSet<String>,
    /// When each Job (by uid) last had a pod fail, for the retry delay.
    last_failure: HashMap<String, Instant>,
    /// How many times in a row each Job's (by uid) pod was refused admission, for the delay
    /// before the next attempt.
    refused_creates: HashMap<String, u32>,
    /// Each pod's log file, by namespace and name.
    logs: HashMap<(String, String), PathBuf>,
    /// The labels of the node ([`NODE_NAME`]), which pods' node selectors must match.
    node_labels: BTreeMap<String, String>,
    /// The node's kubelet does nothing ([`Emulator::freeze_kubelet`]).
    kubelet_frozen: bool,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Runs `work` with the cluster lock after `delay` (unless the emulator stopped).
    fn after(
        self: &Arc<Self>,
        delay: Duration,
        work: impl FnOnce(&Arc<Core>, &mut Cluster) + Send + 'static,
    ) {
        if self.shutting_down() {
            return;
        }
        let core = Arc::clone(self);
        self.runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            if core.shutting_down() {
                return;
            }
            let mut cluster = core.lock();
            work(&core, &mut cluster);
        });
    }

    fn add_kubelet(&self, handle: JoinHandle<()>) {
        let mut kubelets = self.kubelets.lock().unwrap_or_else(|e| e.into_inner());
        kubelets.retain(|h| !h.is_finished());
        kubelets.push(handle);
    }

    fn log_path(&self, namespace: &str, name: &str) -> PathBuf {
        self.log_dir.join(format!("{namespace}_{name}.log"))
    }
}

impl Emulator {
    /// Starts an emulator on a free port of 127.0.0.1. With a `network`, every pod runs in a new
    /// [`Host`] of it, and the API also listens on a free port of the network's bridge address,
    /// for the pods ([`Emulator::pod_url`]). Panics when it cannot start (the fixture's failure
    /// is the test's).
    pub fn start(network: Option<&Network>) -> Emulator {
        let dir = tempfile::Builder::new()
            .prefix("kube-emulator")
            .tempdir()
            .expect("a directory for the emulator");
        let log_dir = dir.path().join("logs");
        std::fs::create_dir_all(&log_dir).expect("the emulator's log directory");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port on 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let address = listener.local_addr().expect("the listener's address");
        // Pods in network hosts cannot reach this machine's loopback: they get the API on the
        // bridge, as a real cluster's pods reach theirs on the cluster network.
        let pod_listener = network.map(|n| {
            let listener = std::net::TcpListener::bind((n.host_address(), 0))
                .expect("a port on the network's bridge");
            listener
                .set_nonblocking(true)
                .expect("a non-blocking listener");
            listener
        });
        let pod_address = match &pod_listener {
            Some(listener) => listener.local_addr().expect("the listener's address"),
            None => address,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the emulator's runtime");
        let core = Arc::new(Core {
            cluster: Mutex::new(Cluster {
                store: Store::new(),
                containers: HashMap::new(),
                counted: HashSet::new(),
                last_failure: HashMap::new(),
                refused_creates: HashMap::new(),
                logs: HashMap::new(),
                node_labels: scheduler::default_node_labels(),
                kubelet_frozen: false,
            }),
            runtime: runtime.handle().clone(),
            network: network.cloned(),
            node_ip: network
                .map_or_else(|| "127.0.0.1".to_string(), |n| n.host_address().to_string()),
            log_dir,
            shutting_down: AtomicBool::new(false),
            kubelets: Mutex::new(Vec::new()),
            writes_stalled: tokio::sync::watch::Sender::new(false),
            watches_held: tokio::sync::watch::Sender::new(false),
            watches_cut: tokio::sync::watch::Sender::new(0),
            job_create_failures: Mutex::new(std::collections::VecDeque::new()),
        });
        gc::start(&core, &core.lock());
        let router = api::router(Arc::clone(&core));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::Builder::new()
            .name("kube-emulator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let serve = |listener: std::net::TcpListener| {
                        let router = router.clone();
                        async move {
                            let listener = match tokio::net::TcpListener::from_std(listener) {
                                Ok(listener) => listener,
                                Err(e) => {
                                    tracing::error!("the emulator cannot listen: {e}");
                                    return;
                                }
                            };
                            if let Err(e) = axum::serve(listener, router).await {
                                tracing::error!("the emulator's server failed: {e}");
                            }
                        }
                    };
                    let for_pods = async {
                        match pod_listener {
                            Some(listener) => serve(listener).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = serve(listener) => {}
                        _ = for_pods => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here ends every timer and watch stream.
            })
            .expect("the emulator's server thread");
        let emulator = Emulator {
            core,
            address,
            pod_address,
            stop: Some(stop),
            server: Some(server),
            dir,
        };
        emulator
            .write_kubeconfig(&emulator.kubeconfig_path())
            .expect("the emulator's kubeconfig");
        emulator
    }

    /// The API's base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The address the API listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A client configuration for the emulator: cluster URL, namespace [`DEFAULT_NAMESPACE`],
    /// no credentials.
    pub fn config(&self) -> kube::Config {
        let url = self
            .url()
            .parse::<axum::http::Uri>()
            .expect("the emulator's URL is a URI");
        let mut config = kube::Config::new(url);
        config.default_namespace = DEFAULT_NAMESPACE.to_string();
        config
    }

    /// A `kube::Client` for the emulator. Call it inside a Tokio runtime (the client spawns its
    /// connection tasks there).
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("a kube client for the emulator")
    }

    /// Writes a kubeconfig (JSON, which is YAML) whose current context points at the emulator
    /// with namespace [`DEFAULT_NAMESPACE`], for programs that find their cluster through
    /// `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        write_kubeconfig(path, &self.url())
    }

    /// A kubeconfig for the emulator, written at start (see [`Emulator::write_kubeconfig`]);
    /// removed with the emulator.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The API's base URL as the pods reach it: on the network's bridge
    /// (`http://<bridge address>:<port>`, another port than [`Emulator::url`]'s) when the
    /// emulator has a network, else [`Emulator::url`].
    pub fn pod_url(&self) -> String {
        format!("http://{}", self.pod_address)
    }

    /// Writes a kubeconfig (as [`Emulator::write_kubeconfig`]) whose server is
    /// [`Emulator::pod_url`]: what a pod's program that calls the API reads through
    /// `KUBECONFIG` (give it in the container's `env`). Write it where the pods see it: not
    /// under `/tmp`, which is each pod's own. A real cluster's pods use their service
    /// account's token and the API's certificate instead, which this emulator does not have
    /// (plain HTTP, no authentication).
    pub fn write_pod_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        write_kubeconfig(path, &self.pod_url())
    }

    fn pod_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.core
            .lock()
            .store
            .get::<Pod>(namespace, name)
            .and_then(|p| p.metadata.uid)
    }

    /// The pid (in this PID namespace) of pod `namespace/name`'s container process while it
    /// runs. It is PID 1 of its own PID namespace: SIGKILL always reaches it, other signals only
    /// if it handles them.
    pub fn pod_pid(&self, namespace: &str, name: &str) -> Option<u32> {
        let uid = self.pod_uid(namespace, name)?;
        let cluster = self.core.lock();
        cluster
            .containers
            .get(&uid)
            .filter(|c| !c.reaped)
            .and_then(|c| c.pid)
    }

    /// Kills pod `namespace/name`'s container as out of memory now (SIGKILL, reported as
    /// `OOMKilled` with exit code 137). False when it is not running.
    pub fn oom_kill(&self, namespace: &str, name: &str) -> bool {
        let Some(uid) = self.pod_uid(namespace, name) else {
            return false;
        };
        kubelet::oom_kill(&mut self.core.lock(), &uid)
    }

    /// When the kubelet started pod `namespace/name`'s container (just before it spawned the
    /// program; its state `running` follows), with this machine's clock at full precision (the
    /// API's `startedAt` has whole seconds); `None` if it never started.
    pub fn pod_running_since(&self, namespace: &str, name: &str) -> Option<SystemTime> {
        let uid = self.pod_uid(namespace, name)?;
        let cluster = self.core.lock();
        cluster.containers.get(&uid).and_then(|c| c.running_since)
    }

    /// Partitions pod `namespace/name`'s network host from the network ([`Host::cut`]: packets
    /// to and from it are dropped; the kubelet still signals its process). False when the pod
    /// has no host (an emulator without a network) or its host is gone.
    ///
    /// [`Host::cut`]: crate::netns::Host::cut
    pub fn cut_pod(&self, namespace: &str, name: &str) -> bool {
        self.pod_host(namespace, name)
            .is_some_and(|host| host.cut().is_ok())
    }

    /// Ends a [`Emulator::cut_pod`]. False when the pod's host is gone.
    pub fn restore_pod(&self, namespace: &str, name: &str) -> bool {
        self.pod_host(namespace, name)
            .is_some_and(|host| host.restore().is_ok())
    }

    fn pod_host(&self, namespace: &str, name: &str) -> Option<Arc<Host>> {
        let uid = self.pod_uid(namespace, name)?;
        let cluster = self.core.lock();
        cluster
            .containers
            .get(&uid)
            .and_then(|c| c.host.as_ref())
            .and_then(Weak::upgrade)
    }

    /// Gives the node ([`NODE_NAME`]) the label `key=value` (replacing its value, if it has
    /// one), which pods' node selectors can then match: a pod left unscheduled for want of it
    /// is scheduled at the scheduler's next try. The node starts with `kubernetes.io/arch`,
    /// `kubernetes.io/hostname` and `kubernetes.io/os` (`linux`).
    pub fn label_node(&self, key: &str, value: &str) {
        self.core
            .lock()
            .node_labels
            .insert(key.to_string(), value.to_string());
    }

    /// While `frozen`, the node's kubelet stops answering, as on a node cut off from the
    /// control plane (see "Pods (kubelet)" in the module docs): it updates no pod's status
    /// (a container that ends stays `running` there), starts no container, and carries out no
    /// graceful delete: such a delete (an eviction, a Job's garbage collection) only sets the
    /// pod's `deletionTimestamp` and `deletionGracePeriodSeconds`, and the pod stays, its
    /// process running on (no `SIGTERM`, no `SIGKILL` when the grace ends), for as long as the
    /// freeze lasts. A force delete (grace 0) still removes the pod object at once, as the API
    /// server does without asking the node, and its process is killed, as a node that comes
    /// back kills the containers of pods that are gone. Thawed (`false`), the kubelet catches
    /// up: every pod being deleted gets `SIGTERM`, and `SIGKILL` at its `deletionTimestamp` (at
    /// once if that has passed), and the statuses it held back are reported. The API server,
    /// the job controller, the scheduler and the garbage collector go on as usual meanwhile.
    pub fn freeze_kubelet(&self, frozen: bool) {
        let mut cluster = self.core.lock();
        if frozen {
            cluster.kubelet_frozen = true;
        } else if cluster.kubelet_frozen {
            kubelet::thaw(&self.core, &mut cluster);
        }
    }

    /// While `stalled`, every request that would change the cluster (`POST`, `PUT`, `PATCH`,
    /// `DELETE`) is left unanswered, as over a connection a middlebox dropped silently: the
    /// client waits for as long as it is willing to. Such a request is never carried out: when
    /// the stall ends it is answered `500 InternalError` (a status kube's client does not
    /// retry), if its client is still there.
    /// Reads and watches are answered as usual.
    pub fn stall_writes(&self, stalled: bool) {
        self.core.writes_stalled.send_replace(stalled);
    }

    /// The next `count` Job creations are carried out (the Job is stored, its controller makes
    /// its pod) and then answered with the error `code` all the same, as a real API server
    /// answers `504 Timeout` when its storage wrote the object after the request's deadline:
    /// `504` (`Timeout`; kube's client sends such a request again, which then finds the Job
    /// there: `409 AlreadyExists`), `500` (`InternalError`, which kube's client does not send
    /// again), or any other code (`InternalError` with that code).
    pub fn fail_job_creates_after_storing(&self, code: u16, count: usize) {
        let mut failures = self
            .core
            .job_create_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failures.extend(std::iter::repeat_n(code, count));
    }

    /// While `held`, open watches send nothing (their changes queue up, as behind a slow
    /// connection), and send what they hold, in order, once released. Lists are answered as
    /// usual. A watch that falls more than 4 096 changes behind ends with `410 Expired`.
    pub fn hold_watches(&self, held: bool) {
        self.core.watches_held.send_replace(held);
    }

    /// Ends every open watch, dropping what it held back, and compacts the change history:
    /// as after a network cut long enough for the cluster's compaction to pass the version a
    /// client last saw, a client that resumes its watch from that version gets `410 Expired`
    /// and must list again (`kube::runtime::watcher` does). With [`Emulator::hold_watches`]
    /// before, the changes made meanwhile reach a client only through that new list: a pod
    /// created and deleted in the gap is never seen at all. Watches opened later are not
    /// affected.
    pub fn expire_watches(&self) {
        // Compacted first: a watch resumed as soon as its stream ends must find it done.
        self.core.lock().store.compact();
        self.core.watches_cut.send_modify(|cuts| *cuts += 1);
    }

    /// How many pods' containers have started so far, in every namespace (deleted pods too).
    pub fn pods_started(&self) -> usize {
        self.core.lock().logs.len()
    }

    /// What pod `namespace/name`'s container wrote to stdout and stderr so far (kept after the
    /// pod is deleted, until the emulator stops); `None` if it never started.
    pub fn pod_log(&self, namespace: &str, name: &str) -> Option<String> {
        let path = self
            .core
            .lock()
            .logs
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()?;
        std::fs::read(path)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

/// Writes a kubeconfig (JSON, which is YAML) at `path` whose current context is the API at
/// `server`, with namespace [`DEFAULT_NAMESPACE`] and no credentials.
fn write_kubeconfig(path: &Path, server: &str) -> std::io::Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "shoal-emulator", "cluster": {"server": server}}],
        "users": [{"name": "shoal-emulator", "user": {}}],
        "contexts": [{
            "name": "shoal-emulator",
            "context": {
                "cluster": "shoal-emulator",
                "user": "shoal-emulator",
                "namespace": DEFAULT_NAMESPACE,
            },
        }],
        "current-context": "shoal-emulator",
        "preferences": {},
    });
    std::fs::write(path, config.to_string())
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.core.shutting_down.store(true, Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        {
            let cluster = self.core.lock();
            for uid in cluster.containers.keys() {
                kubelet::signal(&cluster, uid, Signal::SIGKILL);
            }
        }
        let kubelets =
            std::mem::take(&mut *self.core.kubelets.lock().unwrap_or_else(|e| e.into_inner()));
        for kubelet in kubelets {
            let _ = kubelet.join();
        }
    }
}
