"""Which inherited socket becomes which listener (an upgraded master's, systemd's),
and how a master starts itself again."""
import logging
import os
import signal
import socket
import sys
import time

import pytest

from amproxy import handover
from amproxy.errors import AmproxyError
from amproxy.links import SIGNALS, SignalQueue, fork_plain_child
from amproxy.listeners import open_listeners


def listening(port=0):
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(8)
    return sock


def port_of(sock):
    return sock.getsockname()[1]


@pytest.fixture
def sockets():
    made = []

    def make(port=0):
        made.append(listening(port))
        return made[-1]
    yield make
    for sock in made:
        sock.close()


def test_an_upgraded_master_takes_its_sockets_by_name(sockets):
    plain, tls = sockets(), sockets()
    listeners = open_listeners(("127.0.0.1", port_of(plain)), ("127.0.0.1", port_of(tls)),
                               [(tls, "tls"), (plain, "plain")])
    assert [(l.kind, l.sock) for l in listeners] == [("plain", plain), ("tls", tls)]


def test_port_zero_and_a_host_name_match_the_socket_given(sockets):
    plain = sockets()
    listeners = open_listeners(("localhost", 0), None, [(plain, "plain")])
    assert listeners[0].sock is plain


def test_a_changed_address_binds_the_new_one_and_closes_the_old(sockets, caplog):
    old = sockets()
    wanted = socket.socket()
    wanted.bind(("127.0.0.1", 0))
    new_port = port_of(wanted)
    wanted.close()
    with caplog.at_level(logging.WARNING):
        listeners = open_listeners(("127.0.0.1", new_port), None, [(old, "plain")])
    try:
        assert port_of(listeners[0].sock) == new_port
        assert old.fileno() == -1
        assert "the plain address changed" in caplog.text
    finally:
        listeners[0].close()


def test_systemds_sockets_are_matched_by_address_and_the_first_left_is_plain(sockets,
                                                                              caplog):
    tls, plain = sockets(), sockets()
    with caplog.at_level(logging.WARNING):
        listeners = open_listeners(("0.0.0.0", 2005), ("127.0.0.1", port_of(tls)),
                                   [(tls, "amproxy.socket"), (plain, "amproxy.socket")])
    assert [(l.kind, l.sock) for l in listeners] == [("plain", plain), ("tls", tls)]
    # The socket unit decides; the operator is told that it is not addr.
    assert "not on addr" in caplog.text


def test_an_inherited_socket_no_option_asks_for_is_closed(sockets, caplog):
    plain, extra = sockets(), sockets()
    with caplog.at_level(logging.WARNING):
        listeners = open_listeners(("127.0.0.1", port_of(plain)), None,
                                   [(plain, "plain"), (extra, "tls")])
    assert [l.sock for l in listeners] == [plain]
    assert extra.fileno() == -1
    assert "no option asks for" in caplog.text


def test_the_command_line_is_the_installed_script_or_the_same_interpreter_flags(
        monkeypatch, tmp_path):
    script = tmp_path / "amproxy"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    # Made absolute at start: --daemon's chdir("/") does not change what runs.
    monkeypatch.setattr(handover, "_SCRIPT", str(script))
    monkeypatch.setattr(sys, "argv", ["./amproxy", "server", "--workers", "2"])
    assert handover.command_line() == [str(script), "server", "--workers", "2"]
    monkeypatch.setattr(handover, "_SCRIPT", "/src/amproxy/__main__.py")
    monkeypatch.setattr(sys, "argv", ["/src/amproxy/__main__.py", "server"])
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-I", "-m", "amproxy", "server"],
                        raising=False)
    assert handover.command_line() == [sys.executable, "-I", "-m", "amproxy", "server"]


def test_a_stale_predecessor_variable_names_no_one(monkeypatch):
    monkeypatch.setenv(handover.PREDECESSOR_ENV, "1")  # init, not our parent here
    assert not handover.Predecessor()


def test_systemds_socket_on_every_address_is_refused_when_addr_names_one(sockets):
    everywhere = socket.socket()
    everywhere.bind(("0.0.0.0", 0))
    everywhere.listen(8)
    try:
        with pytest.raises(AmproxyError, match="on more addresses than addr 127.0.0.1"):
            open_listeners(("127.0.0.1", port_of(everywhere)), None,
                           [(everywhere, "amproxy.socket")])
    finally:
        everywhere.close()



@pytest.fixture
def master_handlers():
    """This process with the master's signal handlers, as a master forks."""
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    SignalQueue(SIGNALS)
    yield signal.pthread_sigmask(signal.SIG_BLOCK, [])
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_child_the_master_forks_starts_with_default_handlers_and_the_same_mask(
        master_handlers):
    pid = fork_plain_child()
    if pid == 0:
        os._exit(0 if all(signal.getsignal(sig) == signal.SIG_DFL for sig in SIGNALS)
                 and signal.pthread_sigmask(signal.SIG_BLOCK, []) == master_handlers else 3)
    assert os.waitpid(pid, 0)[1] == 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == master_handlers


def test_a_stop_sent_to_a_child_at_once_is_not_lost(master_handlers):
    """A stop sent to a new master between its fork and its exec once reached the
    master's handler in the child, which the exec then forgot: the stop was lost."""
    for _ in range(20):
        pid = fork_plain_child()
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        os.kill(pid, signal.SIGTERM)
        assert os.waitpid(pid, 0)[1] == signal.SIGTERM  # killed by it, at once
