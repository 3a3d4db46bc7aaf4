//! Crashes, stops and commands, through the real binary: nothing acknowledged is lost, nothing is
//! answered or sent twice, and the CLI works with and without a running `serve`.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Appliance, batches, parse_csv, tenant, wait_log};

/// Waits until `batch list` shows the batch of `file` being ingested (a 300,000-line batch takes
/// about a second, a `batch list` a few milliseconds).
fn wait_ingesting(app: &Appliance, file: &str) {
    common::wait_for(&format!("{file} being ingested"), Duration::from_secs(30), || {
        let out = app.cli(&["batch", "list"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(file) && l.contains("ingesting"))
    });
}

/// Files waiting in a tenant's spool.
fn spooled(app: &Appliance, tenant: &str) -> usize {
    std::fs::read_dir(app.state_dir().join("spool").join(tenant))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn message_ids(sent: &[serde_json::Value]) -> Vec<String> {
    sent.iter()
        .map(|v| v["message_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn sigkill_during_a_large_ingest_answers_every_line_once() {
    let mut app = Appliance::new(&tenant("acme", ""));
    let lines = 300_000;
    let staging = app.path("big.csv");
    let valid = batches::write_batch(&staging, lines, 20).expect("generate") as usize;
    app.start();
    std::fs::rename(&staging, app.inbox("acme").join("big.csv")).expect("drop");
    wait_ingesting(&app, "big.csv");
    app.kill();
    // The kill landed mid-ingest: the file is still in the spool and was never answered.
    assert!(
        !app.outbox("acme").join("big.result.csv").exists(),
        "the kill came after the batch was answered"
    );
    assert_eq!(spooled(&app, "acme"), 1, "the claimed file waits in the spool");

    app.start();
    let rows = app.result("acme", "big");
    assert_eq!(rows.len() as u64, lines + 1, "one row per line");
    let numbers: HashSet<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(numbers.len() as u64, lines, "every line answered exactly once");
    assert!((2..=lines + 1).all(|l| numbers.contains(l.to_string().as_str())));
    assert_eq!(rows[1..].iter().filter(|r| r[3] == "queued").count(), valid);
    assert!(
        app.log().contains("resuming files claimed before the last stop"),
        "the second start took the spool file:\n{}",
        app.log()
    );

    let sent = app.wait_sink(valid, Duration::from_secs(120));
    let ids: HashSet<String> = message_ids(&sent).into_iter().collect();
    assert_eq!(ids.len(), valid, "every accepted message sent");
    assert_eq!(
        sent.len(),
        valid,
        "nothing sent twice: the kill came before any dispatch"
    );
    let queued_ids: HashSet<String> = rows[1..]
        .iter()
        .filter(|r| r[3] == "queued")
        .map(|r| r[5].clone())
        .collect();
    assert_eq!(
        ids, queued_ids,
        "the sink got exactly the message ids of the result file"
    );
    let report = app.final_report("acme", "big", valid);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"));
}

#[test]
fn sigterm_during_dispatch_loses_nothing_and_sends_nothing_twice() {
    let mut app = Appliance::new(&tenant("acme", ""));
    let staging = app.path("run.csv");
    let valid = batches::write_batch(&staging, 200_000, 0).expect("generate") as usize;
    app.start();
    std::fs::rename(&staging, app.inbox("acme").join("run.csv")).expect("drop");
    app.result("acme", "run");
    let partial = app.wait_sink(1, Duration::from_secs(60)).len();
    let status = app.stop();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    let at_stop = app.sink().len();
    assert!(
        at_stop < valid,
        "the stop came mid-dispatch ({partial} then {at_stop} of {valid})"
    );
    assert!(app.log().contains("stopped"));

    app.start();
    // Every message final: the sink holds all it ever will.
    let report = app.final_report("acme", "run", valid);
    let sent_after = app.sink();
    let ids: HashSet<String> = message_ids(&sent_after).into_iter().collect();
    assert_eq!(ids.len(), valid, "every message sent");
    assert_eq!(sent_after.len(), valid, "none sent twice after a clean stop");
    assert!(report[1..].iter().all(|r| r[4] == "delivered" && r[5] == "sink"));
}

#[test]
fn sigkill_during_dispatch_resends_at_most_the_window() {
    let mut app = Appliance::new(&tenant("acme", ""));
    let staging = app.path("run.csv");
    let valid = batches::write_batch(&staging, 100_000, 0).expect("generate") as usize;
    app.start();
    std::fs::rename(&staging, app.inbox("acme").join("run.csv")).expect("drop");
    app.result("acme", "run");
    app.wait_sink(1, Duration::from_secs(60));
    app.kill();
    let at_kill = app.sink().len();
    assert!(
        at_kill < valid,
        "the kill landed mid-dispatch: {at_kill} of {valid} sent"
    );
    app.start();
    app.final_report("acme", "run", valid);
    let sent = app.sink();
    let ids: HashSet<String> = message_ids(&sent).into_iter().collect();
    assert_eq!(ids.len(), valid, "every message sent");
    assert!(
        sent.len() - valid <= 1024,
        "duplicates only within the sink's window (1,024): {}",
        sent.len() - valid
    );
}

#[test]
fn commands_work_with_and_without_serve() {
    let mut app = Appliance::new(&tenant("acme", ""));
    let file = app.path("check.csv");
    std::fs::write(&file, "phone;message;ref\n0612345678;Hello;a\nbad;Hello;b\n").expect("write");
    let path = file.to_str().expect("utf-8 path");

    // without serve: the store is opened directly
    let out = app.cli(&["validate", "--tenant", "acme", path]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = parse_csv(&out.stdout, b';');
    assert_eq!(rows[1][..5], ["2", "a", "+33612345678", "queued", ""]);
    assert_eq!(rows[2][..5], ["3", "b", "bad", "rejected", "invalid_phone"]);
    let status = app.cli(&["status"]);
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("acme"));

    // with serve: the same answers come through the admin socket
    app.start();
    let out = app.cli(&["validate", "--tenant", "acme", path]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(parse_csv(&out.stdout, b';'), rows);
    let mode = std::fs::metadata(app.state_dir().join("admin.sock"))
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    app.drop_file("acme", "real.csv", b"phone;message\n0612345678;Hello\n0612345679;Hi\n");
    app.final_report("acme", "real", 2);
    let status = String::from_utf8_lossy(&app.cli(&["status"]).stdout).into_owned();
    let row: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with("acme"))
        .expect("acme row")
        .split_whitespace()
        .collect();
    assert_eq!(row[1..4], ["0/1", "0", "0"], "one batch, none open, depth 0: {status}");
    assert_eq!(row[6], "2", "two delivered: {status}");
    assert_eq!(app.sink().len(), 2, "validate queued nothing");
    let out = app.cli(&["validate", "--tenant", "nobody", path]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tenant `nobody`"));
    assert!(app.stop().success());
}

#[test]
fn keys_and_configuration_are_checked() {
    let mut app = Appliance::new(&tenant("acme", ""));
    let again = app.cli(&["keygen"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));

    let ok = app.cli(&["check-config"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let key = app.path("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = app.cli(&["serve"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let text = std::fs::read_to_string(&app.config).expect("config");
    std::fs::write(&app.config, text.replace("settle = \"200ms\"", "setle = \"200ms\"")).expect("typo");
    let out = app.cli(&["check-config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("smsdrop.toml:") && err.contains("setle"), "{err}");
    std::fs::write(
        &app.config,
        text.replace("default_region = \"FR\"", "default_region = \"ZZ\""),
    )
    .expect("bad value");
    let out = app.cli(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tenant.acme.default_region"), "{err}");

    std::fs::write(&app.config, text).expect("restore");
    app.start();
    assert!(app.stop().success());
}

#[test]
fn blocklist_commands() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    let add = app.cli(&["blocklist", "add", "--tenant", "acme", "--phone", "+33 6 12 34 56 78"]);
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    let list = String::from_utf8_lossy(&app.cli(&["blocklist", "list", "--tenant", "acme"]).stdout).into_owned();
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(
        !list.contains("612345678"),
        "the list holds hashes, not numbers: {list}"
    );
    app.drop_file("acme", "one.csv", b"phone;message\n06 12 34 56 78;Hello\n");
    assert_eq!(app.result("acme", "one")[1][4], "blocklisted");
    let remove = app.cli(&["blocklist", "remove", "--tenant", "acme", "--phone", "0612345678"]);
    assert!(String::from_utf8_lossy(&remove.stdout).contains("removed"));
    app.drop_file("acme", "two.csv", b"phone;message\n06 12 34 56 78;Hello again\n");
    assert_eq!(app.result("acme", "two")[1][3], "queued");
    let bad = app.cli(&["blocklist", "add", "--tenant", "acme", "--phone", "nope"]);
    assert!(!bad.status.success());
}

#[test]
fn json_logs_hold_no_number_or_text() {
    let mut app = Appliance::new_with("log_format = \"json\"", &tenant("acme", ""));
    app.start();
    app.drop_file(
        "acme",
        "j.csv",
        b"phone;message\n0612345678;Secret words\nbad;Other words\n",
    );
    app.result("acme", "j");
    app.final_report("acme", "j", 1);
    assert!(app.stop().success());
    let log = app.log();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(log.contains("\"file\":\"j.csv\""), "{log}");
    for secret in ["612345678", "Secret words", "Other words"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn sigkill_during_ingest_while_another_batch_dispatches() {
    // The first batch goes (Belgian numbers) to the loopback SMSC, which answers each submit_sm
    // 10 ms late: with a window of 10 it takes seconds to send, while the second batch (French
    // numbers, to the sink) is read.
    let dir = tempfile::tempdir().expect("dir");
    let mut smsc = common::Smsc::start(dir.path(), &[("SMSC_DELAY_MS", "10")]);
    let mut app = Appliance::new(&format!(
        "{}\n[partner.smsc]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = 10\n\n[[route]]\nprefix = \"+32\"\npartners = [\"smsc\"]\n",
        tenant("acme", ""),
        smsc.port
    ));
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    let valid_first = 3_000;
    let mut csv = String::from("phone;message\n");
    for i in 0..valid_first {
        // (ending in 7: the SMSC's special endings 0401..0406 never come up)
        csv.push_str(&format!("+32470{:06};first batch message {i}\n", i * 10 + 7));
    }
    let first = app.path("first.csv");
    std::fs::write(&first, csv).expect("first");
    let second = app.path("second.csv");
    let valid_second = batches::write_batch(&second, 300_000, 20).expect("generate") as usize;
    app.start();
    std::fs::rename(&first, app.inbox("acme").join("first.csv")).expect("drop");
    app.result("acme", "first");
    smsc.wait("submit", 1, Duration::from_secs(30));
    std::fs::rename(&second, app.inbox("acme").join("second.csv")).expect("drop");
    wait_ingesting(&app, "second.csv");
    app.kill();
    // The kill landed while the second batch was being ingested and the first still sent.
    assert!(
        !app.outbox("acme").join("second.result.csv").exists(),
        "second answered before the kill"
    );
    let at_kill = smsc.of("submit").len();
    assert!(
        at_kill < valid_first,
        "the first batch was all sent before the kill: {at_kill}"
    );
    smsc.control(serde_json::json!({"delay_ms": 0}));

    app.start();
    let rows = app.result("acme", "second");
    assert_eq!(rows.len(), 300_001, "every line of the cut batch answered once");
    let lines: HashSet<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(lines.len(), 300_000);
    app.final_report("acme", "first", valid_first);
    app.final_report("acme", "second", valid_second);
    let sent = app.sink();
    let ids: HashSet<String> = message_ids(&sent).into_iter().collect();
    assert_eq!(ids.len(), valid_second, "every message of the second batch sent");
    assert_eq!(
        sent.len(),
        valid_second,
        "none twice: the kill came before its dispatch"
    );
    let submits = smsc.of("submit");
    let to: HashSet<&str> = submits.iter().filter_map(|e| e["to"].as_str()).collect();
    assert_eq!(to.len(), valid_first, "every message of the first batch sent");
    assert!(
        submits.len() - to.len() <= 10,
        "duplicates only within the window: {}",
        submits.len() - to.len()
    );
    let status = String::from_utf8_lossy(&app.cli(&["status"]).stdout).into_owned();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("acme") && l.split_whitespace().nth(1) == Some("0/2")),
        "{status}"
    );
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // fields after the command name, which is in parentheses and may hold spaces
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

#[test]
fn an_idle_sink_only_dispatcher_does_not_spin() {
    // Regression: with only the sink partner nothing could send receipts, the dispatcher's
    // receipt channel was closed, and a closed channel is always ready: the loop spun.
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.drop_file("acme", "idle.csv", b"phone;message\n0612345678;one\n");
    app.final_report("acme", "idle", 1);
    let before = cpu_seconds(app.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(app.pid()) - before;
    assert!(used < 0.5, "an idle appliance used {used:.2} CPU seconds in 2 s");
}

#[test]
fn logs_follow_the_configured_filter_and_leave_time_stamps_to_the_journal() {
    let app = Appliance::new_with("log_filter = \"smsdrop::server=info,warn\"\n", &tenant("acme", ""));
    let log = app.path("journal.log");
    // as systemd starts it: no RUST_LOG, stderr a journal stream
    let mut child = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(&app.config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", "8:12345")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    common::wait_for("serving", Duration::from_secs(20), || {
        read().contains("smsdrop is serving")
    });
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;Hello\n");
    app.result("acme", "a");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().expect("wait").success());
    let text = read();
    assert!(
        !text.contains("file taken"),
        "smsdrop::watch at info is filtered out:\n{text}"
    );
    for line in text.lines() {
        assert!(
            !line.starts_with(|c: char| c.is_ascii_digit()) && !line.contains('\u{1b}'),
            "no time stamp, no colour under the journal: {line}"
        );
    }
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("INFO smsdrop::server")),
        "{text}"
    );

    let bad = app.path("bad.toml");
    std::fs::write(&bad, "state_dir = \"s\"\nlog_filter = \"smsdrop=loud\"\n").expect("config");
    let out = std::process::Command::new(common::bin())
        .arg("--config")
        .arg(&bad)
        .arg("check-config")
        .output()
        .expect("check-config");
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("bad.toml:2: log_filter: "), "{why}");
}

/// The datagrams a service manager's notify socket received, one string each.
fn notifications(socket: &std::os::unix::net::UnixDatagram, until: Duration) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let end = std::time::Instant::now() + until;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < end {
        if let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

#[test]
fn the_service_manager_hears_ready_watchdog_reload_and_stopping() {
    let mut app = Appliance::new(&tenant("acme", ""));
    // The service manager's side of sd_notify(3): a datagram socket named by NOTIFY_SOCKET.
    let path = app.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    app.start_with_env(&[
        ("NOTIFY_SOCKET", path.to_str().expect("path")),
        ("WATCHDOG_USEC", "400000"),
    ]);
    let first = notifications(&socket, Duration::from_millis(1500));
    let ready = first.iter().position(|m| m.lines().any(|l| l == "READY=1"));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 in {first:?}"));
    assert!(first[ready].contains("STATUS=serving 1 tenants"), "{first:?}");
    // at half the watchdog interval, each after the store answered
    let pings = first[ready..].iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    assert!(pings >= 2, "watchdog pings in 1.5 s: {first:?}");
    // READY=1 came once the admin socket was up
    common::ok(app.cli(&["status"]));

    // SIGHUP: RELOADING=1 (with the monotonic time), READY=1 again, still serving; an invalid
    // configuration is refused and the running one kept.
    let good = std::fs::read_to_string(&app.config).expect("config");
    std::fs::write(&app.config, format!("{good}\nnot valid toml = = =\n")).expect("bad config");
    unsafe {
        libc::kill(app.pid() as i32, libc::SIGHUP);
    }
    let reload = notifications(&socket, Duration::from_millis(800));
    let reloading = reload.iter().position(|m| m.contains("RELOADING=1"));
    let reloading = reloading.unwrap_or_else(|| panic!("no RELOADING=1 in {reload:?}"));
    assert!(reload[reloading].contains("MONOTONIC_USEC="), "{reload:?}");
    assert!(reload[reloading..].iter().any(|m| m.contains("READY=1")), "{reload:?}");
    wait_log(&app, "the new configuration is refused", Duration::from_secs(5));
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;Still serving\n");
    app.result("acme", "a");
    std::fs::write(&app.config, good).expect("config back");

    let status = app.stop();
    assert!(status.success(), "{status}");
    let last = notifications(&socket, Duration::from_millis(200));
    assert!(last.iter().any(|m| m.contains("STOPPING=1")), "{last:?}");
}

#[test]
fn the_master_key_comes_from_the_credentials_directory_when_systemd_passes_one() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;Sealed before\n");
    app.final_report("acme", "a", 1);
    app.stop();
    // as LoadCredential= leaves it: the key in $CREDENTIALS_DIRECTORY, and key_file another key
    let creds = app.path("credentials");
    std::fs::create_dir(&creds).expect("credentials dir");
    std::fs::rename(app.path("master.key"), creds.join("master.key")).expect("move key");
    common::ok(app.cli(&["keygen"]));
    app.start_with_env(&[("CREDENTIALS_DIRECTORY", creds.to_str().expect("path"))]);
    app.drop_file("acme", "b.csv", b"phone;message\n0612345678;Sealed after\n");
    app.final_report("acme", "b", 1);
    app.stop();
    // without the credential, key_file's key opens nothing of this store
    std::process::Command::new(common::bin())
        .arg("--config")
        .arg(&app.config)
        .arg("serve")
        .stderr(std::fs::File::create(app.path("wrong.log")).expect("log"))
        .status()
        .map(|s| assert!(!s.success()))
        .expect("serve");
    let log = std::fs::read_to_string(app.path("wrong.log")).expect("log");
    assert!(log.contains("does not open"), "{log}");
}

#[test]
fn start_up_refuses_a_state_dir_or_key_store_others_could_change() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.stop();
    let state = app.state_dir();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let serve = |app: &Appliance| {
        let out = std::process::Command::new(common::bin())
            .arg("--config")
            .arg(&app.config)
            .arg("serve")
            .output()
            .expect("serve");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = serve(&app);
    assert!(
        said.contains("writable by group or others") && said.contains("chmod go-w"),
        "{said}"
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::set_permissions(state.join("keys"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let said = serve(&app);
    assert!(
        said.contains("readable by group or others") && said.contains("chmod 600"),
        "{said}"
    );
    std::fs::set_permissions(state.join("keys"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    app.start();
}
