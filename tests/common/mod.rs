//! The test harness: a temporary appliance driven through the real `smsdrop` binary.
//!
//! Each test gets its own folder (state, key, inboxes, outboxes, sink) and its own `serve`
//! process; nothing is shared between tests and no fixed port is used.

#![allow(dead_code)]

pub mod batches;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> PathBuf {
    std::env::var_os("SMSDROP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_smsdrop")))
}

/// One appliance: its folder, configuration and (when started) its `serve` process.
pub struct Appliance {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// The base of every test configuration; `tenants` is appended (tenant tables, partners...).
pub fn base_config(dir: &Path) -> String {
    format!(
        r#"
state_dir = "{d}/state"
key_file = "{d}/master.key"
rescan_interval = "500ms"

[partner.sink]
kind = "sink"
path = "{d}/sink.jsonl"

[[route]]
prefix = ""
partners = ["sink"]
"#,
        d = dir.display()
    )
}

/// A plain tenant table with a short settle time.
pub fn tenant(id: &str, extra: &str) -> String {
    format!(
        "\n[tenant.{id}]\ndefault_region = \"FR\"\ntimezone = \"Europe/Paris\"\nsender = \"ACME\"\nsenders = [\"PROMO\"]\nsettle = \"200ms\"\nreport_interval = \"1s\"\n{extra}\n"
    )
}

impl Appliance {
    /// A new appliance with `tables` (tenants and anything else) after the base configuration,
    /// and a fresh master key.
    pub fn new(tables: &str) -> Appliance {
        Appliance::new_with("", tables)
    }

    /// Like [`Appliance::new`], with top-level keys `top` before every table.
    pub fn new_with(top: &str, tables: &str) -> Appliance {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("smsdrop.toml");
        std::fs::write(&config, format!("{top}\n{}{}", base_config(dir.path()), tables)).expect("write config");
        let app = Appliance {
            dir,
            config,
            child: None,
            starts: 0,
        };
        let out = app.cli(&["keygen"]);
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        app
    }

    /// A second appliance with `tables` and this one's master key (for restores).
    pub fn twin(&self, tables: &str) -> Appliance {
        let app = Appliance::new(tables);
        std::fs::remove_file(app.path("master.key")).expect("fresh key");
        std::fs::copy(self.path("master.key"), app.path("master.key")).expect("same master key");
        app
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    pub fn inbox(&self, tenant: &str) -> PathBuf {
        self.state_dir().join("drop").join(tenant).join("inbox")
    }

    pub fn outbox(&self, tenant: &str) -> PathBuf {
        self.state_dir().join("drop").join(tenant).join("outbox")
    }

    fn log_path(&self) -> PathBuf {
        self.path(&format!("serve-{}.log", self.starts))
    }

    /// Every log line of every start so far.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| std::fs::read_to_string(self.path(&format!("serve-{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    /// Runs a command of the CLI against this appliance's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run smsdrop")
    }

    /// Starts `serve` and waits until its admin socket answers.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        self.spawn(env, None);
    }

    /// Starts `serve` with a descriptor limit (soft and hard) of `nofile`.
    pub fn start_with_nofile(&mut self, nofile: u64) {
        self.spawn(&[], Some(nofile));
    }

    fn spawn(&mut self, env: &[(&str, &str)], nofile: Option<u64>) {
        use std::os::unix::process::CommandExt;
        assert!(self.child.is_none(), "already started");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut cmd = Command::new(bin());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches only the struct passed.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("SMSDROP_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn smsdrop serve");
        let mut child = child;
        let this = &*self;
        poll(
            Duration::from_secs(20),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("serve exited with {status} at start:\n{}", this.log());
                }
                // this start's log only: an earlier start's line says nothing about this one
                std::fs::read_to_string(this.log_path())
                    .unwrap_or_default()
                    .contains("smsdrop is serving")
                    .then_some(())
            },
            || format!("serve did not start:\n{}", this.log()),
        );
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("not started")
    }

    /// The port this start's `what` listener bound (`listen = "127.0.0.1:0"` in the tests): "SFTP
    /// server", "metrics" or "HTTP partner webhook". Every listener binds before `serve` says it
    /// is serving; a webhook started by a reload is waited for.
    #[track_caller]
    pub fn port(&self, what: &str) -> u16 {
        poll(
            Duration::from_secs(20),
            || bound_in(&std::fs::read_to_string(self.log_path()).unwrap_or_default(), what),
            || format!("no `{what} listening addr=` line in this start's log:\n{}", self.log()),
        )
        .port()
    }

    fn signal(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("not started");
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
        child.wait().expect("wait for serve")
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// Writes a file beside the inbox, then renames it in, as an ERP's mover would.
    pub fn drop_file(&self, tenant: &str, name: &str, content: &[u8]) -> PathBuf {
        let inbox = self.inbox(tenant);
        std::fs::create_dir_all(&inbox).expect("inbox");
        let staging = self.path(&format!("staging-{}", name.replace('/', "_")));
        std::fs::write(&staging, content).expect("write staging file");
        let target = inbox.join(name);
        std::fs::rename(&staging, &target).expect("rename into inbox");
        target
    }

    /// Waits for a file to exist, then returns its bytes.
    pub fn wait_file(&self, path: &Path, timeout: Duration) -> Vec<u8> {
        poll(
            timeout,
            || std::fs::read(path).ok(),
            || format!("{} did not appear in {timeout:?}; log:\n{}", path.display(), self.log()),
        )
    }

    /// Waits for a batch's result file and parses it (`;`-separated UTF-8 unless told otherwise).
    pub fn result(&self, tenant: &str, stem: &str) -> Vec<Vec<String>> {
        let bytes = self.wait_file(
            &self.outbox(tenant).join(format!("{stem}.result.csv")),
            Duration::from_secs(30),
        );
        parse_csv(&bytes, b';')
    }

    /// Waits until the final report says every message is final, then returns its rows. The
    /// wait grows with the batch (a minute, and a second more per thousand messages): the test
    /// machine runs other tests beside this one.
    pub fn final_report(&self, tenant: &str, stem: &str, expected: usize) -> Vec<Vec<String>> {
        let path = self.outbox(tenant).join(format!("{stem}.report.csv"));
        poll(
            Duration::from_secs(60 + expected as u64 / 1000),
            || {
                let rows = parse_csv(&std::fs::read(&path).ok()?, b';');
                let finals = rows
                    .iter()
                    .skip(1)
                    .filter(|r| r.get(4).is_some_and(|s| s != "queued" && s != "submitted"))
                    .count();
                (rows.len() == expected + 1 && finals == expected).then_some(rows)
            },
            || format!("no final report for {stem}; log:\n{}", self.log()),
        )
    }

    /// What the sink partner wrote, one JSON object per message.
    pub fn sink(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path("sink.jsonl")).unwrap_or_default();
        // Only whole lines: the sink may be writing the next ones as we read.
        let whole = text.rfind('\n').map(|end| &text[..=end]).unwrap_or("");
        whole
            .lines()
            .map(|l| serde_json::from_str(l).expect("sink line is JSON"))
            .collect()
    }

    /// Waits until the sink holds at least `n` messages.
    pub fn wait_sink(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        poll(
            timeout,
            || Some(self.sink()).filter(|l| l.len() >= n),
            || format!("sink has {} of {n} messages; log:\n{}", self.sink().len(), self.log()),
        )
    }

    /// The id `smsdrop batch list` gives the batch of `file`.
    #[track_caller]
    pub fn batch_id(&self, file: &str) -> String {
        let list = ok(self.cli(&["batch", "list"]));
        list.lines()
            .find(|l| l.ends_with(file))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{file} not listed:\n{list}"))
            .to_string()
    }

    /// `smsdrop status`.
    #[track_caller]
    pub fn status(&self) -> String {
        ok(self.cli(&["status"]))
    }

    /// The rounds a background worker did since this start, from its line of `smsdrop status`
    /// (`inbox-watch` counts the watcher's full rescans of the inboxes).
    #[track_caller]
    pub fn rounds(&self, worker: &str) -> u64 {
        let status = self.status();
        status
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&worker)).then(|| f.get(2)?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no worker {worker} in:\n{status}"))
    }

    /// Waits until `worker` did two more rounds than it has now. The marker for an absence: a
    /// round that began after what the test did has looked at it (two, since a round under way
    /// now may have looked before).
    #[track_caller]
    pub fn after_two_rounds(&self, worker: &str) {
        let target = self.rounds(worker) + 2;
        poll(
            Duration::from_secs(60),
            || (self.rounds(worker) >= target).then_some(()),
            || format!("{worker} did not reach {target} rounds:\n{}", self.status()),
        )
    }

    /// Waits until no mail is queued and no alert is held for a digest: every mail there will
    /// be for what happened so far has been taken by the SMTP server (or refused for good).
    #[track_caller]
    pub fn mail_settled(&self) {
        poll(
            Duration::from_secs(60),
            || {
                self.status()
                    .contains("mail: 0 queued, 0 alerts held for a digest")
                    .then_some(())
            },
            || format!("mail still waiting:\n{}", self.status()),
        )
    }

    /// The audit log as `smsdrop audit export` prints it.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["audit", "export"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit entry is JSON"))
            .collect()
    }

    /// Waits for an audit entry with `action` whose details hold every `(key, value)` given,
    /// and returns it.
    pub fn wait_audit(&self, action: &str, details: &[(&str, &str)]) -> serde_json::Value {
        poll(
            Duration::from_secs(20),
            || {
                self.audit().into_iter().find(|e| {
                    e["action"] == action && details.iter().all(|(k, v)| e["details"][*k].as_str() == Some(*v))
                })
            },
            || format!("no audit entry {action} {details:?} in:\n{:#?}", self.audit()),
        )
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A command's stdout; fails the test (at the caller's line) when it did not succeed.
#[track_caller]
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's stderr; fails the test when it succeeded.
#[track_caller]
pub fn failed(out: Output) -> String {
    assert!(
        !out.status.success(),
        "should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `ready` until it gives a value; fails the test with `why()` after `timeout`. Looks
/// come every 10 ms, or four times as far apart as a look takes: a look may read and parse a
/// large file, and on two cores a test that did that a hundred times a second would take the
/// time the appliance under test needs.
pub fn poll<T>(timeout: Duration, mut ready: impl FnMut() -> Option<T>, why: impl FnOnce() -> String) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let look = Instant::now();
        if let Some(v) = ready() {
            return v;
        }
        assert!(Instant::now() < deadline, "{}", why());
        let pause = (look.elapsed() * 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
        std::thread::sleep(pause);
    }
}

/// Polls `done` until it holds; fails the test with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    poll(timeout, || done().then_some(()), || what.to_string())
}

/// `GET path` on 127.0.0.1:`port`, HTTP/1.1: the status code and the whole answer.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

/// Waits until the appliance's log holds `needle`.
pub fn wait_log(app: &Appliance, needle: &str, timeout: Duration) {
    poll(
        timeout,
        || app.log().contains(needle).then_some(()),
        || format!("`{needle}` not logged:\n{}", app.log()),
    )
}

/// Parses CSV bytes (UTF-8) into rows of fields.
pub fn parse_csv(bytes: &[u8], delimiter: u8) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(bytes);
    reader
        .records()
        .map(|r| r.expect("valid CSV").iter().map(str::to_string).collect())
        .collect()
}

/// Peak resident memory of a process, in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU seconds (user and system) a process has used so far, all its threads.
pub fn cpu_secs(pid: u32) -> f64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // the fields after the command name (which may hold spaces) in parentheses
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0)
}

/// The project's Python (tests/peers/install.sh makes it).
pub fn venv_python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// A loopback port held for the whole test: bound, with `SO_REUSEADDR`, but not listening.
///
/// A connection to it is refused (a peer that is down), the kernel gives it to no one who asks
/// for any free port (neither a listener binding port 0 nor an outgoing connection), and a peer
/// that binds it by number with `SO_REUSEADDR` listens on it (node, Python's servers, aiosmtpd
/// and tokio all set it). For a peer that smsdrop must find at a number written in its
/// configuration before the peer starts, or that goes down and comes back at the same number.
/// Everything else binds port 0 and says which port it got.
pub struct Reserved {
    pub port: u16,
    _socket: socket2::Socket,
}

pub fn reserve() -> Reserved {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind a loopback port");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .expect("bound port");
    Reserved { port, _socket: socket }
}

/// The address a listener of this start bound, from its `… listening addr=…` log line: `what`
/// is the start of the line's message ("SFTP server", "metrics", "HTTP partner webhook").
fn bound_in(log: &str, what: &str) -> Option<std::net::SocketAddr> {
    log.lines()
        .rev()
        .filter(|l| l.contains(&format!(" {what}")) && l.contains(" listening"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
        .and_then(|a| a.parse().ok())
}

/// A real SMTP server (aiosmtpd) storing every mail in a Maildir.
pub struct SmtpServer {
    pub port: u16,
    pub maildir: PathBuf,
    child: Child,
}

/// One mail as the SMTP server stored it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Mail {
    pub to: String,
    pub from: String,
    pub subject: String,
    pub body: String,
}

impl SmtpServer {
    /// Starts aiosmtpd on the held `port` (the configuration names it before the server starts;
    /// a test may start the server late); with `tls` = (cert, key), STARTTLS is required.
    pub fn start(port: &Reserved, maildir: &Path, tls: Option<(&Path, &Path)>) -> SmtpServer {
        SmtpServer::start_with(port, maildir, tls, false)
    }

    /// Like [`SmtpServer::start`]; with `implicit`, the certificate serves SMTPS instead.
    pub fn start_with(port: &Reserved, maildir: &Path, tls: Option<(&Path, &Path)>, implicit: bool) -> SmtpServer {
        let port = port.port;
        // aiosmtpd's Mailbox makes the Maildir (cur, new, tmp) only if the folder does not exist.
        let mut cmd = Command::new(venv_python());
        cmd.args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Mailbox",
        ]);
        if let Some((cert, key)) = tls {
            let (c, k) = if implicit {
                ("--smtpscert", "--smtpskey")
            } else {
                ("--tlscert", "--tlskey")
            };
            cmd.arg(c).arg(cert).arg(k).arg(key);
        }
        cmd.arg(maildir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start aiosmtpd (run tests/peers/install.sh)");
        // The port is held for this test: what answers there is this aiosmtpd.
        poll(
            Duration::from_secs(20),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("aiosmtpd exited with {status} at start");
                }
                std::net::TcpStream::connect(("127.0.0.1", port)).ok()
            },
            || "aiosmtpd did not start".into(),
        );
        SmtpServer {
            port,
            maildir: maildir.to_path_buf(),
            child,
        }
    }

    /// Every mail received so far, oldest first.
    pub fn mails(&self) -> Vec<Mail> {
        if !self.maildir.join("new").exists() {
            return Vec::new();
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/read_maildir.py");
        let out = Command::new(venv_python())
            .arg(script)
            .arg(&self.maildir)
            .output()
            .expect("read maildir");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("mail JSON"))
            .collect()
    }

    /// Waits until at least `n` mails arrived.
    pub fn wait_mails(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        poll(
            timeout,
            || Some(self.mails()).filter(|m| m.len() >= n),
            || format!("fewer than {n} mails arrived: {:#?}", self.mails()),
        )
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem).
pub fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=smsdrop test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

/// An appliance with an SFTP server and tenant acme holding one Ed25519 key, and that key.
pub struct Door {
    pub app: Appliance,
    pub key: PathBuf,
}

impl Door {
    /// The SFTP port of the running start.
    #[track_caller]
    pub fn port(&self) -> u16 {
        self.app.port("SFTP server")
    }
}

/// A [`Door`]: top-level keys `top`, tenant acme (plus `acme_extra`), `tables`, then `[sftp]` on
/// port 0 (plus `sftp_extra`): each start takes a free port and says which.
pub fn door(top: &str, sftp_extra: &str, acme_extra: &str, tables: &str) -> Door {
    let keys = tempfile::tempdir().expect("dir");
    let (key_in_temp, public) = client_key(keys.path(), "id_acme", "ed25519");
    let app = Appliance::new_with(
        top,
        &format!(
            "{}{tables}\n[sftp]\nlisten = \"127.0.0.1:0\"\n{sftp_extra}\n",
            tenant("acme", &format!("keys = [\"{public}\"]\n{acme_extra}"))
        ),
    );
    // Keep the key beside the appliance, which outlives this function.
    let key = app.path("id_acme");
    std::fs::copy(&key_in_temp, &key).expect("copy key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    Door { app, key }
}

/// A client key made by OpenSSH's ssh-keygen: (private key path, public key line).
pub fn client_key(dir: &Path, name: &str, kind: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", name, "-f"]).arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    let out = cmd.output().expect("ssh-keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("public key");
    (path, public.trim().to_string())
}

/// OpenSSH's `sftp` for `user@127.0.0.1:port` with `key`: host keys not checked, no prompts.
/// With `batch`, it runs that batch file; without, commands come on standard input. `extra`
/// options go before the destination.
pub fn sftp_command(port: u16, key: &Path, user: &str, batch: Option<&Path>, extra: &[&str]) -> Command {
    let mut cmd = Command::new("sftp");
    if let Some(b) = batch {
        cmd.arg("-b").arg(b);
    }
    cmd.args(extra)
        .args(["-P", &port.to_string(), "-i"])
        .arg(key)
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
        ])
        .arg(format!("{user}@127.0.0.1"));
    cmd
}

/// Runs OpenSSH's `sftp` in batch mode against `user@127.0.0.1:port`.
pub fn sftp_batch(port: u16, key: &Path, user: &str, commands: &str) -> Output {
    let dir = tempfile::tempdir().expect("dir");
    let batch = dir.path().join("batch");
    std::fs::write(&batch, commands).expect("batch file");
    sftp_command(port, key, user, Some(&batch), &[])
        .output()
        .expect("run sftp")
}

/// A partner-side peer that logs one JSON line per event and takes control lines on stdin: the
/// loopback SMSC (tests/peers/smsc.js on the npm `smpp` package, a real SMPP 3.4 peer) or the
/// HTTP SMS API (tests/peers/http_partner.py, on Python's standard library).
pub struct Peer {
    pub port: u16,
    log: PathBuf,
    child: Child,
}

pub type Smsc = Peer;

/// The JSON events a peer wrote to `log`, one per line (lines cut short are skipped).
pub fn events_in(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The port a peer's `listening` event in `log` names, once it wrote one.
pub fn listening_port(log: &Path) -> Option<u16> {
    events_in(log)
        .iter()
        .find(|e| e["ev"] == "listening")
        .and_then(|e| e["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

/// One log file per peer started, named in start order (a peer on port 0 has no number yet).
fn peer_log(dir: &Path, kind: &str) -> PathBuf {
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{kind}-{n}.jsonl"))
}

impl Peer {
    /// Starts the HTTP SMS API on port 0; it posts receipts to the webhook that
    /// [`Peer::set_webhook`] gives, signed with the secret in `secret_file`.
    pub fn http_api(dir: &Path, secret_file: &Path) -> Peer {
        let log = peer_log(dir, "http");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/http_partner.py");
        let child = Command::new(venv_python())
            .arg(script)
            .arg("0")
            .arg(&log)
            .arg("-")
            .arg(secret_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 http_partner.py");
        Peer::listening(log, child, "the HTTP partner")
    }

    /// Tells the HTTP SMS API where smsdrop's webhook is, and waits until it took it.
    pub fn set_webhook(&mut self, url: &str) {
        self.control(serde_json::json!({ "webhook": url }));
        poll(
            Duration::from_secs(10),
            || self.of("webhook_set").iter().any(|e| e["url"] == url).then_some(()),
            || format!("the HTTP partner did not take the webhook {url}"),
        );
    }

    /// Starts it on port 0; `env` sets its behaviours (see smsc.js).
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Smsc {
        Smsc::launch(dir, 0, env)
    }

    /// Starts it on the held `port` (an SMSC that was down and comes back at its number).
    pub fn start_on(dir: &Path, port: &Reserved, env: &[(&str, &str)]) -> Smsc {
        Smsc::launch(dir, port.port, env)
    }

    fn launch(dir: &Path, port: u16, env: &[(&str, &str)]) -> Smsc {
        let log = peer_log(dir, "smsc");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/smsc.js");
        let child = Command::new("node")
            .arg(script)
            .arg(port.to_string())
            .arg(&log)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node smsc.js (run tests/peers/install.sh)");
        Peer::listening(log, child, "the SMSC")
    }

    /// Waits for the peer's `listening` event, which names the port it bound.
    fn listening(log: PathBuf, mut child: Child, what: &str) -> Peer {
        let port = poll(
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{what} exited with {status} at start");
                }
                listening_port(&log)
            },
            || format!("{what} did not start"),
        );
        Peer { port, log, child }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it writes its events.
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        events_in(&self.log)
    }

    /// Its events of kind `ev`.
    pub fn of(&self, ev: &str) -> Vec<serde_json::Value> {
        self.events().into_iter().filter(|e| e["ev"] == ev).collect()
    }

    /// Waits until it logged at least `n` events of kind `ev`.
    pub fn wait(&self, ev: &str, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        poll(
            timeout,
            || Some(self.of(ev)).filter(|e| e.len() >= n),
            || format!("SMSC logged {} of {n} `{ev}`", self.of(ev).len()),
        )
    }

    /// Sends an incoming message (MO) to the first bound session.
    pub fn mo(&mut self, from: &str, to: &str, text: &str) {
        self.control(serde_json::json!({"mo": {"from": from, "to": to, "text": text}}));
    }

    /// Sends one control line (see smsc.js).
    pub fn control(&mut self, command: serde_json::Value) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").expect("write to SMSC");
    }

    /// Stops it (a partner that goes away).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}
