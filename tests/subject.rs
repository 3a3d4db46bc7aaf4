//! Subject requests through the real binary: `subject export` finds everything held about a
//! number in every tenant, `subject erase` leaves nothing of it (and cancels what was not sent).

mod common;

use std::time::Duration;

use common::{Appliance, tenant, wait_for};

fn export(app: &Appliance, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["subject", "export"];
    all.extend_from_slice(args);
    let out = app.cli(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("export is JSON")
}

fn texts(doc: &serde_json::Value, tenant: &str) -> Vec<String> {
    doc["tenants"][tenant]["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["text"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn export_and_erase_across_two_tenants() {
    let mut app = Appliance::new(&format!("{}{}", tenant("acme", ""), tenant("beta", "hold_above = 1\n")));
    app.start();
    app.drop_file(
        "acme",
        "a.csv",
        b"phone;message;ref\n0612345678;Hello Alice;r1\n0698765432;For Bob;r2\n+33612345678;Second for Alice;r3\n",
    );
    app.final_report("acme", "a", 3);
    app.drop_file(
        "beta",
        "b.csv",
        b"phone;message\n06 12 34 56 78;Beta for Alice\n0698765432;Beta for Bob\n",
    );
    app.result("beta", "b");

    // sends are remembered for reply matching about once a second
    wait_for("last_sent written", Duration::from_secs(10), || {
        export(&app, &["--phone", "0612345678"])["tenants"]["acme"]["last_sent"].is_u64()
    });
    let doc = export(&app, &["--phone", "06 12 34 56 78"]);
    assert_eq!(texts(&doc, "acme"), ["Hello Alice", "Second for Alice"], "{doc:#}");
    assert_eq!(texts(&doc, "beta"), ["Beta for Alice"], "{doc:#}");
    assert_eq!(doc["tenants"]["acme"]["messages"][0]["status"], "delivered");
    assert_eq!(doc["tenants"]["acme"]["messages"][0]["reference"], "r1");
    assert_eq!(doc["tenants"]["beta"]["messages"][0]["status"], "held");
    let only = export(&app, &["--phone", "+33612345678", "--tenant", "beta"]);
    assert!(only["tenants"].get("acme").is_none(), "{only:#}");
    assert_eq!(texts(&only, "beta"), ["Beta for Alice"]);

    let out = app.cli(&["subject", "erase", "--phone", "+33612345678", "--block"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("acme: erased 2 messages"), "{said}");
    assert!(
        said.contains("beta: erased 1 messages (1 not yet sent, now canceled)"),
        "{said}"
    );

    let doc = export(&app, &["--phone", "+33612345678"]);
    for t in ["acme", "beta"] {
        assert!(texts(&doc, t).is_empty(), "nothing left in {t}: {doc:#}");
        assert!(doc["tenants"][t]["last_sent"].is_null(), "{doc:#}");
        assert_eq!(doc["tenants"][t]["blocklist"]["source"], "subject-erase", "{doc:#}");
    }
    // Bob's messages are untouched.
    let bob = export(&app, &["--phone", "0698765432"]);
    assert_eq!(texts(&bob, "acme"), ["For Bob"]);
    assert_eq!(texts(&bob, "beta"), ["Beta for Bob"]);

    // Nor is anything of it in a fresh backup: restored elsewhere, the export is as empty.
    let backup = app.path("after-erase.backup");
    let out = app.cli(&["backup", backup.to_str().expect("path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables = std::fs::read_to_string(&app.config).expect("config");
    let restored = app.twin(&tables[tables.find("\n[tenant.").expect("tenants")..]);
    let out = restored.cli(&["restore", backup.to_str().expect("path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = export(&restored, &["--phone", "+33612345678"]);
    for t in ["acme", "beta"] {
        assert!(texts(&doc, t).is_empty(), "nothing in the restored {t}: {doc:#}");
        assert!(doc["tenants"][t]["last_sent"].is_null(), "{doc:#}");
    }
    assert_eq!(
        texts(&export(&restored, &["--phone", "0698765432"]), "acme"),
        ["For Bob"]
    );

    // The held batch, released, sends Bob's message only; Alice's stays canceled.
    let out = app.cli(&["batch", "release", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = app.final_report("beta", "b", 2);
    // line;ref;phone;message_id;status;partner;submitted_at;done_at;error
    assert_eq!(
        (rows[1][2].as_str(), rows[1][4].as_str(), rows[1][8].as_str()),
        ("", "canceled", "erased"),
        "{rows:?}"
    );
    assert_eq!(
        (rows[2][2].as_str(), rows[2][4].as_str()),
        ("+33698765432", "delivered"),
        "{rows:?}"
    );
    wait_for("Bob's beta message sent", Duration::from_secs(20), || {
        app.sink().iter().any(|m| m["text"] == "Beta for Bob")
    });
    assert!(
        !app.sink().iter().any(|m| m["text"] == "Beta for Alice"),
        "an erased message is never sent"
    );

    // A later batch to the number is refused: it is on the blocklist.
    app.drop_file("acme", "c.csv", b"phone;message\n0612345678;Again\n");
    let result = app.result("acme", "c");
    assert!(
        result.iter().any(|r| r.iter().any(|c| c == "blocklisted")),
        "{result:?}"
    );

    let erase = app.wait_audit("admin.subject-erase", &[("result", "ok")]);
    assert!(
        erase["details"]["number_hash"]
            .as_str()
            .is_some_and(|h| h.contains(':')),
        "{erase:#}"
    );
}

#[test]
fn a_number_blocklisted_after_its_message_was_queued_is_never_sent_and_lists_import_in_bulk() {
    let mut app = Appliance::new(&tenant("acme", "hold_above = 1\n"));
    app.start();
    app.drop_file(
        "acme",
        "q.csv",
        b"phone;message\n0611111111;one\n0622222222;two\n0633333333;three\n",
    );
    let result = app.result("acme", "q");
    assert_eq!(result.len(), 4, "three lines accepted (held): {result:?}");

    let list = app.path("optout.txt");
    std::fs::write(
        &list,
        "# opt-outs from the CRM\n06 11 11 11 11\n\n+33622222222\nnot a number\n+33622222222\n",
    )
    .expect("list");
    let out = app.cli(&["blocklist", "import", "--tenant", "acme", list.to_str().expect("path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("3 numbers read, 2 new on the blocklist of acme, 1 lines refused"),
        "{said}"
    );
    assert!(said.contains("line 5: not a valid phone number"), "{said}");
    let listed = app.cli(&["blocklist", "list", "--tenant", "acme"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.lines().filter(|l| l.ends_with(";import")).count(), 2, "{listed}");

    let out = app.cli(&["batch", "release", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = app.final_report("acme", "q", 3);
    // line;ref;phone;message_id;status;partner;submitted_at;done_at;error
    let outcome: Vec<(&str, &str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[2].as_str(), r[4].as_str(), r[8].as_str()))
        .collect();
    assert_eq!(
        outcome,
        [
            ("+33611111111", "canceled", "blocklisted"),
            ("+33622222222", "canceled", "blocklisted"),
            ("+33633333333", "delivered", "")
        ]
    );
    let sent: Vec<String> = app
        .sink()
        .iter()
        .map(|m| m["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(sent, ["three"]);
    app.wait_audit("admin.blocklist-import", &[("numbers", "3"), ("refused_lines", "1")]);
}

fn run(app: &Appliance, args: &[&str]) -> String {
    let out = app.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_global_blocklist_holds_for_every_tenant() {
    let mut app = Appliance::new(&format!("{}{}", tenant("acme", ""), tenant("beta", "hold_above = 1\n")));
    app.start();
    let refused = app.cli(&["blocklist", "add", "--phone", "+33622222222"]);
    assert!(!refused.status.success(), "a list must be named");
    let said = run(&app, &["blocklist", "add", "--global", "--phone", "+33 6 22 22 22 22"]);
    assert!(said.contains("+33622222222 added to the global blocklist"), "{said}");
    let national = app.cli(&["blocklist", "add", "--global", "--phone", "0622222222"]);
    assert!(!national.status.success(), "no region applies to the global list");

    // Refused at ingest in both tenants, whatever the number's spelling.
    app.drop_file(
        "acme",
        "a.csv",
        b"phone;message\n0622222222;to the opted-out\n0611111111;fine\n",
    );
    let result = app.result("acme", "a");
    // line;ref;phone;status;reason;message_id
    assert_eq!(result[1][4], "blocklisted", "{result:?}");
    // A batch queued (held) before the number goes on the global list: canceled, never sent.
    app.drop_file(
        "beta",
        "b.csv",
        b"phone;message\n0033622222222;again\n0633333333;later opt-out\n0644444444;stays\n",
    );
    let result = app.result("beta", "b");
    // line;ref;phone;status;reason;message_id
    assert_eq!(result[1][4], "blocklisted", "{result:?}");
    let file = app.path("global.txt");
    std::fs::write(&file, "+33633333333\n0655555555\n").expect("list");
    let said = run(&app, &["blocklist", "import", "--global", file.to_str().expect("path")]);
    assert!(
        said.contains("1 numbers read, 1 new on the global blocklist, 1 lines refused"),
        "{said}"
    );
    let listed = run(&app, &["blocklist", "list", "--global"]);
    assert_eq!(listed.lines().count(), 3, "header and two entries: {listed}");
    run(&app, &["batch", "release", "2"]);
    let rows = app.final_report("beta", "b", 2);
    let outcome: Vec<(&str, &str)> = rows[1..].iter().map(|r| (r[4].as_str(), r[8].as_str())).collect();
    assert_eq!(outcome, [("canceled", "blocklisted"), ("delivered", "")], "{rows:?}");
    let sent: Vec<String> = app
        .sink()
        .iter()
        .map(|m| m["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !sent
            .iter()
            .any(|t| t == "later opt-out" || t == "to the opted-out" || t == "again"),
        "{sent:?}"
    );

    // Subject requests see it, and erasing everywhere takes the number off.
    let doc = export(&app, &["--phone", "0622222222"]);
    assert_eq!(doc["global_blocklist"]["source"], "cli", "{doc:#}");
    let said = run(&app, &["subject", "erase", "--phone", "0622222222"]);
    assert!(said.contains("the global blocklist: its entry removed"), "{said}");
    assert!(export(&app, &["--phone", "0622222222"])["global_blocklist"].is_null());
    app.drop_file("acme", "c.csv", b"phone;message\n0622222222;welcome back\n");
    let result = app.result("acme", "c");
    assert_eq!(result.len(), 2, "{result:?}");
    assert!(!result[1].iter().any(|c| c == "blocklisted"), "{result:?}");
    app.wait_audit("admin.blocklist-add", &[("list", "global"), ("result", "ok")]);
}
