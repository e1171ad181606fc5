//! The seed's Value and Array example: two processes each add 1 to a shared integer (under its
//! lock) and to every element of a shared array; the result is 2 and [3, 4, 5, 6, 7].
//!
//! ```text
//! cargo run -p shoal-examples --example array
//! ```
//! The array loop holds the array's lock: element-wise `get`/`set` from two processes would race
//! (as the seed's `shared_arr[i] += 1` does in Python). Exits non-zero on a wrong result.

use shoal::prelude::*;

#[shoal::remote]
fn modify_shared_data(shared_val: Value<i32>, shared_arr: Array<i32>) {
    // Increment the shared value
    {
        let _guard = shared_val
            .get_lock()
            .expect("lock")
            .lock()
            .expect("acquire");
        shared_val
            .set(shared_val.get().expect("get") + 1)
            .expect("set");
    }
    // Increment each element of the shared array
    let _guard = shared_arr
        .get_lock()
        .expect("lock")
        .lock()
        .expect("acquire");
    for i in 0..shared_arr.len() {
        shared_arr
            .set(i, shared_arr.get(i).expect("get") + 1)
            .expect("set");
    }
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let shared_val = Value::new(0i32)?; // Value('i', 0)
    let shared_arr = Array::new(vec![1i32, 2, 3, 4, 5])?; // Array('i', [1, 2, 3, 4, 5])

    let p1 = Process::new(modify_shared_data, (shared_val.clone(), shared_arr.clone()));
    let p2 = Process::new(modify_shared_data, (shared_val.clone(), shared_arr.clone()));
    p1.start()?;
    p2.start()?;
    p1.join(None)?;
    p2.join(None)?;

    let value = shared_val.get()?;
    let array = shared_arr.to_vec()?;
    println!("Final Value: {value}");
    println!("Final Array: {array:?}");
    if value != 2 || array != vec![3, 4, 5, 6, 7] {
        std::process::exit(1);
    }
    Ok(())
}
