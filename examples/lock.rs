//! The seed's Lock example: five processes print while holding one lock.
//!
//! ```text
//! cargo run -p shoal-examples --example lock
//! ```
//! Each worker also checks that nobody else is inside (a shared `Value` counts who is); the
//! example exits non-zero if two were inside at once.

use shoal::prelude::*;

#[shoal::remote]
fn worker(lock: Lock, shared_resource: String, inside: Value<i64>) {
    let _guard = lock.lock().expect("lock");
    let others = inside.fetch_add(1).expect("enter");
    println!("{shared_resource}: Accessing shared resource");
    std::thread::sleep(std::time::Duration::from_millis(20));
    inside.fetch_add(-1).expect("leave");
    assert_eq!(others, 0, "someone else held the lock");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let lock = Lock::new()?;
    let inside = Value::new_raw(0i64)?;
    let processes: Vec<Process> = (0..5)
        .map(|i| {
            Process::new(
                worker,
                (lock.clone(), format!("Process {i}"), inside.clone()),
            )
        })
        .collect();
    for p in &processes {
        p.start()?;
    }
    for p in &processes {
        p.join(None)?;
    }
    if processes.iter().any(|p| p.exitcode() != Some(0)) {
        std::process::exit(1);
    }
    Ok(())
}
