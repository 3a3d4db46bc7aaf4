//! Master key versions and tenant purge through the real binary: `key rotate` while a large
//! queue is being dispatched, `key retire` making older backups unreadable, `tenant purge`
//! leaving nothing of a tenant that can be read back.

mod common;

use std::time::Duration;

use common::{Appliance, failed, ok, tenant, wait_for};

#[test]
fn rotation_while_dispatching_then_retiring_the_old_version() {
    // A real SMSC, and a rate cap that makes the queue last several seconds.
    let dir = tempfile::tempdir().expect("dir");
    let smsc = common::Smsc::start(dir.path(), &[("SMSC_QUIET", "1")]);
    let tables = format!(
        "{}\n[partner.smsc]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = 50\ntps = 5000\n\n[[route]]\nprefix = \"+33\"\npartners = [\"smsc\"]\n",
        tenant("acme", "max_lines = 100000\n"),
        smsc.port
    );
    let mut app = Appliance::new(&tables);
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    app.start();
    let before = app.path("before.backup");
    // numbers ending in a multiple of 10: none of the SMSC's special behaviours (…0401 to …0406)
    let valid: u64 = 30_000;
    let mut csv = String::from("phone;message\n");
    for i in 0..valid {
        csv.push_str(&format!("0612{:06};message number {i}\n", i * 10));
    }
    let staging = app.path("big.csv");
    std::fs::write(&staging, csv).expect("batch");
    std::fs::rename(&staging, app.inbox("acme").join("big.csv")).expect("drop");
    app.result("acme", "big");
    ok(app.cli(&["backup", before.to_str().expect("path")]));
    // while the dispatcher is sending the queue
    let pending = |app: &Appliance| -> u64 {
        let show = ok(app.cli(&["batch", "show", "1"]));
        ["queued", "submitted"]
            .iter()
            .filter_map(|s| {
                show.lines()
                    .find(|l| l.trim_start().starts_with(s))
                    .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            })
            .sum()
    };
    wait_for("dispatch under way", Duration::from_secs(30), || {
        let p = pending(&app);
        p > 0 && p < valid
    });
    // What a thief might have kept from before: the key store and the key file of version 1.
    std::fs::copy(app.state_dir().join("keys"), app.path("keys.v1")).expect("key store");
    std::fs::copy(app.path("master.key"), app.path("master.key.v1")).expect("key file");
    let said = ok(app.cli(&["key", "rotate"]));
    let left = pending(&app);
    assert!(left > 1000, "the rotation came with {left} messages still to go");
    assert!(said.contains("master key version 2 added"), "{said}");
    assert!(said.contains("master key versions in the key file: 1, 2"), "{said}");
    assert!(said.contains("newest: 2"), "{said}");
    let report = app.final_report("acme", "big", valid as usize);
    assert!(
        report[1..].iter().all(|r| r[4] == "delivered"),
        "every message sent across the rotation"
    );
    // The re-sealer moves every record to the new generation, then destroys the old one.
    wait_for("the re-seal pass", Duration::from_secs(60), || {
        ok(app.cli(&["key", "status"])).contains("nothing to re-seal")
    });
    let status = ok(app.cli(&["key", "status"]));
    let resealed: u64 = status
        .split("last re-seal pass ended ")
        .nth(1)
        .and_then(|l| l.split(": ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!(resealed > 0, "the queue's records were re-sealed: {status}");
    assert!(status.contains("older generations destroyed"), "{status}");
    let after = app.path("after.backup");
    ok(app.cli(&["backup", after.to_str().expect("path")]));

    // The newest version can't go; the old one can, and takes the old backup with it.
    let why = failed(app.cli(&["key", "retire", "--version", "2"]));
    assert!(why.contains("newest"), "{why}");
    let said = ok(app.cli(&["key", "retire", "--version", "1"]));
    assert!(said.contains("master key versions in the key file: 2\n"), "{said}");
    app.stop();
    app.start(); // opens with version 2 alone
    let status = ok(app.cli(&["status"]));
    assert!(status.contains("acme"), "{status}");
    let restarted = app.log();
    assert!(!restarted.contains("ERROR"), "{restarted}");
    app.stop();
    // The store as it is now, with the keys from before the rotation: nothing in it opens.
    let thief = app.twin(&tables);
    std::fs::create_dir_all(thief.state_dir()).expect("state dir");
    std::fs::copy(
        app.state_dir().join("smsdrop.redb"),
        thief.state_dir().join("smsdrop.redb"),
    )
    .expect("db");
    std::fs::copy(app.path("keys.v1"), thief.state_dir().join("keys")).expect("old key store");
    std::fs::copy(app.path("master.key.v1"), thief.path("master.key")).expect("old key file");
    let why = failed(thief.cli(&["batch", "show", "1"]));
    assert!(why.contains("does not open"), "{why}");
    // The audit log's first entries were written before the rotation and never since: only the
    // re-sealer moved them.
    let why = failed(thief.cli(&["audit", "verify"]));
    assert!(why.contains("broken at entry 1:"), "{why}");
    let audit = app.audit();
    assert!(
        audit.iter().any(|e| e["action"] == "key.reseal"),
        "the re-seal pass on the audit log"
    );
    for action in ["rotate", "retire"] {
        assert!(
            audit
                .iter()
                .any(|e| e["action"] == "admin.key-reload" && e["details"]["action"] == action),
            "{action} on the audit log"
        );
    }

    let old = app.twin(&tables);
    std::fs::copy(app.path("master.key"), old.path("master.key")).expect("the key file now");
    let why = failed(old.cli(&["restore", before.to_str().expect("path")]));
    assert!(why.contains("master key version 1"), "{why}");
    let said = ok(old.cli(&["restore", after.to_str().expect("path")]));
    assert!(said.contains("audit log intact"), "{said}");
    let doc = ok(old.cli(&["subject", "export", "--phone", "0612000050"]));
    assert!(
        doc.contains("message number 5\""),
        "records open under version 2: {doc}"
    );
}

#[test]
fn a_purged_tenant_cannot_be_read_back() {
    let both = format!("{}{}", tenant("acme", ""), tenant("beta", ""));
    let mut app = Appliance::new(&both);
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;For acme\n");
    app.drop_file(
        "beta",
        "b.csv",
        b"phone;message\n0612345678;For beta\n0698765432;Beta two\n",
    );
    app.final_report("acme", "a", 1);
    app.final_report("beta", "b", 2);
    ok(app.cli(&["blocklist", "add", "--tenant", "beta", "--phone", "0611111111"]));
    let before = app.path("before.backup");
    ok(app.cli(&["backup", before.to_str().expect("path")]));
    let why = failed(app.cli(&["tenant", "purge", "beta"]));
    assert!(why.contains("is in the configuration"), "{why}");
    app.stop();

    // beta leaves the configuration, then is purged
    let config = std::fs::read_to_string(&app.config).expect("config");
    let beta = config.find("\n[tenant.beta]").expect("beta table");
    std::fs::write(&app.config, &config[..beta]).expect("config without beta");
    app.start();
    let said = ok(app.cli(&["tenant", "purge", "beta"]));
    assert!(said.contains("tenant beta purged: 1 batches, 2 messages"), "{said}");
    assert!(said.contains("its keys destroyed"), "{said}");
    let list = ok(app.cli(&["batch", "list"]));
    assert!(list.contains("a.csv") && !list.contains("b.csv"), "{list}");
    let doc = ok(app.cli(&["subject", "export", "--phone", "0612345678"]));
    assert!(doc.contains("For acme") && !doc.contains("beta"), "{doc}");
    let again = ok(app.cli(&["tenant", "purge", "beta"]));
    assert!(
        again.contains("0 batches") && again.contains("were not in the key store"),
        "{again}"
    );
    app.wait_audit("admin.tenant-purge", &[("batches", "1"), ("result", "ok")]);
    let chain = ok(app.cli(&["audit", "verify"]));
    assert!(
        chain.contains("intact"),
        "the audit chain (system-sealed) survives a purge: {chain}"
    );

    // An older backup still holds beta's keys until the master key version it is sealed under
    // is retired; after that it does not open at all.
    let check = app.twin(&both);
    ok(check.cli(&["restore", before.to_str().expect("path")]));
    let doc = ok(check.cli(&["subject", "export", "--phone", "0612345678", "--tenant", "beta"]));
    assert!(
        doc.contains("For beta"),
        "before retiring, the old backup still opens: {doc}"
    );
    ok(app.cli(&["key", "rotate"]));
    ok(app.cli(&["key", "retire", "--version", "1"]));
    app.stop();
    let gone = app.twin(&both);
    std::fs::copy(app.path("master.key"), gone.path("master.key")).expect("the key file now");
    let why = failed(gone.cli(&["restore", before.to_str().expect("path")]));
    assert!(why.contains("master key version 1"), "{why}");

    // A store whose key store is gone is refused, not given new keys that open nothing.
    std::fs::remove_file(app.state_dir().join("keys")).expect("key store");
    let why = failed(app.cli(&["status"]));
    assert!(why.contains("keys: missing") && why.contains("restore"), "{why}");
}

#[test]
fn a_rotation_without_serve_re_seals_everything_before_it_returns() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;Before the rotation\n");
    app.final_report("acme", "a", 1);
    ok(app.cli(&["blocklist", "add", "--tenant", "acme", "--phone", "0611111111"]));
    app.stop();
    let said = ok(app.cli(&["key", "rotate"]));
    assert!(said.contains("nothing to re-seal"), "{said}");
    assert!(said.contains("older generations destroyed"), "{said}");
    let doc = ok(app.cli(&["subject", "export", "--phone", "0612345678"]));
    assert!(doc.contains("Before the rotation"), "{doc}");
    let list = ok(app.cli(&["blocklist", "list", "--tenant", "acme"]));
    assert_eq!(list.lines().count(), 2, "a header and the number: {list}");
    assert!(ok(app.cli(&["audit", "verify"])).contains("intact"));
    app.start();
    let status = ok(app.cli(&["key", "status"]));
    assert!(status.contains("nothing to re-seal"), "{status}");
}
