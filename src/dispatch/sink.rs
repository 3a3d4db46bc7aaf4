//! The `sink` partner: writes what it would send as JSON lines and marks it delivered.
//!
//! For demos, tests and dry runs of a whole installation. Its file holds numbers and texts in
//! clear by design: keep it outside `state_dir` and treat it as sensitive.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::partner::{Outbound, Partner, PartnerError, SubmitFuture, Submitted};

pub struct SinkPartner {
    id: String,
    path: PathBuf,
    file: Arc<Mutex<Option<File>>>,
}

#[derive(Serialize)]
struct SinkLine<'a> {
    message_id: String,
    tenant: &'a str,
    batch: u64,
    to: &'a str,
    from: &'a str,
    text: &'a str,
    parts: u8,
    encoding: &'a str,
}

impl SinkPartner {
    pub fn new(id: &str, path: &Path) -> SinkPartner {
        SinkPartner {
            id: id.to_string(),
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(None)),
        }
    }
}

impl Partner for SinkPartner {
    fn id(&self) -> &str {
        &self.id
    }

    fn window(&self) -> usize {
        1024
    }

    fn batch_size(&self) -> usize {
        1024
    }

    fn submit<'a>(&'a self, messages: &'a [Outbound<'a>]) -> SubmitFuture<'a> {
        let mut lines = Vec::with_capacity(messages.len() * 200);
        for m in messages {
            let line = SinkLine {
                message_id: m.id.to_string(),
                tenant: m.tenant,
                batch: m.batch,
                to: &m.message.phone,
                from: &m.message.sender,
                text: &m.message.text,
                parts: m.message.parts,
                encoding: m.message.coding.as_str(),
            };
            if serde_json::to_writer(&mut lines, &line).is_ok() {
                lines.push(b'\n');
            }
        }
        let ids: Vec<String> = messages.iter().map(|m| format!("sink-{}", m.id)).collect();
        let file = self.file.clone();
        let path = self.path.clone();
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut guard = file.lock().map_err(|_| std::io::Error::other("sink lock poisoned"))?;
                if guard.is_none() {
                    *guard = Some(OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?);
                }
                let f = guard
                    .as_mut()
                    .ok_or_else(|| std::io::Error::other("sink file not open"))?;
                f.write_all(&lines)?;
                f.sync_data()
            })
            .await;
            match written {
                Ok(Ok(())) => ids
                    .into_iter()
                    .map(|partner_id| Ok(Submitted::Delivered { partner_id }))
                    .collect(),
                Ok(Err(e)) => {
                    let detail = format!("sink file: {e}");
                    ids.iter()
                        .map(|_| Err(PartnerError::Transient { detail: detail.clone() }))
                        .collect()
                }
                Err(e) => {
                    let detail = format!("sink task: {e}");
                    ids.iter()
                        .map(|_| Err(PartnerError::Transient { detail: detail.clone() }))
                        .collect()
                }
            }
        })
    }
}
