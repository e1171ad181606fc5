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
//! * **One async multiplexed connection** ([`Store::multiplexed`]) for actors, which reconnects
//!   by itself after Redis went away and came back (redis-rs's `ConnectionManager`: the command
//!   that met the broken connection fails, the next ones use a new one), and dedicated async
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

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ConnectionLike, RedisError, RedisResult};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::actors::{self, AsyncCall, Caller};
use crate::codec;
use crate::config::{Config, redact_url};
use crate::error::{Error, Result};
pub use keys::{KeySpace, ObjectKeys};

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
    idle: Mutex<Vec<Pooled>>,
    multiplexed: tokio::sync::OnceCell<ConnectionManager>,
}

/// A pooled synchronous connection and the read timeout its socket has now (changing it is a
/// system call; blocking calls with the same wait reuse it as it is).
struct Pooled {
    conn: redis::Connection,
    read_timeout: Option<Duration>,
}

impl Pooled {
    /// Runs `f` with the socket's read timeout set to `read_timeout`; returns its result and
    /// whether the connection may be used again (it is open, and any error was the server's
    /// answer, not a failure to get one).
    fn run<T>(
        &mut self,
        read_timeout: Option<Duration>,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<(RedisResult<T>, bool)> {
        if self.read_timeout != read_timeout {
            self.conn
                .set_read_timeout(read_timeout)
                .map_err(|e| Error::redis("setting a read timeout", e))?;
            self.read_timeout = read_timeout;
        }
        let result = f(&mut self.conn);
        let usable = match &result {
            Ok(_) => self.conn.is_open(),
            Err(e) => is_server_reply(e) && self.conn.is_open(),
        };
        Ok((result, usable))
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
            idle: Mutex::new(Vec::new()),
            multiplexed: tokio::sync::OnceCell::new(),
        };
        Ok(store)
    }

    /// The same server and idle connections under other settings (namespace, limits, timeouts).
    pub fn with_settings(self, settings: StoreSettings) -> Store {
        let mut idle = self.idle.into_inner().unwrap_or_else(|p| p.into_inner());
        for pooled in &mut idle {
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
            multiplexed: tokio::sync::OnceCell::new(),
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
        let read_timeout = block.map(|b| b + self.settings.response_timeout);
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
        let read_timeout = block.map(|b| b + self.settings.response_timeout);
        let pooled = match &mut held.pooled {
            Some(pooled) => pooled,
            None => match self.open_sync() {
                Ok(pooled) => {
                    held.generation += 1;
                    held.pooled.insert(pooled)
                }
                Err(e) => return Err(Error::redis(context(), e)),
            },
        };
        let (result, usable) = pooled.run(read_timeout, f)?;
        if !usable {
            held.pooled = None;
            held.generation += 1;
        }
        result.map_err(|e| Error::redis(context(), e))
    }

    fn run_pooled<T>(
        &self,
        read_timeout: Option<Duration>,
        context: impl FnOnce() -> String,
        f: impl FnOnce(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut pooled = match pooled {
            Some(pooled) => pooled,
            None => match self.open_sync() {
                Ok(pooled) => pooled,
                Err(e) => return Err(Error::redis(context(), e)),
            },
        };
        let (result, reusable) = pooled.run(read_timeout, f)?;
        if reusable {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(pooled);
            }
        }
        result.map_err(|e| Error::redis(context(), e))
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
        })
    }

    /// The shared async multiplexed connection, for ordinary commands sent by actors. It
    /// reconnects after Redis went away (see the module docs).
    ///
    /// The connection's driver runs on the Tokio runtime of the first caller, so only the
    /// runtime's actor system, which lives as long as the store is used, may call this.
    pub async fn multiplexed(&self) -> Result<ConnectionManager> {
        self.multiplexed
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.settings.connect_timeout))
                    .set_response_timeout(Some(self.settings.response_timeout))
                    // A failed command is reported at once; the reconnection goes on behind.
                    .set_number_of_retries(1)
                    .set_max_delay(std::time::Duration::from_millis(500));
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await
            .cloned()
            .map_err(|e| Error::redis(format!("connecting to {}", self.display_url()), e))
    }

    /// A new async connection for one actor that sends blocking commands with timeouts up to
    /// `block` (`None`: unbounded).
    pub async fn dedicated(&self, block: Option<Duration>) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(block.map(|b| b + self.settings.response_timeout));
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
    shared: tokio::sync::OnceCell<ConnectionManager>,
    blocking: Mutex<Vec<MultiplexedConnection>>,
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
            shared: tokio::sync::OnceCell::new(),
            blocking: Mutex::new(Vec::new()),
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
    /// (a cheap clone). It reconnects after Redis went away. Call it only from tasks of this
    /// store's runtime: its driver runs where it was first opened.
    pub async fn shared(&self) -> Result<ConnectionManager> {
        let settings = &self.store.settings;
        self.shared
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(settings.connect_timeout))
                    .set_response_timeout(Some(settings.response_timeout))
                    // A failed command is reported at once; the reconnection goes on behind.
                    .set_number_of_retries(1)
                    .set_max_delay(std::time::Duration::from_millis(500));
                ConnectionManager::new_with_config(self.store.client.clone(), config).await
            })
            .await
            .cloned()
            .map_err(|e| Error::redis(format!("connecting to {}", self.store.display_url()), e))
    }

    /// Runs a blocking command whose own timeout is `block` on a dedicated connection of the
    /// pool; the client waits `block` plus the response timeout. A connection whose command
    /// failed on I/O or timed out is dropped. Call it only from tasks of this store's runtime.
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
        let response_timeout = block + self.store.settings.response_timeout;
        let pooled = self
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.store.settings.connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                match self
                    .store
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    Ok(conn) => conn,
                    Err(e) => return Err(Error::redis(context(), e)),
                }
            }
        };
        conn.set_response_timeout(response_timeout);
        let result: RedisResult<T> = match request {
            Dedicated::Cmd(cmd) => cmd.query_async(&mut conn).await,
            Dedicated::Pipe(pipe) => pipe.query_async(&mut conn).await,
        };
        let reusable = match &result {
            Ok(_) => true,
            Err(e) => is_server_reply(e),
        };
        if reusable {
            let mut idle = self.blocking.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE_BLOCKING {
                idle.push(conn);
            }
        }
        result.map_err(|e| Error::redis(context(), e))
    }
}

/// What runs on a dedicated connection.
enum Dedicated<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

/// True when the error is a reply from the server (the connection is still in step).
fn is_server_reply(e: &RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error())
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
        assert!(!store.idle.lock().expect("lock").is_empty());
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
