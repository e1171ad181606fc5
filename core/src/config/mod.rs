//! Configuration: `config.yaml`, `SHOAL_*` environment overrides and [`ConfigBuilder`].
//!
//! # Where it comes from
//!
//! [`Config::load`] reads the first file that exists of `$SHOAL_CONFIG`, `./config.yaml` and
//! `~/.shoal/config.yaml` (a `SHOAL_CONFIG` that names a missing file is an error), falls back to
//! the built-in defaults when there is none, then applies environment overrides named
//! `SHOAL_<SECTION>_<KEY>` (`SHOAL_LOCAL_START_METHOD=thread`, `SHOAL_REDIS_URL=redis://...`;
//! `SHOAL_BACKEND` and `SHOAL_NAMESPACE` for the `shoal` section). A string key takes an
//! override's value as written (`SHOAL_NAMESPACE=2024`, a URL with ` #` in it); any other key
//! reads it as YAML, so `true`, `3600`, `null` and `{A: b}` have their YAML types. An empty value
//! is null, which unsets an optional key (`SHOAL_KUBERNETES_IMAGE=`). A variable whose name or
//! value is not UTF-8 is an error if its name starts with `SHOAL_`, and ignored otherwise
//! (`SHOAL_CONFIG` is a path, which may be any bytes). The variables Kubernetes sets in a pod for
//! each Service of its namespace (for a Service `shoal-redis`: `SHOAL_REDIS_SERVICE_HOST`,
//! `SHOAL_REDIS_PORT=tcp://...`; only with the value Kubernetes gives them, and never the name
//! of a key) are not overrides and are ignored. [`ConfigBuilder`] builds the same structure in
//! code.
//!
//! # Errors
//!
//! An unknown section or key, a value of the wrong type or an impossible value is an
//! [`Error::Config`] naming the dotted key (`redis.expiry_secs`) and where the value came from: the
//! file's path, the environment variable, `code` or `built-in defaults`. Nothing is silently
//! ignored. Every numeric key has a range (documented beside the key in `config.yaml`; `NaN` and
//! infinities are outside every range), checked when the configuration is loaded or built and
//! again by `shoal::init_with`.
//!
//! The `*_secs` keys have accessors that return a [`Duration`] ([`SyncConfig::lease`],
//! [`PoolConfig::task_lease`], ...). They never panic, even on a [`Config`] assembled by hand
//! with impossible values: such a value is clamped into its key's range (`NaN` becomes the
//! key's default). Validation is where the user learns about it. The `lambda` and `http`
//! sections of the design are not built yet and are rejected with a message that says so.
//!
//! A remote backend (`kubernetes`) runs workers on other hosts: it needs a `redis.url` they can
//! reach (not a Unix socket, and not a loopback address unless
//! `kubernetes.redis_url_secret` gives the workers another one) and `kubernetes.image`.
//!
//! The documented default file is `config.yaml` at the top of the repository; every key there has
//! its default value.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use yaml_serde::{Mapping, Value};

use crate::error::{Error, Result};

pub mod kubernetes;
pub use kubernetes::{ImagePullPolicy, KubernetesConfig, Resources, SecretKeyRef, Toleration};

/// The sections `config.yaml` may contain.
pub const SECTIONS: &[&str] = &[
    "shoal",
    "redis",
    "local",
    "pool",
    "sync",
    "multiprocessing",
    "kubernetes",
    "actors",
];

/// Sections of the design whose backends are not built yet.
const UNBUILT_SECTIONS: &[&str] = &["lambda", "http"];

/// Environment variables with the `SHOAL_` prefix that are not configuration overrides.
const RESERVED_ENV: &[&str] = &["SHOAL_CONFIG", "SHOAL_LOG"];

/// Prefix of the variables shoal's own test suites read (`SHOAL_TEST_IMAGE`...): not
/// configuration.
pub const TEST_ENV_PREFIX: &str = "SHOAL_TEST_";

/// Prefix of the variables a backend sets for a worker process (the task's address).
pub const WORKER_ENV_PREFIX: &str = "SHOAL_WORKER_";

/// The allowed values of a numeric key, both ends included.
#[derive(Clone, Copy, Debug)]
struct KeyRange {
    /// The dotted key.
    key: &'static str,
    low: f64,
    high: f64,
    /// What the number counts, for messages.
    unit: &'static str,
}

impl KeyRange {
    /// `0.1 ..= 86400`, as config.yaml writes it.
    fn text(&self) -> String {
        format!("{} ..= {}", self.low, self.high)
    }

    /// `Err(reason)` unless `value` is a number inside the range.
    fn check(&self, value: f64) -> std::result::Result<(), String> {
        if value.is_finite() && (self.low..=self.high).contains(&value) {
            Ok(())
        } else {
            Err(format!(
                "{value} is outside {} ({})",
                self.text(),
                self.unit
            ))
        }
    }

    /// `secs` as a duration, clamped into the range; `NaN` is `default`. Never panics.
    fn duration(&self, secs: f64, default: f64) -> Duration {
        let secs = if secs.is_nan() {
            default
        } else {
            secs.clamp(self.low, self.high)
        };
        Duration::try_from_secs_f64(secs).unwrap_or_default()
    }
}

const EXPIRY: KeyRange = KeyRange {
    key: "redis.expiry_secs",
    low: 1.0,
    // A year: every key shoal writes is refreshed when used.
    high: 31_536_000.0,
    unit: "seconds",
};
const MAX_MESSAGE: KeyRange = KeyRange {
    key: "redis.max_message_bytes",
    low: 1024.0,
    // Redis's own bulk limit.
    high: 536_870_912.0,
    unit: "bytes, Redis's own bulk limit is 536870912",
};
const CONNECT_TIMEOUT: KeyRange = KeyRange {
    key: "redis.connect_timeout_secs",
    low: 0.001,
    high: 86_400.0,
    unit: "seconds",
};
const RESPONSE_TIMEOUT: KeyRange = KeyRange {
    key: "redis.response_timeout_secs",
    low: 0.001,
    high: 86_400.0,
    unit: "seconds",
};
const WORKERS: KeyRange = KeyRange {
    key: "local.workers",
    low: 1.0,
    high: 1024.0,
    unit: "worker processes, or null for the CPU count",
};
const RETRIES: KeyRange = KeyRange {
    key: "pool.retries",
    low: 0.0,
    high: 1000.0,
    unit: "redeliveries",
};
const TASK_LEASE: KeyRange = KeyRange {
    key: "pool.task_lease_secs",
    low: 0.1,
    high: 86_400.0,
    unit: "seconds",
};
const MAX_RESTARTS: KeyRange = KeyRange {
    key: "pool.max_restarts",
    low: 0.0,
    high: 100_000.0,
    unit: "restarts",
};
const RESTART_PERIOD: KeyRange = KeyRange {
    key: "pool.restart_period_secs",
    low: 0.1,
    high: 86_400.0,
    unit: "seconds",
};
const LEASE: KeyRange = KeyRange {
    key: "sync.lease_secs",
    // The heartbeat renews every third of the lease: below this a busy machine loses holds.
    low: 0.1,
    high: 86_400.0,
    unit: "seconds",
};
const ACTOR_HOSTS: KeyRange = KeyRange {
    key: "actors.hosts",
    low: 1.0,
    high: 64.0,
    unit: "host processes",
};
const ACTOR_LEASE: KeyRange = KeyRange {
    key: "actors.lease_secs",
    low: 0.1,
    high: 3600.0,
    unit: "seconds",
};
const ACTOR_IDLE: KeyRange = KeyRange {
    key: "actors.idle_secs",
    low: 1.0,
    high: 86_400.0,
    unit: "seconds",
};
const ACTOR_RESTARTS: KeyRange = KeyRange {
    key: "actors.max_restarts",
    low: 0.0,
    high: 1000.0,
    unit: "handler panics",
};
const ACTOR_RESTART_PERIOD: KeyRange = KeyRange {
    key: "actors.restart_period_secs",
    low: 0.1,
    high: 86_400.0,
    unit: "seconds",
};
const JOB_TTL: KeyRange = KeyRange {
    key: "kubernetes.ttl_seconds_after_finished",
    low: 0.0,
    high: 31_536_000.0,
    unit: "seconds, or null to keep finished Jobs",
};
const JOB_DEADLINE: KeyRange = KeyRange {
    key: "kubernetes.active_deadline_seconds",
    low: 1.0,
    high: 31_536_000.0,
    unit: "seconds, or null for no limit",
};
const POD_CREATE_GRACE: KeyRange = KeyRange {
    key: "kubernetes.pod_create_grace_secs",
    low: 0.0,
    high: 86_400.0,
    unit: "seconds",
};
const POD_START_TIMEOUT: KeyRange = KeyRange {
    key: "kubernetes.pod_start_timeout_secs",
    low: 1.0,
    high: 86_400.0,
    unit: "seconds",
};
const API_CALL_TIMEOUT: KeyRange = KeyRange {
    key: "kubernetes.api_call_timeout_secs",
    low: 1.0,
    high: 3_600.0,
    unit: "seconds",
};

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Backend selection and key namespace.
    pub shoal: ShoalConfig,
    /// The Redis store.
    pub redis: RedisConfig,
    /// The local backend.
    pub local: LocalConfig,
    /// Pools.
    pub pool: PoolConfig,
    /// Locks and semaphores.
    pub sync: SyncConfig,
    /// The Lithops `multiprocessing` keys.
    pub multiprocessing: MultiprocessingConfig,
    /// The Kubernetes backend.
    pub kubernetes: KubernetesConfig,
    /// Hosted actors.
    pub actors: ActorsConfig,
}

/// The `actors` section: durable hosted actors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorsConfig {
    /// Host processes a runtime starts, when it spawns its first actor. 1 ..= 64.
    pub hosts: u32,
    /// An actor's activation lasts this long unless its host renews it (every third of it);
    /// a host that died or froze loses its actors once it lapses (at once when its death is
    /// seen). 0.1 ..= 3600.
    pub lease_secs: f64,
    /// An actor without messages for this long is deactivated (its state is saved already).
    /// 1 ..= 86400.
    pub idle_secs: f64,
    /// Handler panics allowed within `restart_period_secs`; one more fails the actor (its
    /// messages then get an error). 0 ..= 1000.
    pub max_restarts: u32,
    /// The window of `max_restarts`, in seconds. 0.1 ..= 86400.
    pub restart_period_secs: f64,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        ActorsConfig {
            hosts: 1,
            lease_secs: 2.0,
            idle_secs: 300.0,
            max_restarts: 3,
            restart_period_secs: 5.0,
        }
    }
}

impl ActorsConfig {
    /// [`ActorsConfig::lease_secs`] as a duration, clamped into its range.
    pub fn lease(&self) -> Duration {
        ACTOR_LEASE.duration(self.lease_secs, ActorsConfig::default().lease_secs)
    }

    /// [`ActorsConfig::idle_secs`] as a duration, clamped into its range.
    pub fn idle(&self) -> Duration {
        ACTOR_IDLE.duration(self.idle_secs, ActorsConfig::default().idle_secs)
    }

    /// [`ActorsConfig::restart_period_secs`] as a duration, clamped into its range.
    pub fn restart_period(&self) -> Duration {
        ACTOR_RESTART_PERIOD.duration(
            self.restart_period_secs,
            ActorsConfig::default().restart_period_secs,
        )
    }
}

/// The `shoal` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShoalConfig {
    /// Where processes run: `local` or `kubernetes`.
    pub backend: Backend,
    /// Prefix of every Redis key shoal writes (`shoal:{<namespace>:...}`); `shoal clean` deletes
    /// one.
    pub namespace: String,
}

impl Default for ShoalConfig {
    fn default() -> Self {
        ShoalConfig {
            backend: Backend::Local,
            namespace: "default".into(),
        }
    }
}

/// Execution backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Subprocesses or threads on this machine.
    Local,
    /// Kubernetes Jobs (see the `kubernetes` section).
    Kubernetes,
}

impl Backend {
    /// True for backends whose workers run on other hosts.
    pub fn is_remote(self) -> bool {
        !matches!(self, Backend::Local)
    }
}

/// The `redis` section. Its `Debug` output hides the password of `url` (see [`redact_url`]).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS), or `unix:///path/to.sock`.
    /// `None` with the local backend starts an embedded `redis-server` on a private Unix socket.
    pub url: Option<String>,
    /// Time to live of every key, refreshed on use. 1 ..= 31536000 (a year), and no shorter
    /// than `sync.lease_secs`, `pool.task_lease_secs` and `actors.lease_secs` (a lease's
    /// renewals refresh the keys held under it; validation names the lease that is longer).
    pub expiry_secs: u64,
    /// Largest payload (message, argument list, result) shoal writes or accepts, in bytes.
    /// 1024 ..= 536870912.
    pub max_message_bytes: u64,
    /// Program started for the embedded store (looked up in `PATH` when it has no `/`).
    pub server_binary: String,
    /// How long to wait for a connection to Redis, in seconds. 0.001 ..= 86400.
    pub connect_timeout_secs: f64,
    /// How long to wait for the answer to an ordinary (non-blocking) command, in seconds.
    /// 0.001 ..= 86400.
    pub response_timeout_secs: f64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            expiry_secs: 3600,
            max_message_bytes: 64 * 1024 * 1024,
            server_binary: "redis-server".into(),
            connect_timeout_secs: 5.0,
            response_timeout_secs: 30.0,
        }
    }
}

// By hand: a derived `Debug` would print the password of `url` wherever a `Config` is logged.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so that a new field cannot be left out of the output unnoticed.
        let RedisConfig {
            url,
            expiry_secs,
            max_message_bytes,
            server_binary,
            connect_timeout_secs,
            response_timeout_secs,
        } = self;
        f.debug_struct("RedisConfig")
            .field("url", &url.as_deref().map(redact_url))
            .field("expiry_secs", expiry_secs)
            .field("max_message_bytes", max_message_bytes)
            .field("server_binary", server_binary)
            .field("connect_timeout_secs", connect_timeout_secs)
            .field("response_timeout_secs", response_timeout_secs)
            .finish()
    }
}

impl RedisConfig {
    /// [`RedisConfig::connect_timeout_secs`] as a duration, clamped into its range (never
    /// panics; see the module docs).
    pub fn connect_timeout(&self) -> Duration {
        CONNECT_TIMEOUT.duration(
            self.connect_timeout_secs,
            RedisConfig::default().connect_timeout_secs,
        )
    }

    /// [`RedisConfig::response_timeout_secs`] as a duration, clamped into its range.
    pub fn response_timeout(&self) -> Duration {
        RESPONSE_TIMEOUT.duration(
            self.response_timeout_secs,
            RedisConfig::default().response_timeout_secs,
        )
    }
}

/// The `local` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// How a local child runs.
    pub start_method: StartMethod,
    /// Workers of a pool created without a size (1 ..= 1024); `None`: the number of CPUs.
    pub workers: Option<usize>,
}

impl LocalConfig {
    /// [`LocalConfig::workers`], or the number of CPUs.
    pub fn default_workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
        })
    }
}

/// The `pool` section: fault tolerance of pools.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Redeliveries in a row without progress of a chunk whose worker died before the chunk
    /// fails with kind `Crashed` (a long chunk resumes from the progress it reported). 0 ..= 1000.
    pub retries: u32,
    /// A chunk whose worker stopped renewing its lease for this long (seconds) is given to
    /// another worker. It also bounds orphans: a pool worker whose driver died or froze exits
    /// within this lease + 1 s. 0.1 ..= 86400.
    pub task_lease_secs: f64,
    /// Worker failures allowed within `restart_period_secs` while no chunk completes; one more
    /// breaks the pool (its calls fail) instead of restarting forever. A completed chunk clears
    /// the count; exits because Redis is unreachable are not counted. 0 ..= 100000.
    pub max_restarts: u32,
    /// The window of `max_restarts`, in seconds. 0.1 ..= 86400.
    pub restart_period_secs: f64,
    /// Show a progress bar for `map` calls when stderr is a terminal.
    pub progress: bool,
}

impl PoolConfig {
    /// [`PoolConfig::task_lease_secs`] as a duration, clamped into its range (never panics; see
    /// the module docs).
    pub fn task_lease(&self) -> Duration {
        TASK_LEASE.duration(self.task_lease_secs, PoolConfig::default().task_lease_secs)
    }

    /// [`PoolConfig::restart_period_secs`] as a duration, clamped into its range.
    pub fn restart_period(&self) -> Duration {
        RESTART_PERIOD.duration(
            self.restart_period_secs,
            PoolConfig::default().restart_period_secs,
        )
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            retries: 3,
            task_lease_secs: 10.0,
            max_restarts: 20,
            restart_period_secs: 10.0,
            progress: false,
        }
    }
}

/// How the local backend runs a child.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartMethod {
    /// A subprocess running this same binary in worker mode.
    #[default]
    Process,
    /// A thread of the parent; termination is cooperative.
    Thread,
}

/// The `sync` section: locks and semaphores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// A hold of a `Lock`, `RLock`, `Semaphore` or `BoundedSemaphore` lasts this long (seconds)
    /// unless its process renews it (every third of it, from a heartbeat thread); the hold of a
    /// process that died without exiting is released when it lapses, and a waiter proceeds.
    /// 0.1 ..= 86400.
    pub lease_secs: f64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { lease_secs: 5.0 }
    }
}

impl SyncConfig {
    /// [`SyncConfig::lease_secs`] as a duration, clamped into its range (never panics; see the
    /// module docs).
    pub fn lease(&self) -> Duration {
        LEASE.duration(self.lease_secs, SyncConfig::default().lease_secs)
    }
}

/// The `multiprocessing` section: the keys Lithops users know.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiprocessingConfig {
    /// Forward each child's stdout and stderr through a Redis Stream that the parent prints.
    pub stream_stdout: bool,
    /// Transport of `Pipe`. Only `redislist` exists.
    pub pipe_connection_type: PipeConnectionType,
    /// Environment variables set in every child.
    pub env_vars: BTreeMap<String, String>,
    /// Directory where the parent appends one JSON line per finished process
    /// (`shoal-execution-details.jsonl`); `None` writes nothing.
    pub export_execution_details: Option<PathBuf>,
}

/// Transport of `Pipe`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipeConnectionType {
    /// A Redis list per direction.
    #[default]
    Redislist,
}

impl Config {
    /// Reads the configuration from the first file found (see the module docs), applies the
    /// `SHOAL_*` environment overrides and validates the result.
    pub fn load() -> Result<Config> {
        let file = find_config_file()?;
        let text = match &file {
            Some(path) => Some((
                path.display().to_string(),
                std::fs::read_to_string(path)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?,
            )),
            None => None,
        };
        Config::from_layers(
            text.as_ref().map(|(o, t)| (o.as_str(), t.as_str())),
            shoal_env(std::env::vars_os())?,
        )
    }

    /// Reads one file, without environment overrides.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Config::from_yaml_str(&text, &path.display().to_string())
    }

    /// Parses YAML text, without environment overrides. `origin` names the text in errors.
    pub fn from_yaml_str(yaml: &str, origin: &str) -> Result<Config> {
        Config::from_layers(Some((origin, yaml)), std::iter::empty())
    }

    /// A builder starting from the built-in defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
        }
    }

    /// Checks every value that has the right type but may be impossible.
    pub fn validate(&self) -> Result<()> {
        self.validate_with(&|_| "code".to_string())
    }

    /// The configuration as YAML, every key present.
    pub fn to_yaml(&self) -> String {
        yaml_serde::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// [`Config::to_yaml`] with the password of `redis.url` hidden (see [`redact_url`]), to show
    /// to a user (`shoal config`).
    pub fn to_redacted_yaml(&self) -> String {
        let mut shown = self.clone();
        shown.redis.url = shown.redis.url.as_deref().map(redact_url);
        shown.to_yaml()
    }

    /// Layers a file (origin, text) and environment variables, then validates.
    pub fn from_layers(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let file_origin = file
            .map(|(o, _)| o.to_string())
            .unwrap_or_else(|| "built-in defaults".to_string());
        let mut root = match file {
            Some((origin, text)) => parse_document(origin, text)?,
            None => Mapping::new(),
        };
        let mut env_origin: HashMap<String, String> = HashMap::new();
        // Overrides tried first as written, by dotted key: their section, key and YAML reading.
        let mut fallbacks: HashMap<String, (String, String, Fallback)> = HashMap::new();
        for (var, raw) in env {
            if is_service_link(&var, &raw) {
                tracing::debug!(
                    variable = %var,
                    "ignored: a Kubernetes service link variable, not a configuration override"
                );
                continue;
            }
            let Some((section, key)) = env_override_target(&var)? else {
                continue;
            };
            let dotted = format!("{section}.{key}");
            let (value, fallback) = env_value(raw);
            // `SHOAL_REDIS_URL` and `SHOAL_REDIS_url` name one key: the last one wins, whole.
            match fallback {
                Some(fallback) => {
                    fallbacks.insert(dotted.clone(), (section.clone(), key.clone(), fallback))
                }
                None => fallbacks.remove(&dotted),
            };
            let section_map = root
                .entry(Value::String(section.clone()))
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            // A section whose keys are all commented out (`redis:` alone) reads as null, which
            // the file alone takes for an empty section: so does an override.
            if section_map.is_null() {
                *section_map = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(section_map) = section_map else {
                return Err(Error::Config {
                    origin: file_origin,
                    key: section,
                    reason: "must be a mapping of keys to values".into(),
                });
            };
            section_map.insert(Value::String(key.clone()), value);
            env_origin.insert(dotted, format!("environment variable {var}"));
        }
        // A key under one set from the environment (`kubernetes.resources.requests.cpu` under
        // `SHOAL_KUBERNETES_RESOURCES`) came from that variable too.
        let origin_of = |key: &str| -> String {
            env_key_of(&env_origin, key)
                .map(|(_, origin)| origin.clone())
                .unwrap_or_else(|| file_origin.clone())
        };
        if let Some(unknown) = root.keys().find_map(|k| match k {
            Value::String(s) if !SECTIONS.contains(&s.as_str()) => Some(s.clone()),
            Value::String(_) => None,
            other => Some(format!("{other:?}")),
        }) {
            let reason = if UNBUILT_SECTIONS.contains(&unknown.as_str()) {
                format!(
                    "the `{unknown}` section is not built yet (see README, \"What is missing\"); \
                     known sections: {}",
                    SECTIONS.join(", ")
                )
            } else {
                format!("unknown section; known sections: {}", SECTIONS.join(", "))
            };
            return Err(Error::Config {
                origin: origin_of(&unknown),
                key: unknown,
                reason,
            });
        }
        // Each failure inside an override tried as written retries it read as YAML, once: a
        // string key keeps the value as written, any other key gets its YAML reading.
        let config: Config = loop {
            let e = match serde_path_to_error::deserialize(Value::Mapping(root.clone())) {
                Ok(config) => break config,
                Err(e) => e,
            };
            let key = e.path().to_string();
            let mut reason = e.inner().to_string();
            let fallback = env_key_of(&env_origin, &key)
                .and_then(|(dotted, _)| fallbacks.remove(dotted.as_str()));
            match fallback {
                Some((section, env_key, Ok(value))) => {
                    if let Some(Value::Mapping(section_map)) = root.get_mut(section.as_str()) {
                        section_map.insert(Value::String(env_key), value);
                        continue;
                    }
                }
                Some((_, _, Err(yaml_error))) => {
                    reason.push_str(&format!(" (nor is the value valid YAML: {yaml_error})"));
                }
                None => {}
            }
            if reason.contains("unknown variant") {
                if key == "shoal.backend" {
                    reason.push_str(" (the lambda and http backends are not built yet)");
                } else if key == "multiprocessing.pipe_connection_type" {
                    reason.push_str(" (nanomsg pipes are not supported)");
                }
            }
            return Err(Error::Config {
                origin: origin_of(&key),
                key,
                reason,
            });
        };
        config.validate_with(&origin_of)?;
        Ok(config)
    }

    /// Every numeric key with its range and value (`None`: unset, as `local.workers: null`).
    /// config.yaml documents each range beside its key (a test checks it).
    fn numeric_values(&self) -> [(KeyRange, Option<f64>); 20] {
        [
            (EXPIRY, Some(self.redis.expiry_secs as f64)),
            (MAX_MESSAGE, Some(self.redis.max_message_bytes as f64)),
            (CONNECT_TIMEOUT, Some(self.redis.connect_timeout_secs)),
            (RESPONSE_TIMEOUT, Some(self.redis.response_timeout_secs)),
            (WORKERS, self.local.workers.map(|w| w as f64)),
            (RETRIES, Some(f64::from(self.pool.retries))),
            (TASK_LEASE, Some(self.pool.task_lease_secs)),
            (MAX_RESTARTS, Some(f64::from(self.pool.max_restarts))),
            (RESTART_PERIOD, Some(self.pool.restart_period_secs)),
            (LEASE, Some(self.sync.lease_secs)),
            (
                JOB_TTL,
                self.kubernetes.ttl_seconds_after_finished.map(f64::from),
            ),
            (
                JOB_DEADLINE,
                self.kubernetes.active_deadline_seconds.map(|s| s as f64),
            ),
            (
                POD_CREATE_GRACE,
                Some(self.kubernetes.pod_create_grace_secs),
            ),
            (
                POD_START_TIMEOUT,
                Some(self.kubernetes.pod_start_timeout_secs),
            ),
            (
                API_CALL_TIMEOUT,
                Some(self.kubernetes.api_call_timeout_secs),
            ),
            (ACTOR_HOSTS, Some(f64::from(self.actors.hosts))),
            (ACTOR_LEASE, Some(self.actors.lease_secs)),
            (ACTOR_IDLE, Some(self.actors.idle_secs)),
            (ACTOR_RESTARTS, Some(f64::from(self.actors.max_restarts))),
            (ACTOR_RESTART_PERIOD, Some(self.actors.restart_period_secs)),
        ]
    }

    /// A remote backend's workers must reach the store by network, and need an image.
    fn check_remote_store(&self) -> std::result::Result<(), (&'static str, String)> {
        let backend = "the kubernetes backend runs workers on other hosts";
        let Some(url) = &self.redis.url else {
            return Err((
                "redis.url",
                format!(
                    "{backend}: set redis.url to a Redis they can reach (redis:// or rediss://); \
                        the embedded store is only for the local backend"
                ),
            ));
        };
        if url.starts_with("unix:") || url.starts_with("redis+unix:") {
            return Err((
                "redis.url",
                format!(
                    "{backend}, which cannot use a Unix socket: set redis.url to a redis:// or \
                        rediss:// address they can reach"
                ),
            ));
        }
        let host = url
            .split_once("://")
            .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, h)| h))
            .and_then(|rest| rest.split(['/', '#', '?']).next())
            .map(|authority| {
                authority
                    .strip_prefix('[')
                    .and_then(|a| a.split_once(']').map(|(h, _)| h))
                    .unwrap_or_else(|| authority.rsplit_once(':').map_or(authority, |(h, _)| h))
            })
            .unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback && self.kubernetes.redis_url_secret.is_none() {
            return Err((
                "redis.url",
                format!(
                    "{backend}, which cannot reach {host}: set redis.url to an address they can \
                        reach, or give them their own with kubernetes.redis_url_secret"
                ),
            ));
        }
        if self.kubernetes.image.is_none() {
            return Err((
                "kubernetes.image",
                "the kubernetes backend needs the image its workers run (this program, built \
                    with deploy/kubernetes/Dockerfile)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn validate_with(&self, origin_of: &dyn Fn(&str) -> String) -> Result<()> {
        let fail = |key: &str, reason: String| Error::Config {
            origin: origin_of(key),
            key: key.to_string(),
            reason,
        };
        let ns = &self.shoal.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(fail(
                "shoal.namespace",
                format!("{ns:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.'"),
            ));
        }
        if let Some(url) = &self.redis.url {
            check_redis_url(url).map_err(|reason| fail("redis.url", reason))?;
        }
        self.kubernetes
            .check()
            .map_err(|(key, reason)| fail(&key, reason))?;
        if self.shoal.backend.is_remote() {
            self.check_remote_store()
                .map_err(|(key, reason)| fail(key, reason))?;
        }
        for (range, value) in self.numeric_values() {
            if let Some(value) = value {
                range
                    .check(value)
                    .map_err(|reason| fail(range.key, reason))?;
            }
        }
        // A lease's holder refreshes the TTLs of what it holds as it renews the lease, every
        // third of it: a lease longer than the TTL would let the keys expire under a holder.
        let expiry = self.redis.expiry_secs as f64;
        for (key, lease) in [
            ("sync.lease_secs", self.sync.lease_secs),
            ("pool.task_lease_secs", self.pool.task_lease_secs),
            ("actors.lease_secs", self.actors.lease_secs),
        ] {
            if lease > expiry {
                return Err(fail(
                    key,
                    format!(
                        "{lease} is longer than redis.expiry_secs ({expiry}): keys held under \
                         the lease would expire between its renewals (lower the lease or raise \
                         redis.expiry_secs)"
                    ),
                ));
            }
        }
        if self.redis.server_binary.trim().is_empty() {
            return Err(fail("redis.server_binary", "must not be empty".into()));
        }
        for (name, value) in &self.multiprocessing.env_vars {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(fail(
                    "multiprocessing.env_vars",
                    format!("{name:?} is not a valid environment variable name"),
                ));
            }
            if value.contains('\0') {
                return Err(fail(
                    "multiprocessing.env_vars",
                    format!("the value of {name} contains a NUL byte"),
                ));
            }
        }
        Ok(())
    }

    /// The origin string used in errors for a configuration built in code.
    pub fn code_origin() -> &'static str {
        "code"
    }
}

fn parse_document(origin: &str, text: &str) -> Result<Mapping> {
    let value: Value = yaml_serde::from_str(text).map_err(|e| Error::Config {
        origin: origin.to_string(),
        key: "(document)".into(),
        reason: format!("not valid YAML: {e}"),
    })?;
    match value {
        Value::Null => Ok(Mapping::new()),
        Value::Mapping(m) => Ok(m),
        _ => Err(Error::Config {
            origin: origin.to_string(),
            key: "(document)".into(),
            reason: "the top level must be a mapping of sections".into(),
        }),
    }
}

/// The other reading of an override, tried when the first fails where the override is: its
/// YAML reading (or why the value is not YAML), or for an empty value the empty string.
type Fallback = std::result::Result<Value, String>;

/// The value an override is tried with first, and the one tried if that fails.
///
/// A value is tried as the string it is first: a string key then keeps it as written, where its
/// YAML reading would turn `2024` into a number, `null` into nothing and cut `a #b` at the `#`.
/// A key of another type (a number, a boolean, a mapping...) refuses a string, and gets the YAML
/// reading. An empty value is the exception, null first: it unsets an optional key, as it did
/// when every value was YAML.
fn env_value(raw: String) -> (Value, Option<Fallback>) {
    if raw.is_empty() {
        return (Value::Null, Some(Ok(Value::String(raw))));
    }
    let fallback = match yaml_serde::from_str::<Value>(&raw) {
        Ok(Value::String(s)) if s == raw => None,
        Ok(value) => Some(Ok(value)),
        Err(e) => Some(Err(e.to_string())),
    };
    (Value::String(raw), fallback)
}

/// The entry of `env_origin` (dotted key set from the environment → origin) that `key` is, or
/// lies under (`kubernetes.resources.requests.cpu`, `kubernetes.tolerations[0].value`).
fn env_key_of<'a>(
    env_origin: &'a HashMap<String, String>,
    key: &str,
) -> Option<(&'a String, &'a String)> {
    env_origin.iter().find(|(dotted, _)| {
        key.strip_prefix(dotted.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    })
}

/// The `SHOAL_*` variables of `vars` (the process's, from [`std::env::vars_os`]), as strings.
///
/// Any other variable is dropped unread, so one that is not UTF-8 (another program's) cannot
/// stop a program; so are the `SHOAL_` variables that are not configuration (`SHOAL_CONFIG`, a
/// path, may be any bytes). An override whose name or value is not UTF-8 is an error naming it.
fn shoal_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Vec<(String, String)>> {
    let mut overrides = Vec::new();
    for (name, value) in vars {
        let bytes = name.as_encoded_bytes();
        if !bytes.starts_with(b"SHOAL_") || !is_configuration(bytes) {
            continue;
        }
        let name = name.into_string().map_err(|name| {
            let shown = name.to_string_lossy().into_owned();
            Error::Config {
                origin: format!("environment variable {shown}"),
                key: shown,
                reason: "the variable's name is not valid UTF-8".into(),
            }
        })?;
        let value = value.into_string().map_err(|_| Error::Config {
            origin: format!("environment variable {name}"),
            key: name.clone(),
            reason: "the value is not valid UTF-8".into(),
        })?;
        overrides.push((name, value));
    }
    Ok(overrides)
}

/// False for the `SHOAL_` variables that are not configuration overrides: [`RESERVED_ENV`] and
/// those under [`WORKER_ENV_PREFIX`] and [`TEST_ENV_PREFIX`]. Bytes, as a name may not be UTF-8.
fn is_configuration(name: &[u8]) -> bool {
    !(RESERVED_ENV.iter().any(|r| r.as_bytes() == name)
        || name.starts_with(WORKER_ENV_PREFIX.as_bytes())
        || name.starts_with(TEST_ENV_PREFIX.as_bytes()))
}

/// True for a variable Kubernetes sets in every pod for each Service of its namespace (a
/// "service link", unless the pod spec says `enableServiceLinks: false`). Their names start with
/// the Service's name in capitals, `-` as `_`, so a Service `shoal-redis` (or one named `shoal`)
/// gives variables that look like overrides:
///
/// * `<X>_SERVICE_HOST=10.0.0.11`, `<X>_SERVICE_PORT=6379`, `<X>_SERVICE_PORT_<NAME>=6379`;
/// * `<X>_PORT=tcp://10.0.0.11:6379` (`udp://`, `sctp://`);
/// * `<X>_PORT_6379_TCP=tcp://10.0.0.11:6379`, and that name with `_PROTO=tcp`, `_PORT=6379`
///   and `_ADDR=10.0.0.11`.
///
/// The value must have its form too (a port is digits, `_PORT` a `proto://` address), and a
/// variable that names a key of a section is never a link, so an override can never be taken
/// for one, whatever keys the sections gain.
fn is_service_link(var: &str, value: &str) -> bool {
    if !var.starts_with("SHOAL_") {
        return false;
    }
    let shaped = if let Some(service) = var.strip_suffix("_SERVICE_HOST") {
        !service.is_empty() && !value.is_empty()
    } else if let Some(service) = var.strip_suffix("_SERVICE_PORT") {
        !service.is_empty() && is_port(value)
    } else if let Some((service, port_name)) = var.rsplit_once("_SERVICE_PORT_") {
        let name_ok = port_name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        !service.is_empty() && !port_name.is_empty() && name_ok && is_port(value)
    } else if let Some(head) = var.strip_suffix("_PORT") {
        match port_protocol(head) {
            Some(_) => is_port(value),
            None => {
                !head.is_empty()
                    && ["tcp://", "udp://", "sctp://"]
                        .iter()
                        .any(|p| value.starts_with(p))
            }
        }
    } else if let Some(protocol) = port_protocol(var) {
        value
            .strip_prefix(protocol)
            .is_some_and(|rest| rest.starts_with("://"))
    } else if let Some(head) = var.strip_suffix("_PROTO") {
        port_protocol(head).is_some_and(|protocol| value == protocol)
    } else if let Some(head) = var.strip_suffix("_ADDR") {
        port_protocol(head).is_some() && !value.is_empty()
    } else {
        false
    };
    shaped && !names_a_key(var)
}

/// `Some("tcp")` for a name `<X>_PORT_<port>_TCP` (`UDP`, `SCTP`) with a non-empty `<X>`.
fn port_protocol(name: &str) -> Option<&'static str> {
    let (rest, protocol) = name.rsplit_once('_')?;
    let protocol = match protocol {
        "TCP" => "tcp",
        "UDP" => "udp",
        "SCTP" => "sctp",
        _ => return None,
    };
    let (rest, port) = rest.rsplit_once('_')?;
    let service = rest.strip_suffix("_PORT")?;
    (!service.is_empty() && is_port(port)).then_some(protocol)
}

/// A port number as Kubernetes writes it.
fn is_port(text: &str) -> bool {
    text.parse::<u16>().is_ok() && text.bytes().all(|b| b.is_ascii_digit())
}

/// True when `var` is the override of an existing key (`SHOAL_REDIS_URL`), not of an unknown one.
fn names_a_key(var: &str) -> bool {
    let Ok(Some((section, key))) = env_override_target(var) else {
        return false;
    };
    match yaml_serde::to_value(Config::default()) {
        Ok(Value::Mapping(sections)) => sections
            .get(section.as_str())
            .and_then(Value::as_mapping)
            .is_some_and(|keys| keys.contains_key(key.as_str())),
        // Unreachable; if the keys were unknown, never take a variable for a link.
        _ => true,
    }
}

/// Maps `SHOAL_<SECTION>_<KEY>` to `(section, key)`; `None` for variables that are not overrides.
fn env_override_target(var: &str) -> Result<Option<(String, String)>> {
    let Some(rest) = var.strip_prefix("SHOAL_") else {
        return Ok(None);
    };
    if !is_configuration(var.as_bytes()) {
        return Ok(None);
    }
    let lower = rest.to_ascii_lowercase();
    if lower == "backend" || lower == "namespace" {
        return Ok(Some(("shoal".into(), lower)));
    }
    for section in SECTIONS {
        if let Some(key) = lower.strip_prefix(&format!("{section}_"))
            && !key.is_empty()
        {
            return Ok(Some((section.to_string(), key.to_string())));
        }
    }
    let reason = match UNBUILT_SECTIONS
        .iter()
        .find(|s| lower.starts_with(&format!("{s}_")))
    {
        Some(section) => format!("the `{section}` section is not built yet"),
        None => format!(
            "unknown variable; overrides are named SHOAL_<SECTION>_<KEY> with SECTION one of {}",
            SECTIONS.join(", ")
        ),
    };
    Err(Error::Config {
        origin: format!("environment variable {var}"),
        key: var.to_string(),
        reason,
    })
}

fn check_redis_url(url: &str) -> std::result::Result<(), String> {
    let scheme = url.split("://").next().unwrap_or_default();
    if !url.contains("://") || !matches!(scheme, "redis" | "rediss" | "unix" | "redis+unix") {
        // Redacted: a URL missing its `//` (`redis:/user:password@host`) still holds a password.
        return Err(format!(
            "{:?} must start with redis://, rediss://, unix:// or redis+unix://",
            redact_url(url)
        ));
    }
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", redact_url(url)))
}

/// The URL with any password replaced by `***`, for logs and errors.
///
/// Hidden: the password of the userinfo, which ends at the last `@` before the path as URL
/// parsers read it (`redis://user:p@ss@host` is user `user`, password `p@ss`), or all of it when
/// it has no `:`; the value of every query parameter but `db`, `user` and `protocol` (a Unix URL
/// carries its password as `?pass=`); and in a malformed URL, which is shown in errors,
/// everything between its first `:` and its last `@` (`redis:/user:password@host`).
pub fn redact_url(url: &str) -> String {
    // A scheme is letters, digits, `+`, `-` and `.`: anything else before `://`
    // (`user:password@redis://host`) is a malformed URL.
    let split = url.split_once("://").filter(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    let Some((scheme, rest)) = split else {
        return redact_colon_to_at(&redact_query(url));
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return format!("{scheme}://{}", redact_colon_to_at(&redact_query(rest)));
    };
    let tail = redact_colon_to_at(&redact_query(&rest[at + 1..]));
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{tail}"),
        None => format!("{scheme}://***@{tail}"),
    }
}

/// `text` with the value of each query parameter but the harmless ones replaced by `***`. A
/// list of what may be shown rather than of passwords: `p%61ss=` is `pass=` to a URL parser.
fn redact_query(text: &str) -> String {
    let Some((before, query)) = text.split_once('?') else {
        return text.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, value))
                if !value.is_empty() && !matches!(name, "db" | "user" | "protocol") =>
            {
                format!("{name}=***")
            }
            _ => param.to_string(),
        })
        .collect();
    format!("{before}?{}", params.join("&"))
}

/// `text` with everything between its first `:` and its last `@` after it replaced by `***`:
/// whatever a malformed URL holds there may be a password.
fn redact_colon_to_at(text: &str) -> String {
    let span = text
        .rfind('@')
        .and_then(|at| text[..at].find(':').map(|colon| (colon, at)));
    match span {
        Some((colon, at)) => format!("{}:***@{}", &text[..colon], &text[at + 1..]),
        None => text.to_string(),
    }
}

fn find_config_file() -> Result<Option<PathBuf>> {
    config_file_from(std::env::var_os("SHOAL_CONFIG"), std::env::var_os("HOME"))
}

/// The file [`Config::load`] reads, given `$SHOAL_CONFIG` and `$HOME`: paths, which need not be
/// UTF-8 (a `SHOAL_CONFIG` that is not must not be ignored for `./config.yaml`).
fn config_file_from(
    shoal_config: Option<OsString>,
    home: Option<OsString>,
) -> Result<Option<PathBuf>> {
    if let Some(path) = shoal_config {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::Config {
                origin: "environment variable SHOAL_CONFIG".into(),
                key: "SHOAL_CONFIG".into(),
                reason: format!("{} is not a file", path.display()),
            });
        }
        return Ok(Some(path));
    }
    let local = PathBuf::from("config.yaml");
    if local.is_file() {
        return Ok(Some(local));
    }
    if let Some(home) = home {
        let user = PathBuf::from(home).join(".shoal").join("config.yaml");
        if user.is_file() {
            return Ok(Some(user));
        }
    }
    Ok(None)
}

/// Builds a [`Config`] in code. Starts from the built-in defaults (or from a given config) and
/// validates in [`ConfigBuilder::build`].
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    config: Config,
}

impl From<Config> for ConfigBuilder {
    fn from(config: Config) -> Self {
        ConfigBuilder { config }
    }
}

impl ConfigBuilder {
    /// `redis.url`: use this Redis instead of an embedded one.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.config.redis.url = Some(url.into());
        self
    }

    /// `shoal.namespace`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.shoal.namespace = namespace.into();
        self
    }

    /// `redis.expiry_secs`.
    pub fn expiry_secs(mut self, secs: u64) -> Self {
        self.config.redis.expiry_secs = secs;
        self
    }

    /// `redis.max_message_bytes`.
    pub fn max_message_bytes(mut self, bytes: u64) -> Self {
        self.config.redis.max_message_bytes = bytes;
        self
    }

    /// `redis.server_binary`.
    pub fn server_binary(mut self, binary: impl Into<String>) -> Self {
        self.config.redis.server_binary = binary.into();
        self
    }

    /// `redis.connect_timeout_secs`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.redis.connect_timeout_secs = timeout.as_secs_f64();
        self
    }

    /// `redis.response_timeout_secs`.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.config.redis.response_timeout_secs = timeout.as_secs_f64();
        self
    }

    /// `local.start_method`.
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.config.local.start_method = method;
        self
    }

    /// `multiprocessing.stream_stdout`.
    pub fn stream_stdout(mut self, on: bool) -> Self {
        self.config.multiprocessing.stream_stdout = on;
        self
    }

    /// Adds one entry to `multiprocessing.env_vars`.
    pub fn env_var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config
            .multiprocessing
            .env_vars
            .insert(name.into(), value.into());
        self
    }

    /// `multiprocessing.export_execution_details`.
    pub fn export_execution_details(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.multiprocessing.export_execution_details = Some(dir.into());
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<Config> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config_error(r: Result<Config>) -> (String, String, String) {
        match r {
            Err(Error::Config {
                origin,
                key,
                reason,
            }) => (origin, key, reason),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_lease_longer_than_the_expiry_is_refused_naming_the_lease() {
        let (_, key, reason) = config_error(Config::builder().expiry_secs(4).build());
        // The defaults: sync 5 s, pool tasks 10 s, actors 2 s.
        assert_eq!(key, "sync.lease_secs");
        assert!(reason.contains("redis.expiry_secs"), "{reason}");
        let (origin, key, _) = config_error(Config::from_layers(
            Some((
                "shoal.yaml",
                "redis:\n  expiry_secs: 6\nsync:\n  lease_secs: 6\n",
            )),
            [],
        ));
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("shoal.yaml", "pool.task_lease_secs")
        );
        let mut config = Config::default();
        config.redis.expiry_secs = 2;
        config.sync.lease_secs = 1.0;
        config.pool.task_lease_secs = 2.0;
        config.validate().expect("every lease within the expiry");
    }

    #[test]
    fn an_override_of_a_section_whose_keys_are_all_commented_out_applies() {
        let c = Config::from_layers(
            Some(("shoal.yaml", "redis:\n  # url: redis://elsewhere/\n")),
            env(&[("SHOAL_REDIS_URL", "redis://127.0.0.1:6390/")]),
        )
        .expect("an empty section takes an override");
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:6390/"));
    }

    #[test]
    fn defaults_validate() {
        let c = Config::from_layers(None, env(&[])).expect("defaults are valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.redis.expiry_secs, 3600);
        assert_eq!(c.local.start_method, StartMethod::Process);
    }

    #[test]
    fn the_repository_config_yaml_is_the_defaults() {
        let text = include_str!("../../../config.yaml");
        let c = Config::from_yaml_str(text, "config.yaml").expect("config.yaml parses");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn to_yaml_round_trips() {
        let mut c = Config::default();
        c.sync.lease_secs = 0.25;
        c.local.workers = Some(3);
        c.multiprocessing.env_vars.insert("A".into(), "yes".into());
        let back = Config::from_yaml_str(&c.to_yaml(), "rendered").expect("rendered YAML parses");
        assert_eq!(back, c);
    }

    #[test]
    fn file_values_are_read() {
        let c = Config::from_yaml_str(
            "redis:\n  expiry_secs: 60\nlocal:\n  start_method: thread\n",
            "f.yaml",
        )
        .expect("valid");
        assert_eq!(c.redis.expiry_secs, 60);
        assert_eq!(c.local.start_method, StartMethod::Thread);
        assert_eq!(c.redis.max_message_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let (origin, key, reason) = config_error(Config::from_yaml_str(
            "redis:\n  urll: x\n",
            "/etc/shoal.yaml",
        ));
        assert_eq!(origin, "/etc/shoal.yaml");
        assert_eq!(key, "redis.urll");
        assert!(reason.contains("unknown field `urll`"), "{reason}");
    }

    #[test]
    fn unknown_and_unbuilt_sections() {
        let (_, key, reason) = config_error(Config::from_yaml_str("redsi: {}\n", "c.yaml"));
        assert_eq!(key, "redsi");
        assert!(reason.contains("unknown section"), "{reason}");
        let (_, key, reason) =
            config_error(Config::from_yaml_str("lambda:\n  memory: 1\n", "c.yaml"));
        assert_eq!(key, "lambda");
        assert!(reason.contains("not built yet"), "{reason}");
    }

    #[test]
    fn wrong_type_names_key() {
        let (origin, key, reason) = config_error(Config::from_yaml_str(
            "redis:\n  expiry_secs: soon\n",
            "c.yaml",
        ));
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("c.yaml", "redis.expiry_secs")
        );
        assert!(reason.contains("invalid type"), "{reason}");
        let (_, key, reason) = config_error(Config::from_yaml_str(
            "local:\n  start_method: fork\n",
            "c.yaml",
        ));
        assert_eq!(key, "local.start_method");
        assert!(reason.contains("unknown variant `fork`"), "{reason}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        for (yaml, key) in [
            ("redis:\n  expiry_secs: 0\n", "redis.expiry_secs"),
            (
                "redis:\n  max_message_bytes: 10\n",
                "redis.max_message_bytes",
            ),
            ("redis:\n  url: http://x\n", "redis.url"),
            ("shoal:\n  namespace: 'a{b}'\n", "shoal.namespace"),
            (
                "redis:\n  response_timeout_secs: -1\n",
                "redis.response_timeout_secs",
            ),
            (
                "multiprocessing:\n  env_vars: {'A=B': c}\n",
                "multiprocessing.env_vars",
            ),
        ] {
            let (origin, k, _) = config_error(Config::from_yaml_str(yaml, "c.yaml"));
            assert_eq!((origin.as_str(), k.as_str()), ("c.yaml", key), "{yaml}");
        }
    }

    /// Issue 7, item 3: values of the right type that would panic or misbehave at first use.
    #[test]
    fn every_numeric_key_is_range_checked_and_named() {
        for (yaml, key) in [
            ("sync:\n  lease_secs: -1\n", "sync.lease_secs"),
            ("sync:\n  lease_secs: .nan\n", "sync.lease_secs"),
            ("sync:\n  lease_secs: .inf\n", "sync.lease_secs"),
            ("sync:\n  lease_secs: 0\n", "sync.lease_secs"),
            ("sync:\n  lease_secs: 0.05\n", "sync.lease_secs"),
            ("sync:\n  lease_secs: 86401\n", "sync.lease_secs"),
            ("pool:\n  task_lease_secs: -1\n", "pool.task_lease_secs"),
            ("pool:\n  task_lease_secs: .nan\n", "pool.task_lease_secs"),
            ("pool:\n  task_lease_secs: 0\n", "pool.task_lease_secs"),
            (
                "pool:\n  restart_period_secs: .inf\n",
                "pool.restart_period_secs",
            ),
            (
                "pool:\n  restart_period_secs: -.inf\n",
                "pool.restart_period_secs",
            ),
            (
                "pool:\n  restart_period_secs: 0\n",
                "pool.restart_period_secs",
            ),
            ("pool:\n  retries: 1001\n", "pool.retries"),
            ("pool:\n  max_restarts: 100001\n", "pool.max_restarts"),
            ("local:\n  workers: 0\n", "local.workers"),
            ("local:\n  workers: 1025\n", "local.workers"),
            ("redis:\n  expiry_secs: 31536001\n", "redis.expiry_secs"),
            (
                "redis:\n  expiry_secs: 18446744073709551615\n",
                "redis.expiry_secs",
            ),
            (
                "redis:\n  connect_timeout_secs: .nan\n",
                "redis.connect_timeout_secs",
            ),
            (
                "redis:\n  response_timeout_secs: .inf\n",
                "redis.response_timeout_secs",
            ),
            (
                "redis:\n  max_message_bytes: 536870913\n",
                "redis.max_message_bytes",
            ),
        ] {
            let (origin, k, reason) = config_error(Config::from_yaml_str(yaml, "/etc/c.yaml"));
            assert_eq!(
                (origin.as_str(), k.as_str()),
                ("/etc/c.yaml", key),
                "{yaml}: {reason}"
            );
            let message = Error::Config {
                origin,
                key: k,
                reason,
            }
            .to_string();
            assert!(
                message.contains("/etc/c.yaml") && message.contains(key),
                "{message}"
            );
        }
        let (origin, key, _) = config_error(Config::from_layers(
            None,
            env(&[("SHOAL_SYNC_LEASE_SECS", ".nan")]),
        ));
        assert_eq!(
            (origin.as_str(), key.as_str()),
            (
                "environment variable SHOAL_SYNC_LEASE_SECS",
                "sync.lease_secs"
            )
        );
        let mut by_hand = Config::default();
        by_hand.pool.task_lease_secs = -1.0;
        let (origin, key, _) = config_error(by_hand.validate().map(|_| by_hand.clone()));
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("code", "pool.task_lease_secs")
        );
    }

    #[test]
    fn range_edges_are_accepted() {
        let c = Config::from_yaml_str(
            "sync:\n  lease_secs: 0.1\npool:\n  task_lease_secs: 86400\n  retries: 0\n  \
             max_restarts: 0\n  restart_period_secs: 0.1\nlocal:\n  workers: 1\n\
             redis:\n  expiry_secs: 86400\n  connect_timeout_secs: 0.001\n",
            "c.yaml",
        )
        .expect("the edges of every range are valid");
        assert_eq!(c.sync.lease(), Duration::from_millis(100));
        assert_eq!(c.pool.task_lease(), Duration::from_secs(86_400));
        assert_eq!(c.local.workers, Some(1));
        // The shortest expiry, with leases no longer than it.
        let c = Config::from_yaml_str(
            "redis:\n  expiry_secs: 1\nsync:\n  lease_secs: 1\npool:\n  task_lease_secs: 1\n\
             actors:\n  lease_secs: 1\n",
            "c.yaml",
        )
        .expect("an expiry of 1 s with leases of 1 s");
        assert_eq!(c.redis.expiry_secs, 1);
    }

    /// A `Config` built by hand skips validation; turning its seconds into durations must still
    /// not panic.
    #[test]
    fn duration_conversions_never_panic() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 0.0, 1e300] {
            let mut c = Config::default();
            c.sync.lease_secs = bad;
            c.pool.task_lease_secs = bad;
            c.pool.restart_period_secs = bad;
            c.redis.connect_timeout_secs = bad;
            c.redis.response_timeout_secs = bad;
            let durations = [
                c.sync.lease(),
                c.pool.task_lease(),
                c.pool.restart_period(),
                c.redis.connect_timeout(),
                c.redis.response_timeout(),
            ];
            for d in durations {
                assert!(d > Duration::ZERO, "{bad}: {d:?}");
                assert!(d <= Duration::from_secs(86_400), "{bad}: {d:?}");
            }
            assert!(c.sync.lease() >= Duration::from_millis(100), "{bad}");
        }
        let c = Config::default();
        assert_eq!(c.sync.lease(), Duration::from_secs(5));
        assert_eq!(c.pool.task_lease(), Duration::from_secs(10));
        assert_eq!(c.pool.restart_period(), Duration::from_secs(10));
    }

    /// config.yaml documents the range of every numeric key beside it, as validation checks it.
    #[test]
    fn config_yaml_documents_every_range() {
        let text = include_str!("../../../config.yaml");
        let mut section = String::new();
        let mut comments = String::new();
        let mut documented = BTreeMap::new();
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('#') {
                comments.push_str(trimmed);
                comments.push('\n');
                continue;
            }
            let Some((name, _)) = trimmed.split_once(':') else {
                continue;
            };
            if line.starts_with(' ') {
                documented.insert(format!("{section}.{name}"), std::mem::take(&mut comments));
            } else {
                section = name.to_string();
                comments.clear();
            }
        }
        for (range, _) in Config::default().numeric_values() {
            let doc = documented
                .get(range.key)
                .unwrap_or_else(|| panic!("{} is not in config.yaml", range.key));
            assert!(
                doc.contains(&format!("Range: {}.", range.text())),
                "config.yaml should say `Range: {}.` above {}: {doc}",
                range.text(),
                range.key
            );
        }
    }

    #[test]
    fn backend_and_pipe_hints() {
        let (_, key, reason) =
            config_error(Config::from_yaml_str("shoal:\n  backend: lambda\n", "c"));
        assert_eq!(key, "shoal.backend");
        assert!(reason.contains("not built yet"), "{reason}");
        let (_, key, reason) = config_error(Config::from_yaml_str(
            "multiprocessing:\n  pipe_connection_type: nanomsg\n",
            "c",
        ));
        assert_eq!(key, "multiprocessing.pipe_connection_type");
        assert!(reason.contains("not supported"), "{reason}");
    }

    #[test]
    fn environment_overrides_win_and_are_named() {
        let c = Config::from_layers(
            Some(("c.yaml", "local:\n  start_method: process\n")),
            env(&[
                ("SHOAL_LOCAL_START_METHOD", "thread"),
                ("SHOAL_REDIS_URL", "redis://127.0.0.1:7000"),
                ("SHOAL_MULTIPROCESSING_ENV_VARS", "{GREETING: hi}"),
                ("SHOAL_NAMESPACE", "jobs"),
                ("SHOAL_CONFIG", "ignored"),
                ("SHOAL_WORKER_TASK", "ignored"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.local.start_method, StartMethod::Thread);
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:7000"));
        assert_eq!(c.multiprocessing.env_vars["GREETING"], "hi");
        assert_eq!(c.shoal.namespace, "jobs");

        let (origin, key, _) = config_error(Config::from_layers(
            Some(("c.yaml", "")),
            env(&[("SHOAL_REDIS_EXPIRY_SECS", "0")]),
        ));
        assert_eq!(origin, "environment variable SHOAL_REDIS_EXPIRY_SECS");
        assert_eq!(key, "redis.expiry_secs");

        let (origin, key, reason) =
            config_error(Config::from_layers(None, env(&[("SHOAL_REDIS_URLL", "x")])));
        assert_eq!(origin, "environment variable SHOAL_REDIS_URLL");
        assert_eq!(key, "redis.urll");
        assert!(reason.contains("unknown field"), "{reason}");

        let (_, key, _) =
            config_error(Config::from_layers(None, env(&[("SHOAL_FROBNICATE", "1")])));
        assert_eq!(key, "SHOAL_FROBNICATE");
    }

    #[test]
    fn builder_validates() {
        let c = Config::builder()
            .start_method(StartMethod::Thread)
            .env_var("A", "b")
            .build()
            .expect("valid");
        assert_eq!(c.local.start_method, StartMethod::Thread);
        let (origin, key, _) = config_error(Config::builder().expiry_secs(0).build());
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("code", "redis.expiry_secs")
        );
    }

    #[test]
    fn invalid_yaml_and_non_mapping() {
        let (_, key, _) = config_error(Config::from_yaml_str("redis: [\n", "c"));
        assert_eq!(key, "(document)");
        let (_, key, _) = config_error(Config::from_yaml_str("- 1\n", "c"));
        assert_eq!(key, "(document)");
        assert!(Config::from_yaml_str("", "c").is_ok());
    }

    /// The variables Kubernetes gives every pod for the Services `shoal-redis` and `shoal`.
    const SERVICE_LINKS: &[(&str, &str)] = &[
        ("SHOAL_REDIS_SERVICE_HOST", "10.0.0.11"),
        ("SHOAL_REDIS_SERVICE_PORT", "6379"),
        ("SHOAL_REDIS_SERVICE_PORT_REDIS_MAIN", "6379"),
        ("SHOAL_REDIS_PORT", "tcp://10.0.0.11:6379"),
        ("SHOAL_REDIS_PORT_6379_TCP", "tcp://10.0.0.11:6379"),
        ("SHOAL_REDIS_PORT_6379_TCP_PROTO", "tcp"),
        ("SHOAL_REDIS_PORT_6379_TCP_PORT", "6379"),
        ("SHOAL_REDIS_PORT_6379_TCP_ADDR", "10.0.0.11"),
        ("SHOAL_SERVICE_HOST", "fd00::12"),
        ("SHOAL_SERVICE_PORT", "53"),
        ("SHOAL_SERVICE_PORT_DNS", "53"),
        ("SHOAL_PORT", "udp://[fd00::12]:53"),
        ("SHOAL_PORT_53_UDP", "udp://[fd00::12]:53"),
        ("SHOAL_PORT_53_UDP_PROTO", "udp"),
        ("SHOAL_PORT_53_UDP_PORT", "53"),
        ("SHOAL_PORT_53_UDP_ADDR", "fd00::12"),
        ("SHOAL_KUBERNETES_PORT", "sctp://10.0.0.13:9"),
        ("SHOAL_KUBERNETES_PORT_9_SCTP", "sctp://10.0.0.13:9"),
    ];

    /// Issue: a pod in a namespace with the Service `shoal-redis` could not load its config.
    #[test]
    fn kubernetes_service_links_are_not_overrides() {
        let mut vars = env(SERVICE_LINKS);
        vars.push(("SHOAL_REDIS_URL".into(), "redis://shoal-redis:6379".into()));
        let c = Config::from_layers(Some(("c.yaml", "redis:\n  expiry_secs: 60\n")), vars)
            .expect("service links are skipped");
        let mut expected = Config::default();
        expected.redis.url = Some("redis://shoal-redis:6379".into());
        expected.redis.expiry_secs = 60;
        assert_eq!(c, expected);
        // Only the exact shapes: a mistyped override is still an error.
        for (var, value, key) in [
            ("SHOAL_REDIS_PORT", "6379", "redis.port"),
            ("SHOAL_PORT", "8080", "SHOAL_PORT"),
            ("SHOAL_REDIS_SERVICE_PORT", "http", "redis.service_port"),
            ("SHOAL_REDIS_PORT_6379_TCP", "6379", "redis.port_6379_tcp"),
            (
                "SHOAL_REDIS_PORT_6379_TCP_PROTO",
                "ftp",
                "redis.port_6379_tcp_proto",
            ),
            (
                "SHOAL_REDIS_PORT_X_TCP_PROTO",
                "tcp",
                "redis.port_x_tcp_proto",
            ),
            (
                "SHOAL_REDIS_PORT_6379_HTTP_PROTO",
                "tcp",
                "redis.port_6379_http_proto",
            ),
        ] {
            let (origin, k, _) = config_error(Config::from_layers(None, env(&[(var, value)])));
            assert_eq!(
                (origin, k.as_str()),
                (format!("environment variable {var}"), key),
                "{var}={value}"
            );
        }
    }

    /// No key of any section can be taken for a service link, whatever its value.
    #[test]
    fn no_config_key_is_ever_a_service_link() {
        let Ok(Value::Mapping(sections)) = yaml_serde::to_value(Config::default()) else {
            panic!("the defaults render as a mapping");
        };
        let mut vars = 0;
        for (section, keys) in &sections {
            let (Value::String(section), Value::Mapping(keys)) = (section, keys) else {
                panic!("{section:?}: sections are mappings");
            };
            for key in keys.keys() {
                let Value::String(key) = key else {
                    panic!("{key:?}");
                };
                let var = if section == "shoal" {
                    format!("SHOAL_{}", key.to_ascii_uppercase())
                } else {
                    format!(
                        "SHOAL_{}_{}",
                        section.to_ascii_uppercase(),
                        key.to_ascii_uppercase()
                    )
                };
                for value in ["tcp://10.0.0.1:1", "udp://h:2", "6379", "tcp", "10.0.0.1"] {
                    assert!(!is_service_link(&var, value), "{var}={value}");
                }
                vars += 1;
            }
        }
        assert!(vars > 40, "{vars} keys");
    }

    /// Issue: `SHOAL_NAMESPACE=2024` was refused and a ` #` cut a value short.
    #[test]
    fn string_overrides_keep_the_raw_value() {
        let c = Config::from_layers(
            Some(("c.yaml", "kubernetes:\n  image: app:1\n")),
            env(&[
                ("SHOAL_NAMESPACE", "2024"),
                ("SHOAL_REDIS_SERVER_BINARY", "/opt/redis #2/redis-server"),
                ("SHOAL_KUBERNETES_NAMESPACE", "null"),
                ("SHOAL_KUBERNETES_CONTEXT", "true"),
                ("SHOAL_KUBERNETES_SERVICE_ACCOUNT", "0x10"),
                ("SHOAL_KUBERNETES_IMAGE", ""),
                ("SHOAL_MULTIPROCESSING_EXPORT_EXECUTION_DETAILS", "1e3"),
                ("SHOAL_REDIS_EXPIRY_SECS", "30"),
                ("SHOAL_REDIS_CONNECT_TIMEOUT_SECS", "0.5"),
                ("SHOAL_POOL_PROGRESS", "true"),
                ("SHOAL_LOCAL_WORKERS", "null"),
                ("SHOAL_LOCAL_START_METHOD", "thread"),
                ("SHOAL_KUBERNETES_TTL_SECONDS_AFTER_FINISHED", "~"),
                (
                    "SHOAL_MULTIPROCESSING_ENV_VARS",
                    "{A: '1', B: x} # a YAML comment",
                ),
            ]),
        )
        .expect("valid");
        assert_eq!(c.shoal.namespace, "2024");
        assert_eq!(c.redis.server_binary, "/opt/redis #2/redis-server");
        assert_eq!(c.kubernetes.namespace.as_deref(), Some("null"));
        assert_eq!(c.kubernetes.context.as_deref(), Some("true"));
        assert_eq!(c.kubernetes.service_account.as_deref(), Some("0x10"));
        // An empty value unsets an optional key, as it always did.
        assert_eq!(c.kubernetes.image, None);
        assert_eq!(
            c.multiprocessing.export_execution_details,
            Some(PathBuf::from("1e3"))
        );
        // Keys of other types still read YAML.
        assert_eq!(c.redis.expiry_secs, 30);
        assert_eq!(c.redis.connect_timeout_secs, 0.5);
        assert!(c.pool.progress);
        assert_eq!(c.local.workers, None);
        assert_eq!(c.local.start_method, StartMethod::Thread);
        assert_eq!(c.kubernetes.ttl_seconds_after_finished, None);
        assert_eq!(c.multiprocessing.env_vars["A"], "1");
        assert_eq!(c.multiprocessing.env_vars["B"], "x");
        // A wrong value is still refused, naming the variable.
        for (var, value, key, says) in [
            (
                "SHOAL_REDIS_EXPIRY_SECS",
                "soon",
                "redis.expiry_secs",
                "invalid type",
            ),
            ("SHOAL_POOL_RETRIES", "4294967296", "pool.retries", "u32"),
            ("SHOAL_NAMESPACE", "a b", "shoal.namespace", "must be"),
            // The whole value is checked: YAML would have read `redis://h:1` and said nothing.
            (
                "SHOAL_REDIS_URL",
                "redis://h:1 #x",
                "redis.url",
                "redis://h:1 #x",
            ),
            (
                "SHOAL_MULTIPROCESSING_ENV_VARS",
                "{A: ",
                "multiprocessing.env_vars",
                "YAML",
            ),
            ("SHOAL_REDIS_URLL", "x", "redis.urll", "unknown field"),
        ] {
            let (origin, k, reason) = config_error(Config::from_layers(None, env(&[(var, value)])));
            assert_eq!(
                (origin, k.as_str()),
                (format!("environment variable {var}"), key),
                "{var}={value}: {reason}"
            );
            assert!(reason.contains(says), "{var}={value}: {reason}");
        }
    }

    /// An error inside a key set from the environment names the variable, not the file.
    #[test]
    fn errors_inside_an_environment_value_name_the_variable() {
        for (var, value, key) in [
            (
                "SHOAL_KUBERNETES_RESOURCES",
                "{requests: {cpu: 2}, limits: {cpu: 1}}",
                "kubernetes.resources.requests",
            ),
            (
                "SHOAL_KUBERNETES_RESOURCES",
                "{requests: {cpu: -1}}",
                "kubernetes.resources.requests",
            ),
            (
                "SHOAL_KUBERNETES_RESOURCES",
                "{requests: {cpu: [1]}}",
                "kubernetes.resources.requests.cpu",
            ),
            (
                "SHOAL_KUBERNETES_TOLERATIONS",
                "[{key: a, effect: Sometimes}]",
                "kubernetes.tolerations",
            ),
            (
                "SHOAL_KUBERNETES_TOLERATIONS",
                "[{key: a, operatr: Equal}]",
                "kubernetes.tolerations[0].operatr",
            ),
            (
                "SHOAL_KUBERNETES_REDIS_URL_SECRET",
                "{name: Redis_, key: url}",
                "kubernetes.redis_url_secret.name",
            ),
        ] {
            let (origin, k, reason) = config_error(Config::from_layers(
                Some(("c.yaml", "kubernetes:\n  resources: {}\n")),
                env(&[(var, value)]),
            ));
            assert_eq!(
                (origin, k.as_str()),
                (format!("environment variable {var}"), key),
                "{var}={value}: {reason}"
            );
        }
        // The file keeps naming its own keys.
        let (origin, key, _) = config_error(Config::from_layers(
            Some(("c.yaml", "kubernetes:\n  image_pull_policy: Sometimes\n")),
            env(&[("SHOAL_KUBERNETES_IMAGE", "app:1")]),
        ));
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("c.yaml", "kubernetes.image_pull_policy")
        );
        let (origin, key, _) = config_error(Config::from_layers(
            Some(("c.yaml", "kubernetes:\n  resources: {requests: {cpu: x}}\n")),
            env(&[("SHOAL_KUBERNETES_IMAGE", "app:1")]),
        ));
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("c.yaml", "kubernetes.resources.requests")
        );
    }

    /// Issue: the first `@` was taken as the end of the password, and Unix URLs' query
    /// parameters were shown.
    #[test]
    fn redaction_hides_every_password() {
        for (url, shown) in [
            ("redis://user:p@ss@host:1", "redis://user:***@host:1"),
            ("redis://:p@ss@w@h:1/0", "redis://:***@h:1/0"),
            (
                "rediss://p@ss@h:1/0#insecure",
                "rediss://***@h:1/0#insecure",
            ),
            ("redis://u:p?s#s@h:1", "redis://u:***@h:1"),
            ("redis://h:1/0", "redis://h:1/0"),
            ("redis://h:1/?protocol=resp3", "redis://h:1/?protocol=resp3"),
            (
                "unix:///run/redis.sock?user=u&pass=secret",
                "unix:///run/redis.sock?user=u&pass=***",
            ),
            (
                "redis+unix:///run/r.sock?db=1&password=secret&user=u",
                "redis+unix:///run/r.sock?db=1&password=***&user=u",
            ),
            (
                "unix:///run/redis@1.sock?db=2",
                "unix:///run/redis@1.sock?db=2",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        // Malformed URLs, as error messages show them: nothing between a `:` and an `@`, nor
        // any query value but the harmless ones, is ever shown.
        for url in [
            "redis:/default:S3cret@h",
            "redis:default:S3cret@h:1",
            "default:S3cret@h",
            "redis://u:S3/cret@h:1",
            "redis://u:S3cret@h:1/0?pass=S3cret",
            "unix:/run/r.sock?pass=S3cret",
            "unix:///run/r.sock?p%61ss=S3cret",
            "unix:///r.sock?user=u&pass=S3cret&db=1",
            "http://u:S3cret@h",
            "redis://u:S3cret@",
            "redis://:S3cret@@",
            "@:S3cret@",
            "user:S3cret@redis://h:1",
            "redis?pass=S3cret://h",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("S3cret"), "{url} -> {shown}");
            assert!(!shown.contains("cret"), "{url} -> {shown}");
        }
    }

    #[test]
    fn url_errors_and_debug_output_hide_the_password() {
        for url in [
            "redis:/default:S3cret@h",
            "redis:default:S3cret@h",
            "http://u:S3cret@h",
            "redis://u:S3cret@h:notaport",
            "unix:///run/r.sock?pass=S3cret&db=x",
        ] {
            let reason = check_redis_url(url).expect_err(url);
            assert!(!reason.contains("S3cret"), "{url}: {reason}");
            let (_, key, reason) = config_error(Config::builder().redis_url(url).build());
            assert_eq!(key, "redis.url");
            assert!(!reason.contains("S3cret"), "{url}: {reason}");
        }
        let c = Config::builder()
            .redis_url("redis://app:S3cret@h:1/0")
            .build()
            .expect("valid");
        for shown in [
            format!("{c:?}"),
            format!("{:?}", c.redis),
            format!("{c:#?}"),
        ] {
            assert!(!shown.contains("S3cret"), "{shown}");
            assert!(shown.contains("redis://app:***@h:1/0"), "{shown}");
            for field in [
                "expiry_secs: 3600",
                "max_message_bytes: 67108864",
                "server_binary: \"redis-server\"",
                "connect_timeout_secs: 5.0",
                "response_timeout_secs: 30.0",
            ] {
                assert!(
                    shown
                        .replace(['\n', ' ', ','], "")
                        .contains(&field.replace(' ', "")),
                    "{field}: {shown}"
                );
            }
        }
        let yaml = c.to_redacted_yaml();
        assert!(!yaml.contains("S3cret"), "{yaml}");
        assert!(yaml.contains("redis://app:***@h:1/0"), "{yaml}");
        // Only the shown text: the configuration keeps its password.
        assert_eq!(c.redis.url.as_deref(), Some("redis://app:S3cret@h:1/0"));
        assert!(c.to_yaml().contains("S3cret"));
    }

    /// Issue: one variable that is not UTF-8, anywhere in the environment, panicked `load`.
    #[cfg(unix)]
    #[test]
    fn only_shoal_variables_need_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let bytes = |b: &[u8]| OsString::from_vec(b.to_vec());
        let vars = vec![
            (bytes(b"PATH"), bytes(b"/bin")),
            (bytes(b"LC_LEGACY"), bytes(b"caf\xe9")),
            (bytes(b"\xffODD"), bytes(b"x")),
            (bytes(b"SHOAL_CONFIG"), bytes(b"/etc/shoal-\xff.yaml")),
            (bytes(b"SHOAL_WORKER_TASK"), bytes(b"\xff")),
            (bytes(b"SHOAL_TEST_\xff"), bytes(b"\xff")),
            (bytes(b"SHOAL_LOG"), bytes(b"\xff")),
            (bytes(b"SHOAL_NAMESPACE"), bytes(b"jobs")),
        ];
        assert_eq!(
            shoal_env(vars.clone()).expect("only SHOAL_ overrides are read"),
            env(&[("SHOAL_NAMESPACE", "jobs")])
        );
        for (name, value, key, says) in [
            (
                &b"SHOAL_REDIS_URL"[..],
                &b"redis://h\xff"[..],
                "SHOAL_REDIS_URL",
                "value",
            ),
            (
                b"SHOAL_REDIS_\xffURL",
                b"x",
                "SHOAL_REDIS_\u{fffd}URL",
                "name",
            ),
        ] {
            let mut with = vars.clone();
            with.push((bytes(name), bytes(value)));
            match shoal_env(with) {
                Err(Error::Config {
                    origin,
                    key: k,
                    reason,
                }) => {
                    assert_eq!(
                        (origin, k.as_str()),
                        (format!("environment variable {key}"), key)
                    );
                    assert!(
                        reason.contains(says) && reason.contains("UTF-8"),
                        "{reason}"
                    );
                }
                other => panic!("{key}: expected a config error, got {other:?}"),
            }
        }
    }

    /// Issue: a `SHOAL_CONFIG` that is not UTF-8 was ignored for ./config.yaml.
    #[cfg(unix)]
    #[test]
    fn the_config_path_need_not_be_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"shoal-\xff.yaml"));
        std::fs::write(&path, "shoal:\n  namespace: x\n").expect("written");
        let found = config_file_from(Some(path.clone().into_os_string()), None).expect("found");
        assert_eq!(found, Some(path));
        let missing = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"missing-\xff.yaml"));
        let (origin, key, reason) = match config_file_from(Some(missing.into_os_string()), None) {
            Err(Error::Config {
                origin,
                key,
                reason,
            }) => (origin, key, reason),
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("environment variable SHOAL_CONFIG", "SHOAL_CONFIG")
        );
        assert!(reason.contains("missing-"), "{reason}");
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact_url("redis://app:s3cret@h:1/0"),
            "redis://app:***@h:1/0"
        );
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn a_remote_backend_needs_a_store_its_workers_reach_and_an_image() {
        let k8s = "shoal:\n  backend: kubernetes\n";
        let cases = [
            ("", "redis.url", "embedded store"),
            (
                "redis:\n  url: unix:///tmp/r.sock\n",
                "redis.url",
                "Unix socket",
            ),
            (
                "redis:\n  url: redis://127.0.0.1:6379\n",
                "redis.url",
                "cannot reach 127.0.0.1",
            ),
            (
                "redis:\n  url: redis://u:p@localhost:6379/0\n",
                "redis.url",
                "localhost",
            ),
            ("redis:\n  url: redis://[::1]:6379\n", "redis.url", "::1"),
            (
                "redis:\n  url: redis://redis.default.svc:6379\n",
                "kubernetes.image",
                "image",
            ),
        ];
        for (extra, key, says) in cases {
            let (_, k, reason) =
                config_error(Config::from_yaml_str(&format!("{k8s}{extra}"), "c.yaml"));
            assert_eq!(k, key, "{extra}");
            assert!(reason.contains(says), "{extra}: {reason}");
            // A message reads as one sentence: no run of spaces left by a broken line join.
            assert!(!reason.contains("  "), "{extra}: {reason:?}");
        }
        let ok = Config::from_yaml_str(
            &format!("{k8s}redis:\n  url: redis://10.0.0.5:6379\nkubernetes:\n  image: app:1\n"),
            "c.yaml",
        )
        .expect("valid");
        assert!(ok.shoal.backend.is_remote());
        // A loopback URL is fine when the workers get their own from a Secret.
        Config::from_yaml_str(
            &format!(
                "{k8s}redis:\n  url: redis://127.0.0.1:6379\nkubernetes:\n  image: app:1\n  \
                 redis_url_secret: {{name: redis, key: url}}\n"
            ),
            "c.yaml",
        )
        .expect("valid with a secret");
        let (_, key, _) = config_error(Config::from_yaml_str(
            "kubernetes:\n  image_pull_policy: Sometimes\n",
            "c.yaml",
        ));
        assert_eq!(key, "kubernetes.image_pull_policy");
        let (_, key, _) = config_error(Config::from_yaml_str(
            "kubernetes:\n  active_deadline_seconds: 0\n",
            "c.yaml",
        ));
        assert_eq!(key, "kubernetes.active_deadline_seconds");
        let (_, key, reason) = config_error(Config::from_yaml_str(
            "kubernetes:\n  pod_create_grace_secs: -1\n",
            "c.yaml",
        ));
        assert_eq!(key, "kubernetes.pod_create_grace_secs");
        assert!(reason.contains("0 ..= 86400"), "{reason}");
        for (secret, key) in [
            (
                "{name: Redis_, key: password}",
                "kubernetes.redis_password_secret.name",
            ),
            (
                "{name: redis, key: 'pass word'}",
                "kubernetes.redis_password_secret.key",
            ),
        ] {
            let (_, k, _) = config_error(Config::from_yaml_str(
                &format!("kubernetes:\n  redis_password_secret: {secret}\n"),
                "c.yaml",
            ));
            assert_eq!(k, key, "{secret}");
        }
        Config::from_yaml_str(
            "kubernetes:\n  redis_password_secret: {name: redis, key: password}\n",
            "c.yaml",
        )
        .expect("a password Secret");
    }
}
