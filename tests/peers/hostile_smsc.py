#!/usr/bin/env python3
"""A hostile SMSC on raw sockets, for the torture suite (tests/torture.rs).

    hostile_smsc.py PORT LOG MODE

Every connection is answered according to MODE; what it did goes to LOG, one JSON object per
line ({"ev": "listening", "port": …} first; PORT 0 takes any free port). Modes:
  garbage      answers the bind with random bytes, then closes
  bad_length   answers the bind with a header claiming 0x7fffffff bytes, the next connection
               with one claiming 8 (shorter than a header), and holds the socket open
  unknown      binds, then answers every submit_sm with a command id no SMPP version has
  silent       binds, then never answers anything again
  close_every  binds, answers three submit_sm, then closes the connection
  orphans      binds, answers every submit_sm (ids in hex), and for each sends receipts for ids
               it never gave, in every form (decimal, upper-case hex, zero-padded), plus one
               flood of 5,000; never a receipt for an id it gave
"""
import json
import os
import socket
import struct
import sys
import threading
import time

PORT, LOG, MODE = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lock = threading.Lock()
log = open(LOG, "a", buffering=1)
next_id = [0x1000]
connections = [0]


def write(**ev):
    with lock:
        log.write(json.dumps(ev) + "\n")


def pdu(command_id, seq, body=b"", status=0):
    return struct.pack(">IIII", 16 + len(body), command_id, status, seq) + body


def read_pdu(conn):
    head = b""
    while len(head) < 16:
        chunk = conn.recv(16 - len(head))
        if not chunk:
            return None
        head += chunk
    length, command_id, status, seq = struct.unpack(">IIII", head)
    body = b""
    want = max(0, min(length, 1 << 16) - 16)
    while len(body) < want:
        chunk = conn.recv(want - len(body))
        if not chunk:
            return None
        body += chunk
    return command_id, seq, body


def receipt(rid, seq):
    text = ("id:%s sub:001 dlvrd:001 submit date:2612070000 done date:2612070001 stat:DELIVRD err:000 text:" % rid).encode()
    body = b"\0" + bytes([1, 1]) + b"33612345678\0" + bytes([5, 0]) + b"ACME\0"
    body += bytes([0x04, 0, 0]) + b"\0\0" + bytes([0, 0, 0, 0, len(text)]) + text
    return pdu(0x00000005, seq, body)


def serve(conn, n):
    seq = 1 << 20
    submits = 0
    conn.settimeout(60)
    try:
        while True:
            got = read_pdu(conn)
            if got is None:
                write(ev="closed_by_peer", conn=n)
                return
            command_id, pseq, body = got
            if command_id in (0x00000009, 0x00000002, 0x00000001):
                write(ev="bind", conn=n)
                if MODE == "garbage":
                    conn.sendall(os.urandom(64))
                    write(ev="garbage", conn=n)
                    return
                if MODE == "bad_length":
                    length = 0x7FFFFFFF if n % 2 == 1 else 8
                    conn.sendall(struct.pack(">IIII", length, 0x80000009, 0, pseq) + b"x" * 32)
                    write(ev="bad_length", conn=n, length=length)
                    time.sleep(30)
                    return
                conn.sendall(pdu(0x80000000 | command_id, pseq, b"hostile\0"))
                continue
            if MODE == "silent":
                write(ev="ignored", conn=n, command=command_id)
                continue
            if command_id == 0x00000015:  # enquire_link
                conn.sendall(pdu(0x80000015, pseq))
                continue
            if command_id == 0x00000006:  # unbind
                conn.sendall(pdu(0x80000006, pseq))
                return
            if command_id & 0x80000000:  # a response (to our deliver_sm)
                continue
            if command_id != 0x00000004:
                conn.sendall(pdu(0x80000000, pseq, status=0x00000003))
                continue
            submits += 1
            if MODE == "unknown":
                conn.sendall(pdu(0x00000777, pseq, b"\x01\x02\x03"))
                write(ev="unknown_sent", conn=n)
                continue
            with lock:
                next_id[0] += 1
                given = next_id[0]
            conn.sendall(pdu(0x80000004, pseq, ("%x\0" % given).encode()))
            write(ev="submit", conn=n, id="%x" % given)
            if MODE == "close_every" and submits >= 3:
                write(ev="close", conn=n)
                return
            if MODE == "orphans":
                never = given + 0x100000
                for rid in (str(never), "%X" % never, "%016x" % never, "%x" % never):
                    seq += 1
                    conn.sendall(receipt(rid, seq))
                write(ev="orphans", conn=n, around=never)
                if submits == 1:
                    for i in range(5000):
                        seq += 1
                        conn.sendall(receipt("%x" % (0x900000 + i), seq))
                    write(ev="flood", conn=n, n=5000)
    except (OSError, socket.timeout) as e:
        write(ev="error", conn=n, error=str(e))
    finally:
        try:
            conn.close()
        except OSError:
            pass


def main():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", PORT))
    server.listen(64)
    write(ev="listening", port=server.getsockname()[1], mode=MODE)
    while True:
        conn, _ = server.accept()
        connections[0] += 1
        write(ev="connection", conn=connections[0])
        threading.Thread(target=serve, args=(conn, connections[0]), daemon=True).start()


main()
