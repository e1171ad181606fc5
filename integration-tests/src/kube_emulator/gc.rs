//! The garbage collector's part for the owner references clients set: a Job, Secret or
//! ServiceAccount that names owners in `metadata.ownerReferences` is deleted once every owner it
//! names is gone, as Kubernetes' garbage collector deletes it (`kube-controller-manager`'s
//! `garbagecollector`). The pods the job controller makes, owned by their Job, are not handled
//! here: deleting a Job deletes or orphans them by its propagation policy (see
//! `controller::delete_job`).
//!
//! Like the real one, it follows the store's changes rather than the API calls (it sees an
//! owner go however it went: an API delete, a force deletion, the kubelet removing a pod whose
//! grace period ended, a TTL), and acts after the change, not within it:
//!
//! * an object of any kind leaves the store: its dependents in its namespace (those with an
//!   owner reference carrying its uid) are looked at;
//! * a Job, Secret or ServiceAccount is created with owner references: it is looked at at once
//!   (the real collector takes an owner it has never seen for one to verify, and deletes a
//!   dependent whose owners turn out to be absent: the owner may have gone before the
//!   dependent was made);
//! * the collector fell behind the change stream (more than its buffer): every object with
//!   owner references is looked at, as after the real one's relist.
//!
//! Looking at a dependent: an owner reference is *absent* when no object of its kind (by group
//! and kind; Pods, Jobs, Secrets, ServiceAccounts, Events) has its name in the dependent's
//! namespace, or the one that has it carries another uid (a new object of the same name owns
//! nothing of its predecessor's); it is *present* otherwise, being deleted included (with
//! background propagation the dependents go after their owner, not while it terminates). An
//! owner of a kind this emulator does not serve cannot be looked up, and counts as present (the
//! real collector fails to resolve it and keeps the dependent). A dependent whose owners are all
//! absent is deleted as the real collector deletes it, with background propagation: a Job goes
//! at once and its pods are then deleted with their own grace period (`SIGTERM`, `SIGKILL` after
//! `terminationGracePeriodSeconds`). One with some owners present only loses its references to
//! the absent ones. A dependent already being deleted is left alone.
//!
//! A pod deleted with `propagationPolicy: Orphan` (or `orphanDependents: true`) orphans its
//! dependents: their references to it are removed at the delete, so nothing here deletes them
//! (a real API server gives the pod the `orphan` finalizer and the collector removes the
//! references before the pod goes). `Foreground` deletes the dependents at the delete, Jobs in
//! the foreground themselves (one with other owners present only loses its reference to the
//! pod), as the real collector treats the dependents of an owner in foreground deletion; but the
//! pod does not wait for them (`blockOwnerDeletion` is not emulated for pods). No
//! `propagationPolicy` is `Background`, the default for pods.

use std::sync::Arc;

use k8s_openapi::Resource;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, OwnerReference};
use serde_json::Value;
use tokio::sync::broadcast;

use super::controller;
use super::store::{Change, ChangeType, Object};
use super::{Cluster, Core};

/// The kinds whose owner references this collector follows.
const DEPENDENT_KINDS: [&str; 3] = [Job::KIND, Secret::KIND, ServiceAccount::KIND];

/// Starts the collector on the emulator's runtime. Call it with the cluster lock held (or
/// before anything is stored): it follows every change made after the call.
pub(crate) fn start(core: &Arc<Core>, cluster: &Cluster) {
    let changes = cluster.store.subscribe();
    let core = Arc::clone(core);
    core.runtime.clone().spawn(follow(core, changes));
}

/// Follows the store's changes until the emulator stops.
async fn follow(core: Arc<Core>, mut changes: broadcast::Receiver<Arc<Change>>) {
    loop {
        let change = changes.recv().await;
        if core.shutting_down() {
            return;
        }
        match change {
            Ok(change) => {
                let mut cluster = core.lock();
                on_change(&core, &mut cluster, &change);
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let mut cluster = core.lock();
                sweep(&core, &mut cluster);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// What one change asks of the collector.
fn on_change(core: &Arc<Core>, cluster: &mut Cluster, change: &Change) {
    match change.change {
        ChangeType::Deleted => {
            let Some(uid) = change
                .object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
            else {
                return;
            };
            for (kind, name) in dependents_of(cluster, &change.namespace, uid) {
                attempt(core, cluster, kind, &change.namespace, &name, None);
            }
        }
        ChangeType::Added if DEPENDENT_KINDS.contains(&change.kind) => {
            if owner_references(&change.object).is_some_and(|refs| !refs.is_empty())
                && let Some(name) = change
                    .object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
            {
                attempt(core, cluster, change.kind, &change.namespace, name, None);
            }
        }
        ChangeType::Added | ChangeType::Modified => {}
    }
}

/// Looks at every object that names owners, in every namespace.
fn sweep(core: &Arc<Core>, cluster: &mut Cluster) {
    let mut owned = Vec::new();
    for kind in DEPENDENT_KINDS {
        for object in cluster.store.list_values(kind, None) {
            if owner_references(&object).is_some_and(|refs| !refs.is_empty()) {
                let at = |path: &str| {
                    object
                        .pointer(path)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                if let (Some(namespace), Some(name)) =
                    (at("/metadata/namespace"), at("/metadata/name"))
                {
                    owned.push((kind, namespace, name));
                }
            }
        }
    }
    for (kind, namespace, name) in owned {
        attempt(core, cluster, kind, &namespace, &name, None);
    }
}

/// The owner references of a stored object (its JSON), if it has any that decode.
fn owner_references(object: &Value) -> Option<Vec<OwnerReference>> {
    let refs = object.pointer("/metadata/ownerReferences")?;
    serde_json::from_value(refs.clone()).ok()
}

/// The objects of `namespace` (kind and name) with an owner reference carrying `uid`.
fn dependents_of(cluster: &Cluster, namespace: &str, uid: &str) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for kind in DEPENDENT_KINDS {
        for object in cluster.store.list_values(kind, Some(namespace)) {
            let owned =
                owner_references(&object).is_some_and(|refs| refs.iter().any(|r| r.uid == uid));
            if owned && let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str) {
                found.push((kind, name.to_string()));
            }
        }
    }
    found
}

/// Looks at the dependent `namespace/name` of `kind`: deletes it when all its owners are
/// absent, drops its references to the absent ones when only some are. `going`: the uid of an
/// owner in foreground deletion, which counts as absent, and whose dependents are deleted in
/// the foreground too (the real collector's way with them).
fn attempt(
    core: &Arc<Core>,
    cluster: &mut Cluster,
    kind: &str,
    namespace: &str,
    name: &str,
    going: Option<&str>,
) {
    let deleting = match kind {
        "Job" => verdict::<Job>(cluster, namespace, name, going),
        "Secret" => verdict::<Secret>(cluster, namespace, name, going),
        "ServiceAccount" => verdict::<ServiceAccount>(cluster, namespace, name, going),
        _ => false,
    };
    if !deleting {
        return;
    }
    match kind {
        "Job" => {
            let policy = if going.is_some() {
                "Foreground"
            } else {
                "Background"
            };
            let options = DeleteOptions {
                propagation_policy: Some(policy.to_string()),
                ..DeleteOptions::default()
            };
            // Gone meanwhile is fine: it was what this wanted.
            let _ = controller::delete_job(core, cluster, namespace, name, &options);
        }
        "Secret" => {
            cluster.store.remove::<Secret>(namespace, name);
        }
        "ServiceAccount" => {
            cluster.store.remove::<ServiceAccount>(namespace, name);
        }
        _ => {}
    }
}

/// [`attempt`]'s decision for an object of type `K`: true when it is to be deleted (all its
/// owners are absent); with only some absent, drops its references to them here.
fn verdict<K: Object>(
    cluster: &mut Cluster,
    namespace: &str,
    name: &str,
    going: Option<&str>,
) -> bool {
    let Some(mut object) = cluster.store.get::<K>(namespace, name) else {
        return false;
    };
    if object.metadata().deletion_timestamp.is_some() {
        return false;
    }
    let refs = object
        .metadata()
        .owner_references
        .clone()
        .unwrap_or_default();
    let absent: Vec<String> = refs
        .iter()
        .filter(|r| going == Some(r.uid.as_str()) || !owner_present(cluster, namespace, r))
        .map(|r| r.uid.clone())
        .collect();
    if absent.is_empty() {
        return false;
    }
    if absent.len() == refs.len() {
        return true;
    }
    let kept: Vec<OwnerReference> = refs
        .into_iter()
        .filter(|r| !absent.contains(&r.uid))
        .collect();
    object.metadata_mut().owner_references = Some(kept);
    cluster.store.update(object);
    false
}

/// Whether the owner `reference` names, in `namespace`, is there (see the module docs: an
/// owner of a kind this emulator does not serve counts as present).
fn owner_present(cluster: &Cluster, namespace: &str, reference: &OwnerReference) -> bool {
    let group = match reference.api_version.split_once('/') {
        Some((group, _)) => group,
        None => "",
    };
    let name = reference.name.as_str();
    let uid = match (group, reference.kind.as_str()) {
        ("", "Pod") => uid_of::<Pod>(cluster, namespace, name),
        ("batch", "Job") => uid_of::<Job>(cluster, namespace, name),
        ("", "Secret") => uid_of::<Secret>(cluster, namespace, name),
        ("", "ServiceAccount") => uid_of::<ServiceAccount>(cluster, namespace, name),
        ("", "Event") => uid_of::<Event>(cluster, namespace, name),
        _ => return true,
    };
    uid.as_deref() == Some(reference.uid.as_str())
}

/// The uid of `namespace/name` of kind `K`, if it exists.
fn uid_of<K: Object>(cluster: &Cluster, namespace: &str, name: &str) -> Option<String> {
    cluster
        .store
        .get::<K>(namespace, name)
        .and_then(|o| o.metadata().uid.clone())
}

/// A pod deleted with `Orphan` propagation: its dependents' references to it (`uid`) go, so
/// that the collector leaves them when the pod goes.
pub(crate) fn orphan_dependents(cluster: &mut Cluster, namespace: &str, uid: &str) {
    for (kind, name) in dependents_of(cluster, namespace, uid) {
        match kind {
            "Job" => drop_reference::<Job>(cluster, namespace, &name, uid),
            "Secret" => drop_reference::<Secret>(cluster, namespace, &name, uid),
            "ServiceAccount" => drop_reference::<ServiceAccount>(cluster, namespace, &name, uid),
            _ => {}
        }
    }
}

/// Removes the owner reference carrying `uid` from `namespace/name` of kind `K` (the field
/// left out once empty, as the API writes it).
fn drop_reference<K: Object>(cluster: &mut Cluster, namespace: &str, name: &str, uid: &str) {
    let Some(mut object) = cluster.store.get::<K>(namespace, name) else {
        return;
    };
    let metadata = object.metadata_mut();
    if let Some(refs) = metadata.owner_references.as_mut() {
        refs.retain(|r| r.uid != uid);
    }
    if metadata
        .owner_references
        .as_ref()
        .is_some_and(Vec::is_empty)
    {
        metadata.owner_references = None;
    }
    cluster.store.update(object);
}

/// A pod deleted with `Foreground` propagation: its dependents (`uid`) are deleted now (in the
/// foreground), or lose their reference to it if they have other owners, as the collector
/// treats the dependents of an owner in foreground deletion.
pub(crate) fn delete_dependents(
    core: &Arc<Core>,
    cluster: &mut Cluster,
    namespace: &str,
    uid: &str,
) {
    for (kind, name) in dependents_of(cluster, namespace, uid) {
        attempt(core, cluster, kind, namespace, &name, Some(uid));
    }
}
