//! A whole batch file through the CSV records reader and the line checks (`batch::file::process`),
//! for a headed tenant: whatever the bytes, every line gets exactly one answer, numbered after
//! the one before, and the counts add up.
#![no_main]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use smsdrop::batch::file::{Context, LineSink, process};
use smsdrop::batch::validate::Checked;
use smsdrop::config::{Config, Tenant};
use smsdrop::crypto::{Keyring, MasterKeys};
use smsdrop::sms::format::ReplyFormat;

struct World {
    dir: tempfile::TempDir,
    tenant: Arc<Tenant>,
    keys: Keyring,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("dir");
        let key = dir.path().join("master.key");
        MasterKeys::generate(&key).expect("key");
        let src = format!(
            "state_dir = \"{d}\"\nkey_file = \"{d}/master.key\"\n[tenant.acme]\ndefault_region = \"FR\"\nsender = \"ACME\"\nmax_lines = 2000\n",
            d = dir.path().display()
        );
        let config = Config::parse(&dir.path().join("c.toml"), &src).expect("config");
        let tenant = config.tenants["acme"].clone();
        let keys = Keyring::open(MasterKeys::load(&key).expect("load"), dir.path()).expect("keyring");
        World { dir, tenant, keys }
    })
}

#[derive(Default)]
struct Lines {
    started: bool,
    numbers: Vec<u64>,
    accepted: u64,
}

impl LineSink for Lines {
    type Error = std::convert::Infallible;

    fn start(&mut self, _format: &ReplyFormat) -> Result<(), Self::Error> {
        assert!(!self.started, "started twice");
        self.started = true;
        Ok(())
    }

    fn line(&mut self, checked: Checked, index: Option<u64>) -> Result<(), Self::Error> {
        assert!(self.started, "a line before the start");
        if let Some(last) = self.numbers.last() {
            assert!(checked.line > *last, "line {} after line {last}", checked.line);
        }
        assert!(checked.line >= 1);
        if let Some(i) = index {
            assert_eq!(i, self.accepted, "message indexes in order");
            self.accepted += 1;
        }
        assert_eq!(index.is_some(), checked.outcome.is_ok());
        self.numbers.push(checked.line);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let path = w.dir.path().join("batch.csv");
    std::fs::write(&path, data).expect("write");
    let keys = w.keys.tenant("acme");
    let seen = |_: &[u8; 32]| Ok(false);
    let cancel = AtomicBool::new(false);
    let ctx = Context {
        tenant: &w.tenant,
        keys: &keys,
        blocklisted: &|_, _| false,
        seen: &seen,
        cancel: &cancel,
    };
    let mut lines = Lines::default();
    let Ok(summary) = process(&path, &ctx, &mut lines) else {
        panic!("process never fails on content");
    };
    if summary.rejection.is_none() {
        assert_eq!(summary.lines, lines.numbers.len() as u64, "every line answered once");
        assert_eq!(summary.accepted + summary.rejected, summary.lines);
        assert_eq!(summary.accepted, lines.accepted);
    }
});
