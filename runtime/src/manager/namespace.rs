//! [`NamespaceProxy`]: a shared namespace of a [`Manager`](super::Manager) (Python's
//! `manager.Namespace()`): attributes by name, each of any serde type.
//!
//! # Semantics
//!
//! `n.set("name", v)` is Python's `n.name = v`, `n.get::<T>("name")` its `n.name` (a copy),
//! `n.del("name")` its `del n.name`; reading or deleting a missing attribute is
//! [`Error::KeyError`] saying, as Python's `AttributeError` does, `'Namespace' object has no
//! attribute 'name'`. An attribute read as another type than it was written is
//! [`Error::Codec`] naming the type. Unlike Python, names that start with `_` are shared too
//! (Python keeps them on the proxy object, local to one process).
//!
//! # Keys (hash tag `{<ns>:manager:<manager id>}`, capability `<cap>`)
//!
//! `namespace:<cap>:attrs` (hash: `a:<name>` → encoded value, plus `\0v` and `\0r`, which keep
//! the hash, and so the namespace, existing while it has no attribute).
//!
//! # Round trips
//!
//! Every method: 1 (a script).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::LazyLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_core::error::{Error, Result};

use super::container::{Container, Kind, script, store};

static GET: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("namespace_get.lua")));
static SET: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("namespace_set.lua")));
static DEL: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("namespace_del.lua")));
static ALL: LazyLock<redis::Script> = LazyLock::new(|| script(include_str!("namespace_all.lua")));

/// The hash field of attribute `name`.
fn field(name: &str) -> String {
    format!("a:{name}")
}

/// A proxy to a shared namespace of a [`Manager`](super::Manager) (Python's `NamespaceProxy`).
///
/// A serde value: pass it to another process, or store it inside another container.
///
/// ```
/// # fn main() -> shoal::Result<()> {
/// # let _rt = shoal::init()?;
/// let manager = shoal::Manager::new()?;
/// let n = manager.namespace()?;
/// n.set("name", "Bob")?;
/// n.set("age", 42)?;
/// assert_eq!(n.get::<String>("name")?, "Bob");
/// n.del("age")?;
/// assert!(!n.contains("age")?);
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct NamespaceProxy {
    container: Container,
}

impl Debug for NamespaceProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NamespaceProxy({})", self.container.describe())
    }
}

impl Serialize for NamespaceProxy {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.container.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for NamespaceProxy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        Ok(NamespaceProxy {
            container: Container::deserialize_kind(deserializer, Kind::Namespace)?,
        })
    }
}

impl NamespaceProxy {
    pub(super) fn new(container: Container) -> Self {
        NamespaceProxy { container }
    }

    fn missing(name: &str) -> Error {
        Error::KeyError(format!("'Namespace' object has no attribute '{name}'"))
    }

    /// Attribute `name` (Python's `n.name`); [`Error::KeyError`] naming it when it is missing.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        self.try_get(name)?.ok_or_else(|| Self::missing(name))
    }

    /// Attribute `name`, or `None` when it is missing (Python's `getattr(n, name, None)`).
    pub fn try_get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let value: Option<Vec<u8>> = self.container.run(&GET, "reading", |i| {
            i.arg(field(name)).arg("0");
        })?;
        value.map(|v| self.container.decode(&v)).transpose()
    }

    /// Sets attribute `name` (Python's `n.name = value`).
    pub fn set<T: Serialize>(&self, name: &str, value: T) -> Result<()> {
        let value = self.container.encode(&value)?;
        self.container.run::<i64>(&SET, "writing", |i| {
            i.arg(field(name)).arg(value);
        })?;
        Ok(())
    }

    /// Deletes attribute `name` (Python's `del n.name`); [`Error::KeyError`] when it is missing.
    pub fn del(&self, name: &str) -> Result<()> {
        let deleted: i64 = self.container.run(&DEL, "writing", |i| {
            i.arg(field(name));
        })?;
        if deleted == 0 {
            return Err(Self::missing(name));
        }
        Ok(())
    }

    /// Whether attribute `name` exists (Python's `hasattr(n, name)`).
    pub fn contains(&self, name: &str) -> Result<bool> {
        let found: i64 = self.container.run(&GET, "reading", |i| {
            i.arg(field(name)).arg("1");
        })?;
        Ok(found == 1)
    }

    /// The attributes' names, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.raw()?.into_keys().collect())
    }

    /// Every attribute, each decoded as a `T` (Python's `vars(n)`); [`Error::Codec`] when one
    /// is of another type (use a serde enum, or [`NamespaceProxy::get`] by name, for attributes
    /// of several types).
    pub fn to_map<T: DeserializeOwned>(&self) -> Result<BTreeMap<String, T>> {
        let store = store()?;
        self.raw()?
            .into_iter()
            .map(|(name, bytes)| Ok((name, self.container.decode_with(&store, &bytes)?)))
            .collect()
    }

    fn raw(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        let flat: Vec<Vec<u8>> = self.container.run(&ALL, "reading", |_| {})?;
        if !flat.len().is_multiple_of(2) {
            return Err(self.container.malformed("the attributes"));
        }
        let mut out = BTreeMap::new();
        let mut flat = flat.into_iter();
        while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
            let name = String::from_utf8_lossy(&name);
            let name = name.strip_prefix("a:").unwrap_or(&name).to_string();
            out.insert(name, value);
        }
        Ok(out)
    }
}
