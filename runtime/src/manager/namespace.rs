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
//! Every method: 1 (a script), and so its async form (`get_async`...; see the `manager` module
//! docs).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::LazyLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_core::error::{Error, Result};

use super::container::{Call, Container, Kind, script, store};

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

    // The calls: each method's request and the reading of its reply, shared by its blocking and
    // its async form.

    fn try_get_call<T: DeserializeOwned>(name: &str) -> Call<Option<Vec<u8>>, Option<T>> {
        Call::new(&GET, "reading", |c, value: Option<Vec<u8>>| {
            value.map(|v| c.decode(&v)).transpose()
        })
        .arg(field(name))
        .arg("0")
    }

    fn set_call<T: Serialize>(&self, name: &str, value: T) -> Result<Call<i64, ()>> {
        let value = self.container.encode(&value)?;
        Ok(Call::new(&SET, "writing", |_, _: i64| Ok(()))
            .arg(field(name))
            .bytes(value))
    }

    /// Deletes attribute `name`: whether it was there.
    fn del_call(name: &str) -> Call<i64, bool> {
        Call::new(&DEL, "writing", |_, deleted: i64| Ok(deleted != 0)).arg(field(name))
    }

    fn contains_call(name: &str) -> Call<i64, bool> {
        Call::new(&GET, "reading", |_, found: i64| Ok(found == 1))
            .arg(field(name))
            .arg("1")
    }

    fn names_call() -> Call<Vec<Vec<u8>>, Vec<String>> {
        Call::new(&ALL, "reading", |c, flat: Vec<Vec<u8>>| {
            Ok(raw(c, flat)?.into_keys().collect())
        })
    }

    fn to_map_call<T: DeserializeOwned>() -> Call<Vec<Vec<u8>>, BTreeMap<String, T>> {
        Call::new(&ALL, "reading", |c, flat: Vec<Vec<u8>>| {
            let store = store()?;
            raw(c, flat)?
                .into_iter()
                .map(|(name, bytes)| Ok((name, c.decode_with(&store, &bytes)?)))
                .collect()
        })
    }

    // The blocking forms.

    /// Attribute `name` (Python's `n.name`); [`Error::KeyError`] naming it when it is missing.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        self.try_get(name)?.ok_or_else(|| Self::missing(name))
    }

    /// Attribute `name`, or `None` when it is missing (Python's `getattr(n, name, None)`).
    pub fn try_get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.container.run(Self::try_get_call(name))
    }

    /// Sets attribute `name` (Python's `n.name = value`).
    pub fn set<T: Serialize>(&self, name: &str, value: T) -> Result<()> {
        self.container.run(self.set_call(name, value)?)
    }

    /// Deletes attribute `name` (Python's `del n.name`); [`Error::KeyError`] when it is missing.
    pub fn del(&self, name: &str) -> Result<()> {
        if self.container.run(Self::del_call(name))? {
            Ok(())
        } else {
            Err(Self::missing(name))
        }
    }

    /// Whether attribute `name` exists (Python's `hasattr(n, name)`).
    pub fn contains(&self, name: &str) -> Result<bool> {
        self.container.run(Self::contains_call(name))
    }

    /// The attributes' names, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        self.container.run(Self::names_call())
    }

    /// Every attribute, each decoded as a `T` (Python's `vars(n)`); [`Error::Codec`] when one
    /// is of another type (use a serde enum, or [`NamespaceProxy::get`] by name, for attributes
    /// of several types).
    pub fn to_map<T: DeserializeOwned>(&self) -> Result<BTreeMap<String, T>> {
        self.container.run(Self::to_map_call())
    }

    // The async forms (see the module docs).

    /// The async form of [`NamespaceProxy::get`]: the same round trip, on shoal's actor
    /// runtime; [`Error::KeyError`] naming the attribute when it is missing.
    pub fn get_async<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<T>> + Send + use<T> {
        let value = self.container.run_async(Ok(Self::try_get_call(name)));
        let missing = Self::missing(name);
        async move { value.await?.ok_or(missing) }
    }

    /// The async form of [`NamespaceProxy::try_get`].
    pub fn try_get_async<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<T>>> + Send + use<T> {
        self.container.run_async(Ok(Self::try_get_call(name)))
    }

    /// The async form of [`NamespaceProxy::set`] (the value is encoded when it is called). A
    /// set whose future is dropped once sent is still applied (once).
    pub fn set_async<T: Serialize>(
        &self,
        name: &str,
        value: T,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        self.container.run_async(self.set_call(name, value))
    }

    /// The async form of [`NamespaceProxy::del`]: [`Error::KeyError`] when the attribute is
    /// missing.
    pub fn del_async(&self, name: &str) -> impl Future<Output = Result<()>> + Send + use<> {
        let deleted = self.container.run_async(Ok(Self::del_call(name)));
        let missing = Self::missing(name);
        async move { if deleted.await? { Ok(()) } else { Err(missing) } }
    }

    /// The async form of [`NamespaceProxy::contains`].
    pub fn contains_async(&self, name: &str) -> impl Future<Output = Result<bool>> + Send + use<> {
        self.container.run_async(Ok(Self::contains_call(name)))
    }

    /// The async form of [`NamespaceProxy::names`].
    pub fn names_async(&self) -> impl Future<Output = Result<Vec<String>>> + Send + use<> {
        self.container.run_async(Ok(Self::names_call()))
    }

    /// The async form of [`NamespaceProxy::to_map`].
    pub fn to_map_async<T: DeserializeOwned>(
        &self,
    ) -> impl Future<Output = Result<BTreeMap<String, T>>> + Send + use<T> {
        self.container.run_async(Ok(Self::to_map_call()))
    }
}

/// The attributes of `namespace_all.lua`'s reply (flat name, value pairs), by name.
fn raw(container: &Container, flat: Vec<Vec<u8>>) -> Result<BTreeMap<String, Vec<u8>>> {
    if !flat.len().is_multiple_of(2) {
        return Err(container.malformed("the attributes"));
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
