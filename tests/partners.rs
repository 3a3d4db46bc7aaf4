//! Partners through the real binary: an SMPP 3.4 SMSC on the npm `smpp` package (tests/peers/smsc.js).

mod common;

use std::time::Duration;

use common::{Appliance, Smsc, tenant};

/// An appliance whose French numbers go to the loopback SMSC as partner `smsc`.
fn with_smsc(smsc: &Smsc, partner_extra: &str) -> Appliance {
    let app = Appliance::new(&format!(
        "{}\n[partner.smsc]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = 10\nenquire_link = \"5s\"\n{partner_extra}\n\n[[route]]\nprefix = \"+33\"\npartners = [\"smsc\"]\n",
        tenant("acme", ""),
        smsc.port
    ));
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    app
}

/// A batch of `n` distinct French mobiles, each with its own text.
fn many(n: usize) -> Vec<u8> {
    let mut csv = String::from("phone;message\n");
    for i in 0..n {
        csv.push_str(&format!("0612{:06};message {i}\n", i * 10));
    }
    csv.into_bytes()
}

fn status_of(report: &[Vec<String>], phone: &str) -> String {
    report
        .iter()
        .find(|r| r[2] == phone)
        .map(|r| r[4].clone())
        .unwrap_or_else(|| panic!("{phone} not in the report: {report:?}"))
}

#[test]
fn a_file_reaches_the_smsc_and_receipts_make_the_report() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[]);
    let mut app = with_smsc(&smsc, "");
    app.start();
    let long_gsm = "Ceci est un long message de test qui doit partir en plusieurs parties, avec des accents é è à et un euro €, pour verifier que le SMSC recolle le texte d'origine sans perte ni doublon. Fin.";
    let long_ucs2 = "Привет! Это длинное сообщение в UCS-2, которое не помещается в один SMS и должно прийти целиком 😀 после склейки.";
    let batch = format!(
        "phone;message\n0612340000;Bonjour\n0612340402;undeliverable\n0612340403;expires\n0612340404;bad number\n0612340405;receipt first\n0612340010;{long_gsm}\n0612340011;{long_ucs2}\n"
    );
    app.drop_file("acme", "june.csv", batch.as_bytes());
    let result = app.result("acme", "june");
    assert!(result[1..].iter().all(|r| r[3] == "queued"), "{result:?}");

    let report = app.final_report("acme", "june", 7);
    assert_eq!(status_of(&report, "+33612340000"), "delivered");
    assert_eq!(status_of(&report, "+33612340402"), "undeliverable");
    assert_eq!(status_of(&report, "+33612340403"), "expired");
    assert_eq!(status_of(&report, "+33612340404"), "rejected");
    assert_eq!(
        status_of(&report, "+33612340405"),
        "delivered",
        "a receipt before its response still counts"
    );
    assert_eq!(status_of(&report, "+33612340010"), "delivered");
    assert_eq!(status_of(&report, "+33612340011"), "delivered");
    let row = report.iter().find(|r| r[2] == "+33612340000").expect("row");
    assert_eq!(row[5], "smsc", "partner column");

    // What the SMSC saw: the right binding, addresses, codings, and long texts whole again.
    let binds = smsc.of("bind");
    assert_eq!(binds[0]["command"], "bind_transceiver");
    let messages = smsc.of("message");
    let gsm = messages
        .iter()
        .find(|m| m["to"] == "33612340010")
        .expect("long GSM message");
    assert_eq!(gsm["text"], long_gsm);
    assert_eq!(gsm["parts"], 2);
    let ucs2 = messages
        .iter()
        .find(|m| m["to"] == "33612340011")
        .expect("long UCS-2 message");
    assert_eq!(ucs2["text"], long_ucs2);
    assert!(ucs2["parts"].as_u64().is_some_and(|p| p >= 2));
    let submits = smsc.of("submit");
    let first = submits.iter().find(|s| s["to"] == "33612340000").expect("submit");
    assert_eq!(first["from"], "ACME");
    assert_eq!(first["dc"], 0);
    assert_eq!(first["registered"], 1);
    // validity_period: 48 h (the tenant's default `validity`) after the send, as the SMSC read it
    let validity: jiff::Timestamp = first["validity"].as_str().expect("validity").parse().expect("a time");
    let ahead = validity.as_second() - jiff::Timestamp::now().as_second();
    assert!((47 * 3600..=48 * 3600).contains(&ahead), "{first}");
    assert!(
        submits
            .iter()
            .filter(|s| s["to"] == "33612340011")
            .all(|s| s["dc"] == 8)
    );
    // every receipt was acknowledged with OK, and only after it was recorded
    let acks = smsc.wait("receipt_ack", 8, Duration::from_secs(10));
    assert!(acks.iter().all(|a| a["status"] == 0), "{acks:?}");

    assert!(app.stop().success());
    smsc.wait("unbind", 1, Duration::from_secs(5));
}

#[test]
fn tls_binds_in_transmitter_receiver_pairs_and_long_messages_in_sar_parts() {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = common::test_ca(dir.path());
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();
    let smsc = Smsc::start(
        dir.path(),
        &[("SMSC_TLS_CERT", &path(&cert)), ("SMSC_TLS_KEY", &path(&key))],
    );
    let mut app = with_smsc(
        &smsc,
        "tls = true\nbind = \"transmitter+receiver\"\nbinds = 2\nconcatenation = \"sar\"\n",
    );
    // The SMSC's certificate is signed by the test CA, given as the system's roots.
    app.start_with_env(&[("SSL_CERT_FILE", &path(&ca))]);
    let long = "Un message assez long pour partir en plusieurs parties avec les TLV SAR plutot qu'un en-tete UDH, que le SMSC recolle dans l'ordre, sans perte ni doublon, meme quand les parties passent par deux connexions TLS. Fin.";
    app.drop_file(
        "acme",
        "tls.csv",
        format!("phone;message\n0612340000;Bonjour\n0612340010;{long}\n").as_bytes(),
    );
    let report = app.final_report("acme", "tls", 2);
    // the receipts came back on the receiver binds
    assert_eq!(status_of(&report, "+33612340000"), "delivered");
    assert_eq!(status_of(&report, "+33612340010"), "delivered");

    let binds = smsc.of("bind");
    let count = |command: &str| binds.iter().filter(|b| b["command"] == command).count();
    assert_eq!(
        (
            count("bind_transmitter"),
            count("bind_receiver"),
            count("bind_transceiver")
        ),
        (2, 2, 0),
        "{binds:?}"
    );
    let message = smsc
        .of("message")
        .into_iter()
        .find(|m| m["to"] == "33612340010")
        .expect("the long message, whole");
    assert_eq!(message["text"], long);
    assert_eq!(message["parts"], 2);
    let submits = smsc.of("submit");
    let parts: Vec<_> = submits.iter().filter(|s| s["to"] == "33612340010").collect();
    assert_eq!(parts.len(), 2);
    assert!(
        parts.iter().all(|s| s["sar"] == true && s["esm"] == 0),
        "SAR TLVs, no UDH: {parts:?}"
    );
    let acks = smsc.wait("receipt_ack", 2, Duration::from_secs(10));
    assert!(acks.iter().all(|a| a["status"] == 0), "{acks:?}");
    assert!(app.stop().success());
    smsc.wait("unbind", 4, Duration::from_secs(5));
}

#[test]
fn receipt_ids_match_in_decimal_with_zeros_and_other_case() {
    let dir = tempfile::tempdir().expect("dir");
    for format in ["decimal", "hex-upper-zeros"] {
        let smsc = Smsc::start(
            dir.path(),
            &[("SMSC_RECEIPT_ID_FORMAT", format), ("SMSC_RECEIPT_TLVS", "0")],
        );
        let mut app = with_smsc(&smsc, "");
        app.start();
        app.drop_file(
            "acme",
            "ids.csv",
            b"phone;message\n0612340000;one\n0612340001;two\n0612340002;three\n",
        );
        let report = app.final_report("acme", "ids", 3);
        assert!(report[1..].iter().all(|r| r[4] == "delivered"), "{format}: {report:?}");
    }
}

#[test]
fn a_wrong_password_is_refused_and_retried_not_lost() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[("SMSC_PASSWORD", "other")]);
    let mut app = with_smsc(&smsc, "response_timeout = \"2s\"");
    app.start();
    app.drop_file("acme", "wait.csv", b"phone;message\n0612340000;waits for a bind\n");
    app.result("acme", "wait");
    smsc.wait("bind_refused", 1, Duration::from_secs(10));
    common::wait_log(&app, "SMPP connect failed", Duration::from_secs(10));
    let log = app.log();
    assert!(!log.contains("secret"), "a password is never logged");
    // The message is not lost: it waits, queued.
    let status = String::from_utf8_lossy(&app.cli(&["batch", "list"]).stdout).into_owned();
    assert!(status.contains("wait.csv"), "{status}");
    assert!(smsc.of("submit").is_empty());
}

#[test]
fn thousands_of_messages_flow_through_the_window() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[]);
    let mut app = with_smsc(&smsc, "");
    app.start();
    app.drop_file("acme", "many.csv", &many(3000));
    let report = app.final_report("acme", "many", 3000);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"));
    assert_eq!(smsc.of("submit").len(), 3000, "each sent once");
}

#[test]
fn sigkill_mid_dispatch_resends_at_most_the_window() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[]);
    let mut app = with_smsc(&smsc, "");
    let n = 100_000;
    app.start();
    app.drop_file("acme", "crash.csv", &many(n));
    app.result("acme", "crash");
    smsc.wait("submit", 20_000, Duration::from_secs(120));
    app.kill();
    let before = smsc.of("submit").len();
    assert!(before < n, "the kill came mid-dispatch");
    app.start();
    let report = app.final_report("acme", "crash", n);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"), "nothing lost");
    let submits = smsc.of("submit");
    let distinct: std::collections::HashSet<&str> = submits.iter().filter_map(|s| s["to"].as_str()).collect();
    assert_eq!(distinct.len(), n, "every message reached the SMSC");
    let twice = submits.len() - n;
    assert!(twice <= 10, "at most `window` (10) sent twice, not {twice}");
}

#[test]
fn throttling_is_answered_by_slowing_down() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[("SMSC_THROTTLE_TPS", "300")]);
    let mut app = with_smsc(&smsc, "");
    app.start();
    app.drop_file("acme", "burst.csv", &many(1500));
    let report = app.final_report("acme", "burst", 1500);
    assert!(
        report[1..].iter().all(|r| r[4] == "delivered"),
        "throttled messages are retried, not lost"
    );
    let throttled = smsc.of("throttled").len();
    assert!(throttled > 0, "the SMSC did throttle");
    // Each ESME_RTHROTTLED pauses the partner for a second: at most the window (10) is refused
    // per second of sending (1,500 at 300/s: about 5 s, 60 with a margin for retries). A client
    // that did not slow down would be refused everything past 300 each second: over 1,000.
    let accepted = smsc.of("submit").len();
    assert_eq!(accepted, 1500, "each message accepted once");
    assert!(throttled <= 60, "{throttled} throttled for {accepted} accepted");
}

#[test]
fn a_connection_dropped_mid_window_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[("SMSC_DROP_AFTER", "700")]);
    // The submit_sm the SMSC took and never answered count as lost after response_timeout.
    let mut app = with_smsc(&smsc, "response_timeout = \"3s\"");
    app.start();
    app.drop_file("acme", "drop.csv", &many(2000));
    let report = app.final_report("acme", "drop", 2000);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"), "nothing lost");
    assert_eq!(smsc.of("drop").len(), 1, "the SMSC dropped the connection once");
    assert!(smsc.of("bind").len() >= 2, "and smsdrop bound again");
    common::wait_log(&app, "SMPP connection lost; reconnecting", Duration::from_secs(5));
    let submits = smsc.of("submit");
    let distinct: std::collections::HashSet<&str> = submits.iter().filter_map(|s| s["to"].as_str()).collect();
    assert_eq!(distinct.len(), 2000);
    assert!(submits.len() - 2000 <= 10, "at most the window sent twice");
}

/// Reads every `replies-*.csv` in a tenant's outbox, oldest first, header rows dropped.
fn replies(app: &Appliance, tenant: &str) -> Vec<Vec<String>> {
    let mut names: Vec<_> = std::fs::read_dir(app.outbox(tenant))
        .expect("outbox")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("replies-") && n.ends_with(".csv"))
        .collect();
    names.sort();
    let mut rows = Vec::new();
    for n in names {
        let file = common::parse_csv(&std::fs::read(app.outbox(tenant).join(&n)).expect("replies"), b';');
        assert_eq!(file[0], ["received_at", "from", "to", "text", "message_id"], "{n}");
        rows.extend(file.into_iter().skip(1));
    }
    rows
}

fn wait_replies(app: &Appliance, tenant: &str, n: usize) -> Vec<Vec<String>> {
    common::poll(
        Duration::from_secs(20),
        || Some(replies(app, tenant)).filter(|r| r.len() >= n),
        || {
            format!(
                "{} of {n} replies for {tenant}; log:\n{}",
                replies(app, tenant).len(),
                app.log()
            )
        },
    )
}

fn message_id_of(report: &[Vec<String>], phone: &str) -> String {
    report
        .iter()
        .find(|r| r[2] == phone)
        .map(|r| r[3].clone())
        .expect("row")
}

#[test]
fn replies_reach_the_outbox_and_stop_blocklists() {
    let dir = tempfile::tempdir().expect("dir");
    let mut smsc = Smsc::start(dir.path(), &[]);
    let mut app = with_smsc(&smsc, "");
    app.start();
    app.drop_file(
        "acme",
        "promo.csv",
        b"phone;message\n0612340000;Soldes!\n0612340001;Soldes aussi\n",
    );
    let report = app.final_report("acme", "promo", 2);
    smsc.mo("+33612340000", "ACME", "Oui merci 😀");
    smsc.mo("+33612340001", "ACME", "Stop.");
    smsc.mo("+33699990000", "ACME", "who is this?");
    let acks = smsc.wait("mo_ack", 3, Duration::from_secs(10));
    assert!(
        acks.iter().all(|a| a["status"] == 0),
        "acknowledged once durable: {acks:?}"
    );

    let rows = wait_replies(&app, "acme", 3);
    let of = |phone: &str| {
        rows.iter()
            .find(|r| r[1] == phone)
            .unwrap_or_else(|| panic!("{phone}: {rows:?}"))
    };
    let yes = of("+33612340000");
    assert_eq!(yes[2], "ACME");
    assert_eq!(yes[3], "Oui merci 😀", "a UCS-2 reply reads back whole");
    assert_eq!(yes[4], message_id_of(&report, "+33612340000"), "the message it answers");
    assert!(yes[0].ends_with('Z') && yes[0].len() == 20, "{yes:?}");
    assert_eq!(of("+33612340001")[4], message_id_of(&report, "+33612340001"));
    assert_eq!(of("+33699990000")[4], "", "a number never sent to answers no message");

    // STOP put the number on the blocklist: the next batch gets `blocklisted` for it.
    app.drop_file(
        "acme",
        "next.csv",
        b"phone;message\n0612340001;Encore\n0612340002;Nouveau\n",
    );
    let result = app.result("acme", "next");
    assert_eq!(result[1][3..5], ["rejected", "blocklisted"], "{result:?}");
    assert_eq!(result[2][3], "queued");
    let list = String::from_utf8_lossy(&app.cli(&["blocklist", "list", "--tenant", "acme"]).stdout).into_owned();
    assert!(list.contains("mo:STOP"), "{list}");

    // Nothing of the replies in clear in the store.
    assert!(app.stop().success());
    let db = std::fs::read(app.state_dir().join("smsdrop.redb")).expect("db");
    for needle in ["Oui merci", "who is this", "33699990000"] {
        assert!(
            memchr::memmem::find(&db, needle.as_bytes()).is_none(),
            "{needle} in clear"
        );
    }
}

#[test]
fn a_reply_goes_to_the_tenant_that_sent_to_the_number() {
    let dir = tempfile::tempdir().expect("dir");
    let mut smsc = Smsc::start(dir.path(), &[]);
    let beta = "\n[tenant.beta]\ndefault_region = \"FR\"\nsender = \"BETA\"\nsettle = \"200ms\"\nreport_interval = \"1s\"\noptout_keywords = [\"arret\"]\n";
    let mut app = Appliance::new(&format!(
        "{}{beta}\n[partner.smsc]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\n\n[[route]]\nprefix = \"+33\"\npartners = [\"smsc\"]\n",
        tenant("acme", ""),
        smsc.port
    ));
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612340000;from acme\n");
    let a = app.final_report("acme", "a", 1);
    app.drop_file("beta", "b.csv", b"phone;message\n0612340000;from beta\n");
    let b = app.final_report("beta", "b", 1);
    // Sent to ACME: acme's, although beta wrote to the number last.
    smsc.mo("+33612340000", "ACME", "to acme");
    // Sent to a short code that is nobody's sender: the tenant that wrote to the number last.
    smsc.mo("+33612340000", "36180", "ARRET");
    let acme = wait_replies(&app, "acme", 1);
    let beta_rows = wait_replies(&app, "beta", 1);
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0][3], "to acme");
    assert_eq!(acme[0][4], message_id_of(&a, "+33612340000"));
    assert_eq!(beta_rows[0][3], "ARRET");
    assert_eq!(beta_rows[0][4], message_id_of(&b, "+33612340000"));
    // beta's own keyword blocklists the number for beta only.
    app.drop_file("beta", "b2.csv", b"phone;message\n0612340000;again\n");
    assert_eq!(app.result("beta", "b2")[1][4], "blocklisted");
    app.drop_file("acme", "a2.csv", b"phone;message\n0612340000;again\n");
    assert_eq!(app.result("acme", "a2")[1][3], "queued");
}

/// `n` distinct French mobiles from `from` on (ending in 9: none of the SMSC's special numbers).
fn numbers(from: usize, n: usize) -> Vec<u8> {
    let mut csv = String::from("phone;message\n");
    for i in from..from + n {
        csv.push_str(&format!("0613{i:05}9;message {i}\n"));
    }
    csv.into_bytes()
}

/// The health column of a partner in `smsdrop status`.
fn health_of(app: &Appliance, partner: &str) -> String {
    let status = String::from_utf8_lossy(&app.cli(&["status"]).stdout).into_owned();
    status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(partner))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| panic!("{partner} not in status:\n{status}"))
}

/// Sends small batches until the partner is back in its routes (probes are real messages).
fn until_up(app: &Appliance, partner: &str, next: &mut usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while health_of(app, partner) != "up" {
        assert!(
            std::time::Instant::now() < deadline,
            "{partner} never came back:\n{}",
            app.log()
        );
        let stem = format!("probe{next}");
        app.drop_file("acme", &format!("{stem}.csv"), &numbers(*next, 4));
        app.final_report("acme", &stem, 4);
        *next += 4;
    }
}

#[test]
fn failover_from_a_dead_or_slow_smsc_and_back() {
    let dir = tempfile::tempdir().expect("dir");
    let smtp_port = common::reserve();
    let backup = Smsc::start(dir.path(), &[]);
    let primary_port = common::reserve(); // held, and nothing listens there yet: the primary is dead
    let smpp = |id: &str, port: u16, extra: &str| {
        format!(
            "\n[partner.{id}]\nkind = \"smpp\"\naddress = \"127.0.0.1:{port}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = 10\n{extra}\n"
        )
    };
    let mut app = Appliance::new(&format!(
        "{}\n[email]\nsmtp_url = \"smtp://127.0.0.1:{}\"\nfrom = \"smsdrop@example.net\"\nadmin_to = [\"ops@example.net\"]\nmin_interval = \"0s\"\n{}{}\n[[route]]\nprefix = \"+33\"\npartners = [\"primary\", \"backup\"]\n",
        tenant("acme", ""),
        smtp_port.port,
        smpp(
            "primary",
            primary_port.port,
            "response_timeout = \"5s\"\nmax_latency = \"1s\"\nprobe_interval = \"2s\""
        ),
        smpp("backup", backup.port, ""),
    ));
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    let smtp = common::SmtpServer::start(&smtp_port, &app.path("maildir"), None);
    app.start();
    let partner_of = |report: &[Vec<String>]| -> std::collections::BTreeSet<String> {
        report[1..].iter().map(|r| r[5].clone()).collect()
    };

    // 1. The primary is dead: everything goes to the backup, and the operator hears of it.
    app.drop_file("acme", "one.csv", &numbers(0, 20));
    let one = app.final_report("acme", "one", 20);
    assert!(one[1..].iter().all(|r| r[4] == "delivered"), "{one:?}");
    assert_eq!(partner_of(&one), ["backup".to_string()].into());
    assert_eq!(health_of(&app, "primary"), "down");
    // 30 s: under the full suite's load the SMTP server may come up after the first try, and
    // the mail then goes at the first retry (5 s later).
    let down = common::poll(
        Duration::from_secs(30),
        || smtp.mails().into_iter().find(|m| m.subject.contains("partner_down")),
        || "no partner_down mail".into(),
    );
    // Whichever the dispatcher saw first: the refused connection, or the submissions it made
    // fail meanwhile (both are a dead SMSC; which comes first depends on the machine's load).
    assert!(
        down.body.contains("Partner primary is down: no connection")
            || (down.body.contains("Partner primary is down: ") && down.body.contains("submissions failed")),
        "{}",
        down.body
    );
    assert!(down.body.contains("+33"), "names its routes: {}", down.body);

    // 2. It comes back: probed with real messages, taken back, traffic returns to it.
    let mut primary = Smsc::start_on(dir.path(), &primary_port, &[]);
    let mut next = 1000;
    until_up(&app, "primary", &mut next);
    common::poll(
        Duration::from_secs(10),
        || smtp.mails().into_iter().find(|m| m.subject.contains("partner_up")),
        || "no partner_up mail".into(),
    );
    app.drop_file("acme", "two.csv", &numbers(100, 20));
    let two = app.final_report("acme", "two", 20);
    assert_eq!(partner_of(&two), ["primary".to_string()].into());

    // 3. It slows down past max_latency: it leaves the route, the rest goes to the backup.
    primary.control(serde_json::json!({"delay_ms": 2500}));
    app.drop_file("acme", "three.csv", &numbers(200, 200));
    let three = app.final_report("acme", "three", 200);
    assert!(three[1..].iter().all(|r| r[4] == "delivered"), "nothing lost");
    let on_backup = three[1..].iter().filter(|r| r[5] == "backup").count();
    assert!(on_backup >= 150, "{on_backup} of 200 moved to the backup");
    assert_ne!(health_of(&app, "primary"), "up");
    let status = String::from_utf8_lossy(&app.cli(&["status"]).stdout).into_owned();
    assert!(status.contains("median submit latency"), "{status}");

    // 4. Fast again: back in the route.
    primary.control(serde_json::json!({"delay_ms": 0}));
    until_up(&app, "primary", &mut next);
    app.drop_file("acme", "four.csv", &numbers(400, 20));
    assert_eq!(
        partner_of(&app.final_report("acme", "four", 20)),
        ["primary".to_string()].into()
    );

    // Every message reached an SMSC.
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    for s in primary.of("submit").into_iter().chain(backup.of("submit")) {
        seen.insert(s["to"].as_str().unwrap_or_default().to_string());
    }
    for i in (0..20).chain(100..120).chain(200..400).chain(400..420) {
        assert!(seen.contains(&format!("33613{i:05}9")), "{i} never reached an SMSC");
    }
}

#[test]
fn a_message_without_a_receipt_ends_submitted_after_receipt_timeout() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[]);
    let mut app = with_smsc(&smsc, "receipt_timeout = \"2s\"");
    app.start();
    // ...0406: the SMSC takes it and never sends its receipt
    app.drop_file(
        "acme",
        "quiet.csv",
        b"phone;message\n0612340000;answered\n0612340406;never answered\n",
    );
    app.result("acme", "quiet");
    common::wait_log(
        &app,
        "receipts did not come within receipt_timeout",
        Duration::from_secs(20),
    );
    common::wait_log(&app, "final delivery report written", Duration::from_secs(5));
    let report = common::parse_csv(
        &std::fs::read(app.outbox("acme").join("quiet.report.csv")).expect("report"),
        b';',
    );
    assert_eq!(status_of(&report, "+33612340000"), "delivered");
    let quiet = report.iter().find(|r| r[2] == "+33612340406").expect("row");
    assert_eq!(quiet[4], "submitted", "not guessed: {quiet:?}");
    assert!(
        !quiet[6].is_empty() && quiet[7].is_empty(),
        "submitted_at set, done_at empty: {quiet:?}"
    );
    let list = String::from_utf8_lossy(&app.cli(&["batch", "list"]).stdout).into_owned();
    assert!(
        list.lines().any(|l| l.contains("quiet.csv") && l.contains("done")),
        "{list}"
    );
}

/// The HTTP partner's peer and an appliance routing +33 to it (window 4, `partner_extra`), with
/// the webhook on port 0, signed with the secret `hook-secret`: (peer, appliance).
fn with_http_api(dir: &std::path::Path, partner_extra: &str) -> (common::Peer, Appliance) {
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, "hook-secret\n").expect("secret");
    let api = common::Peer::http_api(dir, &secret);
    let app = Appliance::new(&format!(
        "{}\n[partner.web]\nkind = \"http\"\nurl = \"http://127.0.0.1:{}/sms\"\nwindow = 4\nwebhook_listen = \"127.0.0.1:0\"\nwebhook_secret_file = \"{}\"\n{partner_extra}\n\n[[route]]\nprefix = \"+33\"\npartners = [\"web\"]\n",
        tenant("acme", ""),
        api.port,
        secret.display()
    ));
    (api, app)
}

/// Starts the appliance and tells the HTTP partner where its webhook came up: the webhook's port.
fn start_with_webhook(app: &mut Appliance, api: &mut common::Peer) -> u16 {
    app.start();
    let port = app.port("HTTP partner webhook");
    api.set_webhook(&format!("http://127.0.0.1:{port}/smsdrop"));
    port
}

#[test]
fn an_http_partner_takes_messages_and_its_webhook_brings_receipts_and_replies() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut api, mut app) = with_http_api(dir.path(), "token_file = \"web.token\"");
    std::fs::write(app.path("web.token"), "api-token\n").expect("token");
    start_with_webhook(&mut app, &mut api);
    let unicode = "Привет 😀, à bientôt";
    app.drop_file(
        "acme",
        "web.csv",
        format!("phone;message\n0612340000;Bonjour\n0612340402;lost\n0612340404;bad number\n0612340429;slow down\n0612340011;{unicode}\n").as_bytes(),
    );
    let report = app.final_report("acme", "web", 5);
    assert_eq!(status_of(&report, "+33612340000"), "delivered");
    assert_eq!(status_of(&report, "+33612340402"), "undeliverable");
    let bad = report.iter().find(|r| r[2] == "+33612340404").expect("row");
    assert_eq!(bad[4], "rejected");
    assert!(
        bad[8].contains("HTTP 400") && bad[8].contains("invalid destination"),
        "{bad:?}"
    );
    assert_eq!(status_of(&report, "+33612340429"), "delivered", "a 429 is retried");
    assert_eq!(status_of(&report, "+33612340011"), "delivered");

    let submits = api.of("submit");
    let first = submits.iter().find(|s| s["to"] == "+33612340000").expect("request");
    assert_eq!(first["auth"], "Bearer api-token");
    assert_eq!(first["from"], "ACME");
    assert_eq!(first["encoding"], "gsm7");
    assert_eq!(first["smsdrop_id"], message_id_of(&report, "+33612340000"));
    let uni = submits.iter().find(|s| s["to"] == "+33612340011").expect("request");
    assert_eq!(uni["text"], unicode);
    assert_eq!(uni["encoding"], "ucs2");
    assert_eq!(api.of("refused").len(), 2, "the 400 and the first 429");
    assert!(api.of("webhook").iter().all(|w| w["status"] == 200));

    // Replies come by the webhook too; STOP blocklists.
    api.control(serde_json::json!({"mo": {"from": "+33612340000", "to": "ACME", "text": "STOP"}}));
    let rows = wait_replies(&app, "acme", 1);
    assert_eq!(rows[0][1], "+33612340000");
    assert_eq!(rows[0][4], message_id_of(&report, "+33612340000"));
    app.drop_file("acme", "again.csv", b"phone;message\n0612340000;encore\n");
    assert_eq!(app.result("acme", "again")[1][4], "blocklisted");

    // A call without the shared secret's signature is refused.
    api.control(serde_json::json!({"forged": true}));
    let forged = common::poll(
        Duration::from_secs(10),
        || api.of("webhook").into_iter().find(|w| w["kind"] == "forged"),
        || "no forged call".into(),
    );
    assert_eq!(forged["status"], 401);
    common::wait_log(&app, "missing or wrong signature", Duration::from_secs(5));
    assert!(
        !app.log().contains("api-token") && !app.log().contains("hook-secret"),
        "secrets never logged"
    );
}

/// An SMSC with its defaults and an appliance bound to it.
fn bound(dir: &std::path::Path) -> (Smsc, Appliance) {
    let smsc = Smsc::start(dir, &[]);
    let mut app = with_smsc(&smsc, "");
    app.start();
    smsc.wait("bind", 1, Duration::from_secs(10));
    (smsc, app)
}

/// Sends a receipt for `id` (which the SMSC never gave) and returns the status smsdrop answered.
fn orphan_receipt(smsc: &mut Smsc, id: &str) -> serde_json::Value {
    let before = smsc.of("orphan_ack").len();
    smsc.control(serde_json::json!({"receipt": {"id": id, "stat": "DELIVRD"}}));
    smsc.wait("orphan_ack", before + 1, Duration::from_secs(10))[before]["status"].clone()
}

/// Polls the report of `stem` until `phone`'s status is `want`.
fn wait_status(app: &Appliance, stem: &str, phone: &str, want: &str) {
    common::poll(
        Duration::from_secs(30),
        || {
            let bytes = std::fs::read(app.outbox("acme").join(format!("{stem}.report.csv"))).ok()?;
            let rows = common::parse_csv(&bytes, b';');
            rows.iter().any(|r| r[2] == phone && r[4] == want).then_some(())
        },
        || format!("{phone} never {want}; log:\n{}", app.log()),
    );
}

#[test]
fn a_kept_receipt_never_settles_another_message_by_a_coincidence_of_bases() {
    // A receipt for an id smsdrop never saw (its submit_sm_resp was lost in a crash, say) is
    // kept. The next message gets id hex 1536, which is decimal 5430: the same digits in the
    // other base. It asked for no receipt (…0406), so nothing may mark it delivered.
    let dir = tempfile::tempdir().expect("dir");
    let (mut smsc, app) = bound(dir.path());
    assert_eq!(
        orphan_receipt(&mut smsc, "5430"),
        0,
        "kept, and acknowledged once durable"
    );
    smsc.control(serde_json::json!({"next_id": 0x1536}));
    app.drop_file("acme", "june.csv", b"phone;message\n0612340406;no receipt for me\n");
    let submits = smsc.wait("submit", 1, Duration::from_secs(20));
    assert_eq!(submits[0]["id"], "1536");
    wait_status(&app, "june", "+33612340406", "submitted");
    // The marker: a message sent after it gets its own receipt. Its response and receipt come
    // after june's response, with which a kept receipt would have been applied.
    app.drop_file("acme", "after.csv", b"phone;message\n0612340000;after\n");
    assert_eq!(app.final_report("acme", "after", 1)[1][4], "delivered");
    let show = common::ok(app.cli(&["batch", "show", &app.batch_id("june.csv")]));
    let count = |status: &str| {
        show.lines()
            .find_map(|l| l.trim().strip_prefix(status).map(|n| n.trim().to_string()))
            .unwrap_or_default()
    };
    assert_eq!(
        (count("submitted"), count("delivered")),
        ("1".into(), "0".into()),
        "{show}"
    );
}

#[test]
fn generic_nack_is_the_sessions_fault_not_the_messages() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut smsc, app) = bound(dir.path());
    smsc.control(serde_json::json!({"nack": true}));
    app.drop_file("acme", "nack.csv", &many(6));
    smsc.wait("nack", 5, Duration::from_secs(20));
    common::wait_log(
        &app,
        "generic_nack to a submit_sm; restarting the session",
        Duration::from_secs(10),
    );
    // The session is restarted, the partner's health counts the failures.
    smsc.wait("bind", 2, Duration::from_secs(10));
    common::poll(
        Duration::from_secs(20),
        || {
            let status = String::from_utf8_lossy(&app.cli(&["status"]).stdout).into_owned();
            status
                .lines()
                .any(|l| l.starts_with("smsc") && l.contains("down"))
                .then_some(())
        },
        || {
            format!(
                "the partner never went down:\n{}",
                String::from_utf8_lossy(&app.cli(&["status"]).stdout)
            )
        },
    );
    // Nothing was rejected for it; once the SMSC reads our PDUs again, everything goes.
    smsc.control(serde_json::json!({"nack": false}));
    let report = app.final_report("acme", "nack", 6);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"), "{report:?}");
}

#[test]
fn an_unbind_from_the_smsc_is_answered_and_the_session_starts_again() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut smsc, app) = bound(dir.path());
    smsc.control(serde_json::json!({"unbind": true}));
    smsc.wait("unbind_resp", 1, Duration::from_secs(10));
    smsc.wait("bind", 2, Duration::from_secs(10));
    app.drop_file("acme", "after.csv", b"phone;message\n0612340000;after the unbind\n");
    let report = app.final_report("acme", "after", 1);
    assert_eq!(report[1][4], "delivered");
}

#[test]
fn an_smsc_that_breaks_every_session_is_retried_with_growing_back_off() {
    let dir = tempfile::tempdir().expect("dir");
    let mut smsc = Smsc::start(dir.path(), &[]);
    smsc.control(serde_json::json!({"break_after_bind_ms": 100}));
    let mut app = with_smsc(&smsc, "");
    app.start();
    // Back-off 1, 2, 4 s after sessions of 0.1 s: the gaps between binds (the SMSC's clock)
    // grow. A loaded machine may make them longer, never shorter.
    let binds = smsc.wait("bind", 4, Duration::from_secs(40));
    let at: Vec<i64> = binds.iter().map(|b| b["at_ms"].as_i64().expect("at_ms")).collect();
    let gaps: Vec<i64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= 900 && gaps[1] >= 1_900 && gaps[2] >= 3_900,
        "gaps between binds {gaps:?} ms; log:\n{}",
        app.log()
    );
}

#[test]
fn unreadable_and_unknown_receipts_are_acknowledged_and_kept_within_bounds() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut smsc, app) = bound(dir.path());
    // No id at all: acknowledged (a temporary error would have it sent again forever).
    assert_eq!(orphan_receipt(&mut smsc, ""), 0);
    common::wait_log(&app, "incoming deliver_sm not readable", Duration::from_secs(10));
    // A flood of receipts for ids nobody sent: every one answered, at most 10,000 kept.
    smsc.control(serde_json::json!({"flood": {"n": 10_500, "from": 900_000}}));
    let acks = smsc.wait("orphan_ack", 10_501, Duration::from_secs(120));
    assert!(acks.iter().all(|a| a["status"] == 0));
    common::wait_log(&app, "too many kept already", Duration::from_secs(10));
    // And real traffic still flows.
    app.drop_file("acme", "after.csv", b"phone;message\n0612340000;after the flood\n");
    assert_eq!(app.final_report("acme", "after", 1)[1][4], "delivered");
}

#[test]
fn slow_webhook_clients_from_one_address_leave_room_for_receipts_and_a_replay_is_kept_once() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut api, mut app) = with_http_api(dir.path(), "");
    let webhook_port = start_with_webhook(&mut app, &mut api);
    // 100 connections from 127.0.0.2 that send half a request head and then a byte a second.
    let slow = std::process::Command::new(common::venv_python())
        .arg("-c")
        .arg(format!(
            "import socket,time\n\
             s=[]\n\
             for i in range(100):\n\
             \x20 c=socket.create_connection(('127.0.0.1',{webhook_port}),source_address=('127.0.0.2',0)); c.sendall(b'POST / HTTP/1.1\\r\\nHost: x\\r\\n'); s.append(c)\n\
             for t in range(8):\n\
             \x20 time.sleep(1)\n\
             \x20 for c in s:\n\
             \x20\x20 try: c.sendall(b'X')\n\
             \x20\x20 except OSError: pass\n"
        ))
        .spawn()
        .expect("slow clients");
    // They hold what one address may: the next are refused.
    common::wait_log(&app, "too many connections from this address", Duration::from_secs(10));
    app.drop_file(
        "acme",
        "web.csv",
        b"phone;message\n0612340000;one\n0612340001;two\n0612340002;three\n",
    );
    let report = app.final_report("acme", "web", 3);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"), "{report:?}");
    assert!(
        api.of("webhook_error").is_empty(),
        "every receipt call got in at once: {:?}",
        api.of("webhook_error")
    );
    // The same signed MO twice: kept once, both calls answered 200.
    api.control(serde_json::json!({"mo": {"from": "+33612340000", "to": "ACME", "text": "Merci"}, "times": 2}));
    common::poll(
        Duration::from_secs(10),
        || (api.of("webhook").iter().filter(|w| w["kind"] == "mo").count() == 2).then_some(()),
        || format!("{:?}", api.of("webhook")),
    );
    assert!(api.of("webhook").iter().all(|w| w["status"] == 200));
    wait_replies(&app, "acme", 1);
    // The marker: another MO, sent after both, is kept.
    api.control(serde_json::json!({"mo": {"from": "+33612340001", "to": "ACME", "text": "Marker"}}));
    wait_replies(&app, "acme", 2);
    let rows = replies(&app, "acme");
    assert_eq!(rows.len(), 2, "the replay once, then the marker: {rows:?}");
    let log = app.log();
    assert!(
        log.matches("too many connections from this address").count() <= 1,
        "{log}"
    );
    // An oversized body (a megabyte, unsigned) is refused with 413 from its declared length,
    // before a byte of it is read (the client waits for `100 Continue`, which never comes).
    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b'x'; 1 << 20]).expect("body");
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Expect: 100-continue",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", big.display()))
        .arg(format!("http://127.0.0.1:{webhook_port}/"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413");
    let _ = slow.wait_with_output();
}
