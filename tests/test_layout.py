"""Dependencies flow one way, floor by floor.

A module may import any module on a floor below its own, and on its own
floor only those listed before it; never one above.  Each floor says what
its modules are for, so a new module has one obvious place.
"""
import ast
import os

import pytest

import amproxy

FLOORS = [
    # Pure: the wire protocol, names and patterns, placement; no I/O, no state.
    ("pure", ["errors", "protocol", "patterns", "placement", "proxyprotocol"]),
    # What a worker is built from: the auth file, logs, TLS, limits, the Carbon
    # senders and their backlog, the listeners, the links to the master, and the
    # client connections.
    ("parts", ["logs", "tls", "config", "links", "daemon", "balance", "ratelimit", "devices",
               "buffer", "deadletter", "auth", "authscan", "authsnapshot", "deviceview",
               "devicequery", "stats",
               "carbon",
               "destinations", "listeners", "connections", "clients", "outcomes"]),
    ("worker", ["worker", "pool"]),
    ("master", ["handover", "master"]),
    # Commands: the device client, the key tool, the command line.
    ("commands", ["client", "keytool", "cli", "__main__"]),
]
PACKAGE_DIR = os.path.dirname(amproxy.__file__)
PLACE = {module: (floor, index) for floor, (_, modules) in enumerate(FLOORS)
         for index, module in enumerate(modules)}


def imported_modules(source):
    """The amproxy modules ``source`` imports, in every form Python has for it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and module:  # from .x import y
                yield module.split(".")[0]
            elif node.level == 1 or module == "amproxy":  # from . import x, from amproxy import x
                yield from (alias.name for alias in node.names)
            elif module.startswith("amproxy."):  # from amproxy.x import y
                yield module.split(".")[1]
        elif isinstance(node, ast.Import):  # import amproxy.x
            yield from (alias.name.split(".")[1] for alias in node.names
                        if alias.name.startswith("amproxy."))


def may_import(importer, imported):
    if imported not in PLACE:  # __version__, a name of the package itself
        return True
    return PLACE[imported] < PLACE[importer]


def test_every_module_has_a_floor():
    modules = {f[:-3] for f in os.listdir(PACKAGE_DIR) if f.endswith(".py")}
    assert modules - {"__init__"} == set(PLACE), modules ^ set(PLACE)


def test_no_module_imports_upward():
    for module in PLACE:
        with open(os.path.join(PACKAGE_DIR, module + ".py")) as f:
            source = f.read()
        for imported in imported_modules(source):
            floor, _ = PLACE.get(imported, (None, None))
            assert may_import(module, imported), "%s (%s) imports %s (%s)" % (
                module, FLOORS[PLACE[module][0]][0], imported, FLOORS[floor][0])


@pytest.mark.parametrize("source", [
    "from .worker import Worker", "from . import worker", "from amproxy import worker",
    "from amproxy.worker import Worker", "import amproxy.worker",
    "import amproxy.worker as w", "def f():\n    from .worker import Worker"])
def test_every_form_of_import_is_seen(source):
    assert list(imported_modules(source)) == ["worker"]
    assert not may_import("auth", "worker") and may_import("master", "worker")
