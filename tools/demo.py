"""``make run``: a real carbon-cache, amproxy in front of it, the test client, a
device that gets some of its lines rejected, and graphite-web showing it all.

Everything lives under ./run (``--run-dir``); stop it with Ctrl-C.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devcarbon import CarbonCache, free_port, port_open, wait_for  # noqa: E402
from graphiteweb import DASHBOARD_FILE, GraphiteWeb, missing_requirement  # noqa: E402

from amproxy.protocol import signed_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# The dashboard make run prints: the shipped one, with the demo device's graph first
# and a short time range, since everything here has just started.
DEMO_DASHBOARD = "amproxy-demo"
DEMO_RANGE_MINUTES = 5
DEVICE_METRIC = "metric1"


def demo_dashboard():
    with open(DASHBOARD_FILE) as f:
        state = json.load(f)
    state["name"] = DEMO_DASHBOARD
    state["timeConfig"]["relativeStartQuantity"] = str(DEMO_RANGE_MINUTES)
    state["defaultGraphParams"]["from"] = "-%dminutes" % DEMO_RANGE_MINUTES
    title = "The demo device: %s (my_public_key)" % DEVICE_METRIC
    state["graphs"].insert(0, [DEVICE_METRIC, {"target": [DEVICE_METRIC], "title": title}, ""])
    return state


# The broken device has a key of its own: amproxy devices shows it failing, and the
# devices.rejectedOnly series counts it, while the test client's key stays clean.
BROKEN_KEY, BROKEN_SECRET = "my_public_key2", "my_secret_key2"


def bad_lines(now):
    """Three lines amproxy rejects, one per reason: what a broken device sends."""
    return [
        # A signature made with the wrong secret: badSignature.
        signed_line("not_my_secret_key", "metric3", 1, now, BROKEN_KEY),
        # A clock an hour ahead (more than --skew, 5 min): skew.
        signed_line(BROKEN_SECRET, "metric3", 1, now + 3600, BROKEN_KEY),
        # A metric of another key (my_public_key's): metricNotAllowed.
        signed_line(BROKEN_SECRET, "metric1", 1, now, BROKEN_KEY),
    ]


def send_bad_lines(port, interval, stop):
    """Until ``stop`` is set, send the three rejected lines every ``interval`` s."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"".join(bad_lines(int(time.time()))))
        except OSError:
            pass  # amproxy is stopping; the main loop sees it
        stop.wait(interval)


def demo_running(stats_socket):
    """Whether an amproxy answers on the demo's stats socket (before anything else
    rewrites the running demo's files)."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(stats_socket)
            return True
    except OSError:
        return False


def interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=os.path.join(ROOT, "run"),
                        help="where carbon, graphite-web and amproxy keep their files")
    parser.add_argument("--interval", default="5s",
                        help="how often the test client sends a point (default 5s)")
    parser.add_argument("--stats-interval", default="10s",
                        help="how often amproxy sends its self-metrics (default 10s)")
    parser.add_argument("--bad-interval", type=float, default=15,
                        help="seconds between the rejected lines' rounds (default 15)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    problem = missing_requirement()
    if problem:
        raise SystemExit("make run: " + problem)
    # A SIGTERM (kill, a test's cleanup) or a SIGHUP (the terminal closed) stops
    # everything as Ctrl-C does: the servers run in sessions of their own.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    run_dir = os.path.abspath(args.run_dir)
    if demo_running(os.path.join(run_dir, "amproxy.stats.sock")):
        raise SystemExit("make run: a demo is already running in %s; stop it (Ctrl-C where "
                         "it runs) or give this one another --run-dir" % run_dir)
    carbon = CarbonCache(os.path.join(run_dir, "carbon"),
                         line_port=int(os.environ.get("CARBON_PORT", 0)) or None).start()
    graphite = GraphiteWeb(os.path.join(run_dir, "graphite"), carbon,
                           port=int(os.environ.get("GRAPHITE_PORT", 0)) or None)
    proxy_port = int(os.environ.get("PROXY_PORT", 0)) or free_port()
    auth_file = os.path.join(ROOT, "etc", "auth_file.yaml")
    # git checks files out world-readable; an auth file holds secrets (amproxy warns).
    os.chmod(auth_file, os.stat(auth_file).st_mode & ~0o007)
    env = dict(os.environ, AUTH_FILE=auth_file,
               ADDR="127.0.0.1:%d" % proxy_port, CARBON_ADDR=carbon.address, WORKERS="2")
    proxy = client = None
    stop_bad = threading.Event()
    try:
        graphite.start()
        graphite.load_dashboard(state=demo_dashboard())
        # The sample config, with paths a user without root can write; the
        # self-metrics go to the same carbon-cache, under amproxy.<host>.
        proxy = subprocess.Popen([os.path.join(BIN, "amproxy"), "server", "--config",
                                  os.path.join(ROOT, "etc", "amproxy.conf"), "--addr",
                                  env["ADDR"], "--carbon-addr", carbon.address,
                                  "--spool-dir", os.path.join(run_dir, "spool"),
                                  "--stats-socket", os.path.join(run_dir, "amproxy.stats.sock"),
                                  "--stats-interval", args.stats_interval],
                                 env=env)
        wait_for(lambda: proxy.poll() is not None or port_open(proxy_port), 10,
                 what="amproxy to listen")
        if proxy.poll() is not None:
            raise SystemExit("amproxy exited at start (status %d); its error is above"
                             % proxy.returncode)
        client = subprocess.Popen([os.path.join(BIN, "amproxy"), "client", "test-client",
                                   "--interval", args.interval, "--server-addr", env["ADDR"]],
                                  env=dict(env, KEY_PUBLIC="my_public_key",
                                           KEY_PRIVATE="my_secret_key"))
        threading.Thread(target=send_bad_lines, args=(proxy_port, args.bad_interval, stop_bad),
                         daemon=True).start()
        print("\ncarbon-cache listens on %s, amproxy on 127.0.0.1:%d, graphite-web on %s\n"
              "The test client sends %s every %s; every %g s a broken device sends three\n"
              "lines amproxy rejects (bad signature, clock an hour ahead, a metric not its\n"
              "key's).\n"
              "amproxy sends its self-metrics every %s. See it all, refreshed every 10 s, at\n\n"
              "    %s\n\n"
              "The points land in %s\n"
              "Read them with: %s/whisper-fetch.py --from=$(( $(date +%%s) - 300 )) %s\n"
              "Its devices and totals: %s/amproxy devices --stats-socket %s (or stats)\n"
              "Ctrl-C stops everything.\n" % (
                  carbon.address, proxy_port, "127.0.0.1:%d" % graphite.port, DEVICE_METRIC,
                  args.interval, args.bad_interval, args.stats_interval,
                  graphite.dashboard_url(DEMO_DASHBOARD),
                  carbon.whisper_path(DEVICE_METRIC), BIN,
                  carbon.whisper_path(DEVICE_METRIC), BIN,
                  os.path.join(run_dir, "amproxy.stats.sock")), flush=True)
        while proxy.poll() is None and client.poll() is None:
            if graphite.process.poll() is not None:
                print("graphite-web exited (status %d); see %s" % (
                    graphite.process.returncode, graphite.log_path), flush=True)
                break
            time.sleep(1)
        failed = "a part of the demo stopped on its own (its error is above)"
    except KeyboardInterrupt:
        failed = None
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # one stop at a time
        stop_bad.set()
        for process in (client, proxy):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(40)
        graphite.stop()
        carbon.stop()
        print("stopped; the whisper files stay in %s" % carbon.whisper_dir, flush=True)
    if failed:
        raise SystemExit("make run: " + failed)


if __name__ == "__main__":
    main()
