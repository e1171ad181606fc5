//! The emulator's HTTP API: routes, request parsing, responses and watch streams, in the wire
//! format of a real API server (JSON of `k8s-openapi` types; errors as `Status` objects; watch
//! events as newline-delimited JSON).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    DeleteOptions, ListMeta, Status, StatusCause, StatusDetails,
};
use k8s_openapi::{ByteString, ListableResource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::controller::{self, JobDeleted};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{Change, ChangeType, Object, encode};
use super::{Cluster, Core};

/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(10);
/// How long a watch lasts when the client does not say (real servers pick 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The routes the emulator serves.
pub(crate) fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/apis/batch/v1/jobs", get(list_all::<Job>))
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs",
            get(list::<Job>).post(create_job).delete(delete_jobs),
        )
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            get(read::<Job>).delete(delete_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{namespace}/jobs/{name}/status",
            get(read::<Job>),
        )
        .route("/api/v1/pods", get(list_all::<Pod>))
        .route(
            "/api/v1/namespaces/{namespace}/pods",
            get(list::<Pod>).delete(delete_pods),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}",
            get(read::<Pod>).delete(delete_pod),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}/status",
            get(read::<Pod>),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}/log",
            get(pod_log),
        )
        .route("/api/v1/secrets", get(list_all::<Secret>))
        .route(
            "/api/v1/namespaces/{namespace}/secrets",
            get(list::<Secret>)
                .post(create_secret)
                .delete(delete_secrets),
        )
        .route(
            "/api/v1/namespaces/{namespace}/secrets/{name}",
            get(read::<Secret>).delete(delete_secret),
        )
        .route("/api/v1/serviceaccounts", get(list_all::<ServiceAccount>))
        .route(
            "/api/v1/namespaces/{namespace}/serviceaccounts",
            get(list::<ServiceAccount>).post(create_service_account),
        )
        .route(
            "/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
            get(read::<ServiceAccount>).delete(delete_service_account),
        )
        .route("/api/v1/events", get(list_all::<Event>))
        .route("/api/v1/namespaces/{namespace}/events", get(list::<Event>))
        .route(
            "/api/v1/namespaces/{namespace}/events/{name}",
            get(read::<Event>),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&core),
            stall_writes,
        ))
        .with_state(core)
}

/// While writes are stalled ([`Emulator::stall_writes`](super::Emulator::stall_writes)), a
/// request that would change the cluster waits unanswered, and is answered without being
/// carried out once the stall ends: answered `500 InternalError`.
async fn stall_writes(
    State(core): State<Arc<Core>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let write = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if !write || !*core.writes_stalled.borrow() {
        return next.run(request).await;
    }
    let mut stalled = core.writes_stalled.subscribe();
    // The sender lives as long as the core: an error cannot happen while this runs.
    let _ = stalled.wait_for(|stalled| !*stalled).await;
    // Not 503 (nor 429, 504): kube's client retries those, which would carry it out after all.
    ApiError {
        code: 500,
        reason: "InternalError",
        message: "the shoal test emulator stalled this request and did not carry it out"
            .to_string(),
        details: None,
    }
    .into_response()
}

/// A failed request, answered with a `Status` object as a real API server answers.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Box<StatusDetails>>,
}

/// One problem with a submitted object (a `StatusCause`).
#[derive(Debug)]
pub(crate) struct Cause {
    pub(crate) reason: &'static str,
    pub(crate) field: String,
    pub(crate) message: String,
}

impl Cause {
    /// A required field is missing.
    pub(crate) fn required(field: &str, detail: &str) -> Cause {
        let message = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Cause {
            reason: "FieldValueRequired",
            field: field.to_string(),
            message,
        }
    }

    /// A field has a value the API rejects.
    pub(crate) fn invalid(field: &str, value: &str, detail: &str) -> Cause {
        Cause {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {value:?}: {detail}"),
        }
    }

    /// A valid Kubernetes feature this emulator does not implement.
    pub(crate) fn unsupported(field: &str, what: &str) -> Cause {
        Cause {
            reason: "FieldValueNotSupported",
            field: field.to_string(),
            message: format!(
                "Unsupported value: {what} is not supported by the shoal test emulator"
            ),
        }
    }
}

/// `jobs.batch`, `pods`: how the API names a resource in messages.
fn qualified<K: Object>() -> String {
    if K::GROUP.is_empty() {
        K::URL_PATH_SEGMENT.to_string()
    } else {
        format!("{}.{}", K::URL_PATH_SEGMENT, K::GROUP)
    }
}

fn details<K: Object>(name: &str) -> StatusDetails {
    StatusDetails {
        name: Some(name.to_string()),
        group: Some(K::GROUP.to_string()),
        kind: Some(K::URL_PATH_SEGMENT.to_string()),
        ..StatusDetails::default()
    }
}

impl ApiError {
    /// 400: the request cannot be understood.
    pub(crate) fn bad_request(message: &str) -> ApiError {
        ApiError {
            code: 400,
            reason: "BadRequest",
            message: message.to_string(),
            details: None,
        }
    }

    /// 404 for `name`.
    pub(crate) fn not_found<K: Object>(name: &str) -> ApiError {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{} {name:?} not found", qualified::<K>()),
            details: Some(Box::new(details::<K>(name))),
        }
    }

    /// 409: `name` is taken.
    pub(crate) fn already_exists<K: Object>(name: &str) -> ApiError {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} {name:?} already exists", qualified::<K>()),
            details: Some(Box::new(details::<K>(name))),
        }
    }

    /// 409: a precondition does not hold.
    pub(crate) fn conflict<K: Object>(name: &str, message: &str) -> ApiError {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} {name:?}: {message}",
                qualified::<K>()
            ),
            details: Some(Box::new(details::<K>(name))),
        }
    }

    /// 422: the object is invalid (or uses what the emulator does not implement).
    pub(crate) fn invalid<K: Object>(name: &str, causes: Vec<Cause>) -> ApiError {
        let listed: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let listed = match listed.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let kind = if K::GROUP.is_empty() {
            K::KIND.to_string()
        } else {
            format!("{}.{}", K::KIND, K::GROUP)
        };
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{kind} {name:?} is invalid: {listed}"),
            details: Some(Box::new(StatusDetails {
                name: Some(name.to_string()),
                group: Some(K::GROUP.to_string()),
                kind: Some(K::KIND.to_string()),
                causes: Some(
                    causes
                        .into_iter()
                        .map(|c| StatusCause {
                            reason: Some(c.reason.to_string()),
                            message: Some(c.message),
                            field: Some(c.field),
                        })
                        .collect(),
                ),
                ..StatusDetails::default()
            })),
        }
    }

    fn status(&self) -> Status {
        Status {
            code: Some(i32::from(self.code)),
            details: self.details.as_deref().cloned(),
            message: Some(self.message.clone()),
            metadata: ListMeta::default(),
            reason: Some(self.reason.to_string()),
            status: Some("Failure".to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &encode(&self.status()))
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    let mut response = (code, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError {
        code: 404,
        reason: "NotFound",
        message: "the server could not find the requested resource (not served by the shoal \
                  test emulator)"
            .to_string(),
        details: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        code: 405,
        reason: "MethodNotAllowed",
        message: "the server does not allow this method on the requested resource (not \
                  emulated by the shoal test emulator)"
            .to_string(),
        details: None,
    }
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "major": "1",
            "minor": "34",
            "gitVersion": "v1.34.0-shoal-emulator",
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": "",
            "compiler": "gc",
            "platform": "linux/amd64"
        }),
    )
}

type Params = Query<HashMap<String, String>>;

fn is_true(query: &HashMap<String, String>, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

fn reject_dry_run(query: &HashMap<String, String>) -> Result<(), ApiError> {
    if query.contains_key("dryRun") {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the shoal test emulator",
        ));
    }
    Ok(())
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(&format!("the request body is not a valid object: {e}")))
}

/// DeleteOptions from the query and the body (the body wins where both say something).
fn delete_options(query: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let mut options = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        parse_body::<DeleteOptions>(body)?
    };
    if options.dry_run.as_ref().is_some_and(|d| !d.is_empty()) || query.contains_key("dryRun") {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the shoal test emulator",
        ));
    }
    if options.grace_period_seconds.is_none()
        && let Some(grace) = query.get("gracePeriodSeconds")
    {
        options.grace_period_seconds = Some(grace.parse().map_err(|_| {
            ApiError::bad_request(&format!("gracePeriodSeconds: invalid value {grace:?}"))
        })?);
    }
    if options.propagation_policy.is_none() {
        options.propagation_policy = query.get("propagationPolicy").cloned();
    }
    if options.orphan_dependents.is_none() {
        options.orphan_dependents = query.get("orphanDependents").map(|v| v == "true");
    }
    Ok(options)
}

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(&format!("unable to parse labelSelector: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(&format!("unable to parse fieldSelector: {e}")))?;
    Ok((labels, fields))
}

async fn read<K: Object>(
    State(core): State<Arc<Core>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let cluster = core.lock();
    let object = cluster
        .store
        .get::<K>(&namespace, &name)
        .ok_or_else(|| ApiError::not_found::<K>(&name))?;
    Ok(json_response(StatusCode::OK, &encode(&object)))
}

async fn list<K: Object + ListableResource>(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
    Query(query): Params,
) -> Result<Response, ApiError> {
    collection::<K>(&core, Some(namespace), &query)
}

async fn list_all<K: Object + ListableResource>(
    State(core): State<Arc<Core>>,
    Query(query): Params,
) -> Result<Response, ApiError> {
    collection::<K>(&core, None, &query)
}

/// A list, or a watch with `watch=true`.
fn collection<K: Object + ListableResource>(
    core: &Arc<Core>,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    if is_true(query, "watch") {
        return watch::<K>(core, namespace, labels, fields, query);
    }
    // Lists always come from the current state (the newest version satisfies every
    // resourceVersion semantics a client may ask for but "Exact"); `limit` is not applied.
    let cluster = core.lock();
    let items: Vec<Value> = cluster
        .store
        .list_values(K::KIND, namespace.as_deref())
        .iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .map(|o| list_item(o))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &list_body::<K>(cluster.store.resource_version(), items),
    ))
}

fn list_body<K: Object + ListableResource>(resource_version: u64, items: Vec<Value>) -> Value {
    json!({
        "kind": K::LIST_KIND,
        "apiVersion": K::API_VERSION,
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": items,
    })
}

/// An object as a list item: without `kind` and `apiVersion`, as a real server sends them.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

/// Which changes a watch sends, and as what.
struct WatchFilter {
    kind: &'static str,
    api_version: &'static str,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event line for `change`, if this watch sees it: an object that starts matching the
    /// selectors is ADDED, one that stops matching is DELETED, as on a real server.
    fn event(&self, change: &Change) -> Option<Bytes> {
        if change.kind != self.kind
            || self
                .namespace
                .as_ref()
                .is_some_and(|n| *n != change.namespace)
        {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
        let type_ = match change.change {
            ChangeType::Added => now.then_some("ADDED"),
            ChangeType::Modified => match (before, now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
            ChangeType::Deleted => before.then_some("DELETED"),
        }?;
        Some(event_line(type_, &change.object))
    }

    fn bookmark(&self, resource_version: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": resource_version.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line(
            "BOOKMARK",
            &json!({"kind": self.kind, "apiVersion": self.api_version, "metadata": metadata}),
        )
    }
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": type_, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn expired_line(message: &str) -> Bytes {
    let status = ApiError {
        code: 410,
        reason: "Expired",
        message: message.to_string(),
        details: None,
    }
    .status();
    event_line("ERROR", &encode(&status))
}

/// A watch: events as newline-delimited JSON until `timeoutSeconds`, the client leaves or the
/// emulator stops. Without `resourceVersion` (or with "0"), or with `sendInitialEvents=true`,
/// it starts with an ADDED event per current object (the latter ending them with a bookmark
/// annotated `k8s.io/initial-events-end`); with a version, it replays the changes after it
/// (410 Gone if they were compacted). Bookmarks every 10 s when `allowWatchBookmarks=true`.
fn watch<K: Object + ListableResource>(
    core: &Arc<Core>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let filter = WatchFilter {
        kind: K::KIND,
        api_version: K::API_VERSION,
        namespace,
        labels,
        fields,
    };
    let bookmarks = is_true(query, "allowWatchBookmarks");
    let timeout = match query.get("timeoutSeconds") {
        Some(seconds) => Duration::from_secs(seconds.parse().map_err(|_| {
            ApiError::bad_request(&format!("timeoutSeconds: invalid value {seconds:?}"))
        })?),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(version) => Some(version.parse::<u64>().map_err(|_| {
            ApiError::bad_request(&format!("resourceVersion: invalid value {version:?}"))
        })?),
    };
    let cluster: std::sync::MutexGuard<'_, Cluster> = core.lock();
    let current = cluster.store.resource_version();
    let mut initial = Vec::new();
    let changes: Option<broadcast::Receiver<Arc<Change>>>;
    match from {
        Some(version) if !is_true(query, "sendInitialEvents") => {
            match cluster.store.changes_since(version) {
                Ok((past, receiver)) => {
                    initial.extend(past.iter().filter_map(|c| filter.event(c)));
                    changes = Some(receiver);
                }
                Err(expired) => {
                    initial.push(expired_line(&format!(
                        "too old resource version: {} ({})",
                        expired.requested, expired.oldest
                    )));
                    changes = None;
                }
            }
        }
        _ => {
            for object in cluster
                .store
                .list_values(filter.kind, filter.namespace.as_deref())
            {
                if filter.matches(&object) {
                    initial.push(event_line("ADDED", &object));
                }
            }
            if is_true(query, "sendInitialEvents") {
                initial.push(filter.bookmark(current, true));
            }
            changes = Some(cluster.store.subscribe());
        }
    }
    drop(cluster);

    let (lines, receiver) = mpsc::channel::<Bytes>(256);
    let held = core.watches_held.subscribe();
    let cut = core.watches_cut.subscribe();
    tokio::spawn(stream_watch(
        lines, initial, changes, filter, current, bookmarks, timeout, held, cut,
    ));
    let body = Body::from_stream(futures::stream::unfold(
        receiver,
        |mut receiver| async move {
            receiver
                .recv()
                .await
                .map(|line| (Ok::<_, Infallible>(line), receiver))
        },
    ));
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Sends `line` once the watches are not held ([`Emulator::hold_watches`]); false when the
/// watch is over (its client left, its deadline passed, it was cut by
/// [`Emulator::expire_watches`], which drops what it held).
///
/// [`Emulator::hold_watches`]: super::Emulator::hold_watches
/// [`Emulator::expire_watches`]: super::Emulator::expire_watches
async fn send_line(
    lines: &mpsc::Sender<Bytes>,
    line: Bytes,
    held: &mut tokio::sync::watch::Receiver<bool>,
    cut: &mut tokio::sync::watch::Receiver<u64>,
    deadline: tokio::time::Instant,
) -> bool {
    // The cut first: released and cut at once (`expire_watches` then `hold_watches(false)`),
    // the watch must end without sending what it held.
    tokio::select! {
        biased;
        _ = cut.changed() => return false,
        released = held.wait_for(|held| !*held) => {
            if released.is_err() {
                return false;
            }
        }
        () = lines.closed() => return false,
        () = tokio::time::sleep_until(deadline) => return false,
    }
    lines.send(line).await.is_ok()
}

#[allow(clippy::too_many_arguments)]
async fn stream_watch(
    lines: mpsc::Sender<Bytes>,
    initial: Vec<Bytes>,
    changes: Option<broadcast::Receiver<Arc<Change>>>,
    filter: WatchFilter,
    mut seen: u64,
    bookmarks: bool,
    timeout: Duration,
    mut held: tokio::sync::watch::Receiver<bool>,
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    for line in initial {
        if !send_line(&lines, line, &mut held, &mut cut, deadline).await {
            return;
        }
    }
    let Some(mut changes) = changes else {
        return;
    };
    let mut ticker = tokio::time::interval(BOOKMARK_EVERY);
    ticker.tick().await;
    loop {
        let line = tokio::select! {
            // The cut first: no change is sent once it is there (see `send_line`).
            biased;
            _ = cut.changed() => return,
            change = changes.recv() => match change {
                Ok(change) => {
                    seen = seen.max(change.resource_version);
                    match filter.event(&change) {
                        Some(line) => line,
                        None => continue,
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = lines.send(expired_line("the watch fell behind; start again")).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = ticker.tick(), if bookmarks => filter.bookmark(seen, false),
            () = tokio::time::sleep_until(deadline) => return,
            () = lines.closed() => return,
        };
        if !send_line(&lines, line, &mut held, &mut cut, deadline).await {
            return;
        }
    }
}

async fn create_job(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    reject_dry_run(&query)?;
    let job: Job = parse_body(&body)?;
    let mut cluster = core.lock();
    let job = controller::create_job(&core, &mut cluster, &namespace, job)?;
    drop(cluster);
    // Made, and answered as if it failed ([`Emulator::fail_job_creates_after_storing`]).
    let failure = core
        .job_create_failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front();
    if let Some(code) = failure {
        return Err(match code {
            504 => ApiError {
                code,
                reason: "Timeout",
                message: "Timeout: request did not complete within requested timeout - context \
                          deadline exceeded"
                    .to_string(),
                details: None,
            },
            _ => ApiError {
                code,
                reason: "InternalError",
                message: "Internal error occurred: the shoal test emulator made the Job and \
                          answered an error all the same"
                    .to_string(),
                details: None,
            },
        });
    }
    Ok(json_response(StatusCode::CREATED, &encode(&job)))
}

/// The answer to deleting an object that is gone at once: a success `Status`.
fn deleted_status<K: Object>(object: &K) -> Value {
    let metadata = object.metadata();
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": metadata.name,
            "group": K::GROUP,
            "kind": K::URL_PATH_SEGMENT,
            "uid": metadata.uid,
        }
    })
}

const ORPHAN_WARNING: &str = "299 - \"child pods are preserved by default when jobs are deleted; \
     set propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress \
     this warning\"";

async fn delete_job(
    State(core): State<Arc<Core>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let options = delete_options(&query, &body)?;
    let mut cluster = core.lock();
    let deleted = controller::delete_job(&core, &mut cluster, &namespace, &name, &options)?;
    let mut response = match deleted {
        JobDeleted::Gone(job) => json_response(StatusCode::OK, &deleted_status(&job)),
        JobDeleted::Pending(job) => json_response(StatusCode::OK, &encode(&job)),
    };
    if options.propagation_policy.is_none() && options.orphan_dependents.is_none() {
        response
            .headers_mut()
            .insert("warning", HeaderValue::from_static(ORPHAN_WARNING));
    }
    Ok(response)
}

/// DELETE on the collection: every Job matching the selectors, as the deleted list.
async fn delete_jobs(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let options = delete_options(&query, &body)?;
    let (labels, fields) = selectors(&query)?;
    let mut cluster = core.lock();
    let names = matching_names::<Job>(&cluster, &namespace, &labels, &fields);
    let mut items = Vec::new();
    for name in names {
        match controller::delete_job(&core, &mut cluster, &namespace, &name, &options)? {
            JobDeleted::Gone(job) | JobDeleted::Pending(job) => {
                items.push(list_item(&encode(&job)))
            }
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &list_body::<Job>(cluster.store.resource_version(), items),
    ))
}

fn matching_names<K: Object>(
    cluster: &Cluster,
    namespace: &str,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Vec<String> {
    cluster
        .store
        .list_values(K::KIND, Some(namespace))
        .iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .filter_map(|o| o.pointer("/metadata/name")?.as_str().map(str::to_string))
        .collect()
}

async fn delete_pod(
    State(core): State<Arc<Core>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let options = delete_options(&query, &body)?;
    let mut cluster = core.lock();
    let pod = controller::delete_pod(&core, &mut cluster, &namespace, &name, &options)?;
    Ok(json_response(StatusCode::OK, &encode(&pod)))
}

/// DELETE on the collection: every pod matching the selectors, as the deleted list.
async fn delete_pods(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let options = delete_options(&query, &body)?;
    let (labels, fields) = selectors(&query)?;
    let mut cluster = core.lock();
    let mut items = Vec::new();
    for name in matching_names::<Pod>(&cluster, &namespace, &labels, &fields) {
        let pod = controller::delete_pod(&core, &mut cluster, &namespace, &name, &options)?;
        items.push(list_item(&encode(&pod)));
    }
    Ok(json_response(
        StatusCode::OK,
        &list_body::<Pod>(cluster.store.resource_version(), items),
    ))
}

/// The container's output so far (`follow`, `tailLines` and the like are not applied).
async fn pod_log(
    State(core): State<Arc<Core>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = {
        let cluster = core.lock();
        if !cluster.store.contains::<Pod>(&namespace, &name) {
            return Err(ApiError::not_found::<Pod>(&name));
        }
        cluster.logs.get(&(namespace, name.clone())).cloned()
    };
    let text = path.and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
    let mut response = (StatusCode::OK, text).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

async fn create_secret(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    reject_dry_run(&query)?;
    let mut secret: Secret = parse_body(&body)?;
    let mut cluster = core.lock();
    controller::admit_metadata::<Secret>(&cluster, &namespace, &mut secret.metadata)?;
    // stringData is write-only: merged into data.
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(Default::default);
        for (key, value) in strings {
            data.insert(key, ByteString(value.into_bytes()));
        }
    }
    secret.type_.get_or_insert_with(|| "Opaque".to_string());
    let secret = cluster.store.create(secret);
    Ok(json_response(StatusCode::CREATED, &encode(&secret)))
}

async fn delete_secret(
    State(core): State<Arc<Core>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let secret = remove_object::<Secret>(&core, &namespace, &name, &query, &body)?;
    Ok(json_response(StatusCode::OK, &deleted_status(&secret)))
}

/// `deletecollection` of Secrets: those the selectors match go at once (nothing owns them).
async fn delete_secrets(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    reject_dry_run(&query)?;
    let options = delete_options(&query, &body)?;
    let (labels, fields) = selectors(&query)?;
    let mut cluster = core.lock();
    let names = matching_names::<Secret>(&cluster, &namespace, &labels, &fields);
    // Preconditions first, as one check: a failed one deletes nothing.
    for name in &names {
        if let Some(secret) = cluster.store.get::<Secret>(&namespace, name) {
            controller::check_preconditions::<Secret>(
                &secret.metadata,
                options.preconditions.as_ref(),
            )?;
        }
    }
    let mut items = Vec::new();
    for name in names {
        if let Some(secret) = cluster.store.remove::<Secret>(&namespace, &name) {
            items.push(list_item(&encode(&secret)));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &list_body::<Secret>(cluster.store.resource_version(), items),
    ))
}

/// Deletes an object that nothing else owns (no finalizers, no children): the delete options'
/// preconditions are checked, then it is gone. Returns what was removed.
fn remove_object<K: Object>(
    core: &Core,
    namespace: &str,
    name: &str,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<K, ApiError> {
    let options = delete_options(query, body)?;
    let mut cluster = core.lock();
    let object = cluster
        .store
        .get::<K>(namespace, name)
        .ok_or_else(|| ApiError::not_found::<K>(name))?;
    controller::check_preconditions::<K>(object.metadata(), options.preconditions.as_ref())?;
    Ok(cluster.store.remove::<K>(namespace, name).unwrap_or(object))
}

async fn create_service_account(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    reject_dry_run(&query)?;
    let mut account: ServiceAccount = parse_body(&body)?;
    let mut cluster = core.lock();
    if account.metadata.name.as_deref() == Some(controller::DEFAULT_SERVICE_ACCOUNT) {
        // Every namespace has it already (implicitly, here).
        return Err(ApiError::already_exists::<ServiceAccount>(
            controller::DEFAULT_SERVICE_ACCOUNT,
        ));
    }
    controller::admit_metadata::<ServiceAccount>(&cluster, &namespace, &mut account.metadata)?;
    let account = cluster.store.create(account);
    Ok(json_response(StatusCode::CREATED, &encode(&account)))
}

async fn delete_service_account(
    State(core): State<Arc<Core>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let account = remove_object::<ServiceAccount>(&core, &namespace, &name, &query, &body)?;
    Ok(json_response(StatusCode::OK, &encode(&account)))
}
