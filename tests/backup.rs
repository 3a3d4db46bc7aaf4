//! Backups through the real binary: `smsdrop backup` while `serve` runs and a 100,000-line batch
//! is being ingested, `smsdrop restore` into an empty state, and the same batches, statuses,
//! blocklists and audit chain afterwards; damaged or cut backups refused; scheduled backups.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Appliance, batches, failed, ok, tenant, wait_for};

fn contains(haystack: &[u8], needle: &str) -> bool {
    memchr::memmem::find(haystack, needle.as_bytes()).is_some()
}

/// What the restored store must give back, read the same way from both.
fn view(app: &Appliance) -> Vec<String> {
    vec![
        ok(app.cli(&["batch", "list"])),
        ok(app.cli(&["blocklist", "list", "--tenant", "bob"])),
        ok(app.cli(&["subject", "export", "--phone", "0612345678"])),
        ok(app.cli(&["batch", "show", "2"])),
    ]
}

fn audit_lines(app: &Appliance) -> Vec<String> {
    ok(app.cli(&["audit", "export"])).lines().map(str::to_string).collect()
}

#[test]
fn a_backup_taken_during_ingest_restores_the_same_queue_statuses_blocklists_and_audit_chain() {
    let tables = format!(
        "{}{}",
        tenant("acme", "hold_above = 1000\nmax_lines = 400000\n"),
        tenant("bob", "")
    );
    let mut app = Appliance::new(&tables);
    app.start();
    app.drop_file(
        "bob",
        "b.csv",
        b"phone;message\n0612345678;Hello Bob\n0698765432;Second one\n",
    );
    app.final_report("bob", "b", 2);
    ok(app.cli(&["blocklist", "add", "--tenant", "bob", "--phone", "0611111111"]));
    // sends are remembered for reply matching about once a second
    wait_for("last_sent written", Duration::from_secs(10), || {
        ok(app.cli(&["subject", "export", "--phone", "0612345678", "--tenant", "bob"])).contains("\"last_sent\": 1")
    });

    // Big enough that its ingest (about a second) outlasts the snapshot's start.
    let lines = 300_000;
    let staging = app.path("big.csv");
    let valid = batches::write_batch(&staging, lines, 0).expect("batch");
    std::fs::rename(&staging, app.inbox("acme").join("big.csv")).expect("drop");
    wait_for("the big batch being ingested", Duration::from_secs(30), || {
        ok(app.cli(&["batch", "list", "--tenant", "acme"])).contains("ingesting")
    });
    let during = app.path("during.backup");
    let said = ok(app.cli(&["backup", during.to_str().expect("path")]));
    assert!(said.contains("backup written to"), "{said}");
    // The backup landed in the middle of the ingest: the batch was not answered yet when the
    // backup was done (and was being ingested before it began).
    assert!(
        !app.outbox("acme").join("big.result.csv").exists(),
        "the ingest was over before the backup ended"
    );
    let result = app.result("acme", "big");
    assert_eq!(
        result.len() as u64,
        valid + 1,
        "the ingest went on: every line accepted"
    );
    let after = app.path("after.backup");
    ok(app.cli(&["backup", after.to_str().expect("path")]));
    app.stop();
    let source = view(&app);
    let source_audit = audit_lines(&app);
    app.wait_audit("admin.backup", &[("result", "ok")]);

    // Nothing in a backup is readable without the key.
    let bytes = std::fs::read(&after).expect("backup");
    assert!(bytes.len() > 1 << 20, "a real snapshot: {} bytes", bytes.len());
    for clear in [
        "Hello Bob",
        "+33612345678",
        "612345678",
        &batches::text(7),
        "acme",
        "batches",
    ] {
        assert!(!contains(&bytes, clear), "`{clear}` in clear in the backup");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&after).expect("meta").permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Restored, the store reads back the same.
    let restored = app.twin(&tables);
    let said = ok(restored.cli(&["restore", after.to_str().expect("path")]));
    assert!(said.contains("3 batches") || said.contains("2 batches"), "{said}");
    assert!(said.contains("audit log intact"), "{said}");
    let restored_audit = audit_lines(&restored);
    let (last, before) = restored_audit.split_last().expect("entries");
    assert!(last.contains("\"backup.restore\""), "{last}");
    assert_eq!(
        before,
        &source_audit[..before.len()],
        "the same chain up to the snapshot"
    );
    assert_eq!(view(&restored), source);
    assert!(
        source[3].contains(&format!("accepted     {valid}")) && source[3].contains("state        held"),
        "{}",
        source[3]
    );
    assert!(ok(restored.cli(&["audit", "verify"])).contains("intact"));

    // The restored appliance serves: its held batch is released and sent.
    let mut restored = restored;
    restored.start();
    ok(restored.cli(&["batch", "release", "2"]));
    restored.final_report("acme", "big", valid as usize);
    restored.stop();

    // The backup taken while the big batch was being ingested: the finished batch whole, the
    // one being ingested whole or not at all.
    let early = app.twin(&tables);
    ok(early.cli(&["restore", during.to_str().expect("path")]));
    let mut early = early;
    early.start();
    let list = ok(early.cli(&["batch", "list"]));
    // Taken mid-ingest, the snapshot holds the batch not at all (a batch cut short is discarded,
    // as after a crash): never a part of it.
    assert!(!list.lines().any(|l| l.contains("big.csv")), "{list}");
    assert!(
        list.lines().any(|l| l.contains("b.csv") && l.contains("done")),
        "{list}"
    );
    assert!(ok(early.cli(&["audit", "verify"])).contains("intact"));
    early.stop();
}

fn damaged_copy(app: &Appliance, from: &Path, name: &str, change: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    let mut bytes = std::fs::read(from).expect("backup");
    change(&mut bytes);
    let path = app.path(name);
    std::fs::write(&path, bytes).expect("copy");
    path
}

#[test]
fn damaged_cut_or_misplaced_backups_are_refused_and_leave_nothing_behind() {
    let tables = tenant("acme", "");
    let mut app = Appliance::new(&tables);
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;Hello\n");
    app.final_report("acme", "a", 1);
    app.stop();
    // offline: no serve, the command opens the store itself
    let good = app.path("good.backup");
    ok(app.cli(&["backup", good.to_str().expect("path")]));
    let again = failed(app.cli(&["backup", good.to_str().expect("path")]));
    assert!(again.contains("never overwrites"), "{again}");

    let target = app.twin(&tables);
    let db = target.state_dir().join("smsdrop.redb");
    let len = std::fs::metadata(&good).expect("meta").len() as usize;
    let flipped = damaged_copy(&app, &good, "flipped.backup", |b| b[len / 2] ^= 0x20);
    let why = failed(target.cli(&["restore", flipped.to_str().expect("path")]));
    // a byte of a sealed frame, or of a frame's length (then the frames no longer line up)
    assert!(
        ["does not open", "cut short", "is damaged"]
            .iter()
            .any(|m| why.contains(m))
            && why.contains("frame"),
        "{why}"
    );
    assert!(!db.exists(), "nothing restored from a damaged backup");
    let cut = damaged_copy(&app, &good, "cut.backup", |b| b.truncate(len - 40));
    let why = failed(target.cli(&["restore", cut.to_str().expect("path")]));
    assert!(why.contains("cut short") || why.contains("does not open"), "{why}");
    assert!(!db.exists());
    let foreign = damaged_copy(&app, &good, "foreign.backup", |b| {
        b[..16].copy_from_slice(b"NOT A BACKUP 123")
    });
    let why = failed(target.cli(&["restore", foreign.to_str().expect("path")]));
    assert!(why.contains("not an smsdrop backup"), "{why}");

    // Another master key opens nothing.
    let stranger = Appliance::new(&tables);
    let why = failed(stranger.cli(&["restore", good.to_str().expect("path")]));
    assert!(why.contains("does not open"), "{why}");

    ok(target.cli(&["restore", good.to_str().expect("path")]));
    let why = failed(target.cli(&["restore", good.to_str().expect("path")]));
    assert!(why.contains("not empty"), "{why}");
    let doc = ok(target.cli(&["subject", "export", "--phone", "0612345678"]));
    assert!(doc.contains("Hello") && doc.contains("delivered"), "{doc}");
}

#[test]
fn scheduled_backups_are_taken_and_pruned() {
    let mut app = Appliance::new(&format!(
        "{}\n[backup]\ndir = \"backups\"\nevery = \"1s\"\nkeep = 2\n",
        tenant("acme", "")
    ));
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612345678;Hello\n");
    app.final_report("acme", "a", 1);
    let dir = app.path("backups");
    let backups = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".backup"))
            .collect();
        names.sort();
        names
    };
    wait_for("four scheduled backups", Duration::from_secs(30), || {
        app.audit()
            .iter()
            .filter(|e| e["action"] == "backup.scheduled" && e["details"]["result"] == "ok")
            .count()
            >= 4
    });
    let status = ok(app.cli(&["status"]));
    let line = |status: &str| -> Vec<String> {
        let line = status.lines().find(|l| l.starts_with("backups ")).unwrap_or_default();
        line.split_whitespace().map(str::to_string).collect()
    };
    let backups_line = line(&status);
    assert!(
        ["idle", "working"].contains(&backups_line[1].as_str()) && backups_line[3] == "0",
        "the backups worker, without errors: {status}"
    );
    assert!(backups_line[2].parse::<u64>().expect("rounds") >= 4, "{status}");
    for worker in ["disk-watch", "sweeper", "resealer"] {
        assert!(status.lines().any(|l| l.starts_with(worker)), "{worker}: {status}");
    }

    // The folder becomes a file: the next backup fails, and status says so until one works.
    let saved = app.path("backups.saved");
    std::fs::rename(&dir, &saved).expect("move the folder away");
    std::fs::write(&dir, b"not a folder").expect("a file in its place");
    wait_for("a failed scheduled backup", Duration::from_secs(30), || {
        app.audit()
            .iter()
            .any(|e| e["action"] == "backup.scheduled" && e["details"]["result"] == "failed")
    });
    let status = ok(app.cli(&["status"]));
    let failing = line(&status);
    assert_eq!(failing[1], "backing-off", "{status}");
    assert_eq!(failing[3], "1", "one failed round: {status}");
    assert!(
        status.contains("scheduled backup") && status.contains("Not a directory"),
        "the last error: {status}"
    );
    app.stop();
    std::fs::remove_file(&dir).expect("the file");
    std::fs::rename(&saved, &dir).expect("the folder back");
    let names = backups();
    assert_eq!(names.len(), 2, "keep = 2: {names:?}");
    assert!(names.iter().all(|n| n.starts_with("smsdrop-2")), "{names:?}");
    let newest = dir.join(names.last().expect("one"));
    let target = app.twin(&tables_of(&app));
    let said = ok(target.cli(&["restore", newest.to_str().expect("path")]));
    assert!(said.contains("1 batches"), "{said}");
}

fn tables_of(app: &Appliance) -> String {
    let text = std::fs::read_to_string(&app.config).expect("config");
    text.find("\n[tenant.")
        .map(|i| text[i..].to_string())
        .unwrap_or_default()
}
