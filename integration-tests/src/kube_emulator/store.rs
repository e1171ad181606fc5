//! The emulator's object store, playing etcd plus the API server's watch cache.
//!
//! Objects are kept as the JSON the API sends (`k8s-openapi` serialization), keyed by kind,
//! namespace and name. One counter is the resource version of the whole store, as etcd's
//! revision is: every create, update and delete takes the next value, stamps it on the object
//! (`metadata.resourceVersion`, also on the final state a delete reports) and records a
//! [`Change`]. The last [`HISTORY`] changes are kept so a watch can resume from a resource
//! version; older ones are "compacted" (a watch from before them gets `410 Gone`, as from a real
//! server). Every change is also broadcast to the open watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::broadcast;

/// How many changes a watch can resume across.
pub(crate) const HISTORY: usize = 10_000;

/// A Kubernetes object type the store holds.
pub(crate) trait Object:
    Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + Clone + Send + 'static
{
}

impl<K> Object for K where
    K: Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + Clone + Send + 'static
{
}

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change to one object.
#[derive(Debug)]
pub(crate) struct Change {
    /// The store's resource version after the change.
    pub(crate) resource_version: u64,
    /// The object's kind (`Pod`, `Job`, ...).
    pub(crate) kind: &'static str,
    pub(crate) namespace: String,
    pub(crate) change: ChangeType,
    /// The object after the change (for a delete: its last state, with the delete's version).
    pub(crate) object: Arc<Value>,
    /// The object before the change (none for a create), so a watch with a selector can tell
    /// an object that stopped matching (sent as DELETED) or started matching (ADDED).
    pub(crate) previous: Option<Arc<Value>>,
}

type Key = (&'static str, String, String);

/// The objects, the resource version counter and the recent changes.
pub(crate) struct Store {
    resource_version: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// Changes up to this version are no longer in `history`.
    compacted_through: u64,
    changes: broadcast::Sender<Arc<Change>>,
}

/// The recorded changes after a version, and a receiver of the later ones.
pub(crate) type Replay = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>);

/// A watch asked to resume from a version whose changes were compacted away.
#[derive(Debug)]
pub(crate) struct Expired {
    pub(crate) requested: u64,
    pub(crate) oldest: u64,
}

impl Store {
    pub(crate) fn new() -> Store {
        let (changes, _) = broadcast::channel(4096);
        Store {
            resource_version: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_through: 1,
            changes,
        }
    }

    /// The store's current resource version.
    pub(crate) fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// The object `namespace/name` of kind `K`.
    pub(crate) fn get<K: Object>(&self, namespace: &str, name: &str) -> Option<K> {
        let value = self.objects.get(&key::<K>(namespace, name))?;
        decode(value)
    }

    /// The objects of kind `K` in `namespace` (all namespaces for `None`), by namespace and name.
    pub(crate) fn list<K: Object>(&self, namespace: Option<&str>) -> Vec<K> {
        self.list_values(K::KIND, namespace)
            .iter()
            .filter_map(|v| decode(v))
            .collect()
    }

    /// Like [`Store::list`], as the stored JSON.
    pub(crate) fn list_values(
        &self,
        kind: &'static str,
        namespace: Option<&str>,
    ) -> Vec<Arc<Value>> {
        self.objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| Arc::clone(v))
            .collect()
    }

    /// True when `namespace/name` of kind `K` exists.
    pub(crate) fn contains<K: Object>(&self, namespace: &str, name: &str) -> bool {
        self.objects.contains_key(&key::<K>(namespace, name))
    }

    /// Stores a new object (the caller checked that the name is free) and returns it as stored.
    pub(crate) fn create<K: Object>(&mut self, object: K) -> K {
        self.write(object, ChangeType::Added)
    }

    /// Replaces an existing object and returns it as stored.
    pub(crate) fn update<K: Object>(&mut self, object: K) -> K {
        self.write(object, ChangeType::Modified)
    }

    /// Removes `namespace/name`, returning its last state (stamped with the delete's version).
    pub(crate) fn remove<K: Object>(&mut self, namespace: &str, name: &str) -> Option<K> {
        self.remove_with(namespace, name, |_: &mut K| {})
    }

    /// Removes `namespace/name` as [`Store::remove`] does, its last state edited by `last` first
    /// (what the `DELETED` event carries and the call returns: one change, no `MODIFIED` before).
    pub(crate) fn remove_with<K: Object>(
        &mut self,
        namespace: &str,
        name: &str,
        last: impl FnOnce(&mut K),
    ) -> Option<K> {
        let previous = self.objects.remove(&key::<K>(namespace, name))?;
        let mut object: K = decode(&previous)?;
        last(&mut object);
        self.resource_version += 1;
        object.metadata_mut().resource_version = Some(self.resource_version.to_string());
        let value = Arc::new(encode(&object));
        self.record(Change {
            resource_version: self.resource_version,
            kind: K::KIND,
            namespace: namespace.to_string(),
            change: ChangeType::Deleted,
            object: value,
            previous: Some(previous),
        });
        Some(object)
    }

    fn write<K: Object>(&mut self, mut object: K, change: ChangeType) -> K {
        self.resource_version += 1;
        object.metadata_mut().resource_version = Some(self.resource_version.to_string());
        let namespace = object.metadata().namespace.clone().unwrap_or_default();
        let name = object.metadata().name.clone().unwrap_or_default();
        let value = Arc::new(encode(&object));
        let previous = self
            .objects
            .insert((K::KIND, namespace.clone(), name), Arc::clone(&value));
        self.record(Change {
            resource_version: self.resource_version,
            kind: K::KIND,
            namespace,
            change,
            object: value,
            previous,
        });
        object
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(Arc::clone(&change));
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted_through = old.resource_version;
            }
        }
        // No receiver is fine: nobody watches.
        let _ = self.changes.send(change);
    }

    /// The changes after `resource_version` and a receiver of the later ones, taken together so
    /// that none is missed or seen twice.
    pub(crate) fn changes_since(&self, resource_version: u64) -> Result<Replay, Expired> {
        if resource_version < self.compacted_through {
            return Err(Expired {
                requested: resource_version,
                oldest: self.compacted_through,
            });
        }
        let past = self
            .history
            .iter()
            .filter(|c| c.resource_version > resource_version)
            .cloned()
            .collect();
        Ok((past, self.changes.subscribe()))
    }

    /// Forgets every recorded change, as etcd's compaction does: a watch from a version before
    /// the current one gets `410 Gone` (see [`Store::changes_since`]).
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted_through = self.resource_version;
    }

    /// A receiver of the changes after now.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }
}

fn key<K: Object>(namespace: &str, name: &str) -> Key {
    (K::KIND, namespace.to_string(), name.to_string())
}

/// The JSON of an object as the API sends it.
pub(crate) fn encode<K: Serialize>(object: &K) -> Value {
    // k8s-openapi types always serialize (maps with string keys, no non-finite floats).
    serde_json::to_value(object).unwrap_or(Value::Null)
}

fn decode<K: Object>(value: &Value) -> Option<K> {
    match K::deserialize(value) {
        Ok(object) => Some(object),
        Err(e) => {
            tracing::error!(kind = K::KIND, "stored object does not decode: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;

    fn secret(name: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    #[test]
    fn every_write_takes_the_next_version_and_is_recorded() {
        let mut store = Store::new();
        let start = store.resource_version();
        let created = store.create(secret("a"));
        assert_eq!(
            created.metadata.resource_version,
            Some((start + 1).to_string())
        );
        let updated = store.update(created);
        assert_eq!(
            updated.metadata.resource_version,
            Some((start + 2).to_string())
        );
        let removed = store.remove::<Secret>("default", "a").expect("removed");
        assert_eq!(
            removed.metadata.resource_version,
            Some((start + 3).to_string())
        );
        assert!(store.get::<Secret>("default", "a").is_none());
        let (changes, _) = store.changes_since(start + 1).expect("kept");
        let kinds: Vec<_> = changes.iter().map(|c| c.change).collect();
        assert_eq!(kinds, [ChangeType::Modified, ChangeType::Deleted]);
        assert!(changes[1].previous.is_some());
    }

    #[test]
    fn a_watch_from_before_the_history_has_expired() {
        let mut store = Store::new();
        for i in 0..HISTORY + 5 {
            store.create(secret(&format!("s{i}")));
        }
        assert!(store.changes_since(2).is_err());
        let recent = store.resource_version() - 3;
        let (changes, _) = store.changes_since(recent).expect("recent");
        assert_eq!(changes.len(), 3);
    }

    #[test]
    fn after_a_compaction_only_a_watch_from_now_resumes() {
        let mut store = Store::new();
        store.create(secret("a"));
        let before = store.resource_version();
        store.create(secret("b"));
        store.compact();
        assert!(store.changes_since(before).is_err());
        let (changes, _) = store
            .changes_since(store.resource_version())
            .expect("current");
        assert!(changes.is_empty());
        store.create(secret("c"));
        let (changes, _) = store
            .changes_since(store.resource_version() - 1)
            .expect("after the compaction");
        assert_eq!(changes.len(), 1);
    }
}
