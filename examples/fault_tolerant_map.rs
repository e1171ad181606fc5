//! A map during which this program kills two of its own pool workers with `SIGKILL`, then checks
//! that every result is present exactly once and in order. In Python's multiprocessing the same
//! map hangs forever (the dead worker's tasks are lost); in shoal the supervisor gives the dead
//! worker's chunks to a live one and replaces it.
//!
//! ```text
//! cargo run -p shoal-examples --example fault_tolerant_map
//! ```
//! Prints one summary line; exits 0 only if the check holds.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal::prelude::*;

const TASKS: u64 = 300;

/// ~15 ms of work; records each run in `dir` so that re-runs can be counted.
#[shoal::remote]
fn work(x: u64, dir: String) -> (u64, u64) {
    std::thread::sleep(Duration::from_millis(15));
    let path = format!("{dir}/{x}");
    let runs = std::fs::read_to_string(&path).map(|s| s.len()).unwrap_or(0) + 1;
    std::fs::write(&path, "x".repeat(runs)).expect("run marker");
    (x, x * x)
}

/// Live children of this process running this program: the pool's workers.
fn worker_pids() -> Vec<u32> {
    let me = std::process::id();
    let exe = std::env::current_exe().ok();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let mut fields = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace())
                .into_iter()
                .flatten();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            ppid == Some(me)
                && state != Some("Z")
                && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == exe
        })
        .collect()
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let dir = std::env::temp_dir().join(format!("shoal-fault-tolerant-map-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the marker directory", e))?;
    let marker_dir = dir.display().to_string();

    let pool = Pool::new(2)?;
    let result = pool.starmap_async_with(
        work,
        (0..TASKS).map(move |x| (x, marker_dir.clone())),
        AsyncOptions::new().chunksize(5),
    )?;

    let mut killed = BTreeSet::new();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(pid) = worker_pids().into_iter().find(|p| !killed.contains(p)) {
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
                .map_err(|e| Error::io("killing a worker", e.into()))?;
            killed.insert(pid);
        }
    }

    let results = result.get(Some(Duration::from_secs(60)))?;
    let inputs: Vec<u64> = results.iter().map(|(x, _)| *x).collect();
    let exactly_once_in_order =
        inputs == (0..TASKS).collect::<Vec<_>>() && results.iter().all(|(x, sq)| *sq == x * x);
    let reran = (0..TASKS)
        .filter(|x| {
            std::fs::read_to_string(dir.join(x.to_string()))
                .map(|s| s.len())
                .unwrap_or(0)
                > 1
        })
        .count();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "fault_tolerant_map: {} results for {TASKS} inputs, {}; killed {} workers (pids {:?}); {reran} tasks ran again after a kill",
        results.len(),
        if exactly_once_in_order {
            "each present exactly once, in order"
        } else {
            "WRONG"
        },
        killed.len(),
        killed,
    );
    if !exactly_once_in_order || killed.len() != 2 {
        std::process::exit(1);
    }
    Ok(())
}
