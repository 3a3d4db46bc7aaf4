//! The SMPP 3.4 partner (docs/partners.md), on rusmppc.
//!
//! Each of `binds` connections is kept by its own task: connect (TCP or TLS), bind, answer
//! `enquire_link`, hand incoming `deliver_sm` to the receipt writer and acknowledge them only
//! once they are durable, answer an `unbind` from the SMSC with `unbind_resp` and end the
//! session (SMPP 3.4 §4.2), reconnect with back-off (1 s doubling to 60 s; it starts over only
//! after a session that stayed up a minute, so an SMSC that accepts the bind and then breaks the
//! session is not hammered), `unbind` at shutdown. A `generic_nack` answering a `submit_sm` is
//! the session's fault (§4.3: the SMSC could not read our PDU), not the message's: the message
//! is retried, the failure counts against the partner's health, and the session is restarted.
//! `submit` spreads messages over the bound connections with at most `window` `submit_sm`
//! outstanding and at most `tps` sent per second; `ESME_RTHROTTLED` pauses sending for a second.
//! Long messages go as concatenated parts with an 8-bit-reference UDH, or with the SAR TLVs.

use std::str::FromStr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use rusmpp::pdus::{BindReceiver, BindTransceiver, BindTransmitter, DeliverSmResp, SubmitSm};
use rusmpp::tlvs::{MessageSubmissionRequestTlvValue, TlvValue};
use rusmpp::types::{COctetString, EmptyOrFullCOctetString, OctetString};
use rusmpp::values::{DataCoding, EsmClass, InterfaceVersion, Npi, RegisteredDelivery, ServiceType, Ton};
use rusmpp::{CommandStatus, Pdu};
use rusmppc::{Client, ConnectionBuilder, Event};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::health::Meter;
use super::partner::{Inbound, Incoming, Outbound, Pacer, Partner, PartnerError, SubmitFuture, Submitted};
use crate::config;
use crate::sms::gsm::segment_payloads;
use crate::sms::message::TextCoding;
use crate::sms::mo::{Mo, decode_text, strip_udh};
use crate::sms::receipt;

pub struct SmppPartner {
    id: String,
    cfg: config::Smpp,
    window: Arc<Semaphore>,
    /// Transmitting clients, one slot per bind; `None` while (re)connecting.
    clients: Arc<RwLock<Vec<Option<Client>>>>,
    bound: Arc<Notify>,
    next: AtomicUsize,
    /// The `tps` cap, and a second's pause after `ESME_RTHROTTLED`.
    pacer: Pacer,
    reference: AtomicU16,
    incoming: mpsc::UnboundedSender<Inbound>,
    meter: Meter,
}

/// What a connection binds as.
#[derive(Debug, Clone, Copy)]
enum Role {
    Transceiver,
    Transmitter,
    Receiver,
}

/// Whether an error `command_status` is worth trying again later.
pub fn is_transient(status: CommandStatus) -> bool {
    matches!(
        status,
        CommandStatus::EsmeRthrottled
            | CommandStatus::EsmeRmsgqful
            | CommandStatus::EsmeRsyserr
            | CommandStatus::EsmeRxTAppn
            | CommandStatus::EsmeRinvbndsts
            | CommandStatus::EsmeRbindfail
    )
}

/// Source address TON/NPI: alphanumeric senders, short codes, international numbers.
fn source_address(sender: &str) -> (Ton, Npi, String) {
    if let Some(digits) = sender.strip_prefix('+') {
        (Ton::International, Npi::Isdn, digits.to_string())
    } else if sender.chars().all(|c| c.is_ascii_digit()) && sender.len() <= 8 {
        (Ton::NetworkSpecific, Npi::Unknown, sender.to_string())
    } else if sender.chars().all(|c| c.is_ascii_digit()) {
        (Ton::International, Npi::Isdn, sender.to_string())
    } else {
        (Ton::Alphanumeric, Npi::Unknown, sender.to_string())
    }
}

fn c_octet<const MIN: usize, const MAX: usize>(s: &str) -> Result<COctetString<MIN, MAX>, PartnerError> {
    COctetString::from_str(s).map_err(|e| PartnerError::Permanent {
        detail: format!("field does not fit SMPP: {e}"),
    })
}

impl SmppPartner {
    pub fn new(id: &str, cfg: config::Smpp, incoming: mpsc::UnboundedSender<Inbound>) -> Arc<SmppPartner> {
        let mut seed = [0u8; 2];
        let _ = getrandom::fill(&mut seed);
        Arc::new(SmppPartner {
            id: id.to_string(),
            window: Arc::new(Semaphore::new(cfg.window)),
            clients: Arc::new(RwLock::new(vec![None; cfg.binds])),
            bound: Arc::new(Notify::new()),
            next: AtomicUsize::new(0),
            pacer: Pacer::new(cfg.tps),
            reference: AtomicU16::new(u16::from_be_bytes(seed)),
            incoming,
            meter: Meter::of(id),
            cfg,
        })
    }

    /// Starts the connection tasks on `lane` (the dispatcher's thread, where the submissions
    /// run); they end at `shutdown`, after an `unbind`.
    pub fn start(
        self: &Arc<Self>,
        tracker: &tokio_util::task::TaskTracker,
        lane: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) {
        for slot in 0..self.cfg.binds {
            let me = self.clone();
            tracker.spawn_on(me.keep_bound(slot, shutdown.clone()), lane);
        }
    }

    fn password(&self) -> Result<String, String> {
        match &self.cfg.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| format!("password_file {}: {e}", path.display())),
            None => Ok(String::new()),
        }
    }

    /// Connects and binds: as a transceiver, or as the transmitter or the receiver of a pair.
    async fn connect(&self, role: Role) -> Result<(Client, impl futures_util::Stream<Item = Event> + Unpin), String> {
        let scheme = if self.cfg.tls { "ssmpp" } else { "smpp" };
        let (client, events) = ConnectionBuilder::new()
            .max_command_length(4096)
            .enquire_link_interval(self.cfg.enquire_link)
            .enquire_link_response_timeout(Duration::from_secs(10))
            .enable_auto_enquire_link_response()
            .response_timeout(self.cfg.response_timeout)
            .disable_interface_version_check()
            .connect(format!("{scheme}://{}", self.cfg.address))
            .await
            .map_err(|e| e.to_string())?;
        let password = self.password()?;
        let system_id = c_octet::<1, 16>(&self.cfg.system_id).map_err(|e| e.to_string())?;
        let password = c_octet::<1, 9>(&password).map_err(|e| e.to_string())?;
        let system_type = c_octet::<1, 13>(&self.cfg.system_type).map_err(|e| e.to_string())?;
        let v = InterfaceVersion::Smpp3_4;
        let bound = match role {
            Role::Transceiver => client
                .bind_transceiver(
                    BindTransceiver::builder()
                        .system_id(system_id)
                        .password(password)
                        .system_type(system_type)
                        .interface_version(v)
                        .build(),
                )
                .await
                .map(|_| ()),
            Role::Transmitter => client
                .bind_transmitter(
                    BindTransmitter::builder()
                        .system_id(system_id)
                        .password(password)
                        .system_type(system_type)
                        .interface_version(v)
                        .build(),
                )
                .await
                .map(|_| ()),
            Role::Receiver => client
                .bind_receiver(
                    BindReceiver::builder()
                        .system_id(system_id)
                        .password(password)
                        .system_type(system_type)
                        .interface_version(v)
                        .build(),
                )
                .await
                .map(|_| ()),
        };
        bound.map_err(|e| format!("bind refused: {e}"))?;
        Ok((client, events))
    }

    async fn keep_bound(self: Arc<Self>, slot: usize, shutdown: CancellationToken) {
        /// A session that lasted this long was a good one: the back-off starts over.
        const STABLE: Duration = Duration::from_secs(60);
        let mut backoff = Duration::from_secs(1);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.connect(if self.cfg.bind_pair { Role::Transmitter } else { Role::Transceiver }) => c,
            };
            match connected {
                Ok((client, events)) => {
                    let bound_at = tokio::time::Instant::now();
                    tracing::info!(partner = %self.id, bind = slot, address = %self.cfg.address, "SMPP bound");
                    if let Ok(mut clients) = self.clients.write() {
                        clients[slot] = Some(client.clone());
                    }
                    self.bound.notify_waiters();
                    let receiver = if self.cfg.bind_pair {
                        match self.connect(Role::Receiver).await {
                            Ok((rx, rx_events)) => Some((rx, rx_events)),
                            Err(e) => {
                                tracing::warn!(partner = %self.id, error = %e, "SMPP receiver bind failed; receipts wait for the next try");
                                None
                            }
                        }
                    } else {
                        None
                    };
                    let stop = shutdown.clone();
                    match receiver {
                        Some((rx, rx_events)) => {
                            let a = self.serve_events(&client, events, stop.clone());
                            let b = self.serve_events(&rx, rx_events, stop);
                            tokio::select! { _ = a => {}, _ = b => {} }
                            Self::close(&rx, shutdown.is_cancelled()).await;
                        }
                        None => self.serve_events(&client, events, stop).await,
                    }
                    if let Ok(mut clients) = self.clients.write() {
                        clients[slot] = None;
                    }
                    Self::close(&client, shutdown.is_cancelled()).await;
                    if shutdown.is_cancelled() {
                        tracing::info!(partner = %self.id, bind = slot, "SMPP unbound");
                        return;
                    }
                    if bound_at.elapsed() >= STABLE {
                        backoff = Duration::from_secs(1);
                    }
                    tracing::warn!(partner = %self.id, bind = slot, retry_s = backoff.as_secs(), "SMPP connection lost; reconnecting");
                }
                Err(e) => {
                    tracing::warn!(partner = %self.id, bind = slot, address = %self.cfg.address, error = %e, retry_s = backoff.as_secs(), "SMPP connect failed");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }

    async fn close(client: &Client, unbind: bool) {
        if unbind {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.unbind()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
    }

    /// Answers what the SMSC sends until the connection ends or `stop`.
    async fn serve_events(
        &self,
        client: &Client,
        mut events: impl futures_util::Stream<Item = Event> + Unpin,
        stop: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = events.next() => e,
            };
            match event {
                None => return,
                Some(Event::Error(e)) => {
                    tracing::debug!(partner = %self.id, error = %e, "SMPP connection event");
                    if client.is_closed() {
                        return;
                    }
                }
                Some(Event::Incoming(command)) => {
                    let seq = command.sequence_number();
                    match command.pdu() {
                        Some(Pdu::DeliverSm(deliver)) => self.deliver(client, seq, deliver),
                        Some(Pdu::Unbind) => {
                            // SMPP 3.4 §4.2: answer, then the session is over.
                            tracing::warn!(partner = %self.id, "the SMSC unbound the session; answered, reconnecting");
                            let _ = tokio::time::timeout(Duration::from_secs(5), client.unbind_resp(seq)).await;
                            return;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// A `deliver_sm` (SMPP 3.4 §4.6.1): a receipt or an incoming message is made durable, then
    /// acknowledged. One that cannot be read is answered with a temporary error, so the SMSC
    /// keeps it rather than losing it.
    fn deliver(&self, client: &Client, seq: u32, deliver: &rusmpp::pdus::DeliverSm) {
        let esm = u8::from(deliver.esm_class);
        let mut tlv_id = None;
        let mut tlv_state = None;
        let mut tlv_error = None;
        let mut payload = None;
        for tlv in deliver.tlvs() {
            match tlv.value() {
                Some(TlvValue::ReceiptedMessageId(id)) => tlv_id = Some(id.to_string()),
                Some(TlvValue::MessageState(state)) => tlv_state = Some(u8::from(*state)),
                Some(TlvValue::NetworkErrorCode(code)) => tlv_error = Some(format!("{:03}", code.error_code)),
                Some(TlvValue::MessagePayload(p)) => payload = Some(p.value.as_ref().to_vec()),
                _ => {}
            }
        }
        let short = deliver.short_message().as_ref();
        let bytes = payload.as_deref().filter(|_| short.is_empty()).unwrap_or(short);
        let is_receipt = esm & 0x3c == 0x04 || esm & 0x3c == 0x08;
        let what = if is_receipt {
            let text = String::from_utf8_lossy(bytes);
            receipt::parse(&text, tlv_id.as_deref(), tlv_state, tlv_error.as_deref()).map(Incoming::Receipt)
        } else {
            let body = if esm & 0x40 != 0 { strip_udh(bytes).0 } else { bytes };
            let source = deliver.source_addr.to_string();
            let international = matches!(deliver.source_addr_ton, Ton::International) && !source.starts_with('+');
            (!source.is_empty()).then(|| {
                Incoming::Message(Mo {
                    from: if international { format!("+{source}") } else { source },
                    to: deliver.destination_addr.to_string(),
                    text: decode_text(u8::from(deliver.data_coding), body),
                    received_at: crate::clock::now_ms(),
                })
            })
        };
        let client = client.clone();
        let Some(what) = what else {
            // A receipt without an id, a message without a sender: sending it again would not
            // make it readable, so it is acknowledged (a temporary error would have the SMSC
            // send it forever), counted and logged (at most once a minute).
            static UNREADABLE: crate::limits::Throttle = crate::limits::Throttle::new(Duration::from_secs(60));
            if let Some(held) = UNREADABLE.allow(&self.id) {
                tracing::warn!(partner = %self.id, receipt = is_receipt, held_back = held, "incoming deliver_sm not readable (no id or no sender); acknowledged and dropped");
            }
            crate::metrics::events().deliver_unreadable(&self.id);
            tokio::spawn(async move {
                let _ = client.deliver_sm_resp(seq, DeliverSmResp::default()).await;
            });
            return;
        };
        let (ack, durable) = oneshot::channel();
        let _ = self.incoming.send(Inbound {
            partner: self.id.clone(),
            what,
            ack,
        });
        tokio::spawn(async move {
            let status = match durable.await {
                Ok(true) => CommandStatus::EsmeRok,
                _ => CommandStatus::EsmeRxTAppn,
            };
            let _ = client
                .status(status)
                .deliver_sm_resp(seq, DeliverSmResp::default())
                .await;
        });
    }

    /// A bound client, waiting up to `response_timeout` for one.
    async fn client(&self) -> Option<Client> {
        let deadline = tokio::time::Instant::now() + self.cfg.response_timeout;
        loop {
            let wait = self.bound.notified();
            if let Ok(clients) = self.clients.read() {
                let live: Vec<&Client> = clients.iter().flatten().filter(|c| c.is_active()).collect();
                if !live.is_empty() {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
                    return Some(live[i].clone());
                }
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                return None;
            }
        }
    }

    fn submit_sm(
        &self,
        m: &Outbound<'_>,
        part: &[u8],
        udh: Option<[u8; 6]>,
        sar: Option<(u16, u8, u8)>,
    ) -> Result<SubmitSm, PartnerError> {
        let (ton, npi, source) = source_address(&m.message.sender);
        let to = m.message.phone.trim_start_matches('+');
        let mut payload = Vec::with_capacity(part.len() + 6);
        let mut esm = 0u8;
        if let Some(h) = udh {
            payload.extend_from_slice(&h);
            esm |= 0x40;
        }
        payload.extend_from_slice(part);
        let data_coding = match m.message.coding {
            TextCoding::Gsm7 => DataCoding::McSpecific,
            TextCoding::Ucs2 => DataCoding::Ucs2,
        };
        let validity = jiff::Timestamp::from_second(m.valid_until)
            .map(|t| t.strftime("%y%m%d%H%M%S000+").to_string())
            .unwrap_or_default();
        let mut tlvs = Vec::new();
        if let Some((reference, total, seq)) = sar {
            tlvs.push(MessageSubmissionRequestTlvValue::SarMsgRefNum(reference));
            tlvs.push(MessageSubmissionRequestTlvValue::SarTotalSegments(total));
            tlvs.push(MessageSubmissionRequestTlvValue::SarSegmentSeqnum(seq));
        }
        Ok(SubmitSm::builder()
            .service_type(ServiceType::default())
            .source_addr_ton(ton)
            .source_addr_npi(npi)
            .source_addr(c_octet(&source)?)
            .dest_addr_ton(Ton::International)
            .dest_addr_npi(Npi::Isdn)
            .destination_addr(c_octet(to)?)
            .esm_class(EsmClass::from(esm))
            .validity_period(EmptyOrFullCOctetString::from_str(&validity).unwrap_or_default())
            .registered_delivery(RegisteredDelivery::from(u8::from(self.cfg.registered_delivery)))
            .data_coding(data_coding)
            .short_message(
                OctetString::from_vec(payload).map_err(|e| PartnerError::Permanent { detail: e.to_string() })?,
            )
            .tlvs(tlvs)
            .build())
    }

    /// Sends one message, part by part. The ids of its parts, space-separated.
    async fn send(&self, m: &Outbound<'_>) -> Result<Submitted, PartnerError> {
        let parts = segment_payloads(&m.message.text, m.message.coding);
        let total = parts.len().min(255) as u8;
        let reference = self.reference.fetch_add(1, Ordering::Relaxed);
        let mut ids = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seq = i as u8 + 1;
            let (udh, sar) = match (total > 1, self.cfg.sar) {
                (false, _) => (None, None),
                (true, false) => (Some([0x05, 0x00, 0x03, reference as u8, total, seq]), None),
                (true, true) => (None, Some((reference, total, seq))),
            };
            let pdu = self.submit_sm(m, part, udh, sar)?;
            let _permit = self.window.acquire().await.map_err(|_| PartnerError::Transient {
                detail: "partner stopped".into(),
            })?;
            self.pacer.wait().await;
            let Some(client) = self.client().await else {
                self.meter.record(self.cfg.response_timeout, false);
                return Err(PartnerError::Transient {
                    detail: "no SMPP bind up".into(),
                });
            };
            let sent = tokio::time::Instant::now();
            let answer = client.submit_sm(pdu).await;
            let latency = sent.elapsed();
            match answer {
                Ok(resp) => {
                    self.meter.record(latency, true);
                    ids.push(resp.message_id().to_string());
                }
                Err(rusmppc::error::Error::UnexpectedResponse { response })
                    if response.id() == rusmpp::CommandId::GenericNack =>
                {
                    // The SMSC could not read the PDU: the session's fault, not the message's.
                    self.meter.record(latency, false);
                    static NACKS: crate::limits::Throttle = crate::limits::Throttle::new(Duration::from_secs(60));
                    if let Some(held) = NACKS.allow(&self.id) {
                        tracing::warn!(partner = %self.id, status = ?response.status(), held_back = held, "generic_nack to a submit_sm; restarting the session");
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
                    return Err(PartnerError::Transient {
                        detail: format!(
                            "generic_nack {:?}: the SMSC could not read the submit_sm",
                            response.status()
                        ),
                    });
                }
                Err(rusmppc::error::Error::UnexpectedResponse { response }) => {
                    let status = response.status();
                    let detail = format!("{status:?} (0x{:08x})", u32::from(status));
                    if status == CommandStatus::EsmeRthrottled {
                        // asked to slow down: not a sign of ill health
                        self.pacer.pause(Duration::from_secs(1));
                    } else {
                        self.meter.record(latency, !is_transient(status));
                    }
                    return Err(if is_transient(status) {
                        PartnerError::Transient { detail }
                    } else {
                        PartnerError::Permanent { detail }
                    });
                }
                Err(e) => {
                    self.meter.record(latency, false);
                    return Err(PartnerError::Transient { detail: e.to_string() });
                }
            }
        }
        Ok(Submitted::Accepted {
            partner_id: ids.join(" "),
        })
    }
}

impl Partner for SmppPartner {
    fn id(&self) -> &str {
        &self.id
    }

    fn window(&self) -> usize {
        self.cfg.window
    }

    fn meter(&self) -> Option<&Meter> {
        Some(&self.meter)
    }

    fn is_connected(&self) -> bool {
        self.clients
            .read()
            .map(|c| c.iter().flatten().any(|c| c.is_active()))
            .unwrap_or(false)
    }

    fn submit<'a>(&'a self, messages: &'a [Outbound<'a>]) -> SubmitFuture<'a> {
        Box::pin(async move { futures_util::future::join_all(messages.iter().map(|m| self.send(m))).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses() {
        assert_eq!(source_address("ACME").0, Ton::Alphanumeric);
        assert_eq!(source_address("+33612345678").2, "33612345678");
        assert_eq!(source_address("36180").0, Ton::NetworkSpecific);
    }

    #[test]
    fn throttling_is_transient_a_bad_number_is_not() {
        assert!(is_transient(CommandStatus::EsmeRthrottled));
        assert!(is_transient(CommandStatus::EsmeRmsgqful));
        assert!(!is_transient(CommandStatus::EsmeRinvdstadr));
        assert!(!is_transient(CommandStatus::EsmeRsubmitfail));
    }
}
