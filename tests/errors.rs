//! Errors say each thing once: a failing command names its cause once, and no error type of
//! ours both writes its cause into its message and hands it on as `source()` (which `{:#}`
//! would print again).

mod common;

use std::path::Path;
use std::process::Command;

use common::{Appliance, bin, tenant};

/// The `": "`-separated parts of a message that repeat (ignoring very short ones).
fn repeated(message: &str) -> Vec<String> {
    let parts: Vec<&str> = message.trim().split(": ").map(str::trim).collect();
    let mut seen = Vec::new();
    let mut twice = Vec::new();
    for p in parts {
        if p.len() >= 8 && seen.contains(&p) && !twice.contains(&p.to_string()) {
            twice.push(p.to_string());
        }
        seen.push(p);
    }
    twice
}

fn fails(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().expect("run smsdrop");
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn failing_commands_say_each_thing_once() {
    let app = Appliance::new(&tenant("acme", ""));
    let config = app.config.to_str().expect("utf-8 path").to_string();
    let dir = app.dir.path();
    let garbage = dir.join("garbage.bak");
    std::fs::write(&garbage, b"not a backup at all").expect("write");
    let bad_toml = dir.join("bad.toml");
    std::fs::write(&bad_toml, "state_dir = [\n").expect("write");
    let missing_key = dir.join("missing.toml");
    std::fs::write(
        &missing_key,
        format!(
            "state_dir = \"{0}/state2\"\nkey_file = \"{0}/nowhere/master.key\"\n",
            dir.display()
        ),
    )
    .expect("write");

    let nonexistent = fails(&["--config", "/nonexistent.toml", "status"]);
    assert_eq!(
        nonexistent.trim(),
        "smsdrop: /nonexistent.toml: cannot read the configuration: No such file or directory (os error 2)"
    );
    let (garbage, bad_toml, missing_key) = (
        garbage.to_str().expect("utf-8"),
        bad_toml.to_str().expect("utf-8"),
        missing_key.to_str().expect("utf-8"),
    );
    let commands: [&[&str]; 7] = [
        &["--config", "/nonexistent.toml", "status"],
        &["--config", &config, "restore", garbage],
        &["--config", bad_toml, "check-config"],
        &["--config", missing_key, "status"],
        &["--config", &config, "reload"],
        &["--config", &config, "keygen", "--out", "/proc/smsdrop/master.key"],
        &["--config", &config, "validate", "--tenant", "acme", "/nonexistent.csv"],
    ];
    let cases: Vec<(&[&str], String)> = commands.iter().map(|args| (*args, fails(args))).collect();
    for (args, stderr) in &cases {
        assert!(stderr.starts_with("smsdrop: "), "{args:?}: {stderr}");
        assert!(
            repeated(stderr).is_empty(),
            "{args:?} says {:?} twice: {stderr}",
            repeated(stderr)
        );
    }
}

/// Every `#[derive(thiserror::Error)]` type in `src/`: a variant whose message is its own (not
/// `transparent`) must not also be built `#[from]` or `#[source]`, nor have a field named
/// `source` (thiserror makes each of those the error's `source()`).
#[test]
fn no_error_type_hands_on_the_cause_its_message_already_holds() {
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("readable").filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    files(&root.join("src"), &mut all);
    let mut problems = Vec::new();
    let mut types = 0;
    for path in all {
        let text = std::fs::read_to_string(&path).expect("readable");
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            if !(lines[i].contains("derive(") && lines[i].contains("thiserror::Error")) {
                i += 1;
                continue;
            }
            types += 1;
            // The type's body: up to the first line that closes it at column 0.
            let mut message: Option<(usize, bool)> = None;
            let mut j = i + 1;
            while j < lines.len() && !lines[j].starts_with('}') && !lines[j].ends_with(");") {
                let line = lines[j].trim();
                if line.starts_with("#[error(") {
                    message = Some((j, line.contains("transparent")));
                } else if let Some((at, transparent)) = message {
                    let hands_on = line.contains("#[from]")
                        || line.contains("#[source]")
                        || line.starts_with("source:")
                        || line.contains("{ source:")
                        || line.contains(", source:");
                    if hands_on && !transparent {
                        problems.push(format!(
                            "{}:{}: `{}` has its own message (line {}) and hands its cause on as `source()`",
                            path.strip_prefix(root).unwrap_or(&path).display(),
                            j + 1,
                            line,
                            at + 1
                        ));
                    }
                }
                j += 1;
            }
            i = j;
        }
    }
    assert!(types > 10, "the scan found only {types} error types");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
