"""The TLS listener: devices on untrusted networks, with certificates the test makes."""
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

from conftest import (AMPROXY, KEYS, client_connections, free_port, line_for, wait_for,
                      wait_points)
from test_e2e_hostile import counters

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not "
                                "installed (apt-get install openssl; .ci/run installs it)")


def openssl(*args, cwd):
    subprocess.run([OPENSSL] + list(args), cwd=cwd, check=True, capture_output=True,
                   timeout=60)


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=%s" % name, "-keyout", name + ".key", "-out", name + ".pem", cwd=directory)


def make_cert(directory, name, ca, san):
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=%s" % name,
            "-keyout", name + ".key", "-out", name + ".csr", cwd=directory)
    with open(os.path.join(directory, name + ".ext"), "w") as f:
        f.write("subjectAltName=%s\n" % san)
    openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
            "-CAcreateserial", "-days", "2", "-extfile", name + ".ext", "-out", name + ".pem",
            cwd=directory)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA and the server's certificate; a client CA, a client, and one from a stranger."""
    d = str(tmp_path_factory.mktemp("certs"))
    make_ca(d, "ca")
    make_cert(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    make_ca(d, "client-ca")
    make_cert(d, "device", "client-ca", "DNS:device1")
    make_ca(d, "stranger-ca")
    make_cert(d, "stranger", "stranger-ca", "DNS:stranger")
    make_cert(d, "renewed", "ca", "IP:127.0.0.1")
    return lambda name: os.path.join(d, name)


@pytest.fixture
def tls_proxy(carbon, auth_file, make_proxy, tmp_path, certs):
    def make(*args, workers=2):
        port = free_port()
        sock = str(tmp_path / ("stats-%d.sock" % port))
        proxy = make_proxy(carbon.address, auth_file, workers=workers, args=[
            "--tls-addr", "127.0.0.1:%d" % port, "--tls-cert", certs("server.pem"),
            "--tls-key", certs("server.key"), "--stats-socket", sock] + list(args))
        proxy.tls_port, proxy.stats_socket = port, sock
        wait_for(lambda: port_open(port), 5, what="the TLS port")
        return proxy
    return make


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def tls_connect(port, certs, cert=None):
    context = ssl.create_default_context(cafile=certs("ca.pem"))
    if cert:
        context.load_cert_chain(certs(cert + ".pem"), certs(cert + ".key"))
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                               server_hostname="127.0.0.1")


def closed_by_server(sock, timeout=5):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


def test_lines_over_tls_and_plain_reach_whisper_side_by_side(carbon, tls_proxy, certs):
    proxy = tls_proxy()
    now = int(time.time())
    with tls_connect(proxy.tls_port, certs) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        # Far more than one TLS record, in pieces: everything decrypted is read.
        sock.sendall(b"".join(line_for(KEYS, "alpha", "e2e.alpha.temp", float(i), now - 250 + i)
                              for i in range(240)))
    proxy.send(line_for(KEYS, "alpha", "e2e.alpha.humidity", 3.25, now - 2))
    wait_points(carbon, "e2e.alpha.temp", {now - 250 + i: float(i) for i in range(240)},
                now - 260)
    wait_points(carbon, "e2e.alpha.humidity", {now - 2: 3.25}, now - 10)


def test_the_client_command_sends_over_tls(carbon, tls_proxy, certs):
    proxy = tls_proxy()
    now = int(time.time())
    env = dict(os.environ, KEY_PUBLIC="alpha", KEY_PRIVATE=KEYS["alpha"][0],
               SERVER_ADDR="127.0.0.1:%d" % proxy.tls_port)
    result = subprocess.run([AMPROXY, "client", "send", "--tls", "--ca-file", certs("ca.pem"),
                             "e2e.alpha.humidity", "4.5", str(now - 3)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    wait_points(carbon, "e2e.alpha.humidity", {now - 3: 4.5}, now - 10)
    # Without the CA the server's certificate is not trusted: one clear error.
    result = subprocess.run([AMPROXY, "client", "send", "--tls", "e2e.alpha.humidity", "1"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "the certificate of amproxy at 127.0.0.1:%d was not accepted" % proxy.tls_port \
        in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("what", ["plain text to the TLS port", "TLS to the plain port",
                                  "a forged record", "a stalled handshake"])
def test_bad_tls_is_closed_and_counted_and_other_clients_go_on(carbon, tls_proxy, certs, what):
    proxy = tls_proxy(workers=1)  # the one worker must keep serving everyone
    now = int(time.time())
    if what == "plain text to the TLS port":
        bad = socket.create_connection(("127.0.0.1", proxy.tls_port))
        bad.sendall(line_for(KEYS, "alpha", "e2e.alpha.temp", 1) * 3)
    elif what == "TLS to the plain port":
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = ssl.create_default_context(cafile=certs("ca.pem")).wrap_bio(
            incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        bad = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        bad.sendall(outgoing.read())  # a ClientHello
    elif what == "a forged record":
        bad = tls_connect(proxy.tls_port, certs)
        raw = socket.socket(fileno=os.dup(bad.fileno()))
        raw.sendall(b"\x17\x03\x03\x00\x40" + os.urandom(64))  # whole, but not sealed by the key
        raw.close()
    else:
        bad = socket.create_connection(("127.0.0.1", proxy.tls_port))
        bad.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    # Meanwhile another device's lines go through at once.
    with tls_connect(proxy.tls_port, certs) as good:
        good.sendall(line_for(KEYS, "alpha", "e2e.alpha.temp", 77.0, now - 4))
    wait_points(carbon, "e2e.alpha.temp", {now - 4: 77.0}, now - 10)
    assert closed_by_server(bad, 15), what
    bad.close()
    wait_for(lambda: counters(proxy)["tlsHandshakeErrors"] >= 1, 5, what="the error counted")
    assert proxy.process.poll() is None and len(proxy.workers()) == 1
    assert "Traceback" not in proxy.log()


def test_client_certificates_are_required_with_tls_client_ca(carbon, tls_proxy, certs):
    proxy = tls_proxy("--tls-client-ca", certs("client-ca.pem"))
    now = int(time.time())
    with tls_connect(proxy.tls_port, certs, cert="device") as sock:
        sock.sendall(line_for(KEYS, "alpha", "e2e.alpha.humidity", 8.5, now - 5))
    wait_points(carbon, "e2e.alpha.humidity", {now - 5: 8.5}, now - 10)
    for cert in (None, "stranger"):
        try:
            sock = tls_connect(proxy.tls_port, certs, cert=cert)
            sock.sendall(line_for(KEYS, "alpha", "e2e.alpha.humidity", 9.5, now - 6))
            assert closed_by_server(sock)
            sock.close()
        except (ssl.SSLError, OSError):
            pass  # refused during the handshake (TLS 1.2) or right after it (TLS 1.3)
    wait_for(lambda: counters(proxy)["tlsHandshakeErrors"] == 2, 5, what="both counted")
    assert 9.5 not in carbon.points("e2e.alpha.humidity", now - 10).values()
    # The client learns that it was refused (TLS 1.3 says so only after the handshake),
    # instead of reporting a point sent that was lost.
    env = dict(os.environ, KEY_PUBLIC="alpha", KEY_PRIVATE=KEYS["alpha"][0],
               SERVER_ADDR="127.0.0.1:%d" % proxy.tls_port)
    refused = subprocess.run([AMPROXY, "client", "send", "--tls", "--ca-file", certs("ca.pem"),
                              "e2e.alpha.humidity", "9.5"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert "the server refused this client" in refused.stderr
    accepted = subprocess.run([AMPROXY, "client", "send", "--tls", "--ca-file", certs("ca.pem"),
                               "--client-cert", certs("device.pem"), "--client-key",
                               certs("device.key"), "e2e.alpha.humidity", "10.5", str(now - 7)],
                              env=env, capture_output=True, text=True, timeout=30)
    assert accepted.returncode == 0, accepted.stderr
    wait_points(carbon, "e2e.alpha.humidity", {now - 7: 10.5}, now - 10)


def test_hup_reads_a_renewed_certificate_and_keeps_the_old_if_the_new_is_bad(
        tls_proxy, certs, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(certs("server.pem"), cert)
    shutil.copy(certs("server.key"), key)
    proxy = tls_proxy("--tls-cert", str(cert), "--tls-key", str(key))

    def serial():
        with tls_connect(proxy.tls_port, certs) as sock:
            return sock.getpeercert()["serialNumber"]
    first = serial()
    cert.write_text("not a certificate\n")
    proxy.signal(signal.SIGHUP)
    # The master checks the files and says so once; the workers keep the pair in use.
    proxy.wait_log("TLS certificate not reloaded, keeping the one in use: TLS certificate "
                   "file %s cannot be used: it holds no PEM certificate" % cert)
    assert serial() == first
    shutil.copy(certs("renewed.pem"), cert)
    shutil.copy(certs("renewed.key"), key)
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("TLS certificate reloaded", count=2)
    assert serial() != first
    assert "PRIVATE KEY" not in proxy.log()


def test_a_key_that_cannot_be_read_is_one_clear_error_at_start(auth_file, certs, tmp_path):
    result = subprocess.run([AMPROXY, "server", "--auth-file", str(auth_file), "--addr",
                             "127.0.0.1:%d" % free_port(), "--tls-addr",
                             "127.0.0.1:%d" % free_port(), "--tls-cert", certs("server.pem"),
                             "--tls-key", str(tmp_path / "missing.key")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "TLS key file %s cannot be read: No such file or directory" % (
        tmp_path / "missing.key") in result.stderr
    assert "Traceback" not in result.stderr


def reset_connection(port, data=b""):
    """Connect, maybe send, and close with a reset (as HAProxy's health checks do)."""
    sock = socket.create_connection(("127.0.0.1", port))
    if data:
        sock.sendall(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_a_connection_reset_before_it_is_accepted_costs_the_worker_nothing(
        carbon, tls_proxy, certs):
    proxy = tls_proxy(workers=1)
    worker = proxy.workers()[0]
    os.kill(worker, signal.SIGSTOP)  # so the resets happen before the accept
    try:
        for data in (b"", b"\x16\x03\x01"):
            for _ in range(5):
                reset_connection(proxy.tls_port, data)
    finally:
        os.kill(worker, signal.SIGCONT)
    now = int(time.time())
    with tls_connect(proxy.tls_port, certs) as sock:
        sock.sendall(line_for(KEYS, "alpha", "e2e.alpha.temp", 12.5, now - 8))
    wait_points(carbon, "e2e.alpha.temp", {now - 8: 12.5}, now - 10)
    assert proxy.workers() == [worker]
    assert "worker crashed" not in proxy.log()


def test_a_stop_reads_everything_a_tls_client_sent(carbon, tls_proxy, certs):
    proxy = tls_proxy("--skew", "2h", workers=1)
    proxy.wait_log("workers ready")
    now = int(time.time())
    points = {now - 3000 + i: float(i) for i in range(1000)}
    sock = tls_connect(proxy.tls_port, certs)
    sock.sendall(line_for(KEYS, "alpha", "e2e.alpha.temp", 0.0, now - 3000))
    worker = proxy.workers()[0]
    os.kill(worker, signal.SIGSTOP)
    try:
        lines = [line_for(KEYS, "alpha", "e2e.alpha.temp", v, ts) for ts, v in points.items()]
        for batch in range(4):  # as Client.flush writes: many records, queued unread
            sock.sendall(b"".join(lines[batch * 250:(batch + 1) * 250]))
        proxy.signal(signal.SIGTERM)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert proxy.wait_exit(30) == 0
    sock.close()
    wait_points(carbon, "e2e.alpha.temp", points, now - 3010)


def ticketed_connection(port, context, session=None):
    """A TLS connection (resuming ``session`` if given) whose ticket has arrived: a
    TLS 1.3 server sends it after the handshake, and only a read takes it in."""
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                               server_hostname="127.0.0.1", session=session)
    sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        sock.recv(1)  # amproxy writes nothing: a timeout, with the ticket read
    return sock


def worker_holding(proxy, port):
    """The worker that holds the one open client connection to ``port``."""
    holders = [pid for pid in proxy.workers() if client_connections(pid, port) == 1]
    assert len(holders) == 1, holders
    return holders[0]


@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_a_device_resumes_its_session_on_the_other_worker_and_after_a_reload(
        carbon, tls_proxy, certs, version):
    # TLS 1.3 tickets come after the handshake: only for devices that read them.
    proxy = tls_proxy(*([] if version else ["--tls-session-tickets"]), workers=2)
    now = int(time.time())
    context = ssl.create_default_context(cafile=certs("ca.pem"))
    if version:
        context.maximum_version = version
    first = ticketed_connection(proxy.tls_port, context)
    assert not first.session_reused
    first_worker = worker_holding(proxy, proxy.tls_port)
    # While the first holds a connection, the other worker takes the next one
    # (fewest connections), and accepts the ticket the first issued.
    second = ticketed_connection(proxy.tls_port, context, first.session)
    assert second.session_reused
    assert {pid for pid in proxy.workers() if client_connections(pid, proxy.tls_port)} == \
        set(proxy.workers()) and first_worker in proxy.workers()
    session = second.session  # a closed socket has none to give
    for i, sock in enumerate((first, second)):
        sock.sendall(line_for(KEYS, "alpha", "e2e.alpha.temp", 700 + i, now - 150 + i))
        sock.close()
    wait_points(carbon, "e2e.alpha.temp", {now - 150: 700.0, now - 149: 701.0}, now - 160)
    # A reload renews each worker's context (the certificate may have changed):
    # tickets issued before it still resume.
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("TLS certificate reloaded", count=2)
    third = ticketed_connection(proxy.tls_port, context, session)
    assert third.session_reused
    third.close()
    assert counters(proxy)["tlsHandshakeErrors"] == 0


# -- certificate reloads: the master checks each new pair, and every worker, including
# -- those started later, serves the last good one (issue 21, finding 5)


def renewable_pair(tmp_path, certs):
    """Copies of the server's certificate and key, for a test to replace."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(certs("server.pem"), cert)
    shutil.copy(certs("server.key"), key)
    return cert, key


def der_of(certs, name):
    with open(certs(name + ".pem")) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def held_connection(port, certs):
    """A TLS connection, held open, once its worker counts it (it then takes no other
    new client while another worker holds fewer)."""
    sock = tls_connect(port, certs)
    sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        sock.recv(1)  # amproxy writes nothing
    return sock


def certificates_served(proxy, certs):
    """{worker pid: the certificate it serves (DER)}, from one connection held on each
    of the two workers."""
    first = held_connection(proxy.tls_port, certs)
    try:
        with held_connection(proxy.tls_port, certs) as second:
            served = {worker_holding_one(proxy, sock): sock.getpeercert(binary_form=True)
                      for sock in (first, second)}
    finally:
        first.close()
    assert set(served) == set(proxy.workers()), served
    return served


def worker_holding_one(proxy, sock):
    """The worker holding the server's end of ``sock``."""
    local_port = sock.getsockname()[1]
    for pid in proxy.workers():
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in peer_inodes(local_port):
                return pid
    raise AssertionError("no worker holds the connection from port %d" % local_port)


def peer_inodes(client_port):
    """Inodes of the established TCP sockets whose remote port is ``client_port``."""
    with open("/proc/net/tcp") as f:
        next(f)
        return {row.split()[9] for row in f if row.split()[3] == "01"
                and int(row.split()[2].split(":")[1], 16) == client_port}


def replace_worker(proxy, pid):
    """SIGKILL worker ``pid``: the one the master starts in its place."""
    others = set(proxy.workers()) - {pid}
    os.kill(pid, signal.SIGKILL)
    new = wait_for(lambda: len(proxy.workers()) == len(others) + 1 and
                   set(proxy.workers()) - others - {pid}, 10, what="a new worker")
    return next(iter(new))


def send_over_tls(proxy, certs, value, timestamp):
    with tls_connect(proxy.tls_port, certs) as sock:
        sock.sendall(line_for(KEYS, "alpha", "e2e.alpha.temp", value, timestamp))


def test_a_worker_started_after_a_broken_renewal_serves_the_last_good_pair(
        carbon, tls_proxy, certs, tmp_path):
    cert, key = renewable_pair(tmp_path, certs)
    proxy = tls_proxy("--tls-cert", str(cert), "--tls-key", str(key), workers=1)
    proxy.wait_log("workers ready")
    key.write_text("not a key\n")
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("TLS certificate not reloaded")
    replace_worker(proxy, proxy.workers()[0])
    now = int(time.time())
    send_over_tls(proxy, certs, 31.5, now - 11)
    wait_points(carbon, "e2e.alpha.temp", {now - 11: 31.5}, now - 20)
    with tls_connect(proxy.tls_port, certs) as sock:
        assert sock.getpeercert(binary_form=True) == der_of(certs, "server")
    # Checked once, by the master: one line, naming the file at fault.
    assert re.findall('TLS certificate not reloaded[^"]*', proxy.log()) == [
        "TLS certificate not reloaded, keeping the one in use: TLS key file %s holds no "
        "private key amproxy can read" % key]
    assert "this worker takes no TLS clients" not in proxy.log()


def open_fifo_writer(path):
    """Wake anyone blocked opening the FIFO at ``path`` (it then reads an empty file)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no one is waiting


def test_a_fifo_at_the_certificate_path_is_refused_and_blocks_no_worker(
        carbon, tls_proxy, certs, tmp_path):
    cert, key = renewable_pair(tmp_path, certs)
    proxy = tls_proxy("--tls-cert", str(cert), "--tls-key", str(key),
                      "--worker-timeout", "3s", workers=2)
    proxy.wait_log("workers ready", count=1)
    workers = proxy.workers()
    os.unlink(cert)
    os.mkfifo(cert)
    try:
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("auth file reloaded", count=2)  # by each worker, after the HUP
        now = int(time.time())
        for i in range(4):  # over both listeners, to both workers
            proxy.send(line_for(KEYS, "alpha", "e2e.alpha.humidity", 40.0 + i, now - 20 + i))
            send_over_tls(proxy, certs, 50.0 + i, now - 20 + i)
        wait_points(carbon, "e2e.alpha.humidity", {now - 20 + i: 40.0 + i for i in range(4)},
                    now - 30)
        wait_points(carbon, "e2e.alpha.temp", {now - 20 + i: 50.0 + i for i in range(4)},
                    now - 30)
        # Both workers serve (neither is blocked), and so does one started now.
        assert certificates_served(proxy, certs) == dict.fromkeys(workers, der_of(certs, "server"))
        new = replace_worker(proxy, workers[0])
        served = certificates_served(proxy, certs)
        assert served == {workers[1]: der_of(certs, "server"), new: der_of(certs, "server")}
        assert "worker hung" not in proxy.log() and proxy.workers() == sorted([workers[1], new])
        assert ("TLS certificate not reloaded, keeping the one in use: TLS certificate file "
                "%s is a FIFO, not a regular file" % cert) in proxy.log()
    finally:
        open_fifo_writer(str(cert))


def test_a_renewed_pair_is_served_by_every_worker_and_by_those_started_later(
        carbon, tls_proxy, certs, tmp_path):
    cert, key = renewable_pair(tmp_path, certs)
    proxy = tls_proxy("--tls-cert", str(cert), "--tls-key", str(key), workers=2)
    proxy.wait_log("workers ready")
    assert set(certificates_served(proxy, certs).values()) == {der_of(certs, "server")}
    shutil.copy(certs("renewed.pem"), cert)
    shutil.copy(certs("renewed.key"), key)
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("TLS certificate reloaded", count=2)
    assert set(certificates_served(proxy, certs).values()) == {der_of(certs, "renewed")}
    # Files changed without a SIGHUP (a renewal half written) are not read: a worker
    # started now serves the pair the master last checked, as the others do.
    key.write_text("half a key\n")
    new = replace_worker(proxy, proxy.workers()[0])
    served = certificates_served(proxy, certs)
    assert new in served and set(served.values()) == {der_of(certs, "renewed")}
    now = int(time.time())
    send_over_tls(proxy, certs, 61.5, now - 12)
    wait_points(carbon, "e2e.alpha.temp", {now - 12: 61.5}, now - 20)
    assert "PRIVATE KEY" not in proxy.log()


def refused_files(tmp_path, certs, what):
    """A certificate pair with one thing wrong: (cert, key, the message expected)."""
    cert, key = renewable_pair(tmp_path, certs)
    if what == "fifo key":
        os.unlink(key)
        os.mkfifo(key)
        return cert, key, "TLS key file %s is a FIFO, not a regular file" % key
    if what == "directory":
        return tmp_path, key, "TLS certificate file %s is a directory, not a regular file" % (
            tmp_path)
    if what == "device":
        return cert, "/dev/zero", "TLS key file /dev/zero is a device, not a regular file"
    if what == "too large":
        with open(cert, "ab") as f:
            f.write(b"#" * (1 << 20))
        return cert, key, "TLS certificate file %s is larger than 1024 KiB" % cert
    if what == "encrypted key":
        openssl("pkey", "-in", certs("server.key"), "-aes256", "-passout", "pass:x", "-out",
                str(key), cwd=str(tmp_path))
        return cert, key, ("TLS key file %s is encrypted; amproxy needs it without a "
                           "passphrase" % key)
    shutil.copy(certs("renewed.key"), key)
    return cert, key, "TLS key file %s does not belong to the certificate in %s" % (key, cert)


@pytest.mark.parametrize("what", ["fifo key", "directory", "device", "too large",
                                  "encrypted key", "another's key"])
def test_certificate_files_are_refused_in_one_sentence_naming_the_file(
        tmp_path, certs, what):
    from amproxy.errors import AmproxyError
    from amproxy.tls import CertificateFiles
    cert, key, expected = refused_files(tmp_path, certs, what)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(AmproxyError) as refused:
        CertificateFiles.read(str(cert), str(key))  # never blocks (FIFO, device)
    assert str(refused.value) == expected
    assert len(os.listdir("/proc/self/fd")) == fds_before  # nothing left open


def test_certificate_files_are_a_sealed_copy_that_loads_wherever_they_are_sent(
        tmp_path, certs):
    from amproxy.links import SnapshotChannel
    from amproxy.tls import CertificateFiles
    cert, key = renewable_pair(tmp_path, certs)
    files = CertificateFiles.read(str(cert), str(key), certs("client-ca.pem"))
    key.write_text("changed since\n")  # the copy is what was checked
    channel = SnapshotChannel()
    channel.send_certificate(files)
    files.close()
    [received] = channel.receive()
    assert received.names == (str(cert), str(key), certs("client-ca.pem"))
    context = received.context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    received.close()
