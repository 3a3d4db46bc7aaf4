"""Prints the mails of a Maildir (as aiosmtpd's Mailbox handler stores them) as JSON lines:
{"to": ..., "from": ..., "subject": ..., "body": ...}, decoded with Python's email package."""
import json
import mailbox
import sys
from email.header import decode_header, make_header


def header(msg, name):
    """A header decoded (RFC 2047) and unfolded."""
    value = str(make_header(decode_header(msg[name] or "")))
    return " ".join(value.split())

for key, msg in sorted(mailbox.Maildir(sys.argv[1], create=False).items(), key=lambda kv: kv[1].get_date()):
    body = msg.get_payload(decode=True)
    charset = msg.get_content_charset() or "utf-8"
    print(json.dumps({
        "to": header(msg, "To"),
        "from": header(msg, "From"),
        "subject": header(msg, "Subject"),
        "body": body.decode(charset, "replace") if body is not None else "",
    }))
