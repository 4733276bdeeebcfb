"""Dependencies flow one way: a module imports only the modules below it here."""
import ast
import os

import amproxy

LAYERS = ["errors", "protocol", "patterns", "placement", "proxyprotocol", "buffer",
          "deadletter", "logs", "tls", "auth", "authscan", "authsnapshot", "config", "daemon", "balance", "listeners", "ratelimit", "stats", "carbon",
          "destinations",
          "worker", "master", "client", "keytool", "cli", "__main__"]
PACKAGE_DIR = os.path.dirname(amproxy.__file__)


def imported_siblings(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                yield node.module.split(".")[0]
            else:
                yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amproxy."):
            yield node.module.split(".")[1]


def test_every_module_has_a_layer():
    modules = {f[:-3] for f in os.listdir(PACKAGE_DIR) if f.endswith(".py")}
    assert modules - {"__init__"} <= set(LAYERS), modules - set(LAYERS)


def test_no_module_imports_upward():
    for name in LAYERS:
        path = os.path.join(PACKAGE_DIR, name + ".py")
        if not os.path.exists(path):
            continue
        for sibling in imported_siblings(path):
            if sibling == "__init__" or sibling not in LAYERS:
                continue
            assert LAYERS.index(sibling) < LAYERS.index(name), (
                "%s imports %s, which sits above it" % (name, sibling))
