//! Hostile clients at the SFTP front door and in watched folders, through the real binary: SSH
//! connections that stall, flood channels and handles, send malformed SFTP packets or ask for
//! what an SFTP appliance never gives; uploads cut short by a full disk; file names and files
//! that try to fool the log or the watcher. The hostile SSH peer is tests/peers/hostile_ssh.py
//! (raw sockets and paramiko).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Appliance, Door, client_key, reserve, sftp_batch, tenant, venv_python, wait_for};

/// An appliance with `[sftp]` (plus `sftp_extra`), tenant acme with one Ed25519 key (plus
/// `acme_extra`) and `tables` after them.
fn door(sftp_extra: &str, acme_extra: &str, tables: &str) -> Door {
    common::door("", sftp_extra, acme_extra, tables)
}

/// The hostile SSH peer: `args` after port and user.
fn hostile(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(venv_python());
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/hostile_ssh.py"))
        .arg(port.to_string())
        .arg("acme")
        .args(args);
    cmd
}

/// `conns` connections of the hostile peer, each with 4 SFTP sessions opening uploads until
/// refused: the peer, still holding them until its stdin closes, and what it reported.
fn hold_handles(d: &Door, conns: u32) -> (std::process::Child, serde_json::Value) {
    let mut held = hostile(
        d.port(),
        &["handles", d.key.to_str().expect("path"), &conns.to_string()],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .expect("hostile peer");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("report");
    (held, serde_json::from_str(&line).expect("JSON"))
}

/// Runs the hostile peer to its end and parses the JSON it prints.
fn hostile_json(port: u16, args: &[&str]) -> serde_json::Value {
    let out = hostile(port, args).output().expect("hostile peer");
    assert!(
        out.status.success(),
        "hostile peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("hostile peer prints JSON")
}

fn upload(d: &Door, name: &str, content: &str) -> std::process::Output {
    let local = d.app.path(&format!("local-{name}"));
    std::fs::write(&local, content).expect("write");
    sftp_batch(
        d.port(),
        &d.key,
        "acme",
        &format!("put {} /inbox/{name}\n", local.display()),
    )
}

#[test]
fn silent_banners_are_cut_at_the_login_deadline_and_one_address_cannot_fill_the_door() {
    let mut d = door("login_deadline = \"2s\"\nmax_unauthenticated_per_ip = 4", "", "");
    d.app.start();
    // Ten connections from 127.0.0.2 that send a banner and then nothing.
    let attack = hostile(d.port(), &["silent", "10", "12", "127.0.0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("hostile peer");
    // The fifth is dropped: four hold every unauthenticated place 127.0.0.2 may have.
    common::wait_log(&d.app, "SFTP connection dropped", Duration::from_secs(10));
    // Meanwhile an honest client from 127.0.0.1 gets in.
    let out = upload(&d, "june.csv", "phone;message\n0612345678;Hello\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = attack.wait_with_output().expect("hostile peer");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let closed: Vec<Option<f64>> = report["closed_after"]
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v.as_f64())
        .collect();
    // Four are let in (the per-address cap) and cut at the 2 s deadline, not at the 10 min idle
    // timeout; the six others are dropped at once.
    let at_deadline = closed
        .iter()
        .filter(|c| c.is_some_and(|t| (1.5..6.0).contains(&t)))
        .count();
    let at_once = closed.iter().filter(|c| c.is_some_and(|t| t < 1.0)).count();
    assert_eq!((at_deadline, at_once), (4, 6), "{closed:?}\n{}", d.app.log());
    assert_eq!(d.app.result("acme", "june")[1][3], "queued");
    d.app.wait_audit("sftp.refused", &[("reason", "login deadline passed")]);
    d.app.wait_audit(
        "sftp.refused",
        &[("reason", "too many unauthenticated connections from this address")],
    );
    // The warning about the dropped connections is not written once per connection.
    let log = d.app.log();
    assert_eq!(
        log.matches("SFTP connection dropped").count(),
        1,
        "one line a minute per address:\n{log}"
    );
}

#[test]
fn one_connection_cannot_open_more_than_max_channels_and_closed_channels_are_released() {
    let mut d = door("", "", "");
    d.app.start();
    let got = hostile_json(d.port(), &["channels", d.key.to_str().expect("path"), "10"]);
    assert_eq!(got["opened"], 4, "{got}");
    assert_eq!(got["refused"], 6, "{got}");
    assert_eq!(
        got["churned"], 40,
        "channels closed before a subsystem are given back: {got}"
    );
    assert_eq!(got["after"], true, "{got}");
    d.app.wait_audit(
        "sftp.denied",
        &[
            ("request", "channel"),
            ("reason", "more than 4 channels on one connection"),
        ],
    );
}

#[test]
fn a_tenant_holds_at_most_max_open_files_across_its_connections() {
    let mut d = door("", "max_open_files = 20", "");
    d.app.start();
    let (mut held, got) = hold_handles(&d, 2);
    assert_eq!(got["opened"], 20, "{got}");
    assert!(
        got["errors"]
            .as_object()
            .expect("errors")
            .keys()
            .all(|e| e.contains("max_open_files")),
        "{got}"
    );
    // While the handles are held, the tenant cannot upload, and the appliance still answers.
    let out = upload(&d, "blocked.csv", "phone;message\n0612345678;Hello\n");
    assert!(!out.status.success(), "the 21st file of the tenant is refused");
    common::ok(d.app.cli(&["status"]));
    drop(held.stdin.take());
    held.wait().expect("hostile peer ends");
    wait_for("handles given back", Duration::from_secs(10), || {
        upload(&d, "after.csv", "phone;message\n0612345678;Hello\n")
            .status
            .success()
    });
    assert_eq!(d.app.result("acme", "after")[1][3], "queued");
}

#[test]
fn clients_cannot_take_the_descriptors_the_store_watcher_and_admin_socket_need() {
    let mut d = door("", "max_open_files = 5000\nmax_sessions = 10", &tenant("files", ""));
    // 400 descriptors: clients may hold 144, 256 are kept back.
    d.app.start_with_nofile(400);
    let (mut held, got) = hold_handles(&d, 3);
    let opened = got["opened"].as_u64().expect("count");
    assert!((100..=144).contains(&opened), "{got}");
    assert!(
        got["errors"]
            .as_object()
            .expect("errors")
            .keys()
            .any(|e| e.contains("server busy")),
        "{got}"
    );
    // Everything else still works: commands, the watcher, ingest, the reply files.
    let status = common::ok(d.app.cli(&["status"]));
    assert!(status.contains("acme"), "{status}");
    d.app
        .drop_file("files", "dropped.csv", b"phone;message\n0612345678;Hello\n");
    assert_eq!(d.app.result("files", "dropped")[1][3], "queued");
    drop(held.stdin.take());
    held.wait().expect("hostile peer ends");
    wait_for("descriptors given back", Duration::from_secs(10), || {
        upload(&d, "after.csv", "phone;message\n0612345678;Hello\n")
            .status
            .success()
    });
    assert!(!d.app.log().contains("Too many open files"), "{}", d.app.log());
}

#[test]
fn every_request_an_sftp_appliance_refuses_gets_an_answer_and_the_tries_are_audited() {
    let mut d = door("", "", "");
    d.app.start();
    let got = hostile_json(d.port(), &["requests", d.key.to_str().expect("path")]);
    for request in ["env", "pty-req", "x11-req", "exec", "shell"] {
        assert_eq!(got[request], "answered", "{request}: {got}");
    }
    assert_eq!(got["tcpip-forward"], "refused", "{got}");
    assert_eq!(got["direct-tcpip"], "refused", "{got}");
    for request in ["exec", "shell", "x11", "tcpip-forward", "direct-tcpip"] {
        d.app.wait_audit("sftp.denied", &[("request", request)]);
    }
}

#[test]
fn malformed_and_overlong_sftp_packets_get_a_status_with_their_id() {
    let mut d = door("", "", "");
    d.app.start();
    let got = hostile_json(d.port(), &["badpackets", d.key.to_str().expect("path")]);
    assert_eq!(got["version"], 2, "VERSION answers INIT: {got}");
    // SSH_FXP_STATUS (101), the request's own id, SSH_FX_BAD_MESSAGE (5)
    assert_eq!(
        got["malformed_write"],
        serde_json::json!({"type": 101, "id": 7, "code": 5}),
        "{got}"
    );
    assert_eq!(
        got["overlong"],
        serde_json::json!({"type": 101, "id": 9, "code": 5}),
        "{got}"
    );
    assert_eq!(got["after_overlong"], "closed", "{got}");
    // The session is over, the appliance is not.
    let out = upload(&d, "june.csv", "phone;message\n0612345678;Hello\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A small tmpfs mounted on `dir` (unmounted when dropped).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_upload_cut_short_by_a_full_disk_is_never_published() {
    let dir = tempfile::tempdir().expect("dir");
    let inbox = dir.path().join("inbox");
    let _disk = Tmpfs::mount(&inbox, "1m");
    // The free-space guard off: this is about a disk that fills up during the upload.
    let mut d = common::door(
        "min_free_space = 0",
        "",
        &format!("inbox = \"{}\"", inbox.display()),
        "",
    );
    d.app.start();
    // 3 MB of valid lines into a 1 MB file system.
    let mut content = String::from("phone;message\n");
    let mut i = 0u64;
    while content.len() < 3 << 20 {
        content.push_str(&format!(
            "06{:08};Message number {i} that takes some room\n",
            10_000_000 + i % 80_000_000
        ));
        i += 1;
    }
    let out = upload(&d, "big.csv", &content);
    assert!(!out.status.success(), "the client is told the upload failed");
    // OpenSSH's client shows the status code only; the message is in the audit entry.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("close remote: Failure"), "{stderr}");
    d.app
        .wait_audit("sftp.upload-refused", &[("file", "big.csv"), ("reason", "no_space")]);
    // Space is back once the temporary is gone: the next upload lands.
    let out = upload(&d, "small.csv", "phone;message\n0612345678;Hello\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.app.result("acme", "small")[1][3], "queued");
    // Taken after it, it is the marker: nothing of big.csv was published, taken or answered.
    let left: Vec<_> = std::fs::read_dir(&inbox)
        .expect("inbox")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!d.app.outbox("acme").join("big.result.csv").exists());
}

#[test]
fn names_with_control_characters_are_refused_and_never_forge_a_log_line() {
    let mut d = door("", "", &tenant("files", ""));
    d.app.start();
    // Over SFTP (paramiko can send any name).
    let local = d.app.path("x.csv");
    std::fs::write(&local, "phone;message\n0612345678;Hello\n").expect("write");
    let out = Command::new(venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/paramiko_client.py"))
        .args([&d.port().to_string(), "acme", "upload", d.key.to_str().expect("path")])
        .arg(&local)
        .arg("/inbox/evil\nINFO forged line.csv")
        .output()
        .expect("paramiko");
    assert!(!out.status.success(), "a name with a newline is refused");
    d.app
        .wait_audit("sftp.denied", &[("path", "/inbox/evil\\nINFO forged line.csv")]);
    // On a shared folder.
    d.app.drop_file(
        "files",
        "bad\nINFO forged too.csv",
        b"phone;message\n0612345678;Hello\n",
    );
    d.app
        .drop_file("files", "fine.csv", b"phone;message\n0612345678;Hello\n");
    assert_eq!(d.app.result("files", "fine")[1][3], "queued");
    let entry = d
        .app
        .wait_audit("inbox.refused", &[("reason", "control characters in the name")]);
    assert_eq!(entry["details"]["file"], "bad\\nINFO forged too.csv");
    assert!(
        d.app.inbox("files").join("bad\nINFO forged too.csv").exists(),
        "left alone"
    );
    let log = d.app.log();
    assert!(!log.lines().any(|l| l.starts_with("INFO forged")), "{log}");
    assert_eq!(
        log.matches("file in the inbox left alone").count(),
        1,
        "reported once:\n{log}"
    );
    for e in std::fs::read_dir(d.app.outbox("files")).expect("outbox").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.chars().any(char::is_control), "{name:?}");
    }
}

#[test]
fn hard_links_special_files_and_links_in_an_inbox_are_left_alone_and_audited() {
    let mut app = Appliance::new(&tenant("plain", "columns = [\"phone\", \"message\"]"));
    app.start();
    let inbox = app.inbox("plain");
    wait_for("inbox made", Duration::from_secs(10), || inbox.exists());
    // A file the tenant should never see echoed, linked into a headerless tenant's inbox.
    let secret = app.path("secret.txt");
    std::fs::write(&secret, "0612345678;root:x:0:0:secret\n").expect("secret");
    std::fs::hard_link(&secret, inbox.join("link.csv")).expect("hard link");
    std::os::unix::fs::symlink(&secret, inbox.join("sym.csv")).expect("symlink");
    let fifo = std::ffi::CString::new(inbox.join("fifo.csv").to_str().expect("path")).expect("c path");
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    // A file another local user owns (the inbox is root's, smsdrop runs as root here).
    let foreign = app.path("foreign.csv");
    std::fs::write(&foreign, "0612345678;From someone else\n").expect("write");
    std::os::unix::fs::chown(&foreign, Some(12345), None).expect("chown");
    std::fs::rename(&foreign, inbox.join("foreign.csv")).expect("into the inbox");
    app.drop_file("plain", "fine.csv", b"0612345678;Hello\n");
    assert_eq!(app.result("plain", "fine")[1][3], "queued");
    app.wait_audit(
        "inbox.refused",
        &[
            ("file", "foreign.csv"),
            (
                "reason",
                "owned by uid 12345, neither smsdrop's, root's nor the inbox's owner",
            ),
        ],
    );
    app.wait_audit(
        "inbox.refused",
        &[("file", "link.csv"), ("reason", "a hard link (2 links)")],
    );
    app.wait_audit(
        "inbox.refused",
        &[("file", "sym.csv"), ("reason", "not a regular file (a symbolic link)")],
    );
    app.wait_audit(
        "inbox.refused",
        &[("file", "fifo.csv"), ("reason", "not a regular file (a special file)")],
    );
    // A full rescan after the refusals, then a file taken: had a refused one been taken, it
    // would have been by then.
    app.after_two_rounds("inbox-watch");
    app.drop_file("plain", "after.csv", b"0612345678;After\n");
    app.result("plain", "after");
    for name in ["link.csv", "sym.csv", "fifo.csv", "foreign.csv"] {
        assert!(inbox.join(name).symlink_metadata().is_ok(), "{name} left where it was");
    }
    assert!(!app.outbox("plain").join("link.result.csv").exists());
    assert_eq!(
        std::fs::read_to_string(&secret).expect("secret"),
        "0612345678;root:x:0:0:secret\n"
    );
}

#[test]
fn reply_files_guard_formula_cells_and_keep_numbers_and_refs_matchable() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.drop_file(
        "acme",
        "june.csv",
        "phone;message;ref\n\
         0612345678;Hello;=HYPERLINK(\"http://evil\")\n\
         =1+2;Hello;@SUM(A1)\n\
         +33 6 12 34 56 79;Hello;-42\n\
         0612345680;Hello;'quoted\n\
         0612345681;Hello;INV-7\n"
            .as_bytes(),
    );
    let rows = app.result("acme", "june");
    let cells: Vec<(&str, &str)> = rows[1..].iter().map(|r| (r[1].as_str(), r[2].as_str())).collect();
    assert_eq!(
        cells,
        [
            ("'=HYPERLINK(\"http://evil\")", "+33612345678"),
            ("'@SUM(A1)", "'=1+2"),
            ("-42", "+33612345679"),
            ("''quoted", "+33612345680"),
            ("INV-7", "+33612345681"),
        ]
    );
    // The report echoes the same guarded refs.
    let report = app.final_report("acme", "june", 4);
    assert_eq!(report[1][1], "'=HYPERLINK(\"http://evil\")");
}

#[test]
fn cr_only_files_long_messages_and_wide_headers_get_the_right_codes() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    // An old Mac export: CR only.
    app.drop_file("acme", "mac.csv", b"phone;message\r0612345678;one\r\r0612345679;two\r");
    let rows = app.result("acme", "mac");
    let lines: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(lines, ["2", "4"]);
    // A text of 9,000 bytes is a message too long, not a broken line.
    let long = format!("phone;message\n0612345678;{}\n", "a".repeat(9000));
    app.drop_file("acme", "long.csv", long.as_bytes());
    let rows = app.result("acme", "long");
    assert_eq!(
        (rows[1][3].as_str(), rows[1][4].as_str()),
        ("rejected", "message_too_long")
    );
    // A header of 5,000 columns is refused as such, not as a missing column.
    let mut wide = String::from("phone;message");
    for i in 0..5000 {
        wide.push_str(&format!(";c{i}"));
    }
    wide.push_str("\n0612345678;Hello\n");
    app.drop_file("acme", "wide.csv", wide.as_bytes());
    let rows = app.result("acme", "wide");
    assert_eq!(
        (rows[1][0].as_str(), rows[1][4].as_str()),
        ("0", "unreadable"),
        "{rows:?}"
    );
    common::wait_log(&app, "more than 4,096 columns", Duration::from_secs(10));
}

#[test]
fn a_burst_of_refusals_gives_a_digest_that_keeps_each_refusals_details() {
    let smtp_port = reserve();
    let port = smtp_port.port;
    let keys = tempfile::tempdir().expect("dir");
    let (stranger, stranger_public) = client_key(keys.path(), "id_stranger", "ed25519");
    let print = {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(stranger.with_extension("pub"))
            .output()
            .expect("ssh-keygen -l");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .expect("fingerprint")
            .to_string()
    };
    assert!(!stranger_public.is_empty());
    let mut d = door(
        "",
        "",
        &format!(
            "\n[defender]\nscore_limit = 1000\n\n[email]\nsmtp_url = \"smtp://127.0.0.1:{port}\"\nfrom = \"smsdrop <smsdrop@example.net>\"\nadmin_to = [\"ops@example.net\"]\nmin_interval = \"5s\"\ntimeout = \"3s\"\n"
        ),
    );
    let smtp = common::SmtpServer::start(&smtp_port, &d.app.path("maildir"), None);
    d.app.start();
    // Six tries with a key the tenant does not have: one alert mail, then a digest.
    for _ in 0..6 {
        let out = sftp_batch(d.port(), &stranger, "acme", "ls /\n");
        assert!(!out.status.success());
    }
    let mails = smtp.wait_mails(2, Duration::from_secs(30));
    let digest = mails
        .iter()
        .find(|m| m.subject.contains("auth_rejected") && m.subject.contains("more alert"))
        .unwrap_or_else(|| panic!("no digest: {:#?}", mails.iter().map(|m| &m.subject).collect::<Vec<_>>()));
    assert!(
        digest.body.contains(&format!("key fingerprint: {print}")),
        "{}",
        digest.body
    );
    assert!(digest.body.contains("method: publickey"), "{}", digest.body);
    assert!(digest.body.contains("key type: ssh-ed25519"), "{}", digest.body);
    assert!(digest.body.contains("source: 127.0.0.1:"), "{}", digest.body);
    assert!(
        digest.body.contains("smsdrop audit export"),
        "advice fits the kind:\n{}",
        digest.body
    );
    assert!(!digest.body.contains("batch list"), "{}", digest.body);
}

#[test]
fn two_files_with_one_stem_never_overwrite_each_others_answers() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.drop_file("acme", "june.csv", b"phone;message;ref\n0612345678;Hello;first\n");
    assert_eq!(app.result("acme", "june")[1][1], "first");
    // Another file with the same stem: its answers go under its whole name.
    app.drop_file("acme", "june.txt", b"phone;message;ref\n0612345679;Hello;second\n");
    assert_eq!(app.result("acme", "june.txt")[1][1], "second");
    assert_eq!(
        app.result("acme", "june")[1][1],
        "first",
        "the first answer is still there"
    );
    let first = app.final_report("acme", "june", 1);
    let second = app.final_report("acme", "june.txt", 1);
    assert_eq!((first[1][1].as_str(), second[1][1].as_str()), ("first", "second"));
    common::wait_log(&app, "another batch answers under june", Duration::from_secs(5));
    // The same name again once the first is done: the ERP's own name, as before.
    app.drop_file("acme", "june.csv", b"phone;message;ref\n0612345670;Hello;third\n");
    wait_for("june.csv answered again", Duration::from_secs(30), || {
        std::fs::read(app.outbox("acme").join("june.result.csv"))
            .map(|b| common::parse_csv(&b, b';').get(1).is_some_and(|r| r[1] == "third"))
            .unwrap_or(false)
    });
}

/// Bytes free on the file system of `path` (the appliance's own measure).
fn free_bytes(path: &std::path::Path) -> u64 {
    smsdrop::disk::free_bytes(path).expect("statvfs")
}

/// `GET path` on 127.0.0.1:port: (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let (code, text) = common::http_get(port, path);
    (code, text.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

#[test]
fn below_min_free_space_new_work_waits_and_everything_resumes_when_space_is_back() {
    let mut d = common::door(
        "min_free_space = \"100 MiB\"",
        "",
        "",
        "\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    // state_dir (with the inboxes under it) on a 256 MiB file system of its own.
    let _disk = Tmpfs::mount(&d.app.state_dir(), "256m");
    d.app.start();
    let metrics = d.app.port("metrics");
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    // Fill it to 50 MiB free, once the dispatch log's files are written whole (two of 32 MiB).
    let state = d.app.state_dir();
    let mut last = 0;
    wait_for("the state_dir to stop growing", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = free_bytes(&state);
        std::mem::replace(&mut last, now) == now
    });
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 1 << 20];
        while free_bytes(&state) > 51 << 20 {
            f.write_all(&chunk).expect("fill");
        }
    }
    common::wait_log(&d.app, "disk_low", Duration::from_secs(10));
    let (status, body) = http_get(metrics, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("disk low"), "{body}");
    // An upload is refused when opened; a dropped file waits in the inbox.
    let out = upload(&d, "up.csv", "phone;message\n0612345678;Hello\n");
    assert!(!out.status.success(), "refused while low");
    d.app
        .wait_audit("sftp.upload-refused", &[("file", "up.csv"), ("reason", "disk_low")]);
    // Written beside it under a hidden name, then renamed in (the staging folder of
    // `drop_file` is on another file system).
    let dropped = d.app.inbox("acme").join("dropped.csv");
    let hidden = d.app.inbox("acme").join(".dropped.tmp");
    std::fs::write(&hidden, "phone;message\n0612345679;Hello\n").expect("write");
    std::fs::rename(&hidden, &dropped).expect("into the inbox");
    // Complete, and not taken: the watcher says it waits for space.
    common::wait_log(
        &d.app,
        "file complete; it waits in the inbox until the disk is above min_free_space",
        Duration::from_secs(10),
    );
    assert!(d.app.log().contains("file=dropped.csv"), "{}", d.app.log());
    assert!(dropped.exists(), "not taken while space is low");
    // Space comes back: everything resumes by itself.
    std::fs::remove_file(&filler).expect("free the space");
    assert_eq!(d.app.result("acme", "dropped")[1][3], "queued");
    common::wait_log(&d.app, "back above min_free_space", Duration::from_secs(10));
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    let out = upload(&d, "up.csv", "phone;message\n0612345678;Hello\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.app.result("acme", "up")[1][3], "queued");
}

#[test]
fn serve_does_not_claim_to_serve_when_its_dispatch_log_cannot_be_made() {
    let app = Appliance::new(&tenant("acme", ""));
    // 16 MiB: the store fits, the dispatch log's two 32 MiB files do not.
    let _disk = Tmpfs::mount(&app.state_dir(), "16m");
    let mut child = Command::new(common::bin())
        .arg("--config")
        .arg(&app.config)
        .arg("serve")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let status = common::poll(
        Duration::from_secs(30),
        || child.try_wait().ok().flatten(),
        || "serve kept running without its dispatch log".into(),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
    assert!(!status.success(), "{err}");
    assert!(err.contains("dispatch log"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("smsdrop is serving"), "{err}");
}

/// Fills the file system of `dir` to the last byte (with a file in `dir`), and returns it.
fn fill_to_the_brim(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 1 << 16];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0u8]).is_ok() {}
    assert!(free_bytes(dir) < 1 << 16, "the disk is full");
    filler
}

#[test]
fn a_store_that_failed_on_a_full_disk_heals_by_itself_and_nothing_acknowledged_is_lost() {
    // The free-space guard off: this is about the writes that fail when the disk is full.
    // The outbox on another file system: what fails here is the store.
    let outbox = tempfile::tempdir().expect("outbox");
    let mut app = Appliance::new_with(
        "min_free_space = 0",
        &format!(
            "{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            tenant("acme", &format!("outbox = \"{}\"", outbox.path().display()))
        ),
    );
    let state = app.state_dir();
    let _disk = Tmpfs::mount(&state, "128m");
    app.start();
    let metrics = app.port("metrics");
    // One batch acknowledged before the disk fills.
    let before = app.inbox("acme").join(".before.tmp");
    std::fs::write(&before, "phone;message\n0612345670;Before\n").expect("write");
    std::fs::rename(&before, app.inbox("acme").join("before.csv")).expect("into the inbox");
    let first = app.wait_file(&outbox.path().join("before.result.csv"), Duration::from_secs(30));
    assert_eq!(common::parse_csv(&first, b';')[1][3], "queued");
    app.wait_sink(1, Duration::from_secs(30));
    // A big batch waits in the inbox under a hidden name while the disk fills up; then it is
    // let in. Its store commit needs new pages, which the disk cannot give.
    let mut big = String::from("phone;message;ref\n");
    for i in 0..40_000u32 {
        big.push_str(&format!(
            "06{:08};Message number {i} with some text to take room;r{i}\n",
            10_000_000 + i
        ));
    }
    let hidden = app.inbox("acme").join(".big.tmp");
    std::fs::write(&hidden, &big).expect("write");
    let mut last = 0;
    wait_for("the state_dir to stop growing", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = free_bytes(&state);
        std::mem::replace(&mut last, now) == now
    });
    let filler = fill_to_the_brim(&state);
    std::fs::rename(&hidden, app.inbox("acme").join("big.csv")).expect("into the inbox");
    // The store's write fails: the file stays unanswered in the spool, and nothing says queued.
    common::wait_log(&app, "cannot ingest the file", Duration::from_secs(30));
    assert!(!outbox.path().join("big.result.csv").exists());
    // On the full disk the appliance still answers what it holds.
    let out = app.cli(&["status"]);
    assert!(
        out.status.success(),
        "status on a full disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Space comes back: the store opens again by itself, the file is answered and sent.
    std::fs::remove_file(&filler).expect("free the space");
    let rows = common::parse_csv(
        &app.wait_file(&outbox.path().join("big.result.csv"), Duration::from_secs(120)),
        b';',
    );
    assert_eq!(rows.len(), 40_001);
    assert!(rows.iter().skip(1).all(|r| r[3] == "queued"), "every line queued");
    app.wait_sink(40_001, Duration::from_secs(120));
    let log = app.log();
    assert!(log.contains("open again"), "the store was reopened in place:\n{log}");
    assert_eq!(log.matches("smsdrop is serving").count(), 1, "healed without a restart");
    // Nothing acknowledged was lost, nothing was sent twice.
    let sent: Vec<String> = app
        .sink()
        .iter()
        .map(|m| m["to"].as_str().unwrap_or("").to_string())
        .collect();
    let unique: std::collections::HashSet<&String> = sent.iter().collect();
    assert_eq!(unique.len(), 40_001, "every message once");
    assert!(sent.len() <= 40_001 + 64, "duplicates within a window: {}", sent.len());
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    let (_, m) = http_get(metrics, "/metrics");
    assert!(
        m.lines()
            .any(|l| l.starts_with("smsdrop_store_reopened_total ") && !l.ends_with(" 0")),
        "{m}"
    );
    // The audit trail kept what happened meanwhile, and its chain holds.
    app.wait_audit("batch.taken", &[("file", "big.csv")]);
    let out = app.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_result_file_the_full_outbox_refused_is_written_when_space_comes_back() {
    let dir = tempfile::tempdir().expect("dir");
    let outbox = dir.path().join("outbox");
    let _disk = Tmpfs::mount(&outbox, "1m");
    let mut app = Appliance::new_with(
        "min_free_space = 0",
        &format!(
            "{}{}",
            tenant("acme", &format!("outbox = \"{}\"", outbox.display())),
            tenant("beta", "")
        ),
    );
    app.start();
    let filler = fill_to_the_brim(&outbox);
    app.drop_file(
        "acme",
        "june.csv",
        b"phone;message;ref\n0612345670;Hello;a\n0612345671;Hello;b\n",
    );
    common::wait_log(&app, "cannot ingest the file", Duration::from_secs(30));
    // Nothing is sent for a batch the ERP has no answer for, and it is not left half-made. The
    // marker: another tenant's batch, taken after it, is sent.
    app.drop_file("beta", "marker.csv", b"phone;message\n0612345679;marker\n");
    let sent = app.wait_sink(1, Duration::from_secs(30));
    assert!(
        sent.iter().all(|m| m["text"] == "marker"),
        "nothing of june.csv sent before it is answered: {sent:?}"
    );
    let out = app.cli(&["batch", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&filler).expect("free the space");
    let rows = common::parse_csv(
        &app.wait_file(&outbox.join("june.result.csv"), Duration::from_secs(30)),
        b';',
    );
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().skip(1).all(|r| r[3] == "queued"), "{rows:?}");
    // Every message final: none can be sent again.
    app.final_report("beta", "marker", 1);
    common::wait_for("june's messages final", Duration::from_secs(30), || {
        let rows = common::parse_csv(&std::fs::read(outbox.join("june.report.csv")).unwrap_or_default(), b';');
        rows.len() == 3 && rows.iter().skip(1).all(|r| r[4] == "delivered")
    });
    assert_eq!(app.sink().len(), 3, "each message once (june's two and the marker)");
    let out = app.cli(&["batch", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(!list.contains("ingesting"), "no batch left ingesting:\n{list}");
}
