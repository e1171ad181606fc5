//! What a worker pod's status says about its process: still starting or running, exited with a
//! code (Python's convention: the process's own code, `-N` when signal `N` ended it), or unable
//! to start at all.
//!
//! The code comes from the `worker` container's terminated state: its `signal` when the runtime
//! reports one, else its `exitCode`, where `128 + N` (what container runtimes report for a
//! process killed by signal `N`: 137 for `SIGKILL`, 143 for `SIGTERM`) becomes `-N`. A pod that
//! failed without a container state (evicted, deadline exceeded before it started) is `-9`. A
//! container the kubelet cannot start (an image that cannot be pulled, a missing Secret, an
//! invalid image name, or a command the container runtime cannot execute: terminated with
//! reason `StartError` or `ContainerCannotRun`) is reported as unstartable with the kubelet's
//! message, rather than waiting for it forever or passing the runtime's 128 for an exit code.

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

use super::spec::CONTAINER;

/// Terminated reasons of a container whose program never ran (containerd's, Docker's).
const NEVER_RAN: &[&str] = &["StartError", "ContainerCannotRun"];

/// Waiting reasons after which the container will not start without a change by the user.
const UNSTARTABLE: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What a pod says about its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodOutcome {
    /// Not started yet, or running.
    Pending,
    /// Its process ended.
    Exited {
        /// The exit code, Python's way.
        code: i32,
        /// The kubelet's reason when it is worth telling (`OOMKilled`, `DeadlineExceeded`,
        /// `Evicted`...).
        reason: Option<String>,
    },
    /// It will not start: why.
    Unstartable(String),
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
            return exited(terminated);
        }
        if let Some(waiting) = &state.waiting
            && let Some(reason) = &waiting.reason
            && UNSTARTABLE.contains(&reason.as_str())
        {
            let message = waiting.message.as_deref().unwrap_or("");
            return PodOutcome::Unstartable(format!("{reason}: {message}"));
        }
    }
    if status.phase.as_deref() == Some("Failed") {
        return PodOutcome::Exited {
            code: -9,
            reason: Some(status.reason.clone().unwrap_or_else(|| "Failed".into())),
        };
    }
    PodOutcome::Pending
}

fn exited(terminated: &ContainerStateTerminated) -> PodOutcome {
    if let Some(reason) = &terminated.reason
        && NEVER_RAN.contains(&reason.as_str())
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
    let reason = terminated
        .reason
        .clone()
        .filter(|r| !matches!(r.as_str(), "Completed" | "Error"));
    PodOutcome::Exited { code, reason }
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
                reason: Some("Evicted".into())
            }
        );
        let waiting = Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("ImagePullBackOff".into()),
                message: Some("Back-off pulling image \"nope:1\"".into()),
            }),
            ..ContainerState::default()
        });
        assert!(matches!(
            outcome(&pod("Pending", waiting)),
            PodOutcome::Unstartable(m) if m.contains("nope:1")
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
}
