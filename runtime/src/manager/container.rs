//! What the three proxies share: the handle of one container of a manager (where its keys are,
//! how to run one of its scripts, how its errors read), and how a new one is created.
//!
//! A container's keys are `shoal:{<ns>:manager:<manager id>}:<kind>:<capability>:<field>`: under
//! the manager's hash tag (one script may touch a container and the manager's keys, and
//! `shutdown` deletes everything a page of containers at a time), named by a capability that only
//! holders of the manager's authkey can compute (see the module docs of `manager`). Each
//! container's scripts also get the manager's index and meta (see [`container_keys`]): a refresh
//! of the container's TTLs refreshes theirs and records itself in the index.

use std::marker::PhantomData;
use std::sync::{Arc, LazyLock, OnceLock};

use serde::de::{self, DeserializeOwned};
use serde::{Deserialize, Deserializer, Serialize};
use shoal_core::actors::{BoxFuture, Caller};
use shoal_core::auth;
use shoal_core::clock::now_ms;
use shoal_core::context::{self, AuthKey};
use shoal_core::error::{Error, Result};
use shoal_core::store::{AsyncStore, KeySpace, ObjectKeys, Store};

use super::ManagerAddress;

/// The Lua shared by every container script, put before each one.
pub(super) fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!(
        "{}\n{}",
        include_str!("container_prelude.lua"),
        body
    ))
}

// With the prelude: it records the new container as a refresh of its TTLs does.
static CREATE: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("container_create.lua")));

/// The kind of a container; part of its key names and of its capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Kind {
    Dict,
    List,
    Namespace,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Dict => "dict",
            Kind::List => "list",
            Kind::Namespace => "namespace",
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Kind> {
        match name {
            "dict" => Some(Kind::Dict),
            "list" => Some(Kind::List),
            "namespace" => Some(Kind::Namespace),
            _ => None,
        }
    }

    /// The fields of a container's keys: the head first (it always exists while the container
    /// does), then the others.
    pub(super) fn fields(self) -> &'static [&'static str] {
        match self {
            // The dict's head is its data hash: entries plus '\0v' and '\0r'.
            Kind::Dict => &["data", "order"],
            Kind::List => &["head", "items"],
            // The Namespace's head is its attribute hash.
            Kind::Namespace => &["attrs"],
        }
    }
}

/// The capability naming a container's keys: HMAC-SHA256 of the manager id, the kind and the
/// container id under the manager's authkey, 128 bits in hex.
pub(super) fn capability(authkey: &AuthKey, manager: &str, kind: Kind, id: &str) -> String {
    let tag = auth::sign(
        authkey,
        &[
            b"shoal-manager-container",
            manager.as_bytes(),
            kind.name().as_bytes(),
            id.as_bytes(),
        ],
    );
    tag[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys a container's scripts get: its own ([`own_keys`]), then the manager's container
/// index and its meta.
pub(super) fn container_keys(manager: &ObjectKeys, kind: Kind, capability: &str) -> Vec<String> {
    let mut keys = own_keys(manager, kind, capability);
    keys.push(manager.key(INDEX));
    keys.push(manager.key("meta"));
    keys
}

/// The keys of a container: its fields (see [`Kind::fields`]), head first.
pub(super) fn own_keys(manager: &ObjectKeys, kind: Kind, capability: &str) -> Vec<String> {
    kind.fields()
        .iter()
        .map(|f| manager.key(&format!("{}:{capability}:{f}", kind.name())))
        .collect()
}

/// The field of the manager's container index among its keys: a sorted set of
/// `<kind>:<capability>` ([`index_member`]), one per container, scored by when the container's
/// TTLs were last refreshed (ms). Creations prune the entries of containers that expired, so it
/// does not grow with every container a long-running manager ever made; `shutdown` deletes the
/// containers it lists.
pub(super) const INDEX: &str = "containers";

/// The container a member of the index names (its kind and capability), or `None` for a member
/// shoal did not write.
pub(super) fn index_member(member: &str) -> Option<(Kind, &str)> {
    let (kind, capability) = member.split_once(':')?;
    let kind = Kind::from_name(kind)?;
    let valid = !capability.is_empty() && capability.chars().all(|c| c.is_ascii_hexdigit());
    valid.then_some((kind, capability))
}

/// One container of a manager: a serde value (its address and capability), so that a proxy
/// passed to another process, or stored inside another container, works there.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Container {
    namespace: String,
    manager: String,
    kind: Kind,
    id: String,
    capability: String,
    /// The key names, computed once per handle (and shared by its clones).
    #[serde(skip)]
    cached_keys: Arc<OnceLock<Arc<[String]>>>,
}

impl PartialEq for Container {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.manager, self.kind, &self.id)
            == (&other.namespace, &other.manager, other.kind, &other.id)
    }
}

impl Eq for Container {}

impl std::hash::Hash for Container {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.namespace, &self.manager, self.kind, &self.id).hash(state);
    }
}

impl std::fmt::Debug for Container {
    // The capability is a secret: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What a manager call sends from a task ([`on_runtime`]).
pub(super) enum RuntimeRequest {
    Script(redis::ScriptInvocation<'static>),
    Pipe(redis::Pipeline),
}

/// Sends `request` from a task on its runtime's shared connection (any executor can await it,
/// no thread is parked): the reply, or Redis's error for the caller to describe. The task is
/// the caller's Tokio runtime's when awaited in a task of one (a single request, nothing to
/// undo: see `Context::spawn_near_caller`), else shoal's actor runtime's.
pub(super) async fn on_runtime<R>(request: RuntimeRequest) -> Result<redis::RedisResult<R>>
where
    R: redis::FromRedisValue + Send + 'static,
{
    context::current()?
        .spawn_near_caller(move |store, caller| async move {
            let reply = match store.shared().await {
                // The caller left before this went out (its future dropped right after its
                // first poll, say, while a lock guarding the write is released): nothing is
                // sent, so a write cannot land after what the caller did next.
                Ok(_) if caller.is_gone() => return,
                Ok(mut conn) => Ok(match request {
                    RuntimeRequest::Script(invocation) => invocation.invoke_async(&mut conn).await,
                    RuntimeRequest::Pipe(pipe) => pipe.query_async(&mut conn).await,
                }),
                Err(e) => Err(e),
            };
            caller.finish(reply);
        })
        .await
}

impl Container {
    /// Creates a container of `kind` in the manager at `address` (one round trip):
    /// [`Error::InvalidState`] when the manager was shut down.
    pub(super) fn create(
        address: &ManagerAddress,
        authkey: &AuthKey,
        kind: Kind,
        extra_head_fields: &[(&str, &str)],
    ) -> Result<Container> {
        let store = context::current()?.store().clone();
        let (container, invocation) =
            Self::creation(&store, address, authkey, kind, extra_head_fields);
        let result = store.with_conn(
            || format!("creating {}", container.describe()),
            |c| invocation.invoke::<i64>(c),
        );
        match result {
            Ok(_) => Ok(container),
            Err(e) => Err(super::manager_error(address, e)),
        }
    }

    /// The async form of [`Container::create`]: the same script, sent from shoal's actor
    /// runtime on its shared connection.
    pub(super) fn create_async(
        address: &ManagerAddress,
        authkey: &AuthKey,
        kind: Kind,
        extra_head_fields: &[(&str, &str)],
    ) -> impl Future<Output = Result<Container>> + Send + use<> {
        let prepared = context::current().map(|context| {
            Self::creation(context.store(), address, authkey, kind, extra_head_fields)
        });
        let address = address.clone();
        async move {
            let (container, invocation) = prepared?;
            match on_runtime::<i64>(RuntimeRequest::Script(invocation)).await {
                Ok(Ok(_)) => Ok(container),
                Ok(Err(e)) => Err(super::manager_error(
                    &address,
                    Error::redis(format!("creating {}", container.describe()), e),
                )),
                Err(e) => Err(super::manager_error(&address, e)),
            }
        }
    }

    /// A new container of `kind` and the invocation of the script that creates it.
    fn creation(
        store: &Store,
        address: &ManagerAddress,
        authkey: &AuthKey,
        kind: Kind,
        extra_head_fields: &[(&str, &str)],
    ) -> (Container, redis::ScriptInvocation<'static>) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let container = Container {
            namespace: address.namespace.clone(),
            manager: address.id.clone(),
            kind,
            capability: capability(authkey, &address.id, kind, &id),
            id,
            cached_keys: Arc::default(),
        };
        let mut invocation = CREATE.prepare_invoke();
        for key in container.keys().iter() {
            invocation.key(key);
        }
        invocation
            .arg(now_ms())
            .arg(store.expiry_secs())
            .arg(kind.name());
        for (field, value) in extra_head_fields {
            invocation.arg(*field).arg(*value);
        }
        (container, invocation)
    }

    /// The key names: the container's (head first), then the manager's index and meta.
    pub(super) fn keys(&self) -> Arc<[String]> {
        self.cached_keys
            .get_or_init(|| {
                let manager =
                    KeySpace::new(self.namespace.clone()).object("manager", &self.manager);
                container_keys(&manager, self.kind, &self.capability).into()
            })
            .clone()
    }

    /// `dict 1a2b3c4d of manager 5e6f7a8b`, for messages and as the "key" of codec errors (the
    /// key names carry the capability, which messages must not show).
    pub(super) fn describe(&self) -> String {
        format!(
            "{} {} of manager {}",
            self.kind.name(),
            short(&self.id),
            short(&self.manager)
        )
    }

    /// The error of a container whose keys are gone.
    pub(super) fn gone(&self) -> Error {
        Error::invalid_state(format!(
            "{} no longer exists in Redis: its manager was shut down, or it was unused longer \
             than redis.expiry_secs",
            self.describe()
        ))
    }

    /// Turns a script's error into a clear one.
    pub(super) fn error(&self, e: Error) -> Error {
        let Error::Redis { source, context } = &e else {
            return e;
        };
        match source.code() {
            Some("GONE") => self.gone(),
            _ if is_corruption(source) => Error::invalid_state(format!(
                "{}: its Redis keys hold data shoal did not write ({context}: {source})",
                self.describe()
            )),
            _ => e,
        }
    }

    /// The error for a reply that does not have the shape the script gives (someone else's
    /// script or data).
    pub(super) fn malformed(&self, what: &str) -> Error {
        Error::invalid_state(format!(
            "{}: its Redis keys hold data shoal did not write ({what}: the reply has an \
             unexpected shape)",
            self.describe()
        ))
    }

    /// What a round trip `what` does, for its error messages ("reading dict 1a2b3c4d of
    /// manager 5e6f7a8b").
    fn context(&self, what: &str) -> String {
        format!("{what} {}", self.describe())
    }

    /// The invocation of `call` on this container: its keys, `now` and the TTL, then the
    /// call's arguments. Built when the call is sent, so `now` is the time of sending (a list
    /// write that waited for a sort is built again, with a new `now`).
    fn invocation<R, T>(
        &self,
        store: &Store,
        call: &Call<R, T>,
    ) -> redis::ScriptInvocation<'static> {
        let mut invocation = call.script.prepare_invoke();
        for key in self.keys().iter() {
            invocation.key(key);
        }
        invocation
            .arg(now_ms())
            .arg(store.expiry_secs())
            .arg(&call.args);
        invocation
    }

    /// Sends `call` and reads its reply: one round trip (`EVALSHA`) on the caller's thread.
    pub(super) fn run<R: redis::FromRedisValue, T>(&self, call: Call<R, T>) -> Result<T> {
        let reply = self.send(&call)?;
        call.read(self, reply)
    }

    /// The async form of [`Container::run`]: the same invocation, sent by [`on_runtime`], so the
    /// caller's thread is not blocked; the reply is read by the same `parse`, and errors are mapped
    /// as `run` maps them. The future owns a handle of its own (it borrows nothing); an error
    /// building the call (an encoding error) is its result.
    pub(super) fn run_async<R, T>(
        &self,
        call: Result<Call<R, T>>,
    ) -> impl Future<Output = Result<T>> + Send + use<R, T>
    where
        R: redis::FromRedisValue + Send + 'static,
    {
        let container = self.clone();
        async move {
            let call = call?;
            let reply = container.send_async(&call).await?;
            call.read(&container, reply)
        }
    }

    /// One round trip of `call` on the caller's thread; its reply, not yet parsed.
    pub(super) fn send<R: redis::FromRedisValue, T>(&self, call: &Call<R, T>) -> Result<R> {
        let store = store()?;
        let invocation = self.invocation(&store, call);
        store
            .with_conn(|| self.context(call.what), |c| invocation.invoke(c))
            .map_err(|e| self.error(e))
    }

    /// The async form of [`Container::send`].
    pub(super) async fn send_async<R, T>(&self, call: &Call<R, T>) -> Result<R>
    where
        R: redis::FromRedisValue + Send + 'static,
    {
        let invocation = self.invocation(context::current()?.store(), call);
        match on_runtime(RuntimeRequest::Script(invocation)).await {
            Ok(Ok(reply)) => Ok(reply),
            // As `Store::with_conn` wraps the error of a round trip in `run`.
            Ok(Err(e)) => Err(self.error(Error::redis(self.context(call.what), e))),
            Err(e) => Err(self.error(e)),
        }
    }

    /// As [`Container::send_async`], for a write whose effect must not outlast a caller that
    /// left: the request is sent from a task of shoal's actor runtime (never the caller's
    /// runtime, which may be gone by then) and, when the caller's future was dropped before or
    /// after the reply came (nobody will act on it), `undo` is sent from there in turn, after
    /// the reply (an error is logged).
    pub(super) async fn send_async_or_undo<R, T, U, V>(
        &self,
        call: &Call<R, T>,
        undo: Call<U, V>,
    ) -> Result<R>
    where
        R: redis::FromRedisValue + Send + 'static,
        U: redis::FromRedisValue + Send + 'static,
        V: 'static,
    {
        let context = context::current()?;
        let invocation = self.invocation(context.store(), call);
        let what = self.context(call.what);
        let container = self.clone();
        let reply = context
            .spawn(move |store, caller| async move {
                let reply = match store.shared().await {
                    Ok(mut conn) => invocation
                        .invoke_async::<R>(&mut conn)
                        .await
                        .map_err(|e| Error::redis(what, e)),
                    Err(e) => Err(e),
                };
                match reply {
                    Ok(reply) => caller.hand_over(reply, move |_| -> BoxFuture {
                        Box::pin(async move { container.send_logged(&store, &undo).await })
                    }),
                    Err(e) => caller.finish(Err(e)),
                }
            })
            .await;
        reply.map_err(|e| self.error(e))
    }

    /// Sends `call` from a task of shoal's actor runtime and does not wait for it: the clean-up
    /// of a drop guard, which must not block the thread it runs on (an executor's, maybe). An
    /// error is logged.
    pub(super) fn detach<U, V>(&self, call: Call<U, V>)
    where
        U: redis::FromRedisValue + Send + 'static,
        V: 'static,
    {
        let context = match context::current() {
            Ok(context) => context,
            Err(e) => return self.clean_up_failed(call.what, e),
        };
        let container = self.clone();
        drop(context.spawn(move |store, caller: Caller<()>| async move {
            container.send_logged(&store, &call).await;
            caller.finish(Ok(()));
        }));
    }

    /// Sends the clean-up `call` on `store`'s shared connection (from a task of its runtime);
    /// an error is logged.
    async fn send_logged<U, V>(&self, store: &AsyncStore, call: &Call<U, V>)
    where
        U: redis::FromRedisValue + Send + 'static,
    {
        let invocation = self.invocation(store.store(), call);
        let sent = match store.shared().await {
            Ok(mut conn) => invocation
                .invoke_async::<U>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| Error::redis(self.context(call.what), e)),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            self.clean_up_failed(call.what, e);
        }
    }

    /// Logs a clean-up that failed (`e` as a script gave it, or as [`Container::error`] turned
    /// it): quietly when the container is gone (nothing was left to clean up).
    pub(super) fn clean_up_failed(&self, what: &str, e: Error) {
        let gone = match &e {
            Error::Redis { source, .. } => source.code() == Some("GONE"),
            Error::InvalidState(message) => {
                matches!(self.gone(), Error::InvalidState(gone) if gone == *message)
            }
            _ => false,
        };
        if gone {
            tracing::debug!("{}: {e}", self.context(what));
        } else {
            tracing::warn!("{}: {}", self.context(what), self.error(e));
        }
    }

    /// Encodes a key or value for this container, under `redis.max_message_bytes`.
    pub(super) fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        store()?.encode(value, &self.describe())
    }

    /// Decodes a key or value read from this container.
    pub(super) fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        store()?.decode(bytes, &self.describe())
    }

    /// Decodes with a store at hand (loops).
    pub(super) fn decode_with<T: DeserializeOwned>(
        &self,
        store: &Store,
        bytes: &[u8],
    ) -> Result<T> {
        store.decode(bytes, &self.describe())
    }

    /// Deserializes a container handle and checks that it is of `kind` (a list stored where a
    /// dict proxy is expected is a decode error, not a handle to the wrong keys).
    pub(super) fn deserialize_kind<'de, D: Deserializer<'de>>(
        deserializer: D,
        kind: Kind,
    ) -> std::result::Result<Container, D::Error> {
        let container = Container::deserialize(deserializer)?;
        if container.kind != kind {
            return Err(de::Error::custom(format!(
                "expected a {} proxy, found a {} proxy",
                kind.name(),
                container.kind.name()
            )));
        }
        Ok(container)
    }
}

/// One script call on a container, built and not yet sent: the script, what it does (for error
/// messages), its own arguments (the ones after `now` and the TTL) and how its reply reads.
///
/// Each proxy method builds its call with one function, which its blocking form sends with
/// [`Container::run`] and its async form with [`Container::run_async`]: the request and the
/// reading of the reply are written once, only the transport differs.
pub(super) struct Call<R, T> {
    script: &'static redis::Script,
    what: &'static str,
    args: Vec<Vec<u8>>,
    parse: fn(&Container, R) -> Result<T>,
}

impl<R, T> Call<R, T> {
    /// A call of `script` that does `what` ("reading", "writing"...), its reply (read by redis
    /// as an `R`) turned into the result by `parse`.
    pub(super) fn new(
        script: &'static redis::Script,
        what: &'static str,
        parse: fn(&Container, R) -> Result<T>,
    ) -> Self {
        Call {
            script,
            what,
            args: Vec::new(),
            parse,
        }
    }

    /// Reads the reply of this call.
    pub(super) fn read(self, container: &Container, reply: R) -> Result<T> {
        (self.parse)(container, reply)
    }

    /// Adds an argument (a number, a string, an index...).
    pub(super) fn arg(mut self, arg: impl redis::ToRedisArgs) -> Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// Adds an encoded key or value as one argument (moved, not copied).
    pub(super) fn bytes(mut self, bytes: Vec<u8>) -> Self {
        self.args.push(bytes);
        self
    }

    /// Adds encoded keys or values, each an argument (moved, not copied).
    pub(super) fn all_bytes(mut self, all: Vec<Vec<u8>>) -> Self {
        self.args.extend(all);
        self
    }
}

/// Waits `pause` without blocking the caller's thread, whatever executor polls the future: the
/// timer runs on shoal's actor runtime.
pub(super) async fn pause_async(pause: std::time::Duration) -> Result<()> {
    context::current()?
        .spawn(move |_, caller| async move {
            tokio::time::sleep(pause).await;
            caller.finish(Ok(()));
        })
        .await
}

/// Whether a Redis error says a key holds something shoal did not write.
fn is_corruption(source: &redis::RedisError) -> bool {
    if matches!(source.code(), Some("CORRUPT") | Some("WRONGTYPE")) {
        return true;
    }
    let text = source.to_string();
    text.contains("WRONGTYPE") || text.contains("not an integer") || text.contains("not a valid")
}

/// The first 8 characters of an id, for messages.
pub(super) fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

/// The store of the current runtime.
pub(super) fn store() -> Result<Arc<Store>> {
    Ok(context::current()?.store().clone())
}

/// The type marker of a proxy: `PhantomData` that is `Send + Sync` whatever the types.
pub(super) type Marker<T> = PhantomData<fn() -> T>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_need_the_authkey() {
        let key = AuthKey::from_bytes(b"key".to_vec());
        let other = AuthKey::from_bytes(b"other".to_vec());
        let cap = capability(&key, "m1", Kind::Dict, "c1");
        assert_eq!(cap.len(), 32);
        assert!(cap.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(cap, capability(&key, "m1", Kind::Dict, "c1"));
        for different in [
            capability(&other, "m1", Kind::Dict, "c1"),
            capability(&key, "m2", Kind::Dict, "c1"),
            capability(&key, "m1", Kind::List, "c1"),
            capability(&key, "m1", Kind::Dict, "c2"),
        ] {
            assert_ne!(cap, different);
        }
    }

    #[test]
    fn container_keys_share_the_managers_hash_tag() {
        let manager = KeySpace::new("ns").object("manager", "m1");
        let keys = container_keys(&manager, Kind::Dict, "cap");
        assert_eq!(
            keys,
            [
                "shoal:{ns:manager:m1}:dict:cap:data",
                "shoal:{ns:manager:m1}:dict:cap:order",
                "shoal:{ns:manager:m1}:containers",
                "shoal:{ns:manager:m1}:meta",
            ]
        );
        assert_eq!(container_keys(&manager, Kind::List, "c").len(), 4);
        assert_eq!(container_keys(&manager, Kind::Namespace, "c").len(), 3);
        assert_eq!(own_keys(&manager, Kind::Namespace, "c").len(), 1);
        for kind in [Kind::Dict, Kind::List, Kind::Namespace] {
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_name("queue"), None);
    }

    #[test]
    fn index_members_name_a_container_or_nothing() {
        assert_eq!(index_member("dict:00ff"), Some((Kind::Dict, "00ff")));
        assert_eq!(index_member("namespace:ab"), Some((Kind::Namespace, "ab")));
        for bad in ["", "dict", "dict:", "queue:00", "dict:zz", "dict:00:data"] {
            assert_eq!(index_member(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_handle_of_another_kind_does_not_decode() {
        let container = Container {
            namespace: "ns".into(),
            manager: "m".into(),
            kind: Kind::List,
            id: "c".into(),
            capability: "secret".into(),
            cached_keys: Arc::default(),
        };
        let json = serde_json::to_string(&container).expect("json");
        let mut de = serde_json::Deserializer::from_str(&json);
        let err = Container::deserialize_kind(&mut de, Kind::Dict).expect_err("a list");
        assert!(
            err.to_string()
                .contains("expected a dict proxy, found a list proxy")
        );
        let mut de = serde_json::Deserializer::from_str(&json);
        let same = Container::deserialize_kind(&mut de, Kind::List).expect("a list");
        assert_eq!(same, container);
        assert!(
            !format!("{same:?}").contains("secret"),
            "Debug hides the capability"
        );
    }
}
