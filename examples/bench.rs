//! shoal's benchmark program: the workloads of `../shared/bench/peers` (same ids, same sizes),
//! run on shoal, optionally beside the reference peers (CPython multiprocessing, Lithops, Ray)
//! run by their own harness in the same invocation.
//!
//! ```text
//! cargo run --release -p shoal-examples --example bench -- --json
//! cargo run --release -p shoal-examples --example bench -- --workloads W3 --peers stdlib,lithops
//! ```
//!
//! Every workload of the peers: W1, W1B (pool map overhead, default chunksize and chunksize 1),
//! W2 (a CPU-bound map; the loop is calibrated to ~100 ms per task here, as the peers calibrate
//! theirs), W3 (process_spawn, for both start methods), W4 (queue throughput), W5 (pipe
//! ping-pong), W6 (lock contention), W7 (barrier), W8 (a map during which three tasks kill their
//! worker), W9 (actor ask: 2,000 calls that wait for their reply), W10 (actor tell: two
//! client processes send 10,000 messages each), W11 (a child process writes 20000 keys through
//! a Manager dict proxy, then reads them). W9 and W11 also have a cell of shoal's alone,
//! `-async`: the same calls awaited by a task of a Tokio current-thread runtime, as a request
//! handler awaits them (W11's in this process).
//!
//! W1 and W1B time the `map` call once every worker is up (each has run a trivial initializer):
//! CPython's `Pool()` returns with its workers forked, shoal's starts them in the background, and
//! the map should not be charged for process start-up. Each run also counts the Redis commands the
//! map cost (`INFO commandstats` before and after, over the tasks: `redis_commands_per_task`).
//! `--pool-sizes 2,8,32,64` runs W1B at each pool size (the first is the cell compared with the
//! peers, `W1B/shoal-process`; the others are `W1B/shoal-process-p<n>`).
//!
//! # Reading the figures honestly
//!
//! * **Round trips.** Redis's round trip from this program (`PING` on one connection) moves
//!   with CPU placement (9–43 µs between runs here), so it is measured before all workloads,
//!   right before and right after each one, and after all; each cell gets `rtt_us` (the mean
//!   of the two around it) and `rtt_multiple`, one operation (a task, an item, a round trip of
//!   the pipe, a barrier pass, an actor call, a process start) in round trips.
//! * **The floor of a relayed message.** A `PING` is two hops (client, Redis, client); a pipe
//!   round trip through Redis is four, each waking a process that slept. W5's cell also
//!   carries `redis_floor_us`: the same ping-pong with a bare `RPUSH` and `BLPOP` on each side
//!   (no script, no shoal code), run right after it, and `floor_multiple`, shoal's figure over
//!   it: what is shoal's own cost and what any design that relays messages through Redis pays.
//!   W9's cell (an ask and its reply: the same four hops) carries the same floor, and W7's the
//!   floor of a two-party barrier (each party a bare `RPUSH` to the other and a `BLPOP`).
//! * **Start methods.** Every shoal cell says its `start_method`; W3 has a row per method
//!   (`shoal-process`, `shoal-thread`) and the peers' W3 has CPython's `fork` and `spawn`.
//! * **Same work.** Where the peer harness runs a peer at a smaller size (its
//!   `PEER_OVERRIDES`: Lithops' W1 and W1B at 100 tasks, Ray's W1B at 5,000), shoal also runs
//!   that size (`W1/shoal-process-n100`, `W1B/shoal-process-n5000`, ...), and a ratio only
//!   pairs cells of the same `n`.
//!
//! # Profiling W1
//!
//! `--profile` runs W1 (or W1B, with `--workloads W1B`) `--runs` times on one pool of ready
//! workers (as many as the first `--pool-sizes`) and prints each map's time, for a profiler to
//! watch. Workers are subprocesses of the
//! benchmark, so profile the whole process tree. With perf (Debian `linux-perf`):
//!
//! ```text
//! cargo build --release -p shoal-examples --example bench
//! perf record -F 2999 -g --call-graph dwarf -o /tmp/w1.perf -- \
//!     target/release/examples/bench --profile --runs 30
//! perf report -i /tmp/w1.perf --no-children --sort comm,symbol | head -60
//! ```
//!
//! With valgrind (Debian `valgrind`; slower, exact instruction counts, one file per process):
//!
//! ```text
//! valgrind --tool=callgrind --trace-children=yes --callgrind-out-file=/tmp/cg.%p \
//!     target/release/examples/bench --profile --runs 3
//! callgrind_annotate /tmp/cg.<pid of a worker> | head -40   # a worker's item loop
//! callgrind_annotate /tmp/cg.<pid of the bench> | head -40  # feeder, supervisor, decode
//! ```
//!
//! A worker's share goes to `run_chunk` → `registry::call_element` (decode one argument tuple,
//! call, encode one result into the chunk's array); the driver's to the feeder (encoding the
//! arguments arrays), the supervisor's results reader, and `AsyncResult::get` (decoding the
//! results arrays as they arrive).
//!
//! `--profile --workloads W9` runs W9's ask loop instead, `--runs` times on one actor, and
//! prints each loop's µs per call; the host is a subprocess (threads `shoal-actor-*`), the
//! asker the benchmark's main thread:
//!
//! ```text
//! perf record -a -F 4999 -g -o /tmp/w9.perf -- \
//!     target/release/examples/bench --profile --workloads W9 --runs 20
//! perf report -i /tmp/w9.perf --no-children --sort comm -g none -n
//! ```
//!
//! `--peers` copies the peer harness (`run.sh`, the Python scripts) into `--work-dir` (the
//! shared copy is read-only), runs it for the chosen peers and workloads (`RUNS` = `--runs`;
//! it creates its own virtualenv and redis-server on 127.0.0.1:6390 the first time), and reads
//! its `results.json`. The report puts each shoal figure beside each peer's, with the ratio
//! (above 1: shoal is faster).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use shoal::prelude::*;

/// Sizes, as in `workloads.py`.
const W1_N: u64 = 100_000;
const W1B_N: u64 = 100_000;
const W2_TASKS: usize = 32;
const W2_TASK_MS: f64 = 100.0;
const W3_PROCS: usize = 20;
const W4_ITEMS: i64 = 20_000;
const W5_ROUNDS: u32 = 2_000;
const W6_ITERS: u32 = 2_000;
const W6_PROCS: usize = 2;
const W7_PASSES: u32 = 500;
const W8_TASKS: u64 = 200;
const W8_TASK_MS: f64 = 20.0;
const W8_CRASH_INPUTS: [u64; 3] = [17, 101, 173];
const W8_TIMEOUT: Duration = Duration::from_secs(60);
const W11_OPS: i64 = 20_000;
const POOL_PROCS: usize = 2;
const W9_CALLS: u64 = 2_000;
const W9_WARMUP: u64 = 20;
const W10_CLIENTS: usize = 2;
const W10_MSGS: u64 = 10_000;
const W10_WARMUP: u64 = 100;

#[derive(Parser, Debug)]
#[command(about = "shoal's benchmark: the peer workloads W1-W11 on shoal, beside the peers")]
struct Args {
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
    /// Workloads to run (comma-separated ids); default: every one built.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Runs per workload; the report gives the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Peers to run beside shoal with their own harness: stdlib, lithops, ray.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// The reference harness.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/bench/peers"))]
    peers_dir: PathBuf,
    /// Where the harness is copied and run.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-peers"))]
    work_dir: PathBuf,
    /// Pool sizes (workers) W1B runs at: the first is the cell compared with the peers'; each
    /// other adds a cell `W1B/shoal-process-p<n>`.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pool_sizes: Vec<usize>,
    /// Runs W1 (or W1B, or W9's ask loop) `--runs` times for a profiler (see the module docs)
    /// and prints each run's time; nothing else runs.
    #[arg(long)]
    profile: bool,
}

const BUILT: &[&str] = &[
    "W1", "W1B", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9", "W10", "W11",
];

/// The stateful object of W9/W10: a count and `incr(n)`, as the peers' `Counter`.
#[derive(serde::Serialize, serde::Deserialize, Default, shoal::Actor)]
#[actor(messages(Incr, GetCount))]
struct BenchCounter {
    value: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Incr(u64);

#[derive(serde::Serialize, serde::Deserialize)]
struct GetCount;

impl shoal::Handler<Incr> for BenchCounter {
    type Reply = u64;
    fn handle(&mut self, Incr(n): Incr, _: &mut shoal::ActorContext) -> u64 {
        self.value += n;
        self.value
    }
}

impl shoal::Handler<GetCount> for BenchCounter {
    type Reply = u64;
    fn handle(&mut self, _: GetCount, _: &mut shoal::ActorContext) -> u64 {
        self.value
    }
}

/// W10 client: `warm` tells and an ask, the gate, then `n` tells and one ask (its reply means
/// every tell before it was applied); records its start and end (Unix seconds).
#[shoal::remote]
fn tell_client(
    counter: shoal::ActorRef<BenchCounter>,
    n: u64,
    warm: u64,
    gate: Barrier,
    times: Array<f64>,
    idx: usize,
) {
    for _ in 0..warm {
        counter.tell(Incr(1)).expect("tell");
    }
    counter.ask(GetCount, None).expect("warm-up ask");
    gate.wait(None).expect("gate");
    let t0 = unix_time();
    for _ in 0..n {
        counter.tell(Incr(1)).expect("tell");
    }
    counter.ask(GetCount, None).expect("last ask");
    let t1 = unix_time();
    times.set(2 * idx, t0).expect("t0");
    times.set(2 * idx + 1, t1).expect("t1");
}

#[shoal::remote]
fn noop() {}

#[shoal::remote]
fn inc(x: u64) -> u64 {
    x + 1
}

/// The peers' pure-integer loop: `x = (x * 31 + i) & 0xFFFFFFFF`.
#[shoal::remote]
fn burn(iters: u64) -> u64 {
    let mut x: u64 = 0;
    for i in 0..std::hint::black_box(iters) {
        x = (x.wrapping_mul(31).wrapping_add(i)) & 0xFFFF_FFFF;
    }
    x
}

fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[shoal::remote]
fn producer(q: Queue<i64>, n: i64) {
    for i in 0..n {
        q.put(i).expect("put");
    }
}

/// One extra round trip for the warm-up done by the parent.
#[shoal::remote]
fn echo_child(conn: Connection<i64>, rounds: u32) {
    for _ in 0..rounds + 1 {
        let x = conn.recv().expect("recv");
        conn.send(&x).expect("send");
    }
}

#[shoal::remote]
fn lock_child(
    lock: Lock,
    counter: shoal::Value<i32>,
    iters: u32,
    gate: Barrier,
    times: Array<f64>,
    idx: usize,
) {
    gate.wait(None).expect("gate");
    let t0 = unix_time();
    for _ in 0..iters {
        lock.acquire().expect("acquire");
        counter.set(counter.get().expect("get") + 1).expect("set");
        lock.release().expect("release");
    }
    let t1 = unix_time();
    times.set_slice(2 * idx, &[t0, t1]).expect("times");
}

#[shoal::remote]
fn barrier_child(barrier: Barrier, passes: u32, times: Array<f64>, idx: usize) {
    barrier.wait(None).expect("warm-up");
    let t0 = unix_time();
    for _ in 0..passes {
        barrier.wait(None).expect("wait");
    }
    let t1 = unix_time();
    times.set_slice(2 * idx, &[t0, t1]).expect("times");
}

/// W11's child (`workloads.dict_child`): one untimed write/read/delete, then `n` writes
/// `d[i] = i` and `n` reads `d[i]`; the times and the sum go to `out`.
#[shoal::remote]
fn dict_child(d: DictProxy<i64, i64>, n: i64, out: Array<f64>) {
    d.set(&-1, 0).expect("warm-up");
    d.getitem(&-1).expect("warm-up");
    d.del(&-1).expect("warm-up");
    let t0 = unix_time();
    for i in 0..n {
        d.set(&i, i).expect("set");
    }
    let t1 = unix_time();
    let mut total = 0i64;
    for i in 0..n {
        total += d.getitem(&i).expect("get");
    }
    let t2 = unix_time();
    out.set_slice(0, &[t0, t1, t2, total as f64]).expect("out");
}

/// ~20 ms of CPU; inputs in `crash` kill their worker on the first run (a marker file per
/// input makes the retry succeed); a done marker per finished task.
#[shoal::remote]
fn crash_task(x: u64, iters: u64, marker_dir: String, crash: Vec<u64>) -> u64 {
    if crash.contains(&x) {
        let marker = format!("{marker_dir}/crashed-{x}");
        if !std::path::Path::new(&marker).exists() {
            std::fs::write(&marker, std::process::id().to_string()).expect("marker");
            std::process::exit(1);
        }
    }
    std::hint::black_box(burn(iters));
    std::fs::write(format!("{marker_dir}/done-{x}"), "").expect("done marker");
    x * 2
}

fn main() -> shoal::Result<()> {
    let rt = shoal::init()?;
    let args = Args::parse();
    let workloads: Vec<String> = if args.workloads.is_empty() {
        BUILT.iter().map(|s| s.to_string()).collect()
    } else {
        args.workloads.clone()
    };
    for w in &workloads {
        if !BUILT.contains(&w.as_str()) {
            eprintln!(
                "workload {w} is not built in shoal yet (built: {})",
                BUILT.join(", ")
            );
            std::process::exit(2);
        }
    }

    if args.profile && args.workloads.iter().any(|w| w == "W9") {
        profile_w9(args.runs);
        return Ok(());
    }
    if args.profile {
        let chunk1 = workloads.iter().any(|w| w == "W1B") && !workloads.iter().any(|w| w == "W1");
        let processes = args.pool_sizes.first().copied().unwrap_or(POOL_PROCS);
        profile_w1(if chunk1 { Some(1) } else { None }, args.runs, processes);
        return Ok(());
    }

    let mut shoal_cells: BTreeMap<String, Value> = BTreeMap::new();
    let iters_per_100ms = if workloads.iter().any(|w| w == "W2" || w == "W8") {
        calibrate()
    } else {
        0
    };
    let rtt_before = redis_round_trip(&rt, RTT_SAMPLES);
    let mut rtt_during = BTreeMap::new();
    for w in &workloads {
        let label = "shoal-process".to_string();
        let key = format!("{w}/{label}");
        let rtt_start = ping_us_median(&rt, RTT_AROUND_SAMPLES);
        let cells_before: Vec<String> = shoal_cells.keys().cloned().collect();
        match w.as_str() {
            "W1" => {
                let runs = (0..args.runs)
                    .map(|_| w1_pool_map_overhead(&rt, W1_N, None, POOL_PROCS))
                    .collect();
                let mut cell = median_cell(w, "pool_map_overhead", &label, runs);
                cell["redis_commands_per_chunk"] = redis_commands_per_chunk(&rt);
                shoal_cells.insert(key, cell);
                // Lithops ran W1 at a smaller N: the same work for its ratio.
                for n in peer_sizes(w, W1_N) {
                    let runs = (0..args.runs)
                        .map(|_| w1_pool_map_overhead(&rt, n, None, POOL_PROCS))
                        .collect();
                    let label = format!("{label}-n{n}");
                    let cell = median_cell(w, "pool_map_overhead", &label, runs);
                    shoal_cells.insert(format!("{w}/{label}"), cell);
                }
            }
            "W1B" => {
                for (i, &processes) in args.pool_sizes.iter().enumerate() {
                    let runs = (0..args.runs)
                        .map(|_| w1_pool_map_overhead(&rt, W1B_N, Some(1), processes))
                        .collect();
                    let label = if i == 0 {
                        label.clone()
                    } else {
                        format!("{label}-p{processes}")
                    };
                    let cell = median_cell(w, "pool_map_chunk1", &label, runs);
                    shoal_cells.insert(format!("{w}/{label}"), cell);
                }
                // Lithops and Ray ran W1B at smaller Ns: the same work for their ratios.
                for n in peer_sizes(w, W1B_N) {
                    let runs = (0..args.runs)
                        .map(|_| w1_pool_map_overhead(&rt, n, Some(1), POOL_PROCS))
                        .collect();
                    let label = format!("{label}-n{n}");
                    let cell = median_cell(w, "pool_map_chunk1", &label, runs);
                    shoal_cells.insert(format!("{w}/{label}"), cell);
                }
            }
            "W2" => {
                let runs = (0..args.runs)
                    .map(|_| w2_pool_map_cpu(iters_per_100ms))
                    .collect();
                shoal_cells.insert(key, median_cell(w, "pool_map_cpu", &label, runs));
            }
            "W4" => {
                let runs = (0..args.runs).map(|_| w4_queue_throughput()).collect();
                shoal_cells.insert(key, median_cell(w, "queue_throughput", &label, runs));
            }
            "W5" => {
                let runs = (0..args.runs).map(|_| w5_pipe_pingpong()).collect();
                let mut cell = median_cell(w, "pipe_pingpong", &label, runs);
                add_floor(&mut cell, args.runs, || redis_pingpong_floor(&rt));
                shoal_cells.insert(key, cell);
            }
            "W6" => {
                let runs = (0..args.runs).map(|_| w6_lock_contention()).collect();
                shoal_cells.insert(key, median_cell(w, "lock_contention", &label, runs));
            }
            "W7" => {
                let runs = (0..args.runs).map(|_| w7_barrier()).collect();
                let mut cell = median_cell(w, "barrier", &label, runs);
                add_floor(&mut cell, args.runs, || redis_barrier_floor(&rt));
                shoal_cells.insert(key, cell);
            }
            "W8" => {
                let runs: Vec<Value> = (0..args.runs)
                    .map(|_| w8_fault_tolerance(iters_per_100ms))
                    .collect();
                let completed = runs.iter().filter(|r| r["value"] == "completed").count();
                let mut cell = runs.last().cloned().unwrap_or(Value::Null);
                cell["workload"] = json!(w);
                cell["name"] = json!("fault_tolerance");
                cell["peer"] = json!(label);
                cell["outcomes"] =
                    json!(runs.iter().map(|r| r["value"].clone()).collect::<Vec<_>>());
                cell["completed_runs"] = json!(completed);
                cell["runs"] = json!(runs.len());
                shoal_cells.insert(key, cell);
            }
            "W9" => {
                let runs = (0..args.runs).map(|_| w9_actor_ask()).collect();
                let mut cell = median_cell(w, "actor_ask", &label, runs);
                // An ask and its reply: the same four hops as a pipe's round trip.
                add_floor(&mut cell, args.runs, || redis_pingpong_floor(&rt));
                cell["redis_commands_per_ask"] = redis_commands_per_ask(&rt);
                shoal_cells.insert(key, cell);
                // The same asks awaited (`ask_async`) by a task of a service's runtime.
                let runs = (0..args.runs).map(|_| w9_actor_ask_async()).collect();
                let label = format!("{label}-async");
                let cell = median_cell(w, "actor_ask", &label, runs);
                shoal_cells.insert(format!("{w}/{label}"), cell);
            }
            "W10" => {
                let runs = (0..args.runs).map(|_| w10_actor_tell()).collect();
                shoal_cells.insert(key, median_cell(w, "actor_tell", &label, runs));
            }
            "W11" => {
                let runs = (0..args.runs).map(|_| w11_manager_dict()).collect();
                let mut cell = median_cell(w, "manager_dict", &label, runs);
                cell["redis_commands_per_op"] = redis_commands_per_dict_op(&rt);
                shoal_cells.insert(key, cell);
                // The same writes and reads awaited by a task of a service's runtime.
                let runs = (0..args.runs).map(|_| w11_manager_dict_async()).collect();
                let label = format!("{label}-async");
                let cell = median_cell(w, "manager_dict", &label, runs);
                shoal_cells.insert(format!("{w}/{label}"), cell);
            }
            "W3" => {
                for method in [StartMethod::Process, StartMethod::Thread] {
                    let label = format!("shoal-{}", method_name(method));
                    let runs: Vec<Value> =
                        (0..args.runs).map(|_| w3_process_spawn(method)).collect();
                    let mut cell = median_cell(w, "process_spawn", &label, runs);
                    if method == StartMethod::Process {
                        cell["redis_commands_per_process"] = redis_commands_per_process(&rt);
                    }
                    shoal_cells.insert(format!("{w}/{label}"), cell);
                }
            }
            _ => unreachable!("checked above"),
        }
        // The round trip next to the workload: before and after it, and each new cell as a
        // multiple of it.
        let rtt_end = ping_us_median(&rt, RTT_AROUND_SAMPLES);
        let rtt = match (rtt_start, rtt_end) {
            (Some(a), Some(b)) => Some((a + b) / 2.0),
            (a, b) => a.or(b),
        };
        rtt_during.insert(
            w.clone(),
            json!({"before_us": rtt_start, "after_us": rtt_end}),
        );
        for (key, cell) in shoal_cells.iter_mut() {
            if cells_before.contains(key) {
                continue;
            }
            let method = if key.ends_with("/shoal-thread") {
                StartMethod::Thread
            } else {
                StartMethod::Process
            };
            cell["start_method"] = json!(method_name(method));
            cell["rtt_us"] = json!(rtt);
            cell["rtt_multiple"] = json!(rtt.and_then(|rtt| rtt_multiple(cell, rtt)));
        }
    }
    let rtt_after = redis_round_trip(&rt, RTT_SAMPLES);

    let peer_cells = if args.peers.is_empty() {
        BTreeMap::new()
    } else {
        run_peers(&args, &workloads)
    };

    let comparison = compare(&shoal_cells, &peer_cells);
    let report = json!({
        "machine": machine(),
        "redis_round_trip": {
            "before": rtt_before,
            "during": rtt_during,
            "after": rtt_after,
        },
        "shoal": shoal_cells,
        "peers": peer_cells,
        "comparison": comparison,
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_table(&shoal_cells, &peer_cells, &comparison);
        println!(
            "\nRedis round trip (PING from this program): before {}, after {}; around each \
             workload: {}",
            report["redis_round_trip"]["before"],
            report["redis_round_trip"]["after"],
            report["redis_round_trip"]["during"]
        );
    }
    Ok(())
}

fn method_name(method: StartMethod) -> &'static str {
    match method {
        StartMethod::Process => "process",
        StartMethod::Thread => "thread",
    }
}

/// `PING`s in the round-trip figure printed before and after all workloads.
const RTT_SAMPLES: usize = 5_000;
/// `PING`s right before and right after each workload, for the multiple printed beside it.
const RTT_AROUND_SAMPLES: usize = 500;

/// The store's round-trip time from this program (a `PING` loop on one connection): the floor
/// under every operation that needs a round trip.
fn redis_round_trip(rt: &shoal::Runtime, samples: usize) -> Value {
    let Some(mut samples) = ping_samples(rt, samples) else {
        return Value::Null;
    };
    samples.sort_by(f64::total_cmp);
    let transport = match rt.config().redis.url.as_deref() {
        Some(url) if url.starts_with("unix://") => "unix socket (embedded store)",
        _ => "tcp",
    };
    json!({
        "transport": transport,
        "ping_us_median": samples[samples.len() / 2],
        "ping_us_p99": samples[samples.len() * 99 / 100],
    })
}

/// The median of `samples` round trips, in µs.
fn ping_us_median(rt: &shoal::Runtime, samples: usize) -> Option<f64> {
    let mut samples = ping_samples(rt, samples)?;
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied()
}

fn ping_samples(rt: &shoal::Runtime, samples: usize) -> Option<Vec<f64>> {
    let url = rt.config().redis.url.clone()?;
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .ok()?;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        let t = Instant::now();
        redis::cmd("PING").query::<String>(&mut conn).ok()?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Some(out)
}

/// One operation of `cell` (a task, an item, a round trip, a pass, a call, a message, a
/// process start) in round trips of `rtt_us`; `None` for a wall time or an outcome.
fn rtt_multiple(cell: &Value, rtt_us: f64) -> Option<f64> {
    let value = cell["value"].as_f64()?;
    let per_op_us = match cell["unit"].as_str()? {
        "us/round trip" | "us/pass" | "us/call" => value,
        "ms/process" => value * 1000.0,
        "tasks/s" | "items/s (after 1st item)" | "lock ops/s" | "msgs/s" | "ops/s" => 1e6 / value,
        _ => return None,
    };
    Some(per_op_us / rtt_us)
}

/// The sizes the peer harness ran `workload` at for some peer, other than `ours` (its
/// `PEER_OVERRIDES`: Lithops' W1 and W1B at 100, Ray's W1B at 5,000).
fn peer_sizes(workload: &str, ours: u64) -> Vec<u64> {
    let sizes: &[u64] = match workload {
        "W1" => &[100],
        "W1B" => &[100, 5_000],
        _ => &[],
    };
    sizes.iter().copied().filter(|&n| n != ours).collect()
}

/// Tells the benchmark that a worker is up (the pool's initializer).
#[shoal::remote]
fn worker_ready(ready: Queue<u32>) {
    ready.put(1).expect("ready");
}

/// A pool of `processes` workers, returned once every one of them has run its initializer; and
/// how long that took.
fn ready_pool(processes: usize) -> (Pool, Duration) {
    let ready: Queue<u32> = Queue::new().expect("queue");
    let t = Instant::now();
    let pool = Pool::builder()
        .processes(processes)
        .initializer(worker_ready, (ready.clone(),))
        .build()
        .expect("pool");
    for _ in 0..processes {
        ready
            .get_timeout(Duration::from_secs(120))
            .expect("every worker starts");
    }
    (pool, t.elapsed())
}

/// The client command counts of the embedded store (`INFO commandstats`), by command; empty
/// with an external store.
fn command_counts(rt: &shoal::Runtime) -> BTreeMap<String, u64> {
    let Some(socket) = rt
        .config()
        .redis
        .url
        .as_deref()
        .and_then(|u| u.strip_prefix("unix://"))
    else {
        return BTreeMap::new();
    };
    let out = Command::new("redis-cli")
        .args(["-s", socket, "info", "commandstats"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

/// The commands run between two [`command_counts`], by command (`INFO` itself left out).
fn commands_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .filter_map(|(name, calls)| {
            let delta = calls - before.get(name).copied().unwrap_or(0);
            (delta > 0).then(|| (name.clone(), delta))
        })
        .collect()
}

/// W1/W1B: `Pool(processes).map(inc, range(n))`; tasks per second of the `map` call, timed once
/// every worker is up, with the Redis commands it cost per task.
fn w1_pool_map_overhead(
    rt: &shoal::Runtime,
    n: u64,
    chunksize: Option<usize>,
    processes: usize,
) -> Value {
    let (pool, pool_create) = ready_pool(processes);
    let data: Vec<u64> = (0..n).collect();
    let before = command_counts(rt);
    // The input is made before the clock starts, and handed over (as the peers pass their
    // list), not copied while it runs.
    let t = Instant::now();
    let out = match chunksize {
        None => pool.map(inc, data),
        Some(c) => pool.map_with(inc, data, c),
    }
    .expect("map");
    let dt = t.elapsed();
    let commands = commands_between(&before, &command_counts(rt));
    let correct = out.len() as u64 == n && out.iter().zip(1..).all(|(o, expected)| *o == expected);
    let t = Instant::now();
    drop(pool);
    let total: u64 = commands.values().sum();
    json!({
        "value": n as f64 / dt.as_secs_f64(),
        "unit": "tasks/s",
        "n": n,
        "processes": processes,
        "chunksize": chunksize.map(|c| json!(c)).unwrap_or(json!("default")),
        "map_s": dt.as_secs_f64(),
        "pool_ready_s": pool_create.as_secs_f64(),
        "pool_terminate_s": t.elapsed().as_secs_f64(),
        "redis_commands_per_task": total as f64 / n as f64,
        "redis_commands": commands,
        "correct": correct,
    })
}

/// `--profile`: W1 (`chunksize` None) or W1B `runs` times on one pool of ready workers.
fn profile_w1(chunksize: Option<usize>, runs: usize, processes: usize) {
    let (pool, ready) = ready_pool(processes);
    eprintln!(
        "profile: {processes} workers ready in {:.3} s",
        ready.as_secs_f64()
    );
    let n = if chunksize.is_some() { W1B_N } else { W1_N };
    for run in 0..runs {
        let data: Vec<u64> = (0..n).collect();
        let t = Instant::now();
        let out = match chunksize {
            None => pool.map(inc, data),
            Some(c) => pool.map_with(inc, data, c),
        }
        .expect("map");
        let dt = t.elapsed();
        assert_eq!(out.len() as u64, n);
        println!(
            "run {run}: {:.1} ms, {:.0} tasks/s",
            dt.as_secs_f64() * 1e3,
            n as f64 / dt.as_secs_f64()
        );
    }
}

/// `--profile --workloads W9`: W9's ask loop `runs` times on one actor.
fn profile_w9(runs: usize) {
    let counter = shoal::spawn_actor(BenchCounter::default()).expect("spawn");
    counter.ask(Incr(0), None).expect("first reply");
    for run in 0..runs {
        let t = Instant::now();
        for _ in 0..W9_CALLS {
            counter.ask(Incr(1), None).expect("ask");
        }
        let dt = t.elapsed();
        println!(
            "run {run}: {:.1} us/call",
            dt.as_secs_f64() / W9_CALLS as f64 * 1e6
        );
    }
    counter.stop().expect("stop");
}

/// W9: `incr(1)` asked of an actor hosted in another process, 2000 calls one at a time after
/// 20 untimed ones: µs per call.
fn w9_actor_ask() -> Value {
    let t = Instant::now();
    let counter = shoal::spawn_actor(BenchCounter::default()).expect("spawn");
    counter.ask(Incr(0), None).expect("first reply");
    let setup = t.elapsed();
    for _ in 0..W9_WARMUP {
        counter.ask(Incr(1), None).expect("warm-up");
    }
    let mut latencies = Vec::with_capacity(W9_CALLS as usize);
    let mut last = 0;
    let t0 = Instant::now();
    let mut previous = t0;
    for _ in 0..W9_CALLS {
        last = counter.ask(Incr(1), None).expect("ask");
        let now = Instant::now();
        latencies.push(now - previous);
        previous = now;
    }
    let total = previous - t0;
    latencies.sort();
    let final_value = counter.ask(GetCount, None).expect("get");
    counter.stop().expect("stop");
    let expected = W9_WARMUP + W9_CALLS;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    json!({
        "value": total.as_secs_f64() / W9_CALLS as f64 * 1e6,
        "unit": "us/call",
        "calls": W9_CALLS,
        "p50_us": us(latencies[latencies.len() / 2]),
        "p99_us": us(latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]),
        "max_us": us(latencies[latencies.len() - 1]),
        "setup_s": setup.as_secs_f64(),
        "correct": last == expected && final_value == expected,
    })
}

/// W9 from an async service: the same asks, each awaited (`ask_async`) by a task of a Tokio
/// current-thread runtime (as a request handler would); µs per call.
fn w9_actor_ask_async() -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let counter = shoal::spawn_actor(BenchCounter::default()).expect("spawn");
    let asker = counter.clone();
    let task = runtime.spawn(async move {
        let counter = asker;
        counter.ask_async(Incr(0), None).await.expect("first reply");
        for _ in 0..W9_WARMUP {
            counter.ask_async(Incr(1), None).await.expect("warm-up");
        }
        let mut last = 0;
        let t0 = Instant::now();
        for _ in 0..W9_CALLS {
            last = counter.ask_async(Incr(1), None).await.expect("ask");
        }
        let total = t0.elapsed();
        let final_value = counter.ask_async(GetCount, None).await.expect("get");
        (total, last, final_value)
    });
    let (total, last, final_value) = runtime.block_on(task).expect("the asking task");
    counter.stop().expect("stop");
    let expected = W9_WARMUP + W9_CALLS;
    json!({
        "value": total.as_secs_f64() / W9_CALLS as f64 * 1e6,
        "unit": "us/call",
        "calls": W9_CALLS,
        "form": "ask_async in a task of a Tokio current-thread runtime",
        "correct": last == expected && final_value == expected,
    })
}

/// W10: 2 client processes, started together, each tell 10,000 `incr(1)` to one actor; from
/// the first client's first send to the last client's last reply (all applied): msgs/s.
fn w10_actor_tell() -> Value {
    let counter = shoal::spawn_actor(BenchCounter::default()).expect("spawn");
    counter.ask(Incr(0), None).expect("first reply");
    let gate = Barrier::new(W10_CLIENTS as u32).expect("gate");
    let times: Array<f64> = Array::new_raw(vec![0.0; 2 * W10_CLIENTS]).expect("times");
    let clients: Vec<Process> = (0..W10_CLIENTS)
        .map(|i| {
            Process::new(
                tell_client,
                (
                    counter.clone(),
                    W10_MSGS,
                    W10_WARMUP,
                    gate.clone(),
                    times.clone(),
                    i,
                ),
            )
        })
        .collect();
    for c in &clients {
        c.start().expect("start");
    }
    for c in &clients {
        c.join(None).expect("join");
    }
    let ts = times.to_vec().expect("times");
    let start = ts.iter().step_by(2).cloned().fold(f64::MAX, f64::min);
    let end = ts.iter().skip(1).step_by(2).cloned().fold(0.0, f64::max);
    let final_value = counter.ask(GetCount, None).expect("get");
    counter.stop().expect("stop");
    let msgs = W10_CLIENTS as u64 * W10_MSGS;
    let expected = W10_CLIENTS as u64 * (W10_MSGS + W10_WARMUP);
    json!({
        "value": msgs as f64 / (end - start),
        "unit": "msgs/s",
        "msgs": msgs,
        "clients": W10_CLIENTS,
        "loop_s": end - start,
        "final_value": final_value,
        "correct": final_value == expected,
    })
}

/// W4: a producer process puts 20000 ints on one queue; the parent gets them all. Items/s from
/// the first item received to the last.
fn w4_queue_throughput() -> Value {
    let q: Queue<i64> = Queue::new().expect("queue");
    let t0 = Instant::now();
    let p = Process::new(producer, (q.clone(), W4_ITEMS));
    p.start().expect("start");
    let mut total = q.get().expect("first");
    let t_first = Instant::now();
    for _ in 0..W4_ITEMS - 1 {
        total += q.get().expect("get");
    }
    let t_last = Instant::now();
    p.join(None).expect("join");
    json!({
        "value": (W4_ITEMS - 1) as f64 / (t_last - t_first).as_secs_f64(),
        "unit": "items/s (after 1st item)",
        "items_per_s_incl_start": W4_ITEMS as f64 / (t_last - t0).as_secs_f64(),
        "n": W4_ITEMS,
        "first_item_s": (t_first - t0).as_secs_f64(),
        "total_s": (t_last - t0).as_secs_f64(),
        "correct": total == W4_ITEMS * (W4_ITEMS - 1) / 2,
    })
}

/// W5: parent and child ping-pong over a pipe, 2000 round trips after one warm-up.
fn w5_pipe_pingpong() -> Value {
    let (a, b) = Pipe::new::<i64>(true).expect("pipe");
    let p = Process::new(echo_child, (b, W5_ROUNDS));
    let t0 = Instant::now();
    p.start().expect("start");
    a.send(&-1).expect("send");
    assert_eq!(a.recv().expect("recv"), -1);
    let child_up = t0.elapsed();
    let mut ok = true;
    let t = Instant::now();
    for i in 0..W5_ROUNDS as i64 {
        a.send(&i).expect("send");
        ok &= a.recv().expect("recv") == i;
    }
    let dt = t.elapsed();
    p.join(None).expect("join");
    json!({
        "value": dt.as_secs_f64() / W5_ROUNDS as f64 * 1e6,
        "unit": "us/round trip",
        "rounds": W5_ROUNDS,
        "child_up_s": child_up.as_secs_f64(),
        "correct": ok,
    })
}

/// Measures `floor` `runs` times and adds its median to `cell` (`redis_floor_us`, with the
/// runs) and the cell's value over it (`floor_multiple`).
fn add_floor(cell: &mut Value, runs: usize, mut floor: impl FnMut() -> Option<f64>) {
    let mut floors: Vec<f64> = (0..runs).filter_map(|_| floor()).collect();
    floors.sort_by(f64::total_cmp);
    if let Some(&median) = floors.get(floors.len() / 2) {
        cell["redis_floor_us"] = json!(median);
        cell["redis_floor_runs"] = json!(floors);
        cell["floor_multiple"] = json!(cell["value"].as_f64().map(|v| v / median));
    }
}

/// W7's floor on this machine: two child processes pass a two-party barrier 500 times (after
/// one pass), each pass a bare `RPUSH` to the other's list and a `BLPOP` on its own (no
/// script, no shoal code), in µs per pass, timed in the children as W7 is.
fn redis_barrier_floor(rt: &shoal::Runtime) -> Option<f64> {
    let url = rt.config().redis.url.clone()?;
    let key = format!("bench:barrier-floor:{}", std::process::id());
    let times: Array<f64> = Array::new_raw(vec![0.0; 4]).expect("times");
    let procs: Vec<Process> = (0..2)
        .map(|i| {
            Process::new(
                raw_barrier_child,
                (url.clone(), key.clone(), W7_PASSES, times.clone(), i),
            )
        })
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
    }
    if procs.iter().any(|p| p.exitcode() != Some(0)) {
        return None;
    }
    let ts = times.to_vec().expect("times");
    Some((ts[1].max(ts[3]) - ts[0].min(ts[2])) / W7_PASSES as f64 * 1e6)
}

/// A party of [`redis_barrier_floor`]: each pass tells the other party it arrived and waits
/// for the other's arrival.
#[shoal::remote]
fn raw_barrier_child(url: String, key: String, passes: u32, times: Array<f64>, idx: usize) {
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("connect");
    let mine = format!("{key}:{idx}");
    let other = format!("{key}:{}", 1 - idx);
    let mut pass = || {
        redis::cmd("RPUSH")
            .arg(&other)
            .arg(1)
            .query::<()>(&mut conn)
            .expect("rpush");
        redis::cmd("BLPOP")
            .arg(&mine)
            .arg(10)
            .query::<()>(&mut conn)
            .expect("blpop");
    };
    pass();
    let t0 = unix_time();
    for _ in 0..passes {
        pass();
    }
    let t1 = unix_time();
    times.set_slice(2 * idx, &[t0, t1]).expect("times");
}

/// W5's floor on this machine: the same ping-pong (2000 round trips after one) between this
/// process and a child, each message one bare `RPUSH` answered by the other side's `BLPOP`
/// (no script, no shoal code on the path), in µs per round trip: four hops through Redis, as
/// every design that relays messages through it makes. `None` without the embedded store's URL.
fn redis_pingpong_floor(rt: &shoal::Runtime) -> Option<f64> {
    let url = rt.config().redis.url.clone()?;
    let key = format!("bench:floor:{}", std::process::id());
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .ok()?;
    let p = Process::new(raw_echo_child, (url, key.clone(), W5_ROUNDS));
    p.start().expect("start");
    let (ping, pong) = (format!("{key}:ping"), format!("{key}:pong"));
    let round = |conn: &mut redis::Connection| -> redis::RedisResult<()> {
        redis::cmd("RPUSH").arg(&ping).arg(1).query::<()>(conn)?;
        redis::cmd("BLPOP").arg(&pong).arg(10).query::<()>(conn)
    };
    round(&mut conn).ok()?;
    let t = Instant::now();
    for _ in 0..W5_ROUNDS {
        round(&mut conn).ok()?;
    }
    let dt = t.elapsed();
    p.join(None).expect("join");
    Some(dt.as_secs_f64() / W5_ROUNDS as f64 * 1e6)
}

/// The child of [`redis_pingpong_floor`]: answers each `RPUSH` to `<key>:ping` with one to
/// `<key>:pong`.
#[shoal::remote]
fn raw_echo_child(url: String, key: String, rounds: u32) {
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("connect");
    let (ping, pong) = (format!("{key}:ping"), format!("{key}:pong"));
    for _ in 0..rounds + 1 {
        redis::cmd("BLPOP")
            .arg(&ping)
            .arg(10)
            .query::<()>(&mut conn)
            .expect("blpop");
        redis::cmd("RPUSH")
            .arg(&pong)
            .arg(1)
            .query::<()>(&mut conn)
            .expect("rpush");
    }
}

/// W6: two processes x 2000 x (acquire; value += 1; release) on one lock, started together by a
/// barrier; ops/s over the span of both loops (timed in the children).
fn w6_lock_contention() -> Value {
    let lock = Lock::new().expect("lock");
    let counter = shoal::Value::new_raw(0i32).expect("counter");
    let gate = Barrier::new(W6_PROCS as u32).expect("gate");
    let times: Array<f64> = Array::new_raw(vec![0.0; 2 * W6_PROCS]).expect("times");
    let t0 = Instant::now();
    let procs: Vec<Process> = (0..W6_PROCS)
        .map(|i| {
            Process::new(
                lock_child,
                (
                    lock.clone(),
                    counter.clone(),
                    W6_ITERS,
                    gate.clone(),
                    times.clone(),
                    i,
                ),
            )
        })
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
    }
    let wall = t0.elapsed().as_secs_f64();
    let ts = times.to_vec().expect("times");
    let start = ts.iter().step_by(2).copied().fold(f64::MAX, f64::min);
    let end = ts
        .iter()
        .skip(1)
        .step_by(2)
        .copied()
        .fold(f64::MIN, f64::max);
    let ops = W6_ITERS as usize * W6_PROCS;
    let final_value = counter.get().expect("counter");
    json!({
        "value": ops as f64 / (end - start),
        "unit": "lock ops/s",
        "ops": ops,
        "loop_s": end - start,
        "wall_incl_start_s": wall,
        "final_value": final_value,
        "correct": final_value as usize == ops,
    })
}

/// W7: two processes pass one barrier 500 times after a warm-up pass; microseconds per pass.
fn w7_barrier() -> Value {
    let barrier = Barrier::new(2).expect("barrier");
    let times: Array<f64> = Array::new_raw(vec![0.0; 4]).expect("times");
    let t0 = Instant::now();
    let procs: Vec<Process> = (0..2)
        .map(|i| {
            Process::new(
                barrier_child,
                (barrier.clone(), W7_PASSES, times.clone(), i),
            )
        })
        .collect();
    for p in &procs {
        p.start().expect("start");
    }
    for p in &procs {
        p.join(None).expect("join");
    }
    let wall = t0.elapsed().as_secs_f64();
    let ts = times.to_vec().expect("times");
    let start = ts[0].min(ts[2]);
    let end = ts[1].max(ts[3]);
    json!({
        "value": (end - start) / W7_PASSES as f64 * 1e6,
        "unit": "us/pass",
        "passes": W7_PASSES,
        "loop_s": end - start,
        "wall_incl_start_s": wall,
    })
}

/// W11: one child process does `W11_OPS` writes `d[i] = i`, then `W11_OPS` reads `d[i]`,
/// through `Manager::new().dict()` (after one untimed write/read/delete); timed in the child.
/// The parent checks the read sum and the dict's copy.
fn w11_manager_dict() -> Value {
    let n = W11_OPS;
    let t = Instant::now();
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    let setup = t.elapsed().as_secs_f64();
    let out: Array<f64> = Array::new_raw(vec![0.0; 4]).expect("out");
    let t0 = Instant::now();
    let p = Process::new(dict_child, (d.clone(), n, out.clone()));
    p.start().expect("start");
    p.join(None).expect("join");
    let wall = t0.elapsed().as_secs_f64();
    let content: BTreeMap<i64, i64> = d.copy().expect("copy");
    manager.shutdown().expect("shutdown");
    let times = out.to_vec().expect("out");
    let (c0, c1, c2, total) = (times[0], times[1], times[2], times[3]);
    let correct = total == (n * (n - 1) / 2) as f64
        && content.len() == n as usize
        && content.iter().all(|(k, v)| k == v);
    json!({
        "value": 2.0 * n as f64 / (c2 - c0),
        "unit": "ops/s",
        "ops": 2 * n,
        "writes": n,
        "reads": n,
        "write_ops_per_s": n as f64 / (c1 - c0),
        "read_ops_per_s": n as f64 / (c2 - c1),
        "loop_s": c2 - c0,
        "manager_setup_s": setup,
        "wall_incl_start_s": wall,
        "correct": correct,
        "notes": "DictProxy on Redis: each d[i] = i and d[i] is one EVALSHA round trip (a \
                  script on the dict's hash and insertion-order zset); no manager process.",
    })
}

/// W11 from an async service: the same `d[i] = i` then `d[i]`, each awaited (`set_async`,
/// `getitem_async`) by a task of a Tokio current-thread runtime, in this process: ops/s.
fn w11_manager_dict_async() -> Value {
    let n = W11_OPS;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    let dict = d.clone();
    let (write_s, read_s, total) = runtime
        .block_on(runtime.spawn(async move {
            // Warm up: the runtime's connection open, the script loaded.
            dict.set_async(&-1, 0).await.expect("set");
            dict.del_async(&-1).await.expect("del");
            let t0 = Instant::now();
            for i in 0..n {
                dict.set_async(&i, i).await.expect("set");
            }
            let t1 = Instant::now();
            let mut total = 0;
            for i in 0..n {
                total += dict.getitem_async(&i).await.expect("get");
            }
            ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64(), total)
        }))
        .expect("the task");
    let content: BTreeMap<i64, i64> = d.copy().expect("copy");
    manager.shutdown().expect("shutdown");
    let correct = total == n * (n - 1) / 2
        && content.len() == n as usize
        && content.iter().all(|(k, v)| k == v);
    json!({
        "value": 2.0 * n as f64 / (write_s + read_s),
        "unit": "ops/s",
        "ops": 2 * n,
        "write_ops_per_s": n as f64 / write_s,
        "read_ops_per_s": n as f64 / read_s,
        "form": "set_async/getitem_async in a task of a Tokio current-thread runtime, in the \
                 parent process",
        "correct": correct,
    })
}

/// Redis commands per dict operation, seen with `MONITOR` around 1000 writes and 1000 reads
/// from this process: the commands clients sent (the round trips) and those the scripts ran.
fn redis_commands_per_dict_op(rt: &shoal::Runtime) -> Value {
    let manager = Manager::new().expect("manager");
    let d = manager.dict::<i64, i64>().expect("dict");
    // Warm up: scripts loaded, a connection open.
    d.set(&-1, 0).expect("set");
    d.getitem(&-1).expect("get");
    let ops = 1000i64;
    let counted = monitored(rt, 2 * ops as u64, || {
        for i in 0..ops {
            d.set(&i, i).expect("set");
        }
        for i in 0..ops {
            d.getitem(&i).expect("get");
        }
    });
    manager.shutdown().expect("shutdown");
    counted
}

/// Redis commands per W9 ask, seen with `MONITOR` around 1000 asks of an active actor: those
/// the asker sends (the checking transaction and a `BLPOP`, pipelined: 1 round trip) and those
/// its host sends (a blocking `XREAD` with the lease's `WATCH` and `GET`, and the commit's
/// transaction per batch: 2 round trips), with what any script runs.
fn redis_commands_per_ask(rt: &shoal::Runtime) -> Value {
    let counter = shoal::spawn_actor(BenchCounter::default()).expect("spawn");
    for _ in 0..W9_WARMUP {
        counter.ask(Incr(1), None).expect("warm-up");
    }
    let asks = 1000u64;
    let counted = monitored(rt, asks, || {
        for _ in 0..asks {
            counter.ask(Incr(1), None).expect("ask");
        }
    });
    counter.stop().expect("stop");
    counted
}

/// The lines `MONITOR` of the embedded store shows while `work` runs (and 300 ms after it, for
/// what the runtime does behind it), or why they cannot be had.
fn monitor_lines(rt: &shoal::Runtime, work: impl FnOnce()) -> Result<Vec<String>, Value> {
    let Some(socket) = rt
        .config()
        .redis
        .url
        .as_deref()
        .and_then(|u| u.strip_prefix("unix://"))
    else {
        return Err(json!("needs the embedded store"));
    };
    let Ok(mut monitor) = Command::new("redis-cli")
        .args(["-s", socket, "monitor"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Err(json!("redis-cli not found"));
    };
    let stdout = monitor.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // MONITOR answers OK first; wait for it.
    let _ = rx.recv_timeout(Duration::from_secs(5));
    work();
    std::thread::sleep(Duration::from_millis(300));
    let _ = monitor.kill();
    let _ = monitor.wait();
    Ok(rx.try_iter().collect())
}

/// The command of a `MONITOR` line, as the client wrote it; `None` for a line that is not one.
fn monitored_command(line: &str) -> Option<String> {
    line.split_once("] ").map(|(_, cmd)| {
        cmd.split(' ')
            .next()
            .unwrap_or("")
            .trim_matches('"')
            .to_string()
    })
}

/// Runs `work` (`ops` operations) under `MONITOR` of the embedded store and counts the
/// commands clients sent and those scripts ran, per operation.
fn monitored(rt: &shoal::Runtime, ops: u64, work: impl FnOnce()) -> Value {
    let lines = match monitor_lines(rt, work) {
        Ok(lines) => lines,
        Err(why) => return why,
    };
    let mut sent = BTreeMap::<String, u64>::new();
    let mut in_scripts = BTreeMap::<String, u64>::new();
    for line in &lines {
        let counts = if line.contains(" lua] ") {
            &mut in_scripts
        } else {
            &mut sent
        };
        let command = monitored_command(line).unwrap_or_default().to_lowercase();
        *counts.entry(command).or_default() += 1;
    }
    let per_op = |counts: &BTreeMap<String, u64>| -> Value {
        counts
            .iter()
            .map(|(k, v)| (k.clone(), json!(*v as f64 / ops as f64)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({
        "commands_sent_per_op": sent.values().sum::<u64>() as f64 / ops as f64,
        "sent_by_clients": per_op(&sent),
        "run_by_scripts": per_op(&in_scripts),
        "ops": ops,
    })
}

/// Calibrates [`burn`] to ~100 ms here, as `workloads.calibrate` does for the peers.
fn calibrate() -> u64 {
    let time = |iters: u64| {
        let t = Instant::now();
        std::hint::black_box(burn(iters));
        t.elapsed().as_secs_f64()
    };
    let mut iters: u64 = 100_000;
    let mut dt = time(iters);
    while dt < 0.02 {
        iters *= 2;
        dt = time(iters);
    }
    iters = (iters as f64 * 0.1 / dt) as u64;
    for _ in 0..3 {
        let mut ts: Vec<f64> = (0..5).map(|_| time(iters)).collect();
        ts.sort_by(f64::total_cmp);
        iters = (iters as f64 * 0.1 / ts[2]) as u64;
    }
    iters
}

/// W2: `Pool(2).map(burn, [iters] * 32)`, ~100 ms each; wall and speedup over the same 32
/// calls run serially here first.
fn w2_pool_map_cpu(iters_per_100ms: u64) -> Value {
    let iters = (iters_per_100ms as f64 * W2_TASK_MS / 100.0) as u64;
    let t = Instant::now();
    let expected: Vec<u64> = (0..W2_TASKS).map(|_| burn(iters)).collect();
    let serial = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let pool = Pool::new(POOL_PROCS).expect("pool");
    let pool_create = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = pool.map(burn, vec![iters; W2_TASKS]).expect("map");
    let wall = t.elapsed().as_secs_f64();
    json!({
        "value": wall,
        "unit": "s",
        "speedup": serial / wall,
        "serial_s": serial,
        "tasks": W2_TASKS,
        "iters": iters,
        "pool_create_s": pool_create,
        "correct": out == expected,
    })
}

/// W8: `Pool(2).map_async(crash_task, 200 args).get(timeout=60)`; inputs 17, 101, 173 kill
/// their worker on their first run. Outcome: completed, raised or hung.
fn w8_fault_tolerance(iters_per_100ms: u64) -> Value {
    let iters = (iters_per_100ms as f64 * W8_TASK_MS / 100.0) as u64;
    let dir = std::env::temp_dir().join(format!("shoal-w8-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("marker dir");
    let marker_dir = dir.display().to_string();
    let args: Vec<(u64, u64, String, Vec<u64>)> = (0..W8_TASKS)
        .map(|x| (x, iters, marker_dir.clone(), W8_CRASH_INPUTS.to_vec()))
        .collect();
    let pool = Pool::new(POOL_PROCS).expect("pool");
    let t = Instant::now();
    let result = pool.starmap_async(crash_task, args).expect("submit");
    let (outcome, error) = match result.get(Some(W8_TIMEOUT)) {
        Ok(out) if out == (0..W8_TASKS).map(|x| x * 2).collect::<Vec<_>>() => ("completed", None),
        Ok(_) => ("completed-wrong-results", None),
        Err(Error::Timeout(_)) => ("hung", None),
        Err(e) => ("raised", Some(e.to_string())),
    };
    let elapsed = t.elapsed().as_secs_f64();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut crashed: Vec<u64> = names
        .iter()
        .filter_map(|n| n.strip_prefix("crashed-")?.parse().ok())
        .collect();
    crashed.sort();
    let done = names.iter().filter(|n| n.starts_with("done-")).count();
    let t = Instant::now();
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
    json!({
        "value": outcome,
        "unit": "outcome",
        "elapsed_s": elapsed,
        "error": error,
        "crashed_inputs_seen": crashed,
        "tasks_done": done,
        "tasks": W8_TASKS,
        "terminate_s": t.elapsed().as_secs_f64(),
    })
}

/// Redis commands per chunk on the map path: `INFO commandstats` before and after a map of
/// 2000 chunks (chunksize 1), divided by the chunks.
fn redis_commands_per_chunk(rt: &shoal::Runtime) -> Value {
    if command_counts(rt).is_empty() {
        return json!("needs the embedded store");
    }
    let chunks = 2000u64;
    let pool = Pool::new(POOL_PROCS).expect("pool");
    // Warm up: workers up, scripts loaded.
    pool.map_with(inc, 0..100u64, 1).expect("map");
    let before = command_counts(rt);
    pool.map_with(inc, 0..chunks, 1).expect("map");
    let commands = commands_between(&before, &command_counts(rt));
    drop(pool);
    let total: u64 = commands.values().sum();
    let per_command: BTreeMap<&String, f64> = commands
        .iter()
        .map(|(name, calls)| (name, *calls as f64 / chunks as f64))
        .collect();
    json!({"per_chunk": total as f64 / chunks as f64, "by_command": per_command, "chunks": chunks})
}

/// W3: start+join `Process(noop)` sequentially, `W3_PROCS` times. Value: ms per process (the
/// mean, as the peers report it); the median of single start+join latencies is kept too.
fn w3_process_spawn(method: StartMethod) -> Value {
    let mut each = Vec::with_capacity(W3_PROCS);
    let total = Instant::now();
    for _ in 0..W3_PROCS {
        let t = Instant::now();
        let p = Process::new(noop, ()).start_method(method);
        p.start().expect("start");
        p.join(None).expect("join");
        assert_eq!(p.exitcode(), Some(0));
        each.push(t.elapsed());
    }
    let total = total.elapsed();
    each.sort();
    json!({
        "value": total.as_secs_f64() * 1000.0 / W3_PROCS as f64,
        "unit": "ms/process",
        "n": W3_PROCS,
        "median_ms": each[W3_PROCS / 2].as_secs_f64() * 1000.0,
        "min_ms": each[0].as_secs_f64() * 1000.0,
        "max_ms": each[W3_PROCS - 1].as_secs_f64() * 1000.0,
        "total_s": total.as_secs_f64(),
    })
}

/// The median run of `runs`, by `value`, with every run's value listed.
fn median_cell(workload: &str, name: &str, label: &str, mut runs: Vec<Value>) -> Value {
    runs.sort_by(|a, b| {
        let a = a["value"].as_f64().unwrap_or(f64::NAN);
        let b = b["value"].as_f64().unwrap_or(f64::NAN);
        a.total_cmp(&b)
    });
    let per_run: Vec<Value> = runs.iter().map(|r| r["value"].clone()).collect();
    let mut cell = runs.get(runs.len() / 2).cloned().unwrap_or(Value::Null);
    cell["workload"] = json!(workload);
    cell["name"] = json!(name);
    cell["peer"] = json!(label);
    cell["runs"] = json!(runs.len());
    cell["per_run"] = json!(per_run);
    cell
}

/// Client commands the server saw for one subprocess lifecycle (parent and child together),
/// counted with `MONITOR` (commands run inside scripts are not counted).
fn redis_commands_per_process(rt: &shoal::Runtime) -> Value {
    // The actor deletes the keys after the exit, within the 300 ms `monitor_lines` waits.
    let lines = monitor_lines(rt, || {
        let p = Process::new(noop, ());
        p.start().expect("start");
        p.join(None).expect("join");
    });
    let lines = match lines {
        Ok(lines) => lines,
        Err(why) => return why,
    };
    let commands: Vec<String> = lines
        .iter()
        .filter(|l| !l.contains("[0 lua]"))
        .filter_map(|l| monitored_command(l))
        .collect();
    json!({"count": commands.len(), "commands": commands})
}

/// Runs the reference harness for `peers` and returns its cells keyed `W/peer-label`.
fn run_peers(args: &Args, workloads: &[String]) -> BTreeMap<String, Value> {
    if let Err(e) = copy_harness(&args.peers_dir, &args.work_dir) {
        eprintln!(
            "cannot copy the peer harness from {}: {e}",
            args.peers_dir.display()
        );
        std::process::exit(1);
    }
    let results = args.work_dir.join("results.json");
    let _ = std::fs::remove_file(&results);
    eprintln!(
        "running the peers ({}) with their harness in {}",
        args.peers.join(","),
        args.work_dir.display()
    );
    let status = Command::new("bash")
        .arg("run.sh")
        .current_dir(&args.work_dir)
        .env("RUNS", args.runs.to_string())
        .env("PEERS", args.peers.join(" "))
        .env("WORKLOADS", workloads.join(" "))
        .env("SKIP_REDIS_LIMITS", "1")
        .env("RESULTS_JSON", &results)
        // The harness's progress goes to stderr, so that stdout stays one JSON document.
        .stdout(std::io::stderr())
        .stderr(Stdio::inherit())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("the peer harness failed: {status:?}");
    }
    let text = std::fs::read_to_string(&results).unwrap_or_default();
    let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    parsed["cells"]
        .as_object()
        .map(|cells| cells.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn copy_harness(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let keep = path.extension().is_some_and(|e| e == "py" || e == "sh");
        if keep && let Some(name) = path.file_name() {
            std::fs::copy(&path, to.join(name))?;
        }
    }
    Ok(())
}

/// Lower is better for times, higher for rates.
fn lower_is_better(unit: &str) -> bool {
    // W2's "s" is a wall time; its speedup is reported beside it.
    matches!(
        unit,
        "ms/process" | "us/round trip" | "us/pass" | "us/call" | "s"
    )
}

fn compare(shoal: &BTreeMap<String, Value>, peers: &BTreeMap<String, Value>) -> Vec<Value> {
    let mut rows = Vec::new();
    for (key, cell) in shoal {
        let workload = key.split('/').next().unwrap_or_default();
        let (Some(ours), Some(unit)) = (cell["value"].as_f64(), cell["unit"].as_str()) else {
            continue;
        };
        for (peer_key, peer) in peers
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{workload}/")))
        {
            let Some(theirs) = peer["value"].as_f64() else {
                continue;
            };
            // Ratios compare the same work: a cell run at another size than the peer's is
            // compared with the peers run at its size.
            if let (Some(a), Some(b)) = (cell["n"].as_u64(), peer["n"].as_u64())
                && a != b
            {
                continue;
            }
            let ratio = if lower_is_better(unit) {
                theirs / ours
            } else {
                ours / theirs
            };
            rows.push(json!({
                "workload": workload,
                "shoal": key,
                "shoal_start_method": cell["start_method"],
                "shoal_rtt_multiple": cell["rtt_multiple"],
                "n": cell["n"],
                "shoal_value": ours,
                "peer": peer_key,
                "peer_value": theirs,
                "unit": unit,
                "shoal_speedup": ratio,
            }));
        }
    }
    rows
}

fn print_table(
    shoal: &BTreeMap<String, Value>,
    peers: &BTreeMap<String, Value>,
    comparison: &[Value],
) {
    println!("| cell | start method | value | unit | round trips per op | details |");
    println!("|---|---|---|---|---|---|");
    for (key, cell) in shoal.iter().chain(peers.iter()) {
        let value = cell["value"]
            .as_f64()
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| cell["value"].to_string());
        let floor = cell["floor_multiple"]
            .as_f64()
            .map(|m| {
                format!(
                    "; {m:.2}x its bare-Redis floor ({:.1} us)",
                    cell["redis_floor_us"].as_f64().unwrap_or(0.0)
                )
            })
            .unwrap_or_default();
        let details = match cell.get("median_ms") {
            Some(m) => format!(
                "median {:.3} ms, runs {}",
                m.as_f64().unwrap_or(0.0),
                cell["per_run"]
            ),
            None => format!(
                "runs {}",
                cell.get("per_run").cloned().unwrap_or(Value::Null)
            ),
        };
        let multiple = cell["rtt_multiple"]
            .as_f64()
            .map(|m| {
                format!(
                    "{m:.3} (RTT {:.1} us)",
                    cell["rtt_us"].as_f64().unwrap_or(0.0)
                )
            })
            .unwrap_or_default();
        println!(
            "| {key} | {} | {value} | {} | {multiple} | {details}{floor} |",
            cell["start_method"].as_str().unwrap_or(""),
            cell["unit"].as_str().unwrap_or("")
        );
    }
    if !comparison.is_empty() {
        println!();
        println!("| shoal | peer | n | shoal | peer | unit | shoal speedup |");
        println!("|---|---|---|---|---|---|---|");
        for row in comparison {
            println!(
                "| {} | {} | {} | {:.3} | {:.3} | {} | x{:.2} |",
                row["shoal"].as_str().unwrap_or(""),
                row["peer"].as_str().unwrap_or(""),
                row["n"].as_u64().map(|n| n.to_string()).unwrap_or_default(),
                row["shoal_value"].as_f64().unwrap_or(0.0),
                row["peer_value"].as_f64().unwrap_or(0.0),
                row["unit"].as_str().unwrap_or(""),
                row["shoal_speedup"].as_f64().unwrap_or(0.0),
            );
        }
    }
    for (key, cell) in shoal {
        if let Some(rc) = cell.get("redis_commands_per_process") {
            println!("\n{key}: Redis commands per process lifecycle: {rc}");
        }
        if let Some(rc) = cell.get("redis_commands_per_task") {
            println!(
                "\n{key}: {} workers ready in {:.3} s; Redis commands per task {:.3}: {}",
                cell["processes"],
                cell["pool_ready_s"].as_f64().unwrap_or(0.0),
                rc.as_f64().unwrap_or(0.0),
                cell["redis_commands"]
            );
        }
    }
}

fn machine() -> Value {
    let sh = |cmd: &str| {
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "nproc": sh("nproc"),
        "uname": sh("uname -srm"),
        "cpu_model": sh("lscpu | sed -n 's/^Model name: *//p'"),
        "redis_server": sh("redis-server --version"),
        "measured_at": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
    })
}
