//! `/metrics`, `/healthz` and `/readyz` during an end-to-end run, the scrape parsed by the
//! Prometheus project's Python client (`tests/peers/parse_metrics.py`), its numbers checked
//! against the run.

mod common;

use std::time::Duration;

use common::{Appliance, Smsc, ok, tenant};

fn scrape(port: u16) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(common::venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/parse_metrics.py"))
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("parser");
    assert!(
        out.status.success(),
        "the scrape does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn value(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
        .unwrap_or_else(|| panic!("no {name} {labels:?} in {samples:?}"))
}

fn get(port: u16, path: &str) -> (u16, String) {
    common::http_get(port, path)
}

#[test]
fn metrics_follow_an_end_to_end_run() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[]);
    let tables = format!(
        "{}{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[sftp]\nlisten = \"127.0.0.1:0\"\n\n[partner.smsc]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\n\n[[route]]\nprefix = \"+33\"\npartners = [\"smsc\"]\n",
        tenant("acme", "hold_above = 3\n"),
        tenant("beta", ""),
        smsc.port
    );
    let mut app = Appliance::new(&tables);
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    app.start();
    let (port, sftp_port) = (app.port("metrics"), app.port("SFTP server"));
    assert_eq!(get(port, "/healthz").0, 200);
    assert_eq!(get(port, "/readyz").0, 200);
    assert_eq!(get(port, "/nothing").0, 404);

    // beta: two delivered; acme: five held (above hold_above)
    app.drop_file(
        "beta",
        "b.csv",
        b"phone;message\n0612345678;One\n0612345679;Two\n12;not a number\n",
    );
    app.final_report("beta", "b", 2);
    app.drop_file("beta", "nocol.csv", b"number;words\n0612345678;x\n");
    app.result("beta", "nocol");
    // A password login is refused (and counted).
    let refused = std::process::Command::new(common::venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/paramiko_client.py"))
        .args([&sftp_port.to_string(), "beta", "password", "secret"])
        .output()
        .expect("paramiko");
    assert!(refused.status.success(), "{}", String::from_utf8_lossy(&refused.stdout));
    let mut held = String::from("phone;message\n");
    for i in 0..5 {
        held.push_str(&format!("06123450{i:02};Held\n"));
    }
    app.drop_file("acme", "a.csv", held.as_bytes());
    app.result("acme", "a");
    let samples = scrape(port);
    assert_eq!(
        value(
            &samples,
            "smsdrop_messages",
            &[("tenant", "beta"), ("status", "delivered")]
        ),
        2.0
    );
    assert_eq!(
        value(&samples, "smsdrop_messages", &[("tenant", "acme"), ("status", "held")]),
        5.0
    );
    assert_eq!(value(&samples, "smsdrop_queue_depth", &[("tenant", "acme")]), 5.0);
    assert_eq!(value(&samples, "smsdrop_queue_depth", &[("tenant", "beta")]), 0.0);
    assert_eq!(value(&samples, "smsdrop_open_batches", &[("tenant", "acme")]), 1.0);
    assert_eq!(value(&samples, "smsdrop_partner_up", &[("partner", "sink")]), 1.0);
    assert!(value(&samples, "smsdrop_store_file_bytes", &[]) > 0.0);
    assert!(value(&samples, "smsdrop_store_used_bytes", &[]) > 0.0);
    assert_eq!(value(&samples, "smsdrop_retention_deleted_messages_total", &[]), 0.0);
    // The background workers: each in exactly one state, none failing.
    for worker in ["disk-watch", "sweeper", "resealer"] {
        let states: f64 = ["working", "idle", "backing-off", "done", "stopped"]
            .iter()
            .map(|s| value(&samples, "smsdrop_worker_state", &[("worker", worker), ("state", s)]))
            .sum();
        assert_eq!(states, 1.0, "{worker}");
        let l = [("worker", worker)];
        assert_eq!(
            value(&samples, "smsdrop_worker_state", &[l[0], ("state", "backing-off")]),
            0.0
        );
        assert_eq!(value(&samples, "smsdrop_worker_errors_total", &l), 0.0, "{worker}");
        assert!(value(&samples, "smsdrop_worker_rounds_total", &l) >= 1.0, "{worker}");
    }
    // Events since start: files and lines by outcome, rejections by reason, refusals.
    let files = |t: &str, o: &str| value(&samples, "smsdrop_files_total", &[("tenant", t), ("outcome", o)]);
    assert_eq!(files("beta", "accepted"), 1.0);
    assert_eq!(files("beta", "missing_column"), 1.0);
    assert_eq!(files("acme", "accepted"), 1.0);
    let lines = |t: &str, o: &str| value(&samples, "smsdrop_lines_total", &[("tenant", t), ("outcome", o)]);
    assert_eq!(lines("beta", "accepted"), 2.0);
    assert_eq!(lines("beta", "rejected"), 1.0);
    assert_eq!(lines("acme", "accepted"), 5.0);
    assert_eq!(
        value(
            &samples,
            "smsdrop_line_rejections_total",
            &[("tenant", "beta"), ("reason", "invalid_phone")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "smsdrop_sftp_refusals_total",
            &[("reason", "password authentication is not allowed")]
        ),
        1.0
    );
    assert_eq!(value(&samples, "smsdrop_sftp_sessions", &[]), 0.0);
    assert_eq!(
        value(&samples, "smsdrop_submit_latency_seconds_count", &[("partner", "smsc")]),
        2.0,
        "beta's two went through the SMSC"
    );
    for s in samples.iter().filter(|s| s.get("family").is_none()) {
        let name = s["name"].as_str().unwrap_or_default();
        assert!(name.starts_with("smsdrop_"), "{name}");
        if s["type"] == "counter" {
            assert!(name.ends_with("_total") || name.ends_with("_created"), "{name}");
        }
    }

    // released: the five go out, the gauges follow
    let list = ok(app.cli(&["batch", "list", "--tenant", "acme"]));
    let id = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("acme's batch")
        .to_string();
    ok(app.cli(&["batch", "release", &id]));
    app.final_report("acme", "a", 5);
    common::wait_for("the scrape to follow", Duration::from_secs(10), || {
        let samples = scrape(port);
        value(
            &samples,
            "smsdrop_messages",
            &[("tenant", "acme"), ("status", "delivered")],
        ) == 5.0
            && value(&samples, "smsdrop_queue_depth", &[("tenant", "acme")]) == 0.0
    });
    let samples = scrape(port);
    assert_eq!(
        value(&samples, "smsdrop_submit_latency_seconds_count", &[("partner", "smsc")]),
        7.0
    );
    let slow = value(
        &samples,
        "smsdrop_submit_latency_seconds_bucket",
        &[("partner", "smsc"), ("le", "+Inf")],
    );
    assert_eq!(slow, 7.0, "the +Inf bucket holds every submission");
    assert_eq!(
        value(&samples, "smsdrop_receipt_delay_seconds_count", &[("partner", "smsc")]),
        7.0,
        "seven receipts came"
    );
    // Every series the Grafana dashboard draws is one this scrape has.
    let families: std::collections::HashSet<String> = samples
        .iter()
        .filter_map(|s| s["family"].as_str().map(String::from))
        .collect();
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/grafana-dashboard.json"))
        .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut drawn = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(metric) = word.strip_prefix("smsdrop_") {
                    let family = ["_bucket", "_count", "_sum", "_total"]
                        .iter()
                        .find_map(|suffix| metric.strip_suffix(suffix))
                        .unwrap_or(metric);
                    assert!(families.contains(&format!("smsdrop_{family}")), "{word} in {expr}");
                    drawn += 1;
                }
            }
        }
    }
    assert!(drawn >= 16, "{drawn}");
    ok(app.cli(&["reload"]));
    assert_eq!(
        value(&scrape(port), "smsdrop_reloads_total", &[("result", "applied")]),
        1.0
    );
    app.stop();
}
