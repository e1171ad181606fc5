//! What a worker pod's status says about its process: still starting or running, exited with a
//! code (Python's convention: the process's own code, `-N` when signal `N` ended it), unable to
//! start at all, or not started yet because the kubelet keeps failing to start it.
//!
//! The code comes from the `worker` container's terminated state: its `signal` when the runtime
//! reports one, else its `exitCode`, where `128 + N` (what container runtimes report for a
//! process killed by signal `N`: 137 for `SIGKILL`, 143 for `SIGTERM`) becomes `-N`. A pod that
//! failed without a container state (evicted, deadline exceeded before it started) is `-9`. The
//! reason told with the code is the container's (`OOMKilled`), or the pod's own `status.reason`
//! (`Evicted`, `DeadlineExceeded`, `Shutdown`...) when the container's says nothing more than
//! `Error`, is missing, or is `ContainerStatusUnknown` (the kubelet lost the container: the
//! pod's reason says why).
//!
//! A container whose program can never run as configured is reported as unstartable with the
//! kubelet's message, rather than waited for forever or its runtime's 128 passed for an exit
//! code: an image name that cannot be parsed (`InvalidImageName`), an image that may not be
//! pulled and is not on the node (`ErrImageNeverPull`), a command the container runtime cannot
//! execute (terminated with reason `StartError` or `ContainerCannotRun`). Other failures to
//! start are retried by the kubelet and may clear on their own (a registry's rate limit, a
//! Secret created a moment later), so they are reported as [`PodOutcome::Retrying`]: the
//! executor gives them a grace period before it ends the worker.
//!
//! A worker whose pod a relist of the watch no longer finds (its last events compacted away)
//! ends as its status hash records, else as its Job tells, else waits for its pod ([`absent`]).
//!
//! A pod being deleted (`deletionTimestamp` set) whose container still runs is still
//! [`PodOutcome::Pending`]: its end is the kubelet's to tell, or the pod's going. A kubelet that
//! stopped answering (its node cut off) tells neither, so the executor gives such a pod its
//! grace ([`terminating`]) and a margin, then force-deletes it (see `mod.rs`).

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

use super::spec::CONTAINER;

/// Terminated reasons of a container whose program never ran (containerd's, Docker's).
const NEVER_RAN: &[&str] = &["StartError", "ContainerCannotRun"];

/// Waiting reasons after which the container will not start without a change by the user: the
/// kubelet does not retry them to any effect.
const UNSTARTABLE: &[&str] = &["InvalidImageName", "ErrImageNeverPull"];

/// Waiting reasons of a container the kubelet failed to start and retries (with back-off): a
/// pull refused or rate-limited for now, a Secret or ConfigMap not there yet, a runtime error.
const RETRYING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Container reasons that say no more than "it failed": the pod's reason, if any, says more.
const UNINFORMATIVE: &[&str] = &["Error", "ContainerStatusUnknown"];

/// What a pod says about its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodOutcome {
    /// Not started yet, or running.
    Pending,
    /// Its process ended.
    Exited {
        /// The exit code, Python's way.
        code: i32,
        /// The reason worth telling, if any: the container's (`OOMKilled`...), else the pod's
        /// (`Evicted`, `DeadlineExceeded`, `Shutdown`...).
        reason: Option<String>,
        /// The kubelet lost track of the container (`ContainerStatusUnknown`): `code` is the
        /// kubelet's stand-in (137), not what ended the process.
        lost: bool,
    },
    /// It will not start: why.
    Unstartable(String),
    /// The kubelet failed to start its container and retries: why (reason and message).
    Retrying(String),
    /// The pod failed before its container ever ran (refused by the node's admission, evicted
    /// or past a deadline while pending): why (the pod's reason and message).
    NeverRan(String),
}

/// Reads a pod's status.
pub fn outcome(pod: &Pod) -> PodOutcome {
    let Some(status) = &pod.status else {
        return PodOutcome::Pending;
    };
    let container = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER);
    let state = container.and_then(|c| c.state.as_ref());
    let ran = state.is_some_and(|s| s.running.is_some() || s.terminated.is_some());
    if status.phase.as_deref() == Some("Failed") && !ran {
        let reason = status.reason.as_deref().unwrap_or("Failed");
        return PodOutcome::NeverRan(match status.message.as_deref() {
            Some(message) if !message.is_empty() => format!("{reason}: {message}"),
            _ => reason.to_string(),
        });
    }
    if let Some(state) = state {
        if let Some(terminated) = &state.terminated {
            return exited(terminated, status.reason.as_deref());
        }
        if let Some(waiting) = &state.waiting
            && let Some(reason) = &waiting.reason
        {
            let why = || format!("{reason}: {}", waiting.message.as_deref().unwrap_or(""));
            if UNSTARTABLE.contains(&reason.as_str()) {
                return PodOutcome::Unstartable(why());
            }
            if RETRYING.contains(&reason.as_str()) {
                return PodOutcome::Retrying(why());
            }
        }
    }
    if status.phase.as_deref() == Some("Failed") {
        return PodOutcome::Exited {
            code: -9,
            reason: Some(status.reason.clone().unwrap_or_else(|| "Failed".into())),
            lost: false,
        };
    }
    PodOutcome::Pending
}

/// True once the pod's container has started (it runs or has ended), or the pod has ended.
pub fn started(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    let container_started = status
        .container_statuses
        .iter()
        .flatten()
        .filter(|c| c.name == CONTAINER)
        .filter_map(|c| c.state.as_ref())
        .any(|s| s.running.is_some() || s.terminated.is_some());
    container_started
        || matches!(
            status.phase.as_deref(),
            Some("Running" | "Succeeded" | "Failed")
        )
}

/// Why the scheduler has not placed the pod on a node, while it has not (its `PodScheduled`
/// condition is `False`): the condition's reason and message (`Unschedulable: 0/3 nodes are
/// available: 3 Insufficient cpu...`).
pub fn unscheduled(pod: &Pod) -> Option<String> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    let reason = condition.reason.as_deref().unwrap_or("NotScheduled");
    Some(match condition.message.as_deref() {
        Some(message) if !message.is_empty() => format!("{reason}: {message}"),
        _ => reason.to_string(),
    })
}

/// The grace period of a pod being deleted (`deletionTimestamp` set): its
/// `deletionGracePeriodSeconds` (the API server sets it with the timestamp; missing, 0), by
/// when the kubelet should have stopped its container and confirmed. `None` for a pod that is
/// not being deleted.
pub(crate) fn terminating(pod: &Pod) -> Option<Duration> {
    pod.metadata.deletion_timestamp.as_ref()?;
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
    Some(Duration::from_secs(grace.max(0).unsigned_abs()))
}

/// What a worker's status hash (`shoal:{<ns>:proc:<id>}:status`, see `crate::task`) says of
/// its exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// `state` is `exited` with this `code`: the worker returned from its task and recorded
    /// the code it exits with.
    Exited(i32),
    /// No exit recorded: never claimed, still running, ended before it could record one
    /// (`std::process::exit`, a signal), or the hash expired or was deleted.
    Nothing,
    /// The store could not be read: why.
    Unreadable(String),
}

/// The exit code of a worker whose pod ended without telling how (deleted without a final
/// status, or `ContainerStatusUnknown`): the code its status hash records when it returned from
/// its task, else `fallback` (the signal asked for, else `-9`), a guess, with `true`.
pub(crate) fn unseen_exit(recorded: &Recorded, fallback: i32) -> (i32, bool) {
    match recorded {
        Recorded::Exited(code) => (*code, false),
        Recorded::Nothing | Recorded::Unreadable(_) => (fallback, true),
    }
}

/// Reads the `state` and `code` fields of a status hash.
pub(crate) fn recorded(state: Option<&str>, code: Option<&str>) -> Recorded {
    match (state, code.and_then(|c| c.trim().parse::<i32>().ok())) {
        (Some("exited"), Some(code)) => Recorded::Exited(code),
        _ => Recorded::Nothing,
    }
}

/// What the API server says of a worker's Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum JobState {
    /// Not found, or being deleted before it finished: it makes no pod any more.
    Gone,
    /// Its pod's container exited 0.
    Succeeded,
    /// Its pod failed (with `backoffLimit: 0`, once is the end): the Job's word on why.
    Failed(String),
    /// Neither finished nor being deleted: its pod may not have been made yet.
    Unfinished,
    /// It could not be read: why.
    Unknown(String),
}

/// Reads a Job as it was found (`None`: not found).
pub(crate) fn job_state(job: Option<&Job>) -> JobState {
    let Some(job) = job else {
        return JobState::Gone;
    };
    let status = job.status.as_ref();
    let condition = |type_: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == type_ && c.status == "True"))
    };
    let count = |n: Option<i32>| n.unwrap_or(0) > 0;
    if condition("Complete").is_some() || count(status.and_then(|s| s.succeeded)) {
        return JobState::Succeeded;
    }
    let failed = condition("Failed").or_else(|| condition("FailureTarget"));
    if failed.is_some() || count(status.and_then(|s| s.failed)) {
        let why = failed
            .map(|c| {
                let reason = c.reason.as_deref().unwrap_or("Failed");
                match c.message.as_deref() {
                    Some(message) if !message.is_empty() => format!("{reason}: {message}"),
                    _ => reason.to_string(),
                }
            })
            .unwrap_or_else(|| "its pod failed".to_string());
        return JobState::Failed(why);
    }
    // Deleted before it finished (a stop, a user): the Job controller makes no pod for it.
    if job.metadata.deletion_timestamp.is_some() {
        return JobState::Gone;
    }
    JobState::Unfinished
}

/// What becomes of a worker whose pod a relist of the pod watch did not find.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Absent {
    /// It ended: report `code` (and log `reason`, when there is one).
    Exited {
        /// The exit code, Python's way.
        code: i32,
        /// Why the code is what it is, when it is not the worker's own word.
        reason: Option<String>,
    },
    /// Its pod has not been made yet: the watch will show it.
    Wait,
}

/// Decides the end of a worker whose pod is not in a relist of the pod watch (the watch's
/// history was compacted away, so the pod's last events were never seen): `recorded` is its
/// status hash's word, `job` its Job's (`None` when the hash made asking needless), `seen`
/// whether a pod of it was known before, `asked` the exit code of the stop asked for, if any.
///
/// The worker's own record wins: it is written just before the worker exits with that code.
/// Without it, a Job that succeeded means the container exited 0 (a function that called
/// `std::process::exit(0)`). Otherwise the code is lost with the pod: the stop asked for
/// explains the end if there was one; else `-9`, a guess (what a pod deleted without a final
/// status reports too), told with its reason. A Job still unfinished whose pod was never seen
/// has simply not made it yet; one whose pod was seen makes no other (`backoffLimit: 0`).
pub(crate) fn absent(
    recorded: &Recorded,
    job: Option<&JobState>,
    seen: bool,
    asked: Option<i32>,
) -> Absent {
    if let Recorded::Exited(code) = recorded {
        return Absent::Exited {
            code: *code,
            reason: None,
        };
    }
    let lost = |what: String| match asked {
        Some(code) => Absent::Exited { code, reason: None },
        None => Absent::Exited {
            code: -9,
            reason: Some(format!(
                "{what}, and its status record holds no exit code: the code is unknown, -9 \
                 stands for it"
            )),
        },
    };
    let unknown = JobState::Unknown("not asked".into());
    match job.unwrap_or(&unknown) {
        JobState::Succeeded => Absent::Exited {
            code: 0,
            reason: None,
        },
        JobState::Gone => {
            lost("its pod and its Job were deleted while the pod watch could not see them".into())
        }
        JobState::Failed(why) => lost(format!(
            "its pod was deleted while the pod watch could not see it; its Job failed ({why})"
        )),
        JobState::Unfinished | JobState::Unknown(_) if seen => {
            lost("its pod was deleted while the pod watch could not see it".into())
        }
        JobState::Unfinished | JobState::Unknown(_) => Absent::Wait,
    }
}

fn exited(terminated: &ContainerStateTerminated, pod_reason: Option<&str>) -> PodOutcome {
    let reason = terminated.reason.as_deref();
    if let Some(reason) = reason
        && NEVER_RAN.contains(&reason)
    {
        let message = terminated.message.as_deref().unwrap_or("");
        return PodOutcome::Unstartable(format!("{reason}: {message}"));
    }
    let code = match terminated.signal {
        Some(signal) if signal > 0 => -signal,
        _ => match terminated.exit_code {
            c @ 129..=192 => -(c - 128),
            c => c,
        },
    };
    let lost = reason == Some("ContainerStatusUnknown");
    // "Error" says nothing the code does not; an eviction or a deadline is the pod's to tell.
    let told = match reason {
        None => pod_reason,
        Some(r) if UNINFORMATIVE.contains(&r) => pod_reason.or(Some(r)),
        Some(r) => Some(r),
    };
    let reason = told
        .filter(|r| !matches!(*r, "Completed" | "Error"))
        .map(str::to_string);
    PodOutcome::Exited { code, reason, lost }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateWaiting, ContainerStatus, PodStatus,
    };

    fn pod(phase: &str, state: Option<ContainerState>) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: state.map(|state| {
                    vec![ContainerStatus {
                        name: CONTAINER.into(),
                        state: Some(state),
                        ..ContainerStatus::default()
                    }]
                }),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn terminated(code: i32, reason: &str) -> Option<ContainerState> {
        Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.into()),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        })
    }

    #[test]
    fn exit_codes_follow_python() {
        let exited = |code, reason: Option<&str>| PodOutcome::Exited {
            code,
            reason: reason.map(str::to_string),
            lost: false,
        };
        assert_eq!(
            outcome(&pod("Succeeded", terminated(0, "Completed"))),
            exited(0, None)
        );
        assert_eq!(
            outcome(&pod("Failed", terminated(3, "Error"))),
            exited(3, None)
        );
        assert_eq!(
            outcome(&pod("Failed", terminated(143, "Error"))),
            exited(-15, None)
        );
        assert_eq!(
            outcome(&pod("Failed", terminated(137, "OOMKilled"))),
            exited(-9, Some("OOMKilled"))
        );
        let mut signalled = pod("Failed", terminated(0, "Error"));
        if let Some(s) = signalled
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.as_mut())
        {
            s[0].state
                .as_mut()
                .and_then(|s| s.terminated.as_mut())
                .expect("terminated")
                .signal = Some(2);
        }
        assert_eq!(outcome(&signalled), exited(-2, None));
    }

    fn waiting(reason: &str, message: &str) -> Option<ContainerState> {
        Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(message.into()),
            }),
            ..ContainerState::default()
        })
    }

    #[test]
    fn pending_running_failed_and_unstartable() {
        assert_eq!(outcome(&Pod::default()), PodOutcome::Pending);
        assert_eq!(outcome(&pod("Pending", None)), PodOutcome::Pending);
        let running = Some(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        });
        assert_eq!(outcome(&pod("Running", running)), PodOutcome::Pending);
        let mut evicted = pod("Failed", None);
        if let Some(s) = evicted.status.as_mut() {
            s.reason = Some("Evicted".into());
        }
        assert_eq!(outcome(&evicted), PodOutcome::NeverRan("Evicted".into()));
        let invalid = waiting(
            "InvalidImageName",
            "couldn't parse image name \"Nope:1\": invalid reference format",
        );
        assert!(matches!(
            outcome(&pod("Pending", invalid)),
            PodOutcome::Unstartable(m)
                if m.starts_with("InvalidImageName: ") && m.contains("Nope:1")
        ));
        let never_pull = waiting("ErrImageNeverPull", "image \"nope:1\" is not present");
        assert!(matches!(
            outcome(&pod("Pending", never_pull)),
            PodOutcome::Unstartable(m) if m.starts_with("ErrImageNeverPull: ")
        ));
        let mut never_ran = pod("Failed", terminated(128, "StartError"));
        if let Some(t) = never_ran
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.as_mut())
            .and_then(|c| c[0].state.as_mut())
            .and_then(|s| s.terminated.as_mut())
        {
            t.message = Some("exec: \"/nope\": no such file or directory".into());
        }
        assert_eq!(
            outcome(&never_ran),
            PodOutcome::Unstartable(
                "StartError: exec: \"/nope\": no such file or directory".into()
            )
        );
        let creating = Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ContainerCreating".into()),
                message: None,
            }),
            ..ContainerState::default()
        });
        assert_eq!(outcome(&pod("Pending", creating)), PodOutcome::Pending);
    }

    #[test]
    fn failures_the_kubelet_retries_are_not_final() {
        // A pull refused for now (a registry's rate limit), a Secret not there yet: the kubelet
        // tries again, so these may clear.
        for (reason, message) in [
            ("ErrImagePull", "429 Too Many Requests: toomanyrequests"),
            ("ImagePullBackOff", "Back-off pulling image \"nope:1\""),
            ("CreateContainerConfigError", "secret \"late\" not found"),
            ("CreateContainerError", "context deadline exceeded"),
            ("RunContainerError", "failed to start"),
        ] {
            assert_eq!(
                outcome(&pod("Pending", waiting(reason, message))),
                PodOutcome::Retrying(format!("{reason}: {message}")),
                "{reason}"
            );
        }
    }

    #[test]
    fn the_pods_reason_tells_when_the_containers_does_not() {
        let with_pod_reason = |state, pod_reason: Option<&str>| {
            let mut p = pod("Failed", state);
            if let Some(s) = p.status.as_mut() {
                s.reason = pod_reason.map(str::to_string);
            }
            outcome(&p)
        };
        let exited = |code, reason: Option<&str>, lost| PodOutcome::Exited {
            code,
            reason: reason.map(str::to_string),
            lost,
        };
        assert_eq!(
            with_pod_reason(terminated(137, "Error"), Some("Evicted")),
            exited(-9, Some("Evicted"), false)
        );
        assert_eq!(
            with_pod_reason(terminated(143, "Error"), Some("DeadlineExceeded")),
            exited(-15, Some("DeadlineExceeded"), false)
        );
        let no_reason = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 137,
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        });
        assert_eq!(
            with_pod_reason(no_reason, Some("Shutdown")),
            exited(-9, Some("Shutdown"), false)
        );
        assert_eq!(
            with_pod_reason(terminated(137, "ContainerStatusUnknown"), Some("Evicted")),
            exited(-9, Some("Evicted"), true)
        );
        assert_eq!(
            with_pod_reason(terminated(137, "ContainerStatusUnknown"), None),
            exited(-9, Some("ContainerStatusUnknown"), true)
        );
        // The container's own reason, when it says something, wins.
        assert_eq!(
            with_pod_reason(terminated(137, "OOMKilled"), Some("Evicted")),
            exited(-9, Some("OOMKilled"), false)
        );
        assert_eq!(
            with_pod_reason(terminated(1, "Error"), None),
            exited(1, None, false)
        );
    }

    #[test]
    fn a_pod_that_failed_before_its_container_ran_never_started() {
        // Refused by the node's admission: phase Failed, no container status at all.
        let mut refused = pod("Failed", None);
        if let Some(s) = refused.status.as_mut() {
            s.reason = Some("OutOfcpu".into());
            s.message = Some("Pod Node didn't have enough resource: cpu".into());
        }
        assert_eq!(
            outcome(&refused),
            PodOutcome::NeverRan("OutOfcpu: Pod Node didn't have enough resource: cpu".into())
        );
        // Failed while its container was still waiting (a pull that never succeeded).
        let failed_waiting = pod("Failed", waiting("ImagePullBackOff", "Back-off pulling"));
        assert_eq!(
            outcome(&failed_waiting),
            PodOutcome::NeverRan("Failed".into())
        );
        // A container that ran and ended is an exit, whatever the pod's phase.
        assert!(matches!(
            outcome(&pod("Failed", terminated(137, "Error"))),
            PodOutcome::Exited { code: -9, .. }
        ));
    }

    #[test]
    fn an_end_told_by_no_status_is_the_workers_record_else_a_guess() {
        assert_eq!(unseen_exit(&Recorded::Exited(0), -9), (0, false));
        assert_eq!(unseen_exit(&Recorded::Exited(3), -15), (3, false));
        assert_eq!(unseen_exit(&Recorded::Nothing, -15), (-15, true));
        assert_eq!(unseen_exit(&Recorded::Nothing, -9), (-9, true));
        let unreadable = Recorded::Unreadable("refused".into());
        assert_eq!(unseen_exit(&unreadable, -9), (-9, true));
    }

    #[test]
    fn an_exit_record_counts_only_with_its_code() {
        assert_eq!(recorded(Some("exited"), Some("0")), Recorded::Exited(0));
        assert_eq!(recorded(Some("exited"), Some("-15")), Recorded::Exited(-15));
        // A worker that called `std::process::exit` never records one.
        assert_eq!(recorded(Some("running"), None), Recorded::Nothing);
        assert_eq!(recorded(None, None), Recorded::Nothing);
        assert_eq!(recorded(Some("exited"), None), Recorded::Nothing);
        assert_eq!(recorded(Some("exited"), Some("x")), Recorded::Nothing);
        assert_eq!(recorded(Some("running"), Some("3")), Recorded::Nothing);
    }

    #[test]
    fn a_jobs_status_says_whether_its_pod_ended() {
        use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let with = |status: JobStatus| Job {
            status: Some(status),
            ..Job::default()
        };
        let condition = |type_: &str, reason: &str| JobCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some("Job has reached the specified backoff limit".into()),
            ..JobCondition::default()
        };
        assert_eq!(job_state(None), JobState::Gone);
        assert_eq!(job_state(Some(&Job::default())), JobState::Unfinished);
        let running = with(JobStatus {
            active: Some(1),
            ..JobStatus::default()
        });
        assert_eq!(job_state(Some(&running)), JobState::Unfinished);
        let succeeded = with(JobStatus {
            succeeded: Some(1),
            ..JobStatus::default()
        });
        assert_eq!(job_state(Some(&succeeded)), JobState::Succeeded);
        let complete = with(JobStatus {
            conditions: Some(vec![condition("Complete", "CompletionsReached")]),
            ..JobStatus::default()
        });
        assert_eq!(job_state(Some(&complete)), JobState::Succeeded);
        let failed = with(JobStatus {
            failed: Some(1),
            conditions: Some(vec![condition("Failed", "BackoffLimitExceeded")]),
            ..JobStatus::default()
        });
        assert_eq!(
            job_state(Some(&failed)),
            JobState::Failed(
                "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
            )
        );
        let counted = with(JobStatus {
            failed: Some(1),
            ..JobStatus::default()
        });
        assert_eq!(
            job_state(Some(&counted)),
            JobState::Failed("its pod failed".into())
        );
        // Being deleted before it finished: no pod will come. Finished, it tells how.
        let mut deleting = running.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(job_state(Some(&deleting)), JobState::Gone);
        let mut expiring = succeeded.clone();
        expiring.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(job_state(Some(&expiring)), JobState::Succeeded);
    }

    #[test]
    fn a_pod_the_relist_lacks_ends_by_its_record_else_by_its_job() {
        // (code, whether a reason is logged: the code is a guess), or `None` to wait.
        let exited = |code: i32, guessed: bool| (code, guessed);
        let verdict = |recorded: Recorded, job: Option<JobState>, seen, asked| {
            let decided = absent(&recorded, job.as_ref(), seen, asked);
            match decided {
                Absent::Exited { code, reason } => Some(exited(code, reason.is_some())),
                Absent::Wait => None,
            }
        };
        // The worker's own record wins, whatever else.
        for seen in [false, true] {
            assert_eq!(
                verdict(Recorded::Exited(0), None, seen, None),
                Some(exited(0, false))
            );
            assert_eq!(
                verdict(Recorded::Exited(1), Some(JobState::Gone), seen, Some(-15)),
                Some(exited(1, false))
            );
        }
        // A Job that succeeded: the container exited 0.
        assert_eq!(
            verdict(Recorded::Nothing, Some(JobState::Succeeded), false, None),
            Some(exited(0, false))
        );
        // Gone or failed without a record: the stop asked for, else -9 with its reason.
        for job in [
            JobState::Gone,
            JobState::Failed("BackoffLimitExceeded".into()),
        ] {
            for seen in [false, true] {
                assert_eq!(
                    verdict(Recorded::Nothing, Some(job.clone()), seen, None),
                    Some(exited(-9, true))
                );
                assert_eq!(
                    verdict(Recorded::Nothing, Some(job.clone()), seen, Some(-15)),
                    Some(exited(-15, false))
                );
            }
        }
        // A Job still there: a pod never seen is yet to come; one seen was deleted.
        let unknown = JobState::Unknown("timed out".into());
        for job in [JobState::Unfinished, unknown] {
            let unreadable = Recorded::Unreadable("refused".into());
            assert_eq!(verdict(unreadable, Some(job.clone()), false, None), None);
            assert_eq!(
                verdict(Recorded::Nothing, Some(job.clone()), false, None),
                None
            );
            assert_eq!(
                verdict(Recorded::Nothing, Some(job.clone()), true, None),
                Some(exited(-9, true))
            );
            assert_eq!(
                verdict(Recorded::Nothing, Some(job), true, Some(-9)),
                Some(exited(-9, false))
            );
        }
    }

    #[test]
    fn a_pod_the_scheduler_cannot_place_says_why() {
        use k8s_openapi::api::core::v1::PodCondition;
        let mut p = pod("Pending", None);
        assert_eq!(unscheduled(&p), None);
        assert!(!started(&p));
        let message = "0/3 nodes are available: 3 Insufficient cpu.";
        if let Some(s) = p.status.as_mut() {
            s.conditions = Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some(message.into()),
                ..PodCondition::default()
            }]);
        }
        assert_eq!(unscheduled(&p), Some(format!("Unschedulable: {message}")));
        assert_eq!(outcome(&p), PodOutcome::Pending);
        let running = Some(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        });
        assert!(started(&pod("Running", running)));
        assert!(started(&pod("Failed", terminated(1, "Error"))));
        assert!(!started(&pod("Pending", waiting("ContainerCreating", ""))));
    }

    #[test]
    fn a_pod_being_deleted_runs_until_told_and_has_its_grace() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let running = Some(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..ContainerState::default()
        });
        let mut p = pod("Running", running);
        assert_eq!(terminating(&p), None);
        p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        p.metadata.deletion_grace_period_seconds = Some(30);
        assert_eq!(terminating(&p), Some(Duration::from_secs(30)));
        // Its container still runs as far as the status tells: not an end.
        assert_eq!(outcome(&p), PodOutcome::Pending);
        p.metadata.deletion_grace_period_seconds = None;
        assert_eq!(terminating(&p), Some(Duration::ZERO));
        p.metadata.deletion_grace_period_seconds = Some(-5);
        assert_eq!(terminating(&p), Some(Duration::ZERO));
    }
}
