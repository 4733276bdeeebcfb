import select
import socket
import subprocess
import threading
import time

import pytest

from amproxy.auth import AuthKey, KeyMap
from amproxy.client import Client
from amproxy.protocol import filter_lines
from conftest import AMPROXY, KEYS, free_port, wait_for, wait_points
from test_protocol import VECTORS


class Collector:
    """A TCP server that records what each connection sent."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.connections = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            received = []
            self.connections.append(received)
            threading.Thread(target=self._read, args=(conn, received), daemon=True).start()

    @staticmethod
    def _read(conn, received):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                received.append(data)

    def lines(self):
        return b"".join(b"".join(c) for c in self.connections).splitlines()

    def close(self):
        self.sock.close()


def test_client_batches_over_one_connection_and_signs_correctly():
    server = Collector()
    try:
        with Client("127.0.0.1:%d" % server.port, "alpha", "alpha-secret",
                    batch_size=10) as client:
            for i in range(25):
                client.send("e2e.alpha.temp", i, 1764201600 + i)
            assert client.queued == 5  # two batches of 10 went out
        wait_for(lambda: len(server.lines()) == 25, 5, what="25 lines")
        assert len(server.connections) == 1
        key = KeyMap({b"alpha": AuthKey("alpha", "alpha-secret", ["e2e.alpha.temp"])})
        accepted = filter_lines(server.lines(), key, 1764201600, 3600, None)
        assert len(accepted) == 25
    finally:
        server.close()


def test_client_buffers_while_unreachable_and_resends_after_reconnect():
    port = free_port()
    client = Client("127.0.0.1:%d" % port, "alpha", "alpha-secret", timeout=1)
    client.send("m", 1, 1764201600)
    assert not client.flush()  # nobody listens yet
    client.send("m", 2, 1764201601)
    assert client.queued == 2
    server = Collector(port)
    try:
        assert client.flush()
        assert client.queued == 0
        wait_for(lambda: len(server.lines()) == 2, 5, what="the buffered lines")
        client.close()
    finally:
        server.close()


def test_client_connects_again_when_the_server_ends_the_stream():
    """A stopping or upgrading amproxy ends the stream to each client; the lines sent
    after that go on a new connection, not into the one about to close."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(5)
    client = Client("127.0.0.1:%d" % server.getsockname()[1], "k", "s")
    try:
        client.send("m", 1)
        assert client.flush()
        first, _ = server.accept()
        first.shutdown(socket.SHUT_WR)  # as a stopping worker does
        wait_for(lambda: select.select([client._sock], [], [], 0)[0], 5,
                 what="the end of the stream to arrive")
        client.send("m", 2)
        assert client.flush()
        second, _ = server.accept()
        second.settimeout(5)
        assert b" 2 " in second.recv(4096)
        first.settimeout(5)
        assert b" 2 " not in first.recv(4096)
    finally:
        client.close()
        server.close()


def test_client_flush_can_raise_instead_of_keeping_lines_quietly():
    client = Client("127.0.0.1:%d" % free_port(), "k", "s", timeout=1)
    client.send("m", 1, 1764201600)
    with pytest.raises(ConnectionRefusedError):
        client.flush(raise_errors=True)
    assert client.queued == 1  # still there for a caller that wants to retry


def test_client_queue_is_bounded():
    client = Client("127.0.0.1:%d" % free_port(), "k", "s", batch_size=1000, max_queued=3)
    for i in range(5):
        client.send("m", i, 1764201600)
    assert client.queued == 3


def test_cli_send_one_point(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    ts = int(time.time()) - 42
    result = subprocess.run(
        [AMPROXY, "client", "send", "e2e.beta.temp", "21.5", str(ts), "--server-addr",
         "127.0.0.1:%d" % proxy.port],
        env={"KEY_PUBLIC": "beta", "KEY_PRIVATE": KEYS["beta"][0], "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    wait_points(carbon, "e2e.beta.temp", {ts: 21.5}, ts)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["note"] for v in VECTORS])
def test_cli_signature_reproduces_every_vector(vector):
    result = subprocess.run([AMPROXY, "client", "signature", vector["signed_text"]],
                            env={"KEY_PRIVATE": vector["secret_key"], "LANG": "C.UTF-8"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == vector["signature"]


def test_cli_signature_needs_a_secret():
    missing = subprocess.run([AMPROXY, "client", "signature", "x"], env={},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "KEY_PRIVATE" in missing.stderr
