//! `make bench`, dispatch part: 100,000 queued messages through one SMPP bind with `window = 50`
//! to the loopback SMSC (tests/peers/smsc.js, quiet), beside a bare rusmppc client sending the
//! same messages with the same window to a fresh SMSC in the same run. Rates are measured at the
//! SMSC (submit_sm per second between its first and last 1,000-submit tick). The machine's speed
//! drifts within a minute, so the two run in turns, `SMSDROP_BENCH_ROUNDS` (3) times, and the
//! median of the rounds' ratios is the figure. Then the `tps` cap:
//! smsdrop with `tps = 1000` for a minute, the rate measured over that minute.
//! `SMSDROP_BENCH_MESSAGES` and `SMSDROP_BENCH_TPS_SECS` shrink it; `SMSDROP_BENCH_SMSC_LOG=1`
//! runs the SMSC with its per-message log (a slower SMSC) in the rate comparison;
//! `SMSDROP_BENCH_BARE_SINGLE=1` runs the bare client on a single-threaded runtime.

#[path = "../tests/common/mod.rs"]
mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Appliance, Smsc};
use futures_util::StreamExt;
use rusmpp::pdus::{BindTransceiver, DeliverSmResp, SubmitSm};
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{EsmClass, InterfaceVersion, Npi, RegisteredDelivery, ServiceType, Ton};
use rusmpp::{Command, Pdu};
use rusmppc::{ConnectionBuilder, Event};

const WINDOW: usize = 50;

fn number(i: usize) -> String {
    // 06 12 xx xx x0: valid French mobiles, never one of the SMSC's special endings (…040x)
    format!("0612{:06}", i * 10 % 1_000_000 + i / 100_000)
}

/// Submits per second at the SMSC between its first and last tick, once `n` were seen, and the
/// CPU milliseconds each of `pids` used per 1,000 of those submits (sampled at the first look that
/// saw a tick and at the last look). The log is looked at twice a second, and only its tick lines
/// are parsed: on two cores, a harness that re-read a growing log every few milliseconds would
/// take CPU from the peers it measures.
fn smsc_rate(smsc: &Smsc, n: usize, timeout: Duration, pids: &[u32]) -> (f64, Vec<f64>) {
    let deadline = Instant::now() + timeout;
    let mut start: Option<(f64, Vec<f64>)> = None;
    let ticks = loop {
        let ticks = ticks(smsc);
        if start.is_none() && !ticks.is_empty() {
            start = Some((
                ticks[ticks.len() - 1].0,
                pids.iter().map(|p| common::cpu_secs(*p)).collect(),
            ));
        }
        if ticks.len() >= n / 1000 {
            break ticks;
        }
        assert!(
            Instant::now() < deadline,
            "the SMSC saw {} of {n} submit_sm",
            ticks.len() * 1000
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let cpu_end: Vec<f64> = pids.iter().map(|p| common::cpu_secs(*p)).collect();
    let (first, last) = (ticks[0], ticks[ticks.len() - 1]);
    let (from, cpu_start) = start.unwrap_or((first.0, cpu_end.clone()));
    let counted = (last.0 - from).max(1.0);
    let cpu = cpu_start
        .iter()
        .zip(&cpu_end)
        .map(|(a, b)| (b - a) * 1_000_000.0 / counted)
        .collect();
    ((last.0 - first.0).max(1.0) * 1000.0 / (last.1 - first.1).max(1.0), cpu)
}

/// The SMSC's ticks: (submits so far, its clock in ms).
fn ticks(smsc: &Smsc) -> Vec<(f64, f64)> {
    let log = std::fs::read_to_string(smsc.log_file()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("\"tick\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|e| (e["n"].as_f64().unwrap_or(0.0), e["t"].as_f64().unwrap_or(0.0)))
        .collect()
}

fn bare_client(port: u16, n: usize) {
    // SMSDROP_BENCH_BARE_SINGLE=1: the bare client on a single-threaded runtime, as smsdrop's
    // dispatcher runs (the default is tokio's usual multi-threaded one).
    let runtime = if std::env::var_os("SMSDROP_BENCH_BARE_SINGLE").is_some() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    }
    .expect("runtime");
    runtime.block_on(async {
        let (client, mut events) = ConnectionBuilder::new()
            .enable_auto_enquire_link_response()
            .disable_interface_version_check()
            .response_timeout(Duration::from_secs(30))
            .connect(format!("smpp://127.0.0.1:{port}"))
            .await
            .expect("connect");
        client
            .bind_transceiver(
                BindTransceiver::builder()
                    .system_id(COctetString::from_str("smsdrop").expect("id"))
                    .password(COctetString::from_str("secret").expect("pw"))
                    .interface_version(InterfaceVersion::Smpp3_4)
                    .build(),
            )
            .await
            .expect("bind");
        let rx = client.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let Event::Incoming(command) = event {
                    let command: Command = command;
                    if let Some(Pdu::DeliverSm(_)) = command.pdu() {
                        let _ = rx
                            .deliver_sm_resp(command.sequence_number(), DeliverSmResp::default())
                            .await;
                    }
                }
            }
        });
        let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let permit = window.clone().acquire_owned().await.expect("permit");
            let client = client.clone();
            let to = format!("33{}", &number(i)[1..]);
            tasks.push(tokio::spawn(async move {
                let pdu = SubmitSm::builder()
                    .service_type(ServiceType::default())
                    .source_addr_ton(Ton::Alphanumeric)
                    .source_addr_npi(Npi::Unknown)
                    .source_addr(COctetString::from_str("ACME").expect("from"))
                    .dest_addr_ton(Ton::International)
                    .dest_addr_npi(Npi::Isdn)
                    .destination_addr(COctetString::from_str(&to).expect("to"))
                    .esm_class(EsmClass::default())
                    .registered_delivery(RegisteredDelivery::from(1))
                    .short_message(OctetString::from_str(&format!("Bench message {i}")).expect("text"))
                    .build();
                let r = client.submit_sm(pdu).await;
                drop(permit);
                r.is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap_or(false) {
                ok += 1;
            }
        }
        assert_eq!(ok, n, "the bare client got every submit_sm answered");
        let _ = client.unbind().await;
        let _ = client.close().await;
    });
}

fn smsdrop_run(dir: &std::path::Path, n: usize, extra: &str, quiet: bool) -> (Smsc, Appliance) {
    let env: Vec<(&str, &str)> = if quiet { vec![("SMSC_QUIET", "1")] } else { vec![] };
    let smsc = Smsc::start(dir, &env);
    let mut app = Appliance::new(&format!(
        "{}\n[partner.smsc]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = {WINDOW}\n{extra}\n[[route]]\nprefix = \"+33\"\npartners = [\"smsc\"]\n",
        // the tenant as an operator would have it: delivery reports every 15 minutes (the
        // default), not every second as in the tests
        "\n[tenant.acme]\ndefault_region = \"FR\"\nsender = \"ACME\"\nsettle = \"200ms\"\nmax_lines = 2000000\n",
        smsc.port
    ));
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("secret");
    let mut csv = String::with_capacity(n * 40);
    csv.push_str("phone;message\n");
    for i in 0..n {
        csv.push_str(&format!("{};Bench message {i}\n", number(i)));
    }
    let staging = app.path("bench.csv");
    std::fs::write(&staging, csv).expect("batch");
    app.start();
    std::fs::rename(&staging, app.inbox("acme").join("bench.csv")).expect("drop");
    (smsc, app)
}

fn main() {
    let n: usize = std::env::var("SMSDROP_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tps_secs: u64 = std::env::var("SMSDROP_BENCH_TPS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().expect("dir");

    let rounds: usize = std::env::var("SMSDROP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let quiet = std::env::var_os("SMSDROP_BENCH_SMSC_LOG").is_none();
    println!(
        "dispatch benchmark: {n} messages, one bind, window {WINDOW}, loopback SMSC (npm smpp), rate at the SMSC; {rounds} rounds, each the bare client then smsdrop"
    );
    println!(
        "{:<8} {:>22} {:>22} {:>10}   CPU ms per 1,000 messages: bare client (SMSC) / smsdrop (SMSC)",
        "round", "bare rusmppc submit/s", "smsdrop submit/s", "ratio"
    );
    let mut results = Vec::with_capacity(rounds);
    let mut rss: f64 = 0.0;
    for round in 1..=rounds {
        let smsc = Smsc::start(dir.path(), if quiet { &[("SMSC_QUIET", "1")] } else { &[] });
        let port = smsc.port;
        let client = std::thread::spawn(move || bare_client(port, n));
        let (bare, bare_cpu) = smsc_rate(&smsc, n, Duration::from_secs(60), &[std::process::id(), smsc.pid()]);
        client.join().expect("bare client");
        drop(smsc);
        let (smsc, app) = smsdrop_run(dir.path(), n, "", quiet);
        let (ours, our_cpu) = smsc_rate(&smsc, n, Duration::from_secs(600), &[app.pid(), smsc.pid()]);
        rss = rss.max(common::peak_rss_kib(app.pid()) as f64 / 1024.0);
        drop(app);
        drop(smsc);
        println!(
            "{round:<8} {bare:>22.0} {ours:>22.0} {:>9.0}%   {:.0} ({:.0}) / {:.0} ({:.0})",
            ours * 100.0 / bare,
            bare_cpu[0],
            bare_cpu[1],
            our_cpu[0],
            our_cpu[1]
        );
        results.push((bare, ours));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratio = median(results.iter().map(|(b, o)| o / b).collect());
    println!(
        "{:<8} {:>22.0} {:>22.0} {:>9.0}%   (median of the rounds' ratios; target >= 90%)",
        "median",
        median(results.iter().map(|r| r.0).collect()),
        median(results.iter().map(|r| r.1).collect()),
        ratio * 100.0
    );
    println!("smsdrop serve peak RSS: {rss:.1} MiB");

    // The tps cap over a minute.
    let cap = 1000u64;
    let messages = (cap * (tps_secs + 5)) as usize;
    let (smsc, app) = smsdrop_run(dir.path(), messages, &format!("tps = {cap}\n"), true);
    let ticks = smsc.wait("tick", 1, Duration::from_secs(60));
    let t0 = ticks[0]["t"].as_f64().unwrap_or(0.0);
    let n0 = ticks[0]["n"].as_f64().unwrap_or(0.0);
    std::thread::sleep(Duration::from_secs(tps_secs));
    let ticks = smsc.of("tick");
    let last = &ticks[ticks.len() - 1];
    let rate = (last["n"].as_f64().unwrap_or(0.0) - n0) * 1000.0 / (last["t"].as_f64().unwrap_or(0.0) - t0).max(1.0);
    drop(app);
    println!(
        "tps cap {cap}/s over {tps_secs} s: measured {rate:.1}/s ({:+.2}% of the cap; target within 2%)",
        (rate - cap as f64) * 100.0 / cap as f64
    );
}
