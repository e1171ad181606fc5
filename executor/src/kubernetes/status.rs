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
    if let Some(state) = container.and_then(|c| c.state.as_ref()) {
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
        assert_eq!(
            outcome(&evicted),
            PodOutcome::Exited {
                code: -9,
                reason: Some("Evicted".into()),
                lost: false,
            }
        );
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
}
