//! The seed's Condition example: three consumers wait on a condition; a producer notifies them
//! all after two seconds.
//!
//! ```text
//! cargo run -p shoal-examples --example condition
//! ```

use std::time::Duration;

use shoal::prelude::*;

#[shoal::remote]
fn consumer(cond: Condition, worker_id: u32) {
    let _guard = cond.lock().expect("lock");
    println!("Worker {worker_id} waiting for condition");
    assert!(cond.wait(None).expect("wait"));
    println!("Worker {worker_id} received the condition");
}

#[shoal::remote]
fn producer(cond: Condition) {
    std::thread::sleep(Duration::from_secs(2));
    let _guard = cond.lock().expect("lock");
    println!("Producer is notifying all workers");
    cond.notify_all().expect("notify_all");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let cond = Condition::new(None)?;
    let processes: Vec<Process> = (0..3)
        .map(|i| Process::new(consumer, (cond.clone(), i)))
        .collect();
    for p in &processes {
        p.start()?;
    }
    let notifier = Process::new(producer, (cond,));
    notifier.start()?;
    for p in &processes {
        p.join(None)?;
    }
    notifier.join(None)?;
    if processes
        .iter()
        .chain([&notifier])
        .any(|p| p.exitcode() != Some(0))
    {
        std::process::exit(1);
    }
    Ok(())
}
