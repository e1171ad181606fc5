//! A program whose `main` is `#[shoal::main] #[tokio::main]` with a side effect before
//! `shoal::init()`: the side effect must happen in the parent only, never in its worker.

use shoal::prelude::*;

#[shoal::remote]
fn child_says_hi() {
    println!("the child runs");
}

#[shoal::main]
#[tokio::main(flavor = "current_thread")]
async fn main() -> shoal::Result<()> {
    println!("main body in pid {}", std::process::id());
    let _rt = shoal::init()?;
    let p = Process::new(child_says_hi, ());
    p.start()?;
    p.join_async().await?;
    println!("exitcode={}", p.exitcode().unwrap_or(i32::MIN));
    Ok(())
}
