//! The seeds' Pool examples, line for line:
//!
//! * `map` over arrays with `Pool(3)`, normalising each (seed: Python multiprocessing);
//! * `starmap` of `f(a, b) = a + b` over `[(1, 1), (2, 2), (3, 3), (4, 4)]` with `Pool(4)`,
//!   which prints `[2, 4, 6, 8]`;
//! * `map_async(square, [1, 2, 3, 4, 5])` read with `get(timeout=...)` (seed: Lithops, whose
//!   3 s are 60 s here: on the Kubernetes backend each of the pool's workers is a pod, whose cold
//!   start alone can take longer than 3 s; locally the result comes in milliseconds either way);
//! * `Pool()`, `map`, `close`, `join` (seed: a multiprocessing tutorial).
//!
//! ```text
//! cargo run -p shoal-examples --example pool
//! ```
//! Exits non-zero if a result is wrong.

use std::time::Duration;

use shoal::prelude::*;

/// `arr / np.sqrt(np.sum(arr**2))`
#[shoal::remote]
fn normalize(arr: Vec<f64>) -> Vec<f64> {
    let norm = arr.iter().map(|x| x * x).sum::<f64>().sqrt();
    arr.iter().map(|x| x / norm).collect()
}

#[shoal::remote]
fn f(arg1: i64, arg2: i64) -> i64 {
    arg1 + arg2
}

#[shoal::remote]
fn square(x: i64) -> i64 {
    x * x
}

#[shoal::remote]
fn func(x: u64) -> u64 {
    x * 10
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let mut ok = true;

    // with Pool(3) as p: results = p.map(f, arrays)
    let arrays = vec![
        vec![1.0, 2.0, 3.0],
        vec![4.0, 5.0, 6.0],
        vec![7.0, 8.0, 9.0],
    ];
    let results = {
        let p = Pool::new(3)?;
        p.map(normalize, arrays.clone())?
    };
    println!("normalized: {results:.3?}");
    for (arr, unit) in arrays.iter().zip(&results) {
        let norm: f64 = unit.iter().map(|x| x * x).sum::<f64>().sqrt();
        ok &= (norm - 1.0).abs() < 1e-9 && (unit[0] * arr[1] - unit[1] * arr[0]).abs() < 1e-9;
    }

    // with Pool(4) as p: results = p.starmap(f, args)  # OUTPUT: [2, 4, 6, 8]
    let args = vec![(1, 1), (2, 2), (3, 3), (4, 4)];
    let results = {
        let p = Pool::new(4)?;
        p.starmap(f, args)?
    };
    println!("{results:?}");
    ok &= results == vec![2, 4, 6, 8];

    // with Pool() as pool:
    //     async_result = pool.map_async(square, [1, 2, 3, 4, 5])
    //     try: print(async_result.get(timeout=60))  # the seed's 3 s: see the module docs
    //     except TimeoutError: print("Timed out!")
    {
        let pool = Pool::builder().build()?;
        let async_result = pool.map_async(square, vec![1, 2, 3, 4, 5])?;
        match async_result.get(Some(Duration::from_secs(60))) {
            Ok(result) => {
                println!("{result:?}");
                ok &= result == vec![1, 4, 9, 16, 25];
            }
            Err(Error::Timeout(_)) => {
                println!("Timed out!");
                ok = false;
            }
            Err(e) => return Err(e),
        }
    }

    // p = Pool(); result = p.map(func, col); p.close(); p.join()
    let col: Vec<u64> = (0..10).collect();
    let p = Pool::builder().build()?;
    let result = p.map(func, col.clone())?;
    p.close()?;
    p.join()?;
    println!("{result:?}");
    ok &= result == col.iter().map(|x| x * 10).collect::<Vec<_>>();

    if !ok {
        eprintln!("a pool result was wrong");
        std::process::exit(1);
    }
    Ok(())
}
