//! Where smsdrop keeps things under `state_dir`, each name given once.
//!
//! ```text
//! state_dir/
//!   smsdrop.redb            the store (DB_FILE)
//!   keys                    the sealed tenant key store (KEY_STORE_FILE)
//!   dispatch.wal, .wal.1    the dispatch log (WAL_FILES)
//!   spool/<tenant>/         claimed files waiting for or in ingest (spool_dir)
//!   drop/<tenant>/inbox     default folders of a tenant (default_folders)
//!   drop/<tenant>/outbox
//!   admin.sock              the admin socket, unless `admin_socket` says otherwise
//!   ssh_host_ed25519_key    the SFTP host key, unless `[sftp] host_key` says otherwise
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The database file.
pub const DB_FILE: &str = "smsdrop.redb";
/// The tenant key store's file.
pub const KEY_STORE_FILE: &str = "keys";
/// The dispatch log's two files.
pub const WAL_FILES: [&str; 2] = ["dispatch.wal", "dispatch.wal.1"];
/// The admin socket's default place.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// The SFTP host key's default place.
pub const HOST_KEY: &str = "ssh_host_ed25519_key";

/// The spool folder of a tenant.
pub fn spool_dir(state_dir: &Path, tenant: &str) -> PathBuf {
    state_dir.join("spool").join(tenant)
}

/// A tenant's inbox and outbox when the configuration names none.
pub fn default_folders(state_dir: &Path, tenant: &str) -> (PathBuf, PathBuf) {
    let drop = state_dir.join("drop").join(tenant);
    (drop.join("inbox"), drop.join("outbox"))
}

/// Creates `path` with `mode` when it does not exist (an existing folder is left as it is).
pub fn make_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    if !path.exists() {
        fs::create_dir_all(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}
