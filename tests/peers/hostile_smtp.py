#!/usr/bin/env python3
"""A hostile SMTP server on aiosmtpd, for the torture suite (tests/torture.rs).

    hostile_smtp.py PORT MAILDIR LOG

Misbehaves by turns, then behaves: the first two transactions get 451 (try again later) on
every RCPT TO, the next two have their connection dropped in the middle of DATA (after the
message was sent, before the answer), the fifth gets 452 on the second RCPT only; from then on
mail is stored in MAILDIR. Every step goes to LOG, one JSON object per line.
"""
import threading
import json
import mailbox
import sys

from aiosmtpd.controller import Controller

PORT, MAILDIR, LOG = int(sys.argv[1]), sys.argv[2], sys.argv[3]
log = open(LOG, "a", buffering=1)
box = mailbox.Maildir(MAILDIR, create=True)
state = {"transactions": 0, "rcpts": 0}


def write(**ev):
    log.write(json.dumps(ev) + "\n")


class Hostile:
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        state["transactions"] += 1
        state["rcpts"] = 0
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        state["rcpts"] += 1
        n = state["transactions"]
        if n <= 2:
            write(ev="rcpt_451", n=n, to=address)
            return "451 4.3.0 try again later"
        if n == 5 and state["rcpts"] == 2:
            write(ev="rcpt_452", n=n, to=address)
            return "452 4.5.3 too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        n = state["transactions"]
        if n in (3, 4):
            write(ev="dropped_in_data", n=n)
            server.transport.close()
            return "421 closing"
        box.add(envelope.original_content)
        write(ev="stored", n=n, to=envelope.rcpt_tos)
        return "250 stored"


controller = Controller(Hostile(), hostname="127.0.0.1", port=PORT)
controller.start()
write(ev="listening", port=PORT)
threading.Event().wait()
