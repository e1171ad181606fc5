//! The emulator's kubelet: runs each pod's single container as a process on this machine and
//! reports its status the way a real kubelet does.
//!
//! A pod's container is `command` + `args` of its spec (the image is not pulled or run:
//! `command[0]` is a program on this machine, looked up in the container's `PATH`), started
//! like a container runtime starts one: PID 1 of a new PID namespace, or, when the pod spec
//! has `shareProcessNamespace: true`, an ordinary process (PID 2) of the pod's PID namespace
//! whose PID 1 is a pause process ([`PidSandbox`], as a real pod's pause container), in its own
//! network namespace ([`Host`]) when the emulator has a [`Network`](crate::netns::Network)
//! (else in this machine's network), with a clean environment: `PATH`, `HOME`, `HOSTNAME` (the
//! pod's name) and the container's `env`/`envFrom` (literal values with `$(VAR)` expansion,
//! Secret keys, downward-API fields), in `workingDir` (else `/`). Its stdout and stderr go to
//! one log file.
//!
//! Status: Pending (`ContainerCreating`; `InvalidImageName` for as long as the pod exists
//! when the image's repository path has an upper-case letter or whitespace;
//! `ErrImagePull`/`ImagePullBackOff` for as long as the pod exists when the image's registry
//! is in the `.invalid` domain, or for the first pulls [`PULL_FAILURES`](super::PULL_FAILURES)
//! says; or
//! `CreateContainerConfigError` while a referenced Secret or key is missing, retried every half
//! second) → Running (`state.running.startedAt`,
//! Ready) → Succeeded (exit 0) or Failed, with `state.terminated`: the exit code, 128 + N for
//! a process killed by signal N (137 for SIGKILL, 143 for SIGTERM), reason `Completed`, `Error`
//! or `OOMKilled` (see [`OOM_KILL_AFTER_MS`](super::OOM_KILL_AFTER_MS)), and `StartError` with
//! exit code 128 when the program cannot be started.
//!
//! Each pod has a thread that starts the process and waits for it with `waitid(WNOWAIT)`, so
//! the process is only reaped under the cluster lock: a signal sent under the lock never hits
//! a recycled pid.
//!
//! Frozen ([`Emulator::freeze_kubelet`](super::Emulator::freeze_kubelet)), the kubelet acts as
//! one on a node that stopped answering: no status update (a container that ends stays
//! `running` in the pod's status, its process unreaped), no container started, no graceful
//! delete carried out (no `SIGTERM`, no `SIGKILL` when the grace ends, no removal: the pod
//! stays with its `deletionTimestamp`). The processes run on. A force delete (grace 0) removes
//! the pod object all the same (the API server's doing), and its process is killed, as a node
//! that comes back kills the containers of pods that are gone. Thawed ([`thaw`]), it catches
//! up: the pods being deleted get `SIGTERM`, and `SIGKILL` at their `deletionTimestamp` (at
//! once if that has passed), and every thread goes on where it waited.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodSpec, PodStatus,
    Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use super::controller::{self, now};
use super::{Cluster, Core, OOM_KILL_AFTER_MS, PULL_FAILURES, START_DELAY_MS, UNPULLABLE_REGISTRY};
use crate::netns::{Host, PidSandbox, spawn_container};

/// The `PATH` of a container (the usual one of Linux images).
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often a pod waiting for a Secret looks again.
const CONFIG_RETRY: Duration = Duration::from_millis(500);
/// How often the kubelet tries an image it cannot pull again.
const IMAGE_PULL_RETRY: Duration = Duration::from_millis(500);
/// How often a pod's thread looks whether a frozen kubelet has thawed.
const FROZEN_POLL: Duration = Duration::from_millis(50);

/// The kubelet's record of a pod's container process.
#[derive(Debug, Default)]
pub(crate) struct ContainerProcess {
    /// The process (in this PID namespace), once started.
    pub(crate) pid: Option<u32>,
    /// Set, under the cluster lock, when the process has been reaped: its pid is no longer ours.
    pub(crate) reaped: bool,
    /// The process is being killed as out of memory.
    pub(crate) oom_killed: bool,
    /// When the container started (its state became `running`).
    pub(crate) running_since: Option<SystemTime>,
    /// The pod's network host, while the kubelet's thread holds it.
    pub(crate) host: Option<Weak<Host>>,
}

/// Sends `signal` to pod `uid`'s container process if it is still running.
pub(crate) fn signal(cluster: &Cluster, uid: &str, signal: Signal) {
    if let Some(ContainerProcess {
        pid: Some(pid),
        reaped: false,
        ..
    }) = cluster.containers.get(uid)
    {
        let _ = kill(Pid::from_raw(*pid as i32), signal);
    }
}

/// Sends `SIGKILL` to pod `uid`'s container process after `delay` (its grace period), unless
/// the kubelet is frozen then ([`thaw`] sees to it).
pub(crate) fn kill_after(core: &Arc<Core>, uid: String, delay: Duration) {
    core.after(delay, move |_, cluster| {
        if !cluster.kubelet_frozen {
            signal(cluster, &uid, Signal::SIGKILL);
        }
    });
}

/// A frozen kubelet thaws (see the module docs): every pod being deleted whose process runs
/// gets `SIGTERM`, and `SIGKILL` at its `deletionTimestamp` (at once if that has passed); the
/// pods' threads, which wait while frozen, go on by themselves.
pub(crate) fn thaw(core: &Arc<Core>, cluster: &mut Cluster) {
    cluster.kubelet_frozen = false;
    let now = SystemTime::now();
    for pod in cluster.store.list::<Pod>(None) {
        let (Some(uid), Some(due)) = (pod.metadata.uid, pod.metadata.deletion_timestamp) else {
            continue;
        };
        let due = SystemTime::UNIX_EPOCH
            + Duration::from_millis(controller::millis(&due).max(0).unsigned_abs());
        signal(cluster, &uid, Signal::SIGTERM);
        kill_after(core, uid, due.duration_since(now).unwrap_or_default());
    }
}

/// Kills pod `uid`'s container as the kernel's OOM killer would (SIGKILL, reported as
/// `OOMKilled`). False when it is not running.
pub(crate) fn oom_kill(cluster: &mut Cluster, uid: &str) -> bool {
    match cluster.containers.get_mut(uid) {
        Some(process) if process.pid.is_some() && !process.reaped => {
            process.oom_killed = true;
            signal(cluster, uid, Signal::SIGKILL);
            true
        }
        _ => false,
    }
}

/// Starts the kubelet's thread for a new pod.
pub(crate) fn start(core: &Arc<Core>, namespace: String, name: String, uid: String) {
    let thread_core = Arc::clone(core);
    let spawned = std::thread::Builder::new()
        .name(format!("kubelet {name}"))
        .spawn(move || run_pod(&thread_core, &namespace, &name, &uid));
    match spawned {
        Ok(handle) => core.add_kubelet(handle),
        Err(e) => tracing::error!("cannot start the kubelet thread of a pod: {e}"),
    }
}

/// The registry host of `image` when it cannot be pulled from: one in the `.invalid` top-level
/// domain, which never resolves (see [`UNPULLABLE_REGISTRY`]).
fn unpullable_registry(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    let host = first.split_once(':').map_or(first, |(host, _port)| host);
    host.ends_with(UNPULLABLE_REGISTRY).then_some(host)
}

/// Why `image` is not a reference a container runtime can parse, if it is not (what follows
/// "invalid reference format" in the kubelet's message): whitespace, or an upper-case letter
/// in the repository path (the registry host may have them; the path must be lower case).
fn invalid_image(image: &str) -> Option<&'static str> {
    if image.is_empty() || image.chars().any(char::is_whitespace) {
        return Some("");
    }
    let name = image.split('@').next().unwrap_or(image);
    let (first, rest) = name.split_once('/').unwrap_or(("", name));
    // The first component is a registry host when it looks like one, else part of the path.
    let path = if first.contains(['.', ':']) || first == "localhost" {
        rest
    } else {
        name
    };
    // The tag, after the last component's colon, may have upper-case letters.
    let path = match path.rsplit_once('/') {
        Some((dirs, last)) => (dirs, last.split(':').next().unwrap_or(last)),
        None => ("", path.split(':').next().unwrap_or(path)),
    };
    (path
        .0
        .chars()
        .chain(path.1.chars())
        .any(|c| c.is_ascii_uppercase()))
    .then_some(": repository name must be lowercase")
}

/// The value of `pod`'s annotation `key`.
fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// What the kubelet needs to start a container.
struct Launch {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    working_dir: String,
    oom_after: Option<Duration>,
    start_delay: Option<Duration>,
    /// `spec.shareProcessNamespace`: the container is not PID 1 of its PID namespace.
    share_process_namespace: bool,
}

fn run_pod(core: &Arc<Core>, namespace: &str, name: &str, uid: &str) {
    let current = |cluster: &Cluster| {
        cluster
            .store
            .get::<Pod>(namespace, name)
            .filter(|p| p.metadata.uid.as_deref() == Some(uid))
    };
    // The pod's "sandbox": its network namespace.
    let host = match &core.network {
        Some(network) => match network.try_host() {
            Ok(host) => Some(Arc::new(host)),
            Err(e) => {
                let mut cluster = core.lock();
                fail_to_start(core, &mut cluster, namespace, name, uid, &e.to_string());
                return;
            }
        },
        None => None,
    };
    let pod_ip = host
        .as_ref()
        .map_or_else(|| core.node_ip.clone(), |h| h.address().to_string());

    let mut pull_attempts = 0u32;
    let launch = loop {
        if core.shutting_down() {
            return;
        }
        let mut cluster = core.lock();
        let Some(pod) = current(&cluster) else {
            return;
        };
        if cluster.kubelet_frozen {
            drop(cluster);
            std::thread::sleep(FROZEN_POLL);
            continue;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            if let Some(pod) = cluster.store.remove::<Pod>(namespace, name) {
                controller::pod_removed(core, &mut cluster, &pod);
            }
            return;
        }
        // The image is pulled before the container's configuration is made, as a kubelet does.
        let image = container_of(&pod).image.unwrap_or_default();
        if let Some(problem) = invalid_image(&image) {
            // No retry helps (the name is the pod's): it waits so for as long as it exists.
            let message = format!(
                "Failed to apply default image tag {image:?}: couldn't parse image name \
                 {image:?}: invalid reference format{problem}"
            );
            set_waiting(&mut cluster, pod, "InvalidImageName", &message);
            drop(cluster);
            std::thread::sleep(IMAGE_PULL_RETRY);
            continue;
        }
        let pull_failures = annotation(&pod, PULL_FAILURES)
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if pull_attempts < pull_failures {
            // A registry refusing for now (its rate limit): a few attempts fail, then one works.
            let (reason, message) = if pull_attempts.is_multiple_of(2) {
                (
                    "ErrImagePull",
                    format!(
                        "failed to pull and unpack image {image:?}: failed to copy: \
                         httpReadSeeker: failed open: unexpected status code: 429 Too Many \
                         Requests - Server message: toomanyrequests: You have reached your \
                         pull rate limit"
                    ),
                )
            } else {
                (
                    "ImagePullBackOff",
                    format!("Back-off pulling image {image:?}"),
                )
            };
            pull_attempts += 1;
            set_waiting(&mut cluster, pod, reason, &message);
            drop(cluster);
            std::thread::sleep(IMAGE_PULL_RETRY);
            continue;
        }
        if let Some(registry) = unpullable_registry(&image) {
            // Alternates like a kubelet's retries: ErrImagePull at each attempt, back-off after.
            let (reason, message) = if pull_attempts.is_multiple_of(4) {
                (
                    "ErrImagePull",
                    format!(
                        "failed to pull and unpack image {image:?}: failed to resolve reference \
                         {image:?}: failed to do request: dial tcp: lookup {registry}: no such \
                         host"
                    ),
                )
            } else {
                (
                    "ImagePullBackOff",
                    format!("Back-off pulling image {image:?}"),
                )
            };
            pull_attempts += 1;
            set_waiting(&mut cluster, pod, reason, &message);
            drop(cluster);
            std::thread::sleep(IMAGE_PULL_RETRY);
            continue;
        }
        match plan(&cluster, &pod, &pod_ip) {
            Ok(launch) => break launch,
            Err(message) => {
                set_waiting(&mut cluster, pod, "CreateContainerConfigError", &message);
                drop(cluster);
                std::thread::sleep(CONFIG_RETRY);
            }
        }
    };

    // A container that takes its time to start (see `START_DELAY_MS`): the pod stays in
    // ContainerCreating, and a deletion meanwhile removes it at once.
    if let Some(delay) = launch.start_delay {
        let until = std::time::Instant::now() + delay;
        while std::time::Instant::now() < until {
            if core.shutting_down() {
                return;
            }
            {
                let mut cluster = core.lock();
                let Some(pod) = current(&cluster) else {
                    return;
                };
                if pod.metadata.deletion_timestamp.is_some() && !cluster.kubelet_frozen {
                    if let Some(pod) = cluster.store.remove::<Pod>(namespace, name) {
                        controller::pod_removed(core, &mut cluster, &pod);
                    }
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A frozen kubelet starts no container.
    loop {
        if core.shutting_down() {
            return;
        }
        let cluster = core.lock();
        if current(&cluster).is_none() {
            return;
        }
        if !cluster.kubelet_frozen {
            break;
        }
        drop(cluster);
        std::thread::sleep(FROZEN_POLL);
    }

    let log_path = core.log_path(namespace, name);
    // The container starts now (as a container runtime's `startedAt`; the program may be
    // running before the spawn below returns).
    let started = SystemTime::now();
    // The pod's shared PID namespace, when it asks for one: killed (with whatever the container
    // left in it) once the container is reaped.
    let mut sandbox = None;
    let spawned = File::create(&log_path)
        .and_then(|log| Ok((log.try_clone()?, log)))
        .and_then(|(stdout, stderr)| {
            let mut command = Command::new(&launch.program);
            command
                .args(&launch.args)
                .env_clear()
                .envs(launch.env.iter().map(|(k, v)| (k, v)))
                .current_dir(&launch.working_dir)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            if launch.share_process_namespace {
                let pod_sandbox = PidSandbox::start(host.as_deref())?;
                let child = pod_sandbox.spawn(&mut command, host.as_deref());
                sandbox = Some(pod_sandbox);
                child
            } else {
                spawn_container(&mut command, host.as_deref())
            }
        });

    let pid = {
        let mut cluster = core.lock();
        cluster
            .logs
            .insert((namespace.to_string(), name.to_string()), log_path);
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let message = format!(
                    "failed to create containerd task: exec: {:?}: {e}",
                    launch.program
                );
                fail_to_start(core, &mut cluster, namespace, name, uid, &message);
                return;
            }
        };
        let pid = child.id();
        // The process is reaped below with waitpid, not through `child`.
        drop(child);
        cluster.containers.insert(
            uid.to_string(),
            ContainerProcess {
                pid: Some(pid),
                host: host.as_ref().map(Arc::downgrade),
                running_since: Some(started),
                ..ContainerProcess::default()
            },
        );
        match current(&cluster) {
            Some(pod) if pod.metadata.deletion_timestamp.is_none() && !core.shutting_down() => {
                set_running(core, &mut cluster, pod, &pod_ip);
                if let Some(delay) = launch.oom_after {
                    let uid = uid.to_string();
                    core.after(delay, move |_, cluster| {
                        oom_kill(cluster, &uid);
                    });
                }
            }
            // Deleted (or the emulator stopped) while starting.
            _ => signal(&cluster, uid, Signal::SIGKILL),
        }
        pid
    };

    // Wait for the end without reaping, so the pid stays ours until the lock is held.
    let process = Pid::from_raw(pid as i32);
    loop {
        match waitid(
            Id::Pid(process),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Err(Errno::EINTR) => continue,
            Err(e) => tracing::error!(pid, "waiting for a pod's process: {e}"),
            Ok(_) => {}
        }
        break;
    }
    // A frozen kubelet reports no end: the process stays unreaped until it thaws, or until
    // the pod is gone (a force delete) and nobody is told.
    let mut cluster = loop {
        let cluster = core.lock();
        if !cluster.kubelet_frozen || current(&cluster).is_none() || core.shutting_down() {
            break cluster;
        }
        drop(cluster);
        std::thread::sleep(FROZEN_POLL);
    };
    let status = waitpid(process, None);
    let oom_killed = match cluster.containers.get_mut(uid) {
        Some(record) => {
            record.reaped = true;
            record.oom_killed
        }
        None => false,
    };
    let (exit_code, reason) = match status {
        Ok(WaitStatus::Exited(_, 0)) => (0, "Completed"),
        Ok(WaitStatus::Exited(_, code)) => (code, "Error"),
        Ok(WaitStatus::Signaled(_, signal, _)) => (128 + signal as i32, "Error"),
        other => {
            tracing::error!(pid, "unexpected wait status of a pod's process: {other:?}");
            (255, "Error")
        }
    };
    let reason = if oom_killed { "OOMKilled" } else { reason };
    if let Some(pod) = current(&cluster) {
        let pod = set_terminated(&mut cluster, pod, exit_code, reason, None);
        if !core.shutting_down() {
            controller::pod_finished(core, &mut cluster, &pod);
        }
    }
    drop(cluster);
    // The sandbox goes with the container (and whatever it left running).
    drop(sandbox);
    drop(host);
}

/// The container could not be started: the pod fails with `StartError`.
fn fail_to_start(
    core: &Arc<Core>,
    cluster: &mut Cluster,
    namespace: &str,
    name: &str,
    uid: &str,
    message: &str,
) {
    tracing::debug!(pod = name, "container start failed: {message}");
    let Some(pod) = cluster
        .store
        .get::<Pod>(namespace, name)
        .filter(|p| p.metadata.uid.as_deref() == Some(uid))
    else {
        return;
    };
    let pod = set_terminated(cluster, pod, 128, "StartError", Some(message));
    if !core.shutting_down() {
        controller::pod_finished(core, cluster, &pod);
    }
}

/// The environment, program and arguments of the pod's container, or why they cannot be made
/// (the `CreateContainerConfigError` message).
fn plan(cluster: &Cluster, pod: &Pod, pod_ip: &str) -> Result<Launch, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .ok_or("the pod has no container")?;
    let secret = |secret_name: &str| cluster.store.get::<Secret>(namespace, secret_name);
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), CONTAINER_PATH.into()),
        ("HOSTNAME".into(), name.into()),
        ("HOME".into(), "/root".into()),
    ];
    let set = |env: &mut Vec<(String, String)>, key: String, value: String| {
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(reference) = &source.secret_ref {
            match secret(&reference.name) {
                Some(found) => {
                    for (key, value) in secret_data(&found) {
                        set(&mut env, format!("{prefix}{key}"), value);
                    }
                }
                None if reference.optional == Some(true) => {}
                None => return Err(format!("secret {:?} not found", reference.name)),
            }
        }
        if source.config_map_ref.is_some() {
            return Err("envFrom.configMapRef is not supported by the shoal test emulator".into());
        }
    }
    for variable in container.env.iter().flatten() {
        let value = if let Some(value) = &variable.value {
            expand(value, &env)
        } else if let Some(source) = &variable.value_from {
            if let Some(reference) = &source.secret_key_ref {
                let optional = reference.optional == Some(true);
                match secret(&reference.name) {
                    Some(found) => match secret_data(&found).remove(&reference.key) {
                        Some(value) => value,
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {namespace}/{}",
                                reference.key, reference.name
                            ));
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("secret {:?} not found", reference.name)),
                }
            } else if let Some(field) = &source.field_ref {
                field_value(pod, &field.field_path, pod_ip).ok_or_else(|| {
                    format!(
                        "fieldRef {:?} is not supported by the shoal test emulator",
                        field.field_path
                    )
                })?
            } else {
                return Err(format!(
                    "env {:?}: only literal values, secretKeyRef and fieldRef are supported by \
                     the shoal test emulator",
                    variable.name
                ));
            }
        } else {
            String::new()
        };
        set(&mut env, variable.name.clone(), value);
    }
    let mut words = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|w| expand(w, &env));
    let program = words.next().ok_or("the container has no command")?;
    let annotation_ms = |key: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
    };
    let oom_after = annotation_ms(OOM_KILL_AFTER_MS);
    let start_delay = annotation_ms(START_DELAY_MS);
    Ok(Launch {
        program,
        args: words.collect(),
        env,
        working_dir: container.working_dir.clone().unwrap_or_else(|| "/".into()),
        oom_after,
        start_delay,
        share_process_namespace: pod
            .spec
            .as_ref()
            .and_then(|s| s.share_process_namespace)
            .unwrap_or(false),
    })
}

/// A Secret's keys and values as text (`stringData` was merged into `data` on create).
fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

/// A downward-API field of the pod.
fn field_value(pod: &Pod, path: &str, pod_ip: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => Some(pod_ip.to_string()),
        "status.hostIP" => pod.status.as_ref().and_then(|s| s.host_ip.clone()),
        _ => keyed(&meta.labels, "metadata.labels['")
            .or_else(|| keyed(&meta.annotations, "metadata.annotations['")),
    }
}

/// Kubernetes' `$(VAR)` expansion: references to variables defined so far are replaced, `$$`
/// is a literal `$`, anything else is left as written.
fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(end) = reference.find(')')
        {
            let name = &reference[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, value)) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn container_of(pod: &Pod) -> Container {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first().cloned())
        .unwrap_or_default()
}

fn condition(type_: &str, status: bool, reason: Option<&str>) -> PodCondition {
    PodCondition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.map(str::to_string),
        last_transition_time: Some(now()),
        ..PodCondition::default()
    }
}

/// Sets `status.conditions` to `conditions`, keeping the transition time of each condition
/// whose status did not change (as the kubelet does).
fn set_conditions(status: &mut PodStatus, mut conditions: Vec<PodCondition>) {
    for condition in &mut conditions {
        let unchanged = status
            .conditions
            .iter()
            .flatten()
            .find(|old| old.type_ == condition.type_ && old.status == condition.status);
        if let Some(old) = unchanged {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    status.conditions = Some(conditions);
}

fn container_status(
    container: &Container,
    state: ContainerState,
    started: bool,
) -> ContainerStatus {
    let ready = state.running.is_some();
    ContainerStatus {
        name: container.name.clone(),
        image: container.image.clone().unwrap_or_default(),
        image_id: String::new(),
        container_id: started.then(|| format!("emulator://{}", uuid::Uuid::new_v4().simple())),
        ready,
        started: Some(ready),
        restart_count: 0,
        state: Some(state),
        last_state: Some(ContainerState::default()),
        ..ContainerStatus::default()
    }
}

/// A new pod's status: scheduled on the emulator's node, container being created.
pub(crate) fn pending_status(
    core: &Core,
    spec: &PodSpec,
    message: Option<(&str, &str)>,
) -> PodStatus {
    let container = spec.containers.first().cloned().unwrap_or_default();
    let (reason, message) = message.unwrap_or(("ContainerCreating", ""));
    PodStatus {
        phase: Some("Pending".to_string()),
        conditions: Some(vec![
            condition("PodReadyToStartContainers", false, None),
            condition("Initialized", true, None),
            condition("Ready", false, Some("ContainersNotReady")),
            condition("ContainersReady", false, Some("ContainersNotReady")),
            condition("PodScheduled", true, None),
        ]),
        host_ip: Some(core.node_ip.clone()),
        host_ips: Some(vec![HostIP {
            ip: core.node_ip.clone(),
        }]),
        start_time: Some(now()),
        qos_class: Some("BestEffort".to_string()),
        container_statuses: Some(vec![container_status(
            &container,
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.to_string()),
                    message: (!message.is_empty()).then(|| message.to_string()),
                }),
                ..ContainerState::default()
            },
            false,
        )]),
        ..PodStatus::default()
    }
}

fn set_waiting(cluster: &mut Cluster, mut pod: Pod, reason: &str, message: &str) {
    let waiting = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.clone())
    };
    let wanted = ContainerStateWaiting {
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
    };
    if waiting(&pod) == Some(wanted.clone()) {
        return;
    }
    let container = container_of(&pod);
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = Some(vec![container_status(
            &container,
            ContainerState {
                waiting: Some(wanted),
                ..ContainerState::default()
            },
            false,
        )]);
    }
    cluster.store.update(pod);
}

fn set_running(core: &Core, cluster: &mut Cluster, mut pod: Pod, pod_ip: &str) {
    let container = container_of(&pod);
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.phase = Some("Running".to_string());
    set_conditions(
        status,
        vec![
            condition("PodReadyToStartContainers", true, None),
            condition("Initialized", true, None),
            condition("Ready", true, None),
            condition("ContainersReady", true, None),
            condition("PodScheduled", true, None),
        ],
    );
    status.host_ip = Some(core.node_ip.clone());
    status.pod_ip = Some(pod_ip.to_string());
    status.pod_ips = Some(vec![PodIP {
        ip: pod_ip.to_string(),
    }]);
    status.container_statuses = Some(vec![container_status(
        &container,
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(now()),
            }),
            ..ContainerState::default()
        },
        true,
    )]);
    cluster.store.update(pod);
}

fn set_terminated(
    cluster: &mut Cluster,
    mut pod: Pod,
    exit_code: i32,
    reason: &str,
    message: Option<&str>,
) -> Pod {
    let container = container_of(&pod);
    let status = pod.status.get_or_insert_with(PodStatus::default);
    let previous = status
        .container_statuses
        .as_ref()
        .and_then(|c| c.first())
        .cloned();
    let started_at: Option<Time> = previous
        .as_ref()
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.clone());
    let container_id = previous.and_then(|c| c.container_id);
    status.phase = Some(
        if exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        }
        .to_string(),
    );
    set_conditions(
        status,
        vec![
            condition("PodReadyToStartContainers", false, None),
            condition("Initialized", true, None),
            condition("Ready", false, Some("PodCompleted")),
            condition("ContainersReady", false, Some("PodCompleted")),
            condition("PodScheduled", true, None),
        ],
    );
    let mut terminated = container_status(&container, ContainerState::default(), false);
    terminated.container_id = container_id.clone();
    terminated.state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            reason: Some(reason.to_string()),
            message: message.map(str::to_string),
            started_at,
            finished_at: Some(now()),
            container_id,
            signal: None,
        }),
        ..ContainerState::default()
    });
    status.container_statuses = Some(vec![terminated]);
    cluster.store.update(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_in_the_invalid_domain_cannot_be_pulled_from() {
        assert_eq!(
            unpullable_registry("registry.invalid/app:1"),
            Some("registry.invalid")
        );
        assert_eq!(
            unpullable_registry("no-such.invalid:5000/team/app"),
            Some("no-such.invalid")
        );
        assert_eq!(unpullable_registry("registry.example.com/app:1"), None);
        assert_eq!(unpullable_registry("app.invalid"), None, "no registry host");
        assert_eq!(unpullable_registry("busybox"), None);
    }

    #[test]
    fn image_names_a_runtime_cannot_parse_are_invalid() {
        for valid in [
            "busybox",
            "shoal-tests.example/kubernetes-tests:1",
            "Registry.Example:5000/team/app:V1",
            "localhost/app@sha256:abc",
        ] {
            assert_eq!(invalid_image(valid), None, "{valid}");
        }
        assert_eq!(
            invalid_image("registry.example/Team/app:1"),
            Some(": repository name must be lowercase")
        );
        assert!(invalid_image("App:1").is_some());
        assert!(invalid_image("app: 1").is_some());
    }

    #[test]
    fn variable_references_expand_like_kubernetes() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two".to_string()),
        ];
        assert_eq!(expand("$(A)-$(B)", &env), "1-two");
        assert_eq!(expand("$(MISSING)", &env), "$(MISSING)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("cost: $5 $(A", &env), "cost: $5 $(A");
        assert_eq!(expand("plain", &env), "plain");
    }
}
