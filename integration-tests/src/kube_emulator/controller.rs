//! The emulator's control plane: Job admission (validation and the API server's defaults), the
//! job controller (one pod per Job at a time, retries up to `backoffLimit`,
//! `activeDeadlineSeconds`, status and conditions, `FailedCreate` Events when the pod is refused
//! admission), pod deletion (graceful, with the kubelet's
//! signals), the garbage collector's propagation policies (a Job's deletion and its pods; the
//! owner references clients set are `gc`'s) and the TTL-after-finished controller.
//!
//! Every function here runs with the cluster lock held and leaves the store consistent; work
//! that must happen later (deadlines, SIGKILL after a grace period, TTLs, retry backoff) is a
//! timer on the emulator's runtime that takes the lock again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus, UncountedTerminatedPods};
use k8s_openapi::api::core::v1::{
    Event, EventSource, ObjectReference, Pod, PodSpec, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    DeleteOptions, LabelSelector, ObjectMeta, OwnerReference, Preconditions, Time,
};
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;

use super::api::{ApiError, Cause};
use super::gc;
use super::kubelet;
use super::scheduler;
use super::store::Object;
use super::validation;
use super::{Cluster, Core, NODE_NAME};

/// Delay before the first retry of a failed Job pod, doubled for each further failure up to
/// [`RETRY_DELAY_MAX`]. (A real job controller starts at 10 s and caps at 6 min; shorter here
/// so tests with `backoffLimit > 0` stay quick.)
pub(crate) const RETRY_DELAY: Duration = Duration::from_millis(200);
/// Longest delay between retries.
pub(crate) const RETRY_DELAY_MAX: Duration = Duration::from_millis(6_400);

/// Delay before the job controller tries again to create a pod that admission refused, doubled
/// for each further refusal up to [`CREATE_RETRY_DELAY_MAX`]. (A real job controller requeues
/// the Job from 1 s, doubling up to 60 s.)
pub(crate) const CREATE_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Longest delay between attempts to create a refused pod.
pub(crate) const CREATE_RETRY_DELAY_MAX: Duration = Duration::from_secs(4);

/// The service account every namespace has (implicitly, here).
pub(crate) const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The label keys the API server adds to a Job's pod template (and so to its pods).
const CONTROLLER_UID: &str = "controller-uid";
const JOB_NAME: &str = "job-name";
const BATCH_CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
const BATCH_JOB_NAME: &str = "batch.kubernetes.io/job-name";

/// Characters of generated name suffixes (the API server's: no vowels, no look-alikes).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Time now, as the API writes it.
pub(crate) fn now() -> Time {
    Time(Timestamp::now())
}

/// Milliseconds since the epoch of an API time.
pub(crate) fn millis(time: &Time) -> i64 {
    time.0.as_millisecond()
}

/// `base` plus five random characters, free in `namespace` for objects of kind `K`.
pub(crate) fn generate_name<K: Object>(cluster: &Cluster, namespace: &str, base: &str) -> String {
    // Names are at most 63 characters with the suffix, as the API server truncates them.
    let base: String = base.chars().take(58).collect();
    loop {
        let random = uuid::Uuid::new_v4();
        let suffix: String = random.as_bytes()[..5]
            .iter()
            .map(|b| SUFFIX_ALPHABET[usize::from(*b) % SUFFIX_ALPHABET.len()] as char)
            .collect();
        let name = format!("{base}{suffix}");
        if !cluster.store.contains::<K>(namespace, &name) {
            return name;
        }
    }
}

/// A fresh object identity: uid, creation time, namespace and name.
pub(crate) fn admit_metadata<K: Object>(
    cluster: &Cluster,
    namespace: &str,
    metadata: &mut ObjectMeta,
) -> Result<(), ApiError> {
    if let Some(given) = &metadata.namespace
        && given != namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = match (&metadata.name, &metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(base)) if !base.is_empty() => generate_name::<K>(cluster, namespace, base),
        _ => {
            return Err(ApiError::invalid::<K>(
                "",
                vec![Cause::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            ));
        }
    };
    if let Some(problem) = dns_subdomain_problem(&name) {
        return Err(ApiError::invalid::<K>(
            &name,
            vec![Cause::invalid("metadata.name", &name, &problem)],
        ));
    }
    let mut causes = validation::object_meta(metadata, "metadata");
    causes.extend(validation::owner_references(
        metadata.owner_references.as_deref().unwrap_or_default(),
        "metadata.ownerReferences",
    ));
    if !causes.is_empty() {
        return Err(ApiError::invalid::<K>(&name, causes));
    }
    if cluster.store.contains::<K>(namespace, &name) {
        return Err(ApiError::already_exists::<K>(&name));
    }
    metadata.name = Some(name);
    metadata.namespace = Some(namespace.to_string());
    metadata.uid = Some(uuid::Uuid::new_v4().to_string());
    metadata.creation_timestamp = Some(now());
    metadata.resource_version = None;
    metadata.deletion_timestamp = None;
    metadata.deletion_grace_period_seconds = None;
    metadata.generation = Some(1);
    metadata.managed_fields = None;
    Ok(())
}

/// Why `name` is not a DNS-1123 subdomain (what object names must be), if it is not.
fn dns_subdomain_problem(name: &str) -> Option<String> {
    let valid = name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!valid).then(|| {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
         '-' or '.', and must start and end with an alphanumeric character"
            .to_string()
    })
}

/// Validates and stores a new Job, then lets the job controller start it.
pub(crate) fn create_job(
    core: &Arc<Core>,
    cluster: &mut Cluster,
    namespace: &str,
    mut job: Job,
) -> Result<Job, ApiError> {
    admit_metadata::<Job>(cluster, namespace, &mut job.metadata)?;
    let name = job.metadata.name.clone().unwrap_or_default();
    let causes = validate_job(&job);
    if !causes.is_empty() {
        return Err(ApiError::invalid::<Job>(&name, causes));
    }
    default_job(&mut job);
    job.status = None;
    let job = cluster.store.create(job);
    sync_job(core, cluster, namespace, &name);
    Ok(job)
}

/// The problems a real API server reports for this Job, plus the features this emulator does
/// not implement (reported the same way, saying so).
fn validate_job(job: &Job) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = job.metadata.name.as_deref().unwrap_or_default();
    if name.len() > 63 {
        causes.push(Cause::invalid(
            "metadata.name",
            name,
            "must be no more than 63 characters (it is the value of the job-name label)",
        ));
    }
    let Some(spec) = &job.spec else {
        causes.push(Cause::required("spec.template.spec.containers", ""));
        return causes;
    };
    let unsupported = |causes: &mut Vec<Cause>, field: &str, what: &str| {
        causes.push(Cause::unsupported(field, what));
    };
    for (field, value) in [
        ("spec.backoffLimit", spec.backoff_limit.map(i64::from)),
        (
            "spec.ttlSecondsAfterFinished",
            spec.ttl_seconds_after_finished.map(i64::from),
        ),
    ] {
        if value.is_some_and(|v| v < 0) {
            causes.push(Cause::invalid(
                field,
                &value.unwrap_or_default().to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
    if let Some(deadline) = spec.active_deadline_seconds
        && deadline <= 0
    {
        causes.push(Cause::invalid(
            "spec.activeDeadlineSeconds",
            &deadline.to_string(),
            "must be greater than 0",
        ));
    }
    if spec.selector.is_some() && spec.manual_selector != Some(true) {
        causes.push(Cause::invalid(
            "spec.selector",
            "",
            "`selector` will be auto-generated",
        ));
    }
    if spec.manual_selector == Some(true) {
        unsupported(&mut causes, "spec.manualSelector", "manual selectors");
    }
    if spec.completions.is_some_and(|c| c != 1) || spec.parallelism.is_some_and(|p| p != 1) {
        unsupported(
            &mut causes,
            "spec.completions",
            "completions or parallelism other than 1",
        );
    }
    if spec
        .completion_mode
        .as_deref()
        .is_some_and(|m| m != "NonIndexed")
    {
        unsupported(&mut causes, "spec.completionMode", "indexed Jobs");
    }
    if spec.suspend == Some(true) {
        unsupported(&mut causes, "spec.suspend", "suspended Jobs");
    }
    if spec.pod_failure_policy.is_some() {
        unsupported(&mut causes, "spec.podFailurePolicy", "pod failure policies");
    }
    if spec.success_policy.is_some() {
        unsupported(&mut causes, "spec.successPolicy", "success policies");
    }
    if spec
        .pod_replacement_policy
        .as_deref()
        .is_some_and(|p| p != "TerminatingOrFailed")
    {
        unsupported(
            &mut causes,
            "spec.podReplacementPolicy",
            "podReplacementPolicy other than TerminatingOrFailed",
        );
    }
    if let Some(metadata) = &spec.template.metadata {
        causes.extend(validation::object_meta(metadata, "spec.template.metadata"));
    }
    let Some(pod) = &spec.template.spec else {
        causes.push(Cause::required("spec.template.spec.containers", ""));
        return causes;
    };
    causes.extend(validation::pod_spec(pod, "spec.template.spec"));
    match pod.restart_policy.as_deref() {
        Some("Never") => {}
        Some("OnFailure") => unsupported(
            &mut causes,
            "spec.template.spec.restartPolicy",
            "restartPolicy OnFailure (restarts in place); use Never",
        ),
        other => causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: "spec.template.spec.restartPolicy".into(),
            message: format!(
                "Unsupported value: {:?}: supported values: \"OnFailure\", \"Never\"",
                other.unwrap_or("Always")
            ),
        }),
    }
    if pod.containers.is_empty() {
        causes.push(Cause::required("spec.template.spec.containers", ""));
    }
    if pod.containers.len() > 1 {
        unsupported(
            &mut causes,
            "spec.template.spec.containers",
            "more than one container",
        );
    }
    if pod.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        unsupported(
            &mut causes,
            "spec.template.spec.initContainers",
            "init containers",
        );
    }
    if pod.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        unsupported(&mut causes, "spec.template.spec.volumes", "volumes");
    }
    for (i, container) in pod.containers.iter().enumerate() {
        let field = |f: &str| format!("spec.template.spec.containers[{i}].{f}");
        if container.name.is_empty() {
            causes.push(Cause::required(&field("name"), ""));
        }
        if container.image.as_deref().is_none_or(str::is_empty) {
            causes.push(Cause::required(&field("image"), ""));
        }
        if container.command.as_ref().is_none_or(|c| c.is_empty()) {
            unsupported(
                &mut causes,
                &field("command"),
                "containers without a command (images are not run: command[0] is a program \
                 path on the test machine)",
            );
        }
        if container
            .volume_mounts
            .as_ref()
            .is_some_and(|v| !v.is_empty())
        {
            unsupported(&mut causes, &field("volumeMounts"), "volume mounts");
        }
    }
    causes
}

/// The defaults a real API server fills in on create.
fn default_job(job: &mut Job) {
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    let Some(spec) = job.spec.as_mut() else {
        return;
    };
    spec.completions.get_or_insert(1);
    spec.parallelism.get_or_insert(1);
    spec.backoff_limit.get_or_insert(6);
    spec.completion_mode
        .get_or_insert_with(|| "NonIndexed".to_string());
    spec.suspend.get_or_insert(false);
    spec.manual_selector = None;
    spec.pod_replacement_policy
        .get_or_insert_with(|| "TerminatingOrFailed".to_string());
    spec.selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([(
            BATCH_CONTROLLER_UID.to_string(),
            uid.clone(),
        )])),
        match_expressions: None,
    });
    let labels = spec
        .template
        .metadata
        .get_or_insert_with(ObjectMeta::default);
    let labels = labels.labels.get_or_insert_with(BTreeMap::new);
    for (key, value) in [
        (BATCH_CONTROLLER_UID, &uid),
        (BATCH_JOB_NAME, &name),
        (CONTROLLER_UID, &uid),
        (JOB_NAME, &name),
    ] {
        labels.insert(key.to_string(), value.clone());
    }
    // A Job without labels gets its pod template's.
    if job.metadata.labels.as_ref().is_none_or(BTreeMap::is_empty) {
        job.metadata.labels = Some(labels.clone());
    }
    if let Some(pod) = spec.template.spec.as_mut() {
        pod.termination_grace_period_seconds.get_or_insert(30);
        pod.dns_policy
            .get_or_insert_with(|| "ClusterFirst".to_string());
        pod.scheduler_name
            .get_or_insert_with(|| "default-scheduler".to_string());
        pod.security_context.get_or_insert_with(Default::default);
        for container in &mut pod.containers {
            container
                .termination_message_path
                .get_or_insert_with(|| "/dev/termination-log".to_string());
            container
                .termination_message_policy
                .get_or_insert_with(|| "File".to_string());
            let image = container.image.clone().unwrap_or_default();
            let tagged = image
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'));
            let pull = if !tagged || image.ends_with(":latest") {
                "Always"
            } else {
                "IfNotPresent"
            };
            container
                .image_pull_policy
                .get_or_insert_with(|| pull.to_string());
        }
    }
}

/// True for a pod that ended (Succeeded or Failed).
pub(crate) fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Job controlling `pod` (its controller owner reference, if the Job still exists).
fn owner(cluster: &Cluster, pod: &Pod) -> Option<Job> {
    let reference = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true) && r.kind == "Job")?;
    let namespace = pod.metadata.namespace.as_deref()?;
    let job: Job = cluster.store.get(namespace, &reference.name)?;
    (job.metadata.uid.as_deref() == Some(reference.uid.as_str())).then_some(job)
}

/// The pods whose controller is the Job with uid `uid`.
fn owned_pods(cluster: &Cluster, namespace: &str, uid: &str) -> Vec<Pod> {
    cluster
        .store
        .list::<Pod>(Some(namespace))
        .into_iter()
        .filter(|p| {
            p.metadata.owner_references.as_ref().is_some_and(|refs| {
                refs.iter()
                    .any(|r| r.uid == uid && r.controller == Some(true))
            })
        })
        .collect()
}

fn condition<'a>(status: &'a JobStatus, type_: &str) -> Option<&'a JobCondition> {
    status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

fn add_condition(status: &mut JobStatus, type_: &str, reason: &str, message: &str) {
    if condition(status, type_).is_some() {
        return;
    }
    let time = now();
    status
        .conditions
        .get_or_insert_with(Vec::new)
        .push(JobCondition {
            type_: type_.to_string(),
            status: "True".to_string(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            last_probe_time: Some(time.clone()),
            last_transition_time: Some(time),
        });
}

fn is_finished(status: &JobStatus) -> bool {
    condition(status, "Complete").is_some() || condition(status, "Failed").is_some()
}

/// Counts a pod's outcome once into its Job's `succeeded`/`failed` (a pod that is deleted
/// before it ends counts as failed, as the real job controller counts it).
fn count_outcome(cluster: &mut Cluster, pod: &Pod, succeeded: bool) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let Some(mut job) = owner(cluster, pod) else {
        return;
    };
    if !cluster.counted.insert(uid) {
        return;
    }
    let status = job.status.get_or_insert_with(JobStatus::default);
    let counter = if succeeded {
        &mut status.succeeded
    } else {
        &mut status.failed
    };
    *counter = Some(counter.unwrap_or(0) + 1);
    if !succeeded && let Some(job_uid) = job.metadata.uid.clone() {
        cluster.last_failure.insert(job_uid, Instant::now());
    }
    cluster.store.update(job);
}

/// Brings the Job `namespace/name` and its pods to where the job controller would: starts it,
/// creates its pod (again after a failure, within `backoffLimit`, after the retry delay), fails
/// it (backoff limit, deadline) and completes it, with the status the real one writes.
pub(crate) fn sync_job(core: &Arc<Core>, cluster: &mut Cluster, namespace: &str, name: &str) {
    let Some(job) = cluster.store.get::<Job>(namespace, name) else {
        return;
    };
    let uid = job.metadata.uid.clone().unwrap_or_default();
    if job.metadata.deletion_timestamp.is_some() {
        // Foreground deletion: the Job goes when its pods are gone.
        if owned_pods(cluster, namespace, &uid).is_empty() {
            cluster.store.remove::<Job>(namespace, name);
        }
        return;
    }
    let spec = job.spec.clone().unwrap_or_default();
    let mut status = job.status.clone().unwrap_or_default();
    let started = status.start_time.is_none();
    let start = status.start_time.get_or_insert_with(now).clone();
    if started && let Some(deadline) = spec.active_deadline_seconds {
        let due = millis(&start) + deadline.saturating_mul(1000) - millis(&now());
        let delay = Duration::from_millis(u64::try_from(due).unwrap_or(0) + 5);
        schedule_sync(core, namespace, name, &uid, delay);
    }

    if !is_finished(&status) {
        // Decide failure first: it stops the pods.
        if condition(&status, "FailureTarget").is_none() && status.succeeded.unwrap_or(0) == 0 {
            let deadline_passed = spec
                .active_deadline_seconds
                .is_some_and(|d| millis(&now()) >= millis(&start) + d.saturating_mul(1000));
            if status.failed.unwrap_or(0) > spec.backoff_limit.unwrap_or(6) {
                add_condition(
                    &mut status,
                    "FailureTarget",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                );
            } else if deadline_passed {
                add_condition(
                    &mut status,
                    "FailureTarget",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                );
            }
            if condition(&status, "FailureTarget").is_some() {
                let mut job = job.clone();
                job.status = Some(status.clone());
                cluster.store.update(job);
                for pod in owned_pods(cluster, namespace, &uid) {
                    if !is_terminal(&pod) && pod.metadata.deletion_timestamp.is_none() {
                        begin_pod_deletion(core, cluster, &pod, None);
                    }
                }
                // Counting the stopped pods changed the stored status.
                status = cluster
                    .store
                    .get::<Job>(namespace, name)
                    .and_then(|j| j.status)
                    .unwrap_or(status);
            }
        }
    }

    let pods = owned_pods(cluster, namespace, &uid);
    let unfinished: Vec<&Pod> = pods.iter().filter(|p| !is_terminal(p)).collect();
    let active = unfinished
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count();
    let terminating = unfinished.len() - active;
    let ready = unfinished
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
        .count();
    let mut create_pod = false;
    if !is_finished(&status) {
        if let Some(target) = condition(&status, "FailureTarget").cloned() {
            if unfinished.is_empty() {
                add_condition(
                    &mut status,
                    "Failed",
                    target.reason.as_deref().unwrap_or_default(),
                    target.message.as_deref().unwrap_or_default(),
                );
            }
        } else if status.succeeded.unwrap_or(0) >= spec.completions.unwrap_or(1) {
            let message = "Reached expected number of succeeded pods";
            add_condition(
                &mut status,
                "SuccessCriteriaMet",
                "CompletionsReached",
                message,
            );
            if unfinished.is_empty() {
                add_condition(&mut status, "Complete", "CompletionsReached", message);
                status.completion_time = Some(now());
            }
        } else if active == 0 && !core.shutting_down() {
            // TerminatingOrFailed: a terminating pod is replaced without waiting for it.
            let failures = status.failed.unwrap_or(0);
            let wait = retry_wait(cluster, &uid, failures);
            if !wait.is_zero() {
                schedule_sync(core, namespace, name, &uid, wait);
            } else if let Some(refused) = pod_admission_error(cluster, &job) {
                // As the real controller: a Warning Event on the Job, then a retry (the Job is
                // requeued with back-off), the Job's status unchanged.
                record_event(
                    cluster,
                    &job,
                    "Warning",
                    "FailedCreate",
                    &format!("Error creating: {refused}"),
                );
                let refusals = cluster.refused_creates.entry(uid.clone()).or_insert(0);
                let exponent = (*refusals).min(16);
                *refusals = refusals.saturating_add(1);
                let delay = CREATE_RETRY_DELAY
                    .saturating_mul(2u32.saturating_pow(exponent))
                    .min(CREATE_RETRY_DELAY_MAX);
                schedule_sync(core, namespace, name, &uid, delay);
            } else {
                cluster.refused_creates.remove(&uid);
                create_pod = true;
            }
        }
    }
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let active = active + usize::from(create_pod);
    status.active = (active > 0).then(|| count(active));
    status.ready = Some(count(ready));
    status.terminating = Some(count(terminating));
    status.uncounted_terminated_pods = Some(UncountedTerminatedPods::default());
    let finished_now = is_finished(&status) && job.status.as_ref().is_none_or(|s| !is_finished(s));
    // Read the stored Job again: deleting pods above may have counted failures into it.
    let mut stored = cluster.store.get::<Job>(namespace, name).unwrap_or(job);
    if let Some(previous) = &stored.status {
        status.failed = previous.failed;
        status.succeeded = previous.succeeded;
    }
    if stored.status.as_ref() != Some(&status) {
        stored.status = Some(status);
        cluster.store.update(stored.clone());
    }
    if create_pod {
        create_job_pod(core, cluster, &stored);
    }
    if finished_now && let Some(ttl) = spec.ttl_seconds_after_finished {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        core.after(
            Duration::from_secs(u64::try_from(ttl).unwrap_or(0)),
            move |core, cluster| {
                let same = cluster
                    .store
                    .get::<Job>(&namespace, &name)
                    .is_some_and(|j| j.metadata.uid.as_deref() == Some(uid.as_str()));
                if same {
                    let options = DeleteOptions {
                        propagation_policy: Some("Foreground".to_string()),
                        ..DeleteOptions::default()
                    };
                    let _ = delete_job(core, cluster, &namespace, &name, &options);
                }
            },
        );
    }
}

/// How long the Job `uid` must still wait before its next pod after `failures` failures.
fn retry_wait(cluster: &Cluster, uid: &str, failures: i32) -> Duration {
    if failures <= 0 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(failures - 1).unwrap_or(0).min(16);
    let delay = RETRY_DELAY
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(RETRY_DELAY_MAX);
    let since = cluster
        .last_failure
        .get(uid)
        .map_or(delay, Instant::elapsed);
    delay.saturating_sub(since)
}

fn schedule_sync(core: &Arc<Core>, namespace: &str, name: &str, uid: &str, delay: Duration) {
    let (namespace, name, uid) = (namespace.to_string(), name.to_string(), uid.to_string());
    core.after(delay, move |core, cluster| {
        let same = cluster
            .store
            .get::<Job>(&namespace, &name)
            .is_some_and(|j| j.metadata.uid.as_deref() == Some(uid.as_str()));
        if same {
            sync_job(core, cluster, &namespace, &name);
        }
    });
}

/// Why the API server would refuse the Job's next pod, as its error message, if it would: the
/// ServiceAccount admission plugin refuses a pod whose service account does not exist. (The
/// name is the `generateName` prefix: mutating admission runs before a name is generated.)
fn pod_admission_error(cluster: &Cluster, job: &Job) -> Option<String> {
    let namespace = job.metadata.namespace.as_deref().unwrap_or_default();
    let job_name = job.metadata.name.as_deref().unwrap_or_default();
    let spec = job.spec.as_ref()?.template.spec.as_ref()?;
    let account = spec
        .service_account_name
        .as_deref()
        .or(spec.service_account.as_deref())
        .filter(|a| !a.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    if account == DEFAULT_SERVICE_ACCOUNT
        || cluster.store.contains::<ServiceAccount>(namespace, account)
    {
        return None;
    }
    Some(format!(
        "pods \"{job_name}-\" is forbidden: error looking up service account \
         {namespace}/{account}: serviceaccount \"{account}\" not found"
    ))
}

/// Records an Event about `job` as a controller's event recorder does: a repeat of the same
/// type, reason and message on the same object increments `count` and moves `lastTimestamp`;
/// a new one is named `<job>.<hex nanoseconds>`.
pub(crate) fn record_event(
    cluster: &mut Cluster,
    job: &Job,
    type_: &str,
    reason: &str,
    message: &str,
) {
    let namespace = job.metadata.namespace.clone().unwrap_or_default();
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let job_uid = job.metadata.uid.clone();
    let repeat = cluster
        .store
        .list::<Event>(Some(&namespace))
        .into_iter()
        .find(|e| {
            e.involved_object.uid == job_uid
                && e.involved_object.kind.as_deref() == Some("Job")
                && e.type_.as_deref() == Some(type_)
                && e.reason.as_deref() == Some(reason)
                && e.message.as_deref() == Some(message)
        });
    let time = now();
    if let Some(mut event) = repeat {
        event.count = Some(event.count.unwrap_or(1).saturating_add(1));
        event.last_timestamp = Some(time);
        cluster.store.update(event);
        return;
    }
    let mut name = format!("{job_name}.{:x}", time.0.as_nanosecond());
    while cluster.store.contains::<Event>(&namespace, &name) {
        name.push('0');
    }
    let event = Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.clone()),
            uid: Some(uuid::Uuid::new_v4().to_string()),
            creation_timestamp: Some(time.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("batch/v1".to_string()),
            kind: Some("Job".to_string()),
            name: Some(job_name),
            namespace: Some(namespace),
            uid: job_uid,
            resource_version: job.metadata.resource_version.clone(),
            field_path: None,
        },
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        type_: Some(type_.to_string()),
        source: Some(EventSource {
            component: Some("job-controller".to_string()),
            host: None,
        }),
        first_timestamp: Some(time.clone()),
        last_timestamp: Some(time),
        count: Some(1),
        reporting_component: Some("job-controller".to_string()),
        reporting_instance: Some(String::new()),
        ..Event::default()
    };
    cluster.store.create(event);
}

/// Creates the Job's next pod (named `<job>-<5 random characters>`, labelled and owned as the
/// real job controller does) and hands it to the kubelet.
fn create_job_pod(core: &Arc<Core>, cluster: &mut Cluster, job: &Job) {
    let (Some(namespace), Some(job_name), Some(job_uid)) = (
        job.metadata.namespace.clone(),
        job.metadata.name.clone(),
        job.metadata.uid.clone(),
    ) else {
        return;
    };
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let template_metadata = template.metadata.unwrap_or_default();
    let name = generate_name::<Pod>(cluster, &namespace, &format!("{job_name}-"));
    let uid = uuid::Uuid::new_v4().to_string();
    // The API server's defaults fill what the template leaves unset, never what it sets.
    let mut spec: PodSpec = template.spec.unwrap_or_default();
    if spec
        .service_account_name
        .as_deref()
        .is_none_or(str::is_empty)
    {
        spec.service_account_name = Some(
            spec.service_account
                .clone()
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string()),
        );
    }
    spec.priority.get_or_insert(0);
    spec.enable_service_links.get_or_insert(true);
    spec.preemption_policy
        .get_or_insert_with(|| "PreemptLowerPriority".to_string());
    let unschedulable = scheduler::unschedulable(cluster, &spec);
    if unschedulable.is_none() {
        spec.node_name = Some(NODE_NAME.to_string());
    }
    let status = match &unschedulable {
        Some(message) => scheduler::unscheduled_status(message),
        None => kubelet::pending_status(core, &spec, None),
    };
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            generate_name: Some(format!("{job_name}-")),
            namespace: Some(namespace.clone()),
            uid: Some(uid.clone()),
            creation_timestamp: Some(now()),
            generation: Some(1),
            labels: template_metadata.labels,
            annotations: template_metadata.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".to_string(),
                kind: "Job".to_string(),
                name: job_name,
                uid: job_uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        status: Some(status),
        spec: Some(spec),
    };
    cluster.store.create(pod);
    match unschedulable {
        Some(_) => scheduler::retry(core, namespace, name, uid),
        None => kubelet::start(core, namespace, name, uid),
    }
}

/// What deleting a Job answers.
pub(crate) enum JobDeleted {
    /// The Job is gone (Background, Orphan): the API answers with a `Status`.
    Gone(Job),
    /// The Job waits for its pods (Foreground): the API answers with the Job.
    Pending(Job),
}

/// Deletes a Job with the garbage collector's propagation: `Orphan` (the API's default for
/// `batch/v1` Jobs: pods keep running, their owner reference removed), `Background` (Job gone
/// now, pods deleted after) or `Foreground` (pods deleted first, then the Job). Pods are
/// deleted with their own `terminationGracePeriodSeconds`: like the real garbage collector,
/// this does not pass the Job delete's `gracePeriodSeconds` on to them.
pub(crate) fn delete_job(
    core: &Arc<Core>,
    cluster: &mut Cluster,
    namespace: &str,
    name: &str,
    options: &DeleteOptions,
) -> Result<JobDeleted, ApiError> {
    let Some(job) = cluster.store.get::<Job>(namespace, name) else {
        return Err(ApiError::not_found::<Job>(name));
    };
    check_preconditions::<Job>(&job.metadata, options.preconditions.as_ref())?;
    let policy = propagation_policy(options)?;
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let pods = owned_pods(cluster, namespace, &uid);
    match policy {
        Propagation::Orphan => {
            let job = cluster.store.remove::<Job>(namespace, name).unwrap_or(job);
            for mut pod in pods {
                if let Some(refs) = pod.metadata.owner_references.as_mut() {
                    refs.retain(|r| r.uid != uid);
                }
                if pod
                    .metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(Vec::is_empty)
                {
                    pod.metadata.owner_references = None;
                }
                cluster.store.update(pod);
            }
            Ok(JobDeleted::Gone(job))
        }
        Propagation::Background => {
            let job = cluster.store.remove::<Job>(namespace, name).unwrap_or(job);
            for pod in pods {
                begin_pod_deletion(core, cluster, &pod, None);
            }
            Ok(JobDeleted::Gone(job))
        }
        Propagation::Foreground => {
            let mut job = job;
            if job.metadata.deletion_timestamp.is_none() {
                job.metadata.deletion_timestamp = Some(now());
                job.metadata.deletion_grace_period_seconds = Some(0);
                job.metadata
                    .finalizers
                    .get_or_insert_with(Vec::new)
                    .push("foregroundDeletion".to_string());
                job = cluster.store.update(job);
            }
            for pod in pods {
                if pod.metadata.deletion_timestamp.is_none() {
                    begin_pod_deletion(core, cluster, &pod, None);
                }
            }
            sync_job(core, cluster, namespace, name);
            Ok(JobDeleted::Pending(job))
        }
    }
}

enum Propagation {
    Orphan,
    Background,
    Foreground,
}

fn propagation_policy(options: &DeleteOptions) -> Result<Propagation, ApiError> {
    match (
        options.propagation_policy.as_deref(),
        options.orphan_dependents,
    ) {
        (Some("Orphan"), _) => Ok(Propagation::Orphan),
        (Some("Background"), _) => Ok(Propagation::Background),
        (Some("Foreground"), _) => Ok(Propagation::Foreground),
        (Some(other), _) => Err(ApiError::bad_request(&format!(
            "propagationPolicy: Unsupported value: {other:?}: supported values: \"Foreground\", \
             \"Background\", \"Orphan\""
        ))),
        (None, Some(false)) => Ok(Propagation::Background),
        // batch/v1 Jobs orphan their pods unless told otherwise.
        (None, _) => Ok(Propagation::Orphan),
    }
}

/// Fails with 409 Conflict when the delete's preconditions do not hold.
pub(crate) fn check_preconditions<K: Object>(
    metadata: &ObjectMeta,
    preconditions: Option<&Preconditions>,
) -> Result<(), ApiError> {
    let Some(preconditions) = preconditions else {
        return Ok(());
    };
    let name = metadata.name.as_deref().unwrap_or_default();
    if let Some(uid) = &preconditions.uid
        && metadata.uid.as_ref() != Some(uid)
    {
        return Err(ApiError::conflict::<K>(
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                metadata.uid.as_deref().unwrap_or_default()
            ),
        ));
    }
    if let Some(version) = &preconditions.resource_version
        && metadata.resource_version.as_ref() != Some(version)
    {
        return Err(ApiError::conflict::<K>(
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {version}, \
                 ResourceVersion in object meta: {}",
                metadata.resource_version.as_deref().unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// Deletes a pod through the API: see [`begin_pod_deletion`]; then its Job reacts. The
/// delete's propagation policy says what becomes of the objects that name the pod as their
/// owner (see `gc`): `Orphan` (or `orphanDependents`) keeps them, `Foreground` deletes them
/// now, `Background` (the default for pods) lets the collector delete them once the pod is gone.
pub(crate) fn delete_pod(
    core: &Arc<Core>,
    cluster: &mut Cluster,
    namespace: &str,
    name: &str,
    options: &DeleteOptions,
) -> Result<Pod, ApiError> {
    let Some(pod) = cluster.store.get::<Pod>(namespace, name) else {
        return Err(ApiError::not_found::<Pod>(name));
    };
    check_preconditions::<Pod>(&pod.metadata, options.preconditions.as_ref())?;
    if let Some(grace) = options.grace_period_seconds
        && grace < 0
    {
        return Err(ApiError::bad_request(
            "gracePeriodSeconds: Invalid value: must be greater than or equal to 0",
        ));
    }
    // What becomes of the objects the pod owns (see `gc`); for pods, no policy is Background.
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    match (
        options.propagation_policy.as_deref(),
        options.orphan_dependents,
    ) {
        (Some("Orphan"), _) | (None, Some(true)) => gc::orphan_dependents(cluster, namespace, &uid),
        (Some("Foreground"), _) => gc::delete_dependents(core, cluster, namespace, &uid),
        (Some("Background") | None, _) => {}
        (Some(other), _) => {
            return Err(ApiError::bad_request(&format!(
                "propagationPolicy: Unsupported value: {other:?}: supported values: \
                 \"Foreground\", \"Background\", \"Orphan\""
            )));
        }
    }
    let owner = owner(cluster, &pod);
    let pod = begin_pod_deletion(core, cluster, &pod, options.grace_period_seconds);
    if let Some(job) = owner {
        let job_name = job.metadata.name.unwrap_or_default();
        sync_job(core, cluster, namespace, &job_name);
    }
    Ok(pod)
}

/// Deletes a pod as the API server and kubelet do: a pod whose container is not running (not
/// started yet, or ended) goes at once; so does a running one deleted with a grace of 0 (a
/// real API server removes such a pod at once, with `deletionTimestamp` and
/// `deletionGracePeriodSeconds: 0` on its last state, which the `DELETED` event carries with
/// the container still running), its process SIGKILLed behind it, whose end no status reports;
/// another running one gets `deletionTimestamp` = now + grace (`grace`, else its
/// `terminationGracePeriodSeconds`, else 30), SIGTERM and SIGKILL when the grace ends; the
/// kubelet removes it once its process is gone. Returns the pod as it is after the call. A pod
/// deleted before it ended counts as failed for its Job. Does not sync the owner Job.
///
/// While the kubelet is frozen ([`Emulator::freeze_kubelet`](super::Emulator::freeze_kubelet)),
/// a graceful delete of a pod bound to the node that has not ended (running or not) only sets
/// `deletionTimestamp`/`deletionGracePeriodSeconds`, as the API server does: nobody confirms
/// it, so the pod stays, its process untouched, until the kubelet thaws
/// ([`kubelet::thaw`]) or a force delete (grace 0) removes it; an unscheduled or ended pod
/// still goes at once, as on a real API server.
pub(crate) fn begin_pod_deletion(
    core: &Arc<Core>,
    cluster: &mut Cluster,
    pod: &Pod,
    grace: Option<i64>,
) -> Pod {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if !is_terminal(pod) {
        count_outcome(cluster, pod, false);
    }
    let running = cluster
        .containers
        .get(&uid)
        .is_some_and(|c| c.pid.is_some() && !c.reaped);
    let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    // A frozen kubelet confirms nothing: a bound pod that has not ended waits for it.
    let unconfirmed = cluster.kubelet_frozen && bound && !is_terminal(pod);
    if !running && !unconfirmed {
        return cluster
            .store
            .remove::<Pod>(&namespace, &name)
            .unwrap_or_else(|| pod.clone());
    }
    let grace = grace
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30)
        .max(0);
    if grace == 0 {
        kubelet::signal(cluster, &uid, Signal::SIGKILL);
        return cluster
            .store
            .remove_with::<Pod>(&namespace, &name, |last| {
                last.metadata.deletion_timestamp = Some(now());
                last.metadata.deletion_grace_period_seconds = Some(0);
            })
            .unwrap_or_else(|| pod.clone());
    }
    let due = Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(grace))
        .unwrap_or_else(|_| Timestamp::now());
    let already_due = pod.metadata.deletion_timestamp.as_ref().map(|t| t.0);
    let mut updated = pod.clone();
    if already_due.is_none_or(|d| due < d) {
        updated.metadata.deletion_timestamp = Some(Time(due));
        updated.metadata.deletion_grace_period_seconds = Some(grace);
        updated = cluster.store.update(updated);
    }
    if cluster.kubelet_frozen {
        return updated;
    }
    if already_due.is_none() {
        kubelet::signal(cluster, &uid, Signal::SIGTERM);
    }
    kubelet::kill_after(core, uid, Duration::from_secs(grace.unsigned_abs()));
    updated
}

/// The kubelet saw `pod`'s container end (`pod` has its final status): count it for its Job,
/// remove it if it was being deleted, and let its Job react.
pub(crate) fn pod_finished(core: &Arc<Core>, cluster: &mut Cluster, pod: &Pod) {
    let succeeded = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded");
    count_outcome(cluster, pod, succeeded);
    let owner = owner(cluster, pod);
    if pod.metadata.deletion_timestamp.is_some() {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        cluster.store.remove::<Pod>(namespace, name);
    }
    if let Some(job) = owner {
        let namespace = job.metadata.namespace.unwrap_or_default();
        let name = job.metadata.name.unwrap_or_default();
        sync_job(core, cluster, &namespace, &name);
    }
}

/// The kubelet removed a pod that never ran (deleted while pending): let its Job react.
pub(crate) fn pod_removed(core: &Arc<Core>, cluster: &mut Cluster, pod: &Pod) {
    if let Some(job) = owner(cluster, pod) {
        let namespace = job.metadata.namespace.unwrap_or_default();
        let name = job.metadata.name.unwrap_or_default();
        sync_job(core, cluster, &namespace, &name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_must_be_dns_subdomains() {
        assert!(dns_subdomain_problem("worker-1.pool").is_none());
        assert!(dns_subdomain_problem("Worker").is_some());
        assert!(dns_subdomain_problem("-worker").is_some());
        assert!(dns_subdomain_problem("worker_1").is_some());
        assert!(dns_subdomain_problem("a..b").is_some());
        assert!(dns_subdomain_problem(&"a".repeat(254)).is_some());
    }

    #[test]
    fn jobs_orphan_their_pods_unless_told_otherwise() {
        let options = |policy: Option<&str>, orphan: Option<bool>| DeleteOptions {
            propagation_policy: policy.map(str::to_string),
            orphan_dependents: orphan,
            ..DeleteOptions::default()
        };
        assert!(matches!(
            propagation_policy(&options(None, None)),
            Ok(Propagation::Orphan)
        ));
        assert!(matches!(
            propagation_policy(&options(None, Some(false))),
            Ok(Propagation::Background)
        ));
        assert!(matches!(
            propagation_policy(&options(Some("Foreground"), None)),
            Ok(Propagation::Foreground)
        ));
        assert!(propagation_policy(&options(Some("Later"), None)).is_err());
    }
}
