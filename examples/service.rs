//! A web service that embeds shoal: an axum server holding one `Pool`, fanning each request out
//! to it without blocking the async runtime, cancelling the work of requests that time out, and
//! shutting down in order on SIGINT/SIGTERM (stop accepting, let in-flight requests finish,
//! then stop the workers and the embedded store).
//!
//! ```text
//! cargo run -p shoal-examples --example service -- [ADDR]          # default 127.0.0.1:3000
//! curl 'http://127.0.0.1:3000/sum-of-squares?n=1000'
//! curl 'http://127.0.0.1:3000/health'
//! cargo run -p shoal-examples --example service -- --self-test     # 200 concurrent requests
//! cargo run --release -p shoal-examples --example service -- --measure   # the figures below
//! ```
//!
//! `--measure` prints, as JSON lines: the health endpoint's latency (p50/p99) while 40 slow maps
//! run; the throughput of 200 concurrent `/squares` requests of 20, 200 and 5,000 items; and the
//! cancellation latency (from a timed-out request's response to the last item its call started).
//!
//! Endpoints: `GET /health`; `GET /sum-of-squares?n=N&ms=M&timeout_ms=T` maps `N` items (each
//! taking `M` ms) on the pool and returns their sum of squares, or 504 after `T` ms (the
//! request's future is dropped, which cancels the call: its items that did not start never
//! run); `GET /squares?n=N` maps `N` trivial items with the default chunksize and returns their
//! sum of squares (throughput); `GET /started` the number of items started so far (to watch
//! cancellation).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use shoal::prelude::*;

/// Squares `x` after `ms` milliseconds of work, counting the items started in `started`.
#[shoal::remote]
fn slow_square(x: u64, ms: u64, started: shoal::Value<u64>) -> u64 {
    started.fetch_add(1).expect("count");
    let deadline = Instant::now() + Duration::from_millis(ms.min(MOST_MS));
    while Instant::now() < deadline {
        if shoal::termination_requested() {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(1).min(Duration::from_millis(ms)));
    }
    x * x
}

/// The most items a request may ask for: a service bounds what one request can make it hold.
const MOST_ITEMS: u64 = 100_000;

/// The longest work an item may ask for.
const MOST_MS: u64 = 60_000;

/// A request asking for more than the service takes: 400, saying so.
fn check_bounds(n: u64, ms: u64) -> Result<(), (StatusCode, String)> {
    if n > MOST_ITEMS || ms > MOST_MS {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("n is at most {MOST_ITEMS} and ms at most {MOST_MS}"),
        ));
    }
    Ok(())
}

/// The sum of `squares`, or 422 when it does not fit in 64 bits.
fn sum(squares: &[u64]) -> Result<Json<u64>, (StatusCode, String)> {
    squares
        .iter()
        .try_fold(0u64, |total, x| total.checked_add(*x))
        .map(Json)
        .ok_or((
            StatusCode::UNPROCESSABLE_ENTITY,
            "the sum does not fit in 64 bits".into(),
        ))
}

#[derive(Clone)]
struct App {
    pool: Arc<Pool>,
    started: shoal::Value<u64>,
}

#[derive(Deserialize)]
struct Params {
    n: u64,
    #[serde(default)]
    ms: u64,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
}

fn default_timeout() -> u64 {
    30_000
}

async fn sum_of_squares(
    State(app): State<App>,
    Query(p): Query<Params>,
) -> Result<Json<u64>, (StatusCode, String)> {
    check_bounds(p.n, p.ms)?;
    let items = (0..p.n).map(move |x| (x, p.ms, app.started.clone()));
    let call = app
        .pool
        .starmap_async_with(
            slow_square,
            items.collect::<Vec<_>>(),
            AsyncOptions::new().chunksize(1),
        )
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    // Awaiting the call blocks no thread; dropping it (the timeout) cancels it.
    match tokio::time::timeout(Duration::from_millis(p.timeout_ms), call.into_future()).await {
        Ok(Ok(squares)) => sum(&squares),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(_) => Err((StatusCode::GATEWAY_TIMEOUT, "timed out: cancelled".into())),
    }
}

/// Squares `x`.
#[shoal::remote]
fn square(x: u64) -> u64 {
    x * x
}

#[derive(Deserialize)]
struct Size {
    n: u64,
}

async fn squares(
    State(app): State<App>,
    Query(Size { n }): Query<Size>,
) -> Result<Json<u64>, (StatusCode, String)> {
    check_bounds(n, 0)?;
    let call = app
        .pool
        .map_async(square, 0..n)
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    match call.await {
        Ok(squares) => sum(&squares),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn started(State(app): State<App>) -> Result<Json<u64>, (StatusCode, String)> {
    app.started
        .get_async()
        .await
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/sum-of-squares", get(sum_of_squares))
        .route("/squares", get(squares))
        .route("/started", get(started))
        .with_state(app)
}

/// One `GET` over HTTP/1.1 on a fresh connection: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    http_get_on(stream, addr, path).await
}

/// One `GET` on a connection opened already (it is closed after the response).
async fn http_get_on(
    mut stream: tokio::net::TcpStream,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// 200 concurrent requests of 20 items against this service, with `/health` probed meanwhile;
/// prints the outcome and the health latency, and fails unless every request succeeded.
async fn self_test(addr: SocketAddr) -> bool {
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = probe_health(addr, probing.clone());
    let ok = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let ok = ok.clone();
            tokio::spawn(async move {
                if let Ok((200, body)) = http_get(addr, "/sum-of-squares?n=20&ms=1").await
                    && body.trim() == "2470"
                {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for r in requests {
        let _ = r.await;
    }
    let elapsed = t.elapsed();
    probing.store(false, Ordering::Relaxed);
    let mut latencies = prober.await.unwrap_or_default();
    latencies.sort();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "self-test: {ok}/200 requests ok in {:.2} s; health p50 {:.2} ms, p99 {:.2} ms over {} probes",
        elapsed.as_secs_f64(),
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        latencies.len()
    );
    ok == 200
}

/// Probes `/health` every 5 ms until `probing` is cleared; the latencies seen.
fn probe_health(
    addr: SocketAddr,
    probing: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    tokio::spawn(async move {
        let mut latencies = Vec::new();
        while probing.load(Ordering::Relaxed) {
            let t = Instant::now();
            if http_get(addr, "/health").await.is_ok() {
                latencies.push(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies
    })
}

/// The `p`-th percentile of sorted `latencies`, in ms.
fn percentile(latencies: &[Duration], p: usize) -> f64 {
    latencies
        .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(f64::NAN)
}

/// `count` concurrent GETs of `path`: how many answered 200, the time they all took, and each
/// one's latency (sorted). The connections are opened first, one at a time, so that what is
/// measured is the service, not the kernel's handling of a burst of `connect`s (a dropped SYN
/// is retried after a second).
async fn concurrent(
    addr: SocketAddr,
    path: String,
    count: usize,
) -> (usize, Duration, Vec<Duration>) {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => streams.push(stream),
            Err(e) => eprintln!("connecting to {addr}: {e}"),
        }
    }
    let t = Instant::now();
    let requests: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            let path = path.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let ok = matches!(http_get_on(stream, addr, &path).await, Ok((200, _)));
                (ok, t.elapsed())
            })
        })
        .collect();
    let mut ok = 0;
    let mut latencies = Vec::with_capacity(count);
    for r in requests {
        if let Ok((answered, latency)) = r.await {
            ok += usize::from(answered);
            latencies.push(latency);
        }
    }
    latencies.sort();
    (ok, t.elapsed(), latencies)
}

/// The figures of `--measure` (see the module docs), printed as JSON lines.
async fn measure(addr: SocketAddr) -> bool {
    // Health while 40 maps of slow items keep the pool's 4 workers busy.
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = probe_health(addr, probing.clone());
    let (ok, took, _) = concurrent(addr, "/sum-of-squares?n=4&ms=100".into(), 40).await;
    probing.store(false, Ordering::Relaxed);
    let mut latencies = prober.await.unwrap_or_default();
    latencies.sort();
    println!(
        "{{\"measure\":\"health while 40 maps run\",\"maps_ok\":{ok},\"maps_s\":{:.2},\"health_p50_ms\":{:.3},\"health_p99_ms\":{:.3},\"probes\":{}}}",
        took.as_secs_f64(),
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        latencies.len()
    );
    let mut all_ok = ok == 40;
    // Throughput at 200 concurrent requests.
    for n in [20u64, 200, 5000] {
        let (ok, took, latencies) = concurrent(addr, format!("/squares?n={n}"), 200).await;
        println!(
            "{{\"measure\":\"200 concurrent requests\",\"items_per_request\":{n},\"ok\":{ok},\"seconds\":{:.3},\"requests_per_s\":{:.1},\"items_per_s\":{:.0},\"latency_p50_ms\":{:.2},\"latency_p99_ms\":{:.2},\"latency_max_ms\":{:.2}}}",
            took.as_secs_f64(),
            ok as f64 / took.as_secs_f64(),
            (ok as u64 * n) as f64 / took.as_secs_f64(),
            percentile(&latencies, 50),
            percentile(&latencies, 99),
            latencies
                .last()
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(f64::NAN)
        );
        all_ok &= ok == 200;
    }
    // Cancellation: a request of 400 items of 50 ms that times out after 300 ms; from its 504
    // to the last item its call started.
    let count = |path: &'static str| async move {
        http_get(addr, path)
            .await
            .ok()
            .and_then(|(_, body)| body.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = count("/started").await;
    let (status, _) = http_get(addr, "/sum-of-squares?n=400&ms=50&timeout_ms=300")
        .await
        .unwrap_or((0, String::new()));
    let answered = Instant::now();
    let mut last = count("/started").await;
    let mut last_change = answered;
    while answered.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = count("/started").await;
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    println!(
        "{{\"measure\":\"cancellation\",\"status\":{status},\"items_started\":{},\"of\":400,\"last_start_after_response_ms\":{:.1}}}",
        last - before,
        last_change.duration_since(answered).as_secs_f64() * 1e3
    );
    all_ok && status == 504
}

fn main() -> shoal::Result<()> {
    // First: in a worker, this runs the worker's task and exits; nothing above may have run.
    let rt = shoal::init()?;
    shoal::log_to_stderr();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let measuring = args.iter().any(|a| a == "--measure");
    let self_testing = measuring || args.iter().any(|a| a == "--self-test");
    let addr: SocketAddr = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| {
            if self_testing {
                "127.0.0.1:0".into()
            } else {
                "127.0.0.1:3000".into()
            }
        })
        .parse()
        .map_err(|e| shoal::Error::invalid_state(format!("the address: {e}")))?;
    let app = App {
        pool: Arc::new(Pool::new(4)?),
        started: shoal::Value::new(0u64)?,
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| shoal::Error::io("starting tokio", e))?;
    let passed = tokio.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| shoal::Error::io(format!("binding {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| shoal::Error::io("the local address", e))?;
        println!("listening on {local}");
        let (test_done, test_finished) = tokio::sync::oneshot::channel::<bool>();
        if self_testing {
            tokio::spawn(async move {
                let passed = if measuring {
                    measure(local).await
                } else {
                    self_test(local).await
                };
                let _ = test_done.send(passed);
            });
        }
        let stop = async move {
            if self_testing {
                test_finished.await.unwrap_or(false)
            } else {
                shoal::shutdown_signal().await;
                true
            }
        };
        let (passed_tx, passed_rx) = tokio::sync::oneshot::channel::<bool>();
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async move {
                let passed = stop.await;
                println!("shutting down: no new connections, finishing the requests in flight");
                let _ = passed_tx.send(passed);
            })
            .await
            .map_err(|e| shoal::Error::io("serving", e))?;
        Ok::<bool, shoal::Error>(passed_rx.await.unwrap_or(false))
    })?;
    // Every request finished: stop the pool's workers and the embedded store.
    rt.shutdown_within(Duration::from_secs(10));
    println!("stopped: workers and store are gone");
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}
