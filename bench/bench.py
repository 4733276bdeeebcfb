#!/usr/bin/env python3
"""Throughput benchmark: signed lines -> amproxy -> a counting sink in place of Carbon.

Each run generates signed lines with fresh timestamps, starts a sink and
``amproxy server``, sends the lines over several connections as fast as it
can, and waits until the sink has counted every valid line.  It prints one
JSON line per run and, at the end, the medians as JSON and as a table.

    python bench/bench.py --lines 1000000 --connections 4 --workers 2 --repeats 3

A baseline (the same bytes sent straight into the sink, no proxy) runs in the
same session, so results can be read as ratios on a noisy shared machine.
``--compare NAME=COMMAND`` runs another proxy the same way; COMMAND may use
{addr}, {port}, {carbon_addr} and {auth_file}.
"""

import argparse
import base64
import hmac
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))

import fleet  # noqa: E402  (tools/fleet.py: the load of a fleet's connection shapes)
import devices_shape  # noqa: E402  (bench/devices_shape.py: --devices)

from harness import (  # noqa: E402  (bench/harness.py: what the shapes share)
    wait_for, port_open, Sink, make_keys, make_fleet_keys, write_auth, generate, send_all,
    peak_rss_mb, carbon_addr, Proxy, settle)


SCALE_OUT = [("amproxy-3-destinations", 3, [], 1),
             ("amproxy-broadcast-2", 2, ["--relay-method", "broadcast"], 2)]
# The row of --rate-limit: every key limited, far above what it sends, so what
# it costs a key under its limit.
RATE_LIMITED = ("amproxy-rate-limited", 1, ["--key-max-rate", "1000000000"], 1)


def run_once(name, command, args, sinks, auth_file, keys, workers, extra=(), copies=1,
             tls=None, env=None):
    blobs, good = generate(keys, args.lines, args.connections, args.bad_fraction)
    proxy = None
    if name != "no-proxy":
        proxy = Proxy(command, sinks[0], auth_file, workers, extra, sinks, env)
    port = proxy.port if proxy else sinks[0].port
    if tls is not None:
        port = proxy.tls_port
        wait_for(lambda: port_open(port), 30, "the TLS port")
    try:
        for sink in sinks:
            sink.reset()
        cpu_before = proxy.cpu() if proxy else 0.0
        started = time.monotonic()
        send_all(port, blobs, tls)
        end, counted = settle(sinks, good * copies, args.timeout)
        counted //= copies
        elapsed = max(end - started, 1e-9)
        result = {"proxy": name, "workers": workers if proxy and proxy.workers else None,
                  "lines": args.lines, "valid_lines": good, "connections": args.connections,
                  "bad_fraction": args.bad_fraction,
                  "lines_per_s": round(good / elapsed),
                  "lost": max(0, good - counted), "extra": max(0, counted - good)}
        if proxy:
            cpu = proxy.cpu() - cpu_before
            result["cpu_us_per_line"] = round(cpu / args.lines * 1e6, 3)
            result["peak_rss_mb_per_worker"] = [round(peak_rss_mb(p), 1)
                                                for p in proxy.pids()[1:]]
        return result
    finally:
        if proxy:
            proxy.stop()


# -- a fleet's connection shapes (issue 17) ------------------------------------------

def fleet_contenders(args):
    """(name, command, workers, env) of each row of the fleet shapes."""
    rows = [] if args.no_baseline else [("plain-verifier", "%s %s {port} {carbon_port} "
                                         "{auth_file}" % (shlex.quote(sys.executable),
                                                          shlex.quote(os.path.join(
                                                              HERE, "plain_verifier.py"))),
                                         None, None)]
    rows += [("amproxy", None, w, None) for w in args.workers]
    if args.before:
        # The same shapes against another tree of amproxy (say, main before a change).
        rows.append(("amproxy-before", None, args.workers[-1], {"PYTHONPATH": args.before}))
    return rows


def fleet_run(shape, row, args, sink, auth_file, keys, count):
    """One run of ``shape`` (storm or churn) against one row; a result dict."""
    name, command, workers, env = row
    lines = fleet.signed_lines(keys, count)
    storm = fleet.Storm(lines) if shape == "storm" else None
    proxy = Proxy(command, sink, auth_file, workers, args.fleet_args, env=env)
    try:
        sink.reset()
        overflows, cpu_before = fleet.listen_overflows(), proxy.cpu()
        started = time.monotonic()
        if storm:
            storm.fire(proxy.port)
            failed = storm.failed
        else:
            failed = fleet.churn(proxy.port, lines, args.churn_threads)
        end, counted = settle([sink], count, args.timeout)
        elapsed = max(end - started, 1e-9)
        result = {"shape": shape, "proxy": name, "workers": workers, "connections": count,
                  "seconds": round(elapsed, 3), "connections_per_s": round(count / elapsed),
                  "cpu_us_per_connection": round((proxy.cpu() - cpu_before) / count * 1e6, 1),
                  "listen_overflows": fleet.listen_overflows() - overflows,
                  "client_errors": failed, "lost": max(0, count - counted)}
        return result
    finally:
        if storm:
            storm.close()
        proxy.stop()


TLS_CHURN_ROWS = [("tls13_full", None, False), ("tls13_resumed", None, True),
                  ("tls12_full", "TLSv1_2", False), ("tls12_resumed", "TLSv1_2", True)]


def tls_churn_run(args, sink, auth_file, keys, count, cert, key, context):
    """CPU per TLS connection (connect, handshake, one line, close) on the server, with
    full handshakes and with each client resuming its last session, TLS 1.3 and 1.2."""
    import ssl
    proxy = Proxy(None, sink, auth_file, args.workers[-1],
                  tls_args(cert, key) + ["--tls-session-tickets"])
    result = {"shape": "tls-churn", "workers": args.workers[-1], "connections": count}
    try:
        wait_for(lambda: port_open(proxy.tls_port), 30, "the TLS port")
        for label, version, resume in TLS_CHURN_ROWS:
            client = ssl.create_default_context(cafile=cert)
            if version:
                client.maximum_version = getattr(ssl.TLSVersion, version)
            lines = fleet.signed_lines(keys, count)
            wrap = fleet.tls_wrapper(client, resume)
            sink.reset()
            cpu_before, started = proxy.cpu(), time.monotonic()
            failed = fleet.churn(proxy.tls_port, lines, args.churn_threads, wrap)
            end, counted = settle([sink], count, args.timeout)
            result.update({
                label + "_cpu_us": round((proxy.cpu() - cpu_before) / count * 1e6, 1),
                label + "_per_s": round(count / max(end - started, 1e-9)),
                label + "_resumed": wrap.resumed,
                label + "_lost": max(0, count - counted) + failed})
        for version in ("tls13", "tls12"):
            result[version + "_resumed_vs_full_cpu"] = round(
                result[version + "_resumed_cpu_us"] / result[version + "_full_cpu_us"], 3)
        return result
    finally:
        proxy.stop()


def fleet_shapes(args, sink, directory):
    """The rows of --storm, --churn and --tls-churn, run in turn in each repeat."""
    keys = make_keys(args.keys, args.metrics_per_key)
    auth_file = os.path.join(directory, "fleet-auth.yaml")
    write_auth(auth_file, keys)
    shapes = [(s, n) for s, n in (("storm", args.storm), ("churn", args.churn)) if n]
    runs = {}
    tls = make_certificate(directory) if args.tls_churn else None
    for repeat in range(args.repeats):
        for shape, count in shapes:
            for row in fleet_contenders(args):
                result = fleet_run(shape, row, args, sink, auth_file, keys, count)
                result["repeat"] = repeat + 1
                print(json.dumps(result), flush=True)
                runs.setdefault((shape, row[0], row[2]), []).append(result)
        if tls:
            result = tls_churn_run(args, sink, auth_file, keys, args.tls_churn, *tls)
            print(json.dumps(result), flush=True)
            runs.setdefault(("tls-churn", "amproxy", args.workers[-1]), []).append(result)
    return summarize_fleet(runs, args)


def summarize_fleet(runs, args):
    """Medians per row; for amproxy rows, the median within-repeat ratio to 1 worker."""
    summaries = []
    for (shape, name, workers), results in runs.items():
        summary = {"shape": shape, "proxy": name, "workers": workers, "repeats": len(results)}
        for field in results[0]:
            values = [r[field] for r in results]
            if field in ("lost", "client_errors", "listen_overflows") or field.endswith("_lost"):
                summary[field] = max(values)  # any run's loss counts
            elif isinstance(values[0], (int, float)) and field not in ("repeat", "workers"):
                summary[field] = statistics.median(values)
        one = runs.get((shape, "amproxy", 1))
        if one and name.startswith("amproxy") and (name, workers) != ("amproxy", 1):
            summary["seconds_vs_1_worker"] = round(statistics.median(
                r["seconds"] / b["seconds"] for r, b in zip(results, one)), 3)
        summaries.append(summary)
    return summaries


def print_fleet_table(summaries):
    print("\n| shape | proxy | workers | connections | seconds (median) | vs 1 worker | "
          "connections/s | CPU us/connection | listen overflows | lost |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for s in summaries:
        if s["shape"] == "tls-churn":
            continue
        print("| %s | %s | %s | {:,} | %s | %s | {:,} | %s | %s | %s |".format(
            int(s["connections"]), int(s["connections_per_s"])) % (
            s["shape"], s["proxy"], s["workers"] or "-", s["seconds"],
            s.get("seconds_vs_1_worker", "-"), s["cpu_us_per_connection"],
            s["listen_overflows"], s["lost"] + s["client_errors"]), file=sys.stderr)
    for s in summaries:
        if s["shape"] != "tls-churn":
            continue
        print("\nTLS churn, %d workers, %d connections each, CPU per connection:"
              % (s["workers"], s["connections"]), file=sys.stderr)
        for version in ("tls13", "tls12"):
            print("- %s: full handshake %s us (%s/s), resumed %s us (%s/s, %d resumed): "
                  "%s of a full one; lost %d" % (
                      version, s[version + "_full_cpu_us"], s[version + "_full_per_s"],
                      s[version + "_resumed_cpu_us"], s[version + "_resumed_per_s"],
                      s[version + "_resumed_resumed"], s[version + "_resumed_vs_full_cpu"],
                      s[version + "_full_lost"] + s[version + "_resumed_lost"]),
                  file=sys.stderr)


def flood_fairness(args, sink, directory):
    """--flood N: how long a calm key's N lines on one connection take alone, and while
    3 connections flood a rate-limited key with a captured line (one worker): four
    connections share the worker, so in proportion is about 4 times."""
    keys = make_keys(1, args.metrics_per_key)
    auth_file = os.path.join(directory, "flood-auth.yaml")
    write_auth(auth_file, keys + [("flood", "flood-secret", ["flood.m"])])
    with open(auth_file) as f:
        text = f.read().replace("flood-secret\n", "flood-secret\n    max_rate: 2\n")
    with open(auth_file, "w") as f:
        f.write(text)
    calm = generate(keys, args.flood, 1, 0)[0][0]
    captured = fleet.signed_line("flood-secret", "flood", "flood.m", 1, int(time.time()))
    proxy = Proxy(None, sink, auth_file, 1)
    times = {0: [], 3: []}
    try:
        for _ in range(args.repeats):
            for flooders in (0, 3):
                times[flooders].append(_calm_seconds(proxy, sink, calm, args.flood,
                                                     captured * 2048, flooders))
    finally:
        proxy.stop()
    return {"flood_calm_lines": args.flood,
            "flood_alone_s": round(statistics.median(times[0]), 4),
            "flood_beside_3_s": round(statistics.median(times[3]), 4),
            "flood_ratio": round(statistics.median(
                f / a for f, a in zip(times[3], times[0])), 2)}


def _calm_seconds(proxy, sink, calm, lines, flood, flooders):
    stop = threading.Event()
    started = threading.Semaphore(0)

    def flood_proxy():
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            for sent in range(100000):  # bounded: about 9 GB at most
                if stop.is_set():
                    return
                s.sendall(flood)
                if sent == 8:
                    started.release()
    threads = [threading.Thread(target=flood_proxy, daemon=True) for _ in range(flooders)]
    for thread in threads:
        thread.start()
    for _ in threads:
        started.acquire(timeout=10)  # the flood is under way
    settle([sink], 0, 1)
    sink.reset()
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(calm)
    end, _ = settle([sink], lines, 60)
    stop.set()
    for thread in threads:
        thread.join(30)
    return end - began


def latency(command, sink, auth_file, keys, workers, samples=50):
    """Median time from a client's send to the sink's receive, one line at a time, idle."""
    proxy = Proxy(command, sink, auth_file, workers)
    try:
        name, secret, metrics = keys[0]
        times = []
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            for i in range(samples):
                text = b"%s %d %d %s" % (metrics[0].encode(), i, time.time(), name.encode())
                sig = base64.b64encode(hmac.new(secret.encode(), text, "sha256").digest())
                before = sink.count.value
                sent = time.monotonic()
                s.sendall(text + b" " + sig + b"\n")
                wait_for(lambda before=before: sink.count.value > before, 5, "one line",
                         interval=0.0001)
                times.append(sink.last.value - sent)
                time.sleep(0.01)  # idle between samples
        return round(statistics.median(times) * 1000, 3)
    finally:
        proxy.stop()


def big_auth_file(args, sink, directory, workers):
    """Start-up time with a large auth file, and the longest forwarding gap around a HUP."""
    keys = make_fleet_keys(args.big_auth_keys, 10)
    path = os.path.join(directory, "big-auth.yaml")
    write_auth(path, keys)
    proxy = Proxy(None, sink, path, workers, ["--log-level", "info"])  # to see reloads end
    try:
        pss_at_start = tree_pss_mb(proxy)
        rate, seconds = 20000, 4.0
        blobs, _ = generate(keys[:10], int(rate * seconds), 4, 0)
        sink.reset()
        sink.watch_gaps.value = 1
        socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in blobs]
        started = time.monotonic()
        hup_at, hup_sent = started + seconds / 3, False
        steps = 200
        for step in range(steps):
            for sock, blob in zip(socks, blobs):
                part = len(blob) // steps
                piece = blob[step * part:(step + 1) * part]
                if step == steps - 1:
                    piece = blob[step * part:]
                sock.sendall(piece)
            if not hup_sent and time.monotonic() >= hup_at:
                os.kill(proxy.process.pid, signal.SIGHUP)
                hup_sent = True
            pause = started + seconds * (step + 1) / steps - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        for sock in socks:
            sock.close()
        time.sleep(0.5)
        sink.watch_gaps.value = 0
        result = {"auth_keys": args.big_auth_keys, "auth_metrics": args.big_auth_keys * 10,
                  "workers": workers, "startup_seconds": round(proxy.startup_seconds, 2),
                  "pss_mb_at_start": pss_at_start,
                  "max_forwarding_gap_during_hup_s": round(sink.max_gap.value, 3)}
        result.update(memory_across_reloads(proxy, path, workers))
        return result
    finally:
        proxy.stop()


_MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ (\d+)\s*(.*)")


def tree_pss_mb(proxy):
    """The proportional set size of the master and its workers (shared pages split),
    with each auth snapshot counted whole: it is shared memory (a memfd) that every
    process maps but touches only in part, so PSS alone would leave most of it out."""
    total_kb, snapshots = 0, {}
    for pid in proxy.pids():
        try:
            with open("/proc/%d/smaps" % pid) as f:
                snapshot = None
                for line in f:
                    mapping = _MAPPING.match(line)
                    if mapping:
                        snapshot = mapping.group(1) if "amproxy-auth" in mapping.group(2) \
                            else None
                    elif snapshot and line.startswith("Size:"):
                        snapshots[snapshot] = int(line.split()[1])
                    elif not snapshot and line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
        except OSError:
            pass
    return round((total_kb + sum(snapshots.values())) / 1024, 1)


# Runs a command from a small process, so that its peak RSS is its own: a child
# forked from this large one would report this one's as its peak.
_MEASURE = ("import resource, subprocess, sys, time; started = time.monotonic(); "
            "status = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(time.monotonic() - started, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, status)")


def measured(argv, env):
    """(seconds, peak RSS in MB) of a command that must succeed."""
    out = subprocess.run([sys.executable, "-c", _MEASURE] + argv, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    if out[2] != "0":
        raise RuntimeError("%s failed" % " ".join(argv))
    return float(out[0]), int(out[1]) / 1024


def memory_across_reloads(proxy, path, workers, reloads=10):
    """PSS at start and after ``reloads`` auth reloads, each after ``keys new`` added a key,
    and how long ``keys new`` takes on the file (issue 13's figures)."""
    amproxy = os.path.join(os.path.dirname(sys.executable), "amproxy")
    env = dict(os.environ, AMPROXY_CONFIG="/dev/null")
    durations, peaks = [], []
    for n in range(reloads):
        done = _reloads_logged(proxy) + workers
        seconds, peak = measured([amproxy, "keys", "new", "bench-added-%d" % n, "--metric",
                                  "added.%d" % n, "--auth-file", path], env)
        durations.append(seconds)
        peaks.append(peak)
        # The master's mtime poll sees the new file within a second.
        wait_for(lambda: _reloads_logged(proxy) >= done, 120, "every worker to reload",
                 interval=0.1)
    # The HUP of the forwarding-gap measurement was one more reload before these.
    result = {"pss_mb_after_%d_reloads" % reloads: tree_pss_mb(proxy),
              "keys_new_seconds_median": round(statistics.median(durations), 2),
              "keys_new_peak_rss_mb": round(max(peaks), 1)}
    for name, argv in [("keys_rotate", ["keys", "rotate", "bench-added-0", "--grace", "1d"]),
                       ("keys_revoke", ["keys", "revoke", "bench-added-1"]),
                       ("auth_file_check", ["auth-file", "check"])]:
        seconds, peak = measured([amproxy] + argv + ["--auth-file", path], env)
        result.update({name + "_seconds": round(seconds, 2), name + "_peak_rss_mb": round(peak, 1)})
    return result


def _reloads_logged(proxy):
    # pread: the server writes through the same file offset, which a seek would move.
    fd = proxy.log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).count(b"auth file reloaded")


def tls_args(cert, key):
    return ["--tls-addr", "127.0.0.1:{tls_port}", "--tls-cert", cert, "--tls-key", key]


def make_certificate(directory):
    """A self-signed certificate for 127.0.0.1 (the openssl command); (cert, key, client context)."""
    import ssl
    cert, key = os.path.join(directory, "bench.pem"), os.path.join(directory, "bench.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key, ssl.create_default_context(cafile=cert)


def tls_handshakes_per_second(sink, auth_file, cert, key, context, seconds=3.0):
    """New TLS connections one worker completes per second (connect, handshake, close)."""
    proxy = Proxy(None, sink, auth_file, 1, tls_args(cert, key))
    try:
        wait_for(lambda: port_open(proxy.tls_port), 30, "the TLS port")
        done, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            with socket.create_connection(("127.0.0.1", proxy.tls_port)) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                    done += 1
        return round(done / (time.monotonic() - started))
    finally:
        proxy.stop()


def routing_cost(repeats=7):
    """The hot path's price of placement: us per accepted line to split 1,000 lines
    over 3 destinations by carbon's ring, less the price of handing them to one.
    The median of several timings (same process, same minute)."""
    import types
    from amproxy import destinations as module
    from amproxy.placement import parse_destinations

    class Counting:
        def __init__(self, *args, **kwargs):
            self.lines = 0

        def enqueue(self, data, lines):
            self.lines += lines
    real, module.CarbonSender = module.CarbonSender, Counting
    try:
        lines = [b"bench.k%d.m%d 123 1764201600" % (i % 10, i % 100) for i in range(1000)]

        def per_line(addresses):
            options = types.SimpleNamespace(
                carbon_addr=parse_destinations(addresses), relay_method="consistent-hashing",
                hash_type="carbon_ch", replication_factor=1, diverse_replicas=True,
                spool_dir="", buffer_size=1000, replay_rate=0, resend_window=0)
            dests = module.Destinations(options, None, time.monotonic, 0)
            dests.send(lines)  # placements cached, as in a running worker
            timings = []
            for _ in range(repeats):
                started = time.perf_counter()
                for _ in range(100):
                    dests.send(lines)
                timings.append((time.perf_counter() - started) / 100 / len(lines) * 1e6)
            return statistics.median(timings)
        return round(per_line("a:1:a,b:1:b,c:1:c") - per_line("a:1"), 3)
    finally:
        module.CarbonSender = real


def calibrate():
    """This machine's speed at the primitive that dominates: HMAC-SHA256 of a short line.

    The performance issue quotes about 1.3 us for ``hmac.digest`` and 0.76 us
    with prepared states on its reference machine; compare these to scale.
    """
    import timeit
    from amproxy.protocol import Signer
    key, text = b"secret-0-" + b"x" * 20, b"bench.k0.m1 123 1764201600 bench0"
    signer = Signer(key)
    number = 200000

    def best(func):
        return round(min(timeit.repeat(func, number=number, repeat=5)) / number * 1e6, 3)
    return {"hmac_digest_us": best(lambda: hmac.digest(key, text, "sha256")),
            "prepared_hmac_us": best(lambda: signer.signature(text))}


def median_of(runs, field):
    values = [r[field] for r in runs if r.get(field) is not None]
    return statistics.median(values) if values else None


def summarize(runs):
    summary = dict(runs[0])
    for field in ("lines_per_s", "cpu_us_per_line"):
        if field in summary:
            value = median_of(runs, field)
            summary[field] = round(value, 3) if isinstance(value, float) else value
    for field in ("lost", "extra"):  # any loss in any run counts
        summary[field] = max(r[field] for r in runs)
    if "peak_rss_mb_per_worker" in summary:
        summary["peak_rss_mb_per_worker"] = max(max(r["peak_rss_mb_per_worker"] or [0])
                                                for r in runs)
    summary["repeats"] = len(runs)
    return summary


def _only(shape):
    """Run one shape on its own sink; print its result."""
    directory = tempfile.mkdtemp(prefix="amproxy-bench-")
    sink = Sink()
    try:
        result = shape(sink, directory)
        print(json.dumps(result), flush=True)
        for field, value in result.items():
            print("| %s | %s |" % (field, value), file=sys.stderr)
        return 0
    finally:
        sink.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1000000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--metrics-per-key", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="one or more worker counts to compare")
    parser.add_argument("--bad-fraction", type=float, default=0.0,
                        help="the fraction of lines with a bad signature")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=COMMAND")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the two baselines: no proxy, and the plain verifier")
    parser.add_argument("--latency", action="store_true", help="measure idle latency")
    parser.add_argument("--big-auth-keys", type=int, default=0,
                        help="also time start-up and a HUP with an auth file this large")
    parser.add_argument("--scale-out", action="store_true",
                        help="also run with 3 destinations and with broadcast to 2")
    parser.add_argument("--rate-limit", action="store_true",
                        help="also run with every key under a (high) rate limit")
    parser.add_argument("--flood", type=int, default=0, metavar="N",
                        help="also time a key's N lines on one connection alone and beside "
                        "3 connections flooding a rate-limited key (one worker)")
    parser.add_argument("--tls", action="store_true",
                        help="also send over TLS, and count the TLS handshakes one worker "
                        "completes per second (needs the openssl command)")
    parser.add_argument("--big-auth-workers", type=int, default=None,
                        help="workers for --big-auth-keys (default: the first --workers)")
    parser.add_argument("--storm", type=int, default=0, metavar="N",
                        help="a fleet's storm: N devices connect at once from 250 loopback "
                        "addresses, one line each, and stay connected")
    parser.add_argument("--churn", type=int, default=0, metavar="N",
                        help="N connections, each one line then closed, from "
                        "--churn-threads threads")
    parser.add_argument("--tls-churn", type=int, default=0, metavar="N",
                        help="N TLS connections as --churn, with full and with resumed "
                        "handshakes (needs the openssl command)")
    parser.add_argument("--churn-threads", type=int, default=8)
    parser.add_argument("--fleet-args", nargs="*", default=[],
                        help="extra amproxy flags for the fleet shapes")
    parser.add_argument("--fleet-only", action="store_true",
                        help="run only --storm, --churn and --tls-churn")
    parser.add_argument("--before", metavar="PATH",
                        help="also run against the amproxy package in PATH (a checkout of "
                        "another commit), as amproxy-before, with the last --workers")
    parser.add_argument("--devices", type=int, default=0, metavar="N",
                        help="also time amproxy devices (a table, JSON, filters, a sort) "
                        "for N keys, most seen, some rejected, some never seen")
    parser.add_argument("--devices-only", action="store_true",
                        help="run only --devices")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    if args.devices_only:
        return _only(lambda sink, directory: devices_shape.devices_shape(args, sink, directory))
    if args.fleet_only:
        directory = tempfile.mkdtemp(prefix="amproxy-bench-")
        sink = Sink()
        try:
            summaries = fleet_shapes(args, sink, directory)
            print(json.dumps({"fleet": summaries}), flush=True)
            print_fleet_table(summaries)
            return 1 if any(value for s in summaries for field, value in s.items()
                            if field == "lost" or field.endswith("_lost")) else 0
        finally:
            sink.stop()

    directory = tempfile.mkdtemp(prefix="amproxy-bench-")
    keys = make_keys(args.keys, args.metrics_per_key)
    auth_file = os.path.join(directory, "auth.yaml")
    write_auth(auth_file, keys)
    sinks = [Sink() for _ in range(max(n for _, n, _, _ in SCALE_OUT) if args.scale_out else 1)]
    sink = sinks[0]
    contenders = [] if args.no_baseline else [
        ("no-proxy", None, None),
        ("plain-verifier", "%s %s {port} {carbon_port} {auth_file}" % (
            shlex.quote(sys.executable), shlex.quote(os.path.join(HERE, "plain_verifier.py"))),
         None)]
    contenders += [("amproxy", None, w) for w in args.workers]
    if args.before:
        contenders.append(("amproxy-before", None, args.workers[-1]))
    variants = (SCALE_OUT if args.scale_out else []) + ([RATE_LIMITED] if args.rate_limit else [])
    tls = None
    if args.tls:
        tls_cert, tls_key, tls = make_certificate(directory)
        variants.append(("amproxy-tls", 1, tls_args(tls_cert, tls_key), 1))
    contenders += [(name, None, args.workers[0]) for name, _, _, _ in variants]
    for spec in args.compare:
        name, _, command = spec.partition("=")
        contenders.append((name, command, None))
    scale_out = {name: (sinks[:n], extra, copies) for name, n, extra, copies in variants}
    results = {}
    try:
        for repeat in range(args.repeats):
            for name, command, workers in contenders:
                run_sinks, extra, copies = scale_out.get(name, ([sink], (), 1))
                result = run_once(name, command, args, run_sinks, auth_file, keys, workers,
                                  extra, copies, tls if name == "amproxy-tls" else None,
                                  {"PYTHONPATH": args.before} if name == "amproxy-before"
                                  else None)
                result["repeat"] = repeat + 1
                print(json.dumps(result), flush=True)
                results.setdefault((name, workers), []).append(result)
        summaries = {key: summarize(runs) for key, runs in results.items()}
        # Ratios are taken within each repeat (same minute, same machine load)
        # and then the median: on a shared machine that is steadier than a
        # ratio of medians.
        first_amproxy = ("amproxy", args.workers[0])
        for key, summary in summaries.items():
            if key[0] == "no-proxy":
                continue
            for reference, field in ((("no-proxy", None), "ratio_to_no_proxy"),
                                     (("plain-verifier", None), "ratio_to_plain_verifier"),
                                     (first_amproxy, "vs_%d_workers" % args.workers[0])):
                if field.startswith("vs_") and not key[0].startswith("amproxy"):
                    continue
                if reference in results and reference != key:
                    summary[field] = round(statistics.median(
                        run["lines_per_s"] / base["lines_per_s"]
                        for run, base in zip(results[key], results[reference])), 3)
        summaries = list(summaries.values())
        extra = {"calibration": calibrate()}
        if args.latency:
            extra["idle_latency_ms_median"] = latency(None, sink, auth_file, keys,
                                                      args.workers[0])
        if args.big_auth_keys:
            extra.update(big_auth_file(args, sink, directory,
                                       args.big_auth_workers or args.workers[0]))
        if args.scale_out:
            extra["routing_us_per_line"] = routing_cost()
        if args.flood:
            extra.update(flood_fairness(args, sink, directory))
        if args.devices:
            extra.update(devices_shape.devices_shape(args, sink, directory))
        if args.tls:
            extra["tls_handshakes_per_s_one_worker"] = tls_handshakes_per_second(
                sink, auth_file, tls_cert, tls_key, tls)
        print(json.dumps({"summary": summaries, **extra,
                          "machine": "%s, %d CPUs, Python %s" % (
                              platform.platform(), os.cpu_count(),
                              platform.python_version())}), flush=True)
        print_table(summaries, extra)
        return 1 if any(s["lost"] for s in summaries) else 0
    finally:
        for each in sinks:
            each.stop()


def print_table(summaries, extra):
    scaling = next((k for s in summaries for k in s if k.startswith("vs_")), None)
    print("\n| proxy | workers | bad | lines/s (median) | vs no proxy | vs plain verifier | "
          "%sCPU us/line | peak RSS/worker MB | lost |" % (
              "%s | " % scaling.replace("_", " ") if scaling else ""), file=sys.stderr)
    print("|---|---|---|---|---|---|%s---|---|---|" % ("---|" if scaling else ""),
          file=sys.stderr)
    for s in summaries:
        print("| %s | %s | %s | %s | %s | %s | %s%s | %s | %s |" % (
            s["proxy"], s.get("workers") or "-", s["bad_fraction"],
            "{:,}".format(int(s["lines_per_s"])), s.get("ratio_to_no_proxy", "-"),
            s.get("ratio_to_plain_verifier", "-"),
            "%s | " % s.get(scaling, "-") if scaling else "", s.get("cpu_us_per_line", "-"),
            s.get("peak_rss_mb_per_worker", "-"), s["lost"]), file=sys.stderr)
    for key, value in extra.items():
        print("%s: %s" % (key, value), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
