"""An HTTP SMS API for the tests, on Python's standard library (http.server, urllib).

usage: python3 http_partner.py PORT LOGFILE WEBHOOK_URL SECRET_FILE

PORT 0 takes any free port; the "listening" event says which. WEBHOOK_URL "-" means none yet: a
{"webhook": URL} control line gives it (smsdrop binds its webhook on port 0 and says where).

Takes smsdrop's documented request (POST, one JSON message) and answers {"id": "h<n>"}; then
posts a signed receipt to smsdrop's webhook. Writes one JSON line per event to LOGFILE:
{"ev":"listening","port"}, {"ev":"webhook_set","url"}, {"ev":"submit","id","to","from","text",
"auth"}, {"ev":"refused","to","status"}, {"ev":"webhook","kind","status"} (smsdrop's answer to a
webhook call).

Behaviour by destination number (its last four digits):
  ...0404  400 Bad Request (permanent)     ...0429  429 Too Many Requests the first time
  ...0402  receipt UNDELIV                 ...0406  no receipt
Control on stdin, one JSON object per line:
  {"webhook": "http://127.0.0.1:40123/smsdrop"}                    where receipts and MO go from now
  {"mo": {"from": "+33612345678", "to": "ACME", "text": "STOP"}}   an incoming message
  {"mo": {...}, "times": 2}                                        the same signed body twice (a replay)
  {"forged": true}                                                 a receipt with a bad signature
A webhook call that fails below HTTP (refused, reset) is logged as {"ev":"webhook_error"} and tried
again after 0.5 s.
"""

import hashlib
import hmac
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port = int(sys.argv[1])
log_path = sys.argv[2]
webhook = sys.argv[3]  # "-": none yet
with open(sys.argv[4], "rb") as f:
    secret = f.read().rstrip(b"\r\n")

lock = threading.Lock()
counter = [1000]
throttled = set()


def write(obj):
    with lock, open(log_path, "a") as log:
        log.write(json.dumps(obj) + "\n")


def post_webhook(kind, event, key=None):
    body = json.dumps(event).encode()
    sig = hmac.new(key if key is not None else secret, body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        webhook,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-Smsdrop-Signature": "sha256=" + sig},
    )
    for _ in range(20):
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                write({"ev": "webhook", "kind": kind, "status": resp.status})
                return
        except urllib.error.HTTPError as e:
            write({"ev": "webhook", "kind": kind, "status": e.code})
            if e.code != 503:
                return
        except OSError as e:
            write({"ev": "webhook_error", "kind": kind, "error": str(e)})
        time.sleep(0.5)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        msg = json.loads(self.rfile.read(length) or b"{}")
        to = msg.get("to", "")
        tail = to[-4:]
        if tail == "0404":
            write({"ev": "refused", "to": to, "status": 400})
            return self.answer(400, {"error": "invalid destination"})
        if tail == "0429" and to not in throttled:
            throttled.add(to)
            write({"ev": "refused", "to": to, "status": 429})
            return self.answer(429, {"error": "slow down"})
        with lock:
            counter[0] += 1
            pid = "h%d" % counter[0]
        write({
            "ev": "submit", "id": pid, "smsdrop_id": msg.get("id"), "to": to, "from": msg.get("from"),
            "text": msg.get("text"), "encoding": msg.get("encoding"), "valid_until": msg.get("valid_until"),
            "auth": self.headers.get("Authorization", ""),
        })
        self.answer(200, {"id": pid})
        if tail != "0406":
            status = "UNDELIV" if tail == "0402" else "DELIVRD"
            threading.Thread(
                target=post_webhook,
                args=("receipt", {"type": "receipt", "id": pid, "status": status, "error": "000"}),
                daemon=True,
            ).start()


def control():
    global webhook
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        if "webhook" in cmd:
            webhook = cmd["webhook"]
            write({"ev": "webhook_set", "url": webhook})
        if "mo" in cmd:
            event = dict(cmd["mo"])
            event["type"] = "mo"
            for _ in range(int(cmd.get("times", 1))):
                post_webhook("mo", event)
        if cmd.get("forged"):
            post_webhook("forged", {"type": "receipt", "id": "h1", "status": "DELIVRD"}, key=b"not the secret")


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
threading.Thread(target=control, daemon=True).start()
write({"ev": "listening", "port": server.server_address[1]})
server.serve_forever()
