//! The seed's bank balance: a `Value('i', 100)` and a `Lock`; one process withdraws 1 and one
//! deposits 1, 10000 times each, under the lock; the balance ends at exactly 100, for each of
//! 10 transactions.
//!
//! ```text
//! cargo run --release -p shoal-examples --example counter [ITERATIONS] [TRANSACTIONS]
//! ```
//! Defaults are the seed's (10000, 10). Exits non-zero if a final balance is not 100.

use shoal::prelude::*;

#[shoal::remote]
fn withdraw(balance: Value<i32>, lock: Lock, iterations: u32) {
    for _ in 0..iterations {
        lock.acquire().expect("acquire");
        balance.set(balance.get().expect("get") - 1).expect("set");
        lock.release().expect("release");
    }
}

#[shoal::remote]
fn deposit(balance: Value<i32>, lock: Lock, iterations: u32) {
    for _ in 0..iterations {
        lock.acquire().expect("acquire");
        balance.set(balance.get().expect("get") + 1).expect("set");
        lock.release().expect("release");
    }
}

fn perform_transactions(iterations: u32) -> shoal::Result<i32> {
    // initial balance (in shared memory)
    let balance = Value::new(100i32)?;
    // creating a lock object
    let lock = Lock::new()?;
    // creating new processes
    let p1 = Process::new(withdraw, (balance.clone(), lock.clone(), iterations));
    let p2 = Process::new(deposit, (balance.clone(), lock, iterations));
    p1.start()?;
    p2.start()?;
    p1.join(None)?;
    p2.join(None)?;
    let final_balance = balance.get()?;
    println!("Final balance = {final_balance}");
    Ok(final_balance)
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let mut args = std::env::args().skip(1);
    let iterations: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let transactions: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let mut ok = true;
    for _ in 0..transactions {
        ok &= perform_transactions(iterations)? == 100;
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
