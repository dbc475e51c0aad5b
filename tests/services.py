"""Real servers for the cluster-configuration tests, on 127.0.0.1 free ports.

- :func:`s3_server`: moto's S3 server (``moto_server``, from the ``dev`` extra) in a
  subprocess, with dummy credentials;
- :func:`redis_server`: Debian's ``redis-server`` (package ``redis-server``), no persistence;
- :func:`postgres_server`: Debian's PostgreSQL (package ``postgresql``): ``initdb`` into a
  temporary folder, ``pg_ctl start`` on a free port, its unix socket in that folder too. As
  root it runs as the ``postgres`` user the package creates (PostgreSQL refuses to run as
  root).

Each is a context manager yielding what a client needs (a URL, a port), and a
session-scoped fixture of the same name; everything a server started is stopped and its
temporary folder removed on exit. A missing server binary fails the test with the command
that installs it (``make test`` installs them first): it is never skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.serving import free_port

INSTALL = ("apt-get install -y --no-install-recommends redis-server postgresql "
           "(`make services` or `make test` runs it)")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def _missing(what: str, package: str) -> None:
    pytest.fail(f"{what} not found: install Debian's {package} package: {INSTALL}",
                pytrace=False)


def _wait(ready, proc: subprocess.Popen | None, name: str, log: Path) -> None:
    """Poll ``ready()`` until it is true; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{_tail(log)}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(log)}")


@contextlib.contextmanager
def _process(name: str, argv: Callable[[Path], list[str]], ready: Callable[[], Any]
             ) -> Iterator[None]:
    """``argv(folder)`` started in a new temporary folder (its output in ``<name>.log``
    there) and waited for until ``ready()`` answers; stopped and the folder removed after."""
    tmp = Path(tempfile.mkdtemp(prefix=f"smlrec-{name}-"))
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv(tmp), stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                start_new_session=True)
    try:
        _wait(ready, proc, name, log)
        yield
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``: only this process, by its pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------ S3


@dataclass(frozen=True)
class S3:
    """A running S3 server: its endpoint URL and the environment that points clients at it."""

    url: str
    version: str

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables for boto3, s3fs (aiobotocore), pyarrow and Feast's sources."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=self.url, region_name=env["AWS_REGION"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@contextlib.contextmanager
def run_s3() -> Iterator[S3]:
    """moto's S3 server (``moto_server``) in a subprocess on a free port."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.fail(f"{exe} not found: install the dev extra (pip install -e '.[stack,dev]', "
                    "`make setup`)", pytrace=False)
    import moto

    port = free_port()
    server = S3(f"http://127.0.0.1:{port}", f"moto {moto.__version__}")
    with _process("moto_server", lambda tmp: [str(exe), "-H", "127.0.0.1", "-p", str(port)],
                  lambda: server.client().list_buckets() is not None):
        yield server


# ---------------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class Redis:
    """A running Redis server."""

    port: int
    version: str

    @property
    def connection_string(self) -> str:
        """Feast's ``connection_string`` (``FEAST_REDIS``)."""
        return f"127.0.0.1:{self.port}"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


@contextlib.contextmanager
def run_redis() -> Iterator[Redis]:
    """``redis-server`` on a free port, no RDB snapshots, no append-only file."""
    exe = shutil.which("redis-server")
    if exe is None:
        _missing("redis-server", "redis-server")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    version = next((w.removeprefix("v=") for w in version.split() if w.startswith("v=")),
                   version.strip())
    port = free_port()
    server = Redis(port, f"redis-server {version}")
    with _process("redis-server", lambda tmp: [exe, "--port", str(port), "--bind", "127.0.0.1",
                                               "--save", "", "--appendonly", "no",
                                               "--dir", str(tmp)],
                  lambda: server.client().ping()):
        yield server


# ----------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server with an empty database ``feast``."""

    port: int
    version: str
    user: str = "postgres"
    database: str = "feast"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL (psycopg 3) Feast's SQL registry takes (``FEAST_REGISTRY``)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def conninfo(self) -> str:
        """The libpq connection string, for psycopg."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={self.database}"


def _pg_bindir() -> Path | None:
    """Debian installs PostgreSQL's server programs under /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parent.parent.name)
                  if Path(p).parent.parent.name.isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


@contextlib.contextmanager
def run_postgres() -> Iterator[Postgres]:
    """A throw-away cluster: ``initdb`` into a temporary folder, ``pg_ctl start`` on a free
    port (TCP on 127.0.0.1, its unix socket in the folder), trust authentication, no fsync.
    As root, the programs run as the ``postgres`` user (``runuser``)."""
    bindir = _pg_bindir()
    if bindir is None:
        _missing("PostgreSQL's initdb", "postgresql")
    prefix: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="smlrec-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(tmp, ignore_errors=True)
            _missing("the postgres user (made by the package)", "postgresql")
        os.chown(tmp, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log = tmp / "data", tmp / "server.log"
    port = free_port()

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, cwd=tmp,
                              timeout=START_TIMEOUT_S)

    started = False
    try:
        out = pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--no-sync", "--no-instructions")
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{out.stdout}\n{out.stderr}")
        options = (f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50 "
                   "-c shared_buffers=16MB")
        out = pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                 "-w", "-t", str(int(START_TIMEOUT_S)), "start")
        started = True
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{out.stdout}\n{out.stderr}\n"
                               f"{_tail(log)}")
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute("CREATE DATABASE feast")
        yield Postgres(port, f"PostgreSQL {version}")
    finally:
        if started:
            out = pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
            pid_file = data / "postmaster.pid"
            if out.returncode != 0 and pid_file.exists():  # still up: stop it by its pid
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    with run_s3() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    with run_redis() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    with run_postgres() as server:
        yield server
