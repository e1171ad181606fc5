//! The key schema.
//!
//! Every key shoal writes has the form `shoal:{<namespace>:<kind>:<id>}:<field>`. The part in
//! braces is the Redis Cluster hash tag: all keys of one object (a process, a pool, a queue...)
//! share it, so one script can touch all of them and the same code runs on a cluster. `kind` is a
//! short word (`proc`, `pool`, `queue`...) and `id` a UUID unless an object names itself.
//! `shoal clean` deletes every key matching [`KeySpace::pattern`].

/// The keys of one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpace {
    namespace: String,
}

impl KeySpace {
    /// The key space of `namespace` (validated by the configuration).
    pub fn new(namespace: impl Into<String>) -> Self {
        KeySpace {
            namespace: namespace.into(),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The keys of the object `kind`/`id`.
    pub fn object(&self, kind: &str, id: &str) -> ObjectKeys {
        ObjectKeys {
            prefix: format!("shoal:{{{}:{}:{}}}", self.namespace, kind, id),
        }
    }

    /// A `SCAN MATCH` pattern for every key of the namespace.
    pub fn pattern(&self) -> String {
        format!("shoal:{{{}:*", self.namespace)
    }
}

/// The keys of one object; they all share one hash tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKeys {
    prefix: String,
}

impl ObjectKeys {
    /// The key of `field`, e.g. `shoal:{default:proc:1234}:task`.
    pub fn key(&self, field: &str) -> String {
        format!("{}:{}", self.prefix, field)
    }

    /// The common prefix `shoal:{<namespace>:<kind>:<id>}`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag() {
        let ks = KeySpace::new("jobs");
        let p = ks.object("proc", "42");
        assert_eq!(p.key("task"), "shoal:{jobs:proc:42}:task");
        assert_eq!(p.key("status"), "shoal:{jobs:proc:42}:status");
        assert_eq!(ks.pattern(), "shoal:{jobs:*");
    }
}
