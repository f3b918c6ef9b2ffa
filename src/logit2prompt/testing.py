"""Helpers for tests and benchmarks that start servers in child processes."""

from __future__ import annotations

import contextlib
import time

from .server.schemas import ServerError


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: list[str], ready_url: str, timeout: float = 120.0):
    """Run an HTTP server command in a subprocess until `ready_url` answers; stop it on exit."""
    import subprocess
    import urllib.error
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-2000:]
                raise ServerError(f"server exited with {proc.returncode}: {err}", status=500)
            try:
                urllib.request.urlopen(ready_url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (an auth error, say): it is up
            except OSError:
                if time.monotonic() > deadline:
                    raise ServerError(f"server not ready after {timeout:.0f} s", 500) from None
                time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
