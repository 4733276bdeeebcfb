"""A throwaway graphite-web on 127.0.0.1 for ``make run`` and its test.

PyPI's graphite-web 1.1.10 (with Django 2.2, the last LTS its ``Django<3.1``
allows, and cairocffi on Debian's libcairo2), from the same virtualenv as this
interpreter. Everything it writes lives in one directory (``run/graphite``):
its Django settings, its sqlite database, its logs and its search index;
nothing goes to /opt/graphite or /etc. It reads the whisper files of the
carbon-cache the demo starts, and asks that carbon-cache for the points still
in its cache (CARBONLINK), so a graph is current to the second.

It is served by Django's own ``runserver --noreload --insecure``: one process,
a thread per request (a dashboard asks for its graphs at once), the static files
(the dashboard's JavaScript) served too, and nothing more to install. That is
fine for one user on 127.0.0.1, which is all this is for; a real graphite-web
runs under gunicorn or uWSGI behind a web server.
"""

import configparser
import importlib
import json
import os
import secrets
import subprocess
import sys
import sysconfig
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from devcarbon import free_port, port_open, stop_group_of, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD_FILE = os.path.join(ROOT, "etc", "graphite-dashboard.json")
# What make run says when graphite-web cannot render (the one Debian package it needs).
DEBIAN_PACKAGES = "libcairo2"

# graphite-web reads this module (GRAPHITE_SETTINGS_MODULE) in the middle of its
# own settings, which derive their other paths from these.
LOCAL_SETTINGS = """\
# Written by tools/graphiteweb.py for make run; rewritten at each start.
SECRET_KEY = {secret!r}
GRAPHITE_ROOT = {root!r}
CONF_DIR = {root!r} + "/conf"
STORAGE_DIR = {root!r} + "/storage"
LOG_DIR = {root!r} + "/log"
INDEX_FILE = {root!r} + "/storage/index"
WHISPER_DIR = {whisper!r}
STANDARD_DIRS = [WHISPER_DIR]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3",
                          "NAME": {root!r} + "/graphite.db"}}}}
CARBONLINK_HOSTS = [{carbonlink!r}]
CARBONLINK_TIMEOUT = 1.0
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
TIME_ZONE = {time_zone!r}
"""

# The Django settings module: graphite-web's, with its static files where pip put
# them (graphite-web looks beside its package, which only an /opt/graphite install has).
DJANGO_SETTINGS = """\
# Written by tools/graphiteweb.py for make run; rewritten at each start.
from graphite.settings import *  # noqa: F401,F403
STATICFILES_DIRS = ({content!r},)
"""


def data_dir():
    """Where pip put graphite-web's data files (webapp/content, conf) in this virtualenv."""
    return sysconfig.get_path("data")


def missing_requirement():
    """A sentence saying what graphite-web lacks to render PNGs here, or None."""
    try:
        importlib.import_module("graphite")
        importlib.import_module("django")
    except ImportError as e:
        return "graphite-web is not installed in %s (%s): run make venv" % (sys.prefix, e)
    try:
        importlib.import_module("cairocffi")  # loads libcairo.so.2
    except (ImportError, OSError) as e:
        return ("graphite-web needs Debian's cairo library to draw graphs (%s): "
                "apt-get install %s" % (e, DEBIAN_PACKAGES))
    return None


def local_time_zone():
    """The host's time zone name (Europe/Paris), for the graphs' time axis; UTC when
    it has none that Django would take."""
    import pytz
    names = [os.environ.get("TZ", "").lstrip(":")]
    try:
        with open("/etc/timezone") as f:
            names.append(f.read().strip())
    except OSError:
        pass
    try:
        names.append(os.readlink("/etc/localtime").split("zoneinfo/", 1)[1])
    except (OSError, IndexError):
        pass
    for name in names:
        if name in pytz.all_timezones_set:
            return name
    return "UTC"


class GraphiteWeb:
    """graphite-web for a ``devcarbon.CarbonCache``: settings, database, server."""

    def __init__(self, directory, carbon, port=None):
        self.directory = os.path.abspath(directory)
        self.carbon = carbon
        self.port = port or free_port()
        self.process = None
        self.log_path = os.path.join(self.directory, "graphite-web.out")
        self.env = dict(os.environ, PYTHONPATH=self.directory,
                        DJANGO_SETTINGS_MODULE="demo_settings",
                        GRAPHITE_SETTINGS_MODULE="local_settings")

    @property
    def url(self):
        return "http://127.0.0.1:%d/" % self.port

    def _carbonlink(self):
        """carbon-cache's cache query address, from the config devcarbon wrote."""
        config = configparser.ConfigParser()
        config.read(os.path.join(self.carbon.directory, "carbon.conf"))
        return "127.0.0.1:%s:a" % config.get("cache", "CACHE_QUERY_PORT")

    def configure(self):
        for sub in ("conf", "storage", "log"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        secret_path = os.path.join(self.directory, "secret_key")
        if not os.path.exists(secret_path):
            fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(40))
        with open(secret_path) as f:
            secret = f.read().strip()
        with open(os.path.join(self.directory, "local_settings.py"), "w") as f:
            f.write(LOCAL_SETTINGS.format(
                secret=secret, root=self.directory, whisper=self.carbon.whisper_dir + "/",
                carbonlink=self._carbonlink(), time_zone=local_time_zone()))
        with open(os.path.join(self.directory, "demo_settings.py"), "w") as f:
            f.write(DJANGO_SETTINGS.format(content=os.path.join(data_dir(), "webapp", "content")))
        # The dashboard's UI settings; without the file it shows a warning.
        conf = os.path.join(self.directory, "conf", "dashboard.conf")
        example = os.path.join(data_dir(), "conf", "dashboard.conf.example")
        if not os.path.exists(conf) and os.path.exists(example):
            with open(example) as src, open(conf, "w") as dst:
                dst.write(src.read())

    def _django(self, *args, timeout=120):
        out = subprocess.run([sys.executable, "-m", "django"] + list(args), env=self.env,
                             cwd=self.directory,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError("django-admin %s failed:\n%s" % (
                " ".join(args), out.stdout.decode(errors="replace")))

    def start(self, timeout=60):
        """Write the settings, create or update the database, start the server and
        load the amproxy dashboard into it."""
        problem = missing_requirement()
        if problem:
            raise RuntimeError(problem)
        self.configure()
        self._django("migrate", "--run-syncdb", "--verbosity", "0")
        out = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "django", "runserver", "--noreload", "--insecure",
             "127.0.0.1:%d" % self.port], env=self.env, cwd=self.directory,
            stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        wait_for(lambda: self.process.poll() is not None or port_open(self.port), timeout,
                 interval=0.1, what="graphite-web to listen on %d" % self.port)
        if self.process.poll() is not None:
            raise RuntimeError("graphite-web exited at start; see %s" % self.log_path)
        self.load_dashboard()
        return self

    def load_dashboard(self, state=None):
        """Save a dashboard (by default the shipped one) through graphite-web's own
        API, as an operator would with curl (see the README); returns its name."""
        if state is None:
            with open(DASHBOARD_FILE) as f:
                state = json.load(f)
        name = state["name"]
        body = urllib.parse.urlencode({"state": json.dumps(state)}).encode()
        with urllib.request.urlopen(self.url + "dashboard/save/" + urllib.parse.quote(name),
                                    body, timeout=30) as response:
            answer = json.load(response)
        if not answer.get("success"):
            raise RuntimeError("graphite-web did not save the dashboard: %r" % answer)
        return name

    def dashboard_url(self, name=None):
        if name is None:
            with open(DASHBOARD_FILE) as f:
                name = json.load(f)["name"]
        return self.url + "dashboard/" + urllib.parse.quote(name)

    def stop(self, timeout=20):
        stop_group_of(self.process, timeout)
