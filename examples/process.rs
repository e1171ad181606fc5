//! The seed's `Process` example: `f('bob')` runs in a child process and prints `hello bob`;
//! the parent waits for it.
//!
//! ```text
//! cargo run -p shoal-examples --example process
//! ```
//!
//! Python:
//!
//! ```python
//! from multiprocessing import Process
//!
//! def f(name):
//!     print('hello', name)
//!
//! if __name__ == '__main__':
//!     p = Process(target=f, args=('bob',))
//!     p.start()
//!     p.join()
//! ```

use shoal::prelude::*;

#[shoal::remote]
fn f(name: String) {
    println!("hello {name}");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let p = Process::new(f, ("bob".to_string(),));
    p.start()?;
    p.join(None)?;
    if p.exitcode() != Some(0) {
        eprintln!("the child exited with {:?}", p.exitcode());
        std::process::exit(1);
    }
    Ok(())
}
