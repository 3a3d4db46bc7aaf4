//! The torture suite, through the real binary and real (or deliberately hostile) peers: SIGKILLs
//! in the middle of ingest, dispatch and receipts; a disk that fills at random moments; an SMSC
//! on raw sockets that answers nonsense. After each run the promises are checked from outside:
//! every line answered exactly once, every acknowledged message sent at least once, duplicates
//! within the window per kill, no status the partner never gave, the audit chain intact, and no
//! number or text in clear under `state_dir` (ASCII, UCS-2 and GSM-packed forms).
//!
//! `make test` runs its short form; `make torture` sets `TORTURE_ROUNDS` (and `TORTURE_SEED` to
//! replay a run: each test prints the seed it used).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Appliance, Smsc, parse_csv, poll, tenant, wait_for};

fn rounds(short: u32) -> u32 {
    std::env::var("TORTURE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(short)
}

/// A small xorshift generator, seeded from `TORTURE_SEED` or the clock (printed).
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: TORTURE_SEED={seed}");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The text of message `i` of file `f`: long and unique, with an accent in every third one
/// (which makes it UCS-2 when it also has a character outside GSM).
fn text(f: u32, i: u32) -> String {
    match i % 3 {
        0 => format!("Torture file {f} message {i} plain words to find"),
        1 => format!("Torture é fichier {f} message {i} avec accents"),
        _ => format!("Пытка файл {f} сообщение {i} юникод"),
    }
}

/// A French mobile unique to file `f`, message `i` (never ending in the SMSC's 040x codes).
fn phone(f: u32, i: u32) -> String {
    format!("06{:02}{:06}", 10 + f, i * 10 + 7)
}

/// Writes file `f` with `valid` good lines and `junk` bad ones (a bad number) spread among them,
/// into the inbox under a hidden name, then lets it in.
fn drop_batch(app: &Appliance, f: u32, valid: u32, junk: u32) -> String {
    let name = format!("t{f}.csv");
    let mut csv = String::from("phone;message;ref\n");
    let step = ((valid + junk) / valid.max(1)).max(1);
    let mut v = 0;
    for line in 0..valid + junk {
        if v < valid && line % step == 0 {
            csv.push_str(&format!("{};{};r{v}\n", phone(f, v), text(f, v)));
            v += 1;
        } else {
            csv.push_str(&format!("12;bad line {line};j{line}\n"));
        }
    }
    assert_eq!(v, valid);
    let hidden = app.inbox("acme").join(format!(".{name}.tmp"));
    std::fs::create_dir_all(app.inbox("acme")).expect("inbox");
    std::fs::write(&hidden, csv).expect("write batch");
    std::fs::rename(&hidden, app.inbox("acme").join(&name)).expect("into the inbox");
    name
}

fn batch_listed(app: &Appliance, file: &str, state: &str) -> bool {
    let out = app.cli(&["batch", "list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(file) && l.contains(state))
}

fn spooled(app: &Appliance) -> usize {
    std::fs::read_dir(app.state_dir().join("spool").join("acme"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// GSM 03.38 septets packed 8 into 7 bytes, as they go on the air.
fn gsm_packed(text: &str) -> Option<Vec<u8>> {
    let septets = smsdrop::sms::gsm::to_gsm7(text)?;
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for s in septets {
        acc |= u32::from(s & 0x7f) << bits;
        bits += 7;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
    Some(out)
}

/// Every file under `dir`, except the tenants' own folders (their inboxes and reply files hold
/// numbers by design).
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.file_name().is_some_and(|n| n == "drop") {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// No number or text of `samples` is anywhere under `state_dir` (the store, the dispatch log,
/// the key store, the spool), in any of the forms it may take.
fn nothing_in_clear(app: &Appliance, samples: &[(String, String)]) {
    let mut files = Vec::new();
    files_under(&app.state_dir(), &mut files);
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for (phone, text) in samples {
        let national = phone.trim_start_matches('0').to_string();
        needles.push((format!("number {phone}"), format!("+33{national}").into_bytes()));
        needles.push((format!("number {phone}"), national.into_bytes()));
        needles.push((format!("text {text}"), text.as_bytes().to_vec()));
        let ucs2: Vec<u8> = text.encode_utf16().flat_map(|u| u.to_be_bytes()).collect();
        needles.push((format!("UCS-2 of {text}"), ucs2));
        if let Some(packed) = gsm_packed(text) {
            needles.push((format!("GSM-packed {text}"), packed));
        }
        if let Some(septets) = smsdrop::sms::gsm::to_gsm7(text) {
            needles.push((format!("GSM septets of {text}"), septets));
        }
    }
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_default();
        for (what, needle) in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{what} in clear in {}",
                file.display()
            );
        }
    }
    assert!(
        files.len() > 3,
        "looked at the store, the dispatch log and the keys: {files:?}"
    );
}

/// Receipts of file `f`'s messages the SMSC has had acknowledged (its messages go to
/// `336<10+f>…`).
fn file_acks(smsc: &Smsc, f: u32) -> usize {
    let prefix = format!("336{:02}", 10 + f);
    let ids: HashSet<String> = smsc
        .of("submit")
        .iter()
        .filter(|e| e["to"].as_str().is_some_and(|t| t.starts_with(&prefix)))
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    smsc.of("receipt_ack")
        .iter()
        .filter(|e| e["id"].as_str().is_some_and(|i| ids.contains(i)))
        .count()
}

/// The appliance with the loopback SMSC as partner `smsc` for French numbers.
fn with_smsc(smsc_port: u16, top: &str, extra: &str) -> Appliance {
    let app = Appliance::new_with(
        top,
        &format!(
            "{}\n[partner.smsc]\nkind = \"smpp\"\naddress = \"127.0.0.1:{smsc_port}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = 5\nenquire_link = \"5s\"\n{extra}\n\n[[route]]\nprefix = \"+33\"\npartners = [\"smsc\"]\n",
            tenant("acme", "max_lines = 300000")
        ),
    );
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    app
}

/// What happened to one file, checked from its reply files and the SMSC's log.
fn check_file(app: &Appliance, smsc: &Smsc, f: u32, valid: u32, lines: u32) {
    let rows = parse_csv(
        &app.wait_file(
            &app.outbox("acme").join(format!("t{f}.result.csv")),
            Duration::from_secs(60),
        ),
        b';',
    );
    assert_eq!(rows.len() as u32, lines + 1, "t{f}: one row per line");
    let numbered: HashSet<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(numbered.len() as u32, lines, "t{f}: every line answered exactly once");
    assert_eq!(
        rows[1..].iter().filter(|r| r[3] == "queued").count() as u32,
        valid,
        "t{f}: queued"
    );
    let report = app.final_report("acme", &format!("t{f}"), valid as usize);
    let submitted: HashSet<String> = smsc
        .of("submit")
        .iter()
        .filter_map(|e| e["to"].as_str().map(str::to_string))
        .collect();
    for r in &report[1..] {
        let to = r[2].trim_start_matches('+');
        assert!(submitted.contains(to), "t{f}: {} acknowledged and never sent", r[2]);
        assert_eq!(r[4], "delivered", "t{f}: the SMSC only ever said DELIVRD: {r:?}");
    }
}

#[test]
fn kills_in_the_middle_of_ingest_dispatch_and_receipts_keep_every_promise() {
    let mut rng = Rng::new("kills");
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[("SMSC_DELAY_MS", "4"), ("SMSC_RECEIPT_DELAY_MS", "1500")]);
    let mut app = with_smsc(smsc.port, "", "");
    app.start();
    let mut files: Vec<(u32, u32, u32)> = Vec::new(); // (file, valid, lines)
    let mut kills = 0u64;
    let mut landed: HashMap<&str, u32> = HashMap::new();
    let phases = ["ingest", "dispatch", "receipts"];
    let total = rounds(1) * 3;
    for k in 0..total {
        let f = k;
        let phase = phases[(k % 3) as usize];
        match phase {
            "ingest" => {
                // 200,000 lines, 500 of them good: about a second of ingest, little to send.
                let name = drop_batch(&app, f, 500, 199_500);
                files.push((f, 500, 200_000));
                wait_for("the batch being ingested", Duration::from_secs(30), || {
                    batch_listed(&app, &name, "ingesting")
                });
                std::thread::sleep(Duration::from_millis(rng.below(100)));
                app.kill();
                assert!(
                    !app.outbox("acme").join(format!("t{f}.result.csv")).exists() && spooled(&app) == 1,
                    "round {k}: the kill did not land mid-ingest"
                );
            }
            "dispatch" => {
                let before = smsc.of("submit").len();
                let valid = 2_000;
                drop_batch(&app, f, valid, 0);
                files.push((f, valid, valid));
                app.wait_file(
                    &app.outbox("acme").join(format!("t{f}.result.csv")),
                    Duration::from_secs(30),
                );
                let at = before + 50 + rng.below(500) as usize;
                smsc.wait("submit", at, Duration::from_secs(60));
                app.kill();
                let sent = smsc.of("submit").len() - before;
                assert!(
                    sent < valid as usize,
                    "round {k}: the kill did not land mid-dispatch ({sent} of {valid})"
                );
            }
            _ => {
                let before = smsc.of("submit").len();
                // 2,000 messages: their receipts spread over about two seconds.
                let valid = 2_000;
                drop_batch(&app, f, valid, 0);
                files.push((f, valid, valid));
                // Every message handed over; receipts come 1.5 s after each response. Only
                // this file's receipts count (an earlier file's may still be arriving).
                smsc.wait("submit", before + valid as usize, Duration::from_secs(60));
                let want = 1 + rng.below(20) as usize;
                wait_for("some of its receipts", Duration::from_secs(30), || {
                    file_acks(&smsc, f) >= want
                });
                app.kill();
                let acked = file_acks(&smsc, f);
                assert!(
                    acked < valid as usize,
                    "round {k}: the kill did not land among the receipts ({acked} of {valid})"
                );
            }
        }
        kills += 1;
        *landed.entry(phase).or_default() += 1;
        app.start();
    }
    for (f, valid, lines) in &files {
        check_file(&app, &smsc, *f, *valid, *lines);
    }
    // Duplicates: at most the window (5) per kill.
    let mut per: HashMap<String, u32> = HashMap::new();
    for e in smsc.of("submit") {
        *per.entry(e["to"].as_str().unwrap_or("").to_string()).or_default() += 1;
    }
    let dups: u64 = per.values().map(|n| u64::from(n - 1)).sum();
    assert!(dups <= 5 * kills, "{dups} duplicates for {kills} kills");
    let out = app.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    app.stop();
    let samples: Vec<(String, String)> = files
        .iter()
        .flat_map(|(f, _, _)| (0..6).map(move |i| (phone(*f, i), text(*f, i))))
        .collect();
    nothing_in_clear(&app, &samples);
    eprintln!("kills: {kills} kills landed {landed:?}; {dups} duplicates; every promise held");
}

/// Fills the file system of `dir` with a file there, leaving about `leave` bytes free.
fn fill(dir: &Path, leave: u64) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join(format!("filler-{}", std::process::id()));
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 1 << 16];
    while smsdrop::disk::free_bytes(dir).expect("statvfs") > leave + (1 << 16) {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    filler
}

#[test]
fn a_disk_that_fills_at_random_moments_loses_nothing_acknowledged() {
    let mut rng = Rng::new("enospc");
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[("SMSC_RECEIPT_DELAY_MS", "50")]);
    // The guard off: writes really fail.
    let mut app = with_smsc(smsc.port, "min_free_space = 0", "");
    let state = app.state_dir();
    std::fs::create_dir_all(&state).expect("state");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m,mode=0700", "tmpfs"])
        .arg(&state)
        .status()
        .expect("mount");
    assert!(mount.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    app.start();
    let mut files = Vec::new();
    let mut faults = 0;
    for f in 0..rounds(2) {
        let valid = 1_000 + rng.below(4_000) as u32;
        // The file is written while there is room; the disk fills a random moment later.
        let name = drop_batch(&app, f, valid, 0);
        files.push((f, valid, valid));
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        let filler = fill(&state, rng.below(256 << 10));
        faults += 1;
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
        std::fs::remove_file(&filler).expect("space back");
        eprintln!("enospc round {f}: {name} ({valid} messages), disk full for a while");
    }
    for (f, valid, lines) in &files {
        check_file(&app, &smsc, *f, *valid, *lines);
    }
    let out = app.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = app.log();
    assert_eq!(log.matches("smsdrop is serving").count(), 1, "no restart was needed");
    let failed_writes = log.matches("No space left on device").count();
    assert!(
        failed_writes > 0,
        "the full disk made no write fail: the fault never landed"
    );
    eprintln!(
        "enospc: {faults} full-disk episodes, {failed_writes} writes failed; store reopened {} times; every promise held",
        log.matches("open again").count()
    );
}

/// The hostile SMSC of tests/peers/hostile_smsc.py in `mode`.
struct Hostile {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Hostile {
    /// Starts it on port 0; its `listening` event names the port it got.
    fn start(dir: &Path, mode: &str) -> Hostile {
        let log = dir.join(format!("hostile-{mode}.jsonl"));
        let child = std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/hostile_smsc.py"))
            .arg("0")
            .arg(&log)
            .arg(mode)
            .spawn()
            .expect("python3 hostile_smsc.py");
        let port = poll(
            Duration::from_secs(10),
            || common::listening_port(&log),
            || "the hostile SMSC did not start".into(),
        );
        Hostile { child, port, log }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        common::events_in(&self.log)
    }

    fn of(&self, ev: &str) -> usize {
        self.events().iter().filter(|e| e["ev"] == ev).count()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_hostile_smsc_on_raw_sockets_never_stops_the_service_nor_makes_a_status_up() {
    let modes = ["garbage", "bad_length", "unknown", "silent", "close_every", "orphans"];
    for mode in modes {
        let dir = tempfile::tempdir().expect("dir");
        let hostile = Hostile::start(dir.path(), mode);
        // The hostile SMSC first, the sink behind it.
        let mut app = Appliance::new(&format!(
            "{}\n[partner.hostile]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = 5\nenquire_link = \"5s\"\nresponse_timeout = \"2s\"\nreceipt_timeout = \"3s\"\nmax_latency = \"1s\"\nprobe_interval = \"5s\"\n\n[[route]]\nprefix = \"+33\"\npartners = [\"hostile\", \"sink\"]\n",
            tenant("acme", ""),
            hostile.port
        ));
        std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
        app.start();
        let valid = 200;
        drop_batch(&app, 1, valid, 0);
        // Every message ends: through the sink once the hostile partner is down, or `submitted`
        // on the hostile one (it answered, then never sent a receipt).
        let report_path = app.outbox("acme").join("t1.report.csv");
        let started = Instant::now();
        let rows = poll(
            Duration::from_secs(120),
            || {
                let rows = parse_csv(&std::fs::read(&report_path).ok()?, b';');
                let done = rows.len() == valid as usize + 1
                    && rows[1..]
                        .iter()
                        .all(|r| r[4] == "delivered" || r[4] == "submitted" || r[4] == "failed");
                done.then_some(rows)
            },
            || format!("{mode}: not every message ended; log:\n{}", app.log()),
        );
        for r in &rows[1..] {
            if r[4] == "delivered" {
                assert_eq!(r[5], "sink", "{mode}: a delivered the hostile SMSC never said: {r:?}");
            }
        }
        let sink: HashSet<String> = app
            .sink()
            .iter()
            .filter_map(|m| m["to"].as_str().map(str::to_string))
            .collect();
        assert!(
            rows[1..]
                .iter()
                .filter(|r| r[4] == "delivered")
                .all(|r| sink.contains(&r[2])),
            "{mode}: delivered rows went through the sink"
        );
        // Still serving, within bounds.
        let out = app.cli(&["status"]);
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        let rss = rss_kib(app.pid());
        assert!(rss < 300 << 10, "{mode}: RSS {rss} KiB");
        let log = app.log();
        assert!(
            log.len() < 2 << 20,
            "{mode}: {} bytes of log in {:?}",
            log.len(),
            started.elapsed()
        );
        assert!(!log.contains("panicked"), "{mode}: {log}");
        eprintln!(
            "hostile SMSC {mode}: {} connections, {} messages through the sink, {} left submitted, log {} KiB, RSS {} MiB",
            hostile.of("connection"),
            rows[1..].iter().filter(|r| r[5] == "sink").count(),
            rows[1..].iter().filter(|r| r[4] == "submitted").count(),
            log.len() >> 10,
            rss >> 10
        );
        app.stop();
    }
}

#[test]
fn a_hostile_smtp_server_gets_every_alert_once_in_the_end() {
    let dir = tempfile::tempdir().expect("dir");
    // Held: aiosmtpd's Controller binds it by number.
    let held = common::reserve();
    let port = held.port;
    let maildir = dir.path().join("maildir");
    let log = dir.path().join("smtp.jsonl");
    let mut smtp = std::process::Command::new(common::venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/hostile_smtp.py"))
        .arg(port.to_string())
        .arg(&maildir)
        .arg(&log)
        .spawn()
        .expect("hostile_smtp.py");
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let smtp = Stop(&mut smtp);
    let events = || common::events_in(&log);
    wait_for("the SMTP server", Duration::from_secs(20), || {
        events().iter().any(|e| e["ev"] == "listening")
    });
    let mut app = Appliance::new(&format!(
        "{}\n[email]\nsmtp_url = \"smtp://127.0.0.1:{port}\"\nfrom = \"smsdrop <smsdrop@example.net>\"\nadmin_to = [\"ops@example.net\"]\nmin_interval = \"5s\"\ntimeout = \"3s\"\n",
        tenant("acme", "alert_to = [\"erp@acme.example\"]")
    ));
    app.start();
    // A file rejected as a whole: one alert, one mail to the ERP and one to the admin.
    app.drop_file("acme", "broken.csv", b"x;y\n1;2\n");
    let stored = poll(
        Duration::from_secs(90),
        || {
            let ev = events();
            let stored: Vec<serde_json::Value> = ev.into_iter().filter(|e| e["ev"] == "stored").collect();
            (stored.len() >= 2).then_some(stored)
        },
        || {
            format!(
                "the mails never got through; server: {:?}\nlog:\n{}",
                events(),
                app.log()
            )
        },
    );
    // Nothing left queued: no mail can come again.
    app.mail_settled();
    let ev = events();
    let refused = ev.iter().filter(|e| e["ev"] == "rcpt_451").count();
    let dropped = ev.iter().filter(|e| e["ev"] == "dropped_in_data").count();
    assert!(refused >= 2 && dropped >= 1, "the server misbehaved as meant: {ev:?}");
    let all_stored = ev.iter().filter(|e| e["ev"] == "stored").count();
    assert_eq!(all_stored, 2, "each mail once: {ev:?}");
    let to: HashSet<String> = stored.iter().map(|e| e["to"].to_string()).collect();
    assert_eq!(to.len(), 2, "one for each recipient: {to:?}");
    let out = app.cli(&["status"]);
    assert!(out.status.success());
    drop(smtp);
    eprintln!(
        "hostile SMTP: {refused} RCPT refused with 451, {dropped} connections dropped in DATA; every alert delivered once"
    );
}

/// Files of a tenant's inbox whose name starts with `prefix`.
fn inbox_files(app: &Appliance, prefix: &str) -> Vec<String> {
    std::fs::read_dir(app.inbox("acme"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn kills_in_the_middle_of_an_upload_leave_nothing_half_taken() {
    let mut rng = Rng::new("upload");
    let mut d = common::door("", "", "max_lines = 2000000", "");
    d.app.start();
    for round in 0..rounds(1) {
        // About 40 MB: OpenSSH's sftp takes a while to push it through.
        let local = d.app.path(&format!("big{round}.csv"));
        let lines = common::batches::write_batch(&local, 300_000, 0).expect("batch");
        let mut client = common::sftp_command(d.port(), &d.key, "acme", Some(Path::new("-")), &[])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sftp");
        {
            use std::io::Write;
            let mut stdin = client.stdin.take().expect("stdin");
            writeln!(stdin, "put {} /inbox/big{round}.csv", local.display()).expect("command");
        }
        // Killed once part of the file is in the inbox's temporary, and before it is closed.
        let at = (1 << 20) + rng.below(8 << 20);
        wait_for("part of the upload", Duration::from_secs(60), || {
            inbox_files(&d.app, ".upload-").iter().any(|n| {
                std::fs::metadata(d.app.inbox("acme").join(n))
                    .map(|m| m.len() >= at)
                    .unwrap_or(false)
            })
        });
        d.app.kill();
        let status = client.wait().expect("sftp ends");
        assert!(
            !status.success(),
            "round {round}: the upload was acknowledged: the kill came too late"
        );
        assert!(
            !d.app.inbox("acme").join(format!("big{round}.csv")).exists(),
            "published half"
        );
        d.app.start();
        // The temporary left by the kill is gone; nothing was taken or answered.
        wait_for("the stale temporary removed", Duration::from_secs(10), || {
            inbox_files(&d.app, ".upload-").is_empty()
        });
        assert!(!d.app.outbox("acme").join(format!("big{round}.result.csv")).exists());
        // The ERP sends it again: taken whole, once.
        let out = common::sftp_batch(
            d.port(),
            &d.key,
            "acme",
            &format!("put {} /inbox/big{round}.csv\n", local.display()),
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows = parse_csv(
            &d.app.wait_file(
                &d.app.outbox("acme").join(format!("big{round}.result.csv")),
                Duration::from_secs(60),
            ),
            b';',
        );
        assert_eq!(rows.len() as u64, lines + 1, "every line once");
        // Answered: it is the marker. Had half the file been taken, it would be a batch too.
        let list = common::ok(d.app.cli(&["batch", "list"]));
        let batches = list
            .lines()
            .filter(|l| l.ends_with(&format!(" big{round}.csv")))
            .count();
        assert_eq!(batches, 1, "round {round}: one batch of big{round}.csv:\n{list}");
        eprintln!(
            "upload round {round}: killed after {} MiB of the upload; sent again, taken whole",
            at >> 20
        );
    }
}

#[test]
fn kills_in_the_middle_of_a_retention_sweep_delete_everything_in_the_end() {
    let dir = tempfile::tempdir().expect("dir");
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "0").expect("clock");
    let mut app = Appliance::new(&tenant(
        "acme",
        "delete_after = \"1d\"\nhold_above = 10\nmax_lines = 1000000\nmax_file_bytes = \"256 MiB\"",
    ));
    let env = [("SMSDROP_CLOCK_FILE", clock.to_str().expect("path"))];
    app.start_with_env(&env);
    let file = app.path("old.csv");
    // A million messages: the sweep takes seconds, the `status` that watches it milliseconds.
    let total = common::batches::write_batch(&file, 1_000_000, 0).expect("batch");
    std::fs::rename(&file, app.inbox("acme").join("old.csv")).expect("drop");
    app.wait_file(&app.outbox("acme").join("old.result.csv"), Duration::from_secs(60));
    let out = app.cli(&["batch", "cancel", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deleted = |app: &Appliance| -> u64 {
        let out = app.cli(&["status"]);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.lines()
            .find(|l| l.starts_with("retention:"))
            .and_then(|l| l.split_once("was made ").map(|(_, r)| r.to_string()))
            .and_then(|r| {
                r.split_once(" messages deleted")
                    .and_then(|(n, _)| n.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let mut kills = 0;
    for round in 0..rounds(1) {
        if round == 0 {
            std::fs::write(&clock, (2 * 86_400).to_string()).expect("two days on");
        }
        let before = deleted(&app);
        if before >= total {
            break;
        }
        // Looked at as often as `status` answers (tens of milliseconds); the sweep takes seconds.
        let since = Instant::now();
        let mut seen = Vec::new();
        loop {
            let now = deleted(&app);
            seen.push((since.elapsed().as_millis(), now));
            if now > before {
                break;
            }
            assert!(since.elapsed() < Duration::from_secs(60), "the sweep never started");
        }
        eprintln!(
            "retention round {round}: deleted counts seen {:?}",
            &seen[seen.len().saturating_sub(5)..]
        );
        app.kill();
        let at_kill = deleted(&app);
        if at_kill >= total {
            // Only a later round can find the sweep over: the first kill must land in it.
            assert!(
                round > 0,
                "round {round}: the sweep was over before the kill ({at_kill})"
            );
            app.start_with_env(&env);
            break;
        }
        kills += 1;
        eprintln!("retention round {round}: killed with {at_kill} of {total} deleted");
        app.start_with_env(&env);
    }
    poll(
        Duration::from_secs(120),
        || (deleted(&app) >= total).then_some(()),
        || {
            let out = app.cli(&["status"]);
            format!(
                "not every expired message deleted:\n{}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                app.log()
            )
        },
    );
    let out = app.cli(&["subject", "export", "--phone", "0612345678", "--tenant", "acme"]);
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&app.cli(&["batch", "list"]).stdout).into_owned();
    assert!(!list.contains("old.csv"), "the batch is gone: {list}");
    let out = app.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("retention: {kills} kills mid-sweep; all {total} messages deleted in the end");
}

#[test]
fn kills_in_the_middle_of_a_scheduled_backup_leave_no_broken_backup() {
    let mut app = Appliance::new_with(
        "",
        &format!(
            "{}\n[backup]\ndir = \"{{BACKUPS}}\"\nevery = \"1h\"\nkeep = 3\n",
            tenant("acme", "max_lines = 400000")
        ),
    );
    let backups = app.path("backups");
    let config = std::fs::read_to_string(&app.config).expect("config");
    std::fs::write(
        &app.config,
        config.replace("{BACKUPS}", backups.to_str().expect("path")),
    )
    .expect("config");
    std::fs::create_dir_all(&backups).expect("dir");
    app.start();
    // A store big enough that its snapshot takes a moment.
    let file = app.path("big.csv");
    common::batches::write_batch(&file, 300_000, 0).expect("batch");
    std::fs::rename(&file, app.inbox("acme").join("big.csv")).expect("drop");
    app.wait_file(&app.outbox("acme").join("big.result.csv"), Duration::from_secs(60));
    app.stop();
    // No backup yet: the scheduler takes one at start; killed while it is being written.
    for e in std::fs::read_dir(&backups).expect("dir").flatten() {
        std::fs::remove_file(e.path()).expect("rm");
    }
    app.start();
    let partial = || {
        std::fs::read_dir(&backups)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".backup.partial"))
    };
    wait_for("a backup being written", Duration::from_secs(30), partial);
    app.kill();
    let finished: Vec<_> = std::fs::read_dir(&backups)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".backup"))
        .collect();
    assert!(finished.is_empty() && partial(), "the kill did not land mid-backup");
    app.start();
    // The partial is removed and a whole backup is taken; it restores.
    let whole = poll(
        Duration::from_secs(60),
        || {
            let names: Vec<std::path::PathBuf> =
                std::fs::read_dir(&backups).ok()?.flatten().map(|e| e.path()).collect();
            let done: Vec<_> = names
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(".backup"))
                .cloned()
                .collect();
            (!done.is_empty() && !partial()).then(|| done[0].clone())
        },
        || "no whole backup after the restart".into(),
    );
    app.stop();
    let twin = app.twin(&tenant("acme", "max_lines = 400000"));
    let out = twin.cli(&["restore", whole.to_str().expect("path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("backup: killed mid-backup; the partial was removed and the next backup restores");
}
