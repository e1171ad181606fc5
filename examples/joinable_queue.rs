//! A `JoinableQueue` (Lithops' joinable_queue example): workers take tasks and mark each done;
//! the parent's `join()` returns once every task is done.
//!
//! ```text
//! cargo run -p shoal-examples --example joinable_queue
//! ```

use std::time::Duration;

use shoal::prelude::*;

#[shoal::remote]
fn worker(tasks: JoinableQueue<u32>, results: Queue<u32>) {
    loop {
        match tasks.get_timeout(Duration::from_millis(500)) {
            Ok(n) => {
                results.put(n * n).expect("put");
                tasks.task_done().expect("task_done");
            }
            Err(Error::Empty) => return,
            Err(e) => panic!("{e}"),
        }
    }
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let tasks = JoinableQueue::new()?;
    let results = Queue::new()?;
    for n in 1..=20 {
        tasks.put(n)?;
    }
    let workers: Vec<Process> = (0..3)
        .map(|_| Process::new(worker, (tasks.clone(), results.clone())))
        .collect();
    for w in &workers {
        w.start()?;
    }
    tasks.join()?;
    println!("all tasks done");
    let mut squares: Vec<u32> = (0..20)
        .map(|_| results.get())
        .collect::<shoal::Result<_>>()?;
    squares.sort_unstable();
    println!("{squares:?}");
    for w in &workers {
        w.join(None)?;
    }
    if squares != (1..=20).map(|n| n * n).collect::<Vec<_>>() {
        std::process::exit(1);
    }
    Ok(())
}
