//! [`Manager`]: Python's `multiprocessing.Manager()` — shared containers (`dict`, `list`,
//! `Namespace`) and the shared primitives, reachable from any process by proxy.
//!
//! # How it maps to Python's
//!
//! Python's manager is a server process that holds the objects and answers each proxy call over
//! a socket. shoal has no server process: a manager is a record in Redis, each container lives
//! in Redis under the manager's hash tag, and each proxy operation is one Lua script, run
//! atomically by Redis (the "one message at a time" of Python's server, with nothing that can
//! die). So:
//!
//! * [`Manager::new`] (Python's `Manager()`, started) records a manager; [`Manager::address`] is
//!   a serde value another process or machine that reaches the same Redis passes to
//!   [`Manager::connect`] with the authkey (Python's `BaseManager(address, authkey).connect()`).
//! * [`Manager::dict`], [`Manager::list`], [`Manager::namespace`] create containers and return
//!   proxies ([`DictProxy`], [`ListProxy`], [`NamespaceProxy`]), with Python's semantics (see
//!   each module). A proxy is a serde value: passed to a child process (as a `Process` or `Pool`
//!   argument), or stored as a value inside another container (`DictProxy<String, DictProxy<..>>`,
//!   Python's nested proxies), it decodes as a live proxy to the same container. A value fetched
//!   is a copy: changing it changes nothing shared.
//! * [`Manager::queue`], [`Manager::lock`], [`Manager::event`]... return shoal's own primitives,
//!   which are shared by address already, so code written for Python's manager ports directly.
//!   They are not tied to the manager: [`Manager::shutdown`] leaves them working (until their
//!   keys expire), where Python's die with its server.
//! * [`Manager::register`] and [`Manager::create`]: user types, hosted as durable actors, with
//!   typed proxies (Python's `register(typeid, callable)`, `exposed`, `method_to_typeid`; see
//!   the `registered` module's docs).
//! * Every mutating operation is one script: atomic, with no read-modify-write across round trips
//!   (Lithops' manager reads, changes and writes back under a lock). The hot path is one round
//!   trip: `get` and `set` of a dict, `get`, `set` and `append` of a list, a namespace
//!   attribute.
//!
//! # Async forms
//!
//! Every proxy method that makes round trips has an async twin named `<method>_async`
//! ([`DictProxy::get_async`], [`ListProxy::append_async`], [`NamespaceProxy::set_async`]...):
//! the same script with the same arguments, its reply read by the same code and its errors
//! mapped the same way (a missing key is [`Error::KeyError`], an index outside a list
//! [`Error::IndexError`]), only sent from a task on a shared multiplexed connection, so the
//! caller's thread is never blocked and any executor can await the future (it borrows neither
//! the proxy nor the key: keys and values are encoded when the method is called, the script's
//! `now` is taken when it is sent). The task is one of the caller's Tokio runtime when the
//! future is awaited in a task of one with IO and timers (on connections opened there: see
//! [`ActorRef::tell_async`](crate::ActorRef::tell_async) for what that implies), else one of
//! shoal's actor runtime. An async list write that
//! meets another process's sort waits for it as the blocking form does, its pauses timed on the
//! actor runtime; [`ListProxy::sort_by_async`] runs `compare` in the caller's task between its
//! two round trips (its first, which freezes the list, always from a task of the actor runtime:
//! a dropped sort lifts its freeze from there). A write whose future is dropped before its task
//! sent it is not sent (so it cannot land after what the caller does next, such as releasing a
//! lock that guards it); one dropped after it was sent is still applied, once, and may reach
//! Redis after a release sent on another connection right after the drop.
//! The page-by-page iterators ([`DictProxy::iter`], [`ListProxy::iter`]) have async forms that
//! read a page per round trip ([`DictProxy::iter_async`], [`ListProxy::iter_async`]: a
//! [`DictStream`], a [`ListStream`], each a [`futures::Stream`] with a `next` of its own);
//! [`DictProxy::items_async`] and [`ListProxy::to_vec_async`] read everything in one round trip.
//!
//! # Lifetime
//!
//! [`Manager::shutdown`] deletes the manager's keys (its record and every container, whichever
//! process made it); proxies used afterwards get [`Error::InvalidState`] saying the container no
//! longer exists. Dropping a [`Manager`] value does not shut it down (proxies elsewhere may still
//! use it, and a Rust value is dropped where Python's reference counting would keep the manager
//! alive): a manager made by [`Manager::new`] is shut down when the runtime of the process that
//! made it ends (`shoal::init`'s [`Runtime`](crate::Runtime) is dropped, or the task of a worker
//! that made it ends, as Python shuts its manager down when the creator exits), unless
//! [`Manager::shutdown`] did it before. In a pool worker, a manager a task made is shut down at
//! the end of the batch of tasks the worker ran with it (before their results are sent); one
//! made outside a task (by the pool's initializer, as Python's `Pool(initializer=...)` making a
//! manager kept in a global) lives as long as the worker: it is shut down when the worker process exits (`maxtasksperchild` reached, the pool closed and
//! joined), or, for a pool whose workers are threads of this process, when that worker thread
//! ends. A worker killed by a signal (`terminate()` sends `SIGTERM`) runs no exit code: its
//! managers' keys expire after `redis.expiry_secs`. A pool whose workers are threads shuts down
//! only the managers its workers made, never the driver's. A manager a task's own thread child
//! makes is not the task's: it lives until the worker process ends. A connected manager
//! ([`Manager::connect`]) never shuts it down (Python's connected managers have no `shutdown`).
//! A shutdown that failed half way (a connection lost) can be called again: it goes on with
//! what is left (the record, deleted last, still lists it).
//! As every shoal key, a manager's keys expire after `redis.expiry_secs` without use; every use
//! refreshes them (a container's keys and the manager's index and record with the container's
//! operations, at most once a tenth of `redis.expiry_secs`; the record with `publish`,
//! `lookup`, `connect`, `register`, `create` and the making of a container or a primitive), in
//! the request the use sends anyway. Every write of the record is a script that checks the
//! manager runs first, so none can come after a shutdown and make the record again.
//!
//! # Authentication
//!
//! A manager is made with an authkey: the creator's `current_process().authkey` (inherited by its
//! children, as Python's) or the one given to [`Manager::with_authkey`]. Its record holds a random
//! nonce and a verifier, HMAC-SHA256 of its id and the nonce under the authkey;
//! [`Manager::connect`] recomputes it and, with another authkey, fails with
//! [`Error::Authentication`] having read the record and changed nothing in it (the read refreshes
//! its TTL, as any use does). Each container's keys are named by a capability, HMAC-SHA256 of
//! the container's id under the authkey: only holders of the authkey (or of a proxy, which
//! carries the capability) can address a container. (The manager's container index lists the
//! capabilities, so that `shutdown` finds the containers; like every key, it is readable only by
//! those who can run commands on the Redis server, the boundary the next paragraph describes.)
//!
//! That is where the checks are: at connect, and by capability. Python checks the authkey when a
//! connection opens and then trusts the connection; shoal cannot check a per-message MAC either,
//! since the check would have to run inside the Redis script, which cannot hold the key. Redis's
//! own access control (ACL users, TLS, a private network) is the real boundary: anyone who can
//! run commands on the Redis server can read and change every key, and a manager's keys are no
//! exception.
//!
//! # Keys (hash tag `{<ns>:manager:<manager id>}`)
//!
//! `meta` (hash: `state` = `running` | `shutdown`, `nonce`, `verifier`, `t:<typeid>` per
//! registered type and `a:<actor id>` per instance of one (see the `registered` module), and
//! `o:<name>` per published value); `containers`, the index (sorted set: `<kind>:<capability>`
//! per container, scored by when the container's TTLs were last refreshed, ms), so that
//! `shutdown` finds the containers: making a container prunes the entries not refreshed for
//! twice `redis.expiry_secs` (their keys expired), so the index holds the live containers, not
//! every one a long-running manager ever made; and each container's keys,
//! `<kind>:<capability>:<field>` (see `dict.rs`, `list.rs`, `namespace.rs`). All share the
//! manager's hash tag, so that one script sees a container and the manager's keys, and
//! `shutdown` deletes them with pipelined `DEL`s, a page of containers per round trip; on Redis
//! Cluster a manager's containers live on one shard (as Python's live in one server process).
//!
//! # Round trips
//!
//! `new`: 1. `connect`: 1 (a read). `dict`/`list`/`namespace`: 1 (a script that checks the manager
//! runs and records the container); `dict_from`/`list_from`: 2. `queue`, `lock`...: 1 (is the
//! manager running?) plus the primitive's creation. `register`: 1 (a script). `create`: 2 (a
//! read, then a script that records the instance) plus the instance's creation, and its stop
//! when the record is refused (see the `registered` module). `shutdown`: 2 (a script that marks
//! the manager shut down, then the deletion) for fewer than 500 containers, 1 more per further
//! 500, plus the stop message sent to each registered-type instance. Each proxy operation: see
//! its module (1, except `ListProxy::sort`), the same for its async form. `publish`, `lookup`: 1.
//! The async forms make the same round trips.

mod container;
pub mod dict;
pub mod list;
pub mod namespace;
mod registered;
mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Once};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_core::auth;
use shoal_core::context::{self, AuthKey};
use shoal_core::error::{Error, Result};
use shoal_core::store::{KeySpace, ObjectKeys};
use shoal_primitives::{
    Array, Barrier, BoundedSemaphore, Condition, Event, JoinableQueue, Lock, Queue, RLock, Scalar,
    Semaphore, Value,
};

use container::{Container, Kind, RuntimeRequest, on_runtime, short};
pub use dict::{DictIter, DictProxy};
pub use list::{ListIter, ListProxy};
pub use namespace::NamespaceProxy;
pub use stream::{DictStream, ListStream};

static CREATE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("manager_create.lua")));
static RECORD: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("manager_record.lua")));
static SHUTDOWN: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("manager_shutdown.lua")));

/// Where a manager is: its namespace and id (Python's manager `address`). A serde value: pass
/// it to another process, or to a program on another machine that reaches the same Redis, which
/// calls [`Manager::connect`] with it and the authkey.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ManagerAddress {
    namespace: String,
    id: String,
}

impl ManagerAddress {
    /// The namespace (`shoal.namespace`) the manager's keys are in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The manager's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The address as text, `shoal-manager://<namespace>/<id>`, to hand to a program that is
    /// not a child of this one (on the command line, in a file); [`str::parse`] reads it back.
    ///
    /// ```no_run
    /// # use shoal::prelude::*;
    /// # use shoal::ManagerAddress;
    /// # fn main() -> shoal::Result<()> {
    /// # let _rt = shoal::init()?;
    /// let manager = Manager::new()?;
    /// let text = manager.address().uri();
    /// let address: ManagerAddress = text.parse()?;
    /// assert_eq!(address, manager.address());
    /// # Ok(())
    /// # }
    /// ```
    pub fn uri(&self) -> String {
        format!("{ADDRESS_SCHEME}{}/{}", self.namespace, self.id)
    }

    fn keys(&self) -> ObjectKeys {
        KeySpace::new(self.namespace.clone()).object("manager", &self.id)
    }

    fn describe(&self) -> String {
        format!("manager {}", short(&self.id))
    }
}

impl std::fmt::Display for ManagerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "manager {} in namespace {}", self.id, self.namespace)
    }
}

/// The scheme of a manager address's text form.
const ADDRESS_SCHEME: &str = "shoal-manager://";

impl std::str::FromStr for ManagerAddress {
    type Err = Error;

    /// Reads [`ManagerAddress::uri`]'s form, `shoal-manager://<namespace>/<id>`.
    fn from_str(text: &str) -> Result<ManagerAddress> {
        let bad = |why: &str| {
            Error::invalid_state(format!(
                "{text:?} is not a manager address ({ADDRESS_SCHEME}<namespace>/<id>): {why}"
            ))
        };
        let rest = text
            .strip_prefix(ADDRESS_SCHEME)
            .ok_or_else(|| bad("it does not start with the scheme"))?;
        let (namespace, id) = rest
            .split_once('/')
            .ok_or_else(|| bad("no '/' between the namespace and the id"))?;
        let word = |w: &str, max: usize| {
            !w.is_empty()
                && w.len() <= max
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        };
        if !word(namespace, 64) {
            return Err(bad("the namespace is 1 to 64 of A-Z a-z 0-9 _ - ."));
        }
        if !word(id, 64) {
            return Err(bad("the id is 1 to 64 of A-Z a-z 0-9 _ - ."));
        }
        Ok(ManagerAddress {
            namespace: namespace.to_string(),
            id: id.to_string(),
        })
    }
}

/// The error for a manager whose record does not exist.
fn manager_gone(address: &ManagerAddress) -> Error {
    Error::invalid_state(format!(
        "{} does not exist in Redis: it was shut down, or unused longer than redis.expiry_secs",
        address.describe()
    ))
}

/// `read` of the manager's record `meta`, then the refresh of the record's TTL, in one pipeline:
/// one round trip, as `read` alone. Every use of a manager (a lookup, a connect, the check that
/// it runs before a primitive or a registered-type instance is made) refreshes its record, as
/// every use of a container does, so a manager in use does not expire. Its reply is `read`'s
/// ([`Refreshed`], [`read_reply`]): an error of `read` keeps its code (a pipeline that fails
/// would report it without), and one of `EXPIRE` (which cannot fail on a key `read` accepts) is
/// ignored.
fn refreshing(read: redis::Cmd, meta: &str, expiry_secs: u64) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors()
        .add_command(read)
        .cmd("EXPIRE")
        .arg(meta)
        .arg(expiry_secs)
        .ignore();
    pipe
}

/// The reply of a [`refreshing`] read of a `T`.
type Refreshed<T> = (redis::RedisResult<T>,);

/// The read's own reply of a [`refreshing`] pipeline, or its error.
fn read_reply<T>((reply,): Refreshed<T>) -> redis::RedisResult<T> {
    reply
}

/// What a lookup reads: the manager's state and the value published under the name.
type LookupReply = (Option<String>, Option<Vec<u8>>);

/// A lookup's outcome from the manager's state and the published value (`HMGET`).
fn looked_up<T: DeserializeOwned>(
    address: &ManagerAddress,
    store: &shoal_core::store::Store,
    name: &str,
    field: &str,
    (state, value): LookupReply,
) -> Result<T> {
    match (state.as_deref(), value) {
        (None, _) => Err(manager_gone(address)),
        (Some("running"), Some(bytes)) => store.decode(&bytes, field),
        (Some("running"), None) => Err(Error::KeyError(format!(
            "{name:?}: nothing was published under this name in {}",
            address.describe()
        ))),
        (Some(_), _) => Err(Error::invalid_state(format!(
            "{} was shut down",
            address.describe()
        ))),
    }
}

/// Turns an error of a manager-level script into a clear one.
fn manager_error(address: &ManagerAddress, e: Error) -> Error {
    let Error::Redis { source, context } = &e else {
        return e;
    };
    match source.code() {
        Some("GONE") => manager_gone(address),
        Some("SHUTDOWN") => Error::invalid_state(format!("{} was shut down", address.describe())),
        Some("CORRUPT") | Some("WRONGTYPE") => Error::invalid_state(format!(
            "{}: its Redis keys hold data shoal did not write ({context}: {source})",
            address.describe()
        )),
        _ => e,
    }
}

/// A manager (Python's `multiprocessing.Manager()`, a started `SyncManager`): it makes shared
/// containers and primitives. See the [module docs](self) for how it maps to Python's.
///
/// ```no_run
/// use shoal::prelude::*;
///
/// #[shoal::remote]
/// fn fill(d: DictProxy<String, i64>, l: ListProxy<i64>, i: i64) {
///     d.set(&format!("k{i}"), i).expect("set");
///     l.append(i).expect("append");
/// }
///
/// fn main() -> shoal::Result<()> {
///     let _rt = shoal::init()?;
///     let manager = Manager::new()?;
///     let d = manager.dict::<String, i64>()?;
///     let l = manager.list::<i64>()?;
///     let children: Vec<Process> = (0..3)
///         .map(|i| Process::new(fill, (d.clone(), l.clone(), i)))
///         .collect();
///     for p in &children {
///         p.start()?;
///     }
///     for p in &children {
///         p.join(None)?;
///     }
///     assert_eq!(d.len()?, 3);
///     assert_eq!(l.len()?, 3);
///     manager.shutdown()
/// }
/// ```
#[derive(Clone)]
pub struct Manager {
    inner: Arc<ManagerInner>,
}

struct ManagerInner {
    address: ManagerAddress,
    authkey: AuthKey,
    /// Made here (by `new`), not connected to.
    owner: bool,
    /// Who made it (`current_process()`'s name and identity): a thread child's task end must
    /// not shut down the managers of the process it runs in.
    creator: (String, Vec<u32>),
    /// Made by a pool task ([`context::in_pool_task`]): shut down at the end of the task's
    /// batch. Else it lives until its creator (process or thread child) ends.
    by_task: bool,
    shut_down: AtomicBool,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("address", &self.inner.address)
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

/// Managers made by this process and not shut down yet: shut down when its runtime ends.
static OWNED: Mutex<Vec<Manager>> = Mutex::new(Vec::new());

/// `current_process()`'s name and identity.
fn caller() -> (String, Vec<u32>) {
    let me = context::current_process();
    (me.name, me.identity)
}

/// The exit hook: runs when this process's runtime ends, when a worker's task ends, and after
/// each batch of pool tasks, in the worker's process or, for a pool whose workers are threads, in
/// that thread (and when such a thread ends). In a thread child (its `current_process()` is not
/// the process's own), only the managers that child made are shut down; elsewhere, every manager
/// this process made. After a batch of pool tasks ([`context::ending_pool_batch`]), only those
/// the tasks made: the initializer's live as long as the worker.
fn shut_down_owned_at_exit() {
    let me = caller();
    let in_thread_child = context::try_current()
        .is_some_and(|c| (&c.process().name, &c.process().identity) != (&me.0, &me.1));
    let batch_end = context::ending_pool_batch();
    let ending: Vec<Manager> = {
        let mut owned = OWNED.lock().unwrap_or_else(|p| p.into_inner());
        let (ending, kept) = std::mem::take(&mut *owned).into_iter().partition(|m| {
            (!in_thread_child || m.inner.creator == me) && (!batch_end || m.inner.by_task)
        });
        *owned = kept;
        ending
    };
    for manager in ending {
        if let Err(e) = manager.delete_everything() {
            tracing::warn!(
                "shutting down {} at exit: {e}",
                manager.inner.address.describe()
            );
        }
    }
}

impl Manager {
    /// Starts a manager (Python's `Manager()`) with this process's authkey
    /// (`current_process().authkey`, inherited from the main process); one round trip.
    pub fn new() -> Result<Manager> {
        Manager::with_authkey(context::current_process().authkey)
    }

    /// Starts a manager whose authkey is `authkey` (Python's `SyncManager(authkey=...)`):
    /// [`Manager::connect`] needs the same key.
    pub fn with_authkey(authkey: AuthKey) -> Result<Manager> {
        let store = context::current()?.store().clone();
        let (address, invocation) = Self::creation(&store, &authkey);
        store
            .with_conn(
                || format!("creating {}", address.describe()),
                |c| invocation.invoke::<i64>(c),
            )
            .map_err(|e| manager_error(&address, e))?;
        Ok(Self::created(
            address,
            authkey,
            caller(),
            context::in_pool_task(),
        ))
    }

    /// The async form of [`Manager::new`]: the same script, sent from a task (see "Async
    /// forms" in the module docs); no thread waits. A future dropped before it returns may
    /// leave the manager's record in Redis, with no handle to it, until the record's TTL
    /// (`redis.expiry_secs`) lapses.
    ///
    /// ```no_run
    /// # async fn service() -> shoal::Result<()> {
    /// let manager = shoal::Manager::new_async().await?;
    /// let key = shoal::current_process().authkey;
    /// let other = shoal::Manager::connect_async(manager.address(), key).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new_async() -> impl Future<Output = Result<Manager>> + Send + use<> {
        Manager::with_authkey_async(context::current_process().authkey)
    }

    /// The async form of [`Manager::with_authkey`] (see [`Manager::new_async`]). Who makes
    /// the manager (the process, or the thread child, that owns it and shuts it down at its
    /// exit) is the caller of this function, whatever thread polls the future.
    pub fn with_authkey_async(
        authkey: AuthKey,
    ) -> impl Future<Output = Result<Manager>> + Send + use<> {
        let creation = context::current().map(|context| Self::creation(context.store(), &authkey));
        let creator = caller();
        let by_task = context::in_pool_task();
        async move {
            let (address, invocation) = creation?;
            let reply = on_runtime::<i64>(RuntimeRequest::Script(invocation))
                .await
                .and_then(|reply| {
                    reply.map_err(|e| Error::redis(format!("creating {}", address.describe()), e))
                });
            reply.map_err(|e| manager_error(&address, e))?;
            Ok(Self::created(address, authkey, creator, by_task))
        }
    }

    /// A new manager's address and the script that records it (its nonce and the verifier of
    /// `authkey`).
    fn creation(
        store: &shoal_core::store::Store,
        authkey: &AuthKey,
    ) -> (ManagerAddress, redis::ScriptInvocation<'static>) {
        let address = ManagerAddress {
            namespace: store.keys().namespace().to_string(),
            id: uuid::Uuid::new_v4().simple().to_string(),
        };
        let mut nonce = Vec::with_capacity(32);
        nonce.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        nonce.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        let verifier = verifier(authkey, &address, &nonce);
        let meta = address.keys().key("meta");
        let mut invocation = CREATE.prepare_invoke();
        invocation
            .key(&meta)
            .arg(store.expiry_secs())
            .arg(&nonce)
            .arg(&verifier[..]);
        (address, invocation)
    }

    /// The handle of a manager `creator` (this process, or a thread child of it) just
    /// recorded: it owns it (and shuts it down at its exit, or at the end of the batch of pool
    /// tasks when `by_task`).
    fn created(
        address: ManagerAddress,
        authkey: AuthKey,
        creator: (String, Vec<u32>),
        by_task: bool,
    ) -> Manager {
        let manager = Manager {
            inner: Arc::new(ManagerInner {
                address,
                authkey,
                owner: true,
                creator,
                by_task,
                shut_down: AtomicBool::new(false),
            }),
        };
        static HOOK: Once = Once::new();
        HOOK.call_once(|| context::register_exit_hook(shut_down_owned_at_exit));
        OWNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(manager.clone());
        manager
    }

    /// Connects to the manager at `address` (Python's `BaseManager(address, authkey).connect()`),
    /// from any process of a runtime that reaches the same Redis; one round trip (a read).
    ///
    /// [`Error::Authentication`] when `authkey` is not the manager's (nothing is written; the
    /// record's TTL is refreshed, as by any use), and [`Error::InvalidState`] when there is no
    /// such manager (shut down, or expired).
    pub fn connect(address: ManagerAddress, authkey: AuthKey) -> Result<Manager> {
        let store = context::current()?.store().clone();
        let record: ManagerRecord = store
            .with_conn(
                || format!("connecting to {}", address.describe()),
                |c| {
                    Self::record_read(&address, store.expiry_secs())
                        .query(c)
                        .and_then(read_reply)
                },
            )
            .map_err(|e| manager_error(&address, e))?;
        Self::connected(address, authkey, record, caller())
    }

    /// The async form of [`Manager::connect`]: the same read, sent from a task (see "Async
    /// forms" in the module docs); no thread waits. The handle is the caller's of this
    /// function (see [`Manager::with_authkey_async`]).
    pub fn connect_async(
        address: ManagerAddress,
        authkey: AuthKey,
    ) -> impl Future<Output = Result<Manager>> + Send + use<> {
        let creator = caller();
        async move {
            let expiry_secs = context::current()?.store().expiry_secs();
            let read = RuntimeRequest::Pipe(Self::record_read(&address, expiry_secs));
            let reply = on_runtime::<Refreshed<ManagerRecord>>(read)
                .await
                .and_then(|reply| {
                    reply.and_then(read_reply).map_err(|e| {
                        Error::redis(format!("connecting to {}", address.describe()), e)
                    })
                });
            let record = reply.map_err(|e| manager_error(&address, e))?;
            Self::connected(address, authkey, record, creator)
        }
    }

    /// The read of a manager's record that [`Manager::connect`] checks, which refreshes its
    /// TTL ([`refreshing`]).
    fn record_read(address: &ManagerAddress, expiry_secs: u64) -> redis::Pipeline {
        let meta = address.keys().key("meta");
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&meta).arg("state").arg("nonce").arg("verifier");
        refreshing(cmd, &meta, expiry_secs)
    }

    /// `creator`'s handle to the manager whose record is `record`, if `authkey` is its key and
    /// it runs.
    fn connected(
        address: ManagerAddress,
        authkey: AuthKey,
        record: ManagerRecord,
        creator: (String, Vec<u32>),
    ) -> Result<Manager> {
        let (state, nonce, stored) = record;
        let (Some(state), Some(nonce), Some(stored)) = (state, nonce, stored) else {
            return Err(manager_gone(&address));
        };
        auth::verify(
            &authkey,
            &[b"shoal-manager", address.id.as_bytes(), &nonce],
            &stored,
            &address.describe(),
        )
        .map_err(|_| {
            Error::Authentication(format!(
                "{}: the authkey given is not the manager's (digest received was wrong)",
                address.describe()
            ))
        })?;
        if state != "running" {
            return Err(Error::invalid_state(format!(
                "{} was shut down",
                address.describe()
            )));
        }
        Ok(Manager {
            inner: Arc::new(ManagerInner {
                address,
                authkey,
                owner: false,
                creator,
                by_task: false,
                shut_down: AtomicBool::new(false),
            }),
        })
    }

    /// The manager's address, for [`Manager::connect`] elsewhere.
    pub fn address(&self) -> ManagerAddress {
        self.inner.address.clone()
    }

    /// A new shared dictionary (Python's `manager.dict()`); one round trip.
    pub fn dict<K, V>(&self) -> Result<DictProxy<K, V>>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        Ok(DictProxy::new(self.container(Kind::Dict, &[])?))
    }

    /// A new shared dictionary holding `pairs` (Python's `manager.dict(pairs)`); two round trips.
    pub fn dict_from<K, V>(
        &self,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<DictProxy<K, V>>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        let dict = self.dict()?;
        dict.update(pairs)?;
        Ok(dict)
    }

    /// A new shared list (Python's `manager.list()`); one round trip.
    pub fn list<T>(&self) -> Result<ListProxy<T>>
    where
        T: Serialize + DeserializeOwned,
    {
        Ok(ListProxy::new(self.container(Kind::List, &[("\0s", "0")])?))
    }

    /// A new shared list holding `items` (Python's `manager.list(items)`); two round trips.
    pub fn list_from<T>(&self, items: impl IntoIterator<Item = T>) -> Result<ListProxy<T>>
    where
        T: Serialize + DeserializeOwned,
    {
        let list = self.list()?;
        list.extend(items)?;
        Ok(list)
    }

    /// A new shared namespace (Python's `manager.Namespace()`); one round trip.
    pub fn namespace(&self) -> Result<NamespaceProxy> {
        Ok(NamespaceProxy::new(self.container(Kind::Namespace, &[])?))
    }

    fn container(&self, kind: Kind, extra: &[(&str, &str)]) -> Result<Container> {
        self.check_not_shut_down_here()?;
        Container::create(&self.inner.address, &self.inner.authkey, kind, extra)
    }

    /// The async form of [`Manager::dict`]: the same round trip, sent from shoal's actor
    /// runtime, so a service can make containers per request without blocking a thread.
    ///
    /// ```no_run
    /// # async fn make(manager: shoal::Manager) -> shoal::Result<()> {
    /// let scores = manager.dict_async::<String, i64>().await?;
    /// scores.set_async(&"alice".to_string(), 3).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn dict_async<K, V>(
        &self,
    ) -> impl Future<Output = Result<DictProxy<K, V>>> + Send + use<K, V>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        let container = self.container_async(Kind::Dict, &[]);
        async move { Ok(DictProxy::new(container.await?)) }
    }

    /// The async form of [`Manager::list`].
    pub fn list_async<T>(&self) -> impl Future<Output = Result<ListProxy<T>>> + Send + use<T>
    where
        T: Serialize + DeserializeOwned,
    {
        let container = self.container_async(Kind::List, &[("\0s", "0")]);
        async move { Ok(ListProxy::new(container.await?)) }
    }

    /// The async form of [`Manager::namespace`].
    pub fn namespace_async(&self) -> impl Future<Output = Result<NamespaceProxy>> + Send + use<> {
        let container = self.container_async(Kind::Namespace, &[]);
        async move { Ok(NamespaceProxy::new(container.await?)) }
    }

    fn container_async(
        &self,
        kind: Kind,
        extra: &[(&str, &str)],
    ) -> impl Future<Output = Result<Container>> + Send + use<> {
        let shut_down = self.check_not_shut_down_here();
        let create = Container::create_async(&self.inner.address, &self.inner.authkey, kind, extra);
        async move {
            shut_down?;
            create.await
        }
    }

    fn check_not_shut_down_here(&self) -> Result<()> {
        if self.inner.shut_down.load(Ordering::Acquire) {
            return Err(Error::invalid_state(format!(
                "{} was shut down",
                self.inner.address.describe()
            )));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.inner.address.describe()
    }

    /// Makes `value` reachable under `name` by every process that holds this manager, made
    /// here or reached with [`Manager::connect`] ([`Manager::lookup`]): Python's
    /// `register(typeid, callable=lambda: obj)` on the server, with which clients get the same
    /// shared object (`manager.get_queue()`). Usually a proxy or a primitive (a dict, a queue, an
    /// actor), which the looking-up process gets live; any serde value is stored as a copy. A
    /// second `publish` of a name replaces the first. 1 round trip; an error once the manager
    /// was shut down.
    ///
    /// ```no_run
    /// # use shoal::prelude::*;
    /// # fn main() -> shoal::Result<()> {
    /// # let _rt = shoal::init()?;
    /// let manager = Manager::new()?;
    /// let jobs: Queue<u64> = manager.queue()?;
    /// manager.publish("jobs", &jobs)?;
    /// // In another program, with the address and the authkey:
    /// let there = Manager::connect(manager.address(), current_process().authkey)?;
    /// let jobs: Queue<u64> = there.lookup("jobs")?;
    /// jobs.put(7)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn publish<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        self.check_not_shut_down_here()?;
        let (store, meta) = self.meta()?;
        let field = format!("o:{name}");
        let encoded = store.encode(value, &field)?;
        let address = &self.inner.address;
        store
            .with_conn(
                || format!("publishing {name:?} in {}", address.describe()),
                |c| {
                    RECORD
                        .key(&meta)
                        .arg(&field)
                        .arg(&encoded)
                        .arg(store.expiry_secs())
                        .invoke::<i64>(c)
                },
            )
            .map_err(|e| manager_error(address, e))?;
        Ok(())
    }

    /// The value [`Manager::publish`] put under `name`, decoded as a `T` (a proxy or primitive
    /// comes back live). [`Error::KeyError`] when nothing was published under it; 1 round trip.
    pub fn lookup<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        self.check_not_shut_down_here()?;
        let (store, meta) = self.meta()?;
        let field = format!("o:{name}");
        let address = &self.inner.address;
        let reply: LookupReply = store
            .with_conn(
                || format!("looking {name:?} up in {}", address.describe()),
                |c| {
                    Self::lookup_read(&meta, &field, store.expiry_secs())
                        .query(c)
                        .and_then(read_reply)
                },
            )
            .map_err(|e| manager_error(address, e))?;
        looked_up(address, &store, name, &field, reply)
    }

    /// The read of a lookup: the manager's state and the value published under `field`; it
    /// refreshes the record's TTL ([`refreshing`]).
    fn lookup_read(meta: &str, field: &str, expiry_secs: u64) -> redis::Pipeline {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(meta).arg("state").arg(field);
        refreshing(cmd, meta, expiry_secs)
    }

    /// The async form of [`Manager::publish`]: the same script, sent from shoal's actor
    /// runtime (the value is encoded when this is called).
    ///
    /// ```no_run
    /// # async fn share(manager: shoal::Manager, jobs: shoal::Queue<u64>) -> shoal::Result<()> {
    /// manager.publish_async("jobs", &jobs).await?;
    /// let jobs: shoal::Queue<u64> = manager.lookup_async("jobs").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn publish_async<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
    ) -> impl Future<Output = Result<()>> + Send + use<T> {
        let prepared = self.check_not_shut_down_here().and_then(|()| {
            let (store, meta) = self.meta()?;
            let field = format!("o:{name}");
            let encoded = store.encode(value, &field)?;
            let mut invocation = RECORD.prepare_invoke();
            invocation
                .key(&meta)
                .arg(&field)
                .arg(encoded)
                .arg(store.expiry_secs());
            Ok(invocation)
        });
        let address = self.inner.address.clone();
        let name = name.to_string();
        async move {
            let reply = on_runtime::<i64>(RuntimeRequest::Script(prepared?)).await;
            let reply = reply.and_then(|reply| {
                reply.map_err(|e| {
                    Error::redis(format!("publishing {name:?} in {}", address.describe()), e)
                })
            });
            reply.map(|_| ()).map_err(|e| manager_error(&address, e))
        }
    }

    /// The async form of [`Manager::lookup`]: the same read, sent from a task (see "Async
    /// forms" in the module docs).
    pub fn lookup_async<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<T>> + Send + use<T> {
        let prepared = self.check_not_shut_down_here().and_then(|()| self.meta());
        let address = self.inner.address.clone();
        let name = name.to_string();
        async move {
            let (store, meta) = prepared?;
            let field = format!("o:{name}");
            let read = Self::lookup_read(&meta, &field, store.expiry_secs());
            let reply = on_runtime::<Refreshed<LookupReply>>(RuntimeRequest::Pipe(read))
                .await
                .and_then(|reply| {
                    reply.and_then(read_reply).map_err(|e| {
                        Error::redis(format!("looking {name:?} up in {}", address.describe()), e)
                    })
                });
            let reply = reply.map_err(|e| manager_error(&address, e))?;
            looked_up(&address, &store, &name, &field, reply)
        }
    }

    /// The store and the manager's `meta` key.
    fn meta(&self) -> Result<(Arc<shoal_core::store::Store>, String)> {
        let store = context::current()?.store().clone();
        Ok((store, self.inner.address.keys().key("meta")))
    }

    /// Errors when the manager is not running (a primitive is about to be made for it);
    /// refreshes its record's TTL. (Primitives are not the manager's keys, so nothing is written
    /// in its record: a write would have to be a script that checks the state itself, as
    /// `register`, `create` and the creation of a container are.)
    fn check_running(&self) -> Result<()> {
        self.check_not_shut_down_here()?;
        let store = context::current()?.store().clone();
        let address = &self.inner.address;
        let state: Option<String> = store
            .with_conn(
                || format!("reading {}", address.describe()),
                |c| {
                    self.state_read(store.expiry_secs())
                        .query(c)
                        .and_then(read_reply)
                },
            )
            .map_err(|e| manager_error(address, e))?;
        running(address, state)
    }

    /// The read of the manager's state, which refreshes its record's TTL ([`refreshing`]).
    fn state_read(&self, expiry_secs: u64) -> redis::Pipeline {
        let meta = self.inner.address.keys().key("meta");
        let mut cmd = redis::cmd("HGET");
        cmd.arg(&meta).arg("state");
        refreshing(cmd, &meta, expiry_secs)
    }

    /// A shared unbounded queue (Python's `manager.Queue()`): shoal's [`Queue`].
    pub fn queue<T: Serialize + DeserializeOwned>(&self) -> Result<Queue<T>> {
        self.check_running()?;
        Queue::new()
    }

    /// A shared queue of at most `maxsize` items (Python's `manager.Queue(maxsize)`).
    pub fn queue_with_maxsize<T: Serialize + DeserializeOwned>(
        &self,
        maxsize: u64,
    ) -> Result<Queue<T>> {
        self.check_running()?;
        Queue::with_maxsize(maxsize)
    }

    /// A shared joinable queue (Python's `manager.JoinableQueue()`): shoal's [`JoinableQueue`].
    pub fn joinable_queue<T: Serialize + DeserializeOwned>(&self) -> Result<JoinableQueue<T>> {
        self.check_running()?;
        JoinableQueue::new()
    }

    /// A shared lock (Python's `manager.Lock()`): shoal's [`Lock`].
    pub fn lock(&self) -> Result<Lock> {
        self.check_running()?;
        Lock::new()
    }

    /// A shared reentrant lock (Python's `manager.RLock()`): shoal's [`RLock`].
    pub fn rlock(&self) -> Result<RLock> {
        self.check_running()?;
        RLock::new()
    }

    /// A shared semaphore (Python's `manager.Semaphore(value)`): shoal's [`Semaphore`].
    pub fn semaphore(&self, value: u64) -> Result<Semaphore> {
        self.check_running()?;
        Semaphore::new(value)
    }

    /// A shared bounded semaphore (Python's `manager.BoundedSemaphore(value)`).
    pub fn bounded_semaphore(&self, value: u64) -> Result<BoundedSemaphore> {
        self.check_running()?;
        BoundedSemaphore::new(value)
    }

    /// A shared event (Python's `manager.Event()`): shoal's [`Event`].
    pub fn event(&self) -> Result<Event> {
        self.check_running()?;
        Event::new()
    }

    /// A shared condition with its own reentrant lock (Python's `manager.Condition()`):
    /// shoal's [`Condition`].
    pub fn condition(&self) -> Result<Condition> {
        self.check_running()?;
        Condition::new(None)
    }

    /// A shared condition on `lock` (Python's `manager.Condition(lock)`).
    pub fn condition_with_lock(&self, lock: Lock) -> Result<Condition> {
        self.check_running()?;
        Condition::new(Some(lock))
    }

    /// A shared barrier for `parties` processes (Python's `manager.Barrier(parties)`).
    pub fn barrier(&self, parties: u32) -> Result<Barrier> {
        self.check_running()?;
        Barrier::new(parties)
    }

    /// A shared scalar (Python's `manager.Value(typecode, value)`): shoal's [`Value`], with a
    /// lock.
    pub fn value<T: Scalar>(&self, value: T) -> Result<Value<T>> {
        self.check_running()?;
        Value::new(value)
    }

    /// A shared array of scalars (Python's `manager.Array(typecode, values)`): shoal's
    /// [`Array`], with a lock.
    pub fn array<T: Scalar>(&self, values: Vec<T>) -> Result<Array<T>> {
        self.check_running()?;
        Array::new(values)
    }

    /// Shuts the manager down (Python's `manager.shutdown()`): deletes its record and every
    /// container any process made in it; their proxies then fail with
    /// [`Error::InvalidState`]. Shutting down again does nothing once a shutdown succeeded; after
    /// one that failed (a connection lost half way) it goes on with what is left. Only a manager
    /// made here (by [`Manager::new`]) can be shut down: on a connected one it is
    /// [`Error::InvalidState`].
    pub fn shutdown(&self) -> Result<()> {
        if !self.inner.owner {
            return Err(self.not_the_owner());
        }
        if self.inner.shut_down.load(Ordering::Acquire) {
            return Ok(());
        }
        self.delete_everything()?;
        OWNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|m| !Arc::ptr_eq(&m.inner, &self.inner));
        Ok(())
    }

    /// The refusal to shut down a manager this process connected to.
    fn not_the_owner(&self) -> Error {
        Error::invalid_state(format!(
            "{} was connected to, not started here: only the process that started it shuts it \
             down",
            self.inner.address.describe()
        ))
    }

    /// The async form of [`Manager::shutdown`]: the same steps (the record marked shut down,
    /// each registered-type instance sent its stop, the keys deleted), run by a task of shoal's
    /// actor runtime; no thread waits. Once polled, dropping the future does not stop the
    /// shutdown.
    ///
    /// ```no_run
    /// # async fn done(manager: shoal::Manager) -> shoal::Result<()> {
    /// manager.shutdown_async().await?;
    /// assert!(manager.dict::<String, u64>().is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn shutdown_async(&self) -> impl Future<Output = Result<()>> + Send + use<> {
        let manager = self.clone();
        async move {
            if !manager.inner.owner {
                return Err(manager.not_the_owner());
            }
            if manager.inner.shut_down.load(Ordering::Acquire) {
                return Ok(());
            }
            let task = manager;
            context::current()?
                .spawn(move |store, caller| async move {
                    let address = task.inner.address.clone();
                    let result = async {
                        let mut conn = store.shared().await?;
                        let shutting_down =
                            |e| Error::redis(format!("shutting down {}", address.describe()), e);
                        let (fields, mut page, recorded): ShutdownReply = task
                            .shutdown_script()
                            .invoke_async(&mut conn)
                            .await
                            .map_err(shutting_down)?;
                        let instances = registered::recorded_instances(
                            store.store().keys().namespace(),
                            &recorded,
                        );
                        for stop in task.instance_stops(store.store(), &instances) {
                            if let Err(e) = stop.mailbox.send_async(&store, &stop.outgoing()).await
                            {
                                tracing::debug!(
                                    "stopping actor {} of {}: {e}",
                                    stop.mailbox.actor_id,
                                    address.describe()
                                );
                            }
                        }
                        let deleting = |e| {
                            Error::redis(format!("deleting the keys of {}", address.describe()), e)
                        };
                        while !fields.is_empty() {
                            let last = page.len() < SHUTDOWN_PAGE;
                            let step = task.deletion(&page, last.then_some(&fields));
                            if last {
                                step.query_async::<()>(&mut conn).await.map_err(deleting)?;
                                break;
                            }
                            let (next,): (Vec<String>,) =
                                step.query_async(&mut conn).await.map_err(deleting)?;
                            page = next;
                        }
                        // Only now: a shutdown that failed half way is done again when retried.
                        task.inner.shut_down.store(true, Ordering::Release);
                        Ok(())
                    }
                    .await;
                    if result.is_ok() {
                        // Here, not in the caller's future: a dropped future still shuts down.
                        OWNED
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|m| !Arc::ptr_eq(&m.inner, &task.inner));
                    }
                    caller.finish(result.map_err(|e| manager_error(&address, e)));
                })
                .await
        }
    }

    /// Marks the manager shut down in Redis (no container can be made any more, no instance
    /// recorded), stops its registered-type instances, then deletes its keys: the containers the
    /// index lists, a page per round trip, then the index and the record. The handle is marked
    /// shut down only once all of it succeeded, so that a shutdown that failed half way (a
    /// connection lost) is done again, from where it stopped, when retried (the record, deleted
    /// last, still says what is left).
    fn delete_everything(&self) -> Result<()> {
        let store = context::current()?.store().clone();
        let address = &self.inner.address;
        let (fields, mut page, recorded): ShutdownReply = store
            .with_conn(
                || format!("shutting down {}", address.describe()),
                |c| self.shutdown_script().invoke(c),
            )
            .map_err(|e| manager_error(address, e))?;
        self.stop_instances(&registered::recorded_instances(
            store.keys().namespace(),
            &recorded,
        ));
        // An empty record: the manager is gone already (shut down, or expired).
        while !fields.is_empty() {
            let last = page.len() < SHUTDOWN_PAGE;
            let step = self.deletion(&page, last.then_some(&fields));
            let deleting = || format!("deleting the keys of {}", address.describe());
            if last {
                store
                    .with_conn(deleting, |c| step.query::<()>(c))
                    .map_err(|e| manager_error(address, e))?;
                break;
            }
            let (next,): (Vec<String>,) = store
                .with_conn(deleting, |c| step.query(c))
                .map_err(|e| manager_error(address, e))?;
            page = next;
        }
        self.inner.shut_down.store(true, Ordering::Release);
        Ok(())
    }

    /// The first step of a shutdown (`manager_shutdown.lua`): the record marked shut down; it
    /// replies with the record's fields, the first page of the container index and the
    /// instances' records.
    fn shutdown_script(&self) -> redis::ScriptInvocation<'static> {
        let keys = self.inner.address.keys();
        let mut invocation = SHUTDOWN.prepare_invoke();
        invocation
            .key(keys.key("meta"))
            .key(keys.key(container::INDEX))
            .arg(SHUTDOWN_PAGE);
        invocation
    }

    /// One step of a shutdown's deletion: the keys of the containers `page` (members of the
    /// index) lists, and their entries (after the keys: an entry is gone only once its keys
    /// are). Then the next page of the index; or, for the last page (`last`: the record's
    /// fields, read by the shutdown), the containers its `c:<kind>:<id>` fields list (a record
    /// an older shoal wrote, which kept its containers there), the index, and the record itself,
    /// last, so that until everything else is deleted a retry finds what is left.
    fn deletion(&self, page: &[String], last: Option<&Vec<String>>) -> redis::Pipeline {
        let address = &self.inner.address;
        let manager_keys = address.keys();
        let index = manager_keys.key(container::INDEX);
        let mut keys: Vec<String> = page
            .iter()
            .filter_map(|member| container::index_member(member))
            .flat_map(|(kind, capability)| container::own_keys(&manager_keys, kind, capability))
            .collect();
        for field in last.into_iter().flatten() {
            let Some((kind, id)) = field.strip_prefix("c:").and_then(|f| f.split_once(':')) else {
                continue;
            };
            let Some(kind) = Kind::from_name(kind) else {
                continue;
            };
            let capability = container::capability(&self.inner.authkey, &address.id, kind, id);
            keys.extend(container::own_keys(&manager_keys, kind, &capability));
        }
        let mut pipe = redis::pipe();
        for chunk in keys.chunks(1000) {
            pipe.cmd("DEL").arg(chunk).ignore();
        }
        match last {
            Some(_) => {
                pipe.cmd("DEL")
                    .arg(&index)
                    .arg(manager_keys.key("meta"))
                    .ignore();
            }
            None => {
                // Every member, whether or not it names a container: the pages must shrink.
                pipe.cmd("ZREM").arg(&index).arg(page).ignore();
                pipe.cmd("ZRANGE").arg(&index).arg(0).arg(SHUTDOWN_PAGE - 1);
            }
        }
        pipe
    }
}

/// Containers deleted per round trip of a shutdown (a dict or a list has 2 keys: at most 1000
/// keys per `DEL`), so that a manager that made many does not need one huge reply or command.
const SHUTDOWN_PAGE: usize = 500;

/// The reply of the shutdown script: the record's fields (none when the manager is gone), the
/// first page of the container index, and the instances' records (`a:<actor id>`, its value,
/// ...).
type ShutdownReply = (Vec<String>, Vec<String>, Vec<String>);

/// Whether a manager whose record holds `state` runs, or why not.
fn running(address: &ManagerAddress, state: Option<String>) -> Result<()> {
    match state.as_deref() {
        Some("running") => Ok(()),
        None => Err(manager_gone(address)),
        Some(_) => Err(Error::invalid_state(format!(
            "{} was shut down",
            address.describe()
        ))),
    }
}

/// A manager's record as [`Manager::connect`] reads it: its state, nonce and verifier.
type ManagerRecord = (Option<String>, Option<Vec<u8>>, Option<Vec<u8>>);

/// The verifier a manager's record holds: HMAC-SHA256 of its id and nonce under its authkey.
fn verifier(authkey: &AuthKey, address: &ManagerAddress, nonce: &[u8]) -> [u8; auth::TAG_LEN] {
    auth::sign(authkey, &[b"shoal-manager", address.id.as_bytes(), nonce])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_reads_back_from_its_text() {
        let address = ManagerAddress {
            namespace: "jobs.prod-1".into(),
            id: "0123456789abcdef0123456789abcdef".into(),
        };
        let text = address.uri();
        assert_eq!(
            text,
            "shoal-manager://jobs.prod-1/0123456789abcdef0123456789abcdef"
        );
        assert_eq!(text.parse::<ManagerAddress>().expect("parses"), address);
        for bad in [
            "",
            "jobs/abc",
            "shoal-manager://jobs",
            "shoal-manager:///abc",
            "shoal-manager://jobs/",
            "shoal-manager://jo{bs}/abc",
            "shoal-manager://jobs/a/b",
        ] {
            let e = bad.parse::<ManagerAddress>().expect_err(bad);
            assert!(
                e.to_string().contains("not a manager address"),
                "{bad}: {e}"
            );
        }
    }
}
