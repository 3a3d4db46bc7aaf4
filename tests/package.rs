//! The Debian package and the systemd unit, checked with Debian's own tools: the `.deb` built by
//! `packaging/build-deb.sh` (what `make deb` runs), its contents, `lintian`, an install into a
//! throwaway root with its maintainer scripts run (`dpkg --root`), the service's first start
//! from that tree as systemd would start it, a purge; and the unit's `systemd-analyze security`
//! score.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn top() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_unit_is_notify_with_a_watchdog_and_scores_two_or_less() {
    let unit = top().join("systemd/smsdrop.service");
    let said = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit));
    let score: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for smsdrop.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{said}"));
    assert!(score <= 2.0, "exposure {score}:\n{said}");
    let text = std::fs::read_to_string(&unit).expect("unit");
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=smsdrop",
        "StateDirectory=smsdrop",
        "RuntimeDirectory=smsdrop",
        "ConfigurationDirectory=smsdrop",
        "LoadCredential=master.key:/etc/smsdrop/master.key",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in the unit");
    }
}

/// A root folder with what dpkg needs to install into it, and nothing else.
fn empty_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.join(d)).expect("root folders");
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "").expect("dpkg database");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    root
}

fn dpkg(root: &Path, args: &[&str]) -> String {
    // the maintainer scripts run outside a chroot with DPKG_ROOT set (they honour it); the
    // libraries the package depends on are the host's
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args))
}

fn ids(root: &Path, file: &str) -> u32 {
    let text = std::fs::read_to_string(root.join(file)).expect("passwd/group");
    text.lines()
        .find(|l| l.starts_with("smsdrop:"))
        .and_then(|l| l.split(':').nth(2)?.parse().ok())
        .unwrap_or_else(|| panic!("no smsdrop in {file}:\n{text}"))
}

#[test]
fn the_deb_installs_into_a_root_starts_as_systemd_would_and_purges() {
    let dir = tempfile::tempdir().expect("dir");
    let out = dir.path().join("deb");
    let built = run(Command::new("sh")
        .arg(top().join("packaging/build-deb.sh"))
        .env("SMSDROP_BIN", common::bin())
        .env("SMSDROP_DEB_OUT", &out));
    let deb = PathBuf::from(built.trim().lines().last().expect("deb path"));
    let version = env!("CARGO_PKG_VERSION");
    let name = deb.file_name().and_then(|n| n.to_str()).expect("name").to_string();
    assert!(
        name.starts_with(&format!("smsdrop_{version}_")) && name.ends_with(".deb"),
        "{name}"
    );

    // contents: paths and modes, the conffile, the scripts
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/smsdrop"),
        ("-rw-r--r-- root/root", "./etc/smsdrop/smsdrop.toml"),
        ("-rw-r--r-- root/root", "./lib/systemd/system/smsdrop.service"),
        ("-rw-r--r-- root/root", "./usr/share/man/man8/smsdrop.8.gz"),
        (
            "-rw-r--r-- root/root",
            "./usr/share/bash-completion/completions/smsdrop",
        ),
        ("-rw-r--r-- root/root", "./usr/share/zsh/vendor-completions/_smsdrop"),
        (
            "-rw-r--r-- root/root",
            "./usr/share/fish/vendor_completions.d/smsdrop.fish",
        ),
        ("-rw-r--r-- root/root", "./usr/share/doc/smsdrop/copyright"),
        ("-rw-r--r-- root/root", "./usr/share/doc/smsdrop/grafana-dashboard.json"),
        ("-rw-r--r-- root/root", "./usr/lib/sysusers.d/smsdrop.conf"),
    ] {
        assert!(
            listing.lines().any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{mode} {path} in:\n{listing}"
        );
    }
    assert!(!listing.contains("master.key"), "no key in the package");
    let control = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).expect("conffiles"),
        "/etc/smsdrop/smsdrop.toml\n"
    );
    let fields = std::fs::read_to_string(control.join("control")).expect("control");
    assert!(fields.contains(&format!("Version: {version}\n")), "{fields}");
    assert!(fields.contains("Depends: libc6 (>= "), "{fields}");
    // the man page is the CLI's own
    let man = run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile {} | tar -xOf - ./usr/share/man/man8/smsdrop.8.gz | gzip -d",
        deb.display()
    )));
    assert!(man.contains(".TH smsdrop 8") && man.contains("blocklist"), "{man}");

    // lintian: no error (warnings are printed by the failure message if any turn up)
    let lint = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .expect("lintian");
    let said = String::from_utf8_lossy(&lint.stdout);
    assert!(lint.status.success(), "lintian:\n{said}");
    assert!(!said.lines().any(|l| l.starts_with("E:")), "lintian:\n{said}");

    // install into a throwaway root, its scripts run
    let root = empty_root(dir.path());
    dpkg(&root, &["-i", deb.to_str().expect("path")]);
    let (uid, gid) = (ids(&root, "etc/passwd"), ids(&root, "etc/group"));
    assert_ne!(uid, 0);
    let key = root.join("etc/smsdrop/master.key");
    let meta = std::fs::metadata(&key).expect("the master key made on first install");
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));
    let first_key = std::fs::read(&key).expect("key");
    let state = root.join("var/lib/smsdrop");
    let meta = std::fs::metadata(&state).expect("state_dir");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (uid, gid, 0o750));
    let conf = std::fs::metadata(root.join("etc/smsdrop/smsdrop.toml")).expect("conffile");
    assert_eq!((conf.uid(), conf.gid(), conf.mode() & 0o777), (0, gid, 0o640));
    // the installed example passes check-config
    let installed = root.join("usr/bin/smsdrop");
    run(Command::new(&installed)
        .arg("--config")
        .arg(root.join("etc/smsdrop/smsdrop.toml"))
        .arg("check-config"));
    // an upgrade (here: the same version again) keeps the key and the user
    dpkg(&root, &["-i", deb.to_str().expect("path")]);
    assert_eq!(
        std::fs::read(&key).expect("key"),
        first_key,
        "never a new key on upgrade"
    );
    assert_eq!(ids(&root, "etc/passwd"), uid);

    // The first start, as the unit would make it: the smsdrop user, the runtime and logs
    // directories, the key handed over as a credential, a notify socket. The installed config's
    // absolute paths point into the root.
    let conf_text = std::fs::read_to_string(root.join("etc/smsdrop/smsdrop.toml")).expect("config");
    let r = root.display().to_string();
    let conf_text = conf_text
        .replace("\"/var/lib/smsdrop", &format!("\"{r}/var/lib/smsdrop"))
        .replace("\"/var/log/smsdrop", &format!("\"{r}/var/log/smsdrop"))
        .replace("\"/run/smsdrop", &format!("\"{r}/run/smsdrop"))
        .replace("\"/etc/smsdrop", &format!("\"{r}/etc/smsdrop"));
    let started_conf = dir.path().join("started.toml");
    std::fs::write(&started_conf, conf_text).expect("config");
    std::fs::set_permissions(&started_conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let creds = dir.path().join("credentials");
    for d in [root.join("run/smsdrop"), root.join("var/log/smsdrop"), creds.clone()] {
        std::fs::create_dir_all(&d).expect("dir");
        std::os::unix::fs::chown(&d, Some(uid), Some(gid)).expect("chown");
    }
    std::fs::copy(&key, creds.join("master.key")).expect("credential");
    std::os::unix::fs::chown(creds.join("master.key"), Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(creds.join("master.key"), std::fs::Permissions::from_mode(0o400)).expect("chmod");
    // the folder the temp dir lives in must be passable for the smsdrop user
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let notify = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let log = dir.path().join("serve.log");
    let mut child = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(&installed)
        .arg("--config")
        .arg(&started_conf)
        .arg("serve")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("NOTIFY_SOCKET", &notify)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("JOURNAL_STREAM", "8:1")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start serve");
    let mut buf = [0u8; 4096];
    let mut heard = String::new();
    while !heard.contains("READY=1") {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no READY=1 ({e}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        heard.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let inbox = state.join("drop/acme/inbox");
    let staging = state.join("drop/acme/a.csv.part");
    std::fs::write(&staging, "phone;message\n0612345678;Installed\n").expect("batch");
    std::fs::rename(&staging, inbox.join("a.csv")).expect("drop");
    let result = state.join("drop/acme/outbox/a.result.csv");
    common::wait_for("the result file", Duration::from_secs(30), || result.exists());
    let status = run(Command::new(&installed)
        .arg("--config")
        .arg(&started_conf)
        .arg("status"));
    assert!(status.contains("acme"), "{status}");
    assert_eq!(std::fs::metadata(&result).expect("result").uid(), uid);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().expect("wait").success());

    // purge: the store and the key go, the user stays
    dpkg(&root, &["--purge", "smsdrop"]);
    assert!(!key.exists() && !state.exists(), "purged");
    assert!(!root.join("usr/bin/smsdrop").exists());
    assert_eq!(ids(&root, "etc/passwd"), uid);
}
