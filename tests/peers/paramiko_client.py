"""A second, independent SFTP client for the tests (paramiko).

usage: paramiko_client.py PORT USER MODE [ARGS...]
  password PASSWORD              try password authentication; exit 0 if refused, 1 if let in
  trykey KEYFILE                 try to log in with a key of any type; exit 0 if refused, 1 if let in
  upload KEYFILE LOCAL REMOTE    upload with an Ed25519 key; exit 0 on success
  escape KEYFILE                 try to leave the two folders; prints one line per attempt, exit 0
                                 if every attempt was refused
  session KEYFILE                log in and keep the session: reads `put LOCAL REMOTE` and `alive`
                                 lines on stdin, answers each with one line (`ok`, `error ...`,
                                 `alive` or `closed`)
"""
import sys

import paramiko

port, user, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def connect(**auth):
    t = paramiko.Transport(("127.0.0.1", port))
    t.connect(username=user, **auth)
    return t


if mode == "password":
    try:
        t = paramiko.Transport(("127.0.0.1", port))
        t.start_client(timeout=10)
        t.auth_password(user, sys.argv[4])
    except paramiko.AuthenticationException as e:
        print(f"refused: {e}")
        sys.exit(0)
    except paramiko.SSHException as e:
        print(f"refused: {e}")
        sys.exit(0)
    print("let in")
    sys.exit(1)

if mode == "trykey":
    try:
        t = paramiko.Transport(("127.0.0.1", port))
        t.start_client(timeout=10)
        t.auth_publickey(user, paramiko.PKey.from_path(sys.argv[4]))
    except (paramiko.AuthenticationException, paramiko.SSHException) as e:
        print(f"refused: {e}")
        sys.exit(0)
    print("let in")
    sys.exit(1)

key = paramiko.Ed25519Key.from_private_key_file(sys.argv[4])
t = connect(pkey=key)
sftp = paramiko.SFTPClient.from_transport(t)
if mode == "upload":
    sftp.put(sys.argv[5], sys.argv[6])
    sys.exit(0)
if mode == "filepart":
    # WinSCP's way: upload as NAME.filepart, set times, rename when done
    remote = sys.argv[6]
    sftp.put(sys.argv[5], remote + ".filepart")
    sftp.utime(remote + ".filepart", (1700000000, 1700000000))
    sftp.rename(remote + ".filepart", remote)
    sys.exit(0)
if mode == "escape":
    attempts = [
        ("open", "/inbox/../../etc/passwd", "r"),
        ("open", "/../etc/passwd", "r"),
        ("open", "/outbox/../inbox/x", "w"),
        ("open", "inbox/%2e%2e/x", "w"),
        ("open", "/inbox/x\x00y", "w"),
        ("open", "/inbox/" + "a" * 5000, "w"),
        ("open", "/outbox/new.csv", "w"),
        ("listdir", "/etc", None),
        ("listdir", "/inbox/..", None),
        ("mkdir", "/inbox/d", None),
        ("symlink", "/etc/passwd", "/inbox/l"),
        ("remove", "/inbox/x", None),
    ]
    allowed = 0
    for op, path, arg in attempts:
        try:
            if op == "open":
                f = sftp.open(path, arg)
                if arg == "w":
                    f.write(b"x")
                f.close()
            elif op == "listdir":
                sftp.listdir(path)
            elif op == "mkdir":
                sftp.mkdir(path)
            elif op == "symlink":
                sftp.symlink(path, arg)
            elif op == "remove":
                sftp.remove(path)
            print(f"ALLOWED {op} {path!r}")
            allowed += 1
        except (IOError, OSError) as e:
            print(f"refused {op} {path[:40]!r}: {e}")
    sys.exit(1 if allowed else 0)

if mode == "session":
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "put":
                sftp.put(words[1], words[2])
                print("ok", flush=True)
            elif words[0] == "alive":
                # A round trip: a session the server closed fails here, not only later.
                sftp.listdir("/")
                print("alive" if t.is_active() else "closed", flush=True)
        except Exception as e:  # noqa: BLE001 - the test wants to know, not the type
            print("closed" if not t.is_active() else f"error {type(e).__name__}: {e}", flush=True)
    sys.exit(0)
