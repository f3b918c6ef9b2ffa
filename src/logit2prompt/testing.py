"""Helpers for tests and benchmarks that start servers in child processes."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from .server.schemas import ServerError

LOG_TAIL_CHARS = 2000  # of the server's stderr quoted in an error


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of a log file (empty if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - chars * 4, 0))
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


@contextlib.contextmanager
def server_process(cmd: list[str], ready_url: str, timeout: float = 120.0):
    """Run an HTTP server command in a subprocess until `ready_url` answers; stop it on exit.

    The child's stderr goes to a temporary file, not a pipe: a server that logs more than a
    pipe buffer (64 KB) at start-up (llama.cpp on AMX CPUs writes ~230 KB) would block on its
    own write and never become ready if nobody read the pipe. Errors quote the log's tail.
    """
    import subprocess
    import urllib.error
    import urllib.request

    with tempfile.TemporaryDirectory(prefix="logit2prompt-server-") as tmp:
        log_path = Path(tmp) / "stderr.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ServerError(
                        f"server exited with {proc.returncode}; end of its stderr:\n"
                        f"{log_tail(log_path)}",
                        status=500,
                    )
                try:
                    urllib.request.urlopen(ready_url, timeout=2)
                    break
                except urllib.error.HTTPError:
                    break  # it answers (an auth error, say): it is up
                except OSError:
                    if time.monotonic() > deadline:
                        raise ServerError(
                            f"server not ready after {timeout:.0f} s; end of its stderr:\n"
                            f"{log_tail(log_path)}",
                            500,
                        ) from None
                    time.sleep(0.3)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
