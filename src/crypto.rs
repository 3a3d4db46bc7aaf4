//! Keys and sealing (SPEC §9): the master key, per-tenant keys derived from it, sealed records
//! and keyed hashes.
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
/// Version of the master key that sealed a record; key rotation adds more.
const KEY_ID: u8 = 1;
const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = 2 + NONCE_LEN;
/// What sealing adds to a plaintext.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + 16;

/// Problems with the master key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: cannot read the master key: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{}: the master key is readable by group or others (mode {mode:o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: a master key is 32 bytes (or 64 hex digits); this file has {len} bytes", path.display())]
    Length { path: PathBuf, len: usize },
    #[error("{}: a key already exists; smsdrop never overwrites a master key", path.display())]
    Exists { path: PathBuf },
    #[error("{}: cannot write the master key: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
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

/// The 32-byte secret from which every at-rest key derives.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Reads the key file, refusing one that group or others may read.
    ///
    /// The file holds 32 raw bytes (what `keygen` writes) or 64 hex digits.
    pub fn load(path: &Path) -> Result<MasterKey, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
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
        let mut key = Zeroizing::new([0u8; 32]);
        let text = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("");
        if bytes.len() == 32 {
            key.copy_from_slice(&bytes);
        } else if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
                let hex = std::str::from_utf8(chunk).unwrap_or("00");
                key[i] = u8::from_str_radix(hex, 16).unwrap_or(0);
            }
        } else {
            return Err(KeyError::Length {
                path: path.to_path_buf(),
                len: bytes.len(),
            });
        }
        Ok(MasterKey(key))
    }

    /// Writes 32 fresh random bytes to `path` with mode 0600. Refuses to overwrite.
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        let write_err = |source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut()).map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
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
        file.write_all(key.as_ref()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        Ok(())
    }

    fn derive(&self, purpose: &str, tenant: &str) -> Zeroizing<[u8; 32]> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"smsdrop/v1"), self.0.as_ref());
        let mut out = Zeroizing::new([0u8; 32]);
        let info = format!("smsdrop/{purpose}/{tenant}");
        // 32 bytes is far below HKDF-SHA256's limit of 255 * 32, so expand cannot fail.
        let _ = hk.expand(info.as_bytes(), out.as_mut());
        out
    }
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

/// One tenant's keys: erasing the master key (or the tenant's derivation) makes its data unreadable.
pub struct TenantKeys {
    tenant: String,
    aead: XChaCha20Poly1305,
    phone_key: Zeroizing<[u8; 32]>,
    file_key: Zeroizing<[u8; 32]>,
}

impl TenantKeys {
    fn new(master: &MasterKey, tenant: &str) -> TenantKeys {
        let seal = master.derive("seal", tenant);
        TenantKeys {
            tenant: tenant.to_string(),
            aead: XChaCha20Poly1305::new(seal.as_ref().into()),
            phone_key: master.derive("phone-index", tenant),
            file_key: master.derive("file-dedupe", tenant),
        }
    }

    fn associated_data(&self, table: &str, record_key: &[u8]) -> Vec<u8> {
        let mut ad = Vec::with_capacity(4 + table.len() + self.tenant.len() + record_key.len());
        ad.extend_from_slice(&[ENVELOPE_VERSION, KEY_ID]);
        ad.extend_from_slice(table.as_bytes());
        ad.push(0);
        ad.extend_from_slice(self.tenant.as_bytes());
        ad.push(0);
        ad.extend_from_slice(record_key);
        ad
    }

    /// Seals `plaintext` for storage in `table` under `record_key`.
    pub fn seal(&self, table: &str, record_key: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = next_nonce();
        let ad = self.associated_data(table, record_key);
        let ciphertext = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &ad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        out.extend_from_slice(&[ENVELOPE_VERSION, KEY_ID]);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens a record sealed by [`TenantKeys::seal`] for the same table and record key.
    pub fn open(&self, table: &str, record_key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Truncated);
        }
        if sealed[0] != ENVELOPE_VERSION || sealed[1] != KEY_ID {
            return Err(SealError::UnknownVersion);
        }
        let ad = self.associated_data(table, record_key);
        self.aead
            .decrypt(
                XNonce::from_slice(&sealed[2..HEADER_LEN]),
                Payload {
                    msg: &sealed[HEADER_LEN..],
                    aad: &ad,
                },
            )
            .map_err(|_| SealError::Forged)
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

/// The master key and every tenant key derived from it so far.
pub struct Keyring {
    master: MasterKey,
    tenants: RwLock<HashMap<String, Arc<TenantKeys>>>,
}

impl Keyring {
    pub fn new(master: MasterKey) -> Keyring {
        Keyring {
            master,
            tenants: RwLock::new(HashMap::new()),
        }
    }

    /// The keys of records that belong to no tenant (the mail queue).
    pub fn system(&self) -> Arc<TenantKeys> {
        self.tenant("@system")
    }

    /// The keys of `tenant`, derived on first use.
    pub fn tenant(&self, tenant: &str) -> Arc<TenantKeys> {
        if let Some(k) = self.tenants.read().ok().and_then(|m| m.get(tenant).cloned()) {
            return k;
        }
        let keys = Arc::new(TenantKeys::new(&self.master, tenant));
        if let Ok(mut map) = self.tenants.write() {
            map.insert(tenant.to_string(), keys.clone());
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::new(MasterKey(Zeroizing::new([7u8; 32])))
    }

    #[test]
    fn sealed_record_opens_only_where_it_was_written() {
        let ring = keyring();
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
        let acme = keyring().tenant("acme");
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
        let ring = keyring();
        let a = ring.tenant("a").phone_hash("+33612345678");
        assert_eq!(a, ring.tenant("a").phone_hash("+33612345678"));
        assert_ne!(a, ring.tenant("b").phone_hash("+33612345678"));
    }

    #[test]
    fn key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        MasterKey::generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(MasterKey::generate(&path), Err(KeyError::Exists { .. })));
        assert!(MasterKey::load(&path).is_ok());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(MasterKey::load(&path), Err(KeyError::Permissions { .. })));
        let hex = dir.path().join("hex.key");
        fs::write(&hex, "ab".repeat(32)).unwrap();
        fs::set_permissions(&hex, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*MasterKey::load(&hex).unwrap().0, [0xab; 32]);
    }
}
