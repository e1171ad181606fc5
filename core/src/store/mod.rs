//! The Redis store: connections, key schema, scripts, payload limits, and the embedded server.
//!
//! # Connections
//!
//! A [`Store`] hands out three kinds of connection from one [`redis::Client`]:
//!
//! * **Pooled synchronous connections** ([`Store::with_conn`]) for calls made from user threads.
//!   A blocking API call (`Queue::get`, `Lock::acquire`, `Process::start`) runs on the caller's
//!   thread; a synchronous connection answers it without a hop to another thread. Measured on
//!   the reference machine: 15 µs per PING over the Unix socket, against 39 µs through an async
//!   multiplexed connection driven by another thread.
//! * **Pooled connections for blocking commands** ([`Store::with_blocking_conn`]): the command
//!   carries Redis's own timeout (`BLPOP k 2`) and the client waits that long plus
//!   `redis.response_timeout_secs` (rule 6 of the design: never give up client-side first). A
//!   connection whose command failed on I/O or timed out is discarded, never reused, so a late
//!   reply cannot reach the next caller.
//! * **Idle connections of a server that went away** are not handed out. redis-rs learns that a
//!   connection is closed only when a command on it fails, so after Redis restarted every idle
//!   connection would look usable and fail its next command. When a pooled connection is lost
//!   (closed, reset, refused, or its server answered `READONLY`: it is no longer the primary),
//!   every connection opened before that is dropped with it: the idle ones at once, the ones in
//!   use when they come back. The command that met the lost connection fails and is not sent
//!   again (it may have reached Redis: a write is applied at most once); the next ones open new
//!   connections.
//! * **One async multiplexed connection** ([`Store::multiplexed`]) for actors, which reconnects
//!   by itself after Redis went away and came back (redis-rs's `ConnectionManager`: the command
//!   that met the broken connection fails, the next ones use a new one) and after its server
//!   answered `READONLY` (a primary demoted behind the same address: the next command opens a
//!   new connection, see [`SharedConnection`]), and dedicated async
//!   connections ([`Store::dedicated`]) for actors that block (stream readers), which open a new
//!   one after a failure.
//! * **Async connections of one runtime** ([`AsyncStore`]) for the async forms of the primitives,
//!   whose work runs as tasks on the actor system's runtime (see `crate::actors`): one shared
//!   multiplexed connection for ordinary commands and scripts ([`AsyncStore::shared`]), and a
//!   pool of dedicated multiplexed connections for blocking commands ([`AsyncStore::blocking`]):
//!   each carries one blocking command at a time, so a waiter never queues behind another's
//!   `BLPOP`. As for the synchronous pool, the command carries Redis's own timeout, the client
//!   waits that long plus the response timeout, and a connection whose command failed on I/O or
//!   timed out is dropped, not pooled. The connections belong to the runtime they were opened
//!   on (their drivers are tasks there), and go away with it.
//!
//! # Scripts
//!
//! Each primitive keeps its Lua next to its module and wraps it in a [`redis::Script`], which runs
//! `EVALSHA` and loads the script only when the server answers `NOSCRIPT` (first use, or after a
//! restart): one round trip per call in the steady state.
//!
//! # URLs
//!
//! `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS, system roots; `#insecure`
//! skips verification), `unix:///path` and `redis+unix:///path`.

pub mod embedded;
pub mod keys;
mod shared;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionLike, RedisError, RedisResult};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::actors::{self, AsyncCall, Caller};
use crate::codec;
use crate::config::{Config, redact_url};
use crate::error::{Error, Result};
pub use keys::{KeySpace, ObjectKeys};
pub use shared::SharedConnection;
use shared::SharedSlot;

/// Idle synchronous connections kept for reuse.
const MAX_IDLE: usize = 64;

/// What a [`Store`] needs besides its URL.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreSettings {
    /// Key namespace.
    pub namespace: String,
    /// TTL of every key, in seconds.
    pub expiry_secs: u64,
    /// Payload limit in bytes.
    pub max_message_bytes: usize,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Response timeout of ordinary commands.
    pub response_timeout: Duration,
}

impl StoreSettings {
    /// The settings a configuration asks for.
    pub fn from_config(config: &Config) -> Self {
        StoreSettings {
            namespace: config.shoal.namespace.clone(),
            expiry_secs: config.redis.expiry_secs,
            max_message_bytes: usize::try_from(config.redis.max_message_bytes)
                .unwrap_or(usize::MAX),
            connect_timeout: config.redis.connect_timeout(),
            response_timeout: config.redis.response_timeout(),
        }
    }
}

/// Access to one Redis server for one namespace.
pub struct Store {
    client: redis::Client,
    url: String,
    settings: StoreSettings,
    keys: KeySpace,
    idle: Mutex<IdlePool<Pooled>>,
    multiplexed: SharedSlot,
}

/// What a command's result says about the connection it ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Redis answered (an error reply too): the connection is in step and may be used again.
    Reusable,
    /// This connection may be out of step (no reply in time, a reply that could not be read,
    /// credentials refused): it is dropped.
    Discard,
    /// The connection is gone (closed, reset, refused), or the server behind it is no longer a
    /// primary (`READONLY`): it is dropped, and so is every connection opened before it, which
    /// went to the same server at the same time.
    Lost,
}

impl Outcome {
    /// The outcome of a command that failed with `e`.
    fn of_error(e: &RedisError) -> Outcome {
        // A timeout is an I/O error too, but says the server was slow, not gone: the other
        // connections may well be fine, and dropping them all would only add reconnections
        // to a loaded server.
        if e.is_timeout() {
            Outcome::Discard
        } else if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        {
            Outcome::Lost
        } else if e.is_unrecoverable_error() {
            // `Parse` (a reply that could not be read: the stream may be out of step) and
            // `AuthenticationFailed`: this connection only.
            Outcome::Discard
        } else {
            Outcome::Reusable
        }
    }
}

/// Idle connections kept for reuse (the most recently used first), each with its number: the
/// order in which it was opened.
///
/// redis-rs marks a connection closed only after a command on it failed, so when Redis
/// restarts, every idle connection is dead but looks usable, and each would fail the next
/// command given to it. When one connection is [lost](Outcome::Lost), every connection opened
/// before that moment is taken for lost too (they reached the same server in the same period):
/// the idle ones are dropped at once, and those in use are dropped when they are put back.
/// Connections opened afterwards, to the server that is there now, are kept. A connection lost
/// that was itself already taken for lost (opened before an earlier loss) drops nothing more.
struct IdlePool<C> {
    idle: Vec<(C, u64)>,
    /// The number the next connection opened gets.
    next: u64,
    /// Connections numbered below this were opened before the last loss: never reused.
    stale_below: u64,
}

impl<C> IdlePool<C> {
    fn new() -> Self {
        IdlePool {
            idle: Vec::new(),
            next: 0,
            stale_below: 0,
        }
    }

    /// An idle connection and its number, or (none idle) the number of the connection the
    /// caller opens.
    fn take(&mut self) -> std::result::Result<(C, u64), u64> {
        self.idle.pop().ok_or_else(|| self.number())
    }

    /// The number of a connection about to be opened.
    fn number(&mut self) -> u64 {
        let number = self.next;
        self.next += 1;
        number
    }

    /// Puts back connection `number`, whose last command had `outcome`, keeping at most `max`
    /// idle. Returns the connections not kept (this one, and after a loss the idle ones
    /// opened before it), for the caller to drop once the pool is unlocked: closing sockets is
    /// a system call each.
    fn put_back(&mut self, conn: C, number: u64, outcome: Outcome, max: usize) -> Vec<C> {
        let current = number >= self.stale_below;
        match outcome {
            Outcome::Reusable if current && self.idle.len() < max => {
                self.idle.push((conn, number));
                Vec::new()
            }
            Outcome::Lost if current => {
                if !self.idle.is_empty() {
                    tracing::debug!(
                        "a connection to Redis was lost: dropping the {} idle connections \
                         opened before it",
                        self.idle.len()
                    );
                }
                self.stale_below = self.next;
                let mut dropped: Vec<C> = self.idle.drain(..).map(|(c, _)| c).collect();
                dropped.push(conn);
                dropped
            }
            _ => vec![conn],
        }
    }

    /// Number of idle connections.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle.len()
    }
}

/// A pooled synchronous connection and the read timeout its socket has now (changing it is a
/// system call; blocking calls with the same wait reuse it as it is).
struct Pooled {
    conn: redis::Connection,
    read_timeout: Option<Duration>,
    /// When its last command ended (or it was opened).
    used: std::time::Instant,
}

/// An idle pooled connection unused for this long is checked (`PING`) before it is handed
/// out: a server's `timeout`, a proxy or a managed Redis may have closed it meanwhile, and a
/// command sent on a closed connection fails without telling whether it was applied.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

impl Pooled {
    /// Runs `f` with the socket's read timeout set to `read_timeout`; returns its result and
    /// what it says about the connection: it may be used again when it is open and any error
    /// was the server's answer, not a failure to get one.
    fn run<T>(
        &mut self,
        read_timeout: Option<Duration>,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<(RedisResult<T>, Outcome)> {
        if self.read_timeout != read_timeout {
            self.conn
                .set_read_timeout(read_timeout)
                .map_err(|e| Error::redis("setting a read timeout", e))?;
            self.read_timeout = read_timeout;
        }
        let result = f(&mut self.conn);
        self.used = std::time::Instant::now();
        let outcome = match &result {
            Ok(_) => Outcome::Reusable,
            Err(e) => Outcome::of_error(e),
        };
        // `f` may have met an error it did not return.
        let outcome = match outcome {
            Outcome::Reusable if !self.conn.is_open() => Outcome::Discard,
            outcome => outcome,
        };
        Ok((result, outcome))
    }
}

/// A synchronous connection one caller keeps across calls, for what Redis keeps per connection
/// (a `WATCH`, which a pooled connection must not carry to its next user). It starts with no
/// connection; [`Store::with_held_conn`] opens one at its first call, and again after an error
/// closed it. Dropping it closes the connection, ending whatever state it held.
///
/// ```no_run
/// # fn main() -> shoal_core::Result<()> {
/// use shoal_core::store::{HeldConn, Store, StoreSettings};
/// let store = Store::connect("redis://127.0.0.1/", StoreSettings::from_config(&Default::default()))?;
/// let mut held = HeldConn::default();
/// let ordinary = Some(std::time::Duration::ZERO);
/// store.with_held_conn(&mut held, ordinary, || "watching k".into(), |c| {
///     redis::cmd("WATCH").arg("k").query::<()>(c)
/// })?;
/// let watched_on = held.generation();
/// // ...the watch lasts until an EXEC on `held`, or until its connection is closed: it is
/// // still there if `held.generation() == watched_on`.
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
pub struct HeldConn {
    pooled: Option<Pooled>,
    /// The number of `pooled` among the store's connections (see [`IdlePool`]).
    number: u64,
    generation: u64,
}

impl HeldConn {
    /// Which connection this is: it changes whenever a connection is opened or closed. State
    /// set on the connection (a `WATCH`) is still there while this is unchanged.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl std::fmt::Debug for HeldConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldConn")
            .field("connected", &self.pooled.is_some())
            .field("generation", &self.generation)
            .finish()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &redact_url(&self.url))
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a store and checks that Redis answers, so that a wrong URL or a server that is down
    /// is reported here and not at the first operation.
    pub fn connect(url: &str, settings: StoreSettings) -> Result<Store> {
        let store = Store::connect_lazy(url, settings)?;
        store.with_conn(
            || format!("connecting to {}", redact_url(url)),
            |c| redis::cmd("PING").query::<()>(c),
        )?;
        Ok(store)
    }

    /// Opens a store without contacting Redis; the first operation connects. Workers use it to
    /// save a round trip on their start path.
    pub fn connect_lazy(url: &str, settings: StoreSettings) -> Result<Store> {
        let client = redis::Client::open(url).map_err(|e| Error::Config {
            origin: "redis.url".into(),
            key: "redis.url".into(),
            reason: format!("{}: {e}", redact_url(url)),
        })?;
        let store = Store {
            client,
            url: url.to_string(),
            keys: KeySpace::new(settings.namespace.clone()),
            settings,
            idle: Mutex::new(IdlePool::new()),
            multiplexed: SharedSlot::default(),
        };
        Ok(store)
    }

    /// The same server and idle connections under other settings (namespace, limits, timeouts).
    pub fn with_settings(self, settings: StoreSettings) -> Store {
        let mut idle = self.idle.into_inner().unwrap_or_else(|p| p.into_inner());
        for (pooled, _) in &mut idle.idle {
            let _ = pooled
                .conn
                .set_read_timeout(Some(settings.response_timeout));
            let _ = pooled
                .conn
                .set_write_timeout(Some(settings.response_timeout));
            pooled.read_timeout = Some(settings.response_timeout);
        }
        Store {
            client: self.client,
            url: self.url,
            keys: KeySpace::new(settings.namespace.clone()),
            settings,
            idle: Mutex::new(idle),
            multiplexed: SharedSlot::default(),
        }
    }

    /// The URL this store connects to (it may carry a password: do not log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with the password hidden.
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The key schema of this store's namespace.
    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// The settings.
    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// TTL of every key, in seconds.
    pub fn expiry_secs(&self) -> u64 {
        self.settings.expiry_secs
    }

    /// Encodes a payload for `key` under this store's size limit.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T, key: &str) -> Result<Vec<u8>> {
        codec::encode(value, key, self.settings.max_message_bytes)
    }

    /// Decodes a payload read from `key` under this store's size limit.
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8], key: &str) -> Result<T> {
        codec::decode(bytes, key, self.settings.max_message_bytes)
    }

    /// Runs `f` on a pooled synchronous connection whose reads time out after
    /// `redis.response_timeout_secs`. `context` describes the operation in errors.
    pub fn with_conn<T>(
        &self,
        context: impl FnOnce() -> String,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<T> {
        self.run_pooled(Some(self.settings.response_timeout), context, f)
    }

    /// Runs `op` again while Redis cannot be reached (a connection refused, dropped or timed
    /// out), for at most the response timeout from the first failure, pausing 200 ms between
    /// attempts; a reply from Redis, error or not, ends it. Only for operations whose repetition
    /// is harmless (reads, and writes the reader deduplicates): when a connection drops, a write
    /// may or may not have been applied.
    pub fn retry_unreachable<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        let mut unreachable_since: Option<std::time::Instant> = None;
        loop {
            let attempt_started = std::time::Instant::now();
            match op() {
                Err(e) if e.is_store_unreachable() => {
                    let since = *unreachable_since.get_or_insert(attempt_started);
                    if since.elapsed() >= self.settings.response_timeout {
                        return Err(e);
                    }
                    tracing::debug!("{e}; retrying");
                    std::thread::sleep(
                        Duration::from_millis(200).min(self.settings.response_timeout),
                    );
                }
                other => return other,
            }
        }
    }

    /// Runs a blocking command on a pooled connection. `block` is the timeout the command itself
    /// carries (`None`: it blocks until served); the client waits that long plus the response
    /// timeout before it gives up, and then discards the connection.
    pub fn with_blocking_conn<T>(
        &self,
        block: Option<Duration>,
        context: impl FnOnce() -> String,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let read_timeout = block.map(|b| b.saturating_add(self.settings.response_timeout));
        self.run_pooled(read_timeout, context, f)
    }

    /// Runs `f` on `held`, a connection kept by one caller across calls (see [`HeldConn`]),
    /// connecting first when it has none. `block` is the timeout a blocking command carries,
    /// as in [`Store::with_blocking_conn`] (`Some(Duration::ZERO)` for ordinary commands: the
    /// client waits for the response timeout; `None`: no limit). After an error that may have
    /// left the connection unusable (no reply from the server), the connection is closed, and
    /// with it any state it held: the next call opens a new one, and
    /// [`HeldConn::generation`] tells them apart.
    pub fn with_held_conn<T>(
        &self,
        held: &mut HeldConn,
        block: Option<Duration>,
        context: impl FnOnce() -> String,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let read_timeout = block.map(|b| b.saturating_add(self.settings.response_timeout));
        let pooled = match &mut held.pooled {
            Some(pooled) => pooled,
            None => {
                let number = self.idle.lock().unwrap_or_else(|p| p.into_inner()).number();
                match self.open_sync() {
                    Ok(pooled) => {
                        held.number = number;
                        held.generation += 1;
                        held.pooled.insert(pooled)
                    }
                    Err(e) => return Err(Error::redis(context(), e)),
                }
            }
        };
        let (result, outcome) = pooled.run(read_timeout, f)?;
        if outcome != Outcome::Reusable {
            let closed = held.pooled.take();
            held.generation += 1;
            // Not pooled, but opened to the same server as the pool's connections: a loss
            // says the ones opened before it are gone too.
            if outcome == Outcome::Lost
                && let Some(closed) = closed
            {
                self.put_back(closed, held.number, outcome);
            }
        }
        result.map_err(|e| Error::redis(context(), e))
    }

    fn run_pooled<T>(
        &self,
        read_timeout: Option<Duration>,
        context: impl FnOnce() -> String,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take();
        let taken = match taken {
            Ok((pooled, number)) => self.checked_if_idle(pooled, number),
            Err(number) => Err(number),
        };
        let (mut pooled, number) = match taken {
            Ok(taken) => taken,
            Err(number) => match self.open_sync() {
                Ok(pooled) => (pooled, number),
                Err(e) => return Err(Error::redis(context(), e)),
            },
        };
        let (result, outcome) = pooled.run(read_timeout, f)?;
        self.put_back(pooled, number, outcome);
        result.map_err(|e| Error::redis(context(), e))
    }

    /// `pooled` (connection `number`, just taken from the idle ones) as it is, or, when it was
    /// idle for [`CHECK_IDLE_AFTER`] or more, once a `PING` on it was answered. One that does
    /// not answer is dropped as lost (with the idle ones opened before it): the number of the
    /// connection to open instead.
    fn checked_if_idle(
        &self,
        mut pooled: Pooled,
        number: u64,
    ) -> std::result::Result<(Pooled, u64), u64> {
        if pooled.used.elapsed() < CHECK_IDLE_AFTER {
            return Ok((pooled, number));
        }
        let timeout = Some(self.settings.response_timeout);
        match pooled.run(timeout, |c| redis::cmd("PING").query::<()>(c)) {
            Ok((Ok(()), Outcome::Reusable)) => Ok((pooled, number)),
            Ok((_, outcome)) => {
                tracing::debug!("an idle connection to Redis no longer answers: dropped");
                let outcome = if outcome == Outcome::Reusable {
                    Outcome::Discard
                } else {
                    outcome
                };
                self.put_back(pooled, number, outcome);
                Err(self.idle.lock().unwrap_or_else(|p| p.into_inner()).number())
            }
            Err(_) => Err(self.idle.lock().unwrap_or_else(|p| p.into_inner()).number()),
        }
    }

    /// Gives synchronous connection `number` back to the pool (see [`IdlePool::put_back`]).
    fn put_back(&self, pooled: Pooled, number: u64, outcome: Outcome) {
        let dropped = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put_back(pooled, number, outcome, MAX_IDLE);
        // Closed here, with the pool unlocked.
        drop(dropped);
    }

    fn open_sync(&self) -> RedisResult<Pooled> {
        let conn = self
            .client
            .get_connection_with_timeout(self.settings.connect_timeout)?;
        conn.set_read_timeout(Some(self.settings.response_timeout))?;
        conn.set_write_timeout(Some(self.settings.response_timeout))?;
        Ok(Pooled {
            conn,
            read_timeout: Some(self.settings.response_timeout),
            used: std::time::Instant::now(),
        })
    }

    /// The shared async multiplexed connection, for ordinary commands sent by actors. It
    /// reconnects after Redis went away, and opens a new connection after its server answered
    /// `READONLY` (see [`SharedConnection`]).
    ///
    /// The connection's driver runs on the Tokio runtime of the first caller, so only the
    /// runtime's actor system, which lives as long as the store is used, may call this.
    pub async fn multiplexed(&self) -> Result<SharedConnection> {
        self.multiplexed
            .get(&self.client, &self.settings)
            .await
            .map_err(|e| Error::redis(format!("connecting to {}", self.display_url()), e))
    }

    /// A new async connection for one actor that sends blocking commands with timeouts up to
    /// `block` (`None`: unbounded).
    pub async fn dedicated(&self, block: Option<Duration>) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(block.map(|b| b.saturating_add(self.settings.response_timeout)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::redis(format!("connecting to {}", self.display_url()), e))
    }

    /// Deletes every key of this store's namespace; returns how many were deleted.
    pub fn clean_namespace(&self) -> Result<u64> {
        let pattern = self.keys.pattern();
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = self.with_conn(
                || format!("scanning {pattern}"),
                |c| {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query(c)
                },
            )?;
            if !keys.is_empty() {
                let n: u64 = self.with_conn(
                    || format!("deleting keys of {pattern}"),
                    |c| redis::cmd("UNLINK").arg(&keys).query(c),
                )?;
                deleted += n;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(deleted);
            }
        }
    }
}

/// Idle dedicated async connections kept for reuse by one [`AsyncStore`].
const MAX_IDLE_BLOCKING: usize = 64;

/// Async access to a [`Store`] from one Tokio runtime (the actor system's): the connections
/// opened on that runtime, and the calls run there ([`AsyncStore::spawn`]). See the module docs.
pub struct AsyncStore {
    store: Arc<Store>,
    runtime: tokio::runtime::Handle,
    shared: SharedSlot,
    blocking: Mutex<IdlePool<MultiplexedConnection>>,
}

impl std::fmt::Debug for AsyncStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncStore")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl AsyncStore {
    /// Async access to `store` from `runtime`, where every call of it runs.
    pub fn new(store: Arc<Store>, runtime: tokio::runtime::Handle) -> Arc<AsyncStore> {
        Arc::new(AsyncStore {
            store,
            runtime,
            shared: SharedSlot::default(),
            blocking: Mutex::new(IdlePool::new()),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The runtime the calls run on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Runs `work` as a task on this store's runtime; the returned future resolves to what it
    /// answers through its [`Caller`]. See `crate::actors` for what dropping that future does.
    pub fn spawn<T, F, Fut>(self: &Arc<Self>, work: F) -> AsyncCall<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<AsyncStore>, Caller<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let store = self.clone();
        actors::spawn_call(&self.runtime, move |caller| work(store, caller))
    }

    /// The shared multiplexed connection of this runtime, for ordinary commands and scripts
    /// (a cheap clone). It reconnects after Redis went away, and opens a new connection after
    /// its server answered `READONLY` (see [`SharedConnection`]). Call it only from tasks of
    /// this store's runtime: its driver runs where it was opened.
    pub async fn shared(&self) -> Result<SharedConnection> {
        self.shared
            .get(&self.store.client, &self.store.settings)
            .await
            .map_err(|e| Error::redis(format!("connecting to {}", self.store.display_url()), e))
    }

    /// Runs a blocking command whose own timeout is `block` on a dedicated connection of the
    /// pool; the client waits `block` plus the response timeout. A connection whose command
    /// failed on I/O or timed out is dropped; one that was lost takes the connections opened
    /// before it along (see the module docs). Call it only from tasks of this store's runtime.
    pub async fn blocking<T: redis::FromRedisValue>(
        &self,
        block: Duration,
        context: impl FnOnce() -> String,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        self.on_dedicated(block, context, Dedicated::Cmd(cmd)).await
    }

    /// As [`AsyncStore::blocking`], for a pipeline that ends with a blocking command whose
    /// own timeout is `block` (a send and the wait for its answer, in one round trip).
    pub async fn blocking_pipe<T: redis::FromRedisValue>(
        &self,
        block: Duration,
        context: impl FnOnce() -> String,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        self.on_dedicated(block, context, Dedicated::Pipe(pipe))
            .await
    }

    async fn on_dedicated<T: redis::FromRedisValue>(
        &self,
        block: Duration,
        context: impl FnOnce() -> String,
        request: Dedicated<'_>,
    ) -> Result<T> {
        let response_timeout = block.saturating_add(self.store.settings.response_timeout);
        let taken = self
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (mut conn, number) = match taken {
            Ok(taken) => taken,
            Err(number) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.store.settings.connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                match self
                    .store
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    Ok(conn) => (conn, number),
                    Err(e) => return Err(Error::redis(context(), e)),
                }
            }
        };
        conn.set_response_timeout(response_timeout);
        let result: RedisResult<T> = match request {
            Dedicated::Cmd(cmd) => cmd.query_async(&mut conn).await,
            Dedicated::Pipe(pipe) => pipe.query_async(&mut conn).await,
        };
        let outcome = match &result {
            Ok(_) => Outcome::Reusable,
            Err(e) => Outcome::of_error(e),
        };
        let dropped = self
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put_back(conn, number, outcome, MAX_IDLE_BLOCKING);
        // Closed here, with the pool unlocked.
        drop(dropped);
        result.map_err(|e| Error::redis(context(), e))
    }
}

/// What runs on a dedicated connection.
enum Dedicated<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedRedis;

    fn settings() -> StoreSettings {
        StoreSettings::from_config(&Config::default())
    }

    #[test]
    fn unreachable_redis_is_a_clear_error() {
        let mut s = settings();
        s.connect_timeout = Duration::from_millis(300);
        match Store::connect("redis://127.0.0.1:1", s) {
            Err(Error::Redis { context, .. }) => {
                assert!(
                    context.contains("connecting to redis://127.0.0.1:1"),
                    "{context}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pooled_and_blocking_connections() {
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let store = Store::connect(&server.url(), settings()).expect("connects");
        store
            .with_conn(
                || "rpush".into(),
                |c| redis::cmd("RPUSH").arg("l").arg(1).query::<()>(c),
            )
            .expect("rpush");
        let got: Option<(String, i64)> = store
            .with_blocking_conn(
                Some(Duration::from_millis(100)),
                || "blpop".into(),
                |c| redis::cmd("BLPOP").arg("l").arg(0.1).query(c),
            )
            .expect("blpop");
        assert_eq!(got, Some(("l".into(), 1)));
        let start = std::time::Instant::now();
        let none: Option<(String, i64)> = store
            .with_blocking_conn(
                Some(Duration::from_millis(200)),
                || "blpop".into(),
                |c| redis::cmd("BLPOP").arg("l").arg(0.2).query(c),
            )
            .expect("blpop times out server-side");
        assert_eq!(none, None);
        assert!(start.elapsed() >= Duration::from_millis(190));
        // A server error keeps the connection; a wrong-type reply is such an error.
        let err = store.with_conn(
            || "incr on a list".into(),
            |c| {
                redis::cmd("INCR")
                    .arg("missing-list")
                    .arg("extra")
                    .query::<i64>(c)
            },
        );
        assert!(matches!(err, Err(Error::Redis { .. })));
        assert!(store.idle.lock().expect("lock").len() >= 1);
    }

    #[test]
    fn async_blocking_commands_wait_on_dedicated_connections() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let store = Arc::new(Store::connect(&server.url(), settings()).expect("connects"));
        let system = crate::actors::ActorSystem::start("test-async-store").expect("actors");
        let async_store = AsyncStore::new(store.clone(), system.runtime().clone());
        let call = async_store.spawn(
            |s, caller: Caller<(bool, Option<(String, i64)>)>| async move {
                let popped = AtomicBool::new(false);
                // Redis's own timeout ends this wait (2 s): it holds its own connection meanwhile.
                let waiting = async {
                    let cmd = {
                        let mut cmd = redis::cmd("BLPOP");
                        cmd.arg("empty").arg(2);
                        cmd
                    };
                    let got: Option<(String, i64)> = s
                        .blocking(Duration::from_secs(2), || "blpop".into(), &cmd)
                        .await
                        .expect("blpop");
                    popped.store(true, Ordering::SeqCst);
                    got
                };
                // Meanwhile the shared connection answers, and another waiter is served.
                let others = async {
                    let mut shared = s.shared().await.expect("shared");
                    for _ in 0..10 {
                        let _: String = redis::cmd("PING")
                            .query_async(&mut shared)
                            .await
                            .expect("ping");
                    }
                    let _: () = redis::cmd("RPUSH")
                        .arg("full")
                        .arg(7)
                        .query_async(&mut shared)
                        .await
                        .expect("rpush");
                    let mut cmd = redis::cmd("BLPOP");
                    cmd.arg("full").arg(2);
                    let got: Option<(String, i64)> = s
                        .blocking(Duration::from_secs(2), || "blpop".into(), &cmd)
                        .await
                        .expect("blpop");
                    assert_eq!(got, Some(("full".into(), 7)));
                    popped.load(Ordering::SeqCst)
                };
                let (timed_out, others_saw_it_pop) = futures::future::join(waiting, others).await;
                caller.finish(Ok((others_saw_it_pop, timed_out)));
            },
        );
        let (others_saw_it_pop, timed_out) = futures::executor::block_on(call).expect("call");
        assert!(
            !others_saw_it_pop,
            "the other commands waited for the BLPOP"
        );
        assert_eq!(timed_out, None);
        // Both dedicated connections went back to the pool (each answered).
        assert_eq!(async_store.blocking.lock().expect("pool").len(), 2);
    }

    /// A connection to `url` of its own, to look at and break what the store holds.
    fn admin(url: &str) -> redis::Connection {
        redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .expect("admin connection")
    }

    /// Has the server close every client connection but `admin`'s, as a restart does.
    fn close_clients(admin: &mut redis::Connection) -> usize {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query(admin)
            .expect("CLIENT KILL")
    }

    #[test]
    fn idle_connections_of_a_server_gone_are_dropped_at_the_first_loss() {
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let store = Arc::new(Store::connect(&server.url(), settings()).expect("connects"));
        // Eight waits at once: eight connections, idle afterwards.
        let waits: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store.with_blocking_conn(
                        Some(Duration::from_millis(300)),
                        || "blpop".into(),
                        |c| {
                            redis::cmd("BLPOP")
                                .arg("nothing")
                                .arg(0.3)
                                .query::<Option<(String, i64)>>(c)
                        },
                    )
                })
            })
            .collect();
        for wait in waits {
            assert_eq!(wait.join().expect("thread").expect("blpop"), None);
        }
        let idle = store.idle.lock().expect("pool").len();
        assert!(idle >= 4, "{idle} idle connections");
        let mut admin = admin(&server.url());
        assert!(close_clients(&mut admin) >= idle);
        let failures: Vec<Error> = (0..10)
            .filter_map(|_| {
                store
                    .with_conn(
                        || "incr".into(),
                        |c| redis::cmd("INCR").arg("n").query::<i64>(c),
                    )
                    .err()
            })
            .collect();
        // The first command may meet a closed connection (it went out before the client could
        // know); it takes the others along.
        assert!(failures.len() <= 1, "{failures:?}");
        assert!(
            failures.iter().all(Error::is_store_unreachable),
            "{failures:?}"
        );
        let n: i64 = redis::cmd("GET").arg("n").query(&mut admin).expect("get");
        assert_eq!(n, 10 - failures.len() as i64);
        assert_eq!(store.idle.lock().expect("pool").len(), 1);
    }

    #[test]
    fn a_lost_connection_does_not_drop_those_opened_after_it() {
        let mut pool = IdlePool::new();
        // Four connections opened to the first server.
        let numbers: Vec<u64> = (0..4)
            .map(|_| pool.take().expect_err("none idle"))
            .collect();
        assert!(
            pool.put_back("a", numbers[0], Outcome::Reusable, 8)
                .is_empty()
        );
        assert_eq!(pool.len(), 1);
        // It goes away: `b`, in use, is lost, and `a`, idle, goes with it.
        assert_eq!(
            pool.put_back("b", numbers[1], Outcome::Lost, 8),
            vec!["a", "b"]
        );
        assert_eq!(pool.len(), 0);
        // A connection to the server there now is kept.
        let fresh = pool.take().expect_err("none idle");
        assert!(
            pool.put_back("fresh", fresh, Outcome::Reusable, 8)
                .is_empty()
        );
        // Those opened before the loss and in use during it are not kept: one failing late
        // drops only itself, one that succeeded is dropped all the same.
        assert_eq!(pool.put_back("c", numbers[2], Outcome::Lost, 8), vec!["c"]);
        assert_eq!(
            pool.put_back("d", numbers[3], Outcome::Reusable, 8),
            vec!["d"]
        );
        assert_eq!(pool.take(), Ok(("fresh", fresh)));
        assert_eq!(
            pool.put_back("fresh", fresh, Outcome::Discard, 8),
            vec!["fresh"]
        );
        assert_eq!(pool.len(), 0);
        // At most `max` idle.
        let numbers: Vec<u64> = (0..3)
            .map(|_| pool.take().expect_err("none idle"))
            .collect();
        for (name, number) in ["x", "y"].into_iter().zip(&numbers) {
            assert!(
                pool.put_back(name, *number, Outcome::Reusable, 2)
                    .is_empty()
            );
        }
        assert_eq!(
            pool.put_back("z", numbers[2], Outcome::Reusable, 2),
            vec!["z"]
        );
    }

    #[test]
    fn dedicated_connections_of_a_server_gone_are_dropped_at_the_first_loss() {
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let store = Arc::new(Store::connect(&server.url(), settings()).expect("connects"));
        let system = crate::actors::ActorSystem::start("test-lost-dedicated").expect("actors");
        let async_store = AsyncStore::new(store.clone(), system.runtime().clone());
        let blpop = |key: &str, seconds: f64| {
            let mut cmd = redis::cmd("BLPOP");
            cmd.arg(key).arg(seconds);
            cmd
        };
        // Eight waits at once: eight dedicated connections, idle afterwards.
        let empty = blpop("nothing", 0.3);
        let call = async_store.spawn(move |s, caller: Caller<usize>| async move {
            let waits = (0..8).map(|_| {
                s.blocking::<Option<(String, i64)>>(
                    Duration::from_millis(300),
                    || "blpop".into(),
                    &empty,
                )
            });
            let waited = futures::future::join_all(waits).await;
            caller.finish(Ok(waited.iter().filter(|w| matches!(w, Ok(None))).count()));
        });
        assert_eq!(futures::executor::block_on(call).expect("call"), 8);
        assert_eq!(async_store.blocking.lock().expect("pool").len(), 8);
        let mut admin = admin(&server.url());
        assert!(close_clients(&mut admin) >= 8);
        let _: () = redis::cmd("RPUSH")
            .arg("items")
            .arg(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            .query(&mut admin)
            .expect("rpush");
        let item = blpop("items", 1.0);
        let call = async_store.spawn(
            move |s, caller: Caller<Vec<Result<(String, i64)>>>| async move {
                let mut got = Vec::new();
                for _ in 0..10 {
                    got.push(
                        s.blocking::<Option<(String, i64)>>(
                            Duration::from_secs(1),
                            || "blpop".into(),
                            &item,
                        )
                        .await
                        .map(|popped| popped.expect("an item")),
                    );
                }
                caller.finish(Ok(got));
            },
        );
        let got = futures::executor::block_on(call).expect("call");
        let failures: Vec<&Error> = got.iter().filter_map(|g| g.as_ref().err()).collect();
        assert!(failures.len() <= 1, "{got:?}");
        assert!(failures.iter().all(|e| e.is_store_unreachable()), "{got:?}");
        // The pop that met the lost connection did not reach Redis: its item is still there.
        let left: i64 = redis::cmd("LLEN")
            .arg("items")
            .query(&mut admin)
            .expect("llen");
        assert_eq!(left, failures.len() as i64);
    }

    #[test]
    fn a_readonly_reply_drops_the_connection() {
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let store = Store::connect(&server.url(), settings()).expect("connects");
        let set = |c: &mut redis::Connection| redis::cmd("SET").arg("k").arg(1).query::<()>(c);
        store.with_conn(|| "set".into(), set).expect("set");
        assert_eq!(store.idle.lock().expect("pool").len(), 1);
        // The server becomes a replica (of no server that exists): it refuses writes.
        let mut admin = admin(&server.url());
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(1)
            .query(&mut admin)
            .expect("replicaof");
        match store.with_conn(|| "set".into(), set) {
            Err(Error::Redis { source, .. }) => assert_eq!(source.code(), Some("READONLY")),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.idle.lock().expect("pool").len(), 0);
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query(&mut admin)
            .expect("replicaof no one");
        store.with_conn(|| "set".into(), set).expect("set");
    }

    #[test]
    fn a_reply_that_does_not_convert_is_not_sent_again() {
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let mut s = settings();
        s.response_timeout = Duration::from_secs(3);
        let store = Store::connect(&server.url(), s).expect("connects");
        let started = std::time::Instant::now();
        let result = store.retry_unreachable(|| {
            store.with_conn(
                || "incr".into(),
                |c| redis::cmd("INCR").arg("k").query::<Vec<String>>(c),
            )
        });
        // INCR answers an integer, which is not a list: Redis answered, the write was applied.
        let e = result.expect_err("not a list");
        assert!(!e.is_store_unreachable(), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let n: i64 = store
            .with_conn(|| "get".into(), |c| redis::cmd("GET").arg("k").query(c))
            .expect("get");
        assert_eq!(n, 1);
    }

    #[test]
    fn a_wrong_password_fails_at_once_and_says_so() {
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all"])
            .query(&mut admin(&server.url()))
            .expect("acl setuser");
        let mut s = settings();
        s.response_timeout = Duration::from_secs(5);
        let wrong = format!("{}?user=app&pass=wrong", server.url());
        let started = std::time::Instant::now();
        let e = Store::connect(&wrong, s.clone()).expect_err("a wrong password");
        assert!(!e.is_store_unreachable(), "{e}");
        assert!(e.to_string().contains("authentication failed"), "{e}");
        assert!(!e.to_string().contains("wrong"), "the password leaked: {e}");
        let lazy = Store::connect_lazy(&wrong, s.clone()).expect("lazy");
        let e = lazy
            .retry_unreachable(|| {
                lazy.with_conn(|| "ping".into(), |c| redis::cmd("PING").query::<()>(c))
            })
            .expect_err("a wrong password");
        assert!(!e.is_store_unreachable(), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let right = format!("{}?user=app&pass=s3cret", server.url());
        Store::connect(&right, s).expect("the right password");
    }

    #[test]
    fn clean_removes_only_the_namespace() {
        let server = EmbeddedRedis::start("redis-server", Duration::from_secs(5)).expect("redis");
        let store = Store::connect(&server.url(), settings()).expect("connects");
        let k = store.keys().object("proc", "1").key("task");
        store
            .with_conn(
                || "set".into(),
                |c| {
                    redis::pipe()
                        .set(&k, 1)
                        .set("shoal:{other:proc:1}:task", 1)
                        .query::<()>(c)
                },
            )
            .expect("set");
        assert_eq!(store.clean_namespace().expect("clean"), 1);
        let left: i64 = store
            .with_conn(|| "dbsize".into(), |c| redis::cmd("DBSIZE").query(c))
            .expect("dbsize");
        assert_eq!(left, 1);
    }
}
