//! The Job the Kubernetes executor creates for one worker, built from the `kubernetes` section
//! of the configuration. A pure function of its inputs, so the spec can be checked without a
//! cluster (see the tests: the shape the API server validates, with `k8s-openapi`'s types).
//!
//! One Job per worker (a `Process`, or one Pool worker):
//!
//! * `backoffLimit: 0`, `restartPolicy: Never`: a worker that fails is not restarted by
//!   Kubernetes; retries are the Pool's, which redelivers the chunks and starts another worker;
//! * one container, `worker`, running [`JobTemplate::program`] (this program in the image) with
//!   the task's address in `SHOAL_WORKER_TASK` and the Redis URL in `SHOAL_WORKER_REDIS` (from a
//!   Secret when `kubernetes.redis_url_secret` is set; without its password when
//!   `kubernetes.redis_password_secret` is, which then gives `SHOAL_WORKER_REDIS_PASSWORD`),
//!   plus `multiprocessing.env_vars`, and the parent's authkey in `SHOAL_WORKER_AUTHKEY` from
//!   the runtime's authkey Secret ([`JobTemplate::authkey_secret`]: never written in the Job,
//!   whose environment whoever may read Jobs can read, nor in Redis);
//! * `enableServiceLinks: false`: the kubelet would otherwise give the worker a variable per
//!   Service of the namespace (`SHOAL_REDIS_SERVICE_HOST`, `SHOAL_REDIS_PORT`... for a Service
//!   named `shoal-redis`), which shoal's configuration loader takes for `SHOAL_*` settings;
//! * `shareProcessNamespace: true`: the pod's pause container is PID 1 of the pod's PID
//!   namespace and the worker an ordinary process in it. A container's own process is PID 1 of
//!   its namespace otherwise, and the kernel delivers to a PID 1 only the signals it has a
//!   handler for, also those it sends itself: a function that ends its own worker with
//!   `raise(SIGKILL)` (as `examples/fault_tolerant_map.rs` does to show a pool surviving a dead
//!   worker) would kill nothing and carry on, where the same call ends a local worker. Shared,
//!   signals do on a pod what they do on this machine: `SIGKILL` and `SIGTERM` take their
//!   default actions, from the worker itself or from the kubelet. The pod's containers may see
//!   each other's processes, which with one container per pod shows the worker only the pause
//!   process;
//! * labels `shoal.dev/runtime` (the runtime that started it: its watch and its clean-up select
//!   on it), `shoal.dev/namespace`, `shoal.dev/process` (the process's name as a label value),
//!   `shoal.dev/worker` (the worker id the executor tracks), `app.kubernetes.io/managed-by:
//!   shoal`, and the configured labels; the same on the pod template; the configured
//!   annotations plus `shoal.dev/process-name` (the name as given);
//! * `terminationGracePeriodSeconds: 2` ([`POD_GRACE_SECS`]): a kubelet that stops the
//!   container of a pod force-deleted (`kill()`, grace 0) before it saw that grace falls back
//!   to the pod's own, 30 s by default, during which the function would run on; `terminate()`
//!   gives its grace ([`TERMINATE_GRACE_SECS`]) explicitly;
//! * `ttlSecondsAfterFinished`, `activeDeadlineSeconds`, the service account, node selector,
//!   tolerations, resources and image pull policy of the configuration;
//! * the pod's own name, namespace and UID through the downward API, in
//!   `SHOAL_WORKER_POD_NAME`, `SHOAL_WORKER_POD_NAMESPACE` and `SHOAL_WORKER_POD_UID`
//!   ([`PodOwner`]): a worker whose code starts processes of its own runs a Kubernetes executor
//!   too, which makes its Jobs dependents of this pod (an `ownerReferences` entry), so that
//!   Kubernetes' garbage collector deletes them when the pod goes, however it goes. (Under
//!   `SHOAL_WORKER_`, a prefix shoal's configuration loader never reads as settings: a
//!   `SHOAL_POD_*` variable would be taken for an override of an unknown section, and refused.)
//!
//! A Job (and an authkey Secret) made by a worker pod's executor carries that owner reference:
//! `v1` `Pod`, the pod's name and UID, neither `controller` (the Job controller is the Job's
//! pods' controller, nothing is the Job's) nor `blockOwnerDeletion` (the pod's deletion must
//! never wait for its dependents, and blocking needs the right to update the pod's finalizers,
//! which a worker's service account has no reason to hold).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    ResourceRequirements, Secret, SecretKeySelector, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use shoal_core::config::{KubernetesConfig, SecretKeyRef};

use crate::task::{
    ENV_WORKER_AUTHKEY, ENV_WORKER_REDIS, ENV_WORKER_REDIS_PASSWORD, ENV_WORKER_TASK,
};

/// The pods' `terminationGracePeriodSeconds`: what the kubelet waits between `SIGTERM` and
/// `SIGKILL` when a pod is deleted without a grace of its own (by the garbage collector after
/// its Job, an eviction, a Job's deadline), and what it falls back to when it stops the
/// container of a pod that was force-deleted (`kill()`, grace 0) before it saw the deletion's
/// grace. Low, so that `kill()` ends a worker within seconds on a real cluster too; a worker
/// dies of `SIGTERM` at once anyway (its default action, see the module docs).
pub const POD_GRACE_SECS: i64 = 2;

/// The grace `terminate()` deletes a pod with, explicitly (the pod's own is
/// [`POD_GRACE_SECS`]): a worker that handles `SIGTERM` has this long before `SIGKILL`.
pub const TERMINATE_GRACE_SECS: u32 = 30;

/// Label: the runtime that started the Job.
pub const LABEL_RUNTIME: &str = "shoal.dev/runtime";
/// Label: the shoal key namespace.
pub const LABEL_NAMESPACE: &str = "shoal.dev/namespace";
/// Label: the process's name, as a label value.
pub const LABEL_PROCESS: &str = "shoal.dev/process";
/// Label: the worker id the executor tracks.
pub const LABEL_WORKER: &str = "shoal.dev/worker";
/// Annotation: the process's name as given.
pub const ANNOTATION_PROCESS_NAME: &str = "shoal.dev/process-name";
/// The worker container's name.
pub const CONTAINER: &str = "worker";
/// The key of the authkey Secret ([`JobTemplate::authkey_secret`]) that holds the key (hex).
pub const AUTHKEY_SECRET_KEY: &str = "authkey";
/// Environment variable of a worker pod: its own name (downward API, `metadata.name`).
pub const ENV_POD_NAME: &str = "SHOAL_WORKER_POD_NAME";
/// Environment variable of a worker pod: its own namespace (downward API,
/// `metadata.namespace`).
pub const ENV_POD_NAMESPACE: &str = "SHOAL_WORKER_POD_NAMESPACE";
/// Environment variable of a worker pod: its own UID (downward API, `metadata.uid`).
pub const ENV_POD_UID: &str = "SHOAL_WORKER_POD_UID";

/// The downward-API variables every worker container gets: name and field path.
const DOWNWARD: [(&str, &str); 3] = [
    (ENV_POD_NAME, "metadata.name"),
    (ENV_POD_NAMESPACE, "metadata.namespace"),
    (ENV_POD_UID, "metadata.uid"),
];

/// The pod this process runs in, as the downward API told it ([`ENV_POD_NAME`],
/// [`ENV_POD_NAMESPACE`], [`ENV_POD_UID`]): the owner of the Jobs and Secrets an executor
/// running in a worker pod makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodOwner {
    /// The pod's name.
    pub name: String,
    /// The pod's namespace: an owner reference names an object of its dependent's namespace.
    pub namespace: String,
    /// The pod's UID: the garbage collector matches owners by it, so a pod of the same name
    /// made later owns nothing of this one's.
    pub uid: String,
}

impl PodOwner {
    /// The pod `lookup` (an environment: `std::env::var` in a process) describes, if it gives
    /// all three variables, none empty: a process outside a worker pod (a driver, a local
    /// worker) has none of them.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Option<PodOwner> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        Some(PodOwner {
            name: get(ENV_POD_NAME)?,
            namespace: get(ENV_POD_NAMESPACE)?,
            uid: get(ENV_POD_UID)?,
        })
    }

    /// The pod this process runs in, from its environment (see [`PodOwner::from_lookup`]).
    pub fn from_env() -> Option<PodOwner> {
        PodOwner::from_lookup(|name| std::env::var(name).ok())
    }

    /// The owner reference naming this pod: neither the controller nor blocking its deletion
    /// (see the module docs).
    pub fn reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        }
    }

    /// Makes the object of `metadata` a dependent of this pod (adds [`PodOwner::reference`]
    /// unless it names this pod already).
    pub fn own(&self, metadata: &mut ObjectMeta) {
        let references = metadata.owner_references.get_or_insert_with(Vec::new);
        if !references.iter().any(|r| r.uid == self.uid) {
            references.push(self.reference());
        }
    }
}

/// What every Job of one runtime shares.
#[derive(Clone, Debug, PartialEq)]
pub struct JobTemplate {
    /// The `kubernetes` section.
    pub config: KubernetesConfig,
    /// The runtime's id (label value).
    pub runtime_id: String,
    /// The shoal key namespace.
    pub namespace: String,
    /// This program's path in the image.
    pub program: String,
    /// Arguments before none: a test binary's worker entry (`<entry> --exact ...`).
    pub args: Vec<String>,
    /// The Redis URL workers get when no Secret gives it.
    pub redis_url: String,
}

/// One worker to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerJob<'a> {
    /// The worker id (the task id).
    pub id: &'a str,
    /// The process's name (`Process-1`, `PoolWorker-3`...).
    pub name: &'a str,
    /// `<namespace>/<task id>`, for `SHOAL_WORKER_TASK`.
    pub task: &'a str,
    /// `multiprocessing.env_vars`, and `SHOAL_WORKER_AUTHKEY`, which the Job never carries
    /// as a value (see `authkey_secret`).
    pub env: &'a BTreeMap<String, String>,
    /// The name of the Secret ([`JobTemplate::authkey_secret`]) whose key gives the worker
    /// `SHOAL_WORKER_AUTHKEY`.
    pub authkey_secret: Option<&'a str>,
}

impl JobTemplate {
    /// The Job's name: `shoal-<name>-<12 characters of the id>`, a valid DNS label.
    pub fn job_name(&self, worker: &WorkerJob<'_>) -> String {
        let short: String = worker
            .id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        let short = short.to_ascii_lowercase();
        let name = dns_part(worker.name, 30);
        if name.is_empty() {
            format!("shoal-{short}")
        } else {
            format!("shoal-{name}-{short}")
        }
    }

    /// The Secret that hands this runtime's workers the authkey whose hex form is `hex` (what
    /// `SHOAL_WORKER_AUTHKEY` carries), under [`AUTHKEY_SECRET_KEY`]. One per runtime and key
    /// (a key set with `set_authkey` later gets a Secret of its own):
    /// `shoal-authkey-<runtime id>-<suffix>`, the suffix random (its caller's: anything derived
    /// from the key would let whoever reads Jobs test guesses of it). Immutable, labelled as
    /// the Jobs are (`shoal.dev/runtime` selects them for deletion with the runtime).
    pub fn authkey_secret(&self, hex: &str, suffix: &str) -> Secret {
        let mut labels = self.config.labels.clone();
        labels.insert(LABEL_RUNTIME.into(), self.runtime_id.clone());
        labels.insert(LABEL_NAMESPACE.into(), label_value(&self.namespace));
        labels.insert("app.kubernetes.io/managed-by".into(), "shoal".into());
        Secret {
            metadata: ObjectMeta {
                name: Some(self.authkey_secret_name(suffix)),
                namespace: self.config.namespace.clone(),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            immutable: Some(true),
            string_data: Some(BTreeMap::from([(
                AUTHKEY_SECRET_KEY.to_string(),
                hex.to_string(),
            )])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        }
    }

    /// The name of [`JobTemplate::authkey_secret`]'s Secret with this `suffix`.
    pub fn authkey_secret_name(&self, suffix: &str) -> String {
        let runtime = dns_part(&self.runtime_id, 63);
        format!("shoal-authkey-{runtime}-{}", dns_part(suffix, 32))
    }

    /// The Job for `worker`.
    pub fn job(&self, worker: &WorkerJob<'_>) -> Job {
        let config = &self.config;
        let mut labels = config.labels.clone();
        labels.insert(LABEL_RUNTIME.into(), self.runtime_id.clone());
        labels.insert(LABEL_NAMESPACE.into(), label_value(&self.namespace));
        labels.insert(LABEL_PROCESS.into(), label_value(worker.name));
        labels.insert(LABEL_WORKER.into(), label_value(worker.id));
        labels.insert("app.kubernetes.io/managed-by".into(), "shoal".into());
        let mut annotations = config.annotations.clone();
        annotations.insert(ANNOTATION_PROCESS_NAME.into(), worker.name.to_string());
        let metadata = ObjectMeta {
            name: Some(self.job_name(worker)),
            namespace: config.namespace.clone(),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        };
        let redis = match &config.redis_url_secret {
            Some(secret) => from_secret(ENV_WORKER_REDIS, secret),
            // The password, when a Secret holds it, stays out of the Job.
            None if config.redis_password_secret.is_some() => {
                literal(ENV_WORKER_REDIS, &without_password(&self.redis_url))
            }
            None => literal(ENV_WORKER_REDIS, &self.redis_url),
        };
        let mut env = vec![literal(ENV_WORKER_TASK, worker.task), redis];
        if let Some(secret) = &config.redis_password_secret {
            env.push(from_secret(ENV_WORKER_REDIS_PASSWORD, secret));
        }
        env.extend(DOWNWARD.iter().map(|(name, path)| from_field(name, path)));
        // The authkey only ever from its Secret: a Job's environment is plain to its readers.
        // The pod's identity only from the downward API: a value set in the configuration
        // would make the worker's Jobs dependents of some other pod.
        env.extend(
            worker
                .env
                .iter()
                .filter(|(k, _)| {
                    k.as_str() != ENV_WORKER_AUTHKEY && !DOWNWARD.iter().any(|(d, _)| d == k)
                })
                .map(|(k, v)| literal(k, v)),
        );
        if let Some(name) = worker.authkey_secret {
            let secret = SecretKeyRef {
                name: name.to_string(),
                key: AUTHKEY_SECRET_KEY.to_string(),
            };
            env.push(from_secret(ENV_WORKER_AUTHKEY, &secret));
        }
        let quantities = |map: &BTreeMap<String, String>| {
            (!map.is_empty()).then(|| {
                map.iter()
                    .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        let resources = (!config.resources.requests.is_empty()
            || !config.resources.limits.is_empty())
        .then(|| ResourceRequirements {
            requests: quantities(&config.resources.requests),
            limits: quantities(&config.resources.limits),
            ..ResourceRequirements::default()
        });
        let container = Container {
            name: CONTAINER.into(),
            image: config.image.clone(),
            image_pull_policy: Some(config.image_pull_policy.as_str().into()),
            command: Some(vec![self.program.clone()]),
            args: (!self.args.is_empty()).then(|| self.args.clone()),
            env: Some(env),
            resources,
            ..Container::default()
        };
        let tolerations = (!config.tolerations.is_empty()).then(|| {
            config
                .tolerations
                .iter()
                .map(|t| Toleration {
                    key: t.key.clone(),
                    operator: t.operator.clone(),
                    value: t.value.clone(),
                    effect: t.effect.clone(),
                    toleration_seconds: t.toleration_seconds,
                })
                .collect()
        });
        let pod = PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            service_account_name: config.service_account.clone(),
            node_selector: (!config.node_selector.is_empty()).then(|| config.node_selector.clone()),
            tolerations,
            // Not PID 1: signals behave as on the local backend (see the module docs).
            share_process_namespace: Some(true),
            // No `<SERVICE>_SERVICE_HOST`/`_PORT...` variables for the namespace's Services: for
            // a Service named `shoal-redis` they would be `SHOAL_REDIS_SERVICE_HOST` and the
            // like, which shoal's configuration reads as `SHOAL_*` overrides (and refuses when
            // unknown). Workers reach Redis by the URL they are given, never by these.
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(POD_GRACE_SECS),
            ..PodSpec::default()
        };
        Job {
            metadata,
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                ttl_seconds_after_finished: config
                    .ttl_seconds_after_finished
                    .map(|t| i32::try_from(t).unwrap_or(i32::MAX)),
                active_deadline_seconds: config
                    .active_deadline_seconds
                    .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(pod),
                },
                ..JobSpec::default()
            }),
            status: None,
        }
    }
}

/// An environment variable whose value is a Secret's key (which must exist).
fn from_secret(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// An environment variable whose value is a field of the pod (downward API).
fn from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                // What the API server fills in when it is left out.
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// `url` without the password in its user information (as it is when it has none).
fn without_password(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut parsed) if parsed.password().is_some() => match parsed.set_password(None) {
            Ok(()) => parsed.to_string(),
            Err(()) => url.to_string(),
        },
        _ => url.to_string(),
    }
}

fn literal(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

/// `text` as part of a DNS label: lowercase letters, digits and `-`, at most `max` characters,
/// no `-` at either end.
fn dns_part(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= max {
            break;
        }
    }
    out.trim_matches('-').to_string()
}

/// `text` as a label value: at most 63 characters of `A-Z a-z 0-9 - _ .`, starting and ending
/// with a letter or digit (others replaced by `_`).
pub fn label_value(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::config::{ImagePullPolicy, SecretKeyRef};

    fn template() -> JobTemplate {
        let mut config = KubernetesConfig {
            namespace: Some("jobs".into()),
            image: Some("registry.example.com/app:1".into()),
            image_pull_policy: ImagePullPolicy::Always,
            service_account: Some("shoal-worker".into()),
            active_deadline_seconds: Some(600),
            ..KubernetesConfig::default()
        };
        config
            .resources
            .limits
            .insert("memory".into(), "512Mi".into());
        config
            .resources
            .requests
            .insert("cpu".into(), "250m".into());
        config.labels.insert("team".into(), "data".into());
        config.node_selector.insert("disktype".into(), "ssd".into());
        config.tolerations.push(shoal_core::config::Toleration {
            key: Some("spot".into()),
            operator: Some("Equal".into()),
            value: Some("true".into()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        });
        JobTemplate {
            config,
            runtime_id: "0123456789abcdef0123456789abcdef".into(),
            namespace: "default".into(),
            program: "/usr/local/bin/app".into(),
            args: Vec::new(),
            redis_url: "redis://shoal-redis:6379".into(),
        }
    }

    fn worker<'a>(env: &'a BTreeMap<String, String>) -> WorkerJob<'a> {
        WorkerJob {
            id: "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
            name: "PoolWorker-3",
            task: "default/9f8e7d6c5b4a39281706f5e4d3c2b1a0",
            env,
            authkey_secret: None,
        }
    }

    #[test]
    fn the_authkey_reaches_the_worker_from_a_secret_never_from_the_job() {
        let t = template();
        let hex = "c0ffee00".repeat(8);
        let secret = t.authkey_secret(&hex, "5e1f0a2b3c4d");
        let name = secret.metadata.name.clone().expect("named");
        assert_eq!(
            name,
            "shoal-authkey-0123456789abcdef0123456789abcdef-5e1f0a2b3c4d"
        );
        let json = serde_json::to_value(&secret).expect("json");
        assert_eq!(json["stringData"][AUTHKEY_SECRET_KEY], hex.as_str());
        assert_eq!(json["immutable"], true);
        assert_eq!(json["metadata"]["namespace"], "jobs");
        let labels = &json["metadata"]["labels"];
        assert_eq!(labels[LABEL_RUNTIME], "0123456789abcdef0123456789abcdef");
        assert_eq!(labels["team"], "data");

        let mut env = BTreeMap::new();
        env.insert(ENV_WORKER_AUTHKEY.to_string(), hex.clone());
        env.insert("GREETING".to_string(), "hi".to_string());
        let with_secret = WorkerJob {
            authkey_secret: Some(&name),
            ..worker(&env)
        };
        let job = serde_json::to_value(t.job(&with_secret)).expect("json");
        assert!(!job.to_string().contains(&hex), "the key is not in the Job");
        let vars = job["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .clone();
        let keyed: Vec<&serde_json::Value> = vars
            .iter()
            .filter(|v| v["name"] == ENV_WORKER_AUTHKEY)
            .collect();
        assert_eq!(keyed.len(), 1, "{vars:?}");
        assert_eq!(keyed[0]["valueFrom"]["secretKeyRef"]["name"], name.as_str());
        assert_eq!(
            keyed[0]["valueFrom"]["secretKeyRef"]["key"],
            AUTHKEY_SECRET_KEY
        );
        assert!(vars.iter().any(|v| v["name"] == "GREETING"));
        // Without a Secret the variable is left out, never written.
        let job = serde_json::to_value(t.job(&worker(&env))).expect("json");
        assert!(!job.to_string().contains(&hex));
        assert!(!job.to_string().contains(ENV_WORKER_AUTHKEY));
    }

    #[test]
    fn pods_have_a_short_grace_period_of_their_own() {
        let env = BTreeMap::new();
        let job = template().job(&worker(&env));
        let pod = job
            .spec
            .and_then(|s| s.template.spec)
            .expect("a pod template");
        assert_eq!(pod.termination_grace_period_seconds, Some(POD_GRACE_SECS));
        const { assert!(POD_GRACE_SECS <= 2, "a forced delete falls back to it") };
        const { assert!(TERMINATE_GRACE_SECS as i64 > POD_GRACE_SECS) };
    }

    #[test]
    fn names_are_dns_labels() {
        let env = BTreeMap::new();
        let t = template();
        assert_eq!(t.job_name(&worker(&env)), "shoal-poolworker-3-9f8e7d6c5b4a");
        let odd = WorkerJob {
            name: "My Weird/Name!!",
            ..worker(&env)
        };
        assert_eq!(t.job_name(&odd), "shoal-my-weird-name-9f8e7d6c5b4a");
        assert_eq!(label_value("-Process 1:2-"), "Process_1_2");
        assert_eq!(dns_part(&"x".repeat(100), 30).len(), 30);
    }

    #[test]
    fn the_job_has_what_the_configuration_asks_for() {
        let mut env = BTreeMap::new();
        env.insert("GREETING".to_string(), "hi".to_string());
        let job = template().job(&worker(&env));
        let json = serde_json::to_value(&job).expect("json");
        let spec = &json["spec"];
        assert_eq!(spec["backoffLimit"], 0);
        assert_eq!(spec["activeDeadlineSeconds"], 600);
        assert_eq!(spec["ttlSecondsAfterFinished"], 300);
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(
            pod["shareProcessNamespace"], true,
            "the worker is not PID 1, so it can signal itself"
        );
        assert_eq!(
            pod["enableServiceLinks"], false,
            "no SHOAL_REDIS_SERVICE_HOST and the like: they would read as configuration"
        );
        assert_eq!(pod["serviceAccountName"], "shoal-worker");
        assert_eq!(pod["nodeSelector"]["disktype"], "ssd");
        assert_eq!(pod["tolerations"][0]["key"], "spot");
        let c = &pod["containers"][0];
        assert_eq!(c["name"], "worker");
        assert_eq!(c["image"], "registry.example.com/app:1");
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(c["command"][0], "/usr/local/bin/app");
        assert_eq!(c["resources"]["limits"]["memory"], "512Mi");
        assert_eq!(c["resources"]["requests"]["cpu"], "250m");
        let env: Vec<(String, String)> = c["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap_or_default().to_string(),
                    e["value"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        assert_eq!(
            env,
            [
                (
                    "SHOAL_WORKER_TASK".to_string(),
                    "default/9f8e7d6c5b4a39281706f5e4d3c2b1a0".to_string()
                ),
                (
                    "SHOAL_WORKER_REDIS".to_string(),
                    "redis://shoal-redis:6379".to_string()
                ),
                // From the downward API: no literal value.
                (ENV_POD_NAME.to_string(), String::new()),
                (ENV_POD_NAMESPACE.to_string(), String::new()),
                (ENV_POD_UID.to_string(), String::new()),
                ("GREETING".to_string(), "hi".to_string()),
            ]
        );
        let labels = &json["metadata"]["labels"];
        assert_eq!(labels["team"], "data");
        assert_eq!(labels[LABEL_RUNTIME], "0123456789abcdef0123456789abcdef");
        assert_eq!(labels[LABEL_PROCESS], "PoolWorker-3");
        assert_eq!(labels[LABEL_WORKER], "9f8e7d6c5b4a39281706f5e4d3c2b1a0");
        assert_eq!(json["metadata"]["namespace"], "jobs");
        assert_eq!(
            spec["template"]["metadata"]["labels"], json["metadata"]["labels"],
            "the pods carry the Job's labels"
        );
        assert_eq!(
            json["metadata"]["annotations"][ANNOTATION_PROCESS_NAME],
            "PoolWorker-3"
        );
    }

    #[test]
    fn the_redis_url_can_come_from_a_secret() {
        let mut t = template();
        t.config.redis_url_secret = Some(SecretKeyRef {
            name: "shoal-redis-url".into(),
            key: "url".into(),
        });
        let env = BTreeMap::new();
        let json = serde_json::to_value(t.job(&worker(&env))).expect("json");
        let redis = &json["spec"]["template"]["spec"]["containers"][0]["env"][1];
        assert_eq!(redis["name"], "SHOAL_WORKER_REDIS");
        assert!(redis.get("value").is_none(), "no literal URL: {redis}");
        assert_eq!(
            redis["valueFrom"]["secretKeyRef"]["name"],
            "shoal-redis-url"
        );
        assert_eq!(redis["valueFrom"]["secretKeyRef"]["key"], "url");
    }

    #[test]
    fn the_redis_password_can_come_from_a_secret() {
        let mut t = template();
        t.redis_url = "redis://app:s3cret@shoal-redis:6379/0".into();
        t.config.redis_password_secret = Some(SecretKeyRef {
            name: "shoal-redis".into(),
            key: "password".into(),
        });
        let env = BTreeMap::new();
        let json = serde_json::to_value(t.job(&worker(&env))).expect("json");
        let vars = &json["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(vars[1]["name"], "SHOAL_WORKER_REDIS");
        // The Job carries the address, never the password.
        assert_eq!(vars[1]["value"], "redis://app@shoal-redis:6379/0");
        assert!(!json.to_string().contains("s3cret"), "{json}");
        assert_eq!(vars[2]["name"], "SHOAL_WORKER_REDIS_PASSWORD");
        assert!(vars[2].get("value").is_none(), "{}", vars[2]);
        assert_eq!(vars[2]["valueFrom"]["secretKeyRef"]["name"], "shoal-redis");
        assert_eq!(vars[2]["valueFrom"]["secretKeyRef"]["key"], "password");
        assert_eq!(vars[2]["valueFrom"]["secretKeyRef"]["optional"], false);
    }

    #[test]
    fn worker_pods_learn_their_own_name_namespace_and_uid_from_the_downward_api() {
        let mut env = BTreeMap::new();
        // A value in the configuration cannot stand in for the pod's own.
        env.insert(ENV_POD_UID.to_string(), "forged".to_string());
        env.insert("GREETING".to_string(), "hi".to_string());
        let json = serde_json::to_value(template().job(&worker(&env))).expect("json");
        let vars = json["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .clone();
        for (name, path) in [
            ("SHOAL_WORKER_POD_NAME", "metadata.name"),
            ("SHOAL_WORKER_POD_NAMESPACE", "metadata.namespace"),
            ("SHOAL_WORKER_POD_UID", "metadata.uid"),
        ] {
            let found: Vec<&serde_json::Value> =
                vars.iter().filter(|v| v["name"] == name).collect();
            assert_eq!(found.len(), 1, "{name} once: {vars:?}");
            assert!(found[0].get("value").is_none(), "{name}: {}", found[0]);
            assert_eq!(found[0]["valueFrom"]["fieldRef"]["fieldPath"], path);
            assert_eq!(found[0]["valueFrom"]["fieldRef"]["apiVersion"], "v1");
        }
        assert!(!json.to_string().contains("forged"), "{json}");
        assert!(vars.iter().any(|v| v["name"] == "GREETING"));
        // A worker's Job is owned by nothing: the driver's executor runs in no worker pod.
        assert!(json["metadata"].get("ownerReferences").is_none(), "{json}");
    }

    #[test]
    fn a_worker_pods_jobs_name_it_as_their_owner_without_controlling_or_blocking() {
        let pod = BTreeMap::from([
            (ENV_POD_NAME, "shoal-process-1-9f8e7d6c5b4a-x7k2p"),
            (ENV_POD_NAMESPACE, "jobs"),
            (ENV_POD_UID, "4f1c6d1e-0c1b-4d7e-9a65-2b8f0e1d3c5a"),
        ]);
        let lookup = |name: &str| pod.get(name).map(|v| v.to_string());
        let owner = PodOwner::from_lookup(lookup).expect("inside a worker pod");
        assert_eq!(owner.namespace, "jobs");
        // Outside a worker pod (a driver, a local worker), or with a variable empty: no owner.
        assert_eq!(PodOwner::from_lookup(|_| None), None);
        for missing in [ENV_POD_NAME, ENV_POD_NAMESPACE, ENV_POD_UID] {
            let partial = |name: &str| (name != missing).then(|| lookup(name)).flatten();
            assert_eq!(PodOwner::from_lookup(partial), None, "without {missing}");
            let empty = |name: &str| {
                if name == missing {
                    Some(String::new())
                } else {
                    lookup(name)
                }
            };
            assert_eq!(PodOwner::from_lookup(empty), None, "{missing} empty");
        }

        let t = template();
        let env = BTreeMap::new();
        let mut job = t.job(&worker(&env));
        owner.own(&mut job.metadata);
        owner.own(&mut job.metadata);
        let json = serde_json::to_value(&job).expect("json");
        assert_eq!(
            json["metadata"]["ownerReferences"],
            serde_json::json!([{
                "apiVersion": "v1",
                "kind": "Pod",
                "name": "shoal-process-1-9f8e7d6c5b4a-x7k2p",
                "uid": "4f1c6d1e-0c1b-4d7e-9a65-2b8f0e1d3c5a",
                "controller": false,
                "blockOwnerDeletion": false,
            }]),
            "one reference, however often it is added"
        );
        // Only the Job is owned: its pods' controller is the Job, as the Job controller makes it.
        assert!(
            json["spec"]["template"]["metadata"]
                .get("ownerReferences")
                .is_none()
        );
        // Everything else is the Job an executor outside a pod makes.
        let mut unowned = job.clone();
        unowned.metadata.owner_references = None;
        assert_eq!(unowned, t.job(&worker(&env)));
        let back: Job = serde_json::from_value(json).expect("decodes as a batch/v1 Job");
        assert_eq!(back, job);

        let mut secret = t.authkey_secret(&"00".repeat(32), "5e1f0a2b3c4d");
        owner.own(&mut secret.metadata);
        assert_eq!(
            secret.metadata.owner_references,
            Some(vec![owner.reference()])
        );
    }

    #[test]
    fn the_job_round_trips_through_the_api_types() {
        // What the API server would receive decodes back into the same typed Job: no field is
        // lost or misspelt on the wire.
        let env = BTreeMap::new();
        let job = template().job(&worker(&env));
        let wire = serde_json::to_string(&job).expect("json");
        let back: Job = serde_json::from_str(&wire).expect("decodes as a batch/v1 Job");
        assert_eq!(back, job);
    }
}
