//! shoal's benchmark program: the workloads of `../shared/bench/peers` (same ids, same sizes),
//! run on shoal, optionally beside the reference peers (CPython multiprocessing, Lithops, Ray)
//! run by their own harness in the same invocation.
//!
//! ```text
//! cargo run --release -p shoal-examples --example bench -- --json
//! cargo run --release -p shoal-examples --example bench -- --workloads W3 --peers stdlib,lithops
//! ```
//!
//! Workloads built so far: W3 (process_spawn, for both start methods). The others are added
//! with the features they measure (Pool: W1, W1B, W2, W8; primitives: W4 to W7).
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
const W3_PROCS: usize = 20;

#[derive(Parser, Debug)]
#[command(about = "shoal's benchmark: the peer workloads W1-W8 on shoal, beside the peers")]
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
}

const BUILT: &[&str] = &["W3"];

#[shoal::remote]
fn noop() {}

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

    let mut shoal_cells: BTreeMap<String, Value> = BTreeMap::new();
    for w in &workloads {
        match w.as_str() {
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
    }

    let peer_cells = if args.peers.is_empty() {
        BTreeMap::new()
    } else {
        run_peers(&args, &workloads)
    };

    let comparison = compare(&shoal_cells, &peer_cells);
    let report = json!({
        "machine": machine(),
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
    }
    Ok(())
}

fn method_name(method: StartMethod) -> &'static str {
    match method {
        StartMethod::Process => "process",
        StartMethod::Thread => "thread",
    }
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
    let Some(socket) = rt
        .config()
        .redis
        .url
        .as_deref()
        .and_then(|u| u.strip_prefix("unix://"))
    else {
        return json!("needs the embedded store");
    };
    let Ok(mut monitor) = Command::new("redis-cli")
        .args(["-s", socket, "monitor"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return json!("redis-cli not found");
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
    let p = Process::new(noop, ());
    p.start().expect("start");
    p.join(None).expect("join");
    std::thread::sleep(Duration::from_millis(300)); // the actor deletes the keys after the exit
    let _ = monitor.kill();
    let _ = monitor.wait();
    let lines: Vec<String> = rx.try_iter().collect();
    let commands: Vec<String> = lines
        .iter()
        .filter(|l| !l.contains("[0 lua]"))
        .filter_map(|l| {
            l.split_once("] ").map(|(_, cmd)| {
                cmd.split(' ')
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string()
            })
        })
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
        .stdout(Stdio::inherit())
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
    matches!(unit, "ms/process" | "us/round trip" | "us/pass" | "s")
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
            let ratio = if lower_is_better(unit) {
                theirs / ours
            } else {
                ours / theirs
            };
            rows.push(json!({
                "workload": workload,
                "shoal": key,
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
    println!("| cell | value | unit | details |");
    println!("|---|---|---|---|");
    for (key, cell) in shoal.iter().chain(peers.iter()) {
        let value = cell["value"]
            .as_f64()
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| cell["value"].to_string());
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
        println!(
            "| {key} | {value} | {} | {details} |",
            cell["unit"].as_str().unwrap_or("")
        );
    }
    if !comparison.is_empty() {
        println!();
        println!("| shoal | peer | shoal | peer | unit | shoal speedup |");
        println!("|---|---|---|---|---|---|");
        for row in comparison {
            println!(
                "| {} | {} | {:.3} | {:.3} | {} | x{:.2} |",
                row["shoal"].as_str().unwrap_or(""),
                row["peer"].as_str().unwrap_or(""),
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
