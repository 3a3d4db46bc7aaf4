//! A tenant's SFTP world: exactly `/inbox` and `/outbox` (docs/sftp.md).
//!
//! Every path is parsed into a [`Place`] before anything touches the disk; `..`, NUL bytes,
//! hidden names, over-long paths and anything below the two folders are refused, so no path can
//! reach outside them. Uploads go to a hidden temporary file in the inbox, bounded by the tenant's
//! `max_file_bytes` while writing, and are synced and renamed on close: the watcher never sees a
//! half-written file, and a dropped connection leaves only a hidden temporary that is removed (one
//! left by a stop is removed at the next start: [`remove_stale_uploads`]).
//! An upload any of whose writes failed (a full disk, the size limit) is never published: its
//! close answers the failure and the temporary is removed, so a client that carries on after a
//! failed write cannot make half a file a batch.
//!
//! Every open handle counts against the tenant's `max_open_files` (across all its connections)
//! and every open file against the clients' descriptor budget ([`crate::limits`]). Names with
//! control characters are refused. Paths that are refused are audited, the first
//! [`AUDITED_DENIALS`] of a session one by one and the rest as one count when it ends.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File as Entry, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode,
    Version,
};
use russh_sftp::server::StatusReply;

use crate::audit::{Audit, Event, sftp_actor};
use crate::config::Tenant;
use crate::limits::{self, Descriptor, Held};

/// Longest path accepted.
const MAX_PATH: usize = 1024;
/// Largest read answered at once.
const MAX_READ: u32 = 256 * 1024;
/// Open handles per session.
const MAX_HANDLES: usize = 64;
/// Refused paths audited one by one in a session; past that they are counted.
const AUDITED_DENIALS: u64 = 10;

/// How the temporary of an upload under way is named in the inbox (`.upload-<tag>.part`).
const UPLOAD_PREFIX: &str = ".upload-";

/// Removes the temporaries of uploads that a stop cut short (never acknowledged: the client's
/// close never succeeded). Run at start, before the SFTP server listens. Returns how many.
pub fn remove_stale_uploads(inbox: &Path) -> usize {
    let mut removed = 0;
    for e in fs::read_dir(inbox).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(UPLOAD_PREFIX) && name.ends_with(".part") && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

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
        ["inbox", name] | ["outbox", name]
            if name.starts_with('.') || name.len() > 200 || name.contains('\\') || limits::has_unsafe_chars(name) =>
        {
            Err(StatusCode::PermissionDenied)
        }
        ["inbox", name] => Ok(Place::InboxFile(name.to_string())),
        ["outbox", name] => Ok(Place::OutboxFile(name.to_string())),
        _ => Err(StatusCode::NoSuchFile),
    }
}

/// An open handle with what it holds: a count under the tenant's `max_open_files`, and a
/// descriptor of the clients' budget when it is a file.
struct Slot {
    open: Open,
    _tenant: Held<String>,
    _descriptor: Option<Descriptor>,
}

enum Open {
    Upload {
        file: File,
        temp: PathBuf,
        target: PathBuf,
        /// Why a write failed, if one did (the audit's reason, the client's message): the upload
        /// is then never published.
        failed: Option<(&'static str, &'static str)>,
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
    handles: HashMap<String, Slot>,
    open_files: super::OpenFiles,
    /// `min_free_space` of the configuration the session started under.
    min_free_space: u64,
    next: u64,
    /// Paths refused in this session.
    denials: u64,
}

type Reply<T> = Result<T, StatusReply>;

fn refused(code: StatusCode, message: &str) -> StatusReply {
    StatusReply::new(code).with_message(message)
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
    pub fn new(
        tenant: Arc<Tenant>,
        audit: Audit,
        peer: std::net::SocketAddr,
        open_files: super::OpenFiles,
        min_free_space: u64,
    ) -> World {
        World {
            tenant,
            audit,
            actor: sftp_actor(peer),
            handles: HashMap::new(),
            open_files,
            min_free_space,
            next: 0,
            denials: 0,
        }
    }

    /// [`place`], with a refusal audited (the first [`AUDITED_DENIALS`] of a session).
    fn place(&mut self, path: &str) -> Result<Place, StatusCode> {
        place(path).inspect_err(|code| {
            if *code == StatusCode::PermissionDenied {
                self.denials += 1;
                if self.denials <= AUDITED_DENIALS {
                    Event::new("sftp.denied", self.actor.as_str())
                        .tenant(&self.tenant.id)
                        .detail("path", limits::shown(path))
                        .detail("reason", "outside the two folders, hidden, or a name not allowed")
                        .record(&self.audit);
                }
            }
        })
    }

    /// An event about `file` of this session's tenant.
    fn event(&self, action: &str, file: &Path) -> Event {
        Event::new(action, self.actor.as_str()).tenant(&self.tenant.id).detail(
            "file",
            file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        )
    }

    /// What a new handle must hold before anything is opened: room in this session, in the
    /// tenant's `max_open_files`, and (for a file) a descriptor of the clients' budget.
    fn reserve(&mut self, file: bool) -> Reply<(Held<String>, Option<Descriptor>)> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(refused(StatusCode::Failure, "too many open handles in this session"));
        }
        let Some(held) = self
            .open_files
            .try_take(self.tenant.id.clone(), self.tenant.sftp.max_open_files)
        else {
            return Err(refused(
                StatusCode::Failure,
                "too many open files for this account (max_open_files)",
            ));
        };
        let descriptor = if file {
            Some(
                limits::descriptors()
                    .try_take()
                    .ok_or_else(|| refused(StatusCode::Failure, "server busy: too many open files, try again later"))?,
            )
        } else {
            None
        };
        Ok((held, descriptor))
    }

    fn add(&mut self, open: Open, (held, descriptor): (Held<String>, Option<Descriptor>)) -> String {
        self.next += 1;
        let handle = format!("h{}", self.next);
        self.handles.insert(
            handle.clone(),
            Slot {
                open,
                _tenant: held,
                _descriptor: descriptor,
            },
        );
        handle
    }

    fn handle(&self, handle: &str) -> Option<&Open> {
        self.handles.get(handle).map(|s| &s.open)
    }

    fn handle_mut(&mut self, handle: &str) -> Option<&mut Open> {
        self.handles.get_mut(handle).map(|s| &mut s.open)
    }

    fn folder(&self, place: &Place) -> Option<&Path> {
        match place {
            Place::Inbox | Place::InboxFile(_) => Some(&self.tenant.folders.inbox),
            Place::Outbox | Place::OutboxFile(_) => Some(&self.tenant.folders.outbox),
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
        let handles: Vec<Slot> = self.handles.drain().map(|(_, slot)| slot).collect();
        for slot in handles {
            if let Open::Upload { temp, target, .. } = slot.open {
                let _ = fs::remove_file(temp);
                self.event("sftp.upload-abandoned", &target).record(&self.audit);
            }
        }
        if self.denials > AUDITED_DENIALS {
            Event::new("sftp.denied", self.actor.as_str())
                .tenant(&self.tenant.id)
                .detail("reason", "more refused paths in this session")
                .detail("count", self.denials - AUDITED_DENIALS)
                .record(&self.audit);
        }
    }
}

impl russh_sftp::server::Handler for World {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(&mut self, _version: u32, _extensions: HashMap<String, String>) -> Reply<Version> {
        let mut v = Version::new();
        // Without it OpenSSH's client writes 32 KiB at a time; with it, 255 KiB (docs/sftp.md).
        v.extensions.insert("limits@openssh.com".into(), "1".into());
        Ok(v)
    }

    async fn extended(&mut self, id: u32, request: String, _data: Vec<u8>) -> Reply<Packet> {
        if request != "limits@openssh.com" {
            return Err(StatusCode::OpUnsupported.into());
        }
        let mut data = Vec::with_capacity(32);
        for v in [262_144u64, u64::from(MAX_READ), 261_120, MAX_HANDLES as u64] {
            data.extend_from_slice(&v.to_be_bytes());
        }
        Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Reply<Name> {
        let shown = match self.place(&path)? {
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

    async fn stat(&mut self, id: u32, path: String) -> Reply<Attrs> {
        let attrs = match self.place(&path)? {
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

    async fn lstat(&mut self, id: u32, path: String) -> Reply<Attrs> {
        self.stat(id, path).await
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Reply<Attrs> {
        let attrs = match self.handle(&handle).ok_or(StatusCode::Failure)? {
            Open::Upload { file, .. } | Open::Read { file, .. } => {
                FileAttributes::from(&file.metadata().map_err(|e| io_code(&e))?)
            }
            Open::Dir { .. } => dir_attrs(),
        };
        Ok(Attrs { id, attrs })
    }

    async fn open(&mut self, id: u32, filename: String, pflags: OpenFlags, _attrs: FileAttributes) -> Reply<Handle> {
        let writing = pflags.intersects(OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::CREATE | OpenFlags::TRUNCATE);
        let place = self.place(&filename)?;
        let open = match (place, writing) {
            (Place::InboxFile(name), true) => {
                if !crate::disk::upload_allowed(&self.tenant.folders.inbox, self.min_free_space) {
                    tracing::warn!(tenant = %self.tenant.id, file = %limits::shown(&name), "SFTP upload refused: server storage low");
                    self.event("sftp.upload-refused", &self.tenant.folders.inbox.join(&name))
                        .detail("reason", "disk_low")
                        .record(&self.audit);
                    return Err(refused(StatusCode::Failure, "server storage is low; try again later"));
                }
                let slot = self.reserve(true)?;
                let mut rand = [0u8; 8];
                getrandom::fill(&mut rand).map_err(|_| StatusCode::Failure)?;
                let tag: String = rand.iter().map(|b| format!("{b:02x}")).collect();
                let temp = self.tenant.folders.inbox.join(format!("{UPLOAD_PREFIX}{tag}.part"));
                let file = OpenOptions::new()
                    .write(true)
                    .read(true)
                    .create_new(true)
                    .mode(0o640)
                    .open(&temp)
                    .map_err(|e| io_reply(&e))?;
                let upload = Open::Upload {
                    file,
                    temp,
                    target: self.tenant.folders.inbox.join(name),
                    failed: None,
                };
                self.add(upload, slot)
            }
            (Place::OutboxFile(name), false) => {
                let slot = self.reserve(true)?;
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(self.tenant.folders.outbox.join(&name))
                    .map_err(|e| io_reply(&e))?;
                if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
                    return Err(StatusCode::NoSuchFile.into());
                }
                self.add(Open::Read { file, name }, slot)
            }
            _ => return Err(StatusCode::PermissionDenied.into()),
        };
        Ok(Handle { id, handle: open })
    }

    async fn write(&mut self, id: u32, handle: String, offset: u64, data: Vec<u8>) -> Reply<Status> {
        let limit = self.tenant.batch.max_file_bytes;
        match self.handle_mut(&handle) {
            Some(Open::Upload {
                failed: Some((_, message)),
                ..
            }) => Err(refused(StatusCode::Failure, message)),
            Some(Open::Upload { file, failed, .. }) => {
                if offset.saturating_add(data.len() as u64) > limit {
                    *failed = Some(TOO_LARGE);
                    return Err(refused(StatusCode::Failure, TOO_LARGE.1));
                }
                if let Err(e) = file.write_all_at(&data, offset) {
                    let why = write_failure(&e);
                    *failed = Some(why);
                    return Err(refused(io_code(&e), why.1));
                }
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            Some(_) => Err(StatusCode::PermissionDenied.into()),
            None => Err(StatusCode::Failure.into()),
        }
    }

    async fn read(&mut self, id: u32, handle: String, offset: u64, len: u32) -> Reply<Data> {
        match self.handle(&handle) {
            Some(Open::Read { file, .. }) => {
                let mut buf = vec![0u8; len.min(MAX_READ) as usize];
                let n = file.read_at(&mut buf, offset).map_err(|e| io_code(&e))?;
                if n == 0 {
                    return Err(StatusCode::Eof.into());
                }
                buf.truncate(n);
                Ok(Data { id, data: buf })
            }
            Some(_) => Err(StatusCode::PermissionDenied.into()),
            None => Err(StatusCode::Failure.into()),
        }
    }

    async fn fsetstat(&mut self, id: u32, handle: String, attrs: FileAttributes) -> Reply<Status> {
        // `scp -s` truncates with fsetstat(size): apply it; times and modes are accepted and ignored.
        let limit = self.tenant.batch.max_file_bytes;
        if let (Some(size), Some(Open::Upload { file, failed, .. })) = (attrs.size, self.handle_mut(&handle)) {
            if size > limit {
                *failed = Some(TOO_LARGE);
                return Err(refused(StatusCode::Failure, TOO_LARGE.1));
            }
            if let Err(e) = file.set_len(size) {
                let why = write_failure(&e);
                *failed = Some(why);
                return Err(refused(io_code(&e), why.1));
            }
        }
        Ok(status(id, StatusCode::Ok, "Ok"))
    }

    async fn setstat(&mut self, id: u32, path: String, _attrs: FileAttributes) -> Reply<Status> {
        self.place(&path)?;
        Ok(status(id, StatusCode::Ok, "Ok"))
    }

    async fn close(&mut self, id: u32, handle: String) -> Reply<Status> {
        let Some(slot) = self.handles.remove(&handle) else {
            return Err(StatusCode::Failure.into());
        };
        match slot.open {
            Open::Upload {
                file,
                temp,
                target,
                failed: Some((reason, message)),
            } => {
                drop(file);
                let _ = fs::remove_file(&temp);
                tracing::warn!(tenant = %self.tenant.id, file = %limits::shown(&file_name(&target)), reason, "SFTP upload refused");
                let mut event = self.event("sftp.upload-refused", &target).detail("reason", reason);
                if reason == TOO_LARGE.0 {
                    event = event.detail("limit", self.tenant.batch.max_file_bytes);
                }
                event.record(&self.audit);
                Err(refused(StatusCode::Failure, message))
            }
            Open::Upload {
                file,
                temp,
                target,
                failed: None,
            } => {
                // Durable before it is visible: sync the data, rename, sync the folder.
                let landed = file
                    .sync_all()
                    .and_then(|_| fs::rename(&temp, &target))
                    .and_then(|_| File::open(&self.tenant.folders.inbox)?.sync_all());
                if let Err(e) = landed {
                    let _ = fs::remove_file(&temp);
                    let why = write_failure(&e);
                    tracing::warn!(tenant = %self.tenant.id, file = %limits::shown(&file_name(&target)), error = %e, "SFTP upload could not be kept");
                    self.event("sftp.upload-refused", &target)
                        .detail("reason", why.0)
                        .record(&self.audit);
                    return Err(refused(io_code(&e), why.1));
                }
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                let name = file_name(&target);
                tracing::info!(tenant = %self.tenant.id, file = %name, bytes = size, "SFTP upload landed in the inbox");
                self.event("sftp.upload", &target)
                    .detail("bytes", size)
                    .record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            Open::Read { file, name } => {
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                tracing::info!(tenant = %self.tenant.id, file = %name, bytes, "SFTP download from the outbox");
                Event::new("sftp.download", self.actor.as_str())
                    .tenant(&self.tenant.id)
                    .detail("file", &name)
                    .detail("bytes", bytes)
                    .record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            Open::Dir { .. } => Ok(status(id, StatusCode::Ok, "Ok")),
        }
    }

    async fn opendir(&mut self, id: u32, path: String) -> Reply<Handle> {
        let place = self.place(&path)?;
        if !matches!(place, Place::Root | Place::Inbox | Place::Outbox) {
            return Err(StatusCode::NoSuchFile.into());
        }
        let slot = self.reserve(false)?;
        Ok(Handle {
            id,
            handle: self.add(Open::Dir { place, done: false }, slot),
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Reply<Name> {
        let place = match self.handle_mut(&handle) {
            Some(Open::Dir { place, done }) if !*done => {
                *done = true;
                place.clone()
            }
            Some(Open::Dir { .. }) => return Err(StatusCode::Eof.into()),
            _ => return Err(StatusCode::Failure.into()),
        };
        Ok(Name {
            id,
            files: self.entries(&place),
        })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Reply<Status> {
        match self.place(&filename)? {
            Place::OutboxFile(name) => {
                let path = self.tenant.folders.outbox.join(&name);
                if file_attrs(&path).is_none() {
                    return Err(StatusCode::NoSuchFile.into());
                }
                fs::remove_file(&path).map_err(|e| io_code(&e))?;
                tracing::info!(tenant = %self.tenant.id, file = %name, "SFTP delete in the outbox");
                self.event("sftp.delete", &path).record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            _ => Err(StatusCode::PermissionDenied.into()),
        }
    }

    async fn rename(&mut self, id: u32, oldpath: String, newpath: String) -> Reply<Status> {
        // Clients that upload as `name.filepart` and rename afterwards (WinSCP).
        match (self.place(&oldpath)?, self.place(&newpath)?) {
            (Place::InboxFile(from), Place::InboxFile(to)) => {
                let from = self.tenant.folders.inbox.join(from);
                if file_attrs(&from).is_none() {
                    return Err(StatusCode::NoSuchFile.into());
                }
                let target = self.tenant.folders.inbox.join(to);
                fs::rename(&from, &target).map_err(|e| io_code(&e))?;
                self.event("sftp.rename", &target)
                    .detail("from", file_name(&from))
                    .record(&self.audit);
                Ok(status(id, StatusCode::Ok, "Ok"))
            }
            _ => Err(StatusCode::PermissionDenied.into()),
        }
    }

    async fn mkdir(&mut self, _id: u32, _path: String, _attrs: FileAttributes) -> Reply<Status> {
        Err(StatusCode::PermissionDenied.into())
    }

    async fn rmdir(&mut self, _id: u32, _path: String) -> Reply<Status> {
        Err(StatusCode::PermissionDenied.into())
    }

    async fn readlink(&mut self, _id: u32, _path: String) -> Reply<Name> {
        Err(StatusCode::PermissionDenied.into())
    }

    async fn symlink(&mut self, _id: u32, _linkpath: String, _targetpath: String) -> Reply<Status> {
        Err(StatusCode::PermissionDenied.into())
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An upload past the tenant's `max_file_bytes`: the audit's reason, the client's message.
const TOO_LARGE: (&str, &str) = ("max_file_bytes", "file larger than max_file_bytes");

/// Why a write or a publish failed: the audit's reason, the client's message.
fn write_failure(e: &std::io::Error) -> (&'static str, &'static str) {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ("no_space", "no space left on the server"),
        Some(libc::EFBIG) => ("too_large_for_disk", "file too large for the server's file system"),
        _ => ("write_failed", "write failed on the server"),
    }
}

fn io_reply(e: &std::io::Error) -> StatusReply {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => refused(StatusCode::Failure, write_failure(e).1),
        Some(libc::EMFILE) | Some(libc::ENFILE) => refused(StatusCode::Failure, "server busy: too many open files"),
        _ => io_code(e).into(),
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
