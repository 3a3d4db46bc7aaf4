//! Sends the mail queue with lettre (docs/configuration.md, `[email]`).
//!
//! Every send is bounded by `timeout` as a whole (lettre's own timeout covers connecting only, and
//! a server that accepts and then says nothing would hang it). A 4xx answer, a refused
//! connection, a time-out or a TLS failure leave the mail queued, retried with growing delays; a
//! permanent 5xx drops it with a log line. Mail already queued survives restarts.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::Notify;

use super::Alerter;
use crate::config::{Email, SmtpSecurity};
use crate::store::records::MailRecord;
use crate::store::{Store, StoreError};

/// First retry delay; it doubles up to [`MAX_RETRY_SECS`].
const FIRST_RETRY_SECS: i64 = 5;
const MAX_RETRY_SECS: i64 = 15 * 60;

/// The wait before the next try of a mail that failed `attempts` times: 5 s after the first
/// failure, doubling, at most 15 minutes.
fn retry_delay(attempts: u32) -> i64 {
    (FIRST_RETRY_SECS << attempts.saturating_sub(1).min(10)).min(MAX_RETRY_SECS)
}

/// Why the mailer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    #[error("{}: {cause}", path.display())]
    Secret { path: PathBuf, cause: std::io::Error },
    #[error("{}: the SMTP password file is readable by group or others; run `chmod 600 {}`", path.display(), path.display())]
    SecretPermissions { path: PathBuf },
    #[error("email.ca_file {}: {detail}", path.display())]
    Ca { path: PathBuf, detail: String },
    #[error("no [email] table in the configuration")]
    NoEmail,
    #[error("SMTP transport: {0}")]
    Transport(lettre::transport::smtp::Error),
}

impl From<lettre::transport::smtp::Error> for MailerError {
    fn from(e: lettre::transport::smtp::Error) -> Self {
        MailerError::Transport(e)
    }
}

/// What became of one attempt.
enum Sent {
    Done,
    Retry(String),
    Refused(String),
}

pub struct Mailer {
    store: Store,
    email: Email,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    alerter: Alerter,
    wake: Arc<Notify>,
}

fn read_secret(path: &std::path::Path) -> Result<String, MailerError> {
    let meta = std::fs::metadata(path).map_err(|source| MailerError::Secret {
        path: path.to_path_buf(),
        cause: source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(MailerError::SecretPermissions {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| MailerError::Secret {
        path: path.to_path_buf(),
        cause: source,
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

impl Mailer {
    pub fn new(
        store: Store,
        config: crate::config::Live,
        alerter: Alerter,
        wake: Arc<Notify>,
    ) -> Result<Mailer, MailerError> {
        let Some(email) = config.get().email.clone() else {
            return Err(MailerError::NoEmail);
        };
        let tls = || -> Result<TlsParameters, MailerError> {
            let mut builder = TlsParameters::builder(email.host.clone());
            if let Some(path) = &email.ca_file {
                let pem = std::fs::read(path).map_err(|e| MailerError::Ca {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                let cert = Certificate::from_pem(&pem).map_err(|e| MailerError::Ca {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                builder = builder.add_root_certificate(cert);
            }
            Ok(builder.build_rustls()?)
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(email.host.clone())
            .port(email.port)
            .timeout(Some(email.timeout));
        builder = match email.security {
            SmtpSecurity::Plain => builder.tls(Tls::None),
            SmtpSecurity::StartTls => builder.tls(Tls::Required(tls()?)),
            SmtpSecurity::Tls => builder.tls(Tls::Wrapper(tls()?)),
        };
        if let Some(user) = &email.user {
            let password = match &email.password_file {
                Some(path) => read_secret(path)?,
                None => std::env::var("CREDENTIALS_DIRECTORY")
                    .ok()
                    .map(|dir| read_secret(&PathBuf::from(dir).join("smtp-password")))
                    .transpose()?
                    .unwrap_or_default(),
            };
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Mailer {
            store,
            email,
            transport: builder.build(),
            alerter,
            wake,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.store.blocking(f).await
    }

    /// Mails queued before the last stop (logged once at start).
    pub async fn pending(&self) -> u64 {
        self.blocking(|s| s.pending_mails()).await.unwrap_or(0)
    }

    /// What wakes the mailer when an alert is queued.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Digests whose time has come, then every due mail; a send is bounded by the timeout.
    pub async fn round(&self) -> Result<(), StoreError> {
        let now = crate::clock::now();
        let min_interval = self.email.min_interval.as_secs() as i64;
        let alerter = self.alerter.clone();
        self.blocking(move |s| s.flush_digests(now, min_interval, |d| alerter.render_digest(d, now)))
            .await?;
        let due = self.blocking(move |s| s.due_mails(now, 50)).await?;
        for (id, mut mail) in due {
            match self.send(&mail).await {
                Sent::Done => {
                    tracing::info!(kind = %mail.kind, mail = id, "mail sent");
                    crate::metrics::events().mail("sent");
                    self.blocking(move |s| s.mail_done(id)).await?;
                }
                Sent::Refused(why) => {
                    tracing::error!(kind = %mail.kind, mail = id, "mail refused for good and dropped: {why}");
                    crate::metrics::events().mail("failed");
                    self.blocking(move |s| s.mail_done(id)).await?;
                }
                Sent::Retry(why) => {
                    mail.attempts += 1;
                    let delay = retry_delay(mail.attempts);
                    mail.next_at = crate::clock::now() + delay;
                    tracing::warn!(kind = %mail.kind, mail = id, attempts = mail.attempts, retry_in_s = delay, "mail not sent, will retry: {why}");
                    self.blocking(move |s| s.mail_retry(id, &mail)).await?;
                }
            }
        }
        Ok(())
    }

    async fn send(&self, mail: &MailRecord) -> Sent {
        let to = match mail.to.parse() {
            Ok(to) => to,
            Err(e) => return Sent::Refused(format!("bad recipient: {e}")),
        };
        let message = match Message::builder()
            .from(self.email.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())
        {
            Ok(m) => m,
            Err(e) => return Sent::Refused(format!("cannot build the mail: {e}")),
        };
        match tokio::time::timeout(self.email.timeout, self.transport.send(message)).await {
            Ok(Ok(_)) => Sent::Done,
            Ok(Err(e)) if e.is_permanent() => Sent::Refused(e.to_string()),
            Ok(Err(e)) => Sent::Retry(e.to_string()),
            Err(_) => Sent::Retry(format!(
                "no answer within {}",
                humantime::format_duration(self.email.timeout)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_retry_comes_after_five_seconds_then_doubles_to_fifteen_minutes() {
        let delays: Vec<i64> = (1..=10).map(retry_delay).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 900, 900]);
    }
}
