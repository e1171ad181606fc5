//! The emulator's scheduler: places a new pod on the emulator's one node ([`NODE_NAME`]) when
//! the pod's `nodeSelector` matches the node's labels, as the real scheduler's node-affinity
//! filter does; otherwise the pod stays `Pending` and unscheduled, with no `nodeName`, no
//! container statuses and the condition `PodScheduled=False` (reason `Unschedulable`, the real
//! scheduler's message), and is tried again every [`SCHEDULE_RETRY`] (a real scheduler retries
//! when the cluster changes: here, when [`Emulator::label_node`](super::Emulator::label_node)
//! gives the node the label it lacked). Other scheduling constraints (resources, affinity,
//! taints) are not emulated: they never keep a pod unscheduled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSpec, PodStatus};

use super::controller::now;
use super::kubelet;
use super::{Cluster, Core, NODE_NAME};

/// How often an unscheduled pod is tried again.
pub(crate) const SCHEDULE_RETRY: Duration = Duration::from_millis(500);

/// The node's labels before any test adds one: the well-known ones a kubelet sets.
pub(crate) fn default_node_labels() -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    BTreeMap::from([
        ("kubernetes.io/arch".to_string(), arch.to_string()),
        ("kubernetes.io/hostname".to_string(), NODE_NAME.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
    ])
}

/// Why the scheduler cannot place a pod with `spec` on the node (its message), if it cannot.
pub(crate) fn unschedulable(cluster: &Cluster, spec: &PodSpec) -> Option<String> {
    let fits = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(key, value)| cluster.node_labels.get(key) == Some(value));
    (!fits).then(|| {
        "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. \
         preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
            .to_string()
    })
}

/// The status of a pod the scheduler could not place: `Pending`, `PodScheduled=False`.
pub(crate) fn unscheduled_status(message: &str) -> PodStatus {
    PodStatus {
        phase: Some("Pending".to_string()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".to_string(),
            status: "False".to_string(),
            reason: Some("Unschedulable".to_string()),
            message: Some(message.to_string()),
            last_probe_time: None,
            last_transition_time: Some(now()),
            ..PodCondition::default()
        }]),
        qos_class: Some("BestEffort".to_string()),
        ..PodStatus::default()
    }
}

/// Tries again, after [`SCHEDULE_RETRY`], to place the unscheduled pod `namespace/name` (uid
/// `uid`): bound to the node and handed to the kubelet once it fits, tried again while it does
/// not, forgotten once it is gone.
pub(crate) fn retry(core: &Arc<Core>, namespace: String, name: String, uid: String) {
    core.after(SCHEDULE_RETRY, move |core, cluster| {
        let Some(mut pod) = cluster
            .store
            .get::<Pod>(&namespace, &name)
            .filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
        else {
            return;
        };
        let spec = pod.spec.clone().unwrap_or_default();
        if unschedulable(cluster, &spec).is_some() {
            retry(core, namespace, name, uid);
            return;
        }
        // Bound: the kubelet takes it from here.
        if let Some(spec) = pod.spec.as_mut() {
            spec.node_name = Some(NODE_NAME.to_string());
        }
        pod.status = Some(kubelet::pending_status(core, &spec, None));
        cluster.store.update(pod);
        kubelet::start(core, namespace, name, uid);
    });
}
