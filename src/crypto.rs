//! Keys and sealing (docs/data.md): the master key, per-tenant keys, sealed records and keyed hashes.
//!
//! Envelope encryption, as a KMS does it. The master key file holds one or more *versions* of
//! the master key (`key rotate` adds one). Each tenant has its own random secrets (sealing
//! secrets, one per *generation*, and one for keyed hashes), kept in `state_dir/keys`, which is
//! sealed as a whole under the newest master key version. Rotating re-seals that file under the
//! new version at once, so nothing live needs an older version afterwards (`key retire` then
//! destroys one; backups taken under it no longer open), and gives every tenant a new sealing
//! generation: new records are sealed under it, the store's re-sealer moves the old ones over in
//! the background and then drops the old generation ([`Keyring::drop_old_generations`]).
//! Purging a tenant removes its secrets: none of its records, wherever they are left, can be
//! opened again.
//!
//! The keyed-hash secret is not rotated: the blocklist and anonymised records keep only hashes,
//! and a hash cannot be re-keyed without the number it stands for.
//!
//! Every record the store keeps is sealed with XChaCha20-Poly1305 under its tenant's key, with a
//! 24-byte nonce that never repeats: 16 random bytes drawn once per thread, then a counter (a
//! counter alone would repeat after a restored backup; one `getrandom` call per seal cost a
//! quarter of sealing). The associated data binds a record to the table, tenant and record
//! key it was written under, so a record copied elsewhere fails to open. Lookups by phone number
//! and duplicate-file detection use keyed BLAKE3 hashes whose keys never touch the disk.
//!
//! This module knows nothing about tables or record layouts: it seals and opens bytes.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// Version of the sealed-record envelope.
const ENVELOPE_VERSION: u8 = 1;
/// The sealing generation a tenant starts with; each rotation adds one.
const FIRST_GENERATION: u8 = 1;
const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = 2 + NONCE_LEN;
/// What sealing adds to a plaintext.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + 16;

/// Problems with the master key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: cannot read the master key: {cause}", path.display())]
    Read { path: PathBuf, cause: std::io::Error },
    #[error(
        "{}: a key file readable by group or others (mode {mode:o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: a master key is 32 bytes (or 64 hex digits); this file has {len} bytes", path.display())]
    Length { path: PathBuf, len: usize },
    #[error("{}: a key already exists; smsdrop never overwrites a master key", path.display())]
    Exists { path: PathBuf },
    #[error("{}: cannot write the master key: {cause}", path.display())]
    Write { path: PathBuf, cause: std::io::Error },
    #[error("255 master key versions: no more can be added")]
    TooManyVersions,
    #[error("tenant {0} has 255 sealing generations: let the re-sealer finish (key status) before rotating again")]
    TooManyGenerations(String),
    #[error("the keyring's lock was poisoned by a panic elsewhere")]
    Poisoned,
    #[error("{}: missing, but the database beside it holds records sealed under the keys it held; restore it (smsdrop restore) rather than start without", path.display())]
    StoreMissing { path: PathBuf },
    #[error("version {0} is the newest master key version: rotate first")]
    RetireNewest(u8),
    #[error("the key file holds no master key version {0}")]
    NoVersion(u8),
    #[error("{}: the tenant key store: {cause}", path.display())]
    Store { path: PathBuf, cause: std::io::Error },
    #[error("{}: the tenant key store is sealed under master key version {version}, which the key file does not hold", path.display())]
    StoreVersion { path: PathBuf, version: u8 },
    #[error("{}: the tenant key store does not open (changed, or another master key)", path.display())]
    StoreForged { path: PathBuf },
}

/// A record that does not open: tampered with, moved, or sealed under another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed record is truncated")]
    Truncated,
    #[error("sealed record has an unknown envelope version or key id")]
    UnknownVersion,
    #[error("sealed record does not authenticate (tampered, moved, or another key)")]
    Forged,
}

/// A key file's content in transit (the admin socket): never shown, wiped when dropped.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeyFileText(String);

impl std::fmt::Debug for KeyFileText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyFileText(..)")
    }
}

impl Drop for KeyFileText {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl KeyFileText {
    /// Reads a key file (as `load` would, refusing loose permissions) for handing to `serve`.
    pub fn read(path: &Path) -> Result<KeyFileText, KeyError> {
        let keys = MasterKeys::load(path)?;
        Ok(KeyFileText(keys.to_text()))
    }

    pub fn keys(&self, path: &Path) -> Result<MasterKeys, KeyError> {
        MasterKeys::parse(self.0.as_bytes(), path)
    }
}

/// One 32-byte version of the master key.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    fn random() -> Result<MasterKey, std::io::Error> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut()).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(MasterKey(key))
    }

    fn derive(&self, purpose: &str, tenant: &str) -> Zeroizing<[u8; 32]> {
        derive(self.0.as_ref(), purpose, tenant)
    }
}

/// HKDF-SHA256 of `secret` for `purpose` and `tenant`.
fn derive(secret: &[u8], purpose: &str, tenant: &str) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"smsdrop/v1"), secret);
    let mut out = Zeroizing::new([0u8; 32]);
    let info = format!("smsdrop/{purpose}/{tenant}");
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32, so expand cannot fail.
    let _ = hk.expand(info.as_bytes(), out.as_mut());
    out
}

/// The versions of the master key in the key file, oldest first.
///
/// The file holds 32 raw bytes or 64 hex digits (what `keygen` writes: version 1), or, once a
/// key was rotated, lines of `<version> <64 hex digits>` (`#` comments allowed).
pub struct MasterKeys {
    versions: std::collections::BTreeMap<u8, MasterKey>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKeys(versions {:?})", self.list())
    }
}

fn parse_hex_key(text: &str) -> Option<MasterKey> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        key[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(MasterKey(key))
}

impl MasterKeys {
    /// Reads the key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<MasterKeys, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            cause: source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let bytes = Zeroizing::new(fs::read(path).map_err(read_err)?);
        Self::parse(&bytes, path)
    }

    /// The key file's content (`path` only names it in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<MasterKeys, KeyError> {
        let mut versions = std::collections::BTreeMap::new();
        if bytes.len() == 32 {
            let mut key = Zeroizing::new([0u8; 32]);
            key.copy_from_slice(bytes);
            versions.insert(1, MasterKey(key));
            return Ok(MasterKeys { versions });
        }
        let bad = || KeyError::Length {
            path: path.to_path_buf(),
            len: bytes.len(),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
        if let Some(key) = parse_hex_key(text.trim()) {
            versions.insert(1, key);
            return Ok(MasterKeys { versions });
        }
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (version, hex) = line.split_once(' ').ok_or_else(bad)?;
            let version: u8 = version.parse().ok().filter(|v| *v > 0).ok_or_else(bad)?;
            let key = parse_hex_key(hex.trim()).ok_or_else(bad)?;
            if versions.insert(version, key).is_some() {
                return Err(bad());
            }
        }
        if versions.is_empty() {
            return Err(bad());
        }
        Ok(MasterKeys { versions })
    }

    /// Writes a first key (version 1) to `path` with mode 0600. Refuses to overwrite.
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        let write_err = |source| KeyError::Write {
            path: path.to_path_buf(),
            cause: source,
        };
        let key = MasterKey::random().map_err(write_err)?;
        let mut file = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(KeyError::Exists {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(write_err(e)),
        };
        file.write_all(key.0.as_ref()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        Ok(())
    }

    /// The versions held, oldest first.
    pub fn list(&self) -> Vec<u8> {
        self.versions.keys().copied().collect()
    }

    /// The newest version and its key.
    fn newest(&self) -> (u8, &MasterKey) {
        // `load` refuses a file without a key, and `retire` never removes the newest.
        let (v, k) = self
            .versions
            .iter()
            .next_back()
            .expect("at least one master key version");
        (*v, k)
    }

    fn get(&self, version: u8) -> Option<&MasterKey> {
        self.versions.get(&version)
    }

    /// Adds a fresh random version after the newest; returns its number.
    pub fn add_version(&mut self) -> Result<u8, KeyError> {
        let next = self.newest().0.checked_add(1).ok_or(KeyError::TooManyVersions)?;
        let key = MasterKey::random().map_err(|source| KeyError::Write {
            path: PathBuf::new(),
            cause: source,
        })?;
        self.versions.insert(next, key);
        Ok(next)
    }

    /// Destroys a version (never the newest).
    pub fn retire(&mut self, version: u8) -> Result<(), KeyError> {
        if version == self.newest().0 {
            return Err(KeyError::RetireNewest(version));
        }
        self.versions
            .remove(&version)
            .map(|_| ())
            .ok_or(KeyError::NoVersion(version))
    }

    /// Writes every version to `path` (mode 0600), replacing it whole: a temporary file beside
    /// it, synced, renamed over it, the folder synced.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let write_err = |source| KeyError::Write {
            path: path.to_path_buf(),
            cause: source,
        };
        let text = Zeroizing::new(self.to_text());
        write_atomic(path, text.as_bytes()).map_err(write_err)
    }

    /// The key file's text: comments, then `<version> <64 hex digits>` lines.
    fn to_text(&self) -> String {
        let mut text = String::from(
            "# smsdrop master key versions, oldest first: `<version> <64 hex digits>`.\n# Keep this file apart from backups; smsdrop key rotate / key retire change it.\n",
        );
        for (v, k) in &self.versions {
            text.push_str(&format!("{v} "));
            for b in k.0.iter() {
                text.push_str(&format!("{b:02x}"));
            }
            text.push('\n');
        }
        text
    }
}

/// Replaces `path` whole with `bytes` (mode 0600): temporary file, sync, rename, folder sync.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".new");
    let temp = path.with_file_name(name);
    let _ = fs::remove_file(&temp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

thread_local! {
    /// This thread's nonce prefix (random) and counter.
    static NONCE: std::cell::Cell<([u8; 16], u64)> = std::cell::Cell::new((fresh_prefix(), 0));
}

fn fresh_prefix() -> [u8; 16] {
    let mut prefix = [0u8; 16];
    // The OS random source failing is not recoverable: without a nonce nothing can be stored.
    if let Err(e) = getrandom::fill(&mut prefix) {
        panic!("the operating system's random source failed: {e}");
    }
    prefix
}

/// A nonce no other seal used: prefixes are 128 random bits per thread, the counter never wraps
/// within one (a new prefix is drawn before it could).
fn next_nonce() -> [u8; NONCE_LEN] {
    NONCE.with(|cell| {
        let (mut prefix, mut count) = cell.get();
        if count == u64::MAX {
            prefix = fresh_prefix();
            count = 0;
        }
        cell.set((prefix, count + 1));
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..16].copy_from_slice(&prefix);
        nonce[16..].copy_from_slice(&count.to_be_bytes());
        nonce
    })
}

/// One tenant's keys: erasing the master key (or the tenant's secrets) makes its data unreadable.
pub struct TenantKeys {
    tenant: String,
    /// Sealing keys by generation, oldest first; the last seals.
    generations: RwLock<Vec<(u8, XChaCha20Poly1305)>>,
    phone_key: Zeroizing<[u8; 32]>,
    file_key: Zeroizing<[u8; 32]>,
}

/// The sealing generation of a sealed record (`None`: not one of ours).
pub fn generation_of(sealed: &[u8]) -> Option<u8> {
    (sealed.len() >= SEAL_OVERHEAD && sealed[0] == ENVELOPE_VERSION).then(|| sealed[1])
}

impl TenantKeys {
    fn new(secret: &TenantSecret, tenant: &str) -> TenantKeys {
        TenantKeys {
            tenant: tenant.to_string(),
            generations: RwLock::new(Self::aeads(secret, tenant)),
            phone_key: derive(&secret.index, "phone-index", tenant),
            file_key: derive(&secret.index, "file-dedupe", tenant),
        }
    }

    fn aeads(secret: &TenantSecret, tenant: &str) -> Vec<(u8, XChaCha20Poly1305)> {
        secret
            .seals
            .iter()
            .map(|(g, seal)| (*g, XChaCha20Poly1305::new(derive(seal, "seal", tenant).as_ref().into())))
            .collect()
    }

    /// Takes the generations now in `secret` (after a rotation or a drop).
    fn refresh(&self, secret: &TenantSecret) {
        let fresh = Self::aeads(secret, &self.tenant);
        match self.generations.write() {
            Ok(mut g) => *g = fresh,
            Err(p) => *p.into_inner() = fresh,
        }
    }

    fn associated_data(&self, generation: u8, table: &str, record_key: &[u8]) -> Vec<u8> {
        let mut ad = Vec::with_capacity(4 + table.len() + self.tenant.len() + record_key.len());
        ad.extend_from_slice(&[ENVELOPE_VERSION, generation]);
        ad.extend_from_slice(table.as_bytes());
        ad.push(0);
        ad.extend_from_slice(self.tenant.as_bytes());
        ad.push(0);
        ad.extend_from_slice(record_key);
        ad
    }

    /// The generation new records are sealed under.
    pub fn newest_generation(&self) -> u8 {
        let g = self.generations.read().unwrap_or_else(|p| p.into_inner());
        g.last().map(|(g, _)| *g).unwrap_or(0)
    }

    /// Seals `plaintext` for storage in `table` under `record_key`, with the newest generation.
    pub fn seal(&self, table: &str, record_key: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = next_nonce();
        let generations = self.generations.read().unwrap_or_else(|p| p.into_inner());
        // A tenant always has a generation: its secret is made with one and never left without.
        let Some((generation, aead)) = generations.last() else {
            panic!("tenant {} has no sealing generation", self.tenant);
        };
        let ad = self.associated_data(*generation, table, record_key);
        let ciphertext = aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &ad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        out.extend_from_slice(&[ENVELOPE_VERSION, *generation]);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens a record sealed by [`TenantKeys::seal`] for the same table and record key.
    pub fn open(&self, table: &str, record_key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Truncated);
        }
        if sealed[0] != ENVELOPE_VERSION {
            return Err(SealError::UnknownVersion);
        }
        let generation = sealed[1];
        let generations = self.generations.read().unwrap_or_else(|p| p.into_inner());
        let (_, aead) = generations
            .iter()
            .find(|(g, _)| *g == generation)
            .ok_or(SealError::UnknownVersion)?;
        let ad = self.associated_data(generation, table, record_key);
        aead.decrypt(
            XNonce::from_slice(&sealed[2..HEADER_LEN]),
            Payload {
                msg: &sealed[HEADER_LEN..],
                aad: &ad,
            },
        )
        .map_err(|_| SealError::Forged)
    }

    /// The record sealed again under the newest generation, or `None` if it already is.
    pub fn reseal(&self, table: &str, record_key: &[u8], sealed: &[u8]) -> Result<Option<Vec<u8>>, SealError> {
        if generation_of(sealed) == Some(self.newest_generation()) {
            return Ok(None);
        }
        let plain = Zeroizing::new(self.open(table, record_key, sealed)?);
        Ok(Some(self.seal(table, record_key, &plain)))
    }

    /// The keyed hash that stands for a phone number in lookups (blocklist, subject requests).
    pub fn phone_hash(&self, e164: &str) -> [u8; 16] {
        self.lookup_hash(e164)
    }

    /// A keyed hash for finding a record by something that must not be stored in clear.
    pub fn lookup_hash(&self, value: &str) -> [u8; 16] {
        let full = blake3::keyed_hash(&self.phone_key, value.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&full.as_bytes()[..16]);
        out
    }

    /// A keyed hasher for a file's content, for `duplicate_file`.
    pub fn file_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.file_key)
    }
}

/// A tenant's own random secrets: the ones its records are sealed under (by generation, oldest
/// first), one its keyed hashes (phone index, file fingerprints) are made with. Only in the
/// tenant key store.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct TenantSecret {
    seals: Vec<(u8, [u8; 32])>,
    index: [u8; 32],
}

impl Drop for TenantSecret {
    fn drop(&mut self) {
        for (_, seal) in &mut self.seals {
            zeroize::Zeroize::zeroize(seal);
        }
        zeroize::Zeroize::zeroize(&mut self.index);
    }
}

fn random_32() -> std::io::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    getrandom::fill(&mut out).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(out)
}

impl TenantSecret {
    fn random() -> std::io::Result<TenantSecret> {
        Ok(TenantSecret {
            seals: vec![(FIRST_GENERATION, random_32()?)],
            index: random_32()?,
        })
    }

    fn newest(&self) -> u8 {
        self.seals.last().map(|(g, _)| *g).unwrap_or(0)
    }
}

const KEY_STORE_MAGIC: &[u8; 8] = b"SMSDKEYS";

/// The keys that seal `purpose` (the key store, backups) under one master key version.
fn master_aead(master: &MasterKey, purpose: &str) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(master.derive(purpose, "").as_ref().into())
}

/// The master key versions, every tenant's secrets, and the tenant keys made from them so far.
pub struct Keyring {
    masters: RwLock<MasterKeys>,
    /// Where the tenant key store lives; `None`: in memory only (a restore's first steps).
    path: Option<PathBuf>,
    secrets: std::sync::Mutex<std::collections::BTreeMap<String, TenantSecret>>,
    tenants: RwLock<HashMap<String, Arc<TenantKeys>>>,
}

/// Tenant ids that are not tenants: the mail queue and dispatch log, the global blocklist.
const SYSTEM_TENANTS: [&str; 2] = ["@system", "@global"];

impl Keyring {
    /// Opens the tenant key store of `state_dir` (made empty on first use).
    pub fn open(masters: MasterKeys, state_dir: &Path) -> Result<Keyring, KeyError> {
        let path = state_dir.join(crate::paths::KEY_STORE_FILE);
        if let Ok(meta) = fs::metadata(&path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions { path, mode });
            }
        }
        let secrets = match fs::read(&path) {
            Ok(bytes) => Self::unseal_store(&masters, &path, &bytes)?,
            // New secrets for a store that already has records would open none of them.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && state_dir.join(crate::paths::DB_FILE).exists() => {
                return Err(KeyError::StoreMissing { path });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(source) => return Err(KeyError::Store { path, cause: source }),
        };
        let ring = Keyring {
            masters: RwLock::new(masters),
            path: Some(path),
            secrets: std::sync::Mutex::new(secrets),
            tenants: RwLock::new(HashMap::new()),
        };
        ring.ensure(&SYSTEM_TENANTS)?;
        Ok(ring)
    }

    /// A keyring with no tenant key store: only the master key versions (backup frames).
    pub fn in_memory(masters: MasterKeys) -> Keyring {
        Keyring {
            masters: RwLock::new(masters),
            path: None,
            secrets: std::sync::Mutex::new(Default::default()),
            tenants: RwLock::new(HashMap::new()),
        }
    }

    fn unseal_store(
        masters: &MasterKeys,
        path: &Path,
        bytes: &[u8],
    ) -> Result<std::collections::BTreeMap<String, TenantSecret>, KeyError> {
        let forged = || KeyError::StoreForged {
            path: path.to_path_buf(),
        };
        let head = KEY_STORE_MAGIC.len() + 1;
        if bytes.len() < head + NONCE_LEN + 16 || &bytes[..KEY_STORE_MAGIC.len()] != KEY_STORE_MAGIC {
            return Err(forged());
        }
        let version = bytes[KEY_STORE_MAGIC.len()];
        let master = masters.get(version).ok_or(KeyError::StoreVersion {
            path: path.to_path_buf(),
            version,
        })?;
        let plain = Zeroizing::new(
            master_aead(master, "key-store")
                .decrypt(
                    XNonce::from_slice(&bytes[head..head + NONCE_LEN]),
                    Payload {
                        msg: &bytes[head + NONCE_LEN..],
                        aad: &bytes[..head],
                    },
                )
                .map_err(|_| forged())?,
        );
        postcard::from_bytes(&plain).map_err(|_| forged())
    }

    /// Seals the tenant key store under the newest master key version and replaces its file.
    fn save(&self, secrets: &std::collections::BTreeMap<String, TenantSecret>) -> Result<(), KeyError> {
        let Some(path) = &self.path else { return Ok(()) };
        let masters = self.masters.read().map_err(|_| KeyError::Poisoned)?;
        let (version, master) = masters.newest();
        // Never an empty store in place of a full one: a failure to encode is an error.
        let plain = Zeroizing::new(postcard::to_stdvec(secrets).map_err(|e| KeyError::Store {
            path: path.clone(),
            cause: std::io::Error::other(e.to_string()),
        })?);
        let mut out = KEY_STORE_MAGIC.to_vec();
        out.push(version);
        let nonce = next_nonce();
        let sealed = master_aead(master, "key-store")
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plain, aad: &out })
            .map_err(|_| KeyError::Store {
                path: path.clone(),
                cause: std::io::Error::other("sealing failed"),
            })?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        write_atomic(path, &out).map_err(|source| KeyError::Store {
            path: path.clone(),
            cause: source,
        })
    }

    /// Makes the secrets of these tenants if they have none yet (one write of the store).
    pub fn ensure(&self, tenants: &[&str]) -> Result<(), KeyError> {
        let mut secrets = self.secrets.lock().map_err(|_| KeyError::Poisoned)?;
        let mut added = false;
        for t in tenants {
            if !secrets.contains_key(*t) {
                let secret = TenantSecret::random().map_err(|source| KeyError::Store {
                    path: self.path.clone().unwrap_or_default(),
                    cause: source,
                })?;
                secrets.insert(t.to_string(), secret);
                added = true;
            }
        }
        if added {
            self.save(&secrets)?;
        }
        Ok(())
    }

    /// The keys of records that belong to no tenant (the mail queue, the dispatch log).
    pub fn system(&self) -> Arc<TenantKeys> {
        self.tenant("@system")
    }

    /// The keys of `tenant`. A tenant without secrets yet gets them here; every configured
    /// tenant gets them at start (`ensure`), where a failure to write the store stops the start.
    pub fn tenant(&self, tenant: &str) -> Arc<TenantKeys> {
        if let Some(k) = self.tenants.read().ok().and_then(|m| m.get(tenant).cloned()) {
            return k;
        }
        if let Err(e) = self.ensure(&[tenant]) {
            // Sealing under a secret that is not stored would lose the records at the next start.
            panic!("cannot keep the keys of tenant {tenant}: {e}");
        }
        // Made and cached under the secrets' lock, so that a rotation cannot slip in between.
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        let keys = match secrets.get(tenant) {
            Some(secret) => Arc::new(TenantKeys::new(secret, tenant)),
            None => panic!("the keys of tenant {tenant} vanished"),
        };
        let mut map = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        map.entry(tenant.to_string()).or_insert(keys).clone()
    }

    /// The keys that seal backup frames under master key version `version` (`None`: the newest).
    pub fn backup(&self, version: Option<u8>) -> Option<(u8, Arc<TenantKeys>)> {
        let masters = self.masters.read().ok()?;
        let (v, master) = match version {
            Some(v) => (v, masters.get(v)?),
            None => masters.newest(),
        };
        let secret = TenantSecret {
            seals: vec![(FIRST_GENERATION, *master.derive("backup", ""))],
            index: *master.derive("backup-index", ""),
        };
        Some((v, Arc::new(TenantKeys::new(&secret, "@backup"))))
    }

    /// The master key versions held, and the one the tenant key store is sealed under.
    pub fn versions(&self) -> (Vec<u8>, u8) {
        match self.masters.read() {
            Ok(m) => (m.list(), m.newest().0),
            Err(_) => (Vec::new(), 0),
        }
    }

    /// Takes the master key versions now in the key file and re-seals the tenant key store
    /// under the newest: after this nothing in `state_dir` needs an older version.
    pub fn rekey(&self, masters: MasterKeys) -> Result<(), KeyError> {
        {
            let mut current = self.masters.write().map_err(|_| KeyError::Poisoned)?;
            *current = masters;
        }
        let secrets = self.secrets.lock().map_err(|_| KeyError::Poisoned)?;
        self.save(&secrets)
    }

    /// Destroys a tenant's secrets: nothing sealed for it opens again.
    pub fn forget(&self, tenant: &str) -> Result<bool, KeyError> {
        let mut secrets = self.secrets.lock().map_err(|_| KeyError::Poisoned)?;
        let gone = secrets.remove(tenant).is_some();
        if gone {
            self.save(&secrets)?;
        }
        if let Ok(mut map) = self.tenants.write() {
            map.remove(tenant);
        }
        Ok(gone)
    }

    /// Gives every tenant (and the system's records) a new sealing generation: records sealed
    /// from now on use it; older ones still open until [`Keyring::drop_old_generations`].
    pub fn new_generation(&self) -> Result<(), KeyError> {
        let mut secrets = self.secrets.lock().map_err(|_| KeyError::Poisoned)?;
        let store_error = |source| KeyError::Store {
            path: self.path.clone().unwrap_or_default(),
            cause: source,
        };
        let mut next = secrets.clone();
        for (tenant, secret) in next.iter_mut() {
            let generation = secret
                .newest()
                .checked_add(1)
                .ok_or_else(|| KeyError::TooManyGenerations(tenant.clone()))?;
            secret.seals.push((generation, random_32().map_err(store_error)?));
        }
        self.save(&next)?;
        *secrets = next;
        self.refresh(&secrets);
        Ok(())
    }

    /// Destroys every sealing generation but the newest of these tenants (all when `None`):
    /// only once no record is sealed under one. Returns how many were destroyed.
    pub fn drop_old_generations(&self, tenants: Option<&[String]>) -> Result<usize, KeyError> {
        let mut secrets = self.secrets.lock().map_err(|_| KeyError::Poisoned)?;
        let mut next = secrets.clone();
        let mut dropped = 0;
        for (tenant, secret) in next.iter_mut() {
            if tenants.is_some_and(|t| !t.contains(tenant)) || secret.seals.len() < 2 {
                continue;
            }
            dropped += secret.seals.len() - 1;
            secret.seals.drain(..secret.seals.len() - 1);
        }
        if dropped > 0 {
            self.save(&next)?;
            *secrets = next;
            self.refresh(&secrets);
        }
        Ok(dropped)
    }

    /// Each tenant's sealing generations, oldest first (`key status`).
    pub fn generations(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        self.secrets
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(t, secret)| (t.clone(), secret.seals.iter().map(|(g, _)| *g).collect()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether some tenant still has a generation older than its newest.
    pub fn has_old_generations(&self) -> bool {
        self.secrets
            .lock()
            .map(|s| s.values().any(|secret| secret.seals.len() > 1))
            .unwrap_or(false)
    }

    /// The cached tenant keys take the generations now in the store.
    fn refresh(&self, secrets: &std::collections::BTreeMap<String, TenantSecret>) {
        let map = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        for (tenant, keys) in map.iter() {
            if let Some(secret) = secrets.get(tenant) {
                keys.refresh(secret);
            }
        }
    }

    /// Tenants with secrets in the store.
    pub fn known_tenants(&self) -> Vec<String> {
        self.secrets
            .lock()
            .map(|s| s.keys().filter(|t| !t.starts_with('@')).cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masters(dir: &Path) -> MasterKeys {
        let path = dir.join("master.key");
        if !path.exists() {
            MasterKeys::generate(&path).unwrap();
        }
        MasterKeys::load(&path).unwrap()
    }

    fn keyring(dir: &Path) -> Keyring {
        Keyring::open(masters(dir), dir).unwrap()
    }

    #[test]
    fn sealed_record_opens_only_where_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path());
        let acme = ring.tenant("acme");
        let sealed = acme.seal("messages", b"k1", b"+33612345678 hello");
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(acme.open("messages", b"k1", &sealed).unwrap(), b"+33612345678 hello");
        assert_eq!(acme.open("messages", b"k2", &sealed), Err(SealError::Forged));
        assert_eq!(acme.open("batches", b"k1", &sealed), Err(SealError::Forged));
        assert_eq!(
            ring.tenant("other").open("messages", b"k1", &sealed),
            Err(SealError::Forged)
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(acme.open("messages", b"k1", &tampered), Err(SealError::Forged));
        assert_eq!(acme.open("messages", b"k1", &sealed[..10]), Err(SealError::Truncated));
    }

    #[test]
    fn nonces_differ_between_seals() {
        let dir = tempfile::tempdir().unwrap();
        let acme = keyring(dir.path()).tenant("acme");
        assert_ne!(acme.seal("t", b"k", b"x"), acme.seal("t", b"k", b"x"));
        let here = next_nonce();
        let there = std::thread::spawn(next_nonce).join().unwrap();
        assert_ne!(here[..16], there[..16], "each thread draws its own prefix");
        let next = next_nonce();
        assert_eq!(here[..16], next[..16]);
        assert_ne!(here, next);
    }

    #[test]
    fn phone_hashes_are_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path());
        let a = ring.tenant("a").phone_hash("+33612345678");
        assert_eq!(a, ring.tenant("a").phone_hash("+33612345678"));
        assert_ne!(a, ring.tenant("b").phone_hash("+33612345678"));
    }

    #[test]
    fn tenant_secrets_survive_a_restart_and_a_rotation_and_go_with_a_purge() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = keyring(dir.path()).tenant("acme").seal("t", b"k", b"kept");
        let hash = keyring(dir.path()).tenant("acme").phone_hash("+33612345678");
        // rotate: a second version, the store re-sealed under it, then the first destroyed
        let path = dir.path().join("master.key");
        let mut m = MasterKeys::load(&path).unwrap();
        assert_eq!(m.add_version().unwrap(), 2);
        m.save(&path).unwrap();
        let ring = keyring(dir.path());
        ring.rekey(MasterKeys::load(&path).unwrap()).unwrap();
        let mut m = MasterKeys::load(&path).unwrap();
        assert!(matches!(m.retire(2), Err(KeyError::RetireNewest(2))));
        m.retire(1).unwrap();
        m.save(&path).unwrap();
        let ring = keyring(dir.path());
        assert_eq!(ring.versions(), (vec![2], 2));
        let acme = ring.tenant("acme");
        assert_eq!(acme.open("t", b"k", &sealed).unwrap(), b"kept");
        assert_eq!(acme.phone_hash("+33612345678"), hash);
        assert!(ring.forget("acme").unwrap());
        let fresh = keyring(dir.path()).tenant("acme");
        assert_eq!(
            fresh.open("t", b"k", &sealed),
            Err(SealError::Forged),
            "purged: gone for good"
        );
        // the store does not open under a key file without its version
        let other = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join(crate::paths::KEY_STORE_FILE),
            other.path().join(crate::paths::KEY_STORE_FILE),
        )
        .unwrap();
        assert!(matches!(
            Keyring::open(masters(other.path()), other.path()),
            Err(KeyError::StoreVersion { version: 2, .. })
        ));
    }

    #[test]
    fn a_new_generation_seals_new_records_and_the_old_one_goes_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path());
        let acme = ring.tenant("acme");
        let old = acme.seal("t", b"k", b"old");
        assert_eq!(generation_of(&old), Some(1));
        assert_eq!(acme.reseal("t", b"k", &old).unwrap(), None, "already the newest");
        ring.new_generation().unwrap();
        assert!(ring.has_old_generations());
        // the cached keys follow, and a reopened keyring has both generations
        let new = acme.seal("t", b"k", b"new");
        assert_eq!(generation_of(&new), Some(2));
        assert_eq!(
            keyring(dir.path()).tenant("acme").open("t", b"k", &old).unwrap(),
            b"old"
        );
        let moved = acme.reseal("t", b"k", &old).unwrap().unwrap();
        assert_eq!(generation_of(&moved), Some(2));
        assert_eq!(acme.open("t", b"k", &moved).unwrap(), b"old");
        assert_eq!(ring.generations()["acme"], [1, 2]);
        assert_eq!(ring.drop_old_generations(None).unwrap(), SYSTEM_TENANTS.len() + 1);
        assert!(!ring.has_old_generations());
        for keys in [acme, keyring(dir.path()).tenant("acme")] {
            assert_eq!(keys.open("t", b"k", &old), Err(SealError::UnknownVersion));
            assert_eq!(keys.open("t", b"k", &moved).unwrap(), b"old");
            assert_eq!(keys.open("t", b"k", &new).unwrap(), b"new");
        }
    }

    #[test]
    fn key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        MasterKeys::generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(MasterKeys::generate(&path), Err(KeyError::Exists { .. })));
        assert_eq!(MasterKeys::load(&path).unwrap().list(), [1]);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(MasterKeys::load(&path), Err(KeyError::Permissions { .. })));
        let hex = dir.path().join("hex.key");
        fs::write(&hex, "ab".repeat(32)).unwrap();
        fs::set_permissions(&hex, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*MasterKeys::load(&hex).unwrap().versions[&1].0, [0xab; 32]);
        let lines = dir.path().join("lines.key");
        fs::write(&lines, format!("# two\n1 {}\n3 {}\n", "ab".repeat(32), "cd".repeat(32))).unwrap();
        fs::set_permissions(&lines, fs::Permissions::from_mode(0o600)).unwrap();
        let m = MasterKeys::load(&lines).unwrap();
        assert_eq!((m.list(), m.newest().0), (vec![1, 3], 3));
        fs::write(&lines, format!("1 {}\n1 {}\n", "ab".repeat(32), "cd".repeat(32))).unwrap();
        assert!(
            matches!(MasterKeys::load(&lines), Err(KeyError::Length { .. })),
            "a version twice"
        );
    }
}
