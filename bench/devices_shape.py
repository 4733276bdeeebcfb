"""``bench.py --devices N``: how long ``amproxy devices`` takes for a fleet of N keys.

The fleet: N keys in the auth file; most sent one accepted line, some only lines
with a clock an hour ahead (rejected: skew), the rest were never seen.  Each
query is the whole command, as an operator runs it (Python's start, the request,
the server's answer, the decoding and the output), timed ``repeats`` times.
"""

import base64
import hashlib
import hmac
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import harness

# The queries an operator runs, by name.
QUERIES = {
    "table": [],
    "json": ["--format", "json"],
    "silent_1h": ["--silent", "1h"],
    "rejected": ["--rejected"],
    "one_key": ["--key", "device-000007"],
    "sorted_last_accepted": ["--sort", "last-accepted"],
}
SEEN, REJECTED = 0.90, 0.05  # of the keys; the rest were never seen


def devices_shape(args, sink, directory):
    count = args.devices
    keys = harness.make_fleet_keys(count, 1)
    path = os.path.join(directory, "devices-auth.yaml")
    harness.write_auth(path, keys)
    stats_socket = os.path.join(directory, "devices-stats.sock")
    proxy = harness.Proxy(None, sink, path, args.workers[0],
                        ["--stats-socket", stats_socket, "--skew", "10m"])
    try:
        seen = keys[:int(count * SEEN)]
        skewed = keys[len(seen):len(seen) + int(count * REJECTED)]
        sink.reset()
        blobs, good = harness.generate(seen, len(seen), 4, 0)
        harness.send_all(proxy.port, blobs + [_ahead(skewed, 3600)])
        harness.settle([sink], good, args.timeout)
        command = [os.path.join(os.path.dirname(sys.executable), "amproxy"), "devices",
                   "--stats-socket", stats_socket]
        _wait_recorded(command, len(seen), len(skewed))
        result = {"devices_keys": count}
        repeats = max(3, args.repeats)
        for name, flags in QUERIES.items():
            times = [_timed(command + flags) for _ in range(repeats)]
            result["devices_%s_s" % name] = round(statistics.median(times), 3)
        # The server's part alone: the request on the socket until the answer ends.
        times = [_answered(stats_socket, b'devices {"key":null,"output":"table","rejected":'
                           b'false,"silent":null,"sort":"key"}\n') for _ in range(repeats)]
        result["devices_table_server_s"] = round(statistics.median(times), 3)
        return result
    finally:
        proxy.stop()


def _ahead(keys, seconds):
    """One line per key, signed, with a timestamp ``seconds`` ahead: rejected (skew)."""
    stamp = int(time.time()) + seconds
    lines = []
    for name, secret, metrics in keys:
        text = b"%s 1 %d %s" % (metrics[0].encode(), stamp, name.encode())
        signature = base64.b64encode(hmac.new(secret.encode(), text, hashlib.sha256).digest())
        lines.append(text + b" " + signature + b"\n")
    return b"".join(lines)


def _wait_recorded(command, seen, rejected):
    """Until the workers' once-a-second records hold every line sent."""
    def recorded():
        out = subprocess.run(command + ["--format", "json"], capture_output=True,
                             check=True).stdout
        devices = json.loads(out)
        return (sum(1 for d in devices if d["accepted"]) == seen
                and sum(1 for d in devices if d["rejected_since"]) == rejected)
    harness.wait_for(recorded, 60, "the device table to hold every line", interval=0.5)


def _timed(argv):
    started = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - started


def _answered(path, request):
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 20):
            pass
    return time.monotonic() - started
