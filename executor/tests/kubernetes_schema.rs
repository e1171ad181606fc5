//! The Jobs the Kubernetes executor builds, checked against Kubernetes' own schema of a
//! `batch/v1` Job: the JSON Schema generated from the OpenAPI document of Kubernetes v1.34 (the
//! API level of k8s-openapi's `v1_34` feature), in its strict form, where an unknown or misspelt
//! field, a wrong type or a missing required field is refused. The schema in `schemas/` is
//! extracted by `scripts/extract-kubernetes-schema.py` (which says where it comes from and how
//! to move to another version).
//!
//! The k8s-openapi types already make most wrong Jobs unrepresentable; this check covers what
//! they cannot: fields the types allow but the API does not know (a type from another API
//! level), and the JSON the executor actually sends.

use std::collections::BTreeMap;

use serde_json::Value;
use shoal_core::config::{ImagePullPolicy, KubernetesConfig, SecretKeyRef, Toleration};
use shoal_executor::kubernetes::{JobTemplate, WorkerJob};

const SCHEMA: &str = include_str!("schemas/job-batch-v1-k8s-1.34-strict.json");

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

/// Every `kubernetes:` key that shapes a Job, set.
fn full_config() -> KubernetesConfig {
    let mut config = KubernetesConfig {
        namespace: Some("jobs".into()),
        image: Some("registry.example.com/app:1".into()),
        image_pull_policy: ImagePullPolicy::Always,
        command: Some("/usr/local/bin/app".into()),
        service_account: Some("shoal-worker".into()),
        ttl_seconds_after_finished: Some(120),
        active_deadline_seconds: Some(600),
        redis_url_secret: Some(SecretKeyRef {
            name: "shoal-redis".into(),
            key: "url".into(),
        }),
        redis_password_secret: Some(SecretKeyRef {
            name: "shoal-redis".into(),
            key: "password".into(),
        }),
        ..KubernetesConfig::default()
    };
    config
        .resources
        .limits
        .insert("memory".into(), "512Mi".into());
    config
        .resources
        .requests
        .insert("cpu".into(), "250m".into());
    config.node_selector.insert("disktype".into(), "ssd".into());
    config.tolerations.push(Toleration {
        key: Some("spot".into()),
        operator: Some("Equal".into()),
        value: Some("true".into()),
        effect: Some("NoSchedule".into()),
        toleration_seconds: Some(30),
    });
    config.labels.insert("team".into(), "data".into());
    config
        .annotations
        .insert("example.com/owner".into(), "data-team".into());
    config
}

fn template(config: KubernetesConfig, args: Vec<String>) -> JobTemplate {
    JobTemplate {
        config,
        runtime_id: "0123456789abcdef0123456789abcdef".into(),
        namespace: "default".into(),
        program: "/usr/local/bin/app".into(),
        args,
        redis_url: "redis://shoal-redis:6379".into(),
    }
}

/// The Job as the executor sends it, as JSON.
fn job_json(template: &JobTemplate, name: &str, env: &BTreeMap<String, String>) -> Value {
    let worker = WorkerJob {
        id: "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        name,
        task: "default/9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        env,
        authkey_secret: env
            .contains_key("SHOAL_WORKER_AUTHKEY")
            .then_some("shoal-authkey-0123456789abcdef0123456789abcdef-0a1b2c3d4e5f"),
    };
    serde_json::to_value(template.job(&worker)).expect("a Job serializes")
}

fn errors(validator: &jsonschema::Validator, job: &Value) -> Vec<String> {
    validator
        .iter_errors(job)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn every_job_the_executor_builds_matches_the_kubernetes_schema() {
    let validator = validator();
    let mut env = BTreeMap::new();
    env.insert("GREETING".to_string(), "hello".to_string());
    let mut with_key = env.clone();
    with_key.insert("SHOAL_WORKER_AUTHKEY".to_string(), "00ff".repeat(16));
    let templates = [
        (
            "defaults",
            template(KubernetesConfig::default(), Vec::new()),
        ),
        ("every key", template(full_config(), Vec::new())),
        (
            "a test binary's entry",
            template(full_config(), vec!["entry".into(), "--exact".into()]),
        ),
    ];
    for (what, template) in &templates {
        for name in ["Process-1", "PoolWorker-12", "My Weird/Name!!"] {
            for env in [&BTreeMap::new(), &env, &with_key] {
                let job = job_json(template, name, env);
                let found = errors(&validator, &job);
                assert!(found.is_empty(), "{what}, {name}: {found:#?}\n{job:#}");
            }
        }
    }
}

/// An edit that makes a Job invalid.
type Change = fn(&mut Value);

#[test]
fn the_schema_refuses_what_the_api_server_would() {
    // The check is not vacuous: each change below makes a Job the API server refuses.
    let validator = validator();
    let valid = job_json(
        &template(full_config(), Vec::new()),
        "Process-1",
        &BTreeMap::new(),
    );
    assert!(errors(&validator, &valid).is_empty());
    let changes: [(&str, Change); 4] = [
        ("an unknown field", |job| {
            job.pointer_mut("/spec/template/spec/containers/0")
                .and_then(Value::as_object_mut)
                .expect("a container")
                .insert("imagePullPolice".into(), "Always".into());
        }),
        ("a wrong type", |job| {
            *job.pointer_mut("/spec/backoffLimit").expect("backoffLimit") = "none".into();
        }),
        ("a missing required field", |job| {
            job.pointer_mut("/spec/template/spec/containers/0")
                .and_then(Value::as_object_mut)
                .expect("a container")
                .remove("name");
        }),
        ("a label that is not a string", |job| {
            *job.pointer_mut("/metadata/labels/team").expect("a label") = 5.into();
        }),
    ];
    for (what, change) in changes {
        let mut job = valid.clone();
        change(&mut job);
        assert!(
            !errors(&validator, &job).is_empty(),
            "{what} was accepted: {job:#}"
        );
    }
}
