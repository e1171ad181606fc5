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
//! ```
//!
//! Endpoints: `GET /health`; `GET /sum-of-squares?n=N&ms=M&timeout_ms=T` maps `N` items (each
//! taking `M` ms) on the pool and returns their sum of squares, or 504 after `T` ms (the
//! request's future is dropped, which cancels the call: its items that did not start never
//! run); `GET /started` the number of items started so far (to watch cancellation).

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
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if shoal::termination_requested() {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(1).min(Duration::from_millis(ms)));
    }
    x * x
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
        Ok(Ok(squares)) => Ok(Json(squares.iter().sum())),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(_) => Err((StatusCode::GATEWAY_TIMEOUT, "timed out: cancelled".into())),
    }
}

async fn started(State(app): State<App>) -> Result<Json<u64>, (StatusCode, String)> {
    app.started
        .get()
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/sum-of-squares", get(sum_of_squares))
        .route("/started", get(started))
        .with_state(app)
}

/// One `GET` over HTTP/1.1 on a fresh connection: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
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
    let flag = probing.clone();
    let prober = tokio::spawn(async move {
        let mut latencies = Vec::new();
        while flag.load(Ordering::Relaxed) {
            let t = Instant::now();
            if http_get(addr, "/health").await.is_ok() {
                latencies.push(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies
    });
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
    let pct = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "self-test: {ok}/200 requests ok in {:.2} s; health p50 {:.2} ms, p99 {:.2} ms over {} probes",
        elapsed.as_secs_f64(),
        pct(50),
        pct(99),
        latencies.len()
    );
    ok == 200
}

fn main() -> shoal::Result<()> {
    // First: in a worker, this runs the worker's task and exits; nothing above may have run.
    let rt = shoal::init()?;
    shoal::log_to_stderr();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let self_testing = args.iter().any(|a| a == "--self-test");
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
                let _ = test_done.send(self_test(local).await);
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
