//! The seed's Semaphore example: five workers, at most two inside at a time, each for a second.
//!
//! ```text
//! cargo run -p shoal-examples --example semaphore
//! ```
//! The workers count who is inside; the example exits non-zero if three ever were.

use std::time::Duration;

use shoal::prelude::*;

#[shoal::remote]
fn worker(sem: Semaphore, worker_id: u32, inside: Value<i64>, most: Value<i64>) {
    {
        let _permit = sem.lock().expect("acquire");
        let now = inside.fetch_add(1).expect("enter") + 1;
        if now > most.get().expect("get") {
            most.set(now).expect("set");
        }
        println!("Worker {worker_id} is accessing the resource");
        std::thread::sleep(Duration::from_secs(1));
        inside.fetch_add(-1).expect("leave");
    }
    println!("Worker {worker_id} is done");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let sem = Semaphore::new(2)?;
    let inside = Value::new_raw(0i64)?;
    let most = Value::new_raw(0i64)?;
    let processes: Vec<Process> = (0..5)
        .map(|i| Process::new(worker, (sem.clone(), i, inside.clone(), most.clone())))
        .collect();
    for p in &processes {
        p.start()?;
    }
    for p in &processes {
        p.join(None)?;
    }
    let most = most.get()?;
    println!("at most {most} workers were inside at once");
    if most > 2 || processes.iter().any(|p| p.exitcode() != Some(0)) {
        std::process::exit(1);
    }
    Ok(())
}
