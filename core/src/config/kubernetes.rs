//! The `kubernetes` section: how workers run as Kubernetes Jobs (`shoal.backend: kubernetes`).
//!
//! Every key is documented, with its default, in the repository's `config.yaml`. Values are
//! checked when the configuration is loaded, against the rules the Kubernetes API server
//! applies (names, label syntax, quantities, enumerations), so that a mistake is an error naming
//! the key at start-up rather than a Job the API server refuses later.
//!
//! Where Kubernetes takes a string that manifests often write unquoted (`cpu: 1`, a label value
//! `true`), a YAML number or boolean is taken in its string form (`"1"`, `"true"`) and then
//! checked as a string is.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The `kubernetes` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Namespace of the Jobs shoal creates; `None`: the namespace of the kubeconfig's context,
    /// or the service account's when running inside the cluster.
    pub namespace: Option<String>,
    /// The kubeconfig context to use; `None`: the current one (or the in-cluster service
    /// account when there is no kubeconfig).
    pub context: Option<String>,
    /// The container image: this same program, built with `deploy/kubernetes/Dockerfile`.
    /// Required with `shoal.backend: kubernetes`.
    pub image: Option<String>,
    /// When the kubelet pulls the image.
    pub image_pull_policy: ImagePullPolicy,
    /// Path of this program inside the image; `None`: `/usr/local/bin/<this program's file
    /// name>`, where the Dockerfile puts it.
    pub command: Option<String>,
    /// The service account the worker pods run as; `None`: the namespace's default.
    pub service_account: Option<String>,
    /// CPU and memory requests and limits of the worker container.
    pub resources: Resources,
    /// Node labels a worker pod must match.
    #[serde(deserialize_with = "label_map")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the worker pods tolerate.
    pub tolerations: Vec<Toleration>,
    /// Labels added to every Job and pod (shoal adds its own `shoal.dev/*` labels).
    #[serde(deserialize_with = "label_map")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to every Job and pod.
    #[serde(deserialize_with = "label_map")]
    pub annotations: BTreeMap<String, String>,
    /// Seconds after which Kubernetes deletes a finished Job and its pods; `None`: never (the
    /// runtime deletes what it started when it is dropped, in any case).
    pub ttl_seconds_after_finished: Option<u32>,
    /// Seconds a Job may run before Kubernetes kills it; `None`: no limit.
    pub active_deadline_seconds: Option<u64>,
    /// A Secret key holding the Redis URL the workers use (it may differ from `redis.url`, e.g.
    /// a service name inside the cluster). `None`: the workers get `redis.url` as written,
    /// visible to whoever can read the Job.
    pub redis_url_secret: Option<SecretKeyRef>,
    /// A Secret key holding the password of the workers' Redis. The Job then carries the Redis
    /// URL without a password (from `redis.url`, or `redis_url_secret`) and the workers add this
    /// one: a password kept in a Secret while the address stays plain configuration. `None`:
    /// the URL's own password, if any.
    pub redis_password_secret: Option<SecretKeyRef>,
    /// Seconds a worker's Job may stay without a pod after the first `FailedCreate` Warning
    /// Event on it (the Job controller could not create the pod: a missing service account, an
    /// exhausted quota, an admission policy). If no pod has appeared by then, the worker ends
    /// with exit code 1, the Event's message is logged and the Job deleted; a pod created
    /// meanwhile (the quota freed, the account created) lets the worker run. `0`: end it at the
    /// first such Event.
    pub pod_create_grace_secs: f64,
    /// Seconds a worker's container may take to start, from its Job's creation, before the worker
    /// is ended with exit code 1 (its pod and Job deleted, the scheduler's reason logged): a pod no
    /// node can take (a `node_selector` no node matches, a request larger than any node) would
    /// otherwise keep the worker, and whoever joins it, waiting for ever. Generous by default: a
    /// cluster autoscaler adding a node, or a large image pulled for the first time, take minutes.
    pub pod_start_timeout_secs: f64,
    /// Seconds a call to the API server other than the watches (creating a Secret or a Job,
    /// every delete) may take before it fails with the backend's error naming the call: the
    /// Kubernetes client has no read timeout of its own, and a connection dropped silently
    /// would block `Process::start` or the runtime's shutdown for ever.
    pub api_call_timeout_secs: f64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            namespace: None,
            context: None,
            image: None,
            image_pull_policy: ImagePullPolicy::IfNotPresent,
            command: None,
            service_account: None,
            resources: Resources::default(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            ttl_seconds_after_finished: Some(300),
            active_deadline_seconds: None,
            redis_url_secret: None,
            redis_password_secret: None,
            pod_create_grace_secs: 30.0,
            pod_start_timeout_secs: 600.0,
            api_call_timeout_secs: 60.0,
        }
    }
}

/// When the kubelet pulls the image (the API's `imagePullPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImagePullPolicy {
    /// Pull at every pod start.
    Always,
    /// Pull when the node does not have it.
    #[default]
    IfNotPresent,
    /// Never pull: the image must be on the node.
    Never,
}

impl ImagePullPolicy {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        }
    }
}

/// Requests and limits of the worker container, as resource name → quantity (`cpu: 500m`,
/// `memory: 1Gi`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// What the scheduler reserves.
    #[serde(deserialize_with = "quantity_map")]
    pub requests: BTreeMap<String, String>,
    /// What the container may use at most; no request may be greater than its limit.
    #[serde(deserialize_with = "quantity_map")]
    pub limits: BTreeMap<String, String>,
}

/// A toleration of a node taint (the API's `Toleration`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Toleration {
    /// The taint key; `None` with operator `Exists` tolerates every taint.
    pub key: Option<String>,
    /// `Equal` (default) or `Exists`.
    pub operator: Option<String>,
    /// The taint value, for `Equal`.
    #[serde(deserialize_with = "optional_label_text")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; `None`: all effects.
    pub effect: Option<String>,
    /// For `NoExecute`: how long the pod stays bound after the taint appears.
    pub toleration_seconds: Option<i64>,
}

/// A key of a Secret in the Jobs' namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key inside it.
    pub key: String,
}

impl KubernetesConfig {
    /// [`KubernetesConfig::pod_create_grace_secs`] as a duration, clamped into its range.
    pub fn pod_create_grace(&self) -> std::time::Duration {
        super::POD_CREATE_GRACE.duration(
            self.pod_create_grace_secs,
            KubernetesConfig::default().pod_create_grace_secs,
        )
    }

    /// [`KubernetesConfig::pod_start_timeout_secs`] as a duration, clamped into its range.
    pub fn pod_start_timeout(&self) -> std::time::Duration {
        super::POD_START_TIMEOUT.duration(
            self.pod_start_timeout_secs,
            KubernetesConfig::default().pod_start_timeout_secs,
        )
    }

    /// [`KubernetesConfig::api_call_timeout_secs`] as a duration, clamped into its range.
    pub fn api_call_timeout(&self) -> std::time::Duration {
        super::API_CALL_TIMEOUT.duration(
            self.api_call_timeout_secs,
            KubernetesConfig::default().api_call_timeout_secs,
        )
    }

    /// Checks every value; `Err((dotted key, reason))` for the first one that is wrong.
    pub(super) fn check(&self) -> std::result::Result<(), (String, String)> {
        let fail = |key: &str, reason: String| Err((format!("kubernetes.{key}"), reason));
        if let Some(ns) = &self.namespace
            && let Err(reason) = dns_label(ns)
        {
            return fail("namespace", reason);
        }
        if let Some(image) = &self.image
            && (image.trim().is_empty() || image.chars().any(char::is_whitespace))
        {
            return fail(
                "image",
                format!("{image:?} is not an image reference (no spaces, not empty)"),
            );
        }
        if let Some(command) = &self.command
            && !command.starts_with('/')
        {
            return fail(
                "command",
                format!("{command:?} must be an absolute path inside the image"),
            );
        }
        if let Some(account) = &self.service_account
            && let Err(reason) = dns_subdomain(account)
        {
            return fail("service_account", reason);
        }
        for (section, map) in [
            ("resources.requests", &self.resources.requests),
            ("resources.limits", &self.resources.limits),
        ] {
            for (name, quantity) in map {
                if let Err(reason) = qualified_name(name) {
                    return fail(section, format!("resource {name:?}: {reason}"));
                }
                if let Err(reason) = check_quantity(quantity) {
                    return fail(section, format!("{name}: {reason}"));
                }
            }
        }
        // The API server refuses such a pod at creation: say so at load instead.
        for (name, request) in &self.resources.requests {
            let Some(limit) = self.resources.limits.get(name) else {
                continue;
            };
            if let (Ok(r), Ok(l)) = (quantity_value(request), quantity_value(limit))
                && r > l
            {
                return fail(
                    "resources.requests",
                    format!(
                        "{name}: {request} is greater than resources.limits.{name} ({limit}); \
                         Kubernetes refuses a pod whose request exceeds its limit"
                    ),
                );
            }
        }
        for (section, map) in [
            ("node_selector", &self.node_selector),
            ("labels", &self.labels),
        ] {
            for (key, value) in map {
                if let Err(reason) = qualified_name(key) {
                    return fail(section, format!("label key {key:?}: {reason}"));
                }
                if let Err(reason) = label_value(value) {
                    return fail(section, format!("the value of {key}: {reason}"));
                }
            }
        }
        if let Some(key) = self.labels.keys().find(|k| k.starts_with("shoal.dev/")) {
            return fail(
                "labels",
                format!("{key:?}: the shoal.dev/ prefix is shoal's own"),
            );
        }
        for key in self.annotations.keys() {
            if let Err(reason) = qualified_name(key) {
                return fail("annotations", format!("{key:?}: {reason}"));
            }
        }
        for (i, t) in self.tolerations.iter().enumerate() {
            let operator = t.operator.as_deref().unwrap_or("Equal");
            if !matches!(operator, "Equal" | "Exists") {
                return fail(
                    "tolerations",
                    format!("[{i}].operator {operator:?} must be Equal or Exists"),
                );
            }
            if operator == "Exists" && t.value.as_deref().is_some_and(|v| !v.is_empty()) {
                return fail(
                    "tolerations",
                    format!("[{i}]: a value is only allowed with operator Equal"),
                );
            }
            if operator == "Equal" && t.key.is_none() {
                return fail("tolerations", format!("[{i}]: operator Equal needs a key"));
            }
            if let Some(effect) = &t.effect
                && !matches!(
                    effect.as_str(),
                    "NoSchedule" | "PreferNoSchedule" | "NoExecute"
                )
            {
                return fail(
                    "tolerations",
                    format!(
                        "[{i}].effect {effect:?} must be NoSchedule, PreferNoSchedule or NoExecute"
                    ),
                );
            }
            if t.toleration_seconds.is_some() && t.effect.as_deref() != Some("NoExecute") {
                return fail(
                    "tolerations",
                    format!("[{i}].toleration_seconds only applies to effect NoExecute"),
                );
            }
        }
        if let Some(0) = self.active_deadline_seconds {
            return fail("active_deadline_seconds", "must be at least 1".into());
        }
        for (key, secret) in [
            ("redis_url_secret", &self.redis_url_secret),
            ("redis_password_secret", &self.redis_password_secret),
        ] {
            let Some(secret) = secret else { continue };
            if let Err(reason) = dns_subdomain(&secret.name) {
                return fail(&format!("{key}.name"), reason);
            }
            if secret.key.is_empty()
                || secret.key.len() > 253
                || !secret
                    .key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return fail(
                    &format!("{key}.key"),
                    format!("{:?} is not a Secret key (A-Z a-z 0-9 - _ .)", secret.key),
                );
            }
        }
        Ok(())
    }
}

/// An RFC 1123 label: what namespaces and many names must be.
fn dns_label(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1 to 63 characters of a-z, 0-9 and '-', starting and ending with \
             a letter or digit"
        ))
    }
}

/// An RFC 1123 subdomain: dot-separated labels, at most 253 characters.
fn dns_subdomain(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 253 || name.split('.').any(|l| dns_label(l).is_err()) {
        Err(format!(
            "{name:?} must be a DNS subdomain: dot-separated parts of a-z, 0-9 and '-', at most \
             253 characters"
        ))
    } else {
        Ok(())
    }
}

/// A label key or annotation key: `[prefix/]name`.
fn qualified_name(key: &str) -> std::result::Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns_subdomain(prefix)?;
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(
            "must be [prefix/]name with a name of 1 to 63 characters of A-Z a-z 0-9 - _ ., \
             starting and ending with a letter or digit"
                .into(),
        )
    }
}

/// A label value: empty, or like a name.
fn label_value(value: &str) -> std::result::Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    qualified_name(value)
        .ok()
        .filter(|_| !value.contains('/'))
        .ok_or_else(|| {
            format!(
                "{value:?} must be at most 63 characters of A-Z a-z 0-9 - _ ., starting and \
                 ending with a letter or digit"
            )
        })
}

/// A resource quantity: a decimal number with an optional suffix (`500m`, `1.5`, `2Gi`, `1e3`).
pub fn check_quantity(quantity: &str) -> std::result::Result<(), String> {
    quantity_value(quantity).map(|_| ())
}

/// The value of a resource quantity (see [`check_quantity`]), to compare a request with its
/// limit. Each spelling is rounded once to the nearest `f64` (a decimal one by Rust's correctly
/// rounded parser, a binary suffix by an exact power of two), so two spellings of one value
/// give one `f64`, and a request that is not greater than its limit never compares greater.
fn quantity_value(quantity: &str) -> std::result::Result<f64, String> {
    const SUFFIXES: &[&str] = &[
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    let bad = || {
        Err(format!(
            "{quantity:?} is not a quantity (a number with an optional suffix: 500m, 2, 1.5Gi, \
             512Mi)"
        ))
    };
    let body = quantity.strip_prefix('+').unwrap_or(quantity);
    // A suffix first: `E` (exa) and `Ei` (exbi) are suffixes, not exponents.
    let (number, exponent, binary) = match SUFFIXES
        .iter()
        .find(|s| !s.is_empty() && body.ends_with(**s))
    {
        Some(suffix) => {
            let number = &body[..body.len() - suffix.len()];
            let (exponent, binary) = match *suffix {
                "Ki" => ("0", 10),
                "Mi" => ("0", 20),
                "Gi" => ("0", 30),
                "Ti" => ("0", 40),
                "Pi" => ("0", 50),
                "Ei" => ("0", 60),
                "n" => ("-9", 0),
                "u" => ("-6", 0),
                "m" => ("-3", 0),
                "k" => ("3", 0),
                "M" => ("6", 0),
                "G" => ("9", 0),
                "T" => ("12", 0),
                "P" => ("15", 0),
                _ => ("18", 0),
            };
            (number, exponent, binary)
        }
        None => match body.split_once(['e', 'E']) {
            Some((number, exponent)) => {
                let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
                if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                    return bad();
                }
                (number, exponent, 0)
            }
            None => (body, "0", 0),
        },
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return bad();
    }
    let or_zero = |s: &str| {
        if s.is_empty() {
            "0".to_string()
        } else {
            s.to_string()
        }
    };
    let decimal: f64 = format!("{}.{}e{exponent}", or_zero(int), or_zero(frac))
        .parse()
        .or_else(|_| bad())?;
    Ok(decimal * 2f64.powi(binary))
}

/// Whether a YAML number with a fraction is taken in its string form: yes for a quantity, whose
/// value any spelling keeps (`1.50` is `1.5`); no for a label value, whose digits it would lose
/// (`version: 1.10` reads as 1.1).
type Fractions = bool;

/// A string, or a YAML number or boolean in its string form (see the module docs).
struct Text<const FRACTIONS: Fractions>(String);

impl<'de, const FRACTIONS: Fractions> Deserialize<'de> for Text<FRACTIONS> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(TextVisitor::<FRACTIONS>)
            .map(Text)
    }
}

struct TextVisitor<const FRACTIONS: Fractions>;

impl<const FRACTIONS: Fractions> Visitor<'_> for TextVisitor<FRACTIONS> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if FRACTIONS {
            f.write_str("a string, number or boolean")
        } else {
            f.write_str("a string, integer or boolean")
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        if FRACTIONS {
            // `Display` never uses an exponent: `1e9` is "1000000000", a valid quantity; NaN
            // and infinities become text that the quantity check refuses.
            Ok(v.to_string())
        } else {
            Err(E::custom(format!(
                "the YAML number {v} would lose its digits as a string (1.10 reads as 1.1): \
                 quote it"
            )))
        }
    }
}

/// A mapping whose keys and values are [`Text`], in a `BTreeMap` of strings.
struct TextMapVisitor<const FRACTIONS: Fractions>;

impl<'de, const FRACTIONS: Fractions> Visitor<'de> for TextMapVisitor<FRACTIONS> {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((Text(key), Text(value))) =
            map.next_entry::<Text<false>, Text<FRACTIONS>>()?
        {
            // `1` and `'1'` are one key once converted: refuse rather than drop one of them.
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("the key {key:?} appears twice")));
            }
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// Requests or limits: resource name → quantity, numbers taken in their string form.
fn quantity_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(TextMapVisitor::<true>)
}

/// Labels, a node selector or annotations: integers and booleans taken in their string form.
fn label_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(TextMapVisitor::<false>)
}

/// A toleration's value: like a label value, or null.
fn optional_label_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Text<false>>::deserialize(d)?.map(|Text(text)| text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> crate::Result<crate::config::Config> {
        crate::config::Config::from_yaml_str(yaml, "c.yaml")
    }

    fn load_error(yaml: &str) -> (String, String) {
        match load(yaml) {
            Err(crate::Error::Config { key, reason, .. }) => (key, reason),
            other => panic!("{yaml}: expected a config error, got {other:?}"),
        }
    }

    /// Kubernetes manifests write `cpu: 1` and `value: "true"`; unquoted numbers and booleans
    /// are taken in their string form, then checked as strings are.
    #[test]
    fn unquoted_numbers_and_booleans_are_read_as_their_string_form() {
        let c = load(
            "kubernetes:\n  resources:\n    requests: {cpu: 1, memory: 536870912}\n    \
             limits: {cpu: 2.5, memory: 1e9}\n  node_selector: {spot: true, zone: 3}\n  \
             labels: {tier: 1, canary: false}\n  annotations: {replicas: 3}\n  \
             tolerations: [{key: spot, value: true, effect: NoSchedule}, {key: gen, value: 2}]\n",
        )
        .expect("numbers and booleans where Kubernetes takes strings");
        let k = c.kubernetes;
        assert_eq!(k.resources.requests["cpu"], "1");
        assert_eq!(k.resources.requests["memory"], "536870912");
        assert_eq!(k.resources.limits["cpu"], "2.5");
        assert_eq!(k.resources.limits["memory"], "1000000000");
        assert_eq!(k.node_selector["spot"], "true");
        assert_eq!(k.node_selector["zone"], "3");
        assert_eq!(k.labels["tier"], "1");
        assert_eq!(k.labels["canary"], "false");
        assert_eq!(k.annotations["replicas"], "3");
        assert_eq!(k.tolerations[0].value.as_deref(), Some("true"));
        assert_eq!(k.tolerations[1].value.as_deref(), Some("2"));
        // Quoted values are unchanged, and a toleration without a value still has none.
        let c = load(
            "kubernetes:\n  resources: {requests: {cpu: '0.5'}}\n  \
             tolerations: [{operator: Exists}]\n",
        )
        .expect("strings");
        assert_eq!(c.kubernetes.resources.requests["cpu"], "0.5");
        assert_eq!(c.kubernetes.tolerations[0].value, None);
        // Converted values are still checked; a number with a fraction as a label value would
        // lose its digits (1.10 reads as 1.1), so it must be quoted.
        for (yaml, key, says) in [
            (
                "resources: {requests: {cpu: -1}}",
                "kubernetes.resources.requests",
                "-1",
            ),
            (
                "resources: {limits: {cpu: .inf}}",
                "kubernetes.resources.limits",
                "inf",
            ),
            (
                "resources: {limits: {cpu: null}}",
                "kubernetes.resources.limits.cpu",
                "unit",
            ),
            (
                "resources: {limits: {cpu: [1]}}",
                "kubernetes.resources.limits.cpu",
                "sequence",
            ),
            (
                "labels: {version: 1.10}",
                "kubernetes.labels.version",
                "quote",
            ),
            ("node_selector: {a: -1}", "kubernetes.node_selector", "-1"),
            (
                "tolerations: [{key: a, value: 1.5}]",
                "kubernetes.tolerations[0].value",
                "quote",
            ),
            ("labels: {1: a, '1': b}", "kubernetes.labels", "twice"),
        ] {
            let (k, reason) = load_error(&format!("kubernetes:\n  {yaml}\n"));
            assert_eq!(k, key, "{yaml}: {reason}");
            assert!(reason.contains(says), "{yaml}: {reason}");
        }
    }

    /// Kubernetes refuses a pod whose request of a resource is greater than its limit.
    #[test]
    fn a_request_greater_than_its_limit_is_refused() {
        for (requests, limits) in [
            ("{cpu: 2}", "{cpu: 1}"),
            ("{cpu: 1001m}", "{cpu: 1}"),
            ("{memory: 1Gi}", "{memory: 1G}"),
            ("{memory: 2e3}", "{memory: 1k}"),
            ("{memory: 1Ki}", "{memory: '1e3'}"),
        ] {
            let yaml =
                format!("kubernetes:\n  resources: {{requests: {requests}, limits: {limits}}}\n");
            let (key, reason) = load_error(&yaml);
            assert_eq!(key, "kubernetes.resources.requests", "{yaml}");
            assert!(
                reason.contains("limit") && reason.contains("Kubernetes"),
                "{reason}"
            );
        }
        for (requests, limits) in [
            ("{cpu: 1}", "{cpu: 1}"),
            ("{cpu: 1100m}", "{cpu: 1.1}"),
            ("{cpu: 0.1}", "{cpu: 100m}"),
            ("{cpu: 3}", "{memory: 1}"),
            ("{memory: 1Gi}", "{memory: 1073741824}"),
            ("{memory: 1G}", "{memory: 1Gi}"),
            ("{memory: 1000k}", "{memory: 1M}"),
            ("{cpu: 1e-3}", "{cpu: 1m}"),
            ("{memory: '+512Mi'}", "{memory: 0.5Gi}"),
        ] {
            let yaml =
                format!("kubernetes:\n  resources: {{requests: {requests}, limits: {limits}}}\n");
            load(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
    }

    #[test]
    fn quantities() {
        for ok in [
            "1", "500m", "1.5", "2Gi", "512Mi", "1e3", "0.25", "+1", ".5", "100k", "1Ei", "2E",
            "1.5E", "1E3", "2e-3",
        ] {
            assert!(check_quantity(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "1GB", "one", "1..2", "-1", "1e", "Gi", "1 Gi", "1e3Mi", "Ei", "1eE",
        ] {
            assert!(check_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_labels() {
        assert!(dns_label("jobs-1").is_ok());
        assert!(dns_label("Jobs").is_err());
        assert!(dns_label("-a").is_err());
        assert!(qualified_name("app.kubernetes.io/name").is_ok());
        assert!(qualified_name("team").is_ok());
        assert!(qualified_name("a/b/c").is_err());
        assert!(qualified_name("-x").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2").is_ok());
        assert!(label_value("a/b").is_err());
    }

    #[test]
    fn the_pod_create_grace_is_a_clamped_duration() {
        let mut k = KubernetesConfig::default();
        assert_eq!(k.pod_create_grace(), std::time::Duration::from_secs(30));
        k.pod_create_grace_secs = 2.5;
        assert_eq!(k.pod_create_grace(), std::time::Duration::from_millis(2500));
        k.pod_create_grace_secs = -1.0;
        assert_eq!(k.pod_create_grace(), std::time::Duration::ZERO);
        k.pod_create_grace_secs = f64::NAN;
        assert_eq!(k.pod_create_grace(), std::time::Duration::from_secs(30));
    }

    #[test]
    fn the_start_and_call_timeouts_are_clamped_durations() {
        let mut k = KubernetesConfig::default();
        assert_eq!(k.pod_start_timeout(), std::time::Duration::from_secs(600));
        assert_eq!(k.api_call_timeout(), std::time::Duration::from_secs(60));
        k.pod_start_timeout_secs = 2.5;
        k.api_call_timeout_secs = 0.0;
        assert_eq!(
            k.pod_start_timeout(),
            std::time::Duration::from_millis(2500)
        );
        assert_eq!(k.api_call_timeout(), std::time::Duration::from_secs(1));
    }

    #[test]
    fn the_whole_section_is_checked() {
        let mut k = KubernetesConfig::default();
        assert!(k.check().is_ok());
        k.resources.limits.insert("memory".into(), "1GB".into());
        assert_eq!(k.check().expect_err("bad").0, "kubernetes.resources.limits");
        k.resources.limits.clear();
        k.tolerations.push(Toleration {
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(30),
            ..Toleration::default()
        });
        assert!(k.check().is_ok());
        k.tolerations[0].effect = Some("Sometimes".into());
        assert_eq!(k.check().expect_err("bad").0, "kubernetes.tolerations");
        k.tolerations.clear();
        k.labels.insert("shoal.dev/runtime".into(), "x".into());
        assert_eq!(k.check().expect_err("reserved").0, "kubernetes.labels");
    }
}
