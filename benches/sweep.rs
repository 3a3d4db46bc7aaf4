//! `make bench`: the retention sweeper deleting 1,000,000 expired messages while a 100,000-line
//! batch is ingested, beside the same ingest with nothing to sweep, in the same run and on the
//! same store (this machine is noisy: the ratio holds, absolute times do not).
//!
//! One appliance; tenant `old` (`delete_after = "1d"`) gets the expired messages as held
//! batches, canceled, so they are finished; tenant `live` takes the timed batches (held, so the
//! dispatcher stays out of it). The clock is moved two days on (`SMSDROP_CLOCK_FILE`) to make
//! `old` due. Ingest time: from the rename into the inbox to the result file. Sweep time: from
//! the clock move until `status` counts every expired message deleted. Sizes:
//! `SMSDROP_BENCH_EXPIRED` (default 1000000) and `SMSDROP_BENCH_INGEST` (default 100000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Appliance, batches};

/// Timed ingests alone before the sweep, during it (at most), and alone after it.
const ROUNDS: usize = 3;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A batch of `lines` valid lines, made unique by its last line (same content would be refused
/// as `duplicate_file`).
fn batch(path: &Path, lines: u64, tag: &str) -> u64 {
    let valid = batches::write_batch(path, lines - 1, 0).expect("generate");
    let mut f = std::fs::OpenOptions::new().append(true).open(path).expect("append");
    writeln!(f, "0699999999;batch {tag};r-{tag}").expect("tag line");
    valid + 1
}

fn status(app: &Appliance) -> String {
    let out = app.cli(&["status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Messages and batches the sweeper has deleted so far, as `status` counts them.
fn deleted(app: &Appliance) -> (u64, u64) {
    let s = status(app);
    let line = s.lines().find(|l| l.starts_with("retention:")).unwrap_or("");
    let num = |after: &str, before: &str| -> u64 {
        line.split_once(after)
            .and_then(|(_, rest)| rest.split_once(before))
            .and_then(|(n, _)| n.trim().parse().ok())
            .unwrap_or(0)
    };
    (num("was made ", " messages deleted"), num("deleted (", " batches)"))
}

fn store_line(app: &Appliance) -> String {
    status(app)
        .lines()
        .find(|l| l.starts_with("store:"))
        .unwrap_or("store: ?")
        .to_string()
}

fn db_mib(app: &Appliance) -> f64 {
    std::fs::metadata(app.state_dir().join("smsdrop.redb"))
        .map(|m| m.len())
        .unwrap_or(0) as f64
        / f64::from(1 << 20)
}

/// Drops a prepared file into a tenant's inbox and times it to its result file.
fn ingest(app: &Appliance, tenant: &str, staged: &Path, stem: &str) -> Duration {
    let result = app.outbox(tenant).join(format!("{stem}.result.csv"));
    let start = Instant::now();
    std::fs::rename(staged, app.inbox(tenant).join(format!("{stem}.csv"))).expect("drop");
    while !result.exists() {
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no result for {stem}:\n{}",
            app.log()
        );
    }
    start.elapsed()
}

fn main() {
    let expired = env("SMSDROP_BENCH_EXPIRED", 1_000_000);
    let lines = env("SMSDROP_BENCH_INGEST", 100_000);
    let limits = "hold_above = 1\nsettle = \"0s\"\nmax_lines = 2000000\nmax_file_bytes = \"1 GiB\"\n";
    let mut app = Appliance::new(&format!(
        "\n[tenant.old]\ndefault_region = \"FR\"\nsender = \"ACME\"\ndelete_after = \"1d\"\n{limits}\n[tenant.live]\ndefault_region = \"FR\"\nsender = \"ACME\"\n{limits}"
    ));
    let clock = app.path("clock");
    std::fs::write(&clock, "0").expect("clock");
    app.start_with_env(&[("SMSDROP_CLOCK_FILE", clock.to_str().expect("utf-8 path"))]);

    // The messages to expire: one batch, held, then canceled (finished without being sent).
    let old = app.path("old.csv");
    let queued = batch(&old, expired, "old");
    ingest(&app, "old", &old, "old");
    let out = app.cli(&["batch", "cancel", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Batches of the same size: one to warm up (a tenant's first batch is slower, its tables'
    // pages being new), then ROUNDS alone, ROUNDS while the sweeper deletes, ROUNDS alone again.
    let files: Vec<_> = (0..=3 * ROUNDS)
        .map(|i| {
            let p = app.path(&format!("live{i}.csv"));
            batch(&p, lines, &format!("live{i}"));
            p
        })
        .collect();
    let mut next = files.iter().enumerate();
    let mut timed = |app: &Appliance| -> Duration {
        let (i, path) = next.next().expect("a batch left");
        ingest(app, "live", path, &format!("live{i}"))
    };
    timed(&app);
    let alone_before: Vec<Duration> = (0..ROUNDS).map(|_| timed(&app)).collect();
    let size_before = db_mib(&app);
    let asked = Instant::now();
    let space_before = store_line(&app);
    let status_took = asked.elapsed();

    // Two days on: the old batch is due; the next ingests run while the sweeper deletes it
    // (only those that ended before the sweep did are counted).
    let moved = Instant::now();
    std::fs::write(&clock, (2 * 86_400).to_string()).expect("clock");
    while deleted(&app).0 == 0 {
        std::thread::sleep(Duration::from_millis(10));
        assert!(
            moved.elapsed() < Duration::from_secs(60),
            "the sweep did not start:\n{}",
            app.log()
        );
    }
    let started_after = moved.elapsed();
    let mut during = Vec::new();
    let mut deleted_when_ingest_done = 0;
    for _ in 0..ROUNDS {
        let took = timed(&app);
        let now_deleted = deleted(&app).0;
        if now_deleted >= queued {
            break; // the sweep ended during this one
        }
        during.push(took);
        deleted_when_ingest_done = now_deleted;
    }
    assert!(
        !during.is_empty(),
        "no ingest ended before the sweep did: make SMSDROP_BENCH_EXPIRED larger"
    );
    while deleted(&app) != (queued, 1) {
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            moved.elapsed() < Duration::from_secs(600),
            "the sweep did not finish:\n{}",
            app.log()
        );
    }
    let sweep = moved.elapsed();
    let alone_after: Vec<Duration> = (0..ROUNDS).map(|_| timed(&app)).collect();
    let size_after = db_mib(&app);
    let space_after = store_line(&app);
    app.stop();

    let mut alone_all: Vec<Duration> = alone_before.iter().chain(&alone_after).copied().collect();
    let alone = median(&mut alone_all);
    let during_n = during.len();
    let during = median(&mut during);
    let secs = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (alone_before, alone_after) = (secs(&alone_before), secs(&alone_after));
    println!("sweeper benchmark: {queued} expired messages deleted while {lines}-line batches are ingested");
    println!("{:<44} {:>10}", "", "seconds");
    println!(
        "{:<44} {:>10.3}   (median of {}: before {alone_before}, after {alone_after})",
        "ingest alone",
        alone.as_secs_f64(),
        2 * ROUNDS
    );
    println!(
        "{:<44} {:>10.3}   (median of {during_n}; {:+.1}% against alone; target < +20%)",
        "ingest while the sweeper deletes",
        during.as_secs_f64(),
        (during.as_secs_f64() / alone.as_secs_f64() - 1.0) * 100.0
    );
    println!(
        "{:<44} {:>10.3}   (first deletion seen after {:.3} s; {:.0} messages/s)",
        "sweep of every expired message",
        sweep.as_secs_f64(),
        started_after.as_secs_f64(),
        queued as f64 / sweep.as_secs_f64()
    );
    println!("messages deleted when the last ingest counted as during ended: {deleted_when_ingest_done} of {queued}");
    println!("store file before the sweep: {size_before:.1} MiB; after it and more batches: {size_after:.1} MiB");
    println!(
        "before: {space_before} (`smsdrop status` took {:.0} ms)",
        status_took.as_secs_f64() * 1000.0
    );
    println!("after:  {space_after}");
}
