"""The installable product: the wheel that docker/Dockerfile builds, installed into a fresh venv
outside the repository, runs ``beaver db upgrade`` and ``beaver up`` from an unrelated directory.

Cheap by construction: the wheel is built from a copy of what the Dockerfile's build stage copies
(``pip wheel --no-deps --no-build-isolation``: nothing downloaded), and installed with ``--no-deps
--no-index`` into a venv made ``--without-pip``, whose third-party packages come from this venv
through a ``.pth`` line. A ``.pth`` line only appends a directory to ``sys.path`` (the ``.pth``
files inside it, such as this checkout's editable-install hook, are not run), and the fresh venv's
own site-packages comes first, so ``api``, ``models`` and ``workers`` are the wheel's: the test
asserts it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
PACKAGED = {"migrations": "api/migrations", "web": "api/web"}  # repository folder → its place in the wheel


def _build_stage_sources() -> list[str]:
    """What the Dockerfile's build stage (its first) copies: the ``src`` of each ``COPY src… dst``."""
    first_stage = DOCKERFILE.read_text().split("\nFROM ")[1]
    sources = []
    for line in first_stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    return sources


def _repo_files(folder: str) -> list[str]:
    return sorted(str(p.relative_to(REPO / folder)) for p in (REPO / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by whoever adopted it) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in _build_stage_sources():
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(dist), str(src)])
    (wheel,) = dist.glob("beaver-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "venv"
    assert REPO not in root.parents, "the fresh venv must live outside the repository"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # Third-party packages from this venv (no multi-GB re-download); appended after the fresh venv's own.
    (site / "_beaver_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)])
    return root


@pytest.fixture
def env(venv, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BEAVER_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "BEAVER_HOME": str(tmp_path / "home"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_the_wheel_holds_every_package_migration_and_page_file(wheel):
    from setuptools import find_packages

    names = set(zipfile.ZipFile(wheel).namelist())
    packages = find_packages(str(REPO), include=["api*", "models*", "workers*"])
    missing = [p for p in packages if f"{p.replace('.', '/')}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (list them in pyproject.toml): {missing}"
    for folder, target in PACKAGED.items():
        missing = [f for f in _repo_files(folder) if f"{target}/{f}" not in names]
        assert not missing, f"{folder}/ files missing from the wheel (pyproject.toml package-data): {missing}"
    assert not any(n.startswith(("migrations/", "web/", "../")) for n in names), "nothing outside the packages"


def test_the_installed_wheel_imports_itself_not_the_checkout(venv, env, tmp_path):
    probe = ("import json, sys, api, models, workers, api.db, api.app; print(json.dumps({'files': "
             "[api.__file__, models.__file__, workers.__file__, str(api.db.MIGRATIONS_DIR), str(api.app.WEB_DIR)],"
             " 'path': sys.path}))")
    seen = json.loads(_run([str(venv / "bin" / "python"), "-c", probe], env=env, cwd=tmp_path).stdout)
    for file in seen["files"]:
        assert Path(file).is_relative_to(venv), f"{file} is not the wheel's"
    assert not any((tmp_path / p).resolve() == REPO for p in seen["path"]), "the checkout is on sys.path"


def test_the_installed_wheel_upgrades_the_database_and_runs_beaver_up(venv, env, tmp_path):
    from alembic.script import ScriptDirectory

    workdir = tmp_path / "anywhere"  # an unrelated working directory: no source tree, no .env
    workdir.mkdir()
    beaver = str(venv / "bin" / "beaver")

    out = _run([beaver, "db", "upgrade"], env=env, cwd=workdir)
    assert "latest revision" in out.stdout
    head = ScriptDirectory(str(REPO / "migrations")).get_current_head()
    with sqlite3.connect(tmp_path / "home" / "beaver.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]

    port = _free_port()
    log = tmp_path / "up.log"
    with open(log, "w") as log_file:
        up = subprocess.Popen([beaver, "up", "--port", str(port)], env=env, cwd=workdir, stdout=log_file,
                              stderr=subprocess.STDOUT, start_new_session=True)
    worker_pid = None
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        while True:
            assert up.poll() is None, f"beaver up exited ({up.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"/v1/health never answered:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        match = re.search(r"worker started \(pid (\d+)\)", log.read_text())
        worker_pid = int(match.group(1)) if match else None

        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == (REPO / "web" / "index.html").read_text(), "/ must serve the packaged arena page"
        # The page's modules, the vendored uPlot and Swagger UI (/docs offline) come from the wheel.
        docs = httpx.get(f"{url}/docs", timeout=10).text
        assets = re.findall(r"""(?:src|href)=["'](/static/[^"']+)["']""", page.text + docs)
        assert "/static/runs.js" in assets and any("swagger-ui-bundle.js" in a for a in assets), assets
        for asset in assets:
            assert httpx.get(f"{url}{asset}", timeout=10).status_code == 200, asset

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) in (0, 128 + signal.SIGTERM, -signal.SIGTERM), log.read_text()[-3000:]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        if worker_pid is not None:  # `beaver up` stops its worker on the way out; never leave one behind
            for _ in range(30):
                if not _alive(worker_pid):
                    break
                time.sleep(1)
            else:
                os.killpg(worker_pid, signal.SIGKILL)
                pytest.fail(f"beaver up left its worker (pid {worker_pid}) running")
