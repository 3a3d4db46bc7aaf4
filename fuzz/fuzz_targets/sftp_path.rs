//! The SFTP path resolver: whatever a client sends, a place is the root, one of the two folders
//! or a plain file name inside one of them, never a path that climbs out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smsdrop::sftp::world::{Place, place};

fuzz_target!(|path: &str| {
    if let Ok(Place::InboxFile(name) | Place::OutboxFile(name)) = place(path) {
        assert!(!name.is_empty() && name != "." && name != "..", "{name:?}");
        assert!(!name.contains('/') && !name.contains('\0'), "{name:?}");
    }
});
