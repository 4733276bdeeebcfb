"""A real HAProxy (send-proxy-v2) in front of two amproxy servers, as a site scales out."""
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import free_port, line_for, port_open, wait_for, write_auth
from test_e2e_hostile import counters

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="HAProxy is not installed (apt-get install haproxy; .ci/run "
    "installs it on CI)")

METRICS = ["lb.dev%02d.temp" % i for i in range(20)]
KEYS = {"lb": ("lb-secret", ["lb.**"])}

HAPROXY_CFG = """\
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
frontend devices
    bind 127.0.0.1:{port}
    default_backend amproxy
backend amproxy
    balance roundrobin
    server one 127.0.0.1:{one} send-proxy-v2 check inter 300 fall 1 rise 2
    server two 127.0.0.1:{two} send-proxy-v2 check inter 300 fall 1 rise 2
"""


@pytest.fixture
def lb_auth(tmp_path):
    path = tmp_path / "lb.yaml"
    write_auth(path, KEYS)
    return path


@pytest.fixture
def cluster(carbon, lb_auth, make_proxy, tmp_path):
    """Two amproxy servers behind HAProxy; yields (haproxy port, [proxies])."""
    proxies = []
    for name in ("one", "two"):
        socket_path = str(tmp_path / ("%s.sock" % name))
        proxy = make_proxy(carbon.address, lb_auth, args=[
            "--proxy-protocol", "--skew", "2h", "--stats-socket", socket_path])
        proxy.stats_socket = socket_path
        proxies.append(proxy)
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(port=port, one=proxies[0].port, two=proxies[1].port))
    log = open(tmp_path / "haproxy.log", "wb")
    process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    try:
        wait_for(lambda: process.poll() is not None or port_open(port), 10,
                 what="HAProxy to listen")
        assert process.poll() is None, (tmp_path / "haproxy.log").read_text()
        yield port, proxies
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_lines_from_both_servers_arrive_and_rejections_name_the_client(carbon, cluster):
    port, proxies = cluster
    now = int(time.time())
    clients = []
    for n, metric in enumerate(METRICS):
        sock = connect(port)
        clients.append(sock)
        good = line_for(KEYS, "lb", metric, float(n), now - 5)
        sock.sendall(good + good.replace(b" %d.0 " % n, b" %d.5 " % n))  # second: bad signature
    wait_for(lambda: all(carbon.points(m, now - 10).get(now - 5) == float(n)
                         for n, m in enumerate(METRICS)), 15, interval=0.2,
             what="every line through HAProxy in whisper")
    # Round robin: both servers forwarded some (they report once a second).
    forwarded = wait_for(lambda: (lambda f: f if sum(f) == len(METRICS) else None)(
        [counters(p)["linesForwarded"] for p in proxies]), 5, what="all lines counted")
    assert min(forwarded) > 0, forwarded
    # Each rejection is logged with the device's address, as the device sees its socket.
    for sock in clients:
        client = "reason=badSignature remote=127.0.0.1:%d " % sock.getsockname()[1]
        wait_for(lambda: client in proxies[0].log() + proxies[1].log(), 5,
                 what="a rejection logged with %s" % client)
        sock.close()


def test_stopping_one_server_loses_nothing_it_accepted(carbon, cluster):
    port, proxies = cluster
    start = int(time.time()) - 3000
    points = [(m, start + i, float(i)) for i in range(200) for m in METRICS]
    stopped = False
    sock = None
    begun = time.monotonic()
    for batch_start in range(0, len(points), 100):
        if sock is None:
            try:
                sock = connect(port)
            except OSError:
                continue  # HAProxy has no server for a moment: these were never accepted
        batch = points[batch_start:batch_start + 100]
        try:
            sock.sendall(b"".join(line_for(KEYS, "lb", m, v, ts) for m, ts, v in batch))
        except OSError:
            sock.close()
            sock = None  # the device reconnects: HAProxy sends it to the other server
        if not stopped and batch_start >= len(points) // 3:
            proxies[0].signal(signal.SIGTERM)
            stopped = True
        if batch_start % 1000 == 0 and sock is not None:
            sock.close()
            sock = None  # devices reconnect now and then: both servers get some
        time.sleep(max(0.0, begun + batch_start / 2000 - time.monotonic()))  # pacing
    if sock is not None:
        sock.close()
    assert proxies[0].wait_exit(40) == 0
    forwarded_by_stopped = sum(int(n) for n in re.findall(
        r'msg="worker stopped" forwarded=(\d+)', proxies[0].log()))
    assert forwarded_by_stopped > 0
    # What both servers accepted is exactly what whisper holds: nothing accepted is lost.
    def stored():  # the points of this test only (the Carbon is shared)
        return sum(1 for m in METRICS for ts in carbon.points(m, start) if ts < start + 200)
    survivor = proxies[1]
    wait_for(lambda: counters(survivor)["linesForwarded"] + forwarded_by_stopped == stored()
             and stored() > 0, 30, interval=0.5,
             what="every accepted line in whisper")
    assert "they are lost" not in proxies[0].log()
