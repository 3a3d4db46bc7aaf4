//! Background work that runs beside the pipeline for the daemon's whole life, and the one small
//! abstraction every such job runs under (after garage's `util/background/worker.rs`).
//!
//! A [`Worker`] does rounds: [`Worker::work`] does one and says when the next is due ([`Next`]).
//! [`spawn`] runs it: it keeps the worker's [`State`], its round and error counts and its last
//! error in the [`Workers`] board (shown by `smsdrop status` and `/metrics`), waits after a
//! failed round with a capped back-off, and at shutdown lets the round under way finish within
//! [`DEADLINE`].
//!
//! The workers:
//! - [`ingest`]: claimed files into the store, one at a time (on a blocking thread of its own,
//!   not under [`spawn`]: a batch is one long blocking task);
//! - [`disk`]: the disk watch (free space under `state_dir`, the store's healing);
//! - [`sweep`]: retention (`anonymize_after`, `delete_after`);
//! - [`reseal`]: re-sealing after `key rotate`;
//! - [`backup`]: scheduled backups (`[backup]`);
//! - [`mail`]: the mailer (digests, due mails) and the daily report.
//!
//! The sweeper and the re-sealer go through the store in small steps and give way to ingest the
//! same way: [`Pace`].

pub mod backup;
pub mod disk;
pub mod ingest;
pub mod mail;
pub mod reseal;
pub mod sweep;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the round under way gets to finish once shutdown begins.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// The wait after a first failed round; it doubles with each failure in a row, up to
/// [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(2);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// When a worker's next round is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// More is due: again after this short pause.
    Busy(Duration),
    /// Nothing more for now: again after this wait, or sooner when woken ([`Worker::woken_by`]).
    Idle(Duration),
    /// Never again (the worker cannot work with this configuration, and said why).
    Done,
}

/// A failed round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub error: String,
    /// The worker's own wait before the next round; the capped back-off when `None`.
    pub retry_in: Option<Duration>,
}

impl Failed {
    pub fn new(error: impl ToString) -> Failed {
        Failed {
            error: error.to_string(),
            retry_in: None,
        }
    }
}

/// One background job.
pub trait Worker: Send + 'static {
    /// Its name in logs, `status` and `/metrics`.
    fn name(&self) -> &'static str;
    /// Does one round.
    fn work(&mut self) -> impl Future<Output = Result<Next, Failed>> + Send;
    /// Something that wakes an idle worker before its wait is over.
    fn woken_by(&self) -> Option<Arc<Notify>> {
        None
    }
}

crate::sms::codes::wire_enum!(
    /// Where a worker stands.
    State {
        Working => "working",
        Idle => "idle",
        BackingOff => "backing-off",
        Done => "done",
        Stopped => "stopped",
    }
);

/// A worker as the board shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Rounds done since start (failed ones included).
    pub rounds: u64,
    /// Failed rounds since start.
    pub errors: u64,
    /// Failed rounds in a row (0 once a round works again).
    pub failing: u32,
    /// The last failure: when (unix seconds) and why.
    pub last_error: Option<(i64, String)>,
}

/// Every worker's [`Status`], by name.
#[derive(Debug, Clone, Default)]
pub struct Workers(Arc<Mutex<BTreeMap<&'static str, Status>>>);

impl Workers {
    /// A copy of the board.
    pub fn snapshot(&self) -> BTreeMap<&'static str, Status> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One round of a part that runs its own loop (the inbox watcher's rescans), counted like a
    /// worker's: it stays `idle` between rounds; a failed one is an error with its reason.
    pub fn record(&self, name: &'static str, round: Result<(), String>) {
        self.update(name, |s| {
            s.rounds += 1;
            match round {
                Ok(()) => s.failing = 0,
                Err(why) => {
                    s.errors += 1;
                    s.failing = s.failing.saturating_add(1);
                    s.last_error = Some((crate::clock::now(), why));
                }
            }
        });
    }

    fn update(&self, name: &'static str, f: impl FnOnce(&mut Status)) {
        let mut board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let status = board.entry(name).or_insert(Status {
            state: State::Idle,
            rounds: 0,
            errors: 0,
            failing: 0,
            last_error: None,
        });
        f(status);
    }
}

/// The wait after `failing` failed rounds in a row.
pub fn backoff(failing: u32) -> Duration {
    let doublings = failing.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

/// Runs `worker` on `tracker` until `stop`, keeping its line of `board` up to date.
pub fn spawn<W: Worker>(tracker: &TaskTracker, board: &Workers, worker: W, stop: CancellationToken) {
    let board = board.clone();
    board.update(worker.name(), |_| {});
    tracker.spawn(run(worker, board, stop));
}

async fn run<W: Worker>(mut worker: W, board: Workers, stop: CancellationToken) {
    let name = worker.name();
    let woken = worker.woken_by();
    loop {
        board.update(name, |s| s.state = State::Working);
        let result = {
            let round = worker.work();
            tokio::pin!(round);
            tokio::select! {
                r = &mut round => r,
                _ = stop.cancelled() => match tokio::time::timeout(DEADLINE, &mut round).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(worker = name, "a round did not finish within the shutdown deadline; what it had not committed is redone at next start");
                        board.update(name, |s| s.state = State::Stopped);
                        return;
                    }
                },
            }
        };
        let wait = match result {
            Ok(next) => {
                board.update(name, |s| {
                    s.rounds += 1;
                    s.failing = 0;
                    s.state = if next == Next::Done { State::Done } else { State::Idle };
                });
                match next {
                    Next::Busy(pause) | Next::Idle(pause) => pause,
                    Next::Done => return,
                }
            }
            Err(failed) => {
                let mut failing = 0;
                board.update(name, |s| {
                    s.rounds += 1;
                    s.errors += 1;
                    s.failing = s.failing.saturating_add(1);
                    s.last_error = Some((crate::clock::now(), failed.error.clone()));
                    s.state = State::BackingOff;
                    failing = s.failing;
                });
                let wait = failed.retry_in.unwrap_or_else(|| backoff(failing));
                tracing::error!(worker = name, error = %failed.error, failing, retry_in_s = wait.as_secs(), "background round failed");
                wait
            }
        };
        let wake = async {
            match &woken {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            _ = wake => {}
        }
    }
    board.update(name, |s| s.state = State::Stopped);
}

/// After how many steps more may be due: while a batch is being ingested a stepping worker takes
/// one step per round, [`Pace::YIELD`] apart (still some 20,000 messages a second for the
/// sweeper, so a steady stream of batches cannot stop it); otherwise `budget` steps, rounds
/// [`Pace::PAUSE`] apart while more is due, `every` apart once nothing is.
pub struct Pace {
    pub every: Duration,
    pub budget: u64,
    /// Set while a batch is being ingested.
    pub ingesting: Arc<AtomicBool>,
}

impl Pace {
    pub const PAUSE: Duration = Duration::from_millis(20);
    pub const YIELD: Duration = Duration::from_millis(200);

    /// The steps this round may take.
    pub fn budget(&self) -> u64 {
        if self.ingesting() { 1 } else { self.budget }
    }

    /// Whether a batch is being ingested (the store's step loops stop early when it is).
    pub fn ingesting(&self) -> bool {
        self.ingesting.load(Ordering::Relaxed)
    }

    /// [`Pace::ingesting`] for the store's step loops, which run on a blocking thread.
    pub fn give_way(&self) -> impl Fn() -> bool + Send + 'static {
        let ingesting = self.ingesting.clone();
        move || ingesting.load(Ordering::Relaxed)
    }

    /// The next round after one that took `steps` of `budget`: soon while more may be due (it
    /// used its budget, or ingest cut it short), at `every` once nothing is.
    pub fn next(&self, steps: u64, budget: u64) -> Next {
        let busy = self.ingesting();
        if steps >= budget || (steps > 0 && busy) {
            Next::Busy(if busy { Self::YIELD } else { Self::PAUSE })
        } else {
            Next::Idle(self.every)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_two_seconds_to_five_minutes() {
        let waits: Vec<u64> = (1..=10).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    /// Fails `fails` rounds, then works; records when each round ran.
    struct Flaky {
        fails: u32,
        rounds: Arc<Mutex<Vec<tokio::time::Instant>>>,
    }

    impl Worker for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn work(&mut self) -> Result<Next, Failed> {
            self.rounds.lock().expect("lock").push(tokio::time::Instant::now());
            if self.fails > 0 {
                self.fails -= 1;
                return Err(Failed::new("disk on fire"));
            }
            Ok(Next::Idle(Duration::from_secs(3600)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_rounds_back_off_are_counted_and_clear_when_one_works() {
        let (tracker, board, stop) = (TaskTracker::new(), Workers::default(), CancellationToken::new());
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let start = tokio::time::Instant::now();
        spawn(
            &tracker,
            &board,
            Flaky {
                fails: 3,
                rounds: rounds.clone(),
            },
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = board.snapshot()["flaky"].clone();
        assert_eq!((status.state, status.errors, status.failing), (State::BackingOff, 1, 1));
        assert_eq!(status.last_error.map(|e| e.1).as_deref(), Some("disk on fire"));

        tokio::time::sleep(Duration::from_secs(60)).await;
        let at: Vec<u64> = rounds
            .lock()
            .expect("lock")
            .iter()
            .map(|t| (*t - start).as_secs())
            .collect();
        assert_eq!(at, [0, 2, 6, 14], "back-offs of 2, 4 and 8 s, then a round that works");
        let status = board.snapshot()["flaky"].clone();
        assert_eq!(
            (status.state, status.rounds, status.errors, status.failing),
            (State::Idle, 4, 3, 0)
        );

        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(board.snapshot()["flaky"].state, State::Stopped);
    }

    /// A round that takes `takes`; at shutdown it is waited for up to the deadline.
    struct Slow {
        takes: Duration,
        finished: Arc<AtomicBool>,
    }

    impl Worker for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        async fn work(&mut self) -> Result<Next, Failed> {
            tokio::time::sleep(self.takes).await;
            self.finished.store(true, Ordering::Relaxed);
            Ok(Next::Idle(Duration::from_secs(3600)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_a_round_under_way_finishes_within_the_deadline_or_is_left() {
        for (takes, finishes) in [(DEADLINE / 2, true), (DEADLINE * 2, false)] {
            let (tracker, board, stop) = (TaskTracker::new(), Workers::default(), CancellationToken::new());
            let finished = Arc::new(AtomicBool::new(false));
            spawn(
                &tracker,
                &board,
                Slow {
                    takes,
                    finished: finished.clone(),
                },
                stop.clone(),
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(board.snapshot()["slow"].state, State::Working);
            stop.cancel();
            tracker.close();
            tracker.wait().await;
            assert_eq!(finished.load(Ordering::Relaxed), finishes, "a round of {takes:?}");
            assert_eq!(board.snapshot()["slow"].state, State::Stopped);
        }
    }

    #[test]
    fn a_stepping_worker_gives_way_to_ingest() {
        let ingesting = Arc::new(AtomicBool::new(false));
        let pace = Pace {
            every: Duration::from_secs(2),
            budget: 64,
            ingesting: ingesting.clone(),
        };
        assert_eq!(pace.budget(), 64);
        assert_eq!(pace.next(64, 64), Next::Busy(Pace::PAUSE), "budget used: more is due");
        assert_eq!(pace.next(3, 64), Next::Idle(Duration::from_secs(2)), "nothing more");
        ingesting.store(true, Ordering::Relaxed);
        assert_eq!(pace.budget(), 1);
        assert_eq!(pace.next(1, 1), Next::Busy(Pace::YIELD));
        assert_eq!(pace.next(3, 64), Next::Busy(Pace::YIELD), "cut short by ingest");
        assert_eq!(pace.next(0, 1), Next::Idle(Duration::from_secs(2)));
    }
}
