//! The seed's Event example: three workers wait for an event that the main process sets after
//! two seconds.
//!
//! ```text
//! cargo run -p shoal-examples --example event
//! ```

use std::time::Duration;

use shoal::prelude::*;

#[shoal::remote]
fn worker(event: Event, worker_id: u32) {
    println!("Worker {worker_id} waiting for event to be set");
    assert!(event.wait(None).expect("wait"));
    println!("Worker {worker_id} received the event!");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let event = Event::new()?;
    let processes: Vec<Process> = (0..3)
        .map(|i| Process::new(worker, (event.clone(), i)))
        .collect();
    for p in &processes {
        p.start()?;
    }
    std::thread::sleep(Duration::from_secs(2));
    println!("Main process setting the event");
    event.set()?;
    for p in &processes {
        p.join(None)?;
    }
    if processes.iter().any(|p| p.exitcode() != Some(0)) {
        std::process::exit(1);
    }
    Ok(())
}
