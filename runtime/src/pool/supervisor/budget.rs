//! The restart budget of a pool (OTP's intensity and period) and the back-off between restarts.
//!
//! A worker that fails while the pool runs (it exits non-zero, is killed, cannot start, or
//! loses its lease) is replaced. A failure is charged to the budget only while the pool makes
//! no progress: a chunk outcome from any worker (results, or a task error: user code ran to its
//! end) clears the count. So:
//!
//! * a map whose workers are killed at a steady rate completes: each chunk a dead worker held
//!   is redelivered under that chunk's own `retries`, and the results in between keep the budget
//!   clear;
//! * workers that never get anything done (a crashing initializer, a function that kills every
//!   worker running it, a binary that cannot start) use up `max_restarts` failures within
//!   `period` and break the pool, whose calls then fail with kind `Crashed`;
//! * so do workers that fail too slowly for the period (a pod that takes seconds to start, then
//!   its initializer crashes): while calls wait, the failures without progress of workers that
//!   lived less than [`SHORT_LIVED`] (or `period`, if longer) are also counted whatever their
//!   timing, and more than `max_restarts` of them break the pool. Otherwise failures spaced
//!   wider than `period / max_restarts` would restart workers forever while the calls hang. A
//!   worker that lived longer (evicted after hours beside a long call) is not counted so, and a
//!   failure while no call waits starts that count again: an idle pool is judged by the period
//!   only (nobody waits on it, and failures spread over days must not break it).
//!
//! Restarts after failures without progress back off: one per worker at once, then 10 ms,
//! 20 ms, ... up to [`MAX_BACKOFF`], so a pool that crashes in a loop does not spin.
//!
//! Workers whose program never ran (the backend could not start them: a pod the cluster refused
//! to create, an image that cannot be pulled) are charged as failures and also counted in a row:
//! when every worker slot has failed to start twice in a row, with no worker running anything in
//! between, the pool breaks ([`Verdict::GiveUp`]) however slowly those failures came (a refused
//! pod is only declared after `kubernetes.pod_create_grace_secs`, too slowly for the period).
//!
//! Workers that exit because Redis could not be reached are not charged at all (the store's
//! health decides the pool's fate); their restarts back off from 100 ms up to
//! [`MAX_STORE_BACKOFF`]. Unless the supervisor itself reaches Redis all along: workers told a
//! Redis address they cannot reach (on Kubernetes, a `kubernetes.redis_url_secret` naming an
//! address the pods cannot reach) would then be restarted forever while the calls hang, since
//! the supervisor's own health check never declares the store lost. So such exits are counted
//! in a row while no worker completes a chunk and the supervisor saw no outage during the
//! worker's life: more than [`CUT_OFF_EXITS_PER_WORKER`] per worker, over at least
//! [`CUT_OFF_TIMEOUTS`] response timeouts (`redis.response_timeout_secs`) since the first, break
//! the pool ([`RestartBudget::cut_off`]). A completed chunk, or an exit while the supervisor
//! too found Redis unreachable (a real outage, which its health check judges), starts the
//! count again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest pause before restarting a worker after failures without progress.
pub(super) const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause before restarting a worker that could not reach the store.
pub(super) const MAX_STORE_BACKOFF: Duration = Duration::from_secs(2);
/// Workers that could not reach Redis while the supervisor could, per worker, in a row without
/// a completed chunk: more break the pool (with [`CUT_OFF_TIMEOUTS`]; see the module docs).
pub(super) const CUT_OFF_EXITS_PER_WORKER: u32 = 2;
/// Response timeouts (`redis.response_timeout_secs`) the count of workers that could not reach
/// Redis must span before it breaks the pool: time enough for the supervisor's own health check
/// to see a real outage (see the module docs).
pub(super) const CUT_OFF_TIMEOUTS: u32 = 3;

/// What to do after a worker failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Start a replacement after this pause.
    Restart { after: Duration },
    /// The budget is spent: this many failures without progress within the period.
    GiveUp { failures: usize },
}

/// Failures charged since the pool last made progress.
#[derive(Debug)]
pub(super) struct RestartBudget {
    max_restarts: u32,
    period: Duration,
    /// Restarts that do not back off: one per worker.
    free: u32,
    failures: VecDeque<Instant>,
    /// Failures since the last progress (for the back-off; not bounded by the period).
    since_progress: u32,
    /// Failures since the last progress while calls waited, whatever their timing: more than
    /// `max_restarts` break the pool (see the module docs).
    waited: u32,
    /// Consecutive exits for an unreachable store.
    store_failures: u32,
    /// Exits for an unreachable store in a row while the supervisor reached it (see the module
    /// docs), and when the first of them came.
    cut_off: u32,
    cut_off_since: Option<Instant>,
    /// How long `cut_off` must span to break the pool.
    cut_off_after: Duration,
    /// Workers that never started, in a row (reset by progress or a worker that ran).
    never_started: u32,
}

impl RestartBudget {
    /// A budget of `max_restarts` failures within `period`, for a pool of `workers`.
    pub(super) fn new(max_restarts: u32, period: Duration, workers: usize) -> Self {
        RestartBudget {
            max_restarts,
            period,
            free: u32::try_from(workers).unwrap_or(u32::MAX),
            failures: VecDeque::new(),
            since_progress: 0,
            waited: 0,
            store_failures: 0,
            cut_off: 0,
            cut_off_since: None,
            cut_off_after: Duration::ZERO,
            never_started: 0,
        }
    }

    /// The same budget, whose count of workers that cannot reach the store must span
    /// [`CUT_OFF_TIMEOUTS`] times `response_timeout` to break the pool.
    pub(super) fn with_response_timeout(mut self, response_timeout: Duration) -> Self {
        self.cut_off_after = response_timeout.saturating_mul(CUT_OFF_TIMEOUTS);
        self
    }

    /// A worker delivered a chunk's outcome: failures so far are forgiven.
    pub(super) fn progress(&mut self) {
        self.failures.clear();
        self.since_progress = 0;
        self.waited = 0;
        self.store_failures = 0;
        self.cut_off = 0;
        self.cut_off_since = None;
        self.never_started = 0;
    }

    /// A worker ran (it exited after starting, whatever its code): the backend can start
    /// workers.
    pub(super) fn started(&mut self) {
        self.never_started = 0;
    }

    /// Charges a worker that never started at `now` (`calls_waiting`: as in
    /// [`RestartBudget::failure`]): a failure, and one more in a row; gives up when every worker
    /// slot failed to start twice in a row.
    pub(super) fn never_started(&mut self, now: Instant, calls_waiting: bool) -> Verdict {
        self.never_started = self.never_started.saturating_add(1);
        let verdict = self.failure(now, calls_waiting, true);
        if self.never_started >= self.free.max(1).saturating_mul(2) {
            return Verdict::GiveUp {
                failures: self.never_started as usize,
            };
        }
        verdict
    }

    /// The number of failures charged now.
    #[cfg(test)]
    pub(super) fn charged(&self) -> usize {
        self.failures.len()
    }

    /// Charges a worker failure at `now`; `calls_waiting`: the pool has calls in progress, so
    /// the failure of a worker that failed `soon` (it lived less than the period) counts
    /// whatever its timing (see the module docs). A failure with no call waiting starts that
    /// count again.
    pub(super) fn failure(&mut self, now: Instant, calls_waiting: bool, soon: bool) -> Verdict {
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.period)
        {
            self.failures.pop_front();
        }
        if self.failures.len() > self.max_restarts as usize {
            return Verdict::GiveUp {
                failures: self.failures.len(),
            };
        }
        if !calls_waiting {
            self.waited = 0;
        } else if soon {
            self.waited = self.waited.saturating_add(1);
            if self.waited > self.max_restarts {
                return Verdict::GiveUp {
                    failures: self.waited as usize,
                };
            }
        }
        self.since_progress = self.since_progress.saturating_add(1);
        let after = match self.since_progress.checked_sub(self.free) {
            None | Some(0) => Duration::ZERO,
            Some(n) => backoff(Duration::from_millis(10), n - 1, MAX_BACKOFF),
        };
        Verdict::Restart { after }
    }

    /// Counts a worker that exited at `now` because it could not reach the store;
    /// `supervisor_reached`: the supervisor reached the store all through that worker's life.
    /// Gives the number in a row once more than [`CUT_OFF_EXITS_PER_WORKER`] per worker came
    /// over at least `cut_off_after`: the workers cannot reach the store although the supervisor
    /// can (see the module docs). An exit while the supervisor too found the store unreachable
    /// starts the count again (an outage: the store's health decides).
    pub(super) fn cut_off(&mut self, now: Instant, supervisor_reached: bool) -> Option<usize> {
        if !supervisor_reached {
            self.cut_off = 0;
            self.cut_off_since = None;
            return None;
        }
        self.cut_off = self.cut_off.saturating_add(1);
        let since = *self.cut_off_since.get_or_insert(now);
        let bound = self.free.max(1).saturating_mul(CUT_OFF_EXITS_PER_WORKER);
        (self.cut_off > bound && now.saturating_duration_since(since) >= self.cut_off_after)
            .then_some(self.cut_off as usize)
    }

    /// A worker exited because the store could not be reached: the pause before its
    /// replacement starts.
    pub(super) fn store_failure(&mut self) -> Duration {
        self.store_failures = self.store_failures.saturating_add(1);
        backoff(
            Duration::from_millis(100),
            self.store_failures - 1,
            MAX_STORE_BACKOFF,
        )
    }
}

/// `base × 2^doublings`, at most `max`.
fn backoff(base: Duration, doublings: u32, max: Duration) -> Duration {
    base.checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max)
}

/// A worker that failed sooner than this after its start (or than the restart period, if
/// longer) failed "soon": while calls wait, such failures count against the budget however far
/// apart they are. Long enough for a pod's start and an initializer; much shorter than the life
/// of a worker that ran and was then evicted.
pub(super) const SHORT_LIVED: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_that_lived_long_do_not_add_up_while_a_call_waits() {
        let mut budget = RestartBudget::new(2, Duration::from_secs(1), 1);
        let start = Instant::now();
        // Evictions hours apart beside one long call: never more than the period allows.
        for hour in 0..10u64 {
            let at = start + Duration::from_secs(3600 * hour);
            assert!(matches!(
                budget.failure(at, true, false),
                Verdict::Restart { .. }
            ));
        }
        // Short-lived ones, far apart, do add up while calls wait...
        for n in 0..2u64 {
            let at = start + Duration::from_secs(100_000 + 10 * n);
            assert!(matches!(
                budget.failure(at, true, true),
                Verdict::Restart { .. }
            ));
        }
        // ...unless a failure came while no call waited, which starts the count again.
        budget.failure(start + Duration::from_secs(200_000), false, true);
        let at = start + Duration::from_secs(300_000);
        assert!(matches!(
            budget.failure(at, true, true),
            Verdict::Restart { .. }
        ));
        let at = start + Duration::from_secs(300_010);
        assert!(matches!(
            budget.failure(at, true, true),
            Verdict::Restart { .. }
        ));
        let at = start + Duration::from_secs(300_020);
        assert_eq!(
            budget.failure(at, true, true),
            Verdict::GiveUp { failures: 3 }
        );
    }

    fn restart_after(v: Verdict) -> Duration {
        match v {
            Verdict::Restart { after } => after,
            Verdict::GiveUp { failures } => panic!("gave up after {failures}"),
        }
    }

    #[test]
    fn failures_with_progress_in_between_are_never_charged_for_long() {
        let mut budget = RestartBudget::new(3, Duration::from_secs(10), 2);
        let now = Instant::now();
        for i in 0..1000u64 {
            let at = now + Duration::from_millis(i);
            assert_eq!(
                restart_after(budget.failure(at, true, true)),
                Duration::ZERO
            );
            budget.progress();
        }
        assert_eq!(budget.charged(), 0);
    }

    #[test]
    fn failures_without_progress_back_off_then_give_up() {
        let mut budget = RestartBudget::new(6, Duration::from_secs(10), 2);
        let now = Instant::now();
        let pauses: Vec<Duration> = (0..6)
            .map(|_| restart_after(budget.failure(now, true, true)))
            .collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(pauses, [ms(0), ms(0), ms(10), ms(20), ms(40), ms(80)]);
        assert_eq!(
            budget.failure(now, true, true),
            Verdict::GiveUp { failures: 7 }
        );
    }

    #[test]
    fn back_off_is_capped() {
        let mut budget = RestartBudget::new(u32::MAX, Duration::from_secs(10), 1);
        let now = Instant::now();
        let last = (0..100)
            .map(|_| restart_after(budget.failure(now, true, true)))
            .last();
        assert_eq!(last, Some(MAX_BACKOFF));
    }

    #[test]
    fn only_failures_within_the_period_count() {
        let mut budget = RestartBudget::new(2, Duration::from_secs(1), 1);
        let now = Instant::now();
        restart_after(budget.failure(now, false, true));
        restart_after(budget.failure(now + Duration::from_millis(500), false, true));
        // The first one is older than the period when the third comes.
        restart_after(budget.failure(now + Duration::from_millis(1200), false, true));
        assert_eq!(budget.charged(), 2);
    }

    #[test]
    fn workers_that_never_start_break_the_pool_after_two_per_slot_however_slow() {
        let mut budget = RestartBudget::new(20, Duration::from_secs(10), 2);
        let start = Instant::now();
        let minutes = |m: u64| start + Duration::from_secs(60 * m);
        for m in 0..3 {
            restart_after(budget.never_started(minutes(m), false));
        }
        assert_eq!(
            budget.never_started(minutes(3), false),
            Verdict::GiveUp { failures: 4 }
        );
        // A worker that ran in between starts the count again; so does progress.
        let mut budget = RestartBudget::new(20, Duration::from_secs(10), 2);
        for m in 0..3 {
            restart_after(budget.never_started(minutes(m), false));
        }
        budget.started();
        for m in 3..6 {
            restart_after(budget.never_started(minutes(m), false));
        }
        budget.progress();
        for m in 6..9 {
            restart_after(budget.never_started(minutes(m), false));
        }
    }

    #[test]
    fn slow_failures_while_calls_wait_break_the_pool_after_max_restarts() {
        let mut budget = RestartBudget::new(3, Duration::from_secs(10), 2);
        let start = Instant::now();
        let minutes = |m: u64| start + Duration::from_secs(60 * m);
        // Far apart, so the period never holds two; and idle: never charged for good.
        for m in 0..10 {
            restart_after(budget.failure(minutes(m), false, true));
        }
        // While calls wait, the fourth without progress breaks the pool, however slow.
        for m in 10..13 {
            restart_after(budget.failure(minutes(m), true, true));
        }
        assert_eq!(
            budget.failure(minutes(13), true, true),
            Verdict::GiveUp { failures: 4 }
        );
        // Progress forgives them.
        let mut budget = RestartBudget::new(3, Duration::from_secs(10), 2);
        for m in 0..20 {
            restart_after(budget.failure(minutes(m), true, true));
            if m % 3 == 2 {
                budget.progress();
            }
        }
    }

    #[test]
    fn store_failures_back_off_separately_and_are_not_charged() {
        let mut budget = RestartBudget::new(1, Duration::from_secs(10), 1);
        let pauses: Vec<Duration> = (0..7).map(|_| budget.store_failure()).collect();
        assert_eq!(pauses[0], Duration::from_millis(100));
        assert_eq!(pauses[1], Duration::from_millis(200));
        assert_eq!(pauses[6], MAX_STORE_BACKOFF);
        assert_eq!(budget.charged(), 0);
        budget.progress();
        assert_eq!(budget.store_failure(), Duration::from_millis(100));
    }

    #[test]
    fn workers_that_cannot_reach_the_store_while_the_supervisor_can_break_the_pool() {
        let mut budget = RestartBudget::new(3, Duration::from_secs(10), 2)
            .with_response_timeout(Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // 2 × 2 workers may exit so, and more only once 3 response timeouts passed.
        for n in 0..6u64 {
            assert_eq!(budget.cut_off(at(100 * n), true), None);
        }
        assert_eq!(budget.cut_off(at(3000), true), Some(7));
        // A completed chunk starts the count again...
        budget.progress();
        for n in 0..5u64 {
            assert_eq!(budget.cut_off(at(4000 + 100 * n), true), None);
        }
        // ...and so does an exit during an outage the supervisor saw too.
        assert_eq!(budget.cut_off(at(9000), false), None);
        for n in 0..4u64 {
            assert_eq!(budget.cut_off(at(20_000 + 1000 * n), true), None);
        }
        assert_eq!(budget.cut_off(at(24_000), true), Some(5));
        // Such exits are never charged to the budget itself.
        assert_eq!(budget.charged(), 0);
    }
}
