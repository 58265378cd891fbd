"""A real redis-server for tests: started on a free 127.0.0.1 port with persistence off, stopped at the end.

Use as a pytest plugin module (``pytest_plugins = ["redis_server"]`` or ``from redis_server import *``):

- ``redis_server`` (module scope): a :class:`RedisServer` (``.url``, ``.port``, ``.pause()`` (SIGSTOP),
  ``.resume()`` (SIGCONT), ``.kill()`` (SIGKILL), ``.restart()`` on the same port, ``.client()``).
- ``redis_url``: its URL, with the database flushed before the test.

Skips only when redis-server or redis-py is missing AND the environment variable CI is not set; in CI a
missing server is a failure (CI installs redis-server).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Iterator

import pytest

__all__ = ["RedisServer", "redis_server", "redis_url", "need_redis", "free_port"]


def _missing() -> str | None:
    why = []
    if shutil.which("redis-server") is None:
        why.append("redis-server is not installed (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        why.append("redis-py is not installed (pip install 'redis>=5')")
    return "; ".join(why) or None


def need_redis() -> None:
    """Skip (outside CI) or fail (in CI) when the real server or redis-py is missing."""
    why = _missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {why}")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1:port, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="buttress-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        for attempt in range(50):
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break                      # port taken (e.g. by a dying predecessor): try again
                if self.ping():
                    return
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self, **kwargs: Any) -> Any:
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections (the kernel's backlog) but never answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: everything in memory is gone (scripts too: the next EVALSHA gets NOSCRIPT)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        """Start a fresh server on the same port (after kill())."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.start()

    def flush(self) -> None:
        c = self.client()
        try:
            c.flushall()
            c.script_flush()
        finally:
            c.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    need_redis()
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.restart()
    redis_server.resume()
    redis_server.flush()
    return redis_server.url
