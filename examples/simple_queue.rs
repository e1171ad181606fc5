//! A `SimpleQueue` between processes (Lithops' simple_queue example): three children each put
//! a greeting; the parent gets them all.
//!
//! ```text
//! cargo run -p shoal-examples --example simple_queue
//! ```

use std::collections::BTreeSet;

use shoal::prelude::*;

#[shoal::remote]
fn greet(q: SimpleQueue<String>, name: String) {
    q.put(format!("hello from {name}")).expect("put");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let q = SimpleQueue::new()?;
    let names = ["ana", "bob", "eve"];
    let procs: Vec<Process> = names
        .iter()
        .map(|n| Process::new(greet, (q.clone(), n.to_string())))
        .collect();
    for p in &procs {
        p.start()?;
    }
    let mut got = BTreeSet::new();
    for _ in 0..names.len() {
        let message = q.get()?;
        println!("{message}");
        got.insert(message);
    }
    for p in &procs {
        p.join(None)?;
    }
    println!("empty: {}", q.empty()?);
    let expected: BTreeSet<String> = names.iter().map(|n| format!("hello from {n}")).collect();
    if got != expected || !q.empty()? {
        std::process::exit(1);
    }
    Ok(())
}
