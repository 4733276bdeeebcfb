"""``make run``: a real carbon-cache, amproxy in front of it, and the test client.

Everything lives under ./run; stop it with Ctrl-C.
"""

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devcarbon import CarbonCache, free_port, port_open, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def main():
    run_dir = os.path.join(ROOT, "run")
    carbon = CarbonCache(os.path.join(run_dir, "carbon"),
                         line_port=int(os.environ.get("CARBON_PORT", 0)) or None).start()
    proxy_port = int(os.environ.get("PROXY_PORT", 0)) or free_port()
    auth_file = os.path.join(ROOT, "etc", "auth_file.yaml")
    # git checks files out world-readable; an auth file holds secrets (amproxy warns).
    os.chmod(auth_file, os.stat(auth_file).st_mode & ~0o007)
    env = dict(os.environ, AUTH_FILE=auth_file,
               ADDR="127.0.0.1:%d" % proxy_port, CARBON_ADDR=carbon.address, WORKERS="2")
    # The sample config, with paths a user without root can write.
    proxy = subprocess.Popen([os.path.join(BIN, "amproxy"), "server", "--config",
                              os.path.join(ROOT, "etc", "amproxy.conf"), "--addr",
                              env["ADDR"], "--carbon-addr", carbon.address,
                              "--spool-dir", os.path.join(run_dir, "spool"),
                              "--stats-socket", os.path.join(run_dir, "amproxy.stats.sock")],
                             env=env)
    client = None
    try:
        wait_for(lambda: proxy.poll() is not None or port_open(proxy_port), 10,
                 what="amproxy to listen")
        if proxy.poll() is not None:
            raise SystemExit("amproxy exited at start (status %d); its error is above"
                             % proxy.returncode)
        print("\ncarbon-cache listens on %s, amproxy on 127.0.0.1:%d.\n"
              "The test client sends metric1 every 5 s; its points land in\n  %s\n"
              "Read them with: %s/whisper-fetch.py --from=$(( $(date +%%s) - 300 )) %s\n"
              "Ctrl-C stops everything.\n" % (
                  carbon.address, proxy_port, carbon.whisper_path("metric1"), BIN,
                  carbon.whisper_path("metric1")), flush=True)
        client = subprocess.Popen([os.path.join(BIN, "amproxy"), "client", "test-client",
                                   "--interval", "5s", "--server-addr", env["ADDR"]],
                                  env=dict(env, KEY_PUBLIC="my_public_key",
                                           KEY_PRIVATE="my_secret_key"))
        while proxy.poll() is None and client.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for process in (client, proxy):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(40)
        carbon.stop()
        print("stopped; the whisper files stay in %s" % carbon.whisper_dir)


if __name__ == "__main__":
    main()
