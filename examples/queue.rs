//! The seed's Queue example: two producers put three items each; after they finish, two
//! consumers take items while the queue is not empty.
//!
//! ```text
//! cargo run -p shoal-examples --example queue
//! ```
//! The consumers report what they got on a second queue; the example exits non-zero unless the
//! six items were each consumed exactly once. (The seed's consumers call a blocking `get()` after
//! `empty()` returned false, which can block forever when the other consumer took the last item;
//! here they use `get_timeout`.)

use std::collections::BTreeSet;
use std::time::Duration;

use shoal::prelude::*;

#[shoal::remote]
fn producer(q: Queue<String>, items: Vec<String>) {
    for item in items {
        println!("Producer put: {item}");
        q.put(item).expect("put");
    }
}

#[shoal::remote]
fn consumer(q: Queue<String>, got: Queue<String>) {
    while !q.empty().expect("empty") {
        match q.get_timeout(Duration::from_secs(1)) {
            Ok(item) => {
                println!("Consumer got: {item}");
                got.put(item).expect("put");
            }
            Err(Error::Empty) => break,
            Err(e) => panic!("{e}"),
        }
    }
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let q = Queue::new()?;
    let got = Queue::new()?;
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let p1 = Process::new(producer, (q.clone(), words(&["apple", "banana", "cherry"])));
    let p2 = Process::new(producer, (q.clone(), words(&["dog", "elephant", "frog"])));
    let c1 = Process::new(consumer, (q.clone(), got.clone()));
    let c2 = Process::new(consumer, (q.clone(), got.clone()));
    p1.start()?;
    p2.start()?;
    p1.join(None)?;
    p2.join(None)?;
    c1.start()?;
    c2.start()?;
    c1.join(None)?;
    c2.join(None)?;

    let mut consumed = Vec::new();
    while let Ok(item) = got.get_timeout(Duration::from_millis(500)) {
        consumed.push(item);
    }
    let expected: BTreeSet<String> = ["apple", "banana", "cherry", "dog", "elephant", "frog"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let unique: BTreeSet<String> = consumed.iter().cloned().collect();
    println!("consumed {} items", consumed.len());
    if consumed.len() != 6 || unique != expected {
        eprintln!("wrong: {consumed:?}");
        std::process::exit(1);
    }
    Ok(())
}
