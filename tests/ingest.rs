//! Batches through the real binary: every reason code of the foundation, encodings, CSV shapes,
//! number forms, segment boundaries, trigger and hidden files, and nothing in clear on disk.

mod common;

use std::time::Duration;

use common::{Appliance, parse_csv, tenant};

/// Rows of a result file by their `ref` column: (line, phone, status, reason, message_id).
fn by_ref(rows: &[Vec<String>]) -> std::collections::HashMap<String, (String, String, String, String, String)> {
    assert_eq!(rows[0], ["line", "ref", "phone", "status", "reason", "message_id"]);
    rows[1..]
        .iter()
        .map(|r| {
            (
                r[1].clone(),
                (r[0].clone(), r[2].clone(), r[3].clone(), r[4].clone(), r[5].clone()),
            )
        })
        .collect()
}

fn sink_texts(app: &Appliance) -> Vec<(String, String, u64, String)> {
    app.sink()
        .iter()
        .map(|v| {
            (
                v["to"].as_str().unwrap_or_default().to_string(),
                v["text"].as_str().unwrap_or_default().to_string(),
                v["parts"].as_u64().unwrap_or(0),
                v["encoding"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn every_line_reason_code() {
    let mut app = Appliance::new(&format!(
        "{}{}{}",
        tenant("acme", ""),
        tenant("fixed", "encoding = \"utf-8\""),
        tenant("tpl", "template = \"Bonjour {name}, code {code}\"")
    ));
    app.start();
    let out = app.cli(&["blocklist", "add", "--tenant", "acme", "--phone", "06 12 34 56 84"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let long = "a".repeat(919);
    let batch = format!(
        "phone;message;ref;sender;send_at\n\
         06 12 34 56 78;Hello;ok1;;\n\
         12345;Hello;invalid_phone;;\n\
         06 12 34 56 79;;empty_message;;\n\
         06 12 34 56 80;{long};message_too_long;;\n\
         06 12 34 56 81;Hello;bad_line\n\
         06 12 34 56 82;Hello;sender_not_allowed;EVIL;\n\
         06 12 34 56 83;Hello;schedule_invalid;;next tuesday\n\
         06 12 34 56 84;Hello;blocklisted;;\n\
         +33 6 12 34 56 78;Hello;duplicate_recipient;;\n\
         06 12 34 56 85;Hello;ok2;PROMO;\n"
    );
    app.drop_file("acme", "lines.csv", batch.as_bytes());
    let rows = by_ref(&app.result("acme", "lines"));
    assert_eq!(rows.len(), 10);
    for reason in [
        "invalid_phone",
        "empty_message",
        "message_too_long",
        "bad_line",
        "sender_not_allowed",
        "schedule_invalid",
        "blocklisted",
        "duplicate_recipient",
    ] {
        let row = &rows[reason];
        assert_eq!(
            (row.2.as_str(), row.3.as_str()),
            ("rejected", reason),
            "{reason}: {row:?}"
        );
        assert!(row.4.is_empty());
    }
    assert_eq!(
        rows["ok1"],
        (
            "2".into(),
            "+33612345678".into(),
            "queued".into(),
            String::new(),
            rows["ok1"].4.clone()
        )
    );
    assert_eq!(rows["ok2"].2, "queued");
    assert_eq!(
        rows["invalid_phone"].1, "12345",
        "a number that cannot be normalised is shown as written"
    );
    assert_eq!(rows["duplicate_recipient"].0, "10");

    // bad_encoding: a tenant that declares UTF-8 gets one bad line, not a rejected file
    let mut fixed = b"phone;message;ref\n06 12 34 56 78;ok;good\n06 12 34 56 79;caf".to_vec();
    fixed.extend_from_slice(b"\xe9;bad_encoding\n");
    app.drop_file("fixed", "enc.csv", &fixed);
    let rows = by_ref(&app.result("fixed", "enc"));
    assert_eq!(rows["good"].2, "queued");
    assert_eq!(rows["bad_encoding"].3, "bad_encoding");

    // template_variable_missing
    app.drop_file(
        "tpl",
        "tpl.csv",
        b"phone;name;code;ref\n0612345678;Zoe;42;t1\n0612345679;Max;;t2\n",
    );
    let rows = by_ref(&app.result("tpl", "tpl"));
    assert_eq!(rows["t1"].2, "queued");
    assert_eq!(rows["t2"].3, "template_variable_missing");

    let sent = app.wait_sink(4, Duration::from_secs(20));
    let texts: Vec<_> = sent.iter().filter_map(|v| v["text"].as_str()).collect();
    assert!(texts.contains(&"Bonjour Zoe, code 42"), "{texts:?}");
    let promo = sent.iter().find(|v| v["to"] == "+33612345685").expect("ok2 sent");
    assert_eq!(promo["from"], "PROMO");
    let ok1 = sent
        .iter()
        .find(|v| v["to"] == "+33612345678" && v["tenant"] == "acme")
        .expect("ok1 sent");
    assert_eq!(ok1["from"], "ACME");
    assert!(app.stop().success());
}

#[test]
fn every_file_reason_code_and_the_service_carries_on() {
    let mut app = Appliance::new(&format!(
        "{}{}{}",
        tenant("acme", ""),
        tenant("small", "max_file_bytes = 300\nmax_lines = 3"),
        tenant("strict", "strict = true")
    ));
    app.start();
    let good = b"phone;message\n0612345678;Hello\n";
    app.drop_file("acme", "first.csv", good);
    assert_eq!(app.result("acme", "first")[1][3], "queued");

    let line0 = |rows: Vec<Vec<String>>| -> (String, String, String) {
        assert_eq!(rows.len(), 2, "one row for a rejected file: {rows:?}");
        (rows[1][0].clone(), rows[1][3].clone(), rows[1][4].clone())
    };
    let rejected = |reason: &str| ("0".to_string(), "rejected".to_string(), reason.to_string());

    app.drop_file("acme", "again.csv", good);
    assert_eq!(line0(app.result("acme", "again")), rejected("duplicate_file"));

    app.drop_file("acme", "binary.csv", b"phone;message\n\x00\x01\x02\x00garbage");
    assert_eq!(line0(app.result("acme", "binary")), rejected("unreadable"));
    app.drop_file("acme", "empty.csv", b"");
    assert_eq!(line0(app.result("acme", "empty")), rejected("unreadable"));

    app.drop_file("acme", "nocol.csv", b"name;text\nZoe;Hello\n");
    assert_eq!(line0(app.result("acme", "nocol")), rejected("missing_column"));

    app.drop_file(
        "small",
        "big.csv",
        format!("phone;message\n{}", "0612345678;Hello there\n".repeat(20)).as_bytes(),
    );
    assert_eq!(line0(app.result("small", "big")), rejected("too_large"));

    app.drop_file(
        "small",
        "many.csv",
        b"phone;message\n0612345671;a\n0612345672;b\n0612345673;c\n0612345674;d\n",
    );
    assert_eq!(line0(app.result("small", "many")), rejected("too_many_lines"));
    app.drop_file(
        "small",
        "three.csv",
        b"phone;message\n0612345671;a\n0612345672;b\n0612345673;c\n",
    );
    assert_eq!(app.result("small", "three").len(), 4, "max_lines lines are fine");

    app.drop_file(
        "strict",
        "strict.csv",
        b"phone;message\n0612345678;ok\nnope;bad\n0612345679;ok\n",
    );
    assert_eq!(line0(app.result("strict", "strict")), rejected("strict"));

    // after all that, the next file is taken as usual
    app.drop_file("acme", "last.csv", b"phone;message\n0612345699;Still here\n");
    assert_eq!(app.result("acme", "last")[1][3], "queued");
    let sent = app.wait_sink(5, Duration::from_secs(20));
    assert!(
        sent.iter().all(|v| v["tenant"] != "strict"),
        "nothing of a strict-rejected file is sent"
    );
    assert_eq!(sent.len(), 5, "first, three and last: {sent:?}");
    let log = app.log();
    assert!(
        log.contains("file=binary.csv") && log.contains("reason=unreadable"),
        "the log names the file:\n{log}"
    );
    assert!(app.stop().success());
}

#[test]
fn encodings_round_trip() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();

    // UTF-8 with BOM: the result keeps the BOM
    app.drop_file(
        "acme",
        "bom.csv",
        "\u{feff}phone;message;ref\n0612345678;Ça coûte 5 €;r1\n".as_bytes(),
    );
    let bytes = app.wait_file(&app.outbox("acme").join("bom.result.csv"), Duration::from_secs(20));
    assert!(bytes.starts_with(b"\xEF\xBB\xBFline;ref;phone"), "{:?}", &bytes[..10]);

    // Windows-1252 (not valid UTF-8): read as such, answered in it
    app.drop_file(
        "acme",
        "cp1252.csv",
        b"phone;message;ref\n0612345679;Caf\xe9 \x80 gar\xe7on;r\xe9f\n",
    );
    let bytes = app.wait_file(&app.outbox("acme").join("cp1252.result.csv"), Duration::from_secs(20));
    assert!(
        bytes.windows(4).any(|w| w == b"r\xe9f;"),
        "result in windows-1252: {bytes:?}"
    );

    // UTF-16LE with BOM, tab-separated
    let text = "phone\tmessage\tref\r\n0612345680\tПривет мир\tu16\r\n";
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    app.drop_file("acme", "utf16.csv", &utf16);
    let bytes = app.wait_file(&app.outbox("acme").join("utf16.result.csv"), Duration::from_secs(20));
    assert_eq!(&bytes[..2], b"\xFF\xFE", "UTF-16LE result with BOM");
    let units: Vec<u16> = bytes[2..].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let decoded = String::from_utf16(&units).expect("valid UTF-16");
    let rows = parse_csv(decoded.as_bytes(), b'\t');
    assert_eq!(rows[1][1..4], ["u16", "+33612345680", "queued"]);

    app.wait_sink(3, Duration::from_secs(20));
    let mut sent = sink_texts(&app);
    sent.sort();
    assert_eq!(
        sent,
        [
            ("+33612345678".into(), "Ça coûte 5 €".into(), 1, "ucs2".into()),
            ("+33612345679".into(), "Café € garçon".into(), 1, "ucs2".into()),
            ("+33612345680".into(), "Привет мир".into(), 1, "ucs2".into()),
        ]
    );
}

#[test]
fn csv_shapes_and_delimiters() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.drop_file(
        "acme",
        "quoted.csv",
        b"phone;message;ref\r\n0612345678;\"one; two, \"\"three\"\"\r\nand a new line\";q1\r\n0612345679;plain;q2\r\n",
    );
    let rows = by_ref(&app.result("acme", "quoted"));
    assert_eq!(rows["q1"].0, "2");
    assert_eq!(rows["q2"].0, "4", "the line number counts the line break inside quotes");
    for (name, delim) in [("comma", ","), ("tab", "\t"), ("pipe", "|")] {
        let body = format!(
            "phone{d}message{d}ref\n0612345{n}{d}\"a{d}b\"{d}{name}\n",
            d = delim,
            n = 680 + name.len()
        );
        app.drop_file("acme", &format!("{name}.csv"), body.as_bytes());
        let bytes = app.wait_file(
            &app.outbox("acme").join(format!("{name}.result.csv")),
            Duration::from_secs(20),
        );
        let rows = parse_csv(&bytes, delim.as_bytes()[0]);
        assert_eq!(rows[1][3], "queued", "{name}: {rows:?}");
    }
    app.wait_sink(5, Duration::from_secs(20));
    let texts: Vec<String> = sink_texts(&app).into_iter().map(|t| t.1).collect();
    assert!(
        texts.contains(&"one; two, \"three\"\nand a new line".to_string()),
        "{texts:?}"
    );
    assert_eq!(
        texts
            .iter()
            .filter(|t| *t == "a,b" || *t == "a\tb" || *t == "a|b")
            .count(),
        3
    );
}

#[test]
fn french_number_forms_are_one_number() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    app.drop_file(
        "acme",
        "forms.csv",
        b"phone;message;ref\n06 12 34 56 78;a;f1\n+33 6 12 34 56 78;b;f2\n0033612345678;c;f3\n06.12.34.56.78;a;f4\n",
    );
    let rows = by_ref(&app.result("acme", "forms"));
    for r in ["f1", "f2", "f3"] {
        assert_eq!(
            (rows[r].1.as_str(), rows[r].2.as_str()),
            ("+33612345678", "queued"),
            "{r}"
        );
    }
    assert_eq!(rows["f4"].3, "duplicate_recipient", "same number and text as f1");
}

#[test]
fn segment_boundaries() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    let cases = [
        ("g918", "a".repeat(918), Some((6, "gsm7"))),
        ("g919", "a".repeat(919), None),
        ("u402", "ж".repeat(402), Some((6, "ucs2"))),
        ("u403", "ж".repeat(403), None),
        // € costs two septets: 916 + 2 = 918 fits six parts, 917 + 2 does not
        ("a916e", format!("{}€", "a".repeat(916)), Some((6, "gsm7"))),
        ("a917e", format!("{}€", "a".repeat(917)), None),
        // an escape pair is never split across parts: 76 € per 153-septet part
        ("e456", "€".repeat(456), Some((6, "gsm7"))),
        ("e457", "€".repeat(457), None),
        ("g160", "a".repeat(160), Some((1, "gsm7"))),
        ("g161", "a".repeat(161), Some((2, "gsm7"))),
    ];
    let mut body = String::from("phone;message;ref\n");
    for (i, (r, text, _)) in cases.iter().enumerate() {
        body.push_str(&format!("06123456{:02};{text};{r}\n", 10 + i));
    }
    app.drop_file("acme", "seg.csv", body.as_bytes());
    let rows = by_ref(&app.result("acme", "seg"));
    let accepted = cases.iter().filter(|c| c.2.is_some()).count();
    app.wait_sink(accepted, Duration::from_secs(20));
    let sent = sink_texts(&app);
    for (r, text, want) in &cases {
        match want {
            None => assert_eq!(rows[*r].3, "message_too_long", "{r}"),
            Some((parts, coding)) => {
                assert_eq!(rows[*r].2, "queued", "{r}");
                let s = sent.iter().find(|s| &s.1 == text).expect("sent");
                assert_eq!((s.2, s.3.as_str()), (*parts, *coding), "{r}");
            }
        }
    }
}

#[test]
fn trigger_files_and_names_never_taken() {
    let mut app = Appliance::new(&format!(
        "{}{}",
        tenant("acme", ""),
        tenant("trig", "require_trigger = true")
    ));
    app.start();
    let body = b"phone;message\n0612345678;Hello\n";
    for name in [".hidden.csv", "upload.csv.part", "upload.tmp", "orphan.ok"] {
        app.drop_file("acme", name, body);
    }
    app.drop_file("trig", "waiting.csv", body);
    app.drop_file("acme", "marker.csv", b"phone;message\n0612345679;marker\n");
    // The marker, dropped last and taken: a file that would be taken was seen before it and is
    // complete when it is, so it would have left the inbox by then.
    app.result("acme", "marker");
    for name in [".hidden.csv", "upload.csv.part", "upload.tmp", "orphan.ok"] {
        assert!(app.inbox("acme").join(name).exists(), "{name} must stay in the inbox");
    }
    assert!(app.inbox("trig").join("waiting.csv").exists(), "no trigger yet");
    assert!(!app.outbox("trig").join("waiting.result.csv").exists());
    std::fs::write(app.inbox("trig").join("waiting.csv.ok"), b"").expect("trigger");
    assert_eq!(app.result("trig", "waiting")[1][3], "queued");
    assert!(!app.inbox("trig").join("waiting.csv").exists());
    assert!(
        !app.inbox("trig").join("waiting.csv.ok").exists(),
        "the trigger goes with the file"
    );
    // Both final: nothing more can be sent.
    app.final_report("acme", "marker", 1);
    app.final_report("trig", "waiting", 1);
    assert_eq!(app.sink().len(), 2, "only marker and waiting were sent");
}

#[test]
fn headerless_files_with_configured_columns() {
    let mut app = Appliance::new(&tenant(
        "erp",
        "columns = [\"ref\", \"phone\", \"message\"]\ndelimiter = \",\"",
    ));
    app.start();
    app.drop_file("erp", "nohead.csv", b"A1,0612345678,first\nA2,0612345679,second\n");
    let bytes = app.wait_file(&app.outbox("erp").join("nohead.result.csv"), Duration::from_secs(20));
    let rows = parse_csv(&bytes, b',');
    assert_eq!(rows[1][..4], ["1", "A1", "+33612345678", "queued"]);
    assert_eq!(rows[2][..4], ["2", "A2", "+33612345679", "queued"]);
}

#[test]
fn scheduled_messages_wait_for_their_time() {
    let mut app = Appliance::new(&tenant("acme", ""));
    app.start();
    let soon = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 3).expect("time");
    let body = format!(
        "phone;message;send_at;ref\n0612345678;later;{};s1\n0612345679;now;;s2\n",
        soon
    );
    app.drop_file("acme", "sched.csv", body.as_bytes());
    let rows = by_ref(&app.result("acme", "sched"));
    assert_eq!(rows["s1"].2, "queued");
    app.wait_sink(1, Duration::from_secs(10));
    let early: Vec<_> = sink_texts(&app).into_iter().map(|t| t.1).collect();
    assert_eq!(early, ["now"], "the scheduled message is not sent before its time");
    let all = app.wait_sink(2, Duration::from_secs(20));
    assert!(jiff::Timestamp::now() >= soon);
    assert_eq!(all[1]["text"], "later");
    let report = app.final_report("acme", "sched", 2);
    assert!(report[1..].iter().all(|r| r[4] == "delivered"), "{report:?}");
}

#[test]
fn nothing_in_clear_under_state_dir() {
    let dir_note = "inbox and outbox outside state_dir: reply files are the ERP's, in clear by contract";
    let mut app = Appliance::new("");
    let drop = app.path("erp");
    let tables = tenant(
        "acme",
        &format!("inbox = \"{d}/in\"\noutbox = \"{d}/out\"", d = drop.display()),
    );
    std::fs::write(
        &app.config,
        format!("{}{}", common::base_config(app.dir.path()), tables),
    )
    .expect("config");
    std::fs::create_dir_all(drop.join("in")).expect("inbox");
    app.start();
    let mut body = String::from("phone;message;ref;sender\n");
    let mut needles = vec!["PROMO".to_string()];
    for i in 0..200u64 {
        body.push_str(&format!(
            "{};Confidential payload {i} zebra;REF-{i}-XYZ;PROMO\n",
            common::batches::written_phone(i)
        ));
        needles.push(common::batches::e164(i));
        needles.push(format!("3361{:07}", i));
        needles.push(format!("Confidential payload {i} zebra"));
        needles.push(format!("REF-{i}-XYZ"));
    }
    std::fs::write(drop.join("in/secret.csv"), body).expect("drop");
    let result = app.wait_file(&drop.join("out/secret.result.csv"), Duration::from_secs(20));
    assert_eq!(
        parse_csv(&result, b';').iter().filter(|r| r[3] == "queued").count(),
        200
    );
    app.wait_sink(200, Duration::from_secs(30));
    app.wait_file(&drop.join("out/secret.report.csv"), Duration::from_secs(30));
    assert!(app.stop().success());
    let mut files = Vec::new();
    let mut stack = vec![app.state_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() { stack.push(p) } else { files.push(p) }
        }
    }
    assert!(!files.is_empty());
    for f in &files {
        let bytes = std::fs::read(f).expect("read");
        for n in &needles {
            assert!(
                memchr::memmem::find(&bytes, n.as_bytes()).is_none(),
                "{n} found in clear in {} ({dir_note})",
                f.display()
            );
        }
    }
}
