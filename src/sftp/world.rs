//! A tenant's SFTP world: exactly `/inbox` and `/outbox` (SPEC §5).
//!
//! Every path is parsed into a [`Place`] before anything touches the disk; `..`, NUL bytes,
//! hidden names, over-long paths and anything below the two folders are refused, so no path can
//! reach outside them. Uploads go to a hidden temporary file in the inbox, bounded by the tenant's
//! `max_file_bytes` while writing, and are synced and renamed on close: the watcher never sees a
//! half-written file, and a dropped connection leaves only a hidden temporary that is removed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File as Entry, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode,
    Version,
};

use crate::audit::{Audit, Event, sftp_actor};
use crate::config::Tenant;

/// Longest path accepted.
const MAX_PATH: usize = 1024;
/// Largest read answered at once.
const MAX_READ: u32 = 256 * 1024;
/// Open handles per session.
const MAX_HANDLES: usize = 64;

/// Where a path points, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Root,
    Inbox,
    Outbox,
    InboxFile(String),
    OutboxFile(String),
}

/// Parses an SFTP path (absolute, or relative to `/`).
pub fn place(path: &str) -> Result<Place, StatusCode> {
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(StatusCode::PermissionDenied);
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(StatusCode::PermissionDenied),
            p => parts.push(p),
        }
    }
    match parts.as_slice() {
        [] => Ok(Place::Root),
        ["inbox"] => Ok(Place::Inbox),
        ["outbox"] => Ok(Place::Outbox),
        ["inbox", name] | ["outbox", name] if name.starts_with('.') || name.len() > 200 || name.contains('\\') => {
            Err(StatusCode::PermissionDenied)
        }
        ["inbox", name] => Ok(Place::InboxFile(name.to_string())),
        ["outbox", name] => Ok(Place::OutboxFile(name.to_string())),
        _ => Err(StatusCode::NoSuchFile),
    }
}

enum Open {
    Upload {
        file: File,
        temp: PathBuf,
        target: PathBuf,
        too_large: bool,
    },
    Read {
        file: File,
        name: String,
    },
    Dir {
        place: Place,
        done: bool,
    },
}

/// One SFTP session of one tenant.
pub struct World {
    tenant: Arc<Tenant>,
    audit: Audit,
    actor: String,
    handles: HashMap<String, Open>,
    next: u64,
}

fn status(id: u32, code: StatusCode, message: &str) -> Status {
    Status {
        id,
        status_code: code,
        error_message: message.to_string(),
        language_tag: "en-US".to_string(),
    }
}

fn dir_attrs() -> FileAttributes {
    let mut a = FileAttributes::default();
    a.set_dir(true);
    a.permissions = Some(0o40750);
    a
}

/// Attributes of a regular file; `None` for anything else (symlinks included).
fn file_attrs(path: &Path) -> Option<FileAttributes> {
    let meta = fs::symlink_metadata(path).ok()?;
    meta.file_type().is_file().then(|| FileAttributes::from(&meta))
}

fn io_code(e: &std::io::Error) -> StatusCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    }
}

impl World {
    pub fn new(tenant: Arc<Tenant>, audit: Audit, peer: std::net::SocketAddr) -> World {
        World {
            tenant,
            audit,
            actor: sftp_actor(peer),
            handles: HashMap::new(),
            next: 0,
        }
    }

    /// An event about `file` of this session's tenant.
    fn event(&self, action: &str, file: &Path) -> Event {
        Event::new(action, self.actor.as_str()).tenant(&self.tenant.id).detail(
            "file",
            file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        )
    }

    fn add(&mut self, open: Open) -> Result<String, StatusCode> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure);
        }
        self.next += 1;
        let handle = format!("h{}", self.next);
        self.handles.insert(handle.clone(), open);
        Ok(handle)
    }

    fn folder(&self, place: &Place) -> Option<&Path> {
        match place {
            Place::Inbox | Place::InboxFile(_) => Some(&self.tenant.inbox),
            Place::Outbox | Place::OutboxFile(_) => Some(&self.tenant.outbox),
            Place::Root => None,
        }
    }

    fn entries(&self, place: &Place) -> Vec<Entry> {
        match place {
            Place::Root => vec![Entry::new("inbox", dir_attrs()), Entry::new("outbox", dir_attrs())],
            _ => {
                let Some(dir) = self.folder(place) else {
                    return Vec::new();
                };
                let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
                read.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_str()?.to_string();
                        if name.starts_with('.') {
                            return None;
                        }
                        file_attrs(&e.path()).map(|a| Entry::new(name, a))
                    })
                    .collect()
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // A connection that ends mid-upload leaves nothing to take.
        let handles: Vec<Open> = self.handles.drain().map(|(_, open)| open).collect();
        for open in handles {
            if let Open::Upload { temp, target, .. } = open {
                let _ = fs::remove_file(temp);
                self.event("sftp.upload-abandoned", &target).record(&self.audit);
            }
        }
    }
}

impl russh_sftp::server::Handler for World {
    type Error = StatusCode;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported
    }

    async fn init(&mut self, _version: u32, _extensions: HashMap<String, String>) -> Result<Version, Self::Error> {
        let mut v = Version::new();
        // Without it OpenSSH's client writes 32 KiB at a time; with it, 255 KiB (NOTES.md).
        v.extensions.insert("limits@openssh.com".into(), "1".into());
        Ok(v)
    }

    async fn extended(&mut self, id: u32, request: String, _data: Vec<u8>) -> Result<Packet, Self::Error> {
        if request != "limits@openssh.com" {
            return Err(StatusCode::OpUnsupported);
        }
        let mut data = Vec::with_capacity(32);
        for v in [262_144u64, u64::from(MAX_READ), 261_120, MAX_HANDLES as u64] {
            data.extend_from_slice(&v.to_be_bytes());
        }
        Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let shown = match place(&path)? {
            Place::Root => "/".to_string(),
            Place::Inbox => "/inbox".to_string(),
            Place::Outbox => "/outbox".to_string(),
            Place::InboxFile(n) => format!("/inbox/{n}"),
            Place::OutboxFile(n) => format!("/outbox/{n}"),
        };
        Ok(Name {
            id,
            files: vec![Entry::dummy(shown)],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let attrs = match place(&path)? {
            Place::Root | Place::Inbox | Place::Outbox => dir_attrs(),
            p @ (Place::InboxFile(_) | Place::OutboxFile(_)) => {
                let name = match &p {
                    Place::InboxFile(n) | Place::OutboxFile(n) => n.clone(),
                    _ => String::new(),
                };
                let dir = self.folder(&p).ok_or(StatusCode::NoSuchFile)?;
                file_attrs(&dir.join(name)).ok_or(StatusCode::NoSuchFile)?
            }
        };
        Ok(Attrs { id, attrs })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        self.stat(id, path).await
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let attrs = match self.handles.get(&handle).ok_or(StatusCode::Failure)? {
            Open::Upload { file, .. } | Open::Read { file, .. } => {
                FileAttributes::from(&file.metadata().map_err(|e| io_code(&e))?)
            }
            Open::Dir { .. } => dir_attrs(),
        };
        Ok(Attrs { id, attrs })
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let writing = pflags.intersects(OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::CREATE | OpenFlags::TRUNCATE);
        let open = match (place(&filename)?, writing) {
            (Place::InboxFile(name), true) => {
                let mut rand = [0u8; 8];
                getrandom::fill(&mut rand).map_err(|_| StatusCode::Failure)?;
                let tag: String = rand.iter().map(|b| format!("{b:02x}")).collect();
                let temp = self.tenant.inbox.join(format!(".upload-{tag}.part"));
                let file = OpenOptions::new()
                    .write(true)
                    .read(true)
                    .create_new(true)
                    .mode(0o640)
                    .open(&temp)
                    .map_err(|e| io_code(&e))?;
                Open::Upload {
                    file,
                    temp,
                    target: self.tenant.inbox.join(name),
                    too_large: false,
                }
            }
            (Place::OutboxFile(name), false) => {
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(self.tenant.outbox.join(&name))
                    .map_err(|e| io_code(&e))?;
                if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
                    return Err(StatusCode::NoSuchFile);
                }
                Open::Read { file, name }
            }
            (Place::InboxFile(_), false) | (Place::OutboxFile(_), true) => return Err(StatusCode::PermissionDenied),
            _ => return Err(StatusCode::PermissionDenied),
        };
        Ok(Handle {
            id,
            handle: self.add(open)?,
        })
    }

    async fn write(&mut self, id: u32, handle: String, offset: u64, data: Vec<u8>) -> Result<Status, Self::Error> {
        let limit = self.tenant.max_file_bytes;
        match self.handles.get_mut(&handle) {
            Some(Open::Upload { file, too_large, .. }) => {
                if offset.saturating_add(data.len() as u64) > limit {
                    *too_large = true;
                    return Err(StatusCode::Failure);
                }
                file.write_all_at(&data, offset).map_err(|e| io_code(&e))?;
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            Some(_) => Err(StatusCode::PermissionDenied),
            None => Err(StatusCode::Failure),
        }
    }

    async fn read(&mut self, id: u32, handle: String, offset: u64, len: u32) -> Result<Data, Self::Error> {
        match self.handles.get(&handle) {
            Some(Open::Read { file, .. }) => {
                let mut buf = vec![0u8; len.min(MAX_READ) as usize];
                let n = file.read_at(&mut buf, offset).map_err(|e| io_code(&e))?;
                if n == 0 {
                    return Err(StatusCode::Eof);
                }
                buf.truncate(n);
                Ok(Data { id, data: buf })
            }
            Some(_) => Err(StatusCode::PermissionDenied),
            None => Err(StatusCode::Failure),
        }
    }

    async fn fsetstat(&mut self, id: u32, handle: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        // `scp -s` truncates with fsetstat(size): apply it; times and modes are accepted and ignored.
        if let (Some(size), Some(Open::Upload { file, too_large, .. })) = (attrs.size, self.handles.get_mut(&handle)) {
            if size > self.tenant.max_file_bytes {
                *too_large = true;
                return Err(StatusCode::Failure);
            }
            file.set_len(size).map_err(|e| io_code(&e))?;
        }
        Ok(status(id, StatusCode::Ok, "Ok"))
    }

    async fn setstat(&mut self, id: u32, path: String, _attrs: FileAttributes) -> Result<Status, Self::Error> {
        place(&path)?;
        Ok(status(id, StatusCode::Ok, "Ok"))
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::Upload {
                file,
                temp,
                target,
                too_large,
            }) => {
                if too_large {
                    let _ = fs::remove_file(&temp);
                    self.event("sftp.upload-refused", &target)
                        .detail("reason", "max_file_bytes")
                        .detail("limit", self.tenant.max_file_bytes)
                        .record(&self.audit);
                    return Err(StatusCode::Failure);
                }
                // Durable before it is visible: sync the data, rename, sync the folder.
                let landed = file
                    .sync_all()
                    .and_then(|_| fs::rename(&temp, &target))
                    .and_then(|_| File::open(&self.tenant.inbox)?.sync_all());
                if let Err(e) = landed {
                    let _ = fs::remove_file(&temp);
                    return Err(io_code(&e));
                }
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                let name = target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                tracing::info!(tenant = %self.tenant.id, file = %name, bytes = size, "SFTP upload landed in the inbox");
                self.event("sftp.upload", &target)
                    .detail("bytes", size)
                    .record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            Some(Open::Read { file, name }) => {
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                tracing::info!(tenant = %self.tenant.id, file = %name, bytes, "SFTP download from the outbox");
                Event::new("sftp.download", self.actor.as_str())
                    .tenant(&self.tenant.id)
                    .detail("file", &name)
                    .detail("bytes", bytes)
                    .record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            Some(_) => Ok(status(id, StatusCode::Ok, "Ok")),
            None => Err(StatusCode::Failure),
        }
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let place = place(&path)?;
        if !matches!(place, Place::Root | Place::Inbox | Place::Outbox) {
            return Err(StatusCode::NoSuchFile);
        }
        Ok(Handle {
            id,
            handle: self.add(Open::Dir { place, done: false })?,
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let place = match self.handles.get_mut(&handle) {
            Some(Open::Dir { place, done }) if !*done => {
                *done = true;
                place.clone()
            }
            Some(Open::Dir { .. }) => return Err(StatusCode::Eof),
            _ => return Err(StatusCode::Failure),
        };
        Ok(Name {
            id,
            files: self.entries(&place),
        })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        match place(&filename)? {
            Place::OutboxFile(name) => {
                let path = self.tenant.outbox.join(&name);
                if file_attrs(&path).is_none() {
                    return Err(StatusCode::NoSuchFile);
                }
                fs::remove_file(&path).map_err(|e| io_code(&e))?;
                tracing::info!(tenant = %self.tenant.id, file = %name, "SFTP delete in the outbox");
                self.event("sftp.delete", &path).record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            _ => Err(StatusCode::PermissionDenied),
        }
    }

    async fn rename(&mut self, id: u32, oldpath: String, newpath: String) -> Result<Status, Self::Error> {
        // Clients that upload as `name.filepart` and rename afterwards (WinSCP).
        match (place(&oldpath)?, place(&newpath)?) {
            (Place::InboxFile(from), Place::InboxFile(to)) => {
                let from = self.tenant.inbox.join(from);
                if file_attrs(&from).is_none() {
                    return Err(StatusCode::NoSuchFile);
                }
                let target = self.tenant.inbox.join(to);
                fs::rename(&from, &target).map_err(|e| io_code(&e))?;
                self.event("sftp.rename", &target)
                    .detail(
                        "from",
                        from.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                    )
                    .record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            _ => Err(StatusCode::PermissionDenied),
        }
    }

    async fn mkdir(&mut self, _id: u32, _path: String, _attrs: FileAttributes) -> Result<Status, Self::Error> {
        Err(StatusCode::PermissionDenied)
    }

    async fn rmdir(&mut self, _id: u32, _path: String) -> Result<Status, Self::Error> {
        Err(StatusCode::PermissionDenied)
    }

    async fn readlink(&mut self, _id: u32, _path: String) -> Result<Name, Self::Error> {
        Err(StatusCode::PermissionDenied)
    }

    async fn symlink(&mut self, _id: u32, _linkpath: String, _targetpath: String) -> Result<Status, Self::Error> {
        Err(StatusCode::PermissionDenied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_leave_the_two_folders() {
        use Place::*;
        let ok: &[(&str, Place)] = &[
            ("/", Root),
            (".", Root),
            ("", Root),
            ("/inbox", Inbox),
            ("inbox/", Inbox),
            ("//outbox/./", Outbox),
            ("/inbox/june.csv", InboxFile("june.csv".into())),
            ("outbox/june.result.csv", OutboxFile("june.result.csv".into())),
        ];
        for (p, want) in ok {
            assert_eq!(place(p).as_ref(), Ok(want), "{p}");
        }
        let denied = [
            "/inbox/../outbox/x",
            "..",
            "/../etc/passwd",
            "/inbox/.hidden",
            "/inbox/a\0b",
            "/inbox/..\\x",
        ];
        for p in denied {
            assert_eq!(place(p), Err(StatusCode::PermissionDenied), "{p}");
        }
        let long = format!("/inbox/{}", "a".repeat(300));
        assert_eq!(place(&long), Err(StatusCode::PermissionDenied));
        assert_eq!(place(&"/".repeat(2000)), Err(StatusCode::PermissionDenied));
        for p in ["/etc/passwd", "/inbox/a/b", "/tmp", "/outbox/x/.."] {
            assert!(place(p).is_err(), "{p}");
        }
    }
}
