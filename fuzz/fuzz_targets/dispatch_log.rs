//! The dispatch log reader: a file of well-sealed records, junk, and records out of order. The
//! reader gives back a prefix of the well-sealed records in growing step order, each exactly as
//! written, and never panics on what the steps decode to.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smsdrop::crypto::{Keyring, MasterKeys};
use smsdrop::store::DispatchCommit;
use smsdrop::store::wal::{read_records, record};

fn keys() -> &'static Keyring {
    static KEYS: OnceLock<(tempfile::TempDir, Keyring)> = OnceLock::new();
    &KEYS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("dir");
            let key = dir.path().join("master.key");
            MasterKeys::generate(&key).expect("key");
            let ring = Keyring::open(MasterKeys::load(&key).expect("load"), dir.path()).expect("keyring");
            (dir, ring)
        })
        .1
}

fuzz_target!(|input: Vec<(u64, Vec<u8>, bool)>| {
    let keys = keys().system();
    let mut file = Vec::new();
    let mut written = Vec::new();
    for (seq, bytes, junk) in &input {
        if *junk {
            file.extend_from_slice(bytes);
        } else {
            file.extend_from_slice(&record(&keys, *seq, bytes));
            written.push((*seq, bytes.clone()));
        }
    }
    let (steps, end) = read_records(&file, &keys);
    assert!(end <= file.len());
    assert!(steps.windows(2).all(|w| w[0].0 < w[1].0), "steps in growing order");
    for (seq, plain) in &steps {
        assert!(written.iter().any(|(s, p)| s == seq && p == plain), "a step never written");
        let _ = postcard::from_bytes::<DispatchCommit>(plain);
    }
});
