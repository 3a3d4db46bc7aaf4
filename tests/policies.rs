//! Traffic policies through the real binary: allowed countries, link allowlists, daily quotas,
//! held batches released or canceled by an operator.

mod common;

use std::time::Duration;

use common::{Appliance, tenant};

fn status_of(rows: &[Vec<String>], reference: &str) -> (String, String) {
    let row = rows
        .iter()
        .find(|r| r[1] == reference)
        .unwrap_or_else(|| panic!("no row {reference}: {rows:?}"));
    (row[3].clone(), row[4].clone())
}

#[test]
fn country_and_link_policies_are_line_reasons() {
    let mut app = Appliance::new(&tenant(
        "acme",
        "allowed_countries = [\"FR\", \"BE\"]\nurl_allowlist = [\"acme.fr\"]",
    ));
    app.start();
    app.drop_file(
        "acme",
        "policy.csv",
        "phone;message;ref\n\
         +44 7911 123456;Hello;uk\n\
         +32 470 12 34 56;Hello;be\n\
         0612345678;Offer at https://evil.example.com/x;scheme\n\
         0612345679;Offer at bit.ly/abc;shortener\n\
         0612345680;Offer at www.acme.fr/promo;own\n\
         0612345681;Offer at shop.acme.fr;subdomain\n\
         0612345682;Rdv demain 10h.Merci;notalink\n\
         0612345683;Try evilacme.fr now;lookalike\n"
            .as_bytes(),
    );
    let rows = app.result("acme", "policy");
    for (r, want) in [
        ("uk", ("rejected", "country_not_allowed")),
        ("be", ("queued", "")),
        ("scheme", ("rejected", "url_not_allowed")),
        ("shortener", ("rejected", "url_not_allowed")),
        ("own", ("queued", "")),
        ("subdomain", ("queued", "")),
        ("notalink", ("queued", "")),
        ("lookalike", ("rejected", "url_not_allowed")),
    ] {
        assert_eq!(status_of(&rows, r), (want.0.to_string(), want.1.to_string()), "{r}");
    }
    let show = String::from_utf8_lossy(&app.cli(&["batch", "show", &app.batch_id("policy.csv")]).stdout).into_owned();
    assert!(show.contains("countries    BE FR"), "{show}");
    assert!(
        show.contains("url_not_allowed") && show.contains("country_not_allowed"),
        "{show}"
    );
}

#[test]
fn daily_quota_rejects_the_file_that_would_pass_it() {
    let mut app = Appliance::new(&tenant("acme", "max_per_day = 3"));
    app.start();
    app.drop_file("acme", "a.csv", b"phone;message\n0612345671;a\n0612345672;b\n");
    assert_eq!(app.result("acme", "a").len(), 3);
    app.drop_file("acme", "b.csv", b"phone;message\n0612345673;c\n0612345674;d\n");
    let rows = app.result("acme", "b");
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1][0].as_str(), rows[1][4].as_str()), ("0", "quota_exceeded"));
    app.drop_file("acme", "c.csv", b"phone;message\n0612345675;e\n");
    assert_eq!(
        app.result("acme", "c")[1][3],
        "queued",
        "what fits the quota still goes"
    );
    // Every message queued is final: nothing more can be sent.
    app.final_report("acme", "a", 2);
    app.final_report("acme", "c", 1);
    assert_eq!(app.sink().len(), 3);
    assert!(app.log().contains("would pass max_per_day 3"), "{}", app.log());
}

#[test]
fn held_batches_wait_for_release_or_cancel() {
    let mut app = Appliance::new(&tenant("acme", "hold_above = 2"));
    app.start();
    app.drop_file("acme", "small.csv", b"phone;message\n0612345671;small\n");
    app.drop_file(
        "acme",
        "big.csv",
        b"phone;message\n0612345672;a\n0612345673;b\n0612345674;c\n",
    );
    app.drop_file(
        "acme",
        "other.csv",
        b"phone;message\n0612345675;x\n0612345676;y\n0612345677;z\n",
    );
    assert!(app.result("acme", "big")[1..].iter().all(|r| r[3] == "queued"));
    app.result("acme", "other");
    // The marker: a batch taken after them, not held, is sent in full.
    app.drop_file("acme", "after.csv", b"phone;message\n0612345678;after\n");
    app.final_report("acme", "after", 1);
    app.final_report("acme", "small", 1);
    assert_eq!(app.sink().len(), 2, "held batches send nothing");
    let list = String::from_utf8_lossy(&app.cli(&["batch", "list", "--tenant", "acme"]).stdout).into_owned();
    assert_eq!(list.lines().filter(|l| l.contains(" held ")).count(), 2, "{list}");

    let big = app.batch_id("big.csv");
    let out = app.cli(&["batch", "release", &big]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = app.final_report("acme", "big", 3);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"), "{report:?}");

    let other = app.batch_id("other.csv");
    let out = app.cli(&["batch", "cancel", &other]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 messages will not be sent"));
    let report = app.final_report("acme", "other", 3);
    assert!(report[1..].iter().all(|r| r[4] == "canceled"), "{report:?}");
    // Every batch's messages are final: the sink holds all it ever will.
    let texts: Vec<String> = app
        .sink()
        .iter()
        .map(|v| v["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(texts.len(), 5, "small, after and big only: {texts:?}");
    assert!(!texts.iter().any(|t| ["x", "y", "z"].contains(&t.as_str())));

    let again = app.cli(&["batch", "release", &other]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("release applies only to held batches"));
}

#[test]
fn cancel_stops_a_batch_under_way_and_its_scheduled_messages() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    let later = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 3600).expect("time");
    app.drop_file(
        "acme",
        "sched.csv",
        format!("phone;message;send_at\n0612345671;now;\n0612345672;later;{later}\n").as_bytes(),
    );
    app.result("acme", "sched");
    app.wait_sink(1, Duration::from_secs(20));
    let id = app.batch_id("sched.csv");
    let out = app.cli(&["batch", "cancel", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = app.final_report("acme", "sched", 2);
    let states: Vec<&str> = report[1..].iter().map(|r| r[4].as_str()).collect();
    assert_eq!(states, ["delivered", "canceled"]);
}
