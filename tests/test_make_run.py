"""The README's first command, `make run`, as a new user runs it."""
import os
import signal
import subprocess
import time

from conftest import ROOT, free_port, wait_for


def test_make_run_forwards_the_test_clients_points_and_stops_on_ctrl_c():
    env = dict(os.environ, CARBON_PORT=str(free_port()), PROXY_PORT=str(free_port()))
    env.pop("AMPROXY_CONFIG")  # as a user's shell: make run must not need it
    whisper = os.path.join(ROOT, "run", "carbon", "storage", "whisper", "metric1.wsp")
    started = time.time()
    run = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_for(lambda: run.poll() is not None or (
            os.path.exists(whisper) and os.path.getmtime(whisper) >= started), 60,
            what="make run to store the test client's first point")
        assert run.poll() is None, run.stdout.read().decode()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the terminal
        output = run.communicate(timeout=60)[0].decode()
    assert "Read them with:" in output and "whisper-fetch.py" in output, output
    assert "stopped; the whisper files stay in" in output, output
    assert run.returncode in (0, 2, -signal.SIGINT), output  # make reports the interrupt
