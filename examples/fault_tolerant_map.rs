//! A map during which two of its pool workers are killed with `SIGKILL` mid-task, then a check
//! that every result is present exactly once and in order. In Python's multiprocessing the same
//! map hangs forever (the dead worker's tasks are lost); in shoal the supervisor gives the dead
//! worker's chunks to a live one and replaces it.
//!
//! The kills come from the tasks themselves (the first two tasks of inputs 100 and 200 to run
//! send `SIGKILL` to their own worker), so the example behaves the same on every backend: local
//! subprocesses or Kubernetes pods.
//!
//! ```text
//! cargo run -p shoal-examples --example fault_tolerant_map
//! ```
//! Prints one summary line; exits 0 only if the check holds.

use std::time::Duration;

use shoal::prelude::*;

const TASKS: u64 = 300;
const VICTIMS: [u64; 2] = [100, 200];

/// ~15 ms of work. Reports each run on `runs` (so that re-runs can be counted); the first run of
/// a victim input kills its own worker, counted in `kills`.
#[shoal::remote]
fn work(x: u64, runs: Queue<u64>, kills: shoal::Value<i64>) -> (u64, u64) {
    std::thread::sleep(Duration::from_millis(15));
    if VICTIMS.contains(&x) && kills.fetch_add(1).expect("count the kill") < VICTIMS.len() as i64 {
        // A worker dying in the middle of its chunk: nothing is flushed, nothing is sent.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    runs.put(x).expect("report the run");
    (x, x * x)
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let runs: Queue<u64> = Queue::new()?;
    let kills = shoal::Value::new(0i64)?;
    let pool = Pool::new(2)?;
    let inputs = {
        let (runs, kills) = (runs.clone(), kills.clone());
        (0..TASKS).map(move |x| (x, runs.clone(), kills.clone()))
    };
    let results = pool.starmap_with(work, inputs, 5)?;

    let inputs: Vec<u64> = results.iter().map(|(x, _)| *x).collect();
    let exactly_once_in_order =
        inputs == (0..TASKS).collect::<Vec<_>>() && results.iter().all(|(x, sq)| *sq == x * x);
    let mut counts = vec![0u32; TASKS as usize];
    while let Ok(x) = runs.get_timeout(Duration::from_millis(500)) {
        if let Some(count) = counts.get_mut(x as usize) {
            *count += 1;
        }
    }
    let reran = counts.iter().filter(|c| **c > 1).count();
    let killed = kills.get()?.min(VICTIMS.len() as i64);

    println!(
        "fault_tolerant_map: {} results for {TASKS} inputs, {}; killed {killed} workers; \
         {reran} tasks ran again after a kill",
        results.len(),
        if exactly_once_in_order {
            "each present exactly once, in order"
        } else {
            "WRONG"
        },
    );
    if !exactly_once_in_order || killed != VICTIMS.len() as i64 {
        std::process::exit(1);
    }
    Ok(())
}
