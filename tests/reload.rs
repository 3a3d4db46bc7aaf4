//! Live reload through the real binary: `smsdrop reload` and SIGHUP, with sessions held open by
//! paramiko and binds held by the loopback SMSC (tests/peers/smsc.js).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::{Appliance, Smsc, base_config, client_key, failed, ok, sftp_batch, tenant, wait_log};

/// A logged-in paramiko SFTP session that stays open and takes commands.
struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    fn open(port: u16, user: &str, key: &Path) -> Session {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/paramiko_client.py");
        let mut child = Command::new(common::venv_python())
            .arg(script)
            .args([&port.to_string(), user, "session"])
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("paramiko session");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut s = Session { child, stdin, stdout };
        assert_eq!(s.line(), "ready", "{user} logs in");
        s
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("read from paramiko");
        l.trim().to_string()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to paramiko");
        self.line()
    }

    fn put(&mut self, local: &Path, remote: &str) -> String {
        self.ask(&format!("put {} {remote}", local.display()))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private key beside the appliance (which outlives the key's temp folder), and its public line.
fn key(app: &Appliance, name: &str) -> (PathBuf, String) {
    let tmp = tempfile::tempdir().expect("dir");
    let (path, public) = client_key(tmp.path(), name, "ed25519");
    let kept = app.path(name);
    std::fs::copy(&path, &kept).expect("copy key");
    std::fs::set_permissions(&kept, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    (kept, public)
}

fn smpp_partner(id: &str, smsc: &Smsc) -> String {
    format!(
        "\n[partner.{id}]\nkind = \"smpp\"\naddress = \"127.0.0.1:{}\"\nsystem_id = \"smsdrop\"\npassword_file = \"smsc.secret\"\nwindow = 10\nenquire_link = \"5s\"\n",
        smsc.port
    )
}

fn write_config(app: &Appliance, tables: &str) {
    std::fs::write(&app.config, format!("{}{tables}", base_config(app.dir.path()))).expect("rewrite config");
}

#[test]
fn reload_adds_a_tenant_and_removes_a_key_while_sessions_and_binds_stay_up() {
    let dir = tempfile::tempdir().expect("dir");
    let smsc = Smsc::start(dir.path(), &[]);
    let smsc2 = Smsc::start(dir.path(), &[]);
    let mut app = Appliance::new("");
    std::fs::write(app.path("smsc.secret"), "secret\n").expect("password file");
    let (k1, pub1) = key(&app, "id_one");
    let (k2, pub2) = key(&app, "id_two");
    let (k3, pub3) = key(&app, "id_beta");
    let sftp = "\n[sftp]\nlisten = \"127.0.0.1:0\"\n";
    let route =
        |prefix: &str, partner: &str| format!("\n[[route]]\nprefix = \"{prefix}\"\npartners = [\"{partner}\"]\n");
    write_config(
        &app,
        &format!(
            "{sftp}{}{}{}",
            tenant("acme", &format!("keys = [\"{pub1}\", \"{pub2}\"]")),
            smpp_partner("smsc", &smsc),
            route("+33", "smsc"),
        ),
    );
    app.start();
    let port = app.port("SFTP server");
    smsc.wait("bind", 1, Duration::from_secs(10));

    let mut one = Session::open(port, "acme", &k1);
    let mut two = Session::open(port, "acme", &k2);
    let a = app.path("a.csv");
    std::fs::write(&a, "phone;message\n0612345678;before the reload\n").expect("write");
    assert_eq!(one.put(&a, "/inbox/a.csv"), "ok");
    assert_eq!(app.result("acme", "a")[1][3], "queued");
    smsc.wait("message", 1, Duration::from_secs(20));

    // The new configuration: acme loses its second key, tenant beta arrives, and numbers of
    // +33699 go to a new partner.
    write_config(
        &app,
        &format!(
            "{sftp}{}{}{}{}{}{}",
            tenant("acme", &format!("keys = [\"{pub1}\"]")),
            tenant("beta", &format!("keys = [\"{pub3}\"]")),
            smpp_partner("smsc", &smsc),
            smpp_partner("smsc2", &smsc2),
            route("+33", "smsc"),
            route("+33699", "smsc2"),
        ),
    );
    let said = ok(app.cli(&["reload"]));
    assert!(said.contains("tenants: added beta; removed -; changed acme"), "{said}");
    assert!(said.contains("partners: added smsc2; removed -; changed -"), "{said}");
    assert!(said.contains("routes: changed"), "{said}");

    // The session of the removed key is closed; the other one carries on.
    common::poll(
        Duration::from_secs(10),
        || {
            let answer = two.ask("alive");
            (answer == "closed" || answer.starts_with("error")).then_some(())
        },
        || "the session of the removed key is still open".into(),
    );
    assert_eq!(one.ask("alive"), "alive");
    let b = app.path("b.csv");
    std::fs::write(
        &b,
        "phone;message\n0612340001;after the reload\n0699000001;to the new partner\n",
    )
    .expect("write");
    assert_eq!(
        one.put(&b, "/inbox/b.csv"),
        "ok",
        "the unaffected session uploads after the reload"
    );
    let result = app.result("acme", "b");
    assert!(result[1..].iter().all(|r| r[3] == "queued"), "{result:?}");
    let to_first = smsc.wait("message", 2, Duration::from_secs(20));
    assert!(to_first.iter().any(|m| m["to"] == "33612340001"), "{to_first:?}");
    let to_second = smsc2.wait("message", 1, Duration::from_secs(20));
    assert_eq!(to_second[0]["to"], "33699000001");
    assert!(
        !smsc.of("message").iter().any(|m| m["to"] == "33699000001"),
        "the new route took it"
    );
    // The first SMSC's bind stayed up through the reload: bound once, never unbound.
    assert_eq!(smsc.of("bind").len(), 1, "{:?}", smsc.events());
    assert!(smsc.of("unbind").is_empty(), "{:?}", smsc.events());

    // The new tenant logs in and sends; the removed key is refused.
    let c = app.path("c.csv");
    std::fs::write(&c, "phone;message\n0612349999;from beta\n").expect("write");
    let out = sftp_batch(port, &k3, "beta", &format!("put {} /inbox/c.csv\n", c.display()));
    assert!(out.status.success(), "beta: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(app.result("beta", "c")[1][3], "queued");
    let out = sftp_batch(port, &k2, "acme", "ls /\n");
    assert!(!out.status.success(), "the removed key still logs in");

    let reload = app.wait_audit("config.reload", &[("result", "applied")]);
    assert!(
        reload["actor"].as_str().unwrap_or("").starts_with("admin uid"),
        "{reload}"
    );
    app.wait_audit("sftp.revoked", &[("reason", "key removed")]);
    let log = app.log();
    assert!(log.contains("SFTP session closed by a reload"), "{log}");
    drop(two);
    drop(one);
    assert!(app.stop().success());
}

#[test]
fn an_invalid_reload_is_refused_and_the_old_configuration_serves() {
    let mut app = Appliance::new("");
    let good = format!("{}{}", tenant("acme", ""), tenant("beta", "hold_above = 1"));
    write_config(&app, &good);
    app.start();

    // Errors in the file: `smsdrop reload` says which, SIGHUP logs them; nothing changes.
    write_config(
        &app,
        &format!("{good}\nbogus_key = 1\n[[route]]\nprefix = \"+44\"\npartners = [\"nobody\"]\n"),
    );
    let err = failed(app.cli(&["reload"]));
    assert!(err.contains("smsdrop.toml:") && err.contains("bogus_key"), "{err}");
    unsafe {
        libc::kill(app.pid() as i32, libc::SIGHUP);
    }
    wait_log(&app, "the new configuration is refused", Duration::from_secs(5));
    assert!(app.log().contains("unknown field `bogus_key`"), "the errors are logged");
    // (Commands read the file too: it is mended before asking them.)
    write_config(&app, &good);
    let refused = app.wait_audit("config.reload", &[("result", "refused")]);
    assert_eq!(refused["actor"], "SIGHUP", "{refused}");
    app.drop_file("acme", "still.csv", b"phone;message\n0612345678;still served\n");
    assert_eq!(app.result("acme", "still")[1][3], "queued");
    app.wait_sink(1, Duration::from_secs(20));

    // A valid file that removes a tenant with an open (held) batch is refused by serve.
    app.drop_file("beta", "held.csv", b"phone;message\n0612345670;one\n0612345671;two\n");
    app.result("beta", "held");
    write_config(&app, &tenant("acme", ""));
    let err = failed(app.cli(&["reload"]));
    assert!(err.contains("tenant beta is removed but has 1 open batches"), "{err}");
    let status = ok(app.cli(&["status"]));
    assert!(status.contains("beta"), "beta is still served: {status}");

    // What only a restart changes is kept, and said.
    std::fs::write(
        &app.config,
        format!("log_filter = \"debug\"\n{}{good}", base_config(app.dir.path())),
    )
    .expect("rewrite config");
    let said = ok(app.cli(&["reload"]));
    assert!(said.contains("nothing to change"), "{said}");
    assert!(said.contains("at the next restart: log_filter"), "{said}");
    assert!(app.stop().success());
}
