//! The API server's field validation for what the emulator admits, with the real server's rules
//! and messages (Kubernetes 1.34, `k8s.io/apimachinery/pkg/util/validation` and
//! `pkg/apis/core/validation`), so that an object a real cluster would refuse with 422 is
//! refused here too:
//!
//! * object names: DNS-1123 subdomains (at most 253 characters); container names DNS-1123
//!   labels (at most 63);
//! * labels (of objects and pod templates, node selectors): keys are qualified names
//!   (`[prefix/]name`, the prefix a DNS subdomain, the name at most 63 characters of
//!   `[A-Za-z0-9._-]` starting and ending alphanumeric), values at most 63 characters of the
//!   same set, possibly empty;
//! * annotations: keys are qualified names (checked lowercased, as the server does), at most
//!   256 KiB in all;
//! * environment variable names: any printable ASCII character but `=` (the rule since 1.34,
//!   where `RelaxedEnvironmentVariableValidation` is GA), not empty;
//! * resource quantities: the `resource.Quantity` syntax (`[+-]digits[.digits]` then a binary SI
//!   suffix `Ki`..`Ei`, a decimal SI suffix `n u m "" k M G T P E` or an exponent `e±N`), not
//!   negative; resource names `cpu`, `memory`, `ephemeral-storage`, `hugepages-*` or a
//!   qualified extended resource name (`example.com/gpu`, whole numbers, request = limit);
//!   a request at most its limit;
//! * `imagePullPolicy`, toleration operators and effects: their enumerations;
//!   `serviceAccountName`: a DNS subdomain;
//! * owner references (`metadata.ownerReferences`): a version in `apiVersion`, a `kind`, a
//!   `name` and a `uid`, no `v1` Event as an owner, at most one with `controller: true`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::api::Cause;

/// Longest DNS-1123 label, and longest label value or name part of a qualified name.
const LABEL_MAX: usize = 63;
/// Longest DNS-1123 subdomain.
const SUBDOMAIN_MAX: usize = 253;
/// Most bytes of all annotations of one object.
const ANNOTATIONS_MAX: usize = 256 * 1024;

const DNS_LABEL_MESSAGE: &str = "a lowercase RFC 1123 label must consist of lower case \
    alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. \
    'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS_SUBDOMAIN_MESSAGE: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
    alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character \
    (e.g. 'example.com', regex used for validation is \
    '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const NAME_PART_MESSAGE: &str = "name part must consist of alphanumeric characters, '-', '_' or \
    '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  \
    or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MESSAGE: &str = "a valid label must be an empty string or consist of \
    alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric \
    character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is \
    '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const ENV_NAME_MESSAGE: &str = "a valid environment variable name must consist only of printable ASCII characters other \
     than '='";
const QUANTITY_MESSAGE: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";

fn max_length(max: usize) -> String {
    format!("must be no more than {max} characters")
}

/// Why `value` is not a DNS-1123 label.
pub(crate) fn dns_label(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > LABEL_MAX {
        problems.push(max_length(LABEL_MAX));
    }
    let bytes = value.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let ends = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !(bytes.iter().all(inner) && ends(bytes.first()) && ends(bytes.last())) {
        problems.push(DNS_LABEL_MESSAGE.to_string());
    }
    problems
}

/// Why `value` is not a DNS-1123 subdomain.
pub(crate) fn dns_subdomain(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > SUBDOMAIN_MAX {
        problems.push(max_length(SUBDOMAIN_MAX));
    }
    let labels_ok = value.split('.').all(|label| {
        let bytes = label.as_bytes();
        let ends = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && ends(bytes.first())
            && ends(bytes.last())
    });
    if !labels_ok {
        problems.push(DNS_SUBDOMAIN_MESSAGE.to_string());
    }
    problems
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, the name part of a qualified name and a label
/// value's syntax.
fn is_name_part(value: &str) -> bool {
    let bytes = value.as_bytes();
    let ends = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && ends(bytes.first())
        && ends(bytes.last())
}

/// Why `value` is not a qualified name (`[prefix/]name`): label and annotation keys, extended
/// resource names.
pub(crate) fn qualified_name(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                problems.push("prefix part must be non-empty".to_string());
            } else {
                problems.extend(
                    dns_subdomain(prefix)
                        .into_iter()
                        .map(|p| format!("prefix part {p}")),
                );
            }
            name
        }
        _ => {
            problems.push(
                "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and \
                 must start and end with an alphanumeric character (e.g. 'MyName',  or \
                 'my.name',  or '123-abc', regex used for validation is \
                 '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain \
                 prefix and '/' (e.g. 'example.com/MyName')"
                    .to_string(),
            );
            return problems;
        }
    };
    if name.is_empty() {
        problems.push("name part must be non-empty".to_string());
    } else {
        if name.len() > LABEL_MAX {
            problems.push(format!("name part {}", max_length(LABEL_MAX)));
        }
        if !is_name_part(name) {
            problems.push(NAME_PART_MESSAGE.to_string());
        }
    }
    problems
}

/// Why `value` is not a label value.
pub(crate) fn label_value(value: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > LABEL_MAX {
        problems.push(max_length(LABEL_MAX));
    }
    if !value.is_empty() && !is_name_part(value) {
        problems.push(LABEL_VALUE_MESSAGE.to_string());
    }
    problems
}

/// Why `name` is not an environment variable name.
pub(crate) fn env_var_name(name: &str) -> Vec<String> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'=')
    {
        Vec::new()
    } else {
        vec![ENV_NAME_MESSAGE.to_string()]
    }
}

/// A parsed quantity: its value (exact enough to compare requests with limits).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub(crate) struct ParsedQuantity(f64);

impl ParsedQuantity {
    fn is_integer(self) -> bool {
        self.0.fract() == 0.0
    }
}

/// Parses `text` as a `resource.Quantity`.
pub(crate) fn parse_quantity(text: &str) -> Result<ParsedQuantity, String> {
    let bad = || QUANTITY_MESSAGE.to_string();
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1.0, &text[1..]),
        Some(b'-') => (-1.0, &text[1..]),
        _ => (1.0, text),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.')
        || (whole.is_empty() && fraction.is_empty())
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let mantissa: f64 = format!(
        "{}.{}",
        if whole.is_empty() { "0" } else { whole },
        if fraction.is_empty() { "0" } else { fraction }
    )
    .parse()
    .map_err(|_| bad())?;
    let scale: f64 = match suffix {
        "Ki" => 2f64.powi(10),
        "Mi" => 2f64.powi(20),
        "Gi" => 2f64.powi(30),
        "Ti" => 2f64.powi(40),
        "Pi" => 2f64.powi(50),
        "Ei" => 2f64.powi(60),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exponent => {
            let digits = exponent
                .strip_prefix('e')
                .or_else(|| exponent.strip_prefix('E'))
                .ok_or_else(bad)?;
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let power: i32 = digits.parse().map_err(|_| bad())?;
            10f64.powi(power)
        }
    };
    Ok(ParsedQuantity(sign * mantissa * scale))
}

/// The label problems of `labels` at `field` (`metadata.labels`, `spec.nodeSelector`...).
pub(crate) fn labels(labels: Option<&BTreeMap<String, String>>, field: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (key, value) in labels.into_iter().flatten() {
        for problem in qualified_name(key) {
            causes.push(Cause::invalid(field, key, &problem));
        }
        for problem in label_value(value) {
            causes.push(Cause::invalid(&format!("{field}[{key}]"), value, &problem));
        }
    }
    causes
}

/// The annotation problems of `annotations` at `field`.
pub(crate) fn annotations(
    annotations: Option<&BTreeMap<String, String>>,
    field: &str,
) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut total = 0;
    for (key, value) in annotations.into_iter().flatten() {
        for problem in qualified_name(&key.to_lowercase()) {
            causes.push(Cause::invalid(field, key, &problem));
        }
        total += key.len() + value.len();
    }
    if total > ANNOTATIONS_MAX {
        causes.push(Cause {
            reason: "FieldValueTooLong",
            field: field.to_string(),
            message: format!("Too long: may not be more than {ANNOTATIONS_MAX} bytes"),
        });
    }
    causes
}

/// The labels and annotations of an object's metadata at `field` (`metadata`,
/// `spec.template.metadata`).
pub(crate) fn object_meta(meta: &ObjectMeta, field: &str) -> Vec<Cause> {
    let mut causes = labels(meta.labels.as_ref(), &format!("{field}.labels"));
    causes.extend(annotations(
        meta.annotations.as_ref(),
        &format!("{field}.annotations"),
    ));
    causes
}

/// The problems of an object's owner references, at `field` (`metadata.ownerReferences`), as
/// apimachinery's `ValidateOwnerReferences` reports them (each reference's fields under
/// `field` itself, not an index, as there).
pub(crate) fn owner_references(refs: &[OwnerReference], field: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut controller: Option<String> = None;
    for reference in refs {
        // `group/version`, or a bare version for the core group; more slashes parse as nothing.
        let parts: Vec<&str> = reference.api_version.split('/').collect();
        let version = match parts.as_slice() {
            [version] | [_, version] => *version,
            _ => "",
        };
        if version.is_empty() {
            causes.push(Cause::invalid(
                &format!("{field}.apiVersion"),
                &reference.api_version,
                "version must not be empty",
            ));
        }
        for (name, value) in [
            ("kind", &reference.kind),
            ("name", &reference.name),
            ("uid", &reference.uid),
        ] {
            if value.is_empty() {
                causes.push(Cause::invalid(
                    &format!("{field}.{name}"),
                    value,
                    "must not be empty",
                ));
            }
        }
        if reference.api_version == "v1" && reference.kind == "Event" {
            causes.push(Cause::invalid(
                field,
                &reference.name,
                "/v1, Kind=Event is disallowed from being an owner",
            ));
        }
        if reference.controller == Some(true) {
            let this = format!("{}/{}", reference.kind, reference.name);
            match &controller {
                Some(first) => causes.push(Cause::invalid(
                    field,
                    "",
                    &format!(
                        "Only one reference can have Controller set to true. Found \"true\" in \
                         references for {first} and {this}"
                    ),
                )),
                None => controller = Some(this),
            }
        }
    }
    causes
}

fn unsupported_value(field: &str, value: &str, supported: &[&str]) -> Cause {
    let supported: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
    Cause {
        reason: "FieldValueNotSupported",
        field: field.to_string(),
        message: format!(
            "Unsupported value: {value:?}: supported values: {}",
            supported.join(", ")
        ),
    }
}

/// A standard resource name of containers.
fn is_standard_container_resource(name: &str) -> bool {
    matches!(name, "cpu" | "memory" | "ephemeral-storage") || name.starts_with("hugepages-")
}

/// An extended resource (a qualified name with a domain outside `kubernetes.io`, counted in
/// whole units, whose request must equal its limit).
fn is_extended_resource(name: &str) -> bool {
    name.split_once('/')
        .is_some_and(|(domain, _)| domain != "kubernetes.io" && !domain.ends_with(".kubernetes.io"))
        && !name.starts_with("requests.")
}

/// The problems of one container's `resources`, at `field` (`...containers[0].resources`).
fn resources(container: &Container, field: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(resources) = &container.resources else {
        return causes;
    };
    let empty = BTreeMap::new();
    let limits = resources.limits.as_ref().unwrap_or(&empty);
    let requests = resources.requests.as_ref().unwrap_or(&empty);
    let mut parsed = |map: &BTreeMap<String, Quantity>, kind: &str| {
        let mut values = BTreeMap::new();
        for (name, Quantity(text)) in map {
            let at = format!("{field}.{kind}[{name}]");
            let mut name_ok = true;
            for problem in qualified_name(name) {
                causes.push(Cause::invalid(&at, name, &problem));
                name_ok = false;
            }
            if name_ok && !name.contains('/') && !is_standard_container_resource(name) {
                causes.push(Cause::invalid(
                    &at,
                    name,
                    "must be a standard resource for containers",
                ));
            }
            match parse_quantity(text) {
                Err(problem) => causes.push(Cause::invalid(&at, text, &problem)),
                Ok(value) if value.0 < 0.0 => causes.push(Cause::invalid(
                    &at,
                    text,
                    "must be greater than or equal to 0",
                )),
                Ok(value) => {
                    if is_extended_resource(name) && !value.is_integer() {
                        causes.push(Cause::invalid(&at, text, "must be an integer"));
                    }
                    values.insert(name.clone(), value);
                }
            }
        }
        values
    };
    let limit_values = parsed(limits, "limits");
    let request_values = parsed(requests, "requests");
    for (name, request) in &request_values {
        let at = format!("{field}.requests[{name}]");
        let text = &requests[name].0;
        match limit_values.get(name) {
            Some(limit) if is_extended_resource(name) && request != limit => {
                causes.push(Cause::invalid(
                    &at,
                    text,
                    &format!("must be equal to {name} limit of {}", limits[name].0),
                ));
            }
            Some(limit) if request > limit => causes.push(Cause::invalid(
                &at,
                text,
                &format!(
                    "must be less than or equal to {name} limit of {}",
                    limits[name].0
                ),
            )),
            None if is_extended_resource(name) => causes.push(Cause {
                reason: "FieldValueForbidden",
                field: format!("{field}.limits"),
                message: "Forbidden: Limit must be set for non overcommitable resources"
                    .to_string(),
            }),
            _ => {}
        }
    }
    causes
}

fn tolerations(tolerations: &[Toleration], field: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (i, toleration) in tolerations.iter().enumerate() {
        let at = |f: &str| format!("{field}[{i}].{f}");
        let key = toleration.key.as_deref().unwrap_or_default();
        if !key.is_empty() {
            for problem in qualified_name(key) {
                causes.push(Cause::invalid(&at("key"), key, &problem));
            }
        }
        let operator = toleration.operator.as_deref().unwrap_or("Equal");
        match operator {
            "Equal" | "" => {
                if key.is_empty() {
                    causes.push(Cause::invalid(
                        &at("operator"),
                        operator,
                        "operator must be Exists when `key` is empty, which means \"match all \
                         values and all keys\"",
                    ));
                }
                if let Some(value) = &toleration.value {
                    for problem in label_value(value) {
                        causes.push(Cause::invalid(&at("value"), value, &problem));
                    }
                }
            }
            "Exists" => {
                if toleration.value.as_deref().is_some_and(|v| !v.is_empty()) {
                    causes.push(Cause::invalid(
                        &at("operator"),
                        toleration.value.as_deref().unwrap_or_default(),
                        "value must be empty when `operator` is 'Exists'",
                    ));
                }
            }
            other => causes.push(unsupported_value(
                &at("operator"),
                other,
                &["Equal", "Exists"],
            )),
        }
        if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty())
            && !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute")
        {
            causes.push(unsupported_value(
                &at("effect"),
                effect,
                &["NoExecute", "NoSchedule", "PreferNoSchedule"],
            ));
        }
        if toleration.toleration_seconds.is_some()
            && toleration.effect.as_deref() != Some("NoExecute")
        {
            causes.push(Cause::invalid(
                &at("effect"),
                toleration.effect.as_deref().unwrap_or_default(),
                "effect must be 'NoExecute' when `tolerationSeconds` is set",
            ));
        }
    }
    causes
}

/// The problems of a pod spec at `field` (`spec.template.spec`) with the rules above: container
/// names, env names, resources, pull policies, service account, node selector, tolerations.
pub(crate) fn pod_spec(spec: &PodSpec, field: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (i, container) in spec.containers.iter().enumerate() {
        let at = |f: &str| format!("{field}.containers[{i}].{f}");
        if !container.name.is_empty() {
            for problem in dns_label(&container.name) {
                causes.push(Cause::invalid(&at("name"), &container.name, &problem));
            }
        }
        for (j, variable) in container.env.iter().flatten().enumerate() {
            let env_at = at(&format!("env[{j}].name"));
            for problem in env_var_name(&variable.name) {
                causes.push(Cause::invalid(&env_at, &variable.name, &problem));
            }
            if variable.value.as_deref().is_some_and(|v| !v.is_empty())
                && variable.value_from.is_some()
            {
                causes.push(Cause::invalid(
                    &at(&format!("env[{j}].valueFrom")),
                    "",
                    "may not be specified when `value` is not empty",
                ));
            }
            if let Some(reference) = variable
                .value_from
                .as_ref()
                .and_then(|s| s.secret_key_ref.as_ref())
            {
                for problem in dns_subdomain(&reference.name) {
                    causes.push(Cause::invalid(
                        &at(&format!("env[{j}].valueFrom.secretKeyRef.name")),
                        &reference.name,
                        &problem,
                    ));
                }
            }
        }
        causes.extend(resources(container, &at("resources")));
        if let Some(policy) = &container.image_pull_policy
            && !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never")
        {
            causes.push(unsupported_value(
                &at("imagePullPolicy"),
                policy,
                &["Always", "IfNotPresent", "Never"],
            ));
        }
    }
    if let Some(account) = spec
        .service_account_name
        .as_deref()
        .filter(|a| !a.is_empty())
    {
        for problem in dns_subdomain(account) {
            causes.push(Cause::invalid(
                &format!("{field}.serviceAccountName"),
                account,
                &problem,
            ));
        }
    }
    causes.extend(labels(
        spec.node_selector.as_ref(),
        &format!("{field}.nodeSelector"),
    ));
    causes.extend(tolerations(
        spec.tolerations.as_deref().unwrap_or_default(),
        &format!("{field}.tolerations"),
    ));
    if let Some(grace) = spec.termination_grace_period_seconds
        && grace < 0
    {
        causes.push(Cause::invalid(
            &format!("{field}.terminationGracePeriodSeconds"),
            &grace.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_follow_apimachinery() {
        assert!(dns_label("worker").is_empty());
        assert!(!dns_label("Worker").is_empty());
        assert!(!dns_label("-a").is_empty());
        assert!(!dns_label(&"a".repeat(64)).is_empty());
        assert!(dns_subdomain("shoal.dev").is_empty());
        assert!(!dns_subdomain("shoal..dev").is_empty());
        assert!(qualified_name("shoal.dev/runtime").is_empty());
        assert!(qualified_name("app.kubernetes.io/managed-by").is_empty());
        assert!(qualified_name("Team_1").is_empty());
        assert!(!qualified_name("shoal.dev/").is_empty());
        assert!(!qualified_name("/x").is_empty());
        assert!(!qualified_name("a/b/c").is_empty());
        assert!(!qualified_name("Shoal.dev/x").is_empty());
        assert!(!qualified_name(&"x".repeat(64)).is_empty());
        assert!(label_value("").is_empty());
        assert!(label_value("Process-1_2").is_empty());
        assert!(!label_value("Process-1:2").is_empty());
        assert!(!label_value("_x").is_empty());
        assert!(!label_value(&"x".repeat(64)).is_empty());
    }

    #[test]
    fn env_names_are_printable_ascii_without_equals() {
        assert!(env_var_name("SHOAL_WORKER_TASK").is_empty());
        assert!(env_var_name("my.var-1 x").is_empty());
        assert!(!env_var_name("").is_empty());
        assert!(!env_var_name("A=B").is_empty());
        assert!(!env_var_name("caf\u{e9}").is_empty());
        assert!(!env_var_name("TAB\t").is_empty());
    }

    #[test]
    fn owner_references_need_a_version_kind_name_and_uid_and_one_controller_at_most() {
        let reference =
            |api_version: &str, kind: &str, name: &str, controller: bool| OwnerReference {
                api_version: api_version.into(),
                kind: kind.into(),
                name: name.into(),
                uid: "4f1c6d1e-0c1b-4d7e-9a65-2b8f0e1d3c5a".into(),
                controller: Some(controller),
                block_owner_deletion: Some(false),
            };
        let field = "metadata.ownerReferences";
        let fields = |refs: &[OwnerReference]| -> Vec<String> {
            owner_references(refs, field)
                .into_iter()
                .map(|c| c.field)
                .collect()
        };
        let pod = reference("v1", "Pod", "parent", false);
        let job = reference("batch/v1", "Job", "parent", true);
        assert!(fields(&[pod.clone(), job.clone()]).is_empty());
        assert_eq!(
            fields(&[reference("batch/", "", "", false)]),
            [
                "metadata.ownerReferences.apiVersion",
                "metadata.ownerReferences.kind",
                "metadata.ownerReferences.name"
            ]
        );
        assert_eq!(fields(&[reference("a/b/c", "Pod", "p", false)]).len(), 1);
        let mut no_uid = pod.clone();
        no_uid.uid.clear();
        assert_eq!(fields(&[no_uid]), ["metadata.ownerReferences.uid"]);
        assert_eq!(
            fields(&[reference("v1", "Event", "e", false)]),
            ["metadata.ownerReferences"]
        );
        let causes = owner_references(&[job.clone(), reference("v1", "Pod", "p", true)], field);
        assert_eq!(causes.len(), 1);
        assert!(
            causes[0].message.contains("for Job/parent and Pod/p"),
            "{}",
            causes[0].message
        );
    }

    #[test]
    fn quantities_parse_like_resource_quantity() {
        let value = |s: &str| parse_quantity(s).map(|q| q.0);
        assert_eq!(value("250m"), Ok(0.25));
        assert_eq!(value("512Mi"), Ok(512.0 * 1024.0 * 1024.0));
        assert_eq!(value("1.5"), Ok(1.5));
        assert_eq!(value(".5"), Ok(0.5));
        assert_eq!(value("1."), Ok(1.0));
        assert_eq!(value("1e3"), Ok(1000.0));
        assert_eq!(value("1E-3"), Ok(0.001));
        assert_eq!(value("+2k"), Ok(2000.0));
        assert_eq!(value("-1"), Ok(-1.0));
        for bad in [
            "", "m", "1.2.3", "1 Gi", "1GB", "1mi", "1e", "1e+", "abc", "1Gi ",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} parsed");
        }
    }
}
