//! The mail queue and the digest state behind alerts: mail is stored (sealed) before it is sent
//! and removed only once the SMTP server took it or refused it for good.

use redb::{Durability, ReadableTable, TableDefinition, WriteTransaction};

use super::records::{DigestRecord, MailRecord};
use super::{META, Result, Store, encode, open_record};

/// mail id → sealed [`MailRecord`].
pub(super) const MAIL: TableDefinition<u64, &[u8]> = TableDefinition::new("mail");
/// keyed hash of kind ‖ 0 ‖ recipient → sealed [`DigestRecord`].
pub(super) const DIGESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mail_digests");

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(MAIL)?;
    tx.open_table(DIGESTS)?;
    Ok(())
}

impl Store {
    fn put_mail(&self, tx: &WriteTransaction, id: u64, mail: &MailRecord) -> Result<()> {
        let sealed = self.keys.system().seal("mail", &id.to_be_bytes(), &encode(mail));
        tx.open_table(MAIL)?.insert(id, sealed.as_slice())?;
        Ok(())
    }

    fn new_mail(&self, tx: &WriteTransaction, mail: &MailRecord) -> Result<u64> {
        let id = {
            let mut meta = tx.open_table(META)?;
            super::next_id(&mut meta, super::Mark::NextMail)?
        };
        self.put_mail(tx, id, mail)?;
        Ok(id)
    }

    /// Queues `mail` for its recipient, unless a mail of the same kind went to the same
    /// recipient less than `min_interval` ago: then `line` joins the next digest instead.
    /// Returns whether the mail was queued. Durable when it returns.
    pub fn raise_mail(
        &self,
        mail: &MailRecord,
        line: &str,
        now: i64,
        min_interval: i64,
        max_details: usize,
    ) -> Result<bool> {
        let keys = self.keys.system();
        let key = keys.lookup_hash(&format!("{}\0{}", mail.kind, mail.to));
        let tx = self.write(Durability::Immediate)?;
        let digest: Option<DigestRecord> = match tx.open_table(DIGESTS)?.get(key.as_slice())? {
            Some(v) => Some(open_record(&keys, "mail_digests", &key, v.value())?),
            None => None,
        };
        let mut digest = digest.unwrap_or(DigestRecord {
            kind: mail.kind.clone(),
            to: mail.to.clone(),
            last_sent: i64::MIN,
            pending: 0,
            since: now,
            details: Vec::new(),
        });
        let send_now = digest.pending == 0 && now.saturating_sub(digest.last_sent) >= min_interval;
        if send_now {
            self.new_mail(&tx, mail)?;
            digest.last_sent = now;
        } else {
            if digest.pending == 0 {
                digest.since = now;
            }
            digest.pending += 1;
            if digest.details.len() < max_details {
                digest.details.push(line.to_string());
            }
        }
        let sealed = keys.seal("mail_digests", &key, &encode(&digest));
        tx.open_table(DIGESTS)?.insert(key.as_slice(), sealed.as_slice())?;
        tx.commit()?;
        Ok(send_now)
    }

    /// Turns every digest whose `min_interval` has passed into one queued mail, made by `render`.
    /// Returns how many were queued.
    pub fn flush_digests(
        &self,
        now: i64,
        min_interval: i64,
        render: impl Fn(&DigestRecord) -> MailRecord,
    ) -> Result<usize> {
        let keys = self.keys.system();
        let tx = self.write(Durability::Immediate)?;
        let due: Vec<(Vec<u8>, DigestRecord)> = {
            let table = tx.open_table(DIGESTS)?;
            let mut due = Vec::new();
            for entry in table.iter()? {
                let (k, v) = entry?;
                let digest: DigestRecord = open_record(&keys, "mail_digests", k.value(), v.value())?;
                if digest.pending > 0 && now.saturating_sub(digest.last_sent) >= min_interval {
                    due.push((k.value().to_vec(), digest));
                }
            }
            due
        };
        for (key, mut digest) in due.iter().cloned() {
            self.new_mail(&tx, &render(&digest))?;
            digest.last_sent = now;
            digest.pending = 0;
            digest.details.clear();
            let sealed = keys.seal("mail_digests", &key, &encode(&digest));
            tx.open_table(DIGESTS)?.insert(key.as_slice(), sealed.as_slice())?;
        }
        tx.commit()?;
        Ok(due.len())
    }

    /// Mails whose time has come, oldest first.
    pub fn due_mails(&self, now: i64, limit: usize) -> Result<Vec<(u64, MailRecord)>> {
        let keys = self.keys.system();
        let tx = self.db.begin_read()?;
        let table = tx.open_table(MAIL)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let id = k.value();
            let mail: MailRecord = open_record(&keys, "mail", &id.to_be_bytes(), v.value())?;
            if mail.next_at <= now {
                out.push((id, mail));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Mails still waiting.
    pub fn pending_mails(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        Ok(redb::ReadableTableMetadata::len(&tx.open_table(MAIL)?)?)
    }

    /// Alerts held for a digest (not yet turned into a mail), over every kind and recipient.
    pub fn digest_lines(&self) -> Result<u64> {
        let keys = self.keys.system();
        let tx = self.db.begin_read()?;
        let mut lines = 0u64;
        for entry in tx.open_table(DIGESTS)?.iter()? {
            let (k, v) = entry?;
            let digest: DigestRecord = open_record(&keys, "mail_digests", k.value(), v.value())?;
            lines = lines.saturating_add(digest.pending);
        }
        Ok(lines)
    }

    /// A mail is done (sent, or refused for good): it leaves the queue.
    pub fn mail_done(&self, id: u64) -> Result<()> {
        let tx = self.write(Durability::Immediate)?;
        tx.open_table(MAIL)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    /// A mail to try again later.
    pub fn mail_retry(&self, id: u64, mail: &MailRecord) -> Result<()> {
        let tx = self.write(Durability::Immediate)?;
        self.put_mail(&tx, id, mail)?;
        tx.commit()?;
        Ok(())
    }
}
