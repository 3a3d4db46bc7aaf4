// A loopback SMSC for the tests and the benchmark, on the npm `smpp` package (SMPP 3.4).
//
// usage: node smsc.js PORT LOGFILE   (PORT 0: any free port, named by the "listening" event)
//
// Writes one JSON line per event to LOGFILE: {"ev":"bind",...}, {"ev":"submit","id","to","from",
// "text","dc","esm","udh"?,"registered"}, {"ev":"message","to","text","parts"} once every part of
// a concatenated message arrived, {"ev":"receipt_ack",...}, {"ev":"mo_ack",...}, {"ev":"unbind"}.
//
// Behaviour by environment:
//   SMSC_SYSTEM_ID, SMSC_PASSWORD  credentials it accepts (default smsdrop / secret)
//   SMSC_ID_FORMAT                 hex (default) or decimal: message_id in submit_sm_resp
//   SMSC_RECEIPT_ID_FORMAT         same | decimal | hex-upper-zeros: the id as the receipt writes it
//   SMSC_RECEIPT_TLVS              1 (default): receipted_message_id + message_state TLVs as well
//   SMSC_THROTTLE_TPS              above this rate per second, answer ESME_RTHROTTLED
//   SMSC_DELAY_MS                  answer every submit_sm this late (a slow SMSC)
//   SMSC_DROP_AFTER                close the TCP connection (once) after this many submit_sm,
//                                  without answering the last ones
//   SMSC_RECEIPT_DELAY_MS          receipts this long after the response (default 5)
//   SMSC_TLS_CERT, SMSC_TLS_KEY    PEM files: listen with TLS (ssmpp) instead of plain TCP
//   SMSC_QUIET                     1: log no submit, receipt or message line, only
//                                  {"ev":"tick","n","t"} every SMSC_TICK (1000) submit_sm
//                                  (for the benchmark: the log costs the SMSC time)
// Behaviour by destination number (its last four digits):
//   ...0401  ESME_RSUBMITFAIL (0x45)         ...0402  receipt UNDELIV
//   ...0403  receipt EXPIRED                 ...0404  ESME_RINVDSTADR (0x0B)
//   ...0405  the receipt comes before the submit_sm_resp
//   ...0406  no receipt at all
// Receipts not acknowledged when a session ends are sent again after the next bind (as real
// SMSCs do), logged as {"ev":"redeliver","receipts":n}. Receipts and incoming messages go to a
// receiver or transceiver bind: those of a message submitted on a transmitter bind go to a
// receiver bind of the same system_id. Long messages are reassembled from their UDH or from the
// SAR TLVs (sar_msg_ref_num, sar_total_segments, sar_segment_seqnum); a submit logs "sar" when
// it carried them.
// Control on stdin, one JSON object per line:
//   {"mo": {"from": "+33612345678", "to": "ACME", "text": "STOP"}}   an incoming message
//   {"delay_ms": 3000}                                               answer submit_sm this late
//                                                                    from now on (0: at once)
// Hostile controls (for the tests of a misbehaving partner):
//   {"receipt": {"id": "5430", "stat": "DELIVRD", "tlv": true}}      a receipt for an id this
//                                                                    SMSC never gave ("" for a
//                                                                    receipt without an id)
//   {"flood": {"n": 5000, "from": 900000}}                           n such receipts, ids from..
//   {"next_id": 5430}                                                the next message_id number
//   {"nack": true}                                                   answer every submit_sm with
//                                                                    generic_nack (false: stop)
//   {"unbind": true}                                                 send unbind on every session
//   {"break_after_bind_ms": 200}                                     close every session this long
//                                                                    after its bind (0: stop)
"use strict";

const fs = require("fs");
const readline = require("readline");
const smpp = require("smpp");

const port = Number(process.argv[2]);
const log = fs.openSync(process.argv[3], "a");
const env = process.env;
const systemId = env.SMSC_SYSTEM_ID || "smsdrop";
const password = env.SMSC_PASSWORD || "secret";
const idFormat = env.SMSC_ID_FORMAT || "hex";
const receiptIdFormat = env.SMSC_RECEIPT_ID_FORMAT || "same";
const receiptTlvs = (env.SMSC_RECEIPT_TLVS || "1") === "1";
const throttleTps = Number(env.SMSC_THROTTLE_TPS || 0);
let delayMs = Number(env.SMSC_DELAY_MS || 0);
let dropAfter = Number(env.SMSC_DROP_AFTER || 0);
const receiptDelay = Number(env.SMSC_RECEIPT_DELAY_MS || 5);
const quiet = env.SMSC_QUIET === "1";
const tick = Number(env.SMSC_TICK || 1000);

function write(obj) {
  if (quiet && obj.ev !== "tick" && obj.ev !== "listening" && obj.ev !== "bind" && obj.ev !== "drop") return;
  fs.writeSync(log, JSON.stringify(obj) + "\n");
}

let nextId = 1000;
let nack = false;
let breakAfterBind = 0;
let submits = 0;
let second = 0;
let inSecond = 0;
const sessions = new Set();
const partsSeen = new Map(); // ref -> {total, parts: []}

function idText(n) {
  return idFormat === "decimal" ? String(n) : n.toString(16);
}

function receiptId(n) {
  switch (receiptIdFormat) {
    case "decimal":
      return String(n);
    case "hex-upper-zeros":
      return n.toString(16).toUpperCase().padStart(10, "0");
    default:
      return idText(n);
  }
}

function smscTime(d) {
  const p = (x) => String(x).padStart(2, "0");
  return `${p(d.getUTCFullYear() % 100)}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${p(d.getUTCMinutes())}`;
}

// Receipts sent and not yet acknowledged, by session; like a real SMSC, those of a session that
// ends are sent again on the next bind.
const unacked = new Map(); // session -> Map(rid -> fields)
let redeliver = [];

// Where deliver_sm for what `session` submitted go: itself, unless it is a transmitter.
function receiverFor(session) {
  if (session.role !== "bind_transmitter") return session;
  for (const s of sessions) {
    if (s.role && s.role !== "bind_transmitter" && s.systemId === session.systemId) return s;
  }
  return null;
}

// A bound session that takes receipts for `systemId` (after the submitter's session ended).
function anyReceiver(systemId) {
  for (const s of sessions) {
    if (s.role && s.role !== "bind_transmitter" && s.systemId === systemId) return s;
  }
  return null;
}

function deliverReceipt(submitter, rid, stat, fields) {
  // Like a real SMSC: to the submitter's receiver, or to any receiver bound since.
  const session = sessions.has(submitter) ? receiverFor(submitter) : anyReceiver(submitter.systemId);
  if (!session) {
    // the session ended before its receipt was due: keep it for the next bind
    redeliver.push({ rid, stat, fields });
    return;
  }
  if (!unacked.has(session)) unacked.set(session, new Map());
  unacked.get(session).set(rid, { stat, fields });
  session.deliver_sm(fields, (resp) => {
    const pending = unacked.get(session);
    if (pending) pending.delete(rid);
    write({ ev: "receipt_ack", id: rid, stat, status: resp.command_status });
  });
}

function sendReceipt(session, pdu, n, stat, err) {
  const now = new Date();
  const rid = receiptId(n);
  const text = `id:${rid} sub:001 dlvrd:${stat === "DELIVRD" ? "001" : "000"} submit date:${smscTime(now)} done date:${smscTime(now)} stat:${stat} err:${err} text:`;
  const states = { DELIVRD: 2, EXPIRED: 3, UNDELIV: 5, REJECTD: 8 };
  const fields = {
    source_addr: pdu.destination_addr,
    destination_addr: pdu.source_addr,
    esm_class: 0x04,
    short_message: text,
  };
  if (receiptTlvs) {
    fields.receipted_message_id = rid;
    fields.message_state = states[stat];
  }
  deliverReceipt(session, rid, stat, fields);
}

function noteParts(pdu, text) {
  const udh = pdu.short_message && pdu.short_message.udh;
  const concat = udh && udh.find((u) => u[0] === 0x00 || u[0] === 0x08);
  const sar = pdu.sar_msg_ref_num !== undefined;
  if (!concat && !sar) {
    write({ ev: "message", to: pdu.destination_addr, text, parts: 1 });
    return;
  }
  const ref = sar ? pdu.sar_msg_ref_num : concat[0] === 0x00 ? concat[2] : concat[2] * 256 + concat[3];
  const total = sar ? pdu.sar_total_segments : concat[0] === 0x00 ? concat[3] : concat[4];
  const seq = sar ? pdu.sar_segment_seqnum : concat[0] === 0x00 ? concat[4] : concat[5];
  const key = `${pdu.destination_addr}/${ref}`;
  const entry = partsSeen.get(key) || { total, parts: [] };
  entry.parts[seq - 1] = text;
  partsSeen.set(key, entry);
  if (entry.parts.filter((p) => p !== undefined).length === total) {
    partsSeen.delete(key);
    write({ ev: "message", to: pdu.destination_addr, text: entry.parts.join(""), parts: total });
  }
}

const serverOptions = { debug: false };
if (env.SMSC_TLS_CERT && env.SMSC_TLS_KEY) {
  serverOptions.cert = fs.readFileSync(env.SMSC_TLS_CERT);
  serverOptions.key = fs.readFileSync(env.SMSC_TLS_KEY);
}

const server = smpp.createServer(serverOptions, (session) => {
  sessions.add(session);
  let bound = false;
  session.on("error", () => {});
  session.on("close", () => {
    sessions.delete(session);
    const pending = unacked.get(session);
    unacked.delete(session);
    if (pending) {
      for (const [rid, r] of pending) redeliver.push({ rid, stat: r.stat, fields: r.fields });
    }
  });
  const bind = (pdu) => {
    if (pdu.system_id !== systemId || pdu.password !== password) {
      write({ ev: "bind_refused", system_id: pdu.system_id });
      session.send(pdu.response({ command_status: smpp.ESME_RBINDFAIL }));
      return;
    }
    bound = true;
    session.role = pdu.command;
    session.systemId = pdu.system_id;
    write({ ev: "bind", command: pdu.command, system_id: pdu.system_id, system_type: pdu.system_type, at_ms: Date.now() });
    session.send(pdu.response({ system_id: "loopback-smsc" }));
    if (breakAfterBind > 0) {
      setTimeout(() => {
        write({ ev: "break" });
        session.destroy();
      }, breakAfterBind);
    }
    if (pdu.command !== "bind_transmitter" && redeliver.length) {
      const again = redeliver;
      redeliver = [];
      write({ ev: "redeliver", receipts: again.length });
      setTimeout(() => again.forEach((r) => deliverReceipt(session, r.rid, r.stat, r.fields)), 20);
    }
  };
  session.on("bind_transceiver", bind);
  session.on("bind_transmitter", bind);
  session.on("bind_receiver", bind);
  session.on("enquire_link", (pdu) => session.send(pdu.response()));
  session.on("unbind", (pdu) => {
    write({ ev: "unbind" });
    session.send(pdu.response());
    setTimeout(() => session.close(), 10);
  });
  session.on("deliver_sm_resp", () => {});
  session.on("unbind_resp", () => write({ ev: "unbind_resp" }));
  session.on("submit_sm", (pdu) => {
    if (!bound) {
      session.send(pdu.response({ command_status: smpp.ESME_RINVBNDSTS }));
      return;
    }
    submits += 1;
    if (submits % tick === 0) write({ ev: "tick", n: submits, t: Date.now() });
    if (nack) {
      write({ ev: "nack", to: pdu.destination_addr });
      session.send(new smpp.PDU("generic_nack", { sequence_number: pdu.sequence_number, command_status: smpp.ESME_RINVCMDLEN }));
      return;
    }
    if (dropAfter > 0 && submits >= dropAfter) {
      dropAfter = 0;
      write({ ev: "drop", submits });
      session.destroy();
      return;
    }
    const nowSec = Math.floor(Date.now() / 1000);
    if (nowSec !== second) {
      second = nowSec;
      inSecond = 0;
    }
    inSecond += 1;
    if (throttleTps > 0 && inSecond > throttleTps) {
      write({ ev: "throttled", to: pdu.destination_addr });
      session.send(pdu.response({ command_status: smpp.ESME_RTHROTTLED }));
      return;
    }
    const to = pdu.destination_addr;
    const sm = pdu.short_message || {};
    const text = typeof sm.message === "string" ? sm.message : Buffer.isBuffer(sm.message) ? sm.message.toString("hex") : String(sm);
    const tail = to.slice(-4);
    const answer = () => {
      if (tail === "0401" || tail === "0404") {
        const status = tail === "0401" ? smpp.ESME_RSUBMITFAIL : smpp.ESME_RINVDSTADR;
        write({ ev: "submit_refused", to, status });
        session.send(pdu.response({ command_status: status }));
        return;
      }
      const n = nextId++;
      const id = idText(n);
      write({
        ev: "submit",
        id,
        to,
        from: pdu.source_addr,
        text,
        dc: pdu.data_coding,
        esm: pdu.esm_class,
        registered: pdu.registered_delivery,
        validity: pdu.validity_period || "",
        sar: pdu.sar_msg_ref_num !== undefined,
      });
      noteParts(pdu, text);
      const wantsReceipt = (pdu.registered_delivery & 0x03) !== 0 && tail !== "0406";
      const stat = tail === "0402" ? ["UNDELIV", "001"] : tail === "0403" ? ["EXPIRED", "000"] : ["DELIVRD", "000"];
      if (tail === "0405" && wantsReceipt) {
        sendReceipt(session, pdu, n, stat[0], stat[1]);
        setTimeout(() => session.send(pdu.response({ message_id: id })), 50);
        return;
      }
      session.send(pdu.response({ message_id: id }));
      if (wantsReceipt) {
        setTimeout(() => sendReceipt(session, pdu, n, stat[0], stat[1]), receiptDelay);
      }
    };
    if (delayMs > 0) setTimeout(answer, delayMs);
    else answer();
  });
});

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    return;
  }
  if (typeof cmd.delay_ms === "number") {
    delayMs = cmd.delay_ms;
    write({ ev: "delay", ms: delayMs });
  }
  if (typeof cmd.next_id === "number") nextId = cmd.next_id;
  if (typeof cmd.nack === "boolean") nack = cmd.nack;
  if (typeof cmd.break_after_bind_ms === "number") breakAfterBind = cmd.break_after_bind_ms;
  if (cmd.unbind) {
    for (const session of sessions) {
      session.unbind();
      write({ ev: "unbind_sent" });
    }
  }
  const orphan = (id, stat, tlv) => {
    for (const session of sessions) {
      if (session.role === "bind_transmitter") continue;
      const text = id === "" ? `sub:001 dlvrd:001 stat:${stat} err:000 text:` : `id:${id} sub:001 dlvrd:001 submit date:2612061200 done date:2612061200 stat:${stat} err:000 text:`;
      const fields = { source_addr: "33600000000", destination_addr: "ACME", esm_class: 0x04, short_message: text };
      if (tlv && id !== "") {
        fields.receipted_message_id = id;
        fields.message_state = stat === "DELIVRD" ? 2 : 5;
      }
      session.deliver_sm(fields, (resp) => write({ ev: "orphan_ack", id, status: resp.command_status }));
      return;
    }
  };
  if (cmd.receipt) orphan(String(cmd.receipt.id), cmd.receipt.stat || "DELIVRD", cmd.receipt.tlv !== false);
  if (cmd.flood) {
    for (let i = 0; i < cmd.flood.n; i++) orphan(String(cmd.flood.from + i), "DELIVRD", true);
  }
  if (cmd.mo) {
    for (const session of sessions) {
      if (session.role === "bind_transmitter") continue;
      session.deliver_sm(
        {
          source_addr: cmd.mo.from.replace(/^\+/, ""),
          source_addr_ton: 1,
          source_addr_npi: 1,
          destination_addr: cmd.mo.to,
          esm_class: 0,
          short_message: cmd.mo.text,
        },
        (resp) => write({ ev: "mo_ack", from: cmd.mo.from, status: resp.command_status }),
      );
      break;
    }
  }
});

// Port 0 takes any free port; the "listening" event says which.
server.listen(port, "127.0.0.1", () => write({ ev: "listening", port: server.address().port }));
