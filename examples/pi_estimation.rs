//! Monte Carlo estimate of π with a map over many tasks: each task throws `SAMPLES` darts at the
//! unit square with its own seed and counts those inside the quarter circle.
//!
//! ```text
//! cargo run --release -p shoal-examples --example pi_estimation
//! ```
//! Exits non-zero if the estimate is off by more than 0.01.

use std::time::Instant;

use shoal::prelude::*;

const TASKS: u64 = 400;
const SAMPLES: u64 = 250_000;

/// SplitMix64: a small, good generator, seeded per task.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Darts inside the quarter circle, out of `samples`.
#[shoal::remote]
fn throw_darts(seed: u64, samples: u64) -> u64 {
    let mut state = seed;
    let unit = |v: u64| (v >> 11) as f64 / (1u64 << 53) as f64;
    (0..samples)
        .filter(|_| {
            let (x, y) = (unit(next(&mut state)), unit(next(&mut state)));
            x * x + y * y <= 1.0
        })
        .count() as u64
}

fn main() -> shoal::Result<()> {
    let _rt = shoal::init()?;
    let pool = Pool::builder().build()?;
    let started = Instant::now();
    let hits: u64 = pool
        .starmap(
            throw_darts,
            (0..TASKS).map(|seed| (seed * 7919 + 1, SAMPLES)),
        )?
        .into_iter()
        .sum();
    let pi = 4.0 * hits as f64 / (TASKS * SAMPLES) as f64;
    println!(
        "pi ~ {pi:.6} from {} darts in {TASKS} tasks on {} workers ({:.2} s; error {:.6})",
        TASKS * SAMPLES,
        pool.processes(),
        started.elapsed().as_secs_f64(),
        (pi - std::f64::consts::PI).abs()
    );
    if (pi - std::f64::consts::PI).abs() > 0.01 {
        eprintln!("the estimate is off");
        std::process::exit(1);
    }
    Ok(())
}
