//! The seed's Barrier example: three workers wait at a barrier and pass it together.
//!
//! ```text
//! cargo run -p shoal-examples --example barrier
//! ```
//! Each worker reports its arrival index; the example exits non-zero unless they are 0, 1, 2.

use shoal::prelude::*;

#[shoal::remote]
fn worker(barrier: Barrier, worker_id: u32, indices: Queue<u32>) {
    println!("Worker {worker_id} waiting at the barrier");
    let index = barrier.wait(None).expect("wait");
    println!("Worker {worker_id} passed the barrier");
    indices.put(index).expect("put");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let barrier = Barrier::new(3)?;
    let indices = Queue::new()?;
    let processes: Vec<Process> = (0..3)
        .map(|i| Process::new(worker, (barrier.clone(), i, indices.clone())))
        .collect();
    for p in &processes {
        p.start()?;
    }
    for p in &processes {
        p.join(None)?;
    }
    let mut got: Vec<u32> = (0..3)
        .map(|_| indices.get())
        .collect::<shoal::Result<_>>()?;
    got.sort_unstable();
    if got != vec![0, 1, 2] {
        std::process::exit(1);
    }
    Ok(())
}
