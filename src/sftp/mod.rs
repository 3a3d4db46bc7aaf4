//! The way in over SFTP (docs/sftp.md): an embedded SSH server (russh) that lets tenants upload
//! batches into their inbox and fetch reply files from their outbox, and nothing else.
//!
//! Only Ed25519: the host key is Ed25519 (so key exchange offers only that), and client keys are
//! checked to be `ssh-ed25519` before and after their signature (russh's preferred list does not
//! limit client keys). Password, keyboard-interactive and `none` are refused. Key exchange offers
//! `mlkem768x25519-sha256` first, then curve25519 for clients older than OpenSSH 9.9; ciphers are
//! chacha20-poly1305 and AES-GCM only. Connections are accepted by our own loop, so limits on
//! unauthenticated connections and a login deadline apply before russh sees a byte.
//!
//! What a session may do in its two folders is [`world`]'s business.

pub mod defender;
mod fuse;
mod protocol;
pub mod world;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodSet, Preferred};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::alert::{Alert, AlertKind, Alerter};
use crate::audit::{self, Audit, Event};
use crate::config::Live;
use crate::config::{Config, Sftp, Tenant};
use crate::limits::{self, Counter, Held, Throttle};

/// Repeated warnings about refused connections, at most one line a minute per kind and address.
static REFUSALS: Throttle = Throttle::new(Duration::from_secs(60));

/// Why the SFTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SftpError {
    #[error("host key {}: {detail}", path.display())]
    HostKey { path: std::path::PathBuf, detail: String },
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: std::io::Error },
}

/// Loads the Ed25519 host key, or makes one (mode 0600) on first start.
pub fn host_key(path: &Path) -> Result<PrivateKey, SftpError> {
    let err = |detail: String| SftpError::HostKey {
        path: path.to_path_buf(),
        detail,
    };
    if path.exists() {
        let mode = std::fs::metadata(path)
            .map_err(|e| err(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "readable by group or others (mode {:o}); run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            )));
        }
        let key = russh::keys::load_secret_key(path, None).map_err(|e| err(e.to_string()))?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(err(format!("is {}, smsdrop uses only ssh-ed25519", key.algorithm())));
        }
        return Ok(key);
    }
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut()).map_err(|e| err(e.to_string()))?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(pair);
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| err(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| err(e.to_string()))?;
    tracing::info!(path = %path.display(), "SFTP host key created");
    Ok(key)
}

/// The SHA-256 fingerprint of a key, as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn ssh_config(sftp: &Sftp, key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        methods: MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(500),
        // OpenSSH's first probe is `none`: answer it at once.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        preferred: Preferred {
            kex: std::borrow::Cow::Borrowed(&[
                russh::kex::MLKEM768X25519_SHA256,
                russh::kex::CURVE25519,
                russh::kex::CURVE25519_PRE_RFC_8731,
                russh::kex::EXTENSION_SUPPORT_AS_SERVER,
                russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
            ]),
            key: std::borrow::Cow::Borrowed(&[Algorithm::Ed25519]),
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_GCM,
                russh::cipher::AES_128_GCM,
            ]),
            mac: std::borrow::Cow::Borrowed(&[russh::mac::HMAC_SHA512_ETM, russh::mac::HMAC_SHA256_ETM]),
            compression: std::borrow::Cow::Borrowed(&[russh::compression::NONE]),
            ..Preferred::DEFAULT
        },
        max_auth_attempts: 6,
        inactivity_timeout: Some(sftp.idle_timeout),
        window_size: 8 << 20,
        nodelay: true,
        ..Default::default()
    }
}

/// One connection from its accept to its end: cut at the login deadline unless logged in by
/// then, or when a reload takes its login away (`cut`).
struct Lifetime {
    id: u64,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    authenticated: Arc<AtomicBool>,
    cut: CancellationToken,
    connections: Connections,
    alerts: Alerter,
    audit: Audit,
    defender: Arc<defender::Defender>,
}

impl Lifetime {
    async fn run(
        self,
        ssh: Arc<russh::server::Config>,
        stream: fuse::Fused<tokio::net::TcpStream>,
        handler: SshSession,
        descriptor: limits::Descriptor,
    ) {
        let _descriptor = descriptor;
        let peer = self.peer;
        let login = async {
            tokio::time::sleep_until(self.deadline).await;
            if self.authenticated.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(login);
        let running = tokio::select! {
            r = russh::server::run_stream(ssh, stream, handler) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "SSH handshake failed");
                    return;
                }
            },
            _ = &mut login => {
                deadline_passed(&self.alerts, &self.audit, &self.defender, peer);
                return;
            }
        };
        if let Ok(mut all) = self.connections.lock() {
            all.entry(self.id).or_default().handle = Some(running.handle());
        }
        tokio::pin!(running);
        tokio::select! {
            res = &mut running => {
                if let Err(e) = res {
                    tracing::debug!(peer = %peer, error = %e, "SSH session ended with an error");
                }
            }
            _ = &mut login => {
                deadline_passed(&self.alerts, &self.audit, &self.defender, peer);
                self.cut.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
            }
            _ = self.cut.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
            }
        }
        if let Ok(mut all) = self.connections.lock() {
            all.remove(&self.id);
        }
    }
}

/// Sessions per tenant, shared by all connections.
type Sessions = Arc<Mutex<HashMap<String, usize>>>;

/// Every connection by number, with what a reload needs to close it: its handle once the
/// handshake is done, the token that cuts its socket, and who logged in.
type Connections = Arc<Mutex<HashMap<u64, Connection>>>;

#[derive(Default)]
struct Connection {
    handle: Option<russh::server::Handle>,
    cut: CancellationToken,
    login: Option<(Arc<Tenant>, PublicKey, SocketAddr)>,
}

/// Open SFTP handles per tenant, across all of its connections (`max_open_files`).
pub type OpenFiles = Arc<Counter<String>>;

/// Why a reload takes a logged-in session away, if it does: the session was let in under the
/// old configuration, and would not be under the new one (or writes to a folder no longer
/// watched).
fn revoked(config: &Config, tenant: &Tenant, key: &PublicKey, ip: std::net::IpAddr) -> Option<&'static str> {
    let Some(now) = config.tenants.get(&tenant.id) else {
        return Some("tenant removed");
    };
    if !now.sftp.keys.iter().any(|k| k.key_data() == key.key_data()) {
        return Some("key removed");
    }
    if !now.sftp.allow_ips.is_empty() && !now.sftp.allow_ips.iter().any(|n| n.contains(&ip)) {
        return Some("address no longer allowed");
    }
    if now.folders.inbox != tenant.folders.inbox || now.folders.outbox != tenant.folders.outbox {
        return Some("folders moved");
    }
    None
}

/// The SFTP server of `serve`.
pub struct SftpServer {
    config: Live,
    alerts: Alerter,
    audit: Audit,
    defender: Arc<defender::Defender>,
    sftp: Sftp,
    ssh: Arc<russh::server::Config>,
    pub fingerprint: String,
}

impl SftpServer {
    pub fn new(
        config: Live,
        store: crate::store::Store,
        alerts: Alerter,
        audit: Audit,
    ) -> Result<Option<SftpServer>, SftpError> {
        let Some(sftp) = config.get().sftp.clone() else {
            return Ok(None);
        };
        let key = host_key(&sftp.host_key)?;
        let fingerprint = fingerprint(key.public_key());
        let ssh = Arc::new(ssh_config(&sftp, key));
        let defender = Arc::new(defender::Defender::load(
            sftp.defender.clone(),
            store,
            alerts.clone(),
            audit.clone(),
        ));
        Ok(Some(SftpServer {
            config,
            alerts,
            audit,
            defender,
            sftp,
            ssh,
            fingerprint,
        }))
    }

    /// Binds `listen` and says where (the address bound: `127.0.0.1:0` takes any free port).
    pub async fn bind(&self) -> Result<TcpListener, SftpError> {
        let listener = TcpListener::bind(self.sftp.listen)
            .await
            .map_err(|source| SftpError::Listen {
                addr: self.sftp.listen,
                cause: source,
            })?;
        let bound = listener.local_addr().unwrap_or(self.sftp.listen);
        tracing::info!(addr = %bound, host_key = %self.fingerprint, "SFTP server listening");
        Ok(listener)
    }

    /// Accepts connections until `shutdown`.
    ///
    /// Before a connection costs anything it must find a descriptor in the clients' budget (no
    /// accept happens while clients hold the whole budget), come from an address that is not
    /// banned, and fit under `max_unauthenticated_per_ip` and `max_unauthenticated`. From the
    /// accept on, `login_deadline` covers the banner, the key exchange and authentication: when
    /// it passes, the socket is cut under russh (which processes no disconnect request during a
    /// key exchange that the client leaves hanging).
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let unauthenticated = Arc::new(Semaphore::new(self.sftp.max_unauthenticated));
        let per_ip: Arc<Counter<std::net::IpAddr>> = Arc::default();
        let sessions: Sessions = Arc::default();
        let open_files: OpenFiles = Arc::default();
        let connections: Connections = Arc::default();
        let mut reloads = self.config.subscribe();
        let mut reloads_open = true;
        let mut number = 0u64;
        loop {
            let descriptor = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = limits::descriptors().take() => d,
            };
            let (socket, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = reloads.changed(), if reloads_open => {
                    match changed {
                        Ok(()) => self.revoke(&connections),
                        Err(_) => reloads_open = false,
                    }
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        if let Some(held) = REFUSALS.allow("accept") {
                            tracing::warn!(error = %e, held_back = held, "SFTP accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if self.defender.is_banned(peer.ip(), peer.port()) {
                continue; // dropped before the handshake
            }
            let Some(from_ip) = per_ip.try_take(peer.ip(), self.sftp.max_unauthenticated_per_ip) else {
                self.refuse_connection(peer, "too many unauthenticated connections from this address");
                continue;
            };
            let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
                self.refuse_connection(peer, "too many unauthenticated connections");
                continue;
            };
            let _ = socket.set_nodelay(true);
            let authenticated = Arc::new(AtomicBool::new(false));
            number += 1;
            let id = number;
            let cut = shutdown.child_token();
            if let Ok(mut all) = connections.lock() {
                all.entry(id).or_default().cut = cut.clone();
            }
            let handler = SshSession {
                id,
                connections: connections.clone(),
                config: self.config.clone(),
                alerts: self.alerts.clone(),
                audit: self.audit.clone(),
                defender: self.defender.clone(),
                peer,
                tenant: None,
                authenticated: authenticated.clone(),
                permit: Some((permit, from_ip)),
                sessions: sessions.clone(),
                open_files: open_files.clone(),
                max_channels: self.sftp.max_channels,
                open: std::collections::HashSet::new(),
                channels: HashMap::new(),
                refused_channels: 0,
            };
            let life = Lifetime {
                id,
                peer,
                deadline: tokio::time::Instant::now() + self.sftp.login_deadline,
                authenticated,
                cut: cut.clone(),
                connections: connections.clone(),
                alerts: self.alerts.clone(),
                audit: self.audit.clone(),
                defender: self.defender.clone(),
            };
            let stream = fuse::Fused::new(socket, cut);
            tokio::spawn(life.run(self.ssh.clone(), stream, handler, descriptor));
        }
    }

    /// A connection turned away before its handshake: audited, and logged at most once a minute
    /// per address and reason.
    fn refuse_connection(&self, peer: SocketAddr, reason: &'static str) {
        if let Some(held) = REFUSALS.allow(&format!("{reason} {}", peer.ip())) {
            tracing::warn!(peer = %peer, reason, held_back = held, "SFTP connection dropped");
        }
        crate::metrics::events().sftp_refused(reason);
        self.audit
            .record(Event::new("sftp.refused", audit::sftp_actor(peer)).detail("reason", reason));
    }

    /// After a reload: closes the sessions the new configuration would not let in; every other
    /// session carries on.
    fn revoke(&self, connections: &Connections) {
        let config = self.config.get();
        let Ok(all) = connections.lock() else { return };
        for c in all.values() {
            let (Some(handle), Some((tenant, key, peer))) = (&c.handle, &c.login) else {
                continue;
            };
            let Some(reason) = revoked(&config, tenant, key, peer.ip()) else {
                continue;
            };
            let print = fingerprint(key);
            tracing::warn!(tenant = %tenant.id, peer = %peer, fingerprint = %print, reason, "SFTP session closed by a reload");
            self.audit.record(
                Event::new("sftp.revoked", audit::sftp_actor(*peer))
                    .tenant(&tenant.id)
                    .detail("fingerprint", print)
                    .detail("reason", reason),
            );
            let (handle, cut) = (handle.clone(), c.cut.clone());
            tokio::spawn(async move {
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        format!("access changed: {reason}"),
                        "en".into(),
                    )
                    .await;
                // A session busy in a key exchange does not act on the request: cut it.
                tokio::time::sleep(Duration::from_secs(2)).await;
                cut.cancel();
            });
        }
    }
}

/// A connection that did not log in within `login_deadline`: logged, scored, alerted.
fn deadline_passed(alerts: &Alerter, audit: &Audit, defender: &defender::Defender, peer: SocketAddr) {
    tracing::warn!(peer = %peer, reason = "login deadline passed", "SFTP login refused");
    audit.record(Event::new("sftp.refused", audit::sftp_actor(peer)).detail("reason", "login deadline passed"));
    defender.score(peer.ip(), "login deadline passed");
    alerts.raise(
        Alert::new(AlertKind::AuthRejected, None, format!("SFTP connection from {} dropped: login deadline passed", peer.ip()))
            .detail("source", peer)
            .detail("reason", "login deadline passed")
            .action("A client that connects and does not log in within login_deadline is dropped. Repeated, it is someone probing the door."),
    );
}

/// One SSH connection.
struct SshSession {
    /// This connection's number in `connections`.
    id: u64,
    connections: Connections,
    config: Live,
    alerts: Alerter,
    audit: Audit,
    defender: Arc<defender::Defender>,
    peer: SocketAddr,
    /// The tenant once authenticated.
    tenant: Option<Arc<Tenant>>,
    authenticated: Arc<AtomicBool>,
    /// Held until authentication: counts against `max_unauthenticated` and
    /// `max_unauthenticated_per_ip`.
    permit: Option<(tokio::sync::OwnedSemaphorePermit, Held<std::net::IpAddr>)>,
    sessions: Sessions,
    open_files: OpenFiles,
    max_channels: usize,
    /// Every channel open on this connection, started or not (`max_channels`).
    open: std::collections::HashSet<ChannelId>,
    /// Channels opened and not yet given a subsystem.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Channel opens refused on this connection (audited once).
    refused_channels: u64,
}

impl SshSession {
    /// The refusal, logged and raised as an `auth_rejected` alert with what is known. Never
    /// logs a key or a password.
    fn refuse(&self, user: &str, method: &str, key: Option<&PublicKey>, reason: &str) -> Auth {
        let key_type = key.map(|k| k.algorithm().to_string()).unwrap_or_default();
        let print = key.map(fingerprint).unwrap_or_default();
        tracing::warn!(
            peer = %self.peer,
            user = %user,
            method,
            key_type = %key_type,
            fingerprint = %print,
            reason,
            "SFTP login refused"
        );
        // A user name is shown as tried, cut short and without control characters.
        let shown: String = user.chars().filter(|c| !c.is_control()).take(64).collect();
        let tenant = self.config.get().tenants.contains_key(user).then_some(user);
        let mut event = Event::new("sftp.refused", audit::sftp_actor(self.peer))
            .detail("user", &shown)
            .detail("method", method)
            .detail("key_type", &key_type)
            .detail("fingerprint", &print)
            .detail("reason", reason);
        if let Some(t) = tenant {
            event = event.tenant(t);
        }
        self.audit.record(event);
        crate::metrics::events().sftp_refused(reason);
        self.defender.score(self.peer.ip(), reason);
        self.alerts.raise(
            Alert::new(
                AlertKind::AuthRejected,
                tenant,
                format!("SFTP login refused for user {shown:?} from {}: {reason}", self.peer.ip()),
            )
            .detail("source", self.peer)
            .detail("user", &shown)
            .detail("method", method)
            .detail("key type", if key_type.is_empty() { "-" } else { &key_type })
            .detail("key fingerprint", if print.is_empty() { "-" } else { &print })
            .detail("reason", reason)
            .action(
                "If this was your ERP, check its user name (the tenant id), its key (ssh-ed25519, listed in the tenant's `keys`) and its address (`allow_ips`). Otherwise someone is trying the door: no action is needed unless it goes on.",
            ),
        );
        Auth::reject()
    }

    /// Checks user, source address and key; `Ok(tenant)` when they fit.
    fn check(&self, user: &str, key: &PublicKey) -> Result<Arc<Tenant>, &'static str> {
        let config = self.config.get();
        let tenant = config.tenants.get(user).ok_or("unknown user")?;
        if !tenant.sftp.allow_ips.is_empty() && !tenant.sftp.allow_ips.iter().any(|n| n.contains(&self.peer.ip())) {
            return Err("IP not allowed");
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err("key type not allowed");
        }
        // Compare key data, not the whole key: the comment is not part of the key.
        if !tenant.sftp.keys.iter().any(|k| k.key_data() == key.key_data()) {
            return Err("unknown key");
        }
        Ok(tenant.clone())
    }
}

impl russh::server::Handler for SshSession {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.refuse(user, "password", None, "password authentication is not allowed"))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.refuse(
            user,
            "keyboard-interactive",
            None,
            "keyboard-interactive authentication is not allowed",
        ))
    }

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        match self.check(user, offer.public_key) {
            Ok(_) => Ok(Auth::Accept),
            Err(reason) => Ok(self.refuse(user, "publickey", Some(offer.public_key), reason)),
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let tenant = match self.check(user, key.public_key) {
            Ok(t) => t,
            Err(reason) => return Ok(self.refuse(user, "publickey", Some(key.public_key), reason)),
        };
        {
            let mut sessions = self.sessions.lock().map_err(|_| russh::Error::Disconnect)?;
            let count = sessions.entry(tenant.id.clone()).or_default();
            if *count >= tenant.sftp.max_sessions {
                drop(sessions);
                return Ok(self.refuse(user, "publickey", Some(key.public_key), "too many sessions"));
            }
            *count += 1;
        }
        let print = fingerprint(key.public_key);
        tracing::info!(peer = %self.peer, tenant = %tenant.id, fingerprint = %print, "SFTP login");
        self.audit.record(
            Event::new("sftp.login", audit::sftp_actor(self.peer))
                .tenant(&tenant.id)
                .detail("fingerprint", print),
        );
        if let Ok(mut all) = self.connections.lock() {
            all.entry(self.id).or_default().login = Some((tenant.clone(), key.public_key.clone(), self.peer));
        }
        crate::metrics::events().sftp_login(&tenant.id);
        self.tenant = Some(tenant);
        self.authenticated.store(true, Ordering::Release);
        self.permit = None;
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.tenant.is_none() {
            return Ok(()); // dropping the reply refuses the channel
        }
        if self.open.len() >= self.max_channels {
            self.refused_channels += 1;
            if self.refused_channels == 1 {
                self.denied(
                    "channel",
                    &format!("more than {} channels on one connection", self.max_channels),
                );
            }
            return Ok(());
        }
        self.open.insert(channel.id());
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.open.remove(&channel);
        self.channels.remove(&channel);
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        // `scp -s` waits for an exit status before it calls the transfer a success.
        let _ = session.exit_status_request(channel, 0);
        session.close(channel)?;
        self.open.remove(&channel);
        self.channels.remove(&channel);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(tenant), Some(channel)) = (self.tenant.clone(), self.channels.remove(&channel_id)) else {
            session.channel_failure(channel_id)?;
            return Ok(());
        };
        if name != "sftp" {
            self.denied("subsystem", &format!("subsystem {:?}", limits::shown(name)));
            session.channel_failure(channel_id)?;
            return Ok(());
        }
        session.channel_success(channel_id)?;
        let min_free_space = self.config.get().min_free_space;
        let world = world::World::new(
            tenant,
            self.audit.clone(),
            self.peer,
            self.open_files.clone(),
            min_free_space,
        );
        tokio::spawn(protocol::serve(channel.into_stream(), world, self.peer));
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.denied("exec", "commands are not allowed");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.denied("shell", "shells are not allowed");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.denied("x11", "X11 forwarding is not allowed");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(&mut self, _channel: ChannelId, _session: &mut Session) -> Result<bool, Self::Error> {
        self.denied("agent", "agent forwarding is not allowed");
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.denied("tcpip-forward", "port forwarding is not allowed");
        Ok(false)
    }

    async fn streamlocal_forward(&mut self, _socket_path: &str, _session: &mut Session) -> Result<bool, Self::Error> {
        self.denied("streamlocal-forward", "socket forwarding is not allowed");
        Ok(false)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        _reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.denied("direct-tcpip", "port forwarding is not allowed");
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        _reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.denied("direct-streamlocal", "socket forwarding is not allowed");
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        _reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.denied("x11", "X11 forwarding is not allowed");
        Ok(())
    }
}

impl SshSession {
    /// Something a logged-in client asked for and may not have: audited as `sftp.denied` and
    /// logged (at most once a minute per address and request).
    fn denied(&self, request: &str, reason: &str) {
        let tenant = self.tenant.as_ref().map(|t| t.id.as_str()).unwrap_or("-");
        if let Some(held) = REFUSALS.allow(&format!("denied {request} {}", self.peer.ip())) {
            tracing::warn!(peer = %self.peer, tenant, request, reason, held_back = held, "SSH request denied");
        }
        let mut event = Event::new("sftp.denied", audit::sftp_actor(self.peer))
            .detail("request", request)
            .detail("reason", reason);
        if let Some(t) = &self.tenant {
            event = event.tenant(&t.id);
        }
        self.audit.record(event);
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        if let Ok(mut all) = self.connections.lock() {
            all.remove(&self.id);
        }
        if let Some(t) = &self.tenant {
            if let Ok(mut sessions) = self.sessions.lock() {
                if let Some(n) = sessions.get_mut(&t.id) {
                    *n = n.saturating_sub(1);
                }
            }
            crate::metrics::events().sftp_logout();
            tracing::info!(peer = %self.peer, tenant = %t.id, "SFTP session closed");
            self.audit
                .record(Event::new("sftp.logout", audit::sftp_actor(self.peer)).tenant(&t.id));
        }
    }
}
