#!/usr/bin/env python3
"""The reference point of the performance issue: a plain single-process Python verifier.

selectors, ``hmac.digest`` per line, one ``sendall`` per read.  No buffering,
no limits, no reloads: only here so the benchmark can report amproxy's speed
as a ratio to it, measured on the same machine in the same run.

    plain_verifier.py LISTEN_PORT CARBON_PORT AUTH_FILE
"""
import base64
import hmac
import selectors
import socket
import sys
import time

import yaml


def main():
    port, carbon_port, auth_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with open(auth_file) as f:
        keys = {name.encode(): (entry["secret_key"].encode(),
                                {m.encode() for m in entry["metrics"]})
                for name, entry in yaml.safe_load(f)["apikeys"].items()}
    carbon = socket.create_connection(("127.0.0.1", carbon_port))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    partial = {}
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                sel.register(conn, selectors.EVENT_READ)
                partial[conn] = b""
                continue
            conn = key.fileobj
            data = conn.recv(262144)
            if not data:
                sel.unregister(conn)
                conn.close()
                continue
            lines = (partial[conn] + data).split(b"\n")
            partial[conn] = lines.pop()
            now = time.time()
            out = []
            for line in lines:
                fields = line.split(b" ")
                if len(fields) != 5:
                    continue
                metric, value, ts, public_key, signature = fields
                entry = keys.get(public_key)
                if entry is None:
                    continue
                text = line[:len(line) - len(signature) - 1]
                expected = base64.b64encode(hmac.digest(entry[0], text, "sha256"))
                if not hmac.compare_digest(expected, signature):
                    continue
                if abs(now - int(ts)) > 300 or metric not in entry[1]:
                    continue
                out.append(b"%s %s %s\n" % (metric, value, ts))
            if out:
                carbon.sendall(b"".join(out))


if __name__ == "__main__":
    main()
