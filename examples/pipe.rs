//! The seed's two-worker Pipe example: worker 1 sends a value, worker 2 multiplies it and
//! answers, both close their ends.
//!
//! ```text
//! cargo run -p shoal-examples --example pipe
//! ```
//! Worker 1 checks the answer; the example exits non-zero if a worker failed.

use shoal::prelude::*;

#[shoal::remote]
fn worker1(conn: Connection<String>, name: String, value: i64) {
    let msg = format!("Worker 1 ({name}) sends value {value}");
    conn.send(&msg).expect("send");
    println!("Worker 1 sent: {msg}");

    let response = conn.recv().expect("recv");
    println!("Worker 1 received: {response}");
    conn.close().expect("close");
    assert_eq!(response, "Worker 2 multiplied value by 5 and got 50");
}

#[shoal::remote]
fn worker2(conn: Connection<String>, multiplier: i64) {
    let msg = conn.recv().expect("recv");
    println!("Worker 2 received: {msg}");

    let value: i64 = msg
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .expect("a value");
    let response_value = value * multiplier;
    let response_msg =
        format!("Worker 2 multiplied value by {multiplier} and got {response_value}");

    conn.send(&response_msg).expect("send");
    println!("Worker 2 sent: {response_msg}");
    conn.close().expect("close");
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let (conn1, conn2) = Pipe::new(true)?;
    let p1 = Process::new(worker1, (conn1, "Alice".to_string(), 10i64));
    let p2 = Process::new(worker2, (conn2, 5i64));
    p1.start()?;
    p2.start()?;
    p1.join(None)?;
    p2.join(None)?;
    if p1.exitcode() != Some(0) || p2.exitcode() != Some(0) {
        std::process::exit(1);
    }
    Ok(())
}
