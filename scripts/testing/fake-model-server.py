#!/usr/bin/env python3
"""A stand-in for nvembed-model-server in the system tests: it speaks nvembed's protocol (see
protocol/src/messages.rs) and misbehaves on purpose, as chosen by its --model argument:
  other-build    answers the handshake as a model server of another build;
  fewer-vectors  returns one vector fewer than the call sent texts.
It answers status requests, so the supervisor's liveness check leaves it running."""
import json
import os
import socket
import struct
import sys
import threading

HELLO, STATUS, EMBED, TEXTS, VECTORS, DONE, IDENTIFY, READY = 1, 2, 3, 4, 5, 6, 8, 9


def option(name):
    return sys.argv[sys.argv.index(name) + 1]


def receive_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_frame(conn):
    (length,) = struct.unpack(">I", receive_exactly(conn, 4))
    body = receive_exactly(conn, length)
    return body[0], body[1:]


def write_frame(conn, tag, payload=b""):
    conn.sendall(struct.pack(">I", len(payload) + 1) + bytes([tag]) + payload)


def serve(conn, mode):
    try:
        _, build = read_frame(conn)
        write_frame(conn, HELLO, b"nvembed 0.0.1, protocol 1" if mode == "other-build" else build)
        while True:
            tag, payload = read_frame(conn)
            if tag == IDENTIFY:
                write_frame(conn, READY, b"null")  # protocol 4: what it serves (not loaded)
            elif tag == STATUS:
                status = dict(loaded=False, model=mode, dtype="f32", device="cpu", dimension=None, load_seconds=None,
                              requests=0, tokens=0, waiting=0, active_rows=0, cancelled_rows=0, restarts=0,
                              pid=os.getpid())
                write_frame(conn, STATUS, json.dumps(status).encode())
            elif tag == EMBED:
                count = json.loads(payload)["count"]
                received = 0
                while received < count:
                    _, texts = read_frame(conn)
                    received += len(json.loads(texts))
                if count > 1:
                    write_frame(conn, VECTORS, struct.pack("<I", 4) + struct.pack("<4f", 1, 0, 0, 0) * (count - 1))
                write_frame(conn, DONE)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def main():
    path, mode = option("--socket"), option("--model")
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, mode), daemon=True).start()


main()
