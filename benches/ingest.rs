//! `make bench`: ingest of generated batches through the real binary, beside a bare CSV read of
//! the same file in the same run (the yardstick; this machine is noisy, ratios hold).
//!
//! Each size gets a fresh appliance; the time runs from the rename into the inbox to the result
//! file's appearance in the outbox (everything durable by then). Peak RSS is the `serve`
//! process's VmHWM. Sizes: `SMSDROP_BENCH_LINES` (comma-separated), default 100000,1000000.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Appliance, batches, peak_rss_kib};

fn bare_csv_read(path: &std::path::Path) -> (u64, Duration) {
    let start = Instant::now();
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b';')
        .flexible(true)
        .from_path(path)
        .expect("open");
    let mut record = csv::ByteRecord::new();
    let mut n = 0;
    while reader.read_byte_record(&mut record).expect("read") {
        n += 1;
    }
    (n, start.elapsed())
}

fn main() {
    let sizes: Vec<u64> = std::env::var("SMSDROP_BENCH_LINES")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("ingest benchmark: generated batches of valid French mobiles, 60-160 character texts, 5% invalid lines");
    println!(
        "{:>9} {:>9} {:>10} {:>12} {:>10} {:>12} {:>8}",
        "lines", "MiB", "ingest s", "lines/s", "peak MiB", "bare csv s", "ratio"
    );
    for lines in sizes {
        let tables = "\n[tenant.bench]\ndefault_region = \"FR\"\nsender = \"ACME\"\nsettle = \"0s\"\nmax_lines = 2000000\nmax_file_bytes = \"1 GiB\"\n";
        let mut app = Appliance::new(tables);
        let file = app.path("gen.csv");
        let valid = batches::write_batch(&file, lines, 20).expect("generate");
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let (read, bare) = bare_csv_read(&file);
        assert_eq!(read, lines);
        app.start();
        let inbox = app.inbox("bench");
        let result = app.outbox("bench").join("batch.result.csv");
        let start = Instant::now();
        std::fs::rename(&file, inbox.join("batch.csv")).expect("rename into inbox");
        while !result.exists() {
            std::thread::sleep(Duration::from_millis(2));
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "no result file; log:\n{}",
                app.log()
            );
        }
        let took = start.elapsed();
        let rss = peak_rss_kib(app.pid());
        let text = std::fs::read_to_string(&result).expect("read result");
        let queued = text.lines().filter(|l| l.contains(";queued;")).count() as u64;
        assert_eq!(queued, valid, "every valid line queued");
        app.stop();
        println!(
            "{:>9} {:>9.1} {:>10.3} {:>12.0} {:>10.1} {:>12.3} {:>7.1}x",
            lines,
            size as f64 / (1 << 20) as f64,
            took.as_secs_f64(),
            lines as f64 / took.as_secs_f64(),
            rss as f64 / 1024.0,
            bare.as_secs_f64(),
            took.as_secs_f64() / bare.as_secs_f64(),
        );
    }
    println!("targets: >= 200000 lines/s, peak RSS < 256 MiB, flat from 100k to 1M lines");
}
