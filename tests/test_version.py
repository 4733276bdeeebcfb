"""The version has one place, setup.cfg; every way of running amproxy reports it.

make install writes it into the installed package (tests/test_install.py and
tests/test_deb.py run the installed command); a source tree reads setup.cfg;
a copy that pip installed asks its metadata.
"""
import configparser
import os
import re
import shutil
import subprocess
import sys

import amproxy

from conftest import AMPROXY, ROOT


def setup_cfg_version():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "setup.cfg"))
    return parser.get("metadata", "version")


def test_setup_cfg_holds_the_version_literally():
    assert re.fullmatch(r"\d+(\.\d+)+", setup_cfg_version())


def test_the_source_tree_and_the_virtualenv_report_setup_cfgs_version():
    assert amproxy.__version__ == setup_cfg_version()
    result = subprocess.run([AMPROXY, "--version"], capture_output=True, text=True,
                            timeout=30)
    assert result.stdout == "amproxy %s\n" % setup_cfg_version(), result.stderr


def test_no_second_copy_of_the_version_in_the_package():
    literal = re.compile(r"['\"]%s['\"]" % re.escape(setup_cfg_version()))
    package = os.path.dirname(amproxy.__file__)
    for name in os.listdir(package):
        if name.endswith(".py") and name != "_version.py":
            with open(os.path.join(package, name)) as f:
                assert not literal.search(f.read()), name
    assert not os.path.exists(os.path.join(package, "_version.py"))  # make install's only


def test_an_installed_copy_reads_the_file_make_install_writes(tmp_path):
    copy = tmp_path / "lib" / "amproxy"
    shutil.copytree(os.path.dirname(amproxy.__file__), copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "_version.py").write_text('version = "9.8.7"\n')
    assert _version_from(tmp_path / "lib") == "9.8.7"


def test_without_setup_cfg_or_version_file_the_metadata_answers(tmp_path):
    """As pip installs it: no setup.cfg beside the package; the dist-info says."""
    copy = tmp_path / "lib" / "amproxy"
    shutil.copytree(os.path.dirname(amproxy.__file__), copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    from importlib.metadata import PackageNotFoundError, version
    try:
        expected = version("amproxy")
    except PackageNotFoundError:
        expected = "unknown"
    assert _version_from(tmp_path / "lib") == expected


def _version_from(path):
    result = subprocess.run([sys.executable, "-c", "import amproxy; print(amproxy.__version__)"],
                            env=dict(os.environ, PYTHONPATH=str(path)), capture_output=True,
                            text=True, timeout=30, cwd=str(path))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
