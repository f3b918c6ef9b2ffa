"""The server subprocess helper: a chatty server must not block on its own stderr."""

from __future__ import annotations

import sys

import pytest

from logit2prompt.server.schemas import ServerError
from logit2prompt.testing import free_port, server_process

# Writes 4 MB to stderr (far past a 64 KB pipe buffer), then serves HTTP.
CHATTY_SERVER = """
import http.server, sys
sys.stderr.write(("amx repack tensor blk.0.ffn_up.weight of type q4_0\\n" * 80000))
sys.stderr.flush()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_that_floods_stderr_becomes_ready():
    port = free_port()
    cmd = [sys.executable, "-c", CHATTY_SERVER, str(port)]
    with server_process(cmd, f"http://127.0.0.1:{port}/", timeout=60) as proc:
        assert proc.poll() is None


def test_server_that_exits_reports_its_stderr_tail():
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('x' * 100000 + 'FATAL: no model')"]
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(ServerError, match="FATAL: no model"), server_process(cmd, url, 30):
        pass
