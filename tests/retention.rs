//! Data lifecycle through the real binary: retention on a clock the test moves forward
//! (`SMSDROP_CLOCK_FILE`), never by sleeping for days.

mod common;

use std::time::Duration;

use common::{Appliance, batches, tenant, wait_for};

fn db_size(app: &Appliance) -> u64 {
    std::fs::metadata(app.state_dir().join("smsdrop.redb"))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn status(app: &Appliance) -> String {
    let out = app.cli(&["status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_status(app: &Appliance, needle: &str) -> String {
    let mut last = String::new();
    wait_for(&format!("status saying `{needle}`"), Duration::from_secs(60), || {
        last = status(app);
        last.contains(needle)
    });
    last
}

#[test]
fn finished_batches_are_anonymised_then_deleted_and_their_space_is_reused() {
    let lines = 20_000u64;
    let mut app = Appliance::new(&tenant(
        "acme",
        "anonymize_after = \"2h\"\ndelete_after = \"1d\"\nmax_lines = 100000\n",
    ));
    let clock = app.path("clock");
    std::fs::write(&clock, "0").expect("clock");
    app.start_with_env(&[("SMSDROP_CLOCK_FILE", clock.to_str().expect("utf-8 path"))]);
    let staging = app.path("first.csv");
    let valid = batches::write_batch(&staging, lines, 0).expect("batch");
    let empty = db_size(&app);
    std::fs::rename(&staging, app.inbox("acme").join("first.csv")).expect("drop");
    app.final_report("acme", "first", valid as usize);
    let full = db_size(&app);
    assert!(full > empty, "the batch takes room: {empty} -> {full} bytes");

    // The first line's number, as export finds it before and after anonymisation.
    let first = common::batches::written_phone(0);
    let messages = |app: &Appliance| -> Vec<serde_json::Value> {
        let out = app.cli(&["subject", "export", "--phone", &first, "--tenant", "acme"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        doc["tenants"]["acme"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let before = messages(&app);
    assert!(!before.is_empty() && before[0]["text"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(before[0]["anonymized"], false);

    // Nothing goes before its time: two sweeps after the batch was final take nothing.
    app.after_two_rounds("sweeper");
    let s = status(&app);
    assert!(s.contains("0 messages deleted (0 batches), 0 anonymised"), "{s}");
    assert!(!s.contains("last sweep never"), "the sweeper ran: {s}");

    // Three hours later: anonymised, counts kept.
    std::fs::write(&clock, (3 * 3600).to_string()).expect("clock");
    wait_status(&app, &format!("0 messages deleted (0 batches), {valid} anonymised"));
    let after = messages(&app);
    assert_eq!(after.len(), before.len(), "found by its keyed hash");
    for m in &after {
        assert_eq!(
            (
                m["anonymized"].as_bool(),
                m["text"].as_str(),
                m["reference"].as_str(),
                m["sender"].as_str()
            ),
            (Some(true), Some(""), Some(""), Some("")),
            "{m}"
        );
        assert_eq!(m["status"], "delivered");
    }
    let show = app.cli(&["batch", "show", "1"]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains(&format!("delivered               {valid}")), "{show}");

    // Two days later: gone.
    std::fs::write(&clock, (2 * 86400).to_string()).expect("clock");
    wait_status(&app, &format!("{valid} messages deleted (1 batches)"));
    let show = app.cli(&["batch", "show", "1"]);
    assert!(!show.status.success(), "batch 1 no longer exists");
    assert!(messages(&app).is_empty(), "nothing of the number is left");
    let list = app.cli(&["batch", "list", "--tenant", "acme"]);
    assert!(!String::from_utf8_lossy(&list.stdout).contains("first.csv"));
    let sweeps: Vec<serde_json::Value> = app
        .audit()
        .into_iter()
        .filter(|e| e["action"] == "retention.sweep")
        .collect();
    let deleted: u64 = sweeps
        .iter()
        .filter_map(|e| e["details"]["deleted_messages"].as_str()?.parse::<u64>().ok())
        .sum();
    assert_eq!(deleted, valid, "the sweeps are on the audit log: {sweeps:?}");

    // The freed pages take the next batch of the same size: the file hardly grows. redb hands
    // out pages freed by a commit only after a later commit found no reader older than it: a
    // one-line batch taken and delivered first (its ingest and dispatch commit several times)
    // frees them, whatever was reading when the sweep committed.
    std::fs::write(&clock, "0").expect("clock");
    app.drop_file("acme", "nudge.csv", b"phone;message\n0612345678;nudge\n");
    app.final_report("acme", "nudge", 1);
    let staging = app.path("second.csv");
    // one line more: the same content would be refused as a duplicate file
    let valid = batches::write_batch(&staging, lines + 1, 0).expect("batch");
    let before = db_size(&app);
    std::fs::rename(&staging, app.inbox("acme").join("second.csv")).expect("drop");
    app.final_report("acme", "second", valid as usize);
    let after = db_size(&app);
    println!("store size: empty {empty}, one batch {full}, after deleting it {before}, with the next batch {after}");
    assert!(
        after <= full + (full - empty) / 4,
        "the second batch reused the first one's space: {full} then {after} bytes"
    );
}
