"""A PostgreSQL server of the bench's (and the tests') own: `initdb` and `pg_ctl` from the
system's package in a fresh folder, on a free loopback port, trusted local connections
only, every statement logged with the connection's application_name first; stopped and
removed after. As root it runs as the package's `postgres` user (PostgreSQL refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shardwise.errors import ShardwiseError


def _tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
    if found is None:
        raise ShardwiseError("postgresql", f"{name} is missing: install the system's postgresql package")
    return found


def _as_owner() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class Server:
    url: str  # postgresql://shardwise@127.0.0.1:PORT/shardwise
    log: Path  # the statements it ran, each line led by the connection's application_name
    folder: Path

    def run(self, sql: str, rows: list[tuple] | None = None) -> list[tuple]:
        """`sql` in a connection of its own (executemany over `rows` where given)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn, conn.cursor() as cur:
            if rows is not None:
                cur.executemany(sql, rows)
                return []
            cur.execute(sql)
            return cur.fetchall() if cur.description else []

    def statements(self, application: str) -> list[str]:
        """The log's lines of the statements that connections named `application` ran."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [s for s in lines if s.startswith(f"{application} ") and ("statement:" in s or "execute" in s)]


def start() -> Server:
    from shardwise.procs import free_port

    folder = Path(tempfile.mkdtemp(prefix="shardwise-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port, log, data = free_port(), folder / "server.log", folder / "data"
    init = [*_as_owner(), _tool("initdb"), "-D", str(data), "-U", "shardwise", "--auth=trust", "-E", "UTF8"]
    subprocess.run(init, check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c log_statement=all -c log_line_prefix='%a '"
    ctl = [*_as_owner(), _tool("pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]
    subprocess.run(ctl, check=True, capture_output=True)
    host = f"shardwise@127.0.0.1:{port}"
    Server(f"postgresql://{host}/postgres", log, folder).run("CREATE DATABASE shardwise")
    return Server(f"postgresql://{host}/shardwise", log, folder)


def stop(server: Server) -> None:
    ctl = [*_as_owner(), _tool("pg_ctl"), "-D", str(server.folder / "data"), "-m", "fast", "-w", "stop"]
    subprocess.run(ctl, capture_output=True)
    shutil.rmtree(server.folder, ignore_errors=True)


@contextmanager
def running() -> Iterator[Server]:
    server = start()
    try:
        yield server
    finally:
        stop(server)
