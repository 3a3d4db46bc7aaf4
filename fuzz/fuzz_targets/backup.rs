//! The backup reader: a real backup with bytes changed, cut short or extended, or bytes from
//! nowhere. The untouched backup reads whole; any change is refused with an error, never a
//! panic, and never read as a good backup.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use smsdrop::crypto::{Keyring, MasterKeys};
use smsdrop::store::Store;
use smsdrop::store::backup::verify;

struct World {
    _dir: tempfile::TempDir,
    keys: Arc<Keyring>,
    backup: Vec<u8>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("master.key");
        MasterKeys::generate(&key).expect("key");
        let keys = Arc::new(Keyring::open(MasterKeys::load(&key).expect("load"), dir.path()).expect("keyring"));
        let store = Store::open(dir.path(), keys.clone()).expect("store");
        let mut backup = Vec::new();
        store.backup(&mut backup, &[], 1_800_000_000).expect("backup");
        drop(store);
        World { _dir: dir, keys, backup }
    })
}

fuzz_target!(|input: (Vec<(u16, u8)>, Option<u16>, Vec<u8>, bool)| {
    let w = world();
    let (flips, cut, tail, raw) = input;
    if raw {
        let _ = verify(std::io::Cursor::new(&tail), &w.keys);
        return;
    }
    let mut bytes = w.backup.clone();
    for (at, x) in flips {
        if let Some(b) = bytes.get_mut(at as usize % w.backup.len()) {
            *b ^= x;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut as usize % (bytes.len() + 1));
    }
    bytes.extend_from_slice(&tail);
    let changed = bytes != w.backup;
    let result = verify(std::io::Cursor::new(&bytes), &w.keys);
    if changed {
        assert!(result.is_err(), "a changed backup read as good");
    } else {
        assert!(result.is_ok(), "the untouched backup refused: {result:?}");
    }
});
