//! The audit log through the real binary: what is on it, its export filters, and a chain that
//! names the entry where one byte of the store was changed.

mod common;

use std::time::Duration;

use common::{Appliance, tenant};

const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");

/// The sealed bytes of entry `seq`, as redb holds them.
fn sealed_entry(db: &std::path::Path, seq: u64) -> Vec<u8> {
    let db = redb::Database::open(db).expect("open store");
    let tx = redb::ReadableDatabase::begin_read(&db).expect("read");
    let table = tx.open_table(AUDIT).expect("audit table");
    table.get(seq).expect("get").expect("entry exists").value().to_vec()
}

#[test]
fn the_chain_names_the_entry_whose_byte_was_changed() {
    let mut app = Appliance::new(&format!("{}{}", tenant("acme", ""), tenant("globex", "")));
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;one\n");
    app.drop_file("globex", "g.csv", b"phone;message\n0612345678;two\n");
    app.result("acme", "a");
    app.result("globex", "g");
    let taken = app.wait_audit("batch.taken", &[("file", "g.csv")]);
    assert_eq!(taken["tenant"], "globex");
    assert_eq!(taken["actor"], "ingest");
    let ok = app.cli(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    // Export filters: by tenant, and from a time on.
    let only_acme = app.cli(&["audit", "export", "--tenant", "acme"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&only_acme.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|e| e["tenant"] == "acme"),
        "{lines:#?}"
    );
    let future = app.cli(&["audit", "export", "--since", "2999-01-01"]);
    assert!(future.status.success());
    assert!(future.stdout.is_empty());
    let recent = app.cli(&["audit", "export", "--since", "1h"]);
    assert!(String::from_utf8_lossy(&recent.stdout).contains("\"batch.taken\""));
    let bad = app.cli(&["audit", "export", "--since", "last tuesday"]);
    assert!(!bad.status.success());

    assert!(app.stop().success());
    let entries = app.audit();
    let starts = entries.iter().filter(|e| e["action"] == "service.start").count();
    assert_eq!(starts, 1);
    assert!(entries.iter().any(|e| e["action"] == "service.stop"), "{entries:#?}");
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "admin.audit-export"
                && e["actor"].as_str().is_some_and(|a| a.starts_with("admin uid "))),
        "commands through serve are on the log with the caller's uid"
    );

    // One byte of entry 3 changed on disk.
    let db = app.state_dir().join("smsdrop.redb");
    let sealed = sealed_entry(&db, 3);
    let mut bytes = std::fs::read(&db).expect("read store");
    let at = memchr::memmem::find(&bytes, &sealed).expect("entry 3 is on disk as redb holds it");
    bytes[at + sealed.len() / 2] ^= 0x01;
    std::fs::write(&db, &bytes).expect("write store");

    let broken = app.cli(&["audit", "verify"]);
    assert!(!broken.status.success(), "a changed entry is found");
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(err.contains("broken at entry 3"), "{err}");
    let exported = app.audit();
    assert!(
        exported.iter().any(|e| e["seq"] == 3 && e["damaged"].is_string()),
        "the export shows the damaged entry: {exported:#?}"
    );
    assert!(
        exported.iter().any(|e| e["seq"] == 4 && e["action"].is_string()),
        "and the rest"
    );

    // The other records still read: the service starts and serves on a damaged audit log.
    app.start();
    app.drop_file("acme", "b.csv", b"phone;message\n0612345678;three\n");
    app.result("acme", "b");
    common::wait_for("still broken at 3", Duration::from_secs(5), || {
        String::from_utf8_lossy(&app.cli(&["audit", "verify"]).stderr).contains("broken at entry 3")
    });
}
