"""Hostile SSH and SFTP clients for the tests (raw sockets and paramiko). Each mode prints one
JSON object on stdout.

usage: hostile_ssh.py PORT USER MODE [ARGS...]
  silent N SECONDS [SRC]  N sockets (from address SRC, default 127.0.0.1) that send an SSH banner,
                          then nothing; reports after how many seconds the server closed each
                          (null: still open after SECONDS)
  channels KEY N          one connection: N session channels with the sftp subsystem at once,
                          then 40 channels opened and closed before any subsystem, then one more
                          sftp session that must work
  handles KEY CONNS       CONNS connections x 4 sftp sessions, each opening uploads until refused;
                          prints what it got, then holds everything open until stdin closes
  requests KEY            channel and global requests that must each get an answer: env, pty-req,
                          x11-req, exec, shell (want-reply), tcpip-forward, direct-tcpip
  badpackets KEY          an sftp session fed a malformed WRITE, then an over-long packet
"""
import json
import socket
import struct
import sys
import threading
import time

import paramiko

port, user, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def out(obj):
    print(json.dumps(obj), flush=True)


def connect(keyfile):
    t = paramiko.Transport(("127.0.0.1", port))
    t.connect(username=user, pkey=paramiko.Ed25519Key.from_private_key_file(keyfile))
    return t


if mode == "silent":
    n, secs = int(sys.argv[4]), float(sys.argv[5])
    src = sys.argv[6] if len(sys.argv) > 6 else "127.0.0.1"
    socks, closed = [], []
    start = time.monotonic()
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(src, 0))
        s.sendall(b"SSH-2.0-silent_0.1\r\n")
        s.setblocking(False)
        socks.append(s)
        closed.append(None)
    while time.monotonic() - start < secs and None in closed:
        for i, s in enumerate(socks):
            if closed[i] is not None:
                continue
            try:
                data = s.recv(65536)
                if data == b"":
                    closed[i] = round(time.monotonic() - start, 2)
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = round(time.monotonic() - start, 2)
        time.sleep(0.05)
    out({"opened": n, "closed_after": closed})
    sys.exit(0)

if mode == "channels":
    t = connect(sys.argv[4])
    n = int(sys.argv[5])
    opened, refused, chans = 0, 0, []
    for i in range(n):
        try:
            c = t.open_session(timeout=5)
            c.invoke_subsystem("sftp")
            chans.append(c)
            opened += 1
        except Exception:
            refused += 1
    for c in chans:
        c.close()
    time.sleep(0.5)
    churned = 0
    for i in range(40):
        try:
            c = t.open_session(timeout=5)
            c.close()
            churned += 1
        except Exception:
            break
    time.sleep(0.5)
    works = False
    try:
        sftp = paramiko.SFTPClient.from_transport(t)
        works = "inbox" in sftp.listdir("/")
    except Exception as e:
        works = str(e)
    out({"opened": opened, "refused": refused, "churned": churned, "after": works})
    sys.exit(0)

if mode == "handles":
    conns = int(sys.argv[5])
    got, errors, keep = 0, {}, []
    for ci in range(conns):
        try:
            t = connect(sys.argv[4])
        except Exception as e:
            errors["connect: " + str(e)] = errors.get("connect: " + str(e), 0) + 1
            continue
        keep.append(t)
        for si in range(4):
            try:
                sftp = paramiko.SFTPClient.from_transport(t)
            except Exception as e:
                errors["session: " + str(e)] = errors.get("session: " + str(e), 0) + 1
                continue
            keep.append(sftp)
            for k in range(70):
                try:
                    f = sftp.open(f"/inbox/h{ci}-{si}-{k}.csv", "w")
                    keep.append(f)
                    got += 1
                except Exception as e:
                    errors[str(e)] = errors.get(str(e), 0) + 1
                    break
    out({"opened": got, "errors": errors})
    sys.stdin.read()
    sys.exit(0)

if mode == "requests":
    t = connect(sys.argv[4])
    answers = {}

    def ask(name, payload):
        c = t.open_session(timeout=5)
        m = paramiko.Message()
        m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        m.add_int(c.remote_chanid)
        m.add_string(name)
        m.add_boolean(True)
        for kind, v in payload:
            getattr(m, "add_" + kind)(v)
        c._event_pending()
        t._send_user_message(m)
        c.event.wait(5)
        answers[name] = "answered" if c.event.is_set() else "no answer"
        try:
            c.close()
        except Exception:
            pass

    ask("env", [("string", "LC_ALL"), ("string", "C")])
    ask("pty-req", [("string", "xterm"), ("int", 80), ("int", 24), ("int", 0), ("int", 0), ("string", b"")])
    ask("x11-req", [("boolean", False), ("string", "MIT-MAGIC-COOKIE-1"), ("string", "00"), ("int", 0)])
    ask("exec", [("string", "id")])
    ask("shell", [])
    fwd = t.global_request("tcpip-forward", ("127.0.0.1", 0), wait=True)
    answers["tcpip-forward"] = "refused" if fwd is None else "granted"
    try:
        t.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 5555), timeout=5)
        answers["direct-tcpip"] = "opened"
    except Exception:
        answers["direct-tcpip"] = "refused"
    out(answers)
    sys.exit(0)

if mode == "badpackets":
    t = connect(sys.argv[4])
    c = t.open_session(timeout=5)
    c.invoke_subsystem("sftp")
    c.settimeout(5)

    def packet(ptype, body):
        return struct.pack(">IB", len(body) + 1, ptype) + body

    def read_packet():
        head = b""
        while len(head) < 4:
            more = c.recv(4 - len(head))
            if not more:
                return None
            head += more
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            more = c.recv(n - len(body))
            if not more:
                return None
            body += more
        return body

    def status(r):
        # an SSH_FXP_STATUS: type, request id, status code
        if not r:
            return "closed"
        return {"type": r[0], "id": struct.unpack(">I", r[1:5])[0], "code": struct.unpack(">I", r[5:9])[0]}

    result = {}
    c.sendall(packet(1, struct.pack(">I", 3)))  # INIT v3
    v = read_packet()
    result["version"] = v[0] if v else None
    # WRITE id 7: a handle string, an offset, then a data length far past the packet's end
    body = struct.pack(">I", 7) + struct.pack(">I", 2) + b"h1" + struct.pack(">Q", 0) + struct.pack(">I", 1000) + b"abc"
    c.sendall(packet(6, body))
    try:
        r = read_packet()
        result["malformed_write"] = status(r)
    except socket.timeout:
        result["malformed_write"] = "no answer"
    # An over-long packet: length 0x7fffffff, then the start of a READ with id 9
    c.sendall(struct.pack(">IBI", 0x7FFFFFFF, 5, 9))
    try:
        r = read_packet()
        result["overlong"] = status(r)
    except socket.timeout:
        result["overlong"] = "no answer"
    try:
        rest = c.recv(1)
        result["after_overlong"] = "closed" if rest == b"" else "open"
    except socket.timeout:
        result["after_overlong"] = "open"
    out(result)
    sys.exit(0)

print(f"unknown mode {mode}", file=sys.stderr)
sys.exit(2)
