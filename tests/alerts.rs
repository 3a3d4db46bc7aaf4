//! Alerts by mail through the real binary and a real SMTP server (aiosmtpd): recipients and
//! details of each kind, a server that comes late, a restart with mail pending, a silent
//! server, floods turned into digests, STARTTLS with a test CA, nothing in clear on disk.

mod common;

use std::time::{Duration, Instant};

use common::{Appliance, SmtpServer, reserve, tenant, wait_log};

const ADMIN: &str = "ops@example.net";
const ERP: &str = "erp@acme.example";

fn email_table(url: &str, extra: &str) -> String {
    format!(
        "\n[email]\nsmtp_url = \"{url}\"\nfrom = \"smsdrop <smsdrop@example.net>\"\nadmin_to = [\"{ADMIN}\"]\nmin_interval = \"5s\"\ntimeout = \"3s\"\n{extra}\n"
    )
}

fn acme(extra: &str) -> String {
    tenant("acme", &format!("alert_to = [\"{ERP}\"]\n{extra}"))
}

#[test]
fn each_alert_kind_reaches_tenant_and_admin_with_details() {
    let smtp_port = reserve();
    let port = smtp_port.port;
    let mut app = Appliance::new(&format!(
        "{}{}{}",
        acme("hold_above = 2\nmax_per_day = 6"),
        tenant("quiet", ""),
        email_table(&format!("smtp://127.0.0.1:{port}"), "")
    ));
    let smtp = SmtpServer::start(&smtp_port, &app.path("maildir"), None);
    app.start();
    // batch_rejected: a whole file
    app.drop_file("acme", "nocol.csv", b"name;text\nZoe;Hi\n");
    app.result("acme", "nocol");
    // anomaly (first batch to FR, then one to BE), and batch_rejected for many bad lines
    app.drop_file("acme", "fr.csv", b"phone;message\n0612345678;Bonjour\n");
    app.result("acme", "fr");
    app.drop_file("acme", "be.csv", b"phone;message\n+32470123456;Hallo\nbad;x\n");
    app.result("acme", "be");
    // batch_held
    app.drop_file(
        "acme",
        "held.csv",
        b"phone;message\n0612345671;a\n0612345672;b\n0612345673;c\n",
    );
    app.result("acme", "held");
    // quota_exceeded: 1 + 1 + 3 queued today, 2 more would pass 6
    app.drop_file("acme", "over.csv", b"phone;message\n0612345674;a\n0612345675;b\n");
    app.result("acme", "over");
    // a tenant without alert_to: only the admin hears of it
    app.drop_file("quiet", "q.csv", b"x;y\n1;2\n");
    app.result("quiet", "q");

    // Eight mails at once (four kinds, two recipients); the second batch_rejected of each
    // recipient within min_interval (be.csv's bad line; q.csv for the admin) waits for a digest.
    let mails = smtp.wait_mails(8, Duration::from_secs(30));
    let find = |to: &str, kind: &str, needle: &str| {
        mails
            .iter()
            .find(|m| m.to.contains(to) && m.subject.contains(kind) && m.subject.contains(needle))
            .unwrap_or_else(|| panic!("no {kind} mail to {to} about {needle}: {mails:#?}"))
    };
    for to in [ADMIN, ERP] {
        let m = find(to, "batch_rejected:", "nocol.csv");
        assert!(m.from.contains("smsdrop@example.net"));
        for needle in [
            "reason: missing_column",
            "Tenant:  acme",
            "file: nocol.csv",
            "What to do:",
            "phone column",
        ] {
            assert!(m.body.contains(needle), "{needle} missing in:\n{}", m.body);
        }
        let m = find(to, "anomaly:", "never sent to: BE");
        assert!(m.body.contains("new countries: BE"), "{}", m.body);
        let m = find(to, "batch_held:", "held above hold_above");
        assert!(m.body.contains("smsdrop batch release"), "{}", m.body);
        let m = find(to, "quota_exceeded:", "over.csv");
        assert!(m.body.contains("reason: quota_exceeded"), "{}", m.body);
    }
    let all = smtp.wait_mails(10, Duration::from_secs(30));
    let digest = |to: &str| {
        all.iter()
            .find(|m| m.to.contains(to) && m.subject.contains("batch_rejected:") && m.subject.contains("more alert"))
            .unwrap_or_else(|| panic!("no digest for {to}: {all:#?}"))
    };
    let erp = digest(ERP);
    assert!(erp.subject.contains("1 more alert since"), "{}", erp.subject);
    assert!(erp.body.contains("1 of 2 lines of be.csv rejected"), "{}", erp.body);
    assert!(
        !erp.body.contains("q.csv"),
        "tenant quiet's alerts are not acme's business"
    );
    let admin = digest(ADMIN);
    assert!(admin.subject.contains("2 more alerts since"), "{}", admin.subject);
    assert!(
        admin.body.contains("be.csv") && admin.body.contains("q.csv"),
        "{}",
        admin.body
    );
    assert!(app.stop().success());

    // Nothing about a mail in clear under state_dir.
    let mut stack = vec![app.state_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("outbox") {
                    stack.push(p);
                }
                continue;
            }
            let bytes = std::fs::read(&p).expect("read");
            for needle in [ADMIN, ERP, "rejected as a whole", "What to do", "hold_above"] {
                assert!(
                    memchr::memmem::find(&bytes, needle.as_bytes()).is_none(),
                    "{needle} in clear in {}",
                    p.display()
                );
            }
        }
    }
}

#[test]
fn mail_waits_for_a_late_server_and_survives_a_restart_once() {
    let smtp_port = reserve();
    let port = smtp_port.port;
    let mut app = Appliance::new(&format!(
        "{}{}",
        acme(""),
        email_table(&format!("smtp://127.0.0.1:{port}"), "")
    ));
    app.start();
    app.drop_file("acme", "late.csv", b"x;y\n1;2\n");
    app.result("acme", "late");
    wait_log(&app, "will retry", Duration::from_secs(20));
    // The first retry comes 5 s after the first failure, as docs/operations.md says.
    let log = app.log();
    let first = log.lines().find(|l| l.contains("will retry")).expect("a retry line");
    let plain: String = {
        // drop ANSI colour sequences (ESC [ ... m)
        let mut out = String::new();
        let mut chars = first.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    assert!(plain.split_whitespace().any(|w| w == "retry_in_s=5"), "{plain}");
    // stopped with the mail still queued
    assert!(app.stop().success());
    let smtp = SmtpServer::start(&smtp_port, &app.path("maildir"), None);
    app.start();
    wait_log(
        &app,
        "mail queued before the last stop will be sent",
        Duration::from_secs(10),
    );
    let mails = smtp.wait_mails(2, Duration::from_secs(30));
    // Nothing left in the queue: no mail can come again.
    app.mail_settled();
    let mails_after = smtp.mails();
    assert_eq!(
        mails_after.len(),
        mails.len(),
        "each mail arrives once: {mails_after:#?}"
    );
    assert_eq!(mails_after.len(), 2, "one per recipient");
    assert!(mails_after.iter().all(|m| m.subject.contains("late.csv")));

    // and a server that starts after the alert was raised, while smsdrop runs
    drop(smtp);
    let failed = || app.log().matches("mail not sent, will retry").count();
    let before = failed();
    app.drop_file("acme", "later.csv", b"a;b\n1;2\n");
    app.result("acme", "later");
    // Tried while the server was down...
    common::wait_for("a try while the server is down", Duration::from_secs(20), || {
        failed() > before
    });
    // ...and sent once it is up.
    let smtp = SmtpServer::start(&smtp_port, &app.path("maildir"), None);
    let mails = smtp.wait_mails(4, Duration::from_secs(40));
    assert_eq!(mails.iter().filter(|m| m.subject.contains("later.csv")).count(), 2);
}

#[test]
fn a_silent_server_does_not_hang_smsdrop() {
    // A listener that accepts and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in listener.incoming().take(3).flatten() {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let mut app = Appliance::new(&format!(
        "{}{}",
        acme(""),
        email_table(&format!("smtp://127.0.0.1:{port}"), "")
    ));
    app.start();
    app.drop_file("acme", "bad.csv", b"x;y\n1;2\n");
    app.result("acme", "bad");
    wait_log(&app, "no answer within 3s", Duration::from_secs(20));
    // the service goes on meanwhile
    app.drop_file("acme", "good.csv", b"phone;message\n0612345678;Hello\n");
    assert_eq!(app.result("acme", "good")[1][3], "queued");
    assert!(app.cli(&["status"]).status.success());
    let started = Instant::now();
    assert!(app.stop().success());
    assert!(started.elapsed() < Duration::from_secs(10), "stops promptly");
    drop(held);
}

#[test]
fn a_flood_of_rejected_files_gives_one_mail_and_one_digest() {
    let smtp_port = reserve();
    let port = smtp_port.port;
    let mut app = Appliance::new(&format!(
        "{}{}",
        acme(""),
        email_table(&format!("smtp://127.0.0.1:{port}"), "")
    ));
    let smtp = SmtpServer::start(&smtp_port, &app.path("maildir"), None);
    app.start();
    for i in 0..100 {
        app.drop_file("acme", &format!("bad{i:03}.csv"), format!("x;y\n{i};2\n").as_bytes());
    }
    app.result("acme", "bad099");
    common::wait_for("every file rejected", Duration::from_secs(60), || {
        app.log().matches("rejected as a whole").count() >= 100
    });
    let mails = smtp.wait_mails(4, Duration::from_secs(30));
    // No mail queued and no alert held for a digest: no more mail can come.
    app.mail_settled();
    let mails_after = smtp.mails();
    assert_eq!(
        mails_after.len(),
        mails.len(),
        "no more mail: {:#?}",
        mails_after.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    for to in [ADMIN, ERP] {
        let mine: Vec<_> = mails_after.iter().filter(|m| m.to.contains(to)).collect();
        assert_eq!(mine.len(), 2, "one mail and one digest for {to}: {mine:#?}");
        let digest = mine
            .iter()
            .find(|m| m.subject.contains("99 more alerts"))
            .expect("digest");
        assert!(
            digest.body.contains("... and 89 more"),
            "the first ten details, then a count:\n{}",
            digest.body
        );
    }
}

#[test]
fn starttls_with_a_test_ca_and_plain_text_refused_cleanly() {
    let smtp_port = reserve();
    let port = smtp_port.port;
    let certs = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = common::test_ca(certs.path());
    let mut app = Appliance::new(&format!(
        "{}{}",
        acme(""),
        email_table(
            &format!("smtp+starttls://127.0.0.1:{port}"),
            &format!("ca_file = \"{}\"", ca.display())
        )
    ));
    let smtp = SmtpServer::start(&smtp_port, &app.path("maildir"), Some((&cert, &key)));
    app.start();
    app.drop_file("acme", "tls.csv", b"x;y\n1;2\n");
    app.result("acme", "tls");
    let mails = smtp.wait_mails(2, Duration::from_secs(30));
    assert!(mails.iter().all(|m| m.subject.contains("tls.csv")));
    assert!(app.stop().success());

    // The same server, asked in plain text: it requires STARTTLS, the mail is refused for good.
    let text = std::fs::read_to_string(&app.config).expect("config");
    std::fs::write(&app.config, text.replace("smtp+starttls://", "smtp://")).expect("config");
    app.start();
    app.drop_file("acme", "plain.csv", b"x;y\n3;4\n");
    app.result("acme", "plain");
    wait_log(&app, "refused for good and dropped", Duration::from_secs(30));
    app.mail_settled();
    assert!(smtp.mails().iter().all(|m| !m.subject.contains("plain.csv")));
    app.drop_file("acme", "after.csv", b"phone;message\n0612345678;Hi\n");
    assert_eq!(app.result("acme", "after")[1][3], "queued", "the service carries on");
}

#[test]
fn daily_report_per_tenant_and_summary_for_the_admin_once() {
    let smtp_port = reserve();
    let port = smtp_port.port;
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(6);
    let local = at
        .to_zoned_datetime(jiff::tz::TimeZone::get("Europe/Paris").expect("tz"))
        .strftime("%H:%M:%S")
        .to_string();
    let mut app = Appliance::new(&format!(
        "{}{}",
        acme(""),
        email_table(
            &format!("smtp://127.0.0.1:{port}"),
            &format!("daily_report_at = \"{local}\"")
        )
    ));
    let smtp = SmtpServer::start(&smtp_port, &app.path("maildir"), None);
    app.start();
    app.drop_file("acme", "day.csv", b"phone;message\n0612345678;Hello\nbad;x\n");
    app.drop_file("acme", "broken.csv", b"x;y\n1;2\n");
    app.final_report("acme", "day", 1);
    app.result("acme", "broken");
    let daily = || -> Vec<common::Mail> {
        smtp.mails()
            .into_iter()
            .filter(|m| m.subject.contains("daily_report"))
            .collect()
    };
    let reports = common::poll(
        Duration::from_secs(40),
        || Some(daily()).filter(|r| r.len() >= 2),
        || format!("no daily report: {:#?}\n{}", daily(), app.log()),
    );
    let tenant = reports.iter().find(|m| m.to.contains(ERP)).expect("tenant report");
    assert!(
        tenant.subject.contains("tenant acme, 2 files, 1 messages"),
        "{}",
        tenant.subject
    );
    for needle in [
        "Files received:     2",
        "rejected missing_column: 1",
        "Lines accepted:     1",
        "invalid_phone: 1",
        "delivered: 1",
        "Delivery rate:      100.0%",
        "Median delivery:",
    ] {
        assert!(tenant.body.contains(needle), "{needle} missing:\n{}", tenant.body);
    }
    let admin = reports.iter().find(|m| m.to.contains(ADMIN)).expect("admin summary");
    assert!(admin.subject.contains("summary of every tenant"));
    assert!(admin.body.contains("== acme (acme) =="), "{}", admin.body);
    assert!(app.stop().success());
    app.start();
    // Two rounds of the daily report after the restart, and their mail (had they queued any)
    // taken by the server.
    app.after_two_rounds("daily-report");
    app.mail_settled();
    let again = smtp
        .mails()
        .into_iter()
        .filter(|m| m.subject.contains("daily_report"))
        .count();
    assert_eq!(again, 2, "a restart does not send the day's report again");
}

#[test]
fn implicit_tls_with_a_test_ca() {
    let smtp_port = reserve();
    let port = smtp_port.port;
    let certs = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = common::test_ca(certs.path());
    let mut app = Appliance::new(&format!(
        "{}{}",
        acme(""),
        email_table(
            &format!("smtps://127.0.0.1:{port}"),
            &format!("ca_file = \"{}\"", ca.display())
        )
    ));
    let smtp = SmtpServer::start_with(&smtp_port, &app.path("maildir"), Some((&cert, &key)), true);
    app.start();
    app.drop_file("acme", "smtps.csv", b"x;y\n1;2\n");
    app.result("acme", "smtps");
    let mails = smtp.wait_mails(2, Duration::from_secs(30));
    assert!(mails.iter().all(|m| m.subject.contains("smtps.csv")));
}
