//! The test-only Kubernetes API emulator (`shoal_integration_tests::kube_emulator`), driven by a
//! real `kube::Client`: Jobs run their pods' commands as real processes with the statuses a
//! real cluster reports (exit codes, signals, OOM kills, retries, deadlines, TTLs), watches see
//! the transitions, deletes send the signals of a grace period, objects owned by a pod are
//! collected once it is gone, selectors and Secrets work, a
//! pod whose service account is missing is refused with `FailedCreate` Events until it exists,
//! a pod no node matches stays unscheduled until one does, image pulls fail as a kubelet's do,
//! writes can be left unanswered and watches held back, and a pod in a network namespace
//! reaches a Redis on the bridge.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Event, Pod, Secret, ServiceAccount};
use kube::api::{
    DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Api, Client};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use shoal_integration_tests::kube_emulator::{
    DEFAULT_NAMESPACE, Emulator, NODE_NAME, OOM_KILL_AFTER_MS, PULL_FAILURES,
};
use shoal_integration_tests::netns::Network;
use shoal_integration_tests::{TestRedis, pid_running, wait_for};
use tokio::sync::mpsc;

/// How long any single wait in these tests may take before it counts as a hang.
const PATIENCE: Duration = Duration::from_secs(30);

/// Merges `patch` into `base` (objects key by key, everything else replaced).
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, patch) => *base = patch,
    }
}

/// A Job as shoal's executor makes them (restartPolicy Never, backoffLimit 0) running
/// `command`, with `patch` merged into it.
fn job(name: &str, command: &[&str], patch: Value) -> Job {
    let mut job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "shoal-test"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "worker",
                        "image": "shoal-worker:test",
                        "command": command,
                    }],
                },
            },
        },
    });
    merge(&mut job, patch);
    serde_json::from_value(job).expect("a valid Job")
}

fn apis(emulator: &Emulator) -> (Client, Api<Job>, Api<Pod>) {
    let client = emulator.client();
    (
        client.clone(),
        Api::default_namespaced(client.clone()),
        Api::default_namespaced(client),
    )
}

fn condition(job: &Job, type_: &str) -> Option<(String, String)> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

fn finished(job: &Job) -> bool {
    condition(job, "Complete").is_some() || condition(job, "Failed").is_some()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

fn terminated(pod: &Pod) -> Option<ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .clone()
}

async fn job_until(jobs: &Api<Job>, name: &str, what: &str, done: impl Fn(&Job) -> bool) -> Job {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let job = jobs.get(name).await.expect("get the job");
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {name} never {what}: {:?}",
            job.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pods of Job `name`, once there are `count` of them.
async fn job_pods(pods: &Api<Pod>, name: &str, count: usize) -> Vec<Pod> {
    let deadline = Instant::now() + PATIENCE;
    let selector = ListParams::default().labels(&format!("job-name={name}"));
    loop {
        let list = pods.list(&selector).await.expect("list pods").items;
        if list.len() == count {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "job {name} has {} pods, not {count}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pod_until(pods: &Api<Pod>, name: &str, what: &str, done: impl Fn(&Pod) -> bool) -> Pod {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pod = pods.get(name).await.expect("get the pod");
        if done(&pod) {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} never {what}: {:?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a watcher in a task from now on, and returns its events once its initial list is done
/// (so everything that happens after this call is seen).
async fn follow<K: Send + 'static>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> mpsc::UnboundedReceiver<watcher::Event<K>> {
    let (events, mut received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = Box::pin(stream);
        while let Some(event) = stream.next().await {
            if events.send(event.expect("a watch event")).is_err() {
                return;
            }
        }
    });
    let ready = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = received.recv().await {
            if matches!(event, watcher::Event::InitDone) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "the watcher never listed");
    received
}

fn name_of(pod: &Pod) -> String {
    pod.metadata.name.clone().expect("a named pod")
}

#[tokio::test]
async fn a_job_whose_command_exits_0_completes_with_the_real_statuses() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    let created = jobs
        .create(
            &PostParams::default(),
            &job(
                "hello",
                &["/bin/sh", "-c", "echo hello from $HOSTNAME"],
                json!({}),
            ),
        )
        .await
        .expect("create");
    let uid = created.metadata.uid.clone().expect("a uid");
    // The API server's defaults.
    let spec = created.spec.as_ref().expect("spec");
    assert_eq!(spec.completions, Some(1));
    assert_eq!(
        spec.selector.as_ref().and_then(|s| s.match_labels.clone()),
        Some(
            [(
                "batch.kubernetes.io/controller-uid".to_string(),
                uid.clone()
            )]
            .into()
        )
    );

    let done = job_until(&jobs, "hello", "completed", finished).await;
    let status = done.status.as_ref().expect("status");
    assert_eq!(
        condition(&done, "Complete").map(|c| c.0),
        Some("CompletionsReached".to_string())
    );
    assert!(condition(&done, "SuccessCriteriaMet").is_some());
    assert!(condition(&done, "Failed").is_none());
    assert_eq!(
        (status.succeeded, status.failed, status.active),
        (Some(1), None, None)
    );
    assert!(status.start_time.is_some() && status.completion_time.is_some());

    let pod = job_pods(&pods, "hello", 1).await.remove(0);
    let name = name_of(&pod);
    let suffix = name.strip_prefix("hello-").expect("named after its job");
    assert_eq!(suffix.len(), 5, "{name}");
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    for (key, value) in [
        ("app", "shoal-test"),
        ("job-name", "hello"),
        ("batch.kubernetes.io/job-name", "hello"),
        ("controller-uid", uid.as_str()),
        ("batch.kubernetes.io/controller-uid", uid.as_str()),
    ] {
        assert_eq!(labels.get(key).map(String::as_str), Some(value), "{key}");
    }
    let owner = &pod.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str(),
            owner.controller
        ),
        ("Job", "hello", uid.as_str(), Some(true))
    );
    assert_eq!(phase(&pod), "Succeeded");
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(NODE_NAME)
    );
    let end = terminated(&pod).expect("terminated");
    assert_eq!(
        (end.exit_code, end.reason.as_deref()),
        (0, Some("Completed"))
    );
    assert!(end.started_at.is_some() && end.finished_at.is_some());
    let log = pods.logs(&name, &LogParams::default()).await.expect("log");
    assert_eq!(log, format!("hello from {name}\n"));
    assert_eq!(emulator.pod_log(DEFAULT_NAMESPACE, &name), Some(log));
}

#[tokio::test]
async fn a_job_whose_command_exits_3_fails_with_backoff_limit_exceeded() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    jobs.create(
        &PostParams::default(),
        &job("three", &["/bin/sh", "-c", "exit 3"], json!({})),
    )
    .await
    .expect("create");
    let done = job_until(&jobs, "three", "failed", finished).await;
    let (reason, message) = condition(&done, "Failed").expect("Failed");
    assert_eq!(reason, "BackoffLimitExceeded");
    assert_eq!(message, "Job has reached the specified backoff limit");
    assert!(condition(&done, "FailureTarget").is_some());
    let status = done.status.as_ref().expect("status");
    assert_eq!(
        (status.failed, status.succeeded, status.active),
        (Some(1), None, None)
    );
    assert!(status.completion_time.is_none(), "only set on success");
    let pod = job_pods(&pods, "three", 1).await.remove(0);
    assert_eq!(phase(&pod), "Failed");
    let end = terminated(&pod).expect("terminated");
    assert_eq!((end.exit_code, end.reason.as_deref()), (3, Some("Error")));
}

#[tokio::test]
async fn a_pod_that_shares_its_process_namespace_runs_its_container_below_a_pause_process() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    // A shell that SIGKILLs itself: as PID 1 of its own namespace (the default) the kernel drops
    // the signal and the shell carries on; below the pod's pause process it dies of it.
    // (`$$$$`: Kubernetes expands `$$` in a command to `$`.)
    let script = "echo pid=$$$$; kill -KILL $$$$; echo survived";
    for (name, shared) in [("own-namespace", false), ("shared-namespace", true)] {
        let patch = json!({"spec": {"template": {"spec": {"shareProcessNamespace": shared}}}});
        jobs.create(
            &PostParams::default(),
            &job(name, &["sh", "-c", script], patch),
        )
        .await
        .expect("create");
    }
    let ended = async |name: &str| {
        let pod = job_pods(&pods, name, 1).await.remove(0);
        let pod = pod_until(&pods, &name_of(&pod), "ended", |p| terminated(p).is_some()).await;
        let log = emulator
            .pod_log(DEFAULT_NAMESPACE, &name_of(&pod))
            .unwrap_or_default();
        (terminated(&pod).expect("terminated").exit_code, log)
    };
    let (code, log) = ended("own-namespace").await;
    assert_eq!(
        (code, log.as_str()),
        (0, "pid=1\nsurvived\n"),
        "PID 1 of its own namespace"
    );
    let (code, log) = ended("shared-namespace").await;
    assert_eq!(
        (code, log.as_str()),
        (137, "pid=2\n"),
        "PID 2 of the pod's shared namespace"
    );
}

#[tokio::test]
async fn a_pod_sees_a_tmp_of_its_own_not_the_hosts() {
    // As on another machine: a file (or a Unix socket) the test keeps under /tmp is not there
    // for a pod, whose own /tmp is empty, writable, and gone with it.
    let marker = tempfile::Builder::new()
        .prefix("shoal-host-only-")
        .tempfile_in("/tmp")
        .expect("a file in the host's /tmp");
    let path = marker.path().display().to_string();
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    let script = format!(
        "if [ -e {path} ]; then echo host-tmp-visible; else echo own-tmp; fi; \
         ls -A /tmp | wc -l; echo pod > /tmp/written && cat /tmp/written"
    );
    for (name, shared) in [("tmp-own", false), ("tmp-shared", true)] {
        let patch = json!({"spec": {"template": {"spec": {"shareProcessNamespace": shared}}}});
        jobs.create(
            &PostParams::default(),
            &job(name, &["sh", "-c", &script], patch),
        )
        .await
        .expect("create");
        let pod = job_pods(&pods, name, 1).await.remove(0);
        let pod = pod_until(&pods, &name_of(&pod), "ended", |p| terminated(p).is_some()).await;
        let log = emulator
            .pod_log(DEFAULT_NAMESPACE, &name_of(&pod))
            .unwrap_or_default();
        assert_eq!(
            (
                terminated(&pod).expect("terminated").exit_code,
                log.as_str()
            ),
            (0, "own-tmp\n0\npod\n"),
            "{name}"
        );
    }
    assert!(
        !std::path::Path::new("/tmp/written").exists(),
        "a pod's /tmp is its own"
    );
}

#[tokio::test]
async fn a_killed_pod_reports_128_plus_the_signal_and_oom_kills_are_oomkilled() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    jobs.create(
        &PostParams::default(),
        &job("killed", &["sleep", "600"], json!({})),
    )
    .await
    .expect("create");
    let pod = job_pods(&pods, "killed", 1).await.remove(0);
    let name = name_of(&pod);
    let running = pod_until(&pods, &name, "ran", |p| phase(p) == "Running").await;
    let state = running.status.as_ref().expect("status");
    assert!(
        state.container_statuses.as_ref().expect("statuses")[0]
            .state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.as_ref())
            .is_some()
    );
    assert_eq!(state.pod_ip.as_deref(), Some("127.0.0.1"));
    let pid = emulator
        .pod_pid(DEFAULT_NAMESPACE, &name)
        .expect("a running pod's pid");
    // A container's process is PID 1 of its namespace: SIGTERM without a handler is ignored.
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pid_running(pid), "PID 1 without a handler ignores SIGTERM");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL");
    let pod = pod_until(&pods, &name, "ended", |p| terminated(p).is_some()).await;
    assert_eq!(phase(&pod), "Failed");
    let end = terminated(&pod).expect("terminated");
    assert_eq!((end.exit_code, end.reason.as_deref()), (137, Some("Error")));
    assert!(emulator.pod_pid(DEFAULT_NAMESPACE, &name).is_none());
    let done = job_until(&jobs, "killed", "failed", finished).await;
    assert_eq!(
        condition(&done, "Failed").map(|c| c.0),
        Some("BackoffLimitExceeded".into())
    );

    // OOM kills: by annotation, and through the test API.
    let annotated = job(
        "oom",
        &["sleep", "600"],
        json!({"spec": {"template": {"metadata": {"annotations": {OOM_KILL_AFTER_MS: "100"}}}}}),
    );
    jobs.create(&PostParams::default(), &annotated)
        .await
        .expect("create");
    jobs.create(
        &PostParams::default(),
        &job("oom2", &["sleep", "600"], json!({})),
    )
    .await
    .expect("create");
    let second = name_of(&job_pods(&pods, "oom2", 1).await[0]);
    pod_until(&pods, &second, "ran", |p| phase(p) == "Running").await;
    assert!(emulator.oom_kill(DEFAULT_NAMESPACE, &second));
    for job_name in ["oom", "oom2"] {
        job_until(&jobs, job_name, "failed", finished).await;
        let pod = job_pods(&pods, job_name, 1).await.remove(0);
        let end = terminated(&pod).expect("terminated");
        assert_eq!(
            (end.exit_code, end.reason.as_deref()),
            (137, Some("OOMKilled")),
            "{job_name}"
        );
    }
}

#[tokio::test]
async fn watchers_see_pending_running_succeeded_and_the_ttl_deletion() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    let selector = "job-name=watched";
    // Both initial list strategies kube offers.
    let listed = follow(watcher(
        pods.clone(),
        watcher::Config::default().labels(selector),
    ))
    .await;
    let streamed = follow(watcher(
        pods.clone(),
        watcher::Config::default()
            .labels(selector)
            .streaming_lists(),
    ))
    .await;
    let mut job_events = follow(watcher(
        jobs.clone(),
        watcher::Config::default().fields("metadata.name=watched"),
    ))
    .await;
    jobs.create(
        &PostParams::default(),
        &job(
            "watched",
            &["sleep", "0.3"],
            json!({"spec": {"ttlSecondsAfterFinished": 1}}),
        ),
    )
    .await
    .expect("create");

    for mut events in [listed, streamed] {
        let phases = tokio::time::timeout(PATIENCE, async {
            let mut phases: Vec<String> = Vec::new();
            while let Some(event) = events.recv().await {
                match event {
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                        let phase = phase(&pod).to_string();
                        if phases.last() != Some(&phase) {
                            phases.push(phase);
                        }
                    }
                    // The TTL controller deletes the finished Job in the foreground.
                    watcher::Event::Delete(pod) => {
                        assert_eq!(phase(&pod), "Succeeded");
                        phases.push("deleted".to_string());
                        return phases;
                    }
                    watcher::Event::Init | watcher::Event::InitDone => {}
                }
            }
            phases
        })
        .await
        .expect("the pod's deletion is seen");
        assert_eq!(phases, ["Pending", "Running", "Succeeded", "deleted"]);
    }
    let seen_deleted = tokio::time::timeout(PATIENCE, async {
        let mut complete = false;
        while let Some(event) = job_events.recv().await {
            match event {
                watcher::Event::Apply(job) | watcher::Event::InitApply(job) => {
                    complete |= condition(&job, "Complete").is_some();
                }
                watcher::Event::Delete(_) => return complete,
                _ => {}
            }
        }
        false
    })
    .await
    .expect("the job's deletion is seen");
    assert!(seen_deleted, "the Job completed, then went (TTL)");
    assert!(jobs.get_opt("watched").await.expect("get").is_none());
}

#[tokio::test]
async fn a_watch_from_a_resource_version_replays_what_followed() {
    let emulator = Emulator::start(None);
    let (_, jobs, _) = apis(&emulator);
    let before = jobs.list(&ListParams::default()).await.expect("list");
    let version = before.metadata.resource_version.expect("a list version");
    jobs.create(
        &PostParams::default(),
        &job("replayed", &["true"], json!({})),
    )
    .await
    .expect("create");
    job_until(&jobs, "replayed", "completed", finished).await;
    let stream = jobs
        .watch(&WatchParams::default().timeout(2), &version)
        .await
        .expect("watch");
    let events: Vec<_> = stream.collect().await;
    let mut kinds = Vec::new();
    for event in events {
        match event.expect("event") {
            WatchEvent::Added(job) => kinds.push(("ADDED", finished(&job))),
            WatchEvent::Modified(job) => kinds.push(("MODIFIED", finished(&job))),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds.first(), Some(&("ADDED", false)));
    assert_eq!(kinds.last(), Some(&("MODIFIED", true)));
}

#[tokio::test]
async fn deleting_a_pod_sends_sigterm_then_sigkill_after_the_grace_period() {
    let emulator = Emulator::start(None);
    let (client, jobs, pods) = apis(&emulator);
    // Handles SIGTERM (so, even as PID 1, it gets it) and exits 143 as a shell killed by it.
    let graceful = [
        "/bin/sh",
        "-c",
        "trap 'echo got TERM; exit 143' TERM; echo started; while :; do sleep 0.1; done",
    ];
    // Ignores SIGTERM (PID 1 without a handler).
    let stubborn = ["sleep", "600"];
    // (The exit code of "now" is never reported: see below.)
    let cases: [(&str, &[&str], i64, i32); 3] = [
        ("graceful", &graceful, 5, 143),
        ("stubborn", &stubborn, 1, 137),
        ("now", &stubborn, 0, 137),
    ];
    for (job_name, command, grace, exit_code) in cases {
        jobs.create(&PostParams::default(), &job(job_name, command, json!({})))
            .await
            .expect("create");
        let name = name_of(&job_pods(&pods, job_name, 1).await[0]);
        pod_until(&pods, &name, "ran", |p| phase(p) == "Running").await;
        if job_name == "graceful" {
            assert!(wait_for(PATIENCE, || emulator
                .pod_log(DEFAULT_NAMESPACE, &name)
                .is_some_and(|l| l.contains("started"))));
        }
        let pid = emulator.pod_pid(DEFAULT_NAMESPACE, &name).expect("pid");
        let mut events = follow(watcher(
            pods.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        ))
        .await;
        let started = Instant::now();
        let answered = if job_name == "now" {
            // The grace period in the query rather than a DeleteOptions body.
            let request = axum::http::Request::delete(format!(
                "/api/v1/namespaces/{DEFAULT_NAMESPACE}/pods/{name}?gracePeriodSeconds=0"
            ))
            .body(Vec::new())
            .expect("a request");
            client.request::<Pod>(request).await.expect("delete")
        } else {
            let answer = pods
                .delete(
                    &name,
                    &DeleteParams {
                        grace_period_seconds: Some(grace as u32),
                        ..DeleteParams::default()
                    },
                )
                .await
                .expect("delete");
            answer.left().expect("a pod answers with the pod")
        };
        assert_eq!(answered.metadata.deletion_grace_period_seconds, Some(grace));
        assert!(answered.metadata.deletion_timestamp.is_some());
        if grace == 0 {
            // A force deletion, as on a real API server: the pod is gone at once, deleted as it
            // was last seen (running), and its process is killed behind it.
            assert!(
                pods.get_opt(&name).await.expect("get").is_none(),
                "a pod deleted with grace 0 is gone once the delete answers"
            );
            let deleted = tokio::time::timeout(PATIENCE, async {
                while let Some(event) = events.recv().await {
                    if let watcher::Event::Delete(pod) = event {
                        return Some(pod);
                    }
                }
                None
            })
            .await
            .expect("the watch sees the deletion")
            .expect("a DELETED event");
            assert_eq!(
                phase(&deleted),
                "Running",
                "deleted before its container ended"
            );
            assert_eq!(terminated(&deleted), None);
            assert_eq!(deleted.metadata.deletion_grace_period_seconds, Some(0));
            assert!(
                wait_for(PATIENCE, || !pid_running(pid)),
                "the process is killed behind the deletion"
            );
            let done = job_until(&jobs, job_name, "failed", finished).await;
            assert_eq!(done.status.as_ref().and_then(|s| s.failed), Some(1));
            continue;
        }
        let last = tokio::time::timeout(PATIENCE, async {
            let mut last = None;
            while let Some(event) = events.recv().await {
                match event {
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                        last = terminated(&pod).or(last);
                    }
                    watcher::Event::Delete(pod) => return terminated(&pod).or(last),
                    _ => {}
                }
            }
            last
        })
        .await
        .expect("the pod goes")
        .expect("its container ended");
        assert_eq!(last.exit_code, exit_code, "{job_name}");
        assert!(!pid_running(pid));
        if job_name == "stubborn" {
            assert!(
                started.elapsed() >= Duration::from_secs(1),
                "SIGKILL after the grace"
            );
        }
        if job_name == "graceful" {
            let log = emulator.pod_log(DEFAULT_NAMESPACE, &name).expect("log");
            assert!(log.contains("got TERM"), "{log}");
        }
        assert!(pods.get_opt(&name).await.expect("get").is_none());
        // A pod deleted before it ended counts as a failure of its Job.
        let done = job_until(&jobs, job_name, "failed", finished).await;
        assert_eq!(done.status.as_ref().and_then(|s| s.failed), Some(1));
    }
}

#[tokio::test]
async fn deleting_a_job_orphans_or_deletes_its_pods_by_propagation_policy() {
    let emulator = Emulator::start(None);
    let (client, jobs, pods) = apis(&emulator);
    let quick = json!({"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 0}}}});
    for name in ["orphaning", "background", "foreground"] {
        jobs.create(
            &PostParams::default(),
            &job(name, &["sleep", "600"], quick.clone()),
        )
        .await
        .expect("create");
    }
    let pod_of = |job_name: &'static str| {
        let pods = pods.clone();
        async move {
            let name = name_of(&job_pods(&pods, job_name, 1).await[0]);
            pod_until(&pods, &name, "ran", |p| phase(p) == "Running").await;
            name
        }
    };

    // No policy: batch/v1 Jobs orphan their pods.
    let orphan = pod_of("orphaning").await;
    let answer = jobs
        .delete("orphaning", &DeleteParams::default())
        .await
        .expect("delete");
    let status = answer.right().expect("a Status once the job is gone");
    assert_eq!(status.details.expect("details").name, "orphaning");
    assert!(jobs.get_opt("orphaning").await.expect("get").is_none());
    let pod = pods.get(&orphan).await.expect("the orphan stays");
    assert_eq!(phase(&pod), "Running");
    assert!(pod.metadata.owner_references.is_none());

    let background = pod_of("background").await;
    let pid = emulator
        .pod_pid(DEFAULT_NAMESPACE, &background)
        .expect("pid");
    // The policy in the query rather than a DeleteOptions body.
    let request = axum::http::Request::delete(format!(
        "/apis/batch/v1/namespaces/{DEFAULT_NAMESPACE}/jobs/background?propagationPolicy=Background"
    ))
    .body(Vec::new())
    .expect("a request");
    let answer: Value = client.request(request).await.expect("delete");
    assert_eq!(answer["kind"], "Status");
    assert_eq!(answer["status"], "Success");
    assert!(jobs.get_opt("background").await.expect("get").is_none());
    assert!(wait_for(PATIENCE, || !pid_running(pid)));
    job_pods(&pods, "background", 0).await;

    let foreground = pod_of("foreground").await;
    let answer = jobs
        .delete("foreground", &DeleteParams::foreground())
        .await
        .expect("delete");
    let pending = answer.left().expect("the job while its pods go");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert_eq!(
        pending.metadata.finalizers,
        Some(vec!["foregroundDeletion".to_string()])
    );
    let deadline = Instant::now() + PATIENCE;
    while jobs.get_opt("foreground").await.expect("get").is_some() {
        assert!(
            Instant::now() < deadline,
            "the foreground deletion never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pods.get_opt(&foreground).await.expect("get").is_none());
    // The orphan is still there, still running.
    assert!(emulator.pod_pid(DEFAULT_NAMESPACE, &orphan).is_some());
}

#[tokio::test]
async fn retries_make_new_pods_up_to_the_backoff_limit_and_deadlines_stop_jobs() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    jobs.create(
        &PostParams::default(),
        &job(
            "retried",
            &["/bin/sh", "-c", "exit 1"],
            json!({"spec": {"backoffLimit": 2}}),
        ),
    )
    .await
    .expect("create");
    let done = job_until(&jobs, "retried", "failed", finished).await;
    assert_eq!(
        condition(&done, "Failed").map(|c| c.0),
        Some("BackoffLimitExceeded".into())
    );
    assert_eq!(done.status.as_ref().and_then(|s| s.failed), Some(3));
    let attempts = job_pods(&pods, "retried", 3).await;
    assert!(attempts.iter().all(|p| phase(p) == "Failed"));

    jobs.create(
        &PostParams::default(),
        &job(
            "late",
            &["sleep", "600"],
            json!({"spec": {
                "activeDeadlineSeconds": 1,
                "template": {"spec": {"terminationGracePeriodSeconds": 1}},
            }}),
        ),
    )
    .await
    .expect("create");
    let done = job_until(&jobs, "late", "failed", finished).await;
    let (reason, message) = condition(&done, "Failed").expect("Failed");
    assert_eq!(reason, "DeadlineExceeded");
    assert_eq!(message, "Job was active longer than specified deadline");
    assert_eq!(done.status.as_ref().and_then(|s| s.active), None);
    // Its pod was deleted (SIGTERM ignored by PID 1, SIGKILL after the 1 s grace).
    job_pods(&pods, "late", 0).await;
}

#[tokio::test]
async fn list_selectors_pick_pods_and_jobs_by_label_and_field() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    for (name, role) in [
        ("driver", "driver"),
        ("worker-a", "worker"),
        ("worker-b", "worker"),
    ] {
        jobs.create(
            &PostParams::default(),
            &job(
                name,
                &["sleep", "600"],
                json!({"metadata": {"labels": {"pool": "p1", "role": role}},
                       "spec": {"template": {"metadata": {"labels": {"role": role}}}}}),
            ),
        )
        .await
        .expect("create");
    }
    let names = |list: Vec<Pod>| {
        let mut names: Vec<String> = list
            .iter()
            .filter_map(|p| p.metadata.labels.as_ref()?.get("job-name").cloned())
            .collect();
        names.sort();
        names
    };
    job_pods(&pods, "worker-b", 1).await;
    let select = |selector: &str| ListParams::default().labels(selector);
    let workers = pods
        .list(&select("app=shoal-test,role=worker"))
        .await
        .expect("list");
    assert_eq!(names(workers.items), ["worker-a", "worker-b"]);
    let not_workers = pods.list(&select("role!=worker")).await.expect("list");
    assert_eq!(names(not_workers.items), ["driver"]);
    let both = pods
        .list(&select("role in (driver,worker)"))
        .await
        .expect("list");
    assert_eq!(both.items.len(), 3);
    let none = pods
        .list(&select("role notin (driver,worker)"))
        .await
        .expect("list");
    assert!(none.items.is_empty());
    let by_field = pods
        .list(
            &ListParams::default().fields("spec.nodeName=shoal-emulator-node,status.phase!=Failed"),
        )
        .await
        .expect("list");
    assert_eq!(by_field.items.len(), 3);
    // Job labels are the Job's own when it has some.
    let pool = jobs
        .list(&select("pool=p1,role=worker"))
        .await
        .expect("list");
    assert_eq!(pool.items.len(), 2);
    let one = jobs
        .list(&ListParams::default().fields("metadata.name=driver"))
        .await
        .expect("list");
    assert_eq!(one.items.len(), 1);
    let error = pods
        .list(&select("role in worker"))
        .await
        .expect_err("a bad selector");
    assert!(
        matches!(error, kube::Error::Api(ref s) if s.code == 400),
        "{error:?}"
    );
}

#[tokio::test]
async fn containers_get_a_clean_environment_with_secrets_and_downward_fields() {
    let emulator = Emulator::start(None);
    let (client, jobs, pods) = apis(&emulator);
    let secrets: Api<Secret> = Api::default_namespaced(client);
    let printing = job(
        "env",
        &["/bin/sh", "-c", "env | sort"],
        json!({"spec": {"template": {"spec": {"containers": [{
            "name": "worker",
            "image": "shoal-worker:test",
            "command": ["/bin/sh", "-c", "env | sort"],
            "env": [
                {"name": "LITERAL", "value": "plain"},
                {"name": "DERIVED", "value": "$(LITERAL)-more"},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            ],
        }]}}}}),
    );
    jobs.create(&PostParams::default(), &printing)
        .await
        .expect("create");
    // The Secret does not exist yet: the pod waits.
    let name = name_of(&job_pods(&pods, "env", 1).await[0]);
    let waiting = pod_until(&pods, &name, "waited for its secret", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone())
            .as_deref()
            == Some("CreateContainerConfigError")
    })
    .await;
    assert_eq!(phase(&waiting), "Pending");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "redis"},
        "stringData": {"password": "s3cret"},
    }))
    .expect("a secret");
    let stored = secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the secret");
    assert!(stored.string_data.is_none());
    assert_eq!(
        stored
            .data
            .as_ref()
            .and_then(|d| d.get("password"))
            .map(|b| b.0.clone()),
        Some(b"s3cret".to_vec())
    );
    assert_eq!(
        secrets.get("redis").await.expect("get").type_.as_deref(),
        Some("Opaque")
    );

    job_until(&jobs, "env", "completed", finished).await;
    let log = emulator.pod_log(DEFAULT_NAMESPACE, &name).expect("log");
    for line in [
        "LITERAL=plain",
        "DERIVED=plain-more",
        "PASSWORD=s3cret",
        &format!("POD_NAME={name}"),
        &format!("HOSTNAME={name}"),
        "ROLE=shoal-test",
    ] {
        assert!(log.lines().any(|l| l == line), "{line} missing from\n{log}");
    }
    // Nothing of the test process's environment leaks in.
    assert!(!log.contains("CARGO"), "{log}");
    assert!(!log.contains("RUST"), "{log}");
}

#[tokio::test]
async fn errors_are_status_objects_like_a_real_api_servers() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    let api_error = |error: kube::Error| match error {
        kube::Error::Api(status) => (status.code, status.reason, status.message),
        other => panic!("not an API error: {other:?}"),
    };
    let (code, reason, message) = api_error(jobs.get("missing").await.expect_err("missing"));
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert_eq!(message, "jobs.batch \"missing\" not found");
    let (code, reason, _) = api_error(pods.get("missing").await.expect_err("missing"));
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let (code, _, _) = api_error(
        pods.delete("missing", &DeleteParams::default())
            .await
            .expect_err("missing"),
    );
    assert_eq!(code, 404);

    jobs.create(&PostParams::default(), &job("twice", &["true"], json!({})))
        .await
        .expect("create");
    let (code, reason, message) = api_error(
        jobs.create(&PostParams::default(), &job("twice", &["true"], json!({})))
            .await
            .expect_err("duplicate"),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(message, "jobs.batch \"twice\" already exists");

    let mut no_containers = job("empty", &["true"], json!({}));
    if let Some(spec) = no_containers
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    {
        spec.containers.clear();
    }
    let (code, reason, message) = api_error(
        jobs.create(&PostParams::default(), &no_containers)
            .await
            .expect_err("invalid"),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(
        message,
        "Job.batch \"empty\" is invalid: spec.template.spec.containers: Required value"
    );
    let always = job(
        "always",
        &["true"],
        json!({"spec": {"template": {"spec": {"restartPolicy": "Always"}}}}),
    );
    let (code, _, message) = api_error(
        jobs.create(&PostParams::default(), &always)
            .await
            .expect_err("invalid"),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("spec.template.spec.restartPolicy"),
        "{message}"
    );
    let two = job("two", &["true"], json!({"spec": {"completions": 2}}));
    let (code, _, message) = api_error(
        jobs.create(&PostParams::default(), &two)
            .await
            .expect_err("not emulated"),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("not supported by the shoal test emulator"),
        "{message}"
    );
    let (code, _, _) = api_error(
        jobs.create(
            &PostParams::default(),
            &job("Bad_Name", &["true"], json!({})),
        )
        .await
        .expect_err("invalid name"),
    );
    assert_eq!(code, 422);
    // No job was stored by the failed creates.
    assert_eq!(
        jobs.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn a_kubeconfig_finds_the_emulator_and_drop_kills_its_pods() {
    let emulator = Emulator::start(None);
    let kubeconfig =
        kube::config::Kubeconfig::read_from(emulator.kubeconfig_path()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    assert_eq!(config.default_namespace, DEFAULT_NAMESPACE);
    let client = Client::try_from(config).expect("client");
    let jobs: Api<Job> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client);
    jobs.create(
        &PostParams::default(),
        &job("long", &["sleep", "600"], json!({})),
    )
    .await
    .expect("create through the kubeconfig");
    let name = name_of(&job_pods(&pods, "long", 1).await[0]);
    pod_until(&pods, &name, "ran", |p| phase(p) == "Running").await;
    let pid = emulator.pod_pid(DEFAULT_NAMESPACE, &name).expect("pid");
    drop(emulator);
    assert!(!pid_running(pid), "drop killed the pod's process");
}

#[tokio::test]
async fn a_pod_in_a_network_namespace_reaches_redis_on_the_bridge_only() {
    let network = Network::new();
    let bridge = network.host_address().to_string();
    let redis = TestRedis::tcp_also_on(&[network.host_address().into()]);
    let port = redis.port().to_string();
    let emulator = Emulator::start(Some(&network));
    let (_, jobs, pods) = apis(&emulator);
    let script = format!(
        "redis-cli -h {bridge} -p {port} CLIENT INFO && redis-cli -h {bridge} -p {port} SET from-pod $HOSTNAME"
    );
    jobs.create(
        &PostParams::default(),
        &job("reaches", &["/bin/sh", "-c", &script], json!({})),
    )
    .await
    .expect("create");
    // The parent's loopback is not the pod's.
    jobs.create(
        &PostParams::default(),
        &job(
            "loopback",
            &["redis-cli", "-h", "127.0.0.1", "-p", &port, "PING"],
            json!({}),
        ),
    )
    .await
    .expect("create");

    let done = job_until(&jobs, "reaches", "ended", finished).await;
    let pod = job_pods(&pods, "reaches", 1).await.remove(0);
    let name = name_of(&pod);
    let log = emulator
        .pod_log(DEFAULT_NAMESPACE, &name)
        .unwrap_or_default();
    assert!(condition(&done, "Complete").is_some(), "{log}");
    let status = pod.status.as_ref().expect("status");
    let pod_ip = status.pod_ip.clone().expect("a pod IP");
    assert_eq!(status.host_ip.as_deref(), Some(bridge.as_str()));
    assert_ne!(pod_ip, bridge);
    assert!(
        network
            .subnet()
            .starts_with(&pod_ip[..pod_ip.rfind('.').expect("IPv4")]),
        "{pod_ip} outside {}",
        network.subnet()
    );
    assert!(log.contains(&format!("addr={pod_ip}:")), "{log}");
    let client = redis::Client::open(redis.url()).expect("url");
    let mut connection = client.get_connection().expect("redis");
    let written: String = redis::cmd("GET")
        .arg("from-pod")
        .query(&mut connection)
        .expect("get");
    assert_eq!(written, name);

    let done = job_until(&jobs, "loopback", "ended", finished).await;
    assert!(condition(&done, "Failed").is_some());
    let pod = job_pods(&pods, "loopback", 1).await.remove(0);
    assert_eq!(terminated(&pod).expect("ended").exit_code, 1);
    // Each pod had a host of its own, removed when its container ended.
    drop(emulator);
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let prefix = format!("{}h", network.bridge().trim_end_matches("br"));
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&prefix),
        "pod hosts left behind"
    );
}

/// The ServiceAccount admission plugin refuses a pod whose service account does not exist: the
/// job controller records a `FailedCreate` Warning Event on the Job (repeats counted on the same
/// Event), keeps the Job without a pod and retries; once the account exists, the pod is made.
#[tokio::test]
async fn a_pod_whose_service_account_is_missing_is_refused_with_failed_create_events() {
    let emulator = Emulator::start(None);
    let (client, jobs, pods) = apis(&emulator);
    let events: Api<Event> = Api::default_namespaced(client.clone());
    let accounts: Api<ServiceAccount> = Api::default_namespaced(client);
    let selector = "involvedObject.kind=Job,reason=FailedCreate,type=Warning";
    let mut watched = follow(watcher(
        events.clone(),
        watcher::Config::default().fields(selector),
    ))
    .await;
    jobs.create(
        &PostParams::default(),
        &job(
            "refused",
            &["/bin/true"],
            json!({"spec": {"template": {"spec": {"serviceAccountName": "late"}}}}),
        ),
    )
    .await
    .expect("the Job itself is accepted");
    let first = tokio::time::timeout(PATIENCE, async {
        loop {
            match watched.recv().await {
                Some(watcher::Event::Apply(event)) => return event,
                Some(_) => continue,
                None => panic!("the Event watch ended"),
            }
        }
    })
    .await
    .expect("a FailedCreate Event is watched");
    assert_eq!(first.involved_object.name.as_deref(), Some("refused"));
    assert_eq!(
        first.involved_object.api_version.as_deref(),
        Some("batch/v1")
    );
    assert_eq!(first.type_.as_deref(), Some("Warning"));
    assert_eq!(
        first.message.as_deref(),
        Some(
            "Error creating: pods \"refused-\" is forbidden: error looking up service account \
             default/late: serviceaccount \"late\" not found"
        )
    );
    assert_eq!(
        first.source.as_ref().and_then(|s| s.component.as_deref()),
        Some("job-controller")
    );
    // Retries: the same Event, counted.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let listed = events
            .list(&ListParams::default().fields(&format!("{selector},involvedObject.name=refused")))
            .await
            .expect("list Events")
            .items;
        assert_eq!(listed.len(), 1, "one Event, counted: {listed:?}");
        if listed[0].count.unwrap_or(0) >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the pod is never retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(job_pods(&pods, "refused", 0).await.is_empty());
    let status = jobs
        .get("refused")
        .await
        .expect("get")
        .status
        .unwrap_or_default();
    assert_eq!(status.active, None, "no pod is active: {status:?}");
    let unrelated = events
        .list(&ListParams::default().fields("reason=Scheduled"))
        .await
        .expect("list Events");
    assert!(unrelated.items.is_empty(), "field selectors filter Events");

    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "late"}})).expect("an account");
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("create the service account");
    let done = job_until(&jobs, "refused", "completed", finished).await;
    assert!(condition(&done, "Complete").is_some(), "{:?}", done.status);
    let default: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("an account");
    let exists = accounts.create(&PostParams::default(), &default).await;
    assert!(
        matches!(&exists, Err(kube::Error::Api(s)) if s.code == 409),
        "every namespace has a default account: {exists:?}"
    );
}

/// The waiting reason of a pod's container, if it waits.
fn waiting_reason(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

/// A pod whose node selector the node does not match stays Pending and unscheduled
/// (`PodScheduled=False`, `Unschedulable`, the scheduler's message; no node, no container
/// status) until the node gets the label; the template's `enableServiceLinks: false` is kept.
#[tokio::test]
async fn a_pod_no_node_matches_stays_unscheduled_until_one_does() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    jobs.create(
        &PostParams::default(),
        &job(
            "picky",
            &["/bin/true"],
            json!({"spec": {"template": {"spec": {
                "nodeSelector": {"kubernetes.io/os": "linux", "disktype": "nvme"},
                "enableServiceLinks": false,
            }}}}),
        ),
    )
    .await
    .expect("create");
    let pod = job_pods(&pods, "picky", 1).await.remove(0);
    let spec = pod.spec.clone().expect("a spec");
    assert_eq!(spec.node_name, None, "not bound to a node");
    assert_eq!(
        spec.enable_service_links,
        Some(false),
        "the template's value"
    );
    let status = pod.status.clone().expect("a status");
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.container_statuses, None);
    let scheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled")
        .expect("a PodScheduled condition");
    assert_eq!(scheduled.status, "False");
    assert_eq!(scheduled.reason.as_deref(), Some("Unschedulable"));
    assert!(
        scheduled.message.as_deref().is_some_and(|m| m.starts_with(
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        )),
        "{scheduled:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = pods.get(&name_of(&pod)).await.expect("get");
    assert_eq!(phase(&still), "Pending");
    assert_eq!(still.spec.and_then(|s| s.node_name), None);

    emulator.label_node("disktype", "nvme");
    let done = job_until(&jobs, "picky", "completed", finished).await;
    assert!(condition(&done, "Complete").is_some(), "{:?}", done.status);
    let ran = pods.get(&name_of(&pod)).await.expect("get");
    assert_eq!(
        ran.spec.and_then(|s| s.node_name).as_deref(),
        Some(NODE_NAME)
    );
}

/// The annotation's first pulls fail (`ErrImagePull`, a rate limit's message), then the
/// container runs; an image name a runtime cannot parse waits in `InvalidImageName`.
#[tokio::test]
async fn image_pulls_fail_for_a_while_and_invalid_names_for_ever() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    jobs.create(
        &PostParams::default(),
        &job(
            "rate-limited",
            &["/bin/true"],
            json!({"spec": {"template": {"metadata": {"annotations": {PULL_FAILURES: "2"}}}}}),
        ),
    )
    .await
    .expect("create");
    let pod = job_pods(&pods, "rate-limited", 1).await.remove(0);
    let failing = pod_until(&pods, &name_of(&pod), "failed a pull", |p| {
        waiting_reason(p).as_deref() == Some("ErrImagePull")
    })
    .await;
    let message = failing.status.as_ref().and_then(|s| {
        s.container_statuses.as_ref()?[0]
            .state
            .as_ref()?
            .waiting
            .as_ref()?
            .message
            .clone()
    });
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("429 Too Many Requests")),
        "{message:?}"
    );
    let done = job_until(&jobs, "rate-limited", "completed", finished).await;
    assert!(condition(&done, "Complete").is_some(), "{:?}", done.status);

    jobs.create(
        &PostParams::default(),
        &job(
            "invalid-image",
            &["/bin/true"],
            json!({"spec": {"template": {"spec": {"containers": [{
                "name": "worker",
                "image": "registry.example/Team/app:1",
                "command": ["/bin/true"],
            }]}}}}),
        ),
    )
    .await
    .expect("the API server does not parse image names");
    let pod = job_pods(&pods, "invalid-image", 1).await.remove(0);
    pod_until(&pods, &name_of(&pod), "waited in InvalidImageName", |p| {
        waiting_reason(p).as_deref() == Some("InvalidImageName")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = pods.get(&name_of(&pod)).await.expect("get");
    assert_eq!(waiting_reason(&still).as_deref(), Some("InvalidImageName"));
    assert_eq!(phase(&still), "Pending");
}

/// Stalled writes get no answer and are never carried out (answered 500 once the stall ends);
/// reads are answered meanwhile. Held watches send nothing, then what they held, in order.
#[tokio::test]
async fn writes_can_go_unanswered_and_watches_be_held_back() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    emulator.stall_writes(true);
    let (post, stalled) = (
        PostParams::default(),
        job("stalled", &["/bin/true"], json!({})),
    );
    let create = jobs.create(&post, &stalled);
    let unanswered = tokio::time::timeout(Duration::from_millis(700), create).await;
    assert!(
        unanswered.is_err(),
        "a stalled write was answered: {unanswered:?}"
    );
    let listed = jobs
        .list(&ListParams::default())
        .await
        .expect("reads are answered");
    assert!(
        listed.items.is_empty(),
        "the stalled create was carried out"
    );
    let waiting = tokio::spawn({
        let jobs = jobs.clone();
        async move {
            jobs.create(
                &PostParams::default(),
                &job("stalled", &["/bin/true"], json!({})),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    emulator.stall_writes(false);
    let answered = waiting.await.expect("the request's task");
    assert!(
        matches!(&answered, Err(kube::Error::Api(s)) if s.code == 500),
        "{answered:?}"
    );
    assert!(jobs.get_opt("stalled").await.expect("get").is_none());

    let mut watch = pods
        .watch(&WatchParams::default(), "0")
        .await
        .expect("a watch")
        .boxed();
    emulator.hold_watches(true);
    jobs.create(
        &PostParams::default(),
        &job("held", &["/bin/true"], json!({})),
    )
    .await
    .expect("create");
    let nothing = tokio::time::timeout(Duration::from_millis(700), watch.next()).await;
    assert!(nothing.is_err(), "a held watch sent {nothing:?}");
    assert_eq!(
        job_pods(&pods, "held", 1).await.len(),
        1,
        "lists are answered"
    );
    emulator.hold_watches(false);
    let first = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("the held events come")
        .expect("an event")
        .expect("a watch event");
    assert!(matches!(first, WatchEvent::Added(_)), "{first:?}");
}

/// What a watcher said, errors included (a 410 is one).
#[derive(Debug)]
enum Said {
    Apply(Pod),
    Delete(Pod),
    Init,
    InitApply(Pod),
    InitDone,
    Error(String),
}

/// Expired watches end, dropping what they held, and the history is compacted: a watcher that
/// resumes from the version it last saw gets 410 and lists again, and what happened in between
/// (a Job run to completion, then deleted with its pod by its TTL) never reaches it as events.
#[tokio::test]
async fn expired_watches_make_their_clients_relist_without_what_they_held() {
    let emulator = Emulator::start(None);
    let (_, jobs, pods) = apis(&emulator);
    let (said, mut heard) = mpsc::unbounded_channel();
    tokio::spawn({
        let pods = pods.clone();
        async move {
            // No back-off: the watcher lists again at once after the 410.
            let mut stream = Box::pin(watcher(pods, watcher::Config::default()));
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(watcher::Event::Apply(pod)) => Said::Apply(pod),
                    Ok(watcher::Event::Delete(pod)) => Said::Delete(pod),
                    Ok(watcher::Event::Init) => Said::Init,
                    Ok(watcher::Event::InitApply(pod)) => Said::InitApply(pod),
                    Ok(watcher::Event::InitDone) => Said::InitDone,
                    Err(e) => Said::Error(e.to_string()),
                };
                if said.send(event).is_err() {
                    return;
                }
            }
        }
    });
    let listed = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = heard.recv().await {
            if matches!(event, Said::InitDone) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(listed, Ok(true), "the watcher never listed");

    jobs.create(
        &PostParams::default(),
        &job(
            "in-the-gap",
            &["sleep", "0.5"],
            json!({"spec": {"ttlSecondsAfterFinished": 0}}),
        ),
    )
    .await
    .expect("create");
    let (name, version) = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = heard.recv().await {
            if let Said::Apply(pod) = event
                && phase(&pod) == "Running"
            {
                return (
                    name_of(&pod),
                    pod.metadata.resource_version.unwrap_or_default(),
                );
            }
        }
        panic!("the watcher ended");
    })
    .await
    .expect("the pod is seen running");

    emulator.hold_watches(true);
    let deadline = Instant::now() + PATIENCE;
    while jobs.get_opt("in-the-gap").await.expect("get").is_some()
        || pods.get_opt(&name).await.expect("get").is_some()
    {
        assert!(Instant::now() < deadline, "the Job never finished and went");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emulator.expire_watches();
    // A watch from the old version, opened while the watches are held, is answered later.
    let mut stale = pods
        .watch(&WatchParams::default(), &version)
        .await
        .expect("a watch")
        .boxed();
    emulator.hold_watches(false);
    let expired = tokio::time::timeout(PATIENCE, stale.next())
        .await
        .expect("an answer")
        .expect("an event")
        .expect("a watch event");
    assert!(
        matches!(&expired, WatchEvent::Error(e) if e.code == 410),
        "{expired:?}"
    );

    let relisted = tokio::time::timeout(PATIENCE, async {
        let mut said = Vec::new();
        while let Some(event) = heard.recv().await {
            let done = matches!(event, Said::InitDone);
            said.push(event);
            if done {
                return said;
            }
        }
        said
    })
    .await
    .expect("the watcher lists again");
    let expired_at = relisted
        .iter()
        .position(|e| matches!(e, Said::Error(e) if e.contains("Expired")));
    let init_at = relisted.iter().position(|e| matches!(e, Said::Init));
    assert!(
        matches!((expired_at, init_at), (Some(e), Some(i)) if e < i),
        "a 410, then a new list: {relisted:?}"
    );
    // What the watch sent before the hold may still arrive; nothing after it does.
    let held_back = relisted.iter().any(|e| match e {
        Said::Apply(p) => name_of(p) == name && phase(p) != "Running",
        Said::Delete(p) | Said::InitApply(p) => name_of(p) == name,
        _ => false,
    });
    assert!(!held_back, "held events came through: {relisted:?}");

    // The watch resumed from the list goes on as usual.
    jobs.create(
        &PostParams::default(),
        &job("after-the-gap", &["sleep", "5"], json!({})),
    )
    .await
    .expect("create");
    let seen = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = heard.recv().await {
            if let Said::Apply(pod) = event {
                return label_of(&pod, "job-name");
            }
        }
        String::new()
    })
    .await
    .expect("the new pod is seen");
    assert_eq!(seen, "after-the-gap");
}

fn label_of(pod: &Pod, key: &str) -> String {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .cloned()
        .unwrap_or_default()
}

/// The owner reference naming `pod`, as a client sets it to make an object its dependent (what
/// shoal's executor does in a worker pod): not the controller, not blocking the pod's deletion.
fn owned_by(pod: &Pod) -> Value {
    json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1",
        "kind": "Pod",
        "name": name_of(pod),
        "uid": pod.metadata.uid.clone().expect("a uid"),
        "controller": false,
        "blockOwnerDeletion": false,
    }]}})
}

/// Objects a client makes dependents of a pod (owner references) are deleted as the garbage
/// collector deletes them: not while the pod runs or terminates, but once it is gone from the
/// store, a Job with background propagation (its pod, and the process, go too); one with
/// another owner still there only loses its reference; one whose owner was gone before it was
/// made goes at once; a pod deleted with `Orphan` propagation leaves its dependents. Owner
/// references are validated as the API server validates them.
#[tokio::test]
async fn objects_owned_by_a_pod_are_collected_once_it_is_gone() {
    let emulator = Emulator::start(None);
    let (client, jobs, pods) = apis(&emulator);
    let secrets: Api<Secret> = Api::default_namespaced(client);
    let create = |name: &'static str, patch: Value| {
        let jobs = jobs.clone();
        async move {
            jobs.create(&PostParams::default(), &job(name, &["sleep", "600"], patch))
                .await
                .expect("create")
        }
    };
    let running = |job_name: &'static str| {
        let pods = pods.clone();
        async move {
            let name = name_of(&job_pods(&pods, job_name, 1).await[0]);
            pod_until(&pods, &name, "ran", |p| phase(p) == "Running").await
        }
    };
    create("parent", json!({})).await;
    let other_parent = create("other-parent", json!({})).await;
    let parent = running("parent").await;
    let other = running("other-parent").await;

    // Its pod's `sleep` ignores the SIGTERM of its deletion: a second of grace, then SIGKILL.
    let mut child = owned_by(&parent);
    merge(
        &mut child,
        json!({"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 1}}}}),
    );
    create("child", child).await;
    let mut two_owners = owned_by(&parent);
    let job_owner = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "other-parent",
        "uid": other_parent.metadata.uid.clone().expect("a uid"),
    });
    two_owners["metadata"]["ownerReferences"]
        .as_array_mut()
        .expect("references")
        .push(job_owner.clone());
    create("shared", two_owners).await;
    create("orphan", owned_by(&other)).await;
    let mut secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "child-key"},
        "stringData": {"authkey": "00ff"},
    }))
    .expect("a Secret");
    secret.metadata.owner_references = owned_by(&parent)["metadata"]["ownerReferences"]
        .as_array()
        .map(|refs| serde_json::from_value(Value::Array(refs.clone())).expect("references"));
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the Secret");
    // An owner that is gone already (the same name, another uid: a pod made again).
    let mut stale = owned_by(&parent);
    stale["metadata"]["ownerReferences"][0]["uid"] = json!(uuid::Uuid::new_v4().to_string());
    create("late", stale).await;
    let mut invalid = owned_by(&parent);
    invalid["metadata"]["ownerReferences"][0]["uid"] = json!("");
    match jobs
        .create(
            &PostParams::default(),
            &job("invalid", &["sleep", "600"], invalid),
        )
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422);
            assert!(
                status.message.contains("metadata.ownerReferences.uid"),
                "{}",
                status.message
            );
        }
        other => panic!("an owner reference without a uid: {other:?}"),
    }

    let child = running("child").await;
    let child_pid = emulator
        .pod_pid(DEFAULT_NAMESPACE, &name_of(&child))
        .expect("the child's pid");
    let mut collected = false;
    for _ in 0..500 {
        if jobs.get_opt("late").await.expect("get").is_none() {
            collected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(collected, "a Job whose owner was gone before it stays");

    // Orphaned: the pod goes, its dependent stays, without the reference.
    let orphaning = DeleteParams {
        grace_period_seconds: Some(0),
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    pods.delete(&name_of(&other), &orphaning)
        .await
        .expect("delete");
    assert!(pods.get_opt(&name_of(&other)).await.expect("get").is_none());

    // A pod terminating (its `sleep`, PID 1 of its container, ignores SIGTERM for the 2 s of
    // grace) still owns its dependents.
    let grace = DeleteParams {
        grace_period_seconds: Some(2),
        ..DeleteParams::default()
    };
    pods.delete(&name_of(&parent), &grace)
        .await
        .expect("delete");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let terminating = pods.get(&name_of(&parent)).await.expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert!(jobs.get_opt("child").await.expect("get").is_some());
    assert!(secrets.get_opt("child-key").await.expect("get").is_some());

    // Gone: its dependents go, the Job's pod and process with it.
    let deadline = Instant::now() + PATIENCE;
    while jobs.get_opt("child").await.expect("get").is_some()
        || secrets.get_opt("child-key").await.expect("get").is_some()
        || pods.get_opt(&name_of(&child)).await.expect("get").is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the parent pod's dependents stay: Job {:?}, Secret {:?}, pod {:?}",
            jobs.get_opt("child")
                .await
                .ok()
                .flatten()
                .map(|j| j.metadata),
            secrets
                .get_opt("child-key")
                .await
                .ok()
                .flatten()
                .map(|s| s.metadata),
            pods.get_opt(&name_of(&child))
                .await
                .ok()
                .flatten()
                .map(|p| p.metadata)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        pods.get_opt(&name_of(&parent))
            .await
            .expect("get")
            .is_none()
    );
    assert!(wait_for(PATIENCE, || !pid_running(child_pid)));

    // The one with another owner still there lost its reference to the pod only.
    let shared = jobs.get("shared").await.expect("the shared Job stays");
    let refs = serde_json::to_value(&shared.metadata.owner_references).expect("json");
    assert_eq!(refs, json!([job_owner]));
    let orphan = jobs.get("orphan").await.expect("the orphan stays");
    assert!(orphan.metadata.owner_references.is_none());
    let orphan_pod = job_pods(&pods, "orphan", 1).await.remove(0);
    assert_eq!(phase(&orphan_pod), "Running");
}
