//! The configuration file (docs/configuration.md), read in two stages.
//!
//! Stage one is a raw `serde` image of the TOML with unknown keys refused; values that need more
//! than a type check are kept with their byte span. Stage two turns it into [`Config`]: durations
//! and sizes parsed, regions, time zones and encodings looked up, partner references resolved,
//! relative paths anchored at the configuration file's folder. Every problem found is reported at
//! once, each naming the file, the line and the key. [`Live`] holds the configuration in force.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::sms::columns::Column;
use crate::sms::template::Template;

mod live;
pub use live::Live;

/// Where the configuration is read from when neither `--config` nor `SMSDROP_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/smsdrop/smsdrop.toml";

/// `min_free_space` when not set.
pub const DEFAULT_MIN_FREE_SPACE: u64 = 128 << 20;

/// The validated configuration of the whole appliance.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub key_file: PathBuf,
    pub log_format: LogFormat,
    /// What is logged, as a `RUST_LOG`-style filter (`info`, `smsdrop::dispatch=debug,info`);
    /// the `RUST_LOG` environment variable, when set, wins.
    pub log_filter: String,
    pub admin_socket: PathBuf,
    /// How often every inbox is listed again, for files present at start-up or missed events.
    pub rescan_interval: Duration,
    /// Free space below which new work is refused (under `state_dir`, and in an inbox for
    /// uploads): see `crate::disk`. 0 turns the guard off.
    pub min_free_space: u64,
    pub tenants: BTreeMap<String, Arc<Tenant>>,
    pub partners: BTreeMap<String, Partner>,
    /// Routes, longest prefix first.
    pub routes: Vec<Route>,
    /// Mail out; `None` without an `[email]` table.
    pub email: Option<Email>,
    /// The SFTP server; `None` without an `[sftp]` table.
    pub sftp: Option<Sftp>,
    /// Scheduled backups; `None` without a `[backup]` table.
    pub backup: Option<BackupSchedule>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` without a `[metrics]` table.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Backups taken by `serve` on a schedule (`[backup]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSchedule {
    /// Where they are written, as `smsdrop-<UTC time>.backup`.
    pub dir: PathBuf,
    pub every: Duration,
    /// How many are kept; older ones are deleted once a new one is whole.
    pub keep: usize,
}

/// The embedded SFTP server (`[sftp]`, docs/sftp.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Sftp {
    pub listen: std::net::SocketAddr,
    /// Ed25519 host key (OpenSSH format), made on first start with mode 0600.
    pub host_key: PathBuf,
    /// A connection that has not authenticated by then is dropped.
    pub login_deadline: Duration,
    /// An authenticated session silent for this long is closed.
    pub idle_timeout: Duration,
    /// Connections not yet authenticated, at most, across all clients.
    pub max_unauthenticated: usize,
    /// Connections not yet authenticated, at most, from one source address.
    pub max_unauthenticated_per_ip: usize,
    /// Channels open at once on one connection (SFTP sessions and channels not yet started).
    pub max_channels: usize,
    /// The defender (`[defender]`; on with its defaults whenever SFTP is).
    pub defender: Defender,
}

/// Scores refused attempts per source address and bans the worst (`[defender]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defender {
    /// Points within `window` that ban an address.
    pub score_limit: u32,
    pub window: Duration,
    /// First ban; each later ban of the same address lasts twice as long (at most 30 days).
    pub ban: Duration,
}

/// How alerts and reports leave by mail (`[email]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Email {
    pub security: SmtpSecurity,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    /// Read at start; refused when group or others may read it.
    pub password_file: Option<PathBuf>,
    pub from: lettre::message::Mailbox,
    pub admin_to: Vec<lettre::message::Mailbox>,
    /// At most one mail per alert kind and recipient per this interval; the rest is digested.
    pub min_interval: Duration,
    /// When the daily report goes out, in each tenant's time zone (`None`: no daily report).
    pub daily_report_at: Option<jiff::civil::Time>,
    /// Bound on one whole SMTP exchange.
    pub timeout: Duration,
    /// Extra trusted root certificate (PEM), for a relay with a private CA.
    pub ca_file: Option<PathBuf>,
}

/// `smtp://` (plain, for loopback or a trusted relay), `smtp+starttls://` (STARTTLS required),
/// `smtps://` (implicit TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    Plain,
    StartTls,
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One customer account (docs/configuration.md), its settings grouped as the reference groups
/// them.
#[derive(Debug)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    /// How national numbers are read (`None`: only international forms).
    pub default_region: Option<rlibphonenumber::Region>,
    /// For `send_at` without an offset, daily quotas and the daily report's hour.
    pub timezone: jiff::tz::TimeZone,
    pub folders: Folders,
    pub batch: BatchRules,
    pub policy: Policy,
    pub replies: Replies,
    pub retention: RetentionRules,
    pub alerts: AlertRules,
    pub sftp: SftpAccess,
}

/// Where a tenant's files come in and its answers go, and when a dropped file is complete.
#[derive(Debug)]
pub struct Folders {
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    /// A file is taken only once `<name>.ok` appears.
    pub require_trigger: bool,
    /// A dropped file must stay unchanged this long.
    pub settle: Duration,
}

/// How a tenant's batch files are read and checked (docs/batch-format.md).
#[derive(Debug)]
pub struct BatchRules {
    pub sender: Option<String>,
    pub senders: Vec<String>,
    pub encoding: EncodingChoice,
    pub delimiter: Option<u8>,
    pub columns: Option<Vec<Column>>,
    pub template: Option<Template>,
    pub strict: bool,
    pub max_parts: u8,
    pub max_file_bytes: u64,
    pub max_lines: u64,
    pub dedupe_window: Duration,
    /// How long a message is worth delivering after its send time: SMPP `validity_period`.
    pub validity: Duration,
}

/// A tenant's traffic policies.
#[derive(Debug)]
pub struct Policy {
    /// Destination countries allowed (`None`: every country).
    pub allowed_countries: Option<Vec<rlibphonenumber::Region>>,
    /// Domains links may point to, subdomains included (`None`: any link).
    pub url_allowlist: Option<Vec<String>>,
    /// Messages queued per day, in the tenant's time zone (`None`: no limit).
    pub max_per_day: Option<u64>,
    /// A batch with more accepted messages than this is held until released (`None`: never).
    pub hold_above: Option<u64>,
}

/// Delivery reports and incoming messages.
#[derive(Debug)]
pub struct Replies {
    pub report_interval: Duration,
    /// Incoming texts that put their sender on the blocklist, besides `STOP` (upper case).
    pub optout_keywords: Vec<String>,
}

/// How long a tenant's finished batches are kept.
#[derive(Debug)]
pub struct RetentionRules {
    /// A finished batch's messages lose their personal data this long after its last change
    /// (`None`: only at `delete_after`).
    pub anonymize_after: Option<Duration>,
    /// A finished batch leaves the store this long after its last change.
    pub delete_after: Duration,
}

/// Who gets a tenant's alerts, and when a batch raises one.
#[derive(Debug)]
pub struct AlertRules {
    /// Who gets this tenant's alerts (the admin gets them too).
    pub alert_to: Vec<lettre::message::Mailbox>,
    /// A batch with at least this share of rejected lines raises `batch_rejected`.
    pub alert_rejected_percent: u8,
    /// An hour with more than this many times the tenant's usual hourly volume is an anomaly...
    pub anomaly_factor: u32,
    /// ...once it is also above this many messages.
    pub anomaly_min_messages: u64,
}

/// Who may log in over SFTP as a tenant, from where, and how much at once.
#[derive(Debug)]
pub struct SftpAccess {
    /// SFTP client keys (Ed25519 only).
    pub keys: Vec<russh::keys::PublicKey>,
    /// Where SFTP logins may come from (empty: anywhere).
    pub allow_ips: Vec<ipnet::IpNet>,
    /// SFTP connections at once.
    pub max_sessions: usize,
    /// Files and folders open at once over SFTP, across all of the tenant's connections.
    pub max_open_files: usize,
}

impl Tenant {
    /// Whether `sender` may be used on this tenant's messages.
    pub fn is_sender_allowed(&self, sender: &str) -> bool {
        self.batch.sender.as_deref() == Some(sender) || self.batch.senders.iter().any(|s| s == sender)
    }
}

/// How a tenant's files are decoded (docs/batch-format.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingChoice {
    /// UTF-8 (with or without BOM, UTF-16 when a BOM says so), else Windows-1252.
    Auto,
    Fixed(&'static encoding_rs::Encoding),
}

/// A way out to the telecom network (docs/partners.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partner {
    /// Writes each message as one JSON line to `path` and marks it delivered.
    Sink {
        path: PathBuf,
    },
    Smpp(Smpp),
    Http(Http),
}

impl Partner {
    /// Its health policy; `None` for a partner that is never unwell (`sink`).
    pub fn health(&self) -> Option<HealthPolicy> {
        match self {
            Partner::Sink { .. } => None,
            Partner::Smpp(s) => Some(s.health),
            Partner::Http(h) => Some(h.health),
        }
    }

    /// How long its receipts may take; `None` when none come (`sink`, no receipts asked for).
    pub fn receipt_timeout(&self) -> Option<Duration> {
        match self {
            Partner::Sink { .. } => None,
            Partner::Smpp(s) => s.registered_delivery.then_some(s.receipt_timeout),
            Partner::Http(h) => Some(h.receipt_timeout),
        }
    }
}

/// An HTTP partner: one JSON request per message, receipts and replies by webhook
/// (`dispatch::http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http {
    pub url: url::Url,
    /// Sent as `Authorization: Bearer …`; read at start, never logged.
    pub token_file: Option<PathBuf>,
    /// Requests outstanding at once.
    pub window: usize,
    pub tps: Option<u32>,
    /// A request unanswered this long counts as lost (transient).
    pub timeout: Duration,
    /// Where the partner posts receipts and incoming messages.
    pub webhook_listen: Option<std::net::SocketAddr>,
    /// The shared secret webhook calls are signed with (HMAC-SHA256 of the body).
    pub webhook_secret_file: Option<PathBuf>,
    pub health: HealthPolicy,
    pub receipt_timeout: Duration,
}

/// An SMPP 3.4 partner (SMSC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smpp {
    /// `host:port`.
    pub address: String,
    pub tls: bool,
    pub system_id: String,
    /// Read when binding, never kept in the configuration.
    pub password_file: Option<PathBuf>,
    pub system_type: String,
    /// One `bind_transceiver`, or a transmitter and a receiver.
    pub bind_pair: bool,
    /// Binds (connections) kept open at once.
    pub binds: usize,
    /// Outstanding `submit_sm` per partner.
    pub window: usize,
    /// Most `submit_sm` per second over all binds.
    pub tps: Option<u32>,
    pub enquire_link: Duration,
    /// A `submit_sm` unanswered this long counts as lost (transient).
    pub response_timeout: Duration,
    /// Ask for delivery receipts.
    pub registered_delivery: bool,
    /// Long messages: UDH (default) or the SAR TLVs.
    pub sar: bool,
    pub health: HealthPolicy,
    /// A submitted message with no receipt after this long ends `submitted` in the report.
    pub receipt_timeout: Duration,
}

/// When a partner leaves its routes and comes back (`dispatch::health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Median submit latency above which the partner is down.
    pub max_latency: Duration,
    /// Share of transient failures among the last submissions at which it is down.
    pub max_error_percent: u8,
    /// How often a partner that is down is probed.
    pub probe_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: String,
    pub partners: Vec<String>,
}

impl Config {
    /// The files a backup carries beside the store: (name, path).
    pub fn backup_files(&self) -> Vec<(&'static str, &Path)> {
        self.sftp
            .as_ref()
            .map(|s| vec![("sftp_host_key", s.host_key.as_path())])
            .unwrap_or_default()
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            cause: source,
        })?;
        Config::parse(path, &source)
    }

    /// Validates `source` as if read from `path` (relative paths are anchored at its folder).
    pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
        let mut v = Validator {
            file: path.to_path_buf(),
            source,
            problems: Vec::new(),
        };
        let raw: RawConfig = match toml::from_str(source) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|s| v.line_of(&s)).unwrap_or(0);
                v.problems.push(Problem {
                    file: v.file.clone(),
                    line,
                    key: String::new(),
                    message: e.message().trim().to_string(),
                });
                return Err(ConfigError::Invalid(v.problems));
            }
        };
        let config = v.config(raw);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(v.problems))
        }
    }

    /// The partners to try, in order, for an E.164 number: the longest matching route's list.
    pub fn route_for(&self, e164: &str) -> Option<&Route> {
        self.routes.iter().find(|r| e164.starts_with(&r.prefix))
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration: {cause}", path.display())]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("{}", problems_text(.0))]
    Invalid(Vec<Problem>),
}

fn problems_text(problems: &[Problem]) -> String {
    problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")
}

/// One thing wrong in the configuration, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

// ---- stage one: the raw image of the file -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    log_filter: Option<Spanned<String>>,
    rescan_interval: Option<Spanned<String>>,
    min_free_space: Option<Spanned<RawSize>>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    tenant: BTreeMap<String, Spanned<RawTenant>>,
    #[serde(default)]
    partner: BTreeMap<String, Spanned<RawPartner>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    email: Option<Spanned<RawEmail>>,
    sftp: Option<Spanned<RawSftp>>,
    defender: Option<Spanned<RawDefender>>,
    backup: Option<Spanned<RawBackup>>,
    metrics: Option<Spanned<RawMetrics>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    dir: Spanned<String>,
    every: Option<Spanned<String>>,
    keep: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefender {
    score_limit: Option<Spanned<i64>>,
    window: Option<Spanned<String>>,
    ban: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSftp {
    listen: Spanned<String>,
    host_key: Option<Spanned<String>>,
    login_deadline: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_unauthenticated: Option<Spanned<i64>>,
    max_unauthenticated_per_ip: Option<Spanned<i64>>,
    max_channels: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    smtp_url: Spanned<String>,
    user: Option<String>,
    password_file: Option<Spanned<String>>,
    from: Spanned<String>,
    #[serde(default)]
    admin_to: Vec<Spanned<String>>,
    min_interval: Option<Spanned<String>>,
    daily_report_at: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: Option<String>,
    inbox: Option<Spanned<String>>,
    outbox: Option<Spanned<String>>,
    default_region: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    sender: Option<Spanned<String>>,
    #[serde(default)]
    senders: Vec<Spanned<String>>,
    encoding: Option<Spanned<String>>,
    delimiter: Option<Spanned<String>>,
    columns: Option<Spanned<Vec<String>>>,
    template: Option<Spanned<String>>,
    #[serde(default)]
    strict: bool,
    max_parts: Option<Spanned<i64>>,
    max_file_bytes: Option<Spanned<RawSize>>,
    max_lines: Option<Spanned<i64>>,
    #[serde(default)]
    require_trigger: bool,
    settle: Option<Spanned<String>>,
    dedupe_window: Option<Spanned<String>>,
    report_interval: Option<Spanned<String>>,
    anonymize_after: Option<Spanned<String>>,
    delete_after: Option<Spanned<String>>,
    allowed_countries: Option<Vec<Spanned<String>>>,
    url_allowlist: Option<Vec<Spanned<String>>>,
    max_per_day: Option<Spanned<i64>>,
    hold_above: Option<Spanned<i64>>,
    #[serde(default)]
    alert_to: Vec<Spanned<String>>,
    alert_rejected_percent: Option<Spanned<i64>>,
    anomaly_factor: Option<Spanned<i64>>,
    anomaly_min_messages: Option<Spanned<i64>>,
    #[serde(default)]
    keys: Vec<Spanned<String>>,
    authorized_keys_file: Option<Spanned<String>>,
    #[serde(default)]
    allow_ips: Vec<Spanned<String>>,
    max_sessions: Option<Spanned<i64>>,
    max_open_files: Option<Spanned<i64>>,
    validity: Option<Spanned<String>>,
    #[serde(default)]
    optout_keywords: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartner {
    kind: Spanned<String>,
    path: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    tls: Option<bool>,
    system_id: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    system_type: Option<Spanned<String>>,
    bind: Option<Spanned<String>>,
    binds: Option<Spanned<i64>>,
    window: Option<Spanned<i64>>,
    tps: Option<Spanned<i64>>,
    enquire_link: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    registered_delivery: Option<bool>,
    concatenation: Option<Spanned<String>>,
    max_latency: Option<Spanned<String>>,
    max_error_percent: Option<Spanned<i64>>,
    probe_interval: Option<Spanned<String>>,
    receipt_timeout: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    webhook_listen: Option<Spanned<String>>,
    webhook_secret_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: Spanned<String>,
    partners: Spanned<Vec<String>>,
}

// ---- stage two: validation ----------------------------------------------------------------

/// Options of an `authorized_keys` line that only narrow what a key may do; smsdrop allows no
/// more than they do anyway. Any other option (`from=`, `command=`, …) is refused rather than
/// silently ignored: use the tenant's `allow_ips` instead of `from=`.
const HARMLESS_KEY_OPTIONS: &[&str] = &[
    "restrict",
    "no-pty",
    "no-port-forwarding",
    "no-agent-forwarding",
    "no-x11-forwarding",
    "no-user-rc",
];

/// Splits an `authorized_keys` line into its options (names only) and the key part.
fn key_options(line: &str) -> (Vec<&str>, &str) {
    const KEY_TYPES: &[&str] = &["ssh-", "ecdsa-", "sk-"];
    if KEY_TYPES.iter().any(|t| line.starts_with(t)) {
        return (Vec::new(), line);
    }
    // Options run to the first space outside double quotes.
    let mut quoted = false;
    let mut end = line.len();
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let mut names = Vec::new();
    let mut quoted = false;
    let mut from = 0;
    for (i, c) in line[..end].char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                names.push(&line[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    names.push(&line[from..end]);
    let names = names.into_iter().map(|o| o.split('=').next().unwrap_or(o)).collect();
    (names, line[end..].trim_start())
}

/// The Ed25519 keys of an OpenSSH `authorized_keys` file; every problem named with its line.
fn authorized_keys(path: &Path) -> Result<Vec<russh::keys::PublicKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let (options, key) = key_options(line);
        let odd: Vec<&str> = options
            .into_iter()
            .filter(|o| !HARMLESS_KEY_OPTIONS.iter().any(|h| o.eq_ignore_ascii_case(h)))
            .collect();
        if !odd.is_empty() {
            problems.push(format!(
                "{at}: key options {} are not supported (use allow_ips for from=)",
                odd.join(",")
            ));
            continue;
        }
        match russh::keys::PublicKey::from_openssh(key) {
            Ok(public) if public.algorithm() == russh::keys::Algorithm::Ed25519 => keys.push(public),
            Ok(public) => problems.push(format!(
                "{at}: only ssh-ed25519 keys are accepted, this one is {}",
                public.algorithm()
            )),
            Err(e) => problems.push(format!("{at}: not an OpenSSH public key: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(keys)
    } else {
        Err(problems.join("; "))
    }
}

/// Limits on tenant keys, so that a typo cannot make a limit useless.
const MAX_PARTS_LIMIT: i64 = 16;
const MAX_LINES_LIMIT: i64 = 10_000_000;
const MAX_FILE_BYTES_LIMIT: u64 = 4 << 30;

struct Validator<'a> {
    file: PathBuf,
    source: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.source.len());
        self.source.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
    }

    fn problem(&mut self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        let line = self.line_of(span);
        self.problems.push(Problem {
            file: self.file.clone(),
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn base_dir(&self) -> PathBuf {
        self.file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    fn path(&self, value: &str) -> PathBuf {
        let p = PathBuf::from(value);
        if p.is_absolute() { p } else { self.base_dir().join(p) }
    }

    /// A size written as a number of bytes or as text (`"100 MiB"`), within `range`; `default`
    /// when absent, and a problem saying `expected` when it does not read or is out of range.
    fn size(
        &mut self,
        raw: Option<&Spanned<RawSize>>,
        key: &str,
        default: u64,
        range: (u64, u64),
        expected: &str,
    ) -> u64 {
        let Some(raw) = raw else { return default };
        let bytes = match raw.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).ok(),
            RawSize::Text(t) => t.parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64()),
        };
        match bytes {
            Some(b) if (range.0..=range.1).contains(&b) => b,
            _ => {
                self.problem(&raw.span(), key, expected);
                default
            }
        }
    }

    fn duration(
        &mut self,
        raw: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
        range: (Duration, Duration),
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw.get_ref()) {
            Ok(d) if d >= range.0 && d <= range.1 => d,
            Ok(_) => {
                self.problem(
                    &raw.span(),
                    key,
                    format!(
                        "must be between {} and {}",
                        humantime::format_duration(range.0),
                        humantime::format_duration(range.1)
                    ),
                );
                default
            }
            Err(e) => {
                self.problem(
                    &raw.span(),
                    key,
                    format!(
                        "`{}` is not a duration ({e}); write e.g. \"90s\", \"10m\", \"36h\", \"30d\"",
                        raw.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let state_dir = raw
            .state_dir
            .as_ref()
            .map(|s| self.path(s.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/var/lib/smsdrop"));
        let key_file = raw
            .key_file
            .as_ref()
            .map(|s| self.path(s.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/etc/smsdrop/master.key"));
        let (log_format, log_filter) = self.logging(&raw);
        let admin_socket = raw
            .admin
            .as_ref()
            .and_then(|a| a.socket.as_ref())
            .map(|s| self.path(s.get_ref()))
            .unwrap_or_else(|| state_dir.join(crate::paths::ADMIN_SOCKET));
        let rescan_interval = self.duration(
            raw.rescan_interval.as_ref(),
            "rescan_interval",
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(3600)),
        );
        let min_free_space = self.size(
            raw.min_free_space.as_ref(),
            "min_free_space",
            DEFAULT_MIN_FREE_SPACE,
            (0, u64::MAX),
            "must be a size (a number of bytes or e.g. \"512 MiB\"; 0 turns the guard off)",
        );

        let mut partners = BTreeMap::new();
        for (id, p) in &raw.partner {
            if let Some(partner) = self.partner(id, p) {
                partners.insert(id.clone(), partner);
            }
        }

        let routes = self.routes(&raw);

        let mut tenants = BTreeMap::new();
        for (id, t) in &raw.tenant {
            if let Some(tenant) = self.tenant(id, t, &state_dir) {
                tenants.insert(id.clone(), Arc::new(tenant));
            }
        }
        self.check_folders(&raw, &tenants);

        let email = raw.email.as_ref().and_then(|e| self.email(e));
        let defender = self.defender(raw.defender.as_ref());
        let sftp = raw.sftp.as_ref().and_then(|s| self.sftp(s, &state_dir, defender));
        let backup = self.backup(&raw, &state_dir);

        let metrics_listen = self.metrics(&raw);

        Config {
            path: self.file.clone(),
            state_dir,
            key_file,
            log_format,
            log_filter,
            admin_socket,
            rescan_interval,
            min_free_space,
            tenants,
            partners,
            routes,
            email,
            sftp,
            backup,
            metrics_listen,
        }
    }

    /// `log_format` and `log_filter`.
    fn logging(&mut self, raw: &RawConfig) -> (LogFormat, String) {
        let log_format = match raw.log_format.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("text", _)) => LogFormat::Text,
            Some(("json", _)) => LogFormat::Json,
            Some((other, span)) => {
                self.problem(&span, "log_format", format!("`{other}` is not `text` or `json`"));
                LogFormat::Text
            }
        };
        let log_filter = match &raw.log_filter {
            None => "info".to_string(),
            Some(f) => match tracing_subscriber::EnvFilter::builder().parse(f.get_ref()) {
                Ok(_) => f.get_ref().clone(),
                Err(e) => {
                    self.problem(
                        &f.span(),
                        "log_filter",
                        format!(
                            "`{}` is not a filter ({e}); write e.g. \"info\" or \"smsdrop::dispatch=debug,info\"",
                            f.get_ref()
                        ),
                    );
                    "info".to_string()
                }
            },
        };
        (log_format, log_filter)
    }

    /// `[[route]]`, longest prefix first.
    fn routes(&mut self, raw: &RawConfig) -> Vec<Route> {
        let mut routes = Vec::new();
        let mut prefixes = BTreeSet::new();
        for r in &raw.route {
            let prefix = r.get_ref().prefix.get_ref().trim().to_string();
            let valid_prefix = prefix.is_empty()
                || (prefix.starts_with('+') && prefix.len() > 1 && prefix[1..].bytes().all(|b| b.is_ascii_digit()));
            if !valid_prefix {
                self.problem(
                    &r.get_ref().prefix.span(),
                    "route.prefix",
                    format!("`{prefix}` is not `\"\"` or `+` followed by digits"),
                );
            }
            if !prefixes.insert(prefix.clone()) {
                self.problem(
                    &r.get_ref().prefix.span(),
                    "route.prefix",
                    format!("a route for `{prefix}` is already defined"),
                );
            }
            let names = r.get_ref().partners.get_ref();
            if names.is_empty() {
                self.problem(&r.get_ref().partners.span(), "route.partners", "names no partner");
            }
            for name in names {
                if !raw.partner.contains_key(name) {
                    self.problem(
                        &r.get_ref().partners.span(),
                        "route.partners",
                        format!("no partner `{name}` is defined (add a [partner.{name}] table)"),
                    );
                }
            }
            routes.push(Route {
                prefix,
                partners: names.clone(),
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        routes
    }

    /// `[backup]`: never inside `state_dir`.
    fn backup(&mut self, raw: &RawConfig, state_dir: &Path) -> Option<BackupSchedule> {
        let backup = raw.backup.as_ref().map(|b| {
            let b = b.get_ref();
            BackupSchedule {
                dir: self.path(b.dir.get_ref()),
                every: self.duration(
                    b.every.as_ref(),
                    "backup.every",
                    Duration::from_secs(86_400),
                    (Duration::from_secs(1), Duration::from_secs(30 * 86_400)),
                ),
                keep: self.int(b.keep.as_ref(), "backup.keep", 7, (1, 1000)) as usize,
            }
        });
        if let Some(b) = &backup {
            if b.dir.starts_with(state_dir) {
                let span = raw.backup.as_ref().map(|r| r.get_ref().dir.span()).unwrap_or(0..0);
                self.problem(
                    &span,
                    "backup.dir",
                    "is inside state_dir: a backup must survive the loss of the disk it backs up",
                );
            }
        }
        backup
    }

    /// `[metrics] listen`.
    fn metrics(&mut self, raw: &RawConfig) -> Option<std::net::SocketAddr> {
        raw.metrics.as_ref().and_then(|m| {
            let listen = &m.get_ref().listen;
            match listen.get_ref().parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.problem(
                        &listen.span(),
                        "metrics.listen",
                        format!("`{}` is not an address:port like \"127.0.0.1:9185\"", listen.get_ref()),
                    );
                    None
                }
            }
        })
    }

    fn defender(&mut self, raw: Option<&Spanned<RawDefender>>) -> Defender {
        let d = raw.map(|r| r.get_ref());
        Defender {
            score_limit: self.int(
                d.and_then(|d| d.score_limit.as_ref()),
                "defender.score_limit",
                10,
                (1, 10_000),
            ) as u32,
            window: self.duration(
                d.and_then(|d| d.window.as_ref()),
                "defender.window",
                Duration::from_secs(600),
                (Duration::from_secs(1), Duration::from_secs(7 * 86400)),
            ),
            ban: self.duration(
                d.and_then(|d| d.ban.as_ref()),
                "defender.ban",
                Duration::from_secs(1800),
                (Duration::from_secs(1), Duration::from_secs(30 * 86400)),
            ),
        }
    }

    fn sftp(&mut self, raw: &Spanned<RawSftp>, state_dir: &Path, defender: Defender) -> Option<Sftp> {
        let r = raw.get_ref();
        let listen = match r.listen.get_ref().parse::<std::net::SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    &r.listen.span(),
                    "sftp.listen",
                    format!("`{}` is not an address:port like \"0.0.0.0:2222\"", r.listen.get_ref()),
                );
                return None;
            }
        };
        let login_deadline = self.duration(
            r.login_deadline.as_ref(),
            "sftp.login_deadline",
            Duration::from_secs(30),
            (Duration::from_secs(1), Duration::from_secs(600)),
        );
        let idle_timeout = self.duration(
            r.idle_timeout.as_ref(),
            "sftp.idle_timeout",
            Duration::from_secs(600),
            (Duration::from_secs(5), Duration::from_secs(86400)),
        );
        let max_unauthenticated = self.int(
            r.max_unauthenticated.as_ref(),
            "sftp.max_unauthenticated",
            64,
            (1, 100_000),
        ) as usize;
        let max_unauthenticated_per_ip = self.int(
            r.max_unauthenticated_per_ip.as_ref(),
            "sftp.max_unauthenticated_per_ip",
            16,
            (1, 100_000),
        ) as usize;
        let max_channels = self.int(r.max_channels.as_ref(), "sftp.max_channels", 4, (1, 64)) as usize;
        Some(Sftp {
            listen,
            host_key: r
                .host_key
                .as_ref()
                .map(|p| self.path(p.get_ref()))
                .unwrap_or_else(|| state_dir.join(crate::paths::HOST_KEY)),
            login_deadline,
            idle_timeout,
            max_unauthenticated,
            max_unauthenticated_per_ip,
            max_channels,
            defender,
        })
    }

    fn mailbox(&mut self, raw: &Spanned<String>, key: &str) -> Option<lettre::message::Mailbox> {
        match raw.get_ref().parse::<lettre::message::Mailbox>() {
            Ok(m) => Some(m),
            Err(e) => {
                self.problem(
                    &raw.span(),
                    key,
                    format!("`{}` is not a mail address ({e})", raw.get_ref()),
                );
                None
            }
        }
    }

    fn email(&mut self, raw: &Spanned<RawEmail>) -> Option<Email> {
        let e = raw.get_ref();
        let url = match url::Url::parse(e.smtp_url.get_ref()) {
            Ok(u) => u,
            Err(err) => {
                self.problem(&e.smtp_url.span(), "email.smtp_url", format!("not a URL: {err}"));
                return None;
            }
        };
        let security = match url.scheme() {
            "smtp" => SmtpSecurity::Plain,
            "smtp+starttls" => SmtpSecurity::StartTls,
            "smtps" => SmtpSecurity::Tls,
            other => {
                self.problem(
                    &e.smtp_url.span(),
                    "email.smtp_url",
                    format!("scheme `{other}` is not smtp://, smtp+starttls:// or smtps://"),
                );
                return None;
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(
                &e.smtp_url.span(),
                "email.smtp_url",
                "put the user in `user` and the password in `password_file`, not in the URL",
            );
        }
        let Some(host) = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        else {
            self.problem(&e.smtp_url.span(), "email.smtp_url", "no host");
            return None;
        };
        let port = url.port().unwrap_or(match security {
            SmtpSecurity::Plain => 25,
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Tls => 465,
        });
        let from = self.mailbox(&e.from, "email.from");
        let admin_to = e
            .admin_to
            .iter()
            .filter_map(|a| self.mailbox(a, "email.admin_to"))
            .collect();
        let min_interval = self.duration(
            e.min_interval.as_ref(),
            "email.min_interval",
            Duration::from_secs(15 * 60),
            (Duration::ZERO, Duration::from_secs(7 * 86400)),
        );
        let timeout = self.duration(
            e.timeout.as_ref(),
            "email.timeout",
            Duration::from_secs(30),
            (Duration::from_secs(1), Duration::from_secs(600)),
        );
        let daily_report_at = e
            .daily_report_at
            .as_ref()
            .and_then(|t| match t.get_ref().parse::<jiff::civil::Time>() {
                Ok(time) => Some(time),
                Err(_) => {
                    self.problem(
                        &t.span(),
                        "email.daily_report_at",
                        format!("`{}` is not a time of day like \"07:30\"", t.get_ref()),
                    );
                    None
                }
            });
        Some(Email {
            security,
            host,
            port,
            user: e.user.clone(),
            password_file: e.password_file.as_ref().map(|p| self.path(p.get_ref())),
            from: from?,
            admin_to,
            min_interval,
            daily_report_at,
            timeout,
            ca_file: e.ca_file.as_ref().map(|p| self.path(p.get_ref())),
        })
    }

    fn partner(&mut self, id: &str, raw: &Spanned<RawPartner>) -> Option<Partner> {
        let key = format!("partner.{id}");
        if !is_valid_id(id) {
            self.problem(&raw.span(), &key, "an id is 1 to 32 of a-z, 0-9, `_` and `-`");
        }
        let p = raw.get_ref();
        // (key, set, the kinds it belongs to)
        let keys = [
            ("path", p.path.is_some(), "sink"),
            ("address", p.address.is_some(), "smpp"),
            ("tls", p.tls.is_some(), "smpp"),
            ("system_id", p.system_id.is_some(), "smpp"),
            ("password_file", p.password_file.is_some(), "smpp"),
            ("system_type", p.system_type.is_some(), "smpp"),
            ("bind", p.bind.is_some(), "smpp"),
            ("binds", p.binds.is_some(), "smpp"),
            ("enquire_link", p.enquire_link.is_some(), "smpp"),
            ("response_timeout", p.response_timeout.is_some(), "smpp"),
            ("registered_delivery", p.registered_delivery.is_some(), "smpp"),
            ("concatenation", p.concatenation.is_some(), "smpp"),
            ("url", p.url.is_some(), "http"),
            ("token_file", p.token_file.is_some(), "http"),
            ("timeout", p.timeout.is_some(), "http"),
            ("webhook_listen", p.webhook_listen.is_some(), "http"),
            ("webhook_secret_file", p.webhook_secret_file.is_some(), "http"),
            ("window", p.window.is_some(), "smpp http"),
            ("tps", p.tps.is_some(), "smpp http"),
            ("max_latency", p.max_latency.is_some(), "smpp http"),
            ("max_error_percent", p.max_error_percent.is_some(), "smpp http"),
            ("probe_interval", p.probe_interval.is_some(), "smpp http"),
            ("receipt_timeout", p.receipt_timeout.is_some(), "smpp http"),
        ];
        let kind = p.kind.get_ref().as_str();
        if ["sink", "smpp", "http"].contains(&kind) {
            for (name, _, _) in keys
                .iter()
                .filter(|(_, set, kinds)| *set && !kinds.split(' ').any(|k| k == kind))
            {
                self.problem(
                    &raw.span(),
                    &format!("{key}.{name}"),
                    format!("not a key of {kind} partners"),
                );
            }
        }
        match kind {
            "sink" => match &p.path {
                Some(path) => Some(Partner::Sink {
                    path: self.path(path.get_ref()),
                }),
                None => {
                    self.problem(&raw.span(), &format!("{key}.path"), "a sink partner needs `path`");
                    None
                }
            },
            "smpp" => self.smpp(&key, raw).map(Partner::Smpp),
            "http" => self.http(&key, raw).map(Partner::Http),
            other => {
                self.problem(
                    &p.kind.span(),
                    &format!("{key}.kind"),
                    format!("`{other}` is not a partner kind (smpp, http or sink)"),
                );
                None
            }
        }
    }

    fn health(&mut self, key: &str, p: &RawPartner) -> HealthPolicy {
        let k = |name: &str| format!("{key}.{name}");
        HealthPolicy {
            max_latency: self.duration(
                p.max_latency.as_ref(),
                &k("max_latency"),
                Duration::from_secs(5),
                (Duration::from_millis(50), Duration::from_secs(300)),
            ),
            max_error_percent: self.int(p.max_error_percent.as_ref(), &k("max_error_percent"), 50, (1, 100)) as u8,
            probe_interval: self.duration(
                p.probe_interval.as_ref(),
                &k("probe_interval"),
                Duration::from_secs(30),
                (Duration::from_secs(1), Duration::from_secs(3600)),
            ),
        }
    }

    fn receipt_timeout(&mut self, key: &str, p: &RawPartner) -> Duration {
        self.duration(
            p.receipt_timeout.as_ref(),
            &format!("{key}.receipt_timeout"),
            Duration::from_secs(72 * 3600),
            (Duration::from_secs(1), Duration::from_secs(30 * 86400)),
        )
    }

    fn http(&mut self, key: &str, raw: &Spanned<RawPartner>) -> Option<Http> {
        let p = raw.get_ref();
        let k = |name: &str| format!("{key}.{name}");
        let Some(url) = &p.url else {
            self.problem(&raw.span(), &k("url"), "an http partner needs `url`");
            return None;
        };
        let parsed = match url::Url::parse(url.get_ref()) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => u,
            Ok(_) | Err(_) => {
                self.problem(
                    &url.span(),
                    &k("url"),
                    format!("`{}` is not an http:// or https:// URL", url.get_ref()),
                );
                return None;
            }
        };
        let webhook_listen = p.webhook_listen.as_ref().and_then(|l| match l.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    &l.span(),
                    &k("webhook_listen"),
                    format!("`{}` is not an address:port", l.get_ref()),
                );
                None
            }
        });
        if p.webhook_listen.is_some() && p.webhook_secret_file.is_none() {
            self.problem(
                &raw.span(),
                &k("webhook_secret_file"),
                "a webhook needs `webhook_secret_file`: unsigned receipts are not taken",
            );
        }
        let tps = p
            .tps
            .as_ref()
            .map(|_| self.int(p.tps.as_ref(), &k("tps"), 100, (1, 100_000)) as u32);
        Some(Http {
            url: parsed,
            token_file: p.token_file.as_ref().map(|f| self.path(f.get_ref())),
            window: self.int(p.window.as_ref(), &k("window"), 10, (1, 1000)) as usize,
            tps,
            timeout: self.duration(
                p.timeout.as_ref(),
                &k("timeout"),
                Duration::from_secs(10),
                (Duration::from_secs(1), Duration::from_secs(300)),
            ),
            webhook_listen,
            webhook_secret_file: p.webhook_secret_file.as_ref().map(|f| self.path(f.get_ref())),
            health: self.health(key, p),
            receipt_timeout: self.receipt_timeout(key, p),
        })
    }

    fn smpp(&mut self, key: &str, raw: &Spanned<RawPartner>) -> Option<Smpp> {
        let p = raw.get_ref();
        let k = |name: &str| format!("{key}.{name}");
        let Some(address) = &p.address else {
            self.problem(
                &raw.span(),
                &k("address"),
                "an smpp partner needs `address` (host:port)",
            );
            return None;
        };
        let text = address.get_ref().trim();
        let port_ok = text
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            self.problem(&address.span(), &k("address"), format!("`{text}` is not host:port"));
        }
        let Some(system_id) = &p.system_id else {
            self.problem(&raw.span(), &k("system_id"), "an smpp partner needs `system_id`");
            return None;
        };
        if system_id.get_ref().len() > 15 {
            self.problem(&system_id.span(), &k("system_id"), "at most 15 characters (SMPP 3.4)");
        }
        let system_type = p.system_type.as_ref().map(|s| s.get_ref().clone()).unwrap_or_default();
        if system_type.len() > 12 {
            if let Some(s) = &p.system_type {
                self.problem(&s.span(), &k("system_type"), "at most 12 characters (SMPP 3.4)");
            }
        }
        let bind_pair = match p.bind.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
            None | Some(("transceiver", _)) => false,
            Some(("transmitter+receiver", _)) => true,
            Some((other, span)) => {
                self.problem(
                    &span,
                    &k("bind"),
                    format!("`{other}` is not a bind mode (\"transceiver\" or \"transmitter+receiver\")"),
                );
                false
            }
        };
        let sar = match p.concatenation.as_ref().map(|c| (c.get_ref().as_str(), c.span())) {
            None | Some(("udh", _)) => false,
            Some(("sar", _)) => true,
            Some((other, span)) => {
                self.problem(
                    &span,
                    &k("concatenation"),
                    format!("`{other}` is not \"udh\" or \"sar\""),
                );
                false
            }
        };
        let tps = p
            .tps
            .as_ref()
            .map(|_| self.int(p.tps.as_ref(), &k("tps"), 100, (1, 100_000)) as u32);
        Some(Smpp {
            address: text.to_string(),
            tls: p.tls.unwrap_or(false),
            system_id: system_id.get_ref().clone(),
            password_file: p.password_file.as_ref().map(|f| self.path(f.get_ref())),
            system_type,
            bind_pair,
            binds: self.int(p.binds.as_ref(), &k("binds"), 1, (1, 16)) as usize,
            window: self.int(p.window.as_ref(), &k("window"), 10, (1, 1000)) as usize,
            tps,
            enquire_link: self.duration(
                p.enquire_link.as_ref(),
                &k("enquire_link"),
                Duration::from_secs(30),
                (Duration::from_secs(5), Duration::from_secs(600)),
            ),
            response_timeout: self.duration(
                p.response_timeout.as_ref(),
                &k("response_timeout"),
                Duration::from_secs(30),
                (Duration::from_secs(1), Duration::from_secs(300)),
            ),
            registered_delivery: p.registered_delivery.unwrap_or(true),
            sar,
            health: self.health(key, p),
            receipt_timeout: self.receipt_timeout(key, p),
        })
    }

    fn tenant(&mut self, id: &str, raw: &Spanned<RawTenant>, state_dir: &Path) -> Option<Tenant> {
        let key = |k: &str| format!("tenant.{id}.{k}");
        let span = raw.span();
        if !is_valid_id(id) {
            self.problem(
                &span,
                &format!("tenant.{id}"),
                "a tenant id is 1 to 32 of a-z, 0-9, `_` and `-` (it is also the SFTP user name)",
            );
            return None;
        }
        let t = raw.get_ref();
        let default_region = t.default_region.as_ref().and_then(|r| match parse_region(r.get_ref()) {
            Some(id) => Some(id),
            None => {
                self.problem(
                    &r.span(),
                    &key("default_region"),
                    format!("`{}` is not a two-letter ISO 3166 region", r.get_ref()),
                );
                None
            }
        });
        let timezone = match &t.timezone {
            None => jiff::tz::TimeZone::UTC,
            Some(tz) => match jiff::tz::TimeZone::get(tz.get_ref()) {
                Ok(zone) => zone,
                Err(_) => {
                    self.problem(
                        &tz.span(),
                        &key("timezone"),
                        format!("`{}` is not an IANA time zone (e.g. \"Europe/Paris\")", tz.get_ref()),
                    );
                    jiff::tz::TimeZone::UTC
                }
            },
        };
        Some(Tenant {
            id: id.to_string(),
            name: t.name.clone().unwrap_or_else(|| id.to_string()),
            default_region,
            timezone,
            folders: self.folders(id, t, state_dir, &key),
            batch: self.batch_rules(t, &span, &key),
            policy: self.policy(t, &key),
            replies: self.replies(t, &key),
            retention: self.retention(t, &key),
            alerts: self.alert_rules(t, &key),
            sftp: self.sftp_access(t, &key),
        })
    }

    /// A tenant's `inbox`, `outbox`, `require_trigger` and `settle`.
    fn folders(&mut self, id: &str, t: &RawTenant, state_dir: &Path, key: &dyn Fn(&str) -> String) -> Folders {
        let (default_inbox, default_outbox) = crate::paths::default_folders(state_dir, id);
        let inbox = t
            .inbox
            .as_ref()
            .map(|p| self.path(p.get_ref()))
            .unwrap_or(default_inbox);
        let outbox = t
            .outbox
            .as_ref()
            .map(|p| self.path(p.get_ref()))
            .unwrap_or(default_outbox);

        let settle = self.duration(
            t.settle.as_ref(),
            &key("settle"),
            Duration::from_secs(2),
            (Duration::ZERO, Duration::from_secs(3600)),
        );
        Folders {
            inbox,
            outbox,
            require_trigger: t.require_trigger,
            settle,
        }
    }

    /// How a tenant's batch files are read and checked.
    fn batch_rules(
        &mut self,
        t: &RawTenant,
        span: &std::ops::Range<usize>,
        key: &dyn Fn(&str) -> String,
    ) -> BatchRules {
        let sender = t.sender.as_ref().map(|s| {
            if !crate::sms::sender::is_valid_sender(s.get_ref()) {
                self.problem(&s.span(), &key("sender"), SENDER_RULE);
            }
            s.get_ref().clone()
        });
        let senders = t
            .senders
            .iter()
            .map(|s| {
                if !crate::sms::sender::is_valid_sender(s.get_ref()) {
                    self.problem(&s.span(), &key("senders"), SENDER_RULE);
                }
                s.get_ref().clone()
            })
            .collect();
        let encoding = match &t.encoding {
            None => EncodingChoice::Auto,
            Some(e) if e.get_ref().eq_ignore_ascii_case("auto") => EncodingChoice::Auto,
            Some(e) => match encoding_rs::Encoding::for_label(e.get_ref().as_bytes()) {
                Some(enc) if enc != encoding_rs::REPLACEMENT => EncodingChoice::Fixed(enc),
                _ => {
                    self.problem(
                        &e.span(),
                        &key("encoding"),
                        format!("`{}` is not `auto` or a WHATWG encoding label", e.get_ref()),
                    );
                    EncodingChoice::Auto
                }
            },
        };
        let delimiter = t.delimiter.as_ref().and_then(|d| match d.get_ref().as_str() {
            ";" => Some(b';'),
            "," => Some(b','),
            "\t" | "tab" | "TAB" => Some(b'\t'),
            "|" => Some(b'|'),
            other => {
                self.problem(
                    &d.span(),
                    &key("delimiter"),
                    format!("`{other}` is not one of `;`, `,`, `\\t` (or \"tab\"), `|`"),
                );
                None
            }
        });
        let columns = t.columns.as_ref().map(|c| {
            let cols: Vec<Column> = c.get_ref().iter().map(|n| Column::from_header(n)).collect();
            if !cols.contains(&Column::Phone) {
                self.problem(&c.span(), &key("columns"), "must name a `phone` column");
            }
            cols
        });
        let template = t.template.as_ref().and_then(|s| match Template::parse(s.get_ref()) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(&s.span(), &key("template"), format!("bad template: {e}"));
                None
            }
        });
        if let (Some(cols), None) = (&columns, &template) {
            if !cols.contains(&Column::Message) {
                self.problem(
                    &t.columns.as_ref().map(|c| c.span()).unwrap_or(span.clone()),
                    &key("columns"),
                    "must name a `message` column when the tenant has no `template`",
                );
            }
        }
        let max_parts = self.int(t.max_parts.as_ref(), &key("max_parts"), 6, (1, MAX_PARTS_LIMIT));
        let max_lines = self.int(t.max_lines.as_ref(), &key("max_lines"), 1_000_000, (1, MAX_LINES_LIMIT));
        let max_file_bytes = self.size(
            t.max_file_bytes.as_ref(),
            &key("max_file_bytes"),
            100 << 20,
            (1, MAX_FILE_BYTES_LIMIT),
            "must be a size from 1 byte to 4 GiB (a number of bytes or e.g. \"100 MiB\")",
        );
        let dedupe_window = self.duration(
            t.dedupe_window.as_ref(),
            &key("dedupe_window"),
            Duration::from_secs(30 * 86400),
            (Duration::ZERO, Duration::from_secs(3660 * 86400)),
        );
        let validity = self.duration(
            t.validity.as_ref(),
            &key("validity"),
            Duration::from_secs(48 * 3600),
            (Duration::from_secs(300), Duration::from_secs(7 * 86400)),
        );
        BatchRules {
            sender,
            senders,
            encoding,
            delimiter,
            columns,
            template,
            strict: t.strict,
            max_parts: max_parts as u8,
            max_file_bytes,
            max_lines: max_lines as u64,
            dedupe_window,
            validity,
        }
    }

    /// A tenant's traffic policies.
    fn policy(&mut self, t: &RawTenant, key: &dyn Fn(&str) -> String) -> Policy {
        let allowed_countries = t.allowed_countries.as_ref().map(|list| {
            list.iter()
                .filter_map(|c| match parse_region(c.get_ref()) {
                    Some(r) => Some(r),
                    None => {
                        self.problem(
                            &c.span(),
                            &key("allowed_countries"),
                            format!("`{}` is not a two-letter ISO 3166 region", c.get_ref()),
                        );
                        None
                    }
                })
                .collect()
        });
        let url_allowlist = t.url_allowlist.as_ref().map(|list| {
            list.iter()
                .filter_map(|d| {
                    let domain = d
                        .get_ref()
                        .trim()
                        .trim_start_matches("*.")
                        .trim_end_matches('.')
                        .to_ascii_lowercase();
                    let valid = domain.contains('.')
                        && domain
                            .split('.')
                            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
                    if valid {
                        Some(domain)
                    } else {
                        self.problem(
                            &d.span(),
                            &key("url_allowlist"),
                            format!("`{}` is not a domain name", d.get_ref()),
                        );
                        None
                    }
                })
                .collect()
        });
        let max_per_day = t
            .max_per_day
            .as_ref()
            .map(|v| self.int(Some(v), &key("max_per_day"), 0, (1, i64::MAX)) as u64);
        let hold_above = t
            .hold_above
            .as_ref()
            .map(|v| self.int(Some(v), &key("hold_above"), 0, (0, i64::MAX)) as u64);

        Policy {
            allowed_countries,
            url_allowlist,
            max_per_day,
            hold_above,
        }
    }

    /// Delivery reports and incoming messages.
    fn replies(&mut self, t: &RawTenant, key: &dyn Fn(&str) -> String) -> Replies {
        let report_interval = self.duration(
            t.report_interval.as_ref(),
            &key("report_interval"),
            Duration::from_secs(15 * 60),
            (Duration::from_secs(1), Duration::from_secs(7 * 86400)),
        );
        let mut optout_keywords = Vec::new();
        for k in &t.optout_keywords {
            let word = k.get_ref().split_whitespace().collect::<Vec<_>>().join(" ");
            if word.is_empty() || word.chars().count() > 40 {
                self.problem(&k.span(), &key("optout_keywords"), "a keyword is 1 to 40 characters");
            } else {
                optout_keywords.push(word.to_uppercase());
            }
        }

        Replies {
            report_interval,
            optout_keywords,
        }
    }

    /// How long a tenant's finished batches are kept.
    fn retention(&mut self, t: &RawTenant, key: &dyn Fn(&str) -> String) -> RetentionRules {
        let delete_after = self.duration(
            t.delete_after.as_ref(),
            &key("delete_after"),
            Duration::from_secs(365 * 86400),
            (Duration::from_secs(86400), Duration::from_secs(3652 * 86400)),
        );
        let anonymize_after = t.anonymize_after.as_ref().map(|raw| {
            let d = self.duration(
                Some(raw),
                &key("anonymize_after"),
                delete_after,
                (Duration::from_secs(3600), Duration::from_secs(3652 * 86400)),
            );
            if d > delete_after {
                self.problem(
                    &raw.span(),
                    &key("anonymize_after"),
                    "must not be longer than delete_after (the data is gone by then)",
                );
            }
            d
        });

        RetentionRules {
            anonymize_after,
            delete_after,
        }
    }

    /// Who gets a tenant's alerts, and when a batch raises one.
    fn alert_rules(&mut self, t: &RawTenant, key: &dyn Fn(&str) -> String) -> AlertRules {
        let alert_to = t
            .alert_to
            .iter()
            .filter_map(|a| self.mailbox(a, &key("alert_to")))
            .collect();
        let alert_rejected_percent = self.int(
            t.alert_rejected_percent.as_ref(),
            &key("alert_rejected_percent"),
            10,
            (1, 100),
        ) as u8;
        let anomaly_factor = self.int(t.anomaly_factor.as_ref(), &key("anomaly_factor"), 10, (2, 1000)) as u32;
        let anomaly_min_messages = self.int(
            t.anomaly_min_messages.as_ref(),
            &key("anomaly_min_messages"),
            1000,
            (1, i64::MAX),
        ) as u64;

        AlertRules {
            alert_to,
            alert_rejected_percent,
            anomaly_factor,
            anomaly_min_messages,
        }
    }

    /// Who may log in over SFTP as the tenant, from where, and how much at once.
    fn sftp_access(&mut self, t: &RawTenant, key: &dyn Fn(&str) -> String) -> SftpAccess {
        let mut keys: Vec<russh::keys::PublicKey> = t
            .keys
            .iter()
            .filter_map(|k| match russh::keys::PublicKey::from_openssh(k.get_ref().trim()) {
                Ok(public) if public.algorithm() == russh::keys::Algorithm::Ed25519 => Some(public),
                Ok(public) => {
                    self.problem(
                        &k.span(),
                        &key("keys"),
                        format!("only ssh-ed25519 keys are accepted, this one is {}", public.algorithm()),
                    );
                    None
                }
                Err(e) => {
                    self.problem(&k.span(), &key("keys"), format!("not an OpenSSH public key line: {e}"));
                    None
                }
            })
            .collect();
        if let Some(file) = &t.authorized_keys_file {
            let path = self.path(file.get_ref());
            match authorized_keys(&path) {
                Ok(found) => keys.extend(found),
                Err(e) => self.problem(&file.span(), &key("authorized_keys_file"), e),
            }
        }
        let allow_ips = t
            .allow_ips
            .iter()
            .filter_map(|a| {
                let text = a.get_ref().trim();
                let net = text
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                match net {
                    Ok(n) => Some(n.trunc()),
                    Err(_) => {
                        self.problem(
                            &a.span(),
                            &key("allow_ips"),
                            format!("`{text}` is not an IP address or CIDR"),
                        );
                        None
                    }
                }
            })
            .collect();
        let max_sessions = self.int(t.max_sessions.as_ref(), &key("max_sessions"), 4, (1, 1000)) as usize;
        let max_open_files = self.int(t.max_open_files.as_ref(), &key("max_open_files"), 64, (1, 100_000)) as usize;
        SftpAccess {
            keys,
            allow_ips,
            max_sessions,
            max_open_files,
        }
    }

    fn int(&mut self, raw: Option<&Spanned<i64>>, key: &str, default: i64, range: (i64, i64)) -> i64 {
        match raw {
            None => default,
            Some(v) if (range.0..=range.1).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                self.problem(&v.span(), key, format!("must be from {} to {}", range.0, range.1));
                default
            }
        }
    }

    /// Two tenants sharing a folder would read each other's files: refuse it.
    fn check_folders(&mut self, raw: &RawConfig, tenants: &BTreeMap<String, Arc<Tenant>>) {
        let mut seen: BTreeMap<&Path, &str> = BTreeMap::new();
        for t in tenants.values() {
            for folder in [&t.folders.inbox, &t.folders.outbox] {
                if let Some(other) = seen.insert(folder.as_path(), &t.id) {
                    let span = raw.tenant.get(&t.id).map(|r| r.span()).unwrap_or(0..0);
                    self.problem(
                        &span,
                        &format!("tenant.{}", t.id),
                        format!("folder {} is also used by tenant `{other}`", folder.display()),
                    );
                }
            }
        }
    }
}

const SENDER_RULE: &str = "a sender is 1 to 11 letters, digits, spaces or `.-_&` (alphanumeric), or up to 15 digits with an optional leading `+`";

/// A region (ISO 3166 alpha-2) that has phone numbers.
pub fn parse_region(code: &str) -> Option<rlibphonenumber::Region> {
    let region = code
        .trim()
        .to_ascii_uppercase()
        .parse::<rlibphonenumber::Region>()
        .ok()?;
    rlibphonenumber::PHONE_NUMBER_UTIL
        .get_country_code_for_region(region)
        .map(|_| region)
}

/// Tenant and partner ids: short, safe as folder names and SFTP user names.
pub fn is_valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the raw image takes, as `table.key` (`tenant.<id>.inbox`), read from the serde
    /// derives themselves, so a key added to the code is found here.
    fn keys_in_the_code() -> std::collections::BTreeSet<String> {
        use serde_aux::serde_introspection::serde_introspect;
        let tables: [(&str, &[&str]); 9] = [
            ("admin", serde_introspect::<RawAdmin>()),
            ("metrics", serde_introspect::<RawMetrics>()),
            ("backup", serde_introspect::<RawBackup>()),
            ("sftp", serde_introspect::<RawSftp>()),
            ("defender", serde_introspect::<RawDefender>()),
            ("email", serde_introspect::<RawEmail>()),
            ("tenant.<id>", serde_introspect::<RawTenant>()),
            ("partner.<id>", serde_introspect::<RawPartner>()),
            ("route", serde_introspect::<RawRoute>()),
        ];
        let mut keys = std::collections::BTreeSet::new();
        for top in serde_introspect::<RawConfig>() {
            let table = tables.iter().find(|(t, _)| t.split('.').next() == Some(*top));
            match table {
                Some((name, fields)) => keys.extend(fields.iter().map(|f| format!("{name}.{f}"))),
                None => {
                    keys.insert(top.to_string());
                }
            }
        }
        keys
    }

    /// The keys docs/configuration.md documents: the first cell of each table row, under its
    /// section (`## Top level`, ``## `[tenant.<id>]` ``, ``## `[[route]]` ``).
    fn keys_in_the_reference() -> std::collections::BTreeSet<String> {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md"))
            .expect("docs/configuration.md");
        let mut keys = std::collections::BTreeSet::new();
        let mut table = None;
        for line in text.lines() {
            if let Some(heading) = line.strip_prefix("## ") {
                table = match heading {
                    "Top level" => Some(String::new()),
                    h => h
                        .strip_prefix("`[")
                        .and_then(|h| h.strip_suffix("]`"))
                        .map(|t| t.trim_matches(['[', ']']).to_string()),
                };
                continue;
            }
            let (Some(table), Some(row)) = (&table, line.strip_prefix("| `")) else {
                continue;
            };
            let key = row.split('`').next().unwrap_or_default();
            keys.insert(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
        keys
    }

    #[test]
    fn every_key_is_in_the_configuration_reference_and_nothing_else_is() {
        let (code, docs) = (keys_in_the_code(), keys_in_the_reference());
        assert!(code.len() > 90, "the introspection found the keys: {code:?}");
        let undocumented: Vec<&String> = code.difference(&docs).collect();
        let unknown: Vec<&String> = docs.difference(&code).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "keys the code takes that docs/configuration.md lacks: {undocumented:?}; keys it documents that the code does not take: {unknown:?}"
        );
    }

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/smsdrop/test.toml"), src)
    }

    const GOOD: &str = r#"
state_dir = "state"
key_file = "/etc/smsdrop/master.key"

[tenant.acme]
default_region = "FR"
timezone = "Europe/Paris"
sender = "ACME"
settle = "500ms"

[partner.sink]
kind = "sink"
path = "/tmp/sink.jsonl"

[[route]]
prefix = ""
partners = ["sink"]

[[route]]
prefix = "+33"
partners = ["sink"]
"#;

    #[test]
    fn good_config_is_resolved() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/etc/smsdrop/state"));
        assert_eq!(c.admin_socket, PathBuf::from("/etc/smsdrop/state/admin.sock"));
        let t = &c.tenants["acme"];
        assert_eq!(t.folders.inbox, PathBuf::from("/etc/smsdrop/state/drop/acme/inbox"));
        assert_eq!(t.folders.settle, Duration::from_millis(500));
        assert_eq!(t.batch.max_parts, 6);
        assert_eq!(t.batch.max_file_bytes, 100 << 20);
        assert_eq!(c.route_for("+33612345678").unwrap().prefix, "+33");
        assert_eq!(c.route_for("+4412345").unwrap().prefix, "");
    }

    fn problems(src: &str) -> Vec<String> {
        match parse(src) {
            Err(ConfigError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn backup_schedule() {
        let c = parse(&format!("{GOOD}\n[backup]\ndir = \"/var/backups/smsdrop\"\n")).unwrap();
        let b = c.backup.unwrap();
        assert_eq!((b.every, b.keep), (Duration::from_secs(86_400), 7));
        let p = problems(&format!(
            "{GOOD}\n[backup]\ndir = \"state/backups\"\nevery = \"0s\"\nkeep = 0\n"
        ));
        assert!(p.iter().any(|p| p.contains("backup.dir: is inside state_dir")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("backup.every")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("backup.keep")), "{p:?}");
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let p = problems("state_dir = \"x\"\n\n[tenant.acme]\nsendr = \"A\"\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("/etc/smsdrop/test.toml:4: "), "{p:?}");
        assert!(p[0].contains("sendr"), "{p:?}");
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let p = problems(
            "[tenant.acme]\nsettle = \"soon\"\ndefault_region = \"XX\"\nmax_parts = 99\n\n[[route]]\nprefix = \"\"\npartners = [\"nope\"]\n",
        );
        assert!(p.iter().any(|p| p.contains(":2: tenant.acme.settle: ")), "{p:?}");
        assert!(
            p.iter().any(|p| p.contains(":3: tenant.acme.default_region: ")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.contains(":4: tenant.acme.max_parts: ")), "{p:?}");
        assert!(
            p.iter().any(|p| p.contains(":8: route.partners: no partner `nope`")),
            "{p:?}"
        );
    }

    #[test]
    fn http_partners() {
        let p = problems("[partner.web]\nkind = \"http\"\n");
        assert!(p[0].contains("partner.web.url: an http partner needs `url`"), "{p:?}");
        let p = problems(
            "[partner.web]\nkind = \"http\"\nurl = \"ftp://x\"\nwebhook_listen = \"127.0.0.1:9000\"\nsystem_id = \"a\"\n",
        );
        assert!(p.iter().any(|p| p.contains("not an http:// or https:// URL")), "{p:?}");
        assert!(
            p.iter()
                .any(|p| p.contains("partner.web.system_id: not a key of http partners")),
            "{p:?}"
        );
        let p = problems(
            "[partner.web]\nkind = \"http\"\nurl = \"https://api.example.net/sms\"\nwebhook_listen = \"127.0.0.1:9000\"\n",
        );
        assert!(p.iter().any(|p| p.contains("webhook_secret_file")), "{p:?}");
    }

    #[test]
    fn smpp_partners() {
        let c = parse(
            "[partner.orange]\nkind = \"smpp\"\naddress = \"smsc.example.net:2775\"\nsystem_id = \"acme\"\npassword_file = \"orange.secret\"\nwindow = 32\ntps = 200\n",
        )
        .unwrap();
        let Partner::Smpp(s) = &c.partners["orange"] else {
            panic!()
        };
        assert_eq!(
            (s.window, s.tps, s.binds, s.bind_pair, s.sar),
            (32, Some(200), 1, false, false)
        );
        assert_eq!(
            s.password_file.as_deref(),
            Some(Path::new("/etc/smsdrop/orange.secret"))
        );
        let p = problems(
            "[partner.orange]\nkind = \"smpp\"\naddress = \"nope\"\nsystem_id = \"acme\"\nwindow = 0\nbind = \"both\"\npath = \"x\"\n",
        );
        for needle in [
            ":3: partner.orange.address: `nope`",
            ":5: partner.orange.window",
            ":6: partner.orange.bind",
            "partner.orange.path: not a key of smpp partners",
        ] {
            assert!(p.iter().any(|p| p.contains(needle)), "{needle}: {p:?}");
        }
    }

    #[test]
    fn a_metrics_listen_that_is_no_address_is_refused() {
        let p = problems("[metrics]\nlisten = \"everywhere\"\n");
        assert!(p.iter().any(|p| p.contains("metrics.listen")), "{p:?}");
        let p = problems("[metrics]\nlisten = \"127.0.0.1:9185\"\nport = 1\n");
        assert!(p.iter().any(|p| p.contains("port")), "{p:?}");
    }

    #[test]
    fn sftp_keys_and_ips() {
        let p = problems(
            "[tenant.acme]\nkeys = [\"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDYj0pQ8SVjqLgWd1n8WksB1A3L7aXgKL8Yf0n4tMD8vzp1x8N8g3gX6Dq0m2j3N3u2hN4cQ3m5wq8vJcQ0nJ5o3fQnq3d5y0m8q1L3kX0bq2c4V1J2wM9F6y8g0F7j3mKp4k0n1v9G1yX3a2x5N0c9R0Y8k3h2u4B5f0G6q7e8Q== x\"]\nallow_ips = [\"10.0.0.0/8\", \"nope\"]\n",
        );
        assert!(p.iter().any(|p| p.contains(":2: tenant.acme.keys:")), "{p:?}");
        assert!(
            p.iter().any(|p| p.contains(":3: tenant.acme.allow_ips: `nope`")),
            "{p:?}"
        );
        let c = parse(
            "[sftp]\nlisten = \"127.0.0.1:2222\"\n[tenant.acme]\nallow_ips = [\"192.0.2.7\", \"2001:db8::/32\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.sftp.unwrap().host_key,
            PathBuf::from("/var/lib/smsdrop/ssh_host_ed25519_key")
        );
        assert_eq!(c.tenants["acme"].sftp.allow_ips.len(), 2);
    }

    #[test]
    fn authorized_keys_files_add_keys_and_name_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("acme.keys");
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        std::fs::write(&file, format!("# the ERP\n\nrestrict,no-pty {ed} erp@host\n")).unwrap();
        let src = format!("[tenant.acme]\nauthorized_keys_file = \"{}\"\n", file.display());
        let c = Config::parse(&dir.path().join("c.toml"), &src).unwrap();
        assert_eq!(c.tenants["acme"].sftp.keys.len(), 1);

        std::fs::write(&file, format!("from=\"10.0.0.1\" {ed}\nssh-dss AAAA\n")).unwrap();
        let p = match Config::parse(&dir.path().join("c.toml"), &src) {
            Err(ConfigError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert!(p[0].contains(":2: tenant.acme.authorized_keys_file:"), "{p:?}");
        assert!(
            p[0].contains("acme.keys:1: key options from are not supported"),
            "{p:?}"
        );
        assert!(p[0].contains("acme.keys:2: not an OpenSSH public key"), "{p:?}");
    }

    #[test]
    fn email_table() {
        let c = parse(
            "[email]\nsmtp_url = \"smtp+starttls://mail.example.net\"\nfrom = \"smsdrop <noreply@example.net>\"\nadmin_to = [\"ops@example.net\"]\ndaily_report_at = \"07:30\"\n",
        )
        .unwrap();
        let e = c.email.unwrap();
        assert_eq!(
            (e.security, e.host.as_str(), e.port),
            (SmtpSecurity::StartTls, "mail.example.net", 587)
        );
        assert_eq!(e.admin_to.len(), 1);
        assert_eq!(e.min_interval, Duration::from_secs(900));
        let p = problems("[email]\nsmtp_url = \"smtp://u:pw@mail:25\"\nfrom = \"not an address\"\n");
        assert!(
            p.iter().any(|p| p.contains(":2: email.smtp_url: put the user")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.contains(":3: email.from")), "{p:?}");
    }

    #[test]
    fn shared_folders_are_refused() {
        let p = problems("[tenant.a]\ninbox = \"/srv/x\"\n[tenant.b]\ninbox = \"/srv/x\"\n");
        assert!(p.iter().any(|p| p.contains("also used by tenant `a`")), "{p:?}");
    }
}
