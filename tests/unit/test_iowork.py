"""The I/O-bound work behind the stack's tasks (tasks/iowork.py)."""

from __future__ import annotations

import http.server
from collections.abc import Iterator
from typing import Any

import pytest

from tasks import iowork
from tests.support import serve_http


def test_io_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="url must be http"):
        iowork.fetch_url("file:///etc/passwd")
    with pytest.raises(ValueError, match="seconds must not be negative"):
        iowork.wait(-1)
    assert iowork.wait(0) == 0


@pytest.fixture
def server() -> Iterator[str]:
    """Serves ``/<size>``: that many bytes, announced (``/<size>``) or not (``/<size>/chunked``)."""
    piece = b"x" * iowork.CHUNK_BYTES

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def do_GET(self) -> None:
            size = int(self.path.split("/")[1])
            self.send_response(200)
            if not self.path.endswith("/chunked"):
                self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.path.endswith("/chunked"):
                while size > 0:
                    self.wfile.write(piece[:size])
                    size -= len(piece)

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler) as url:
        yield url


def test_fetch_url_hashes_the_body_and_bounds_its_size(server: str) -> None:
    fetched = iowork.fetch_url(f"{server}/{3 * iowork.CHUNK_BYTES + 5}/chunked")
    assert fetched.status == 200 and fetched.size == 3 * iowork.CHUNK_BYTES + 5
    over = iowork.MAX_RESPONSE_BYTES + 1
    message = f"must be at most {iowork.MAX_RESPONSE_BYTES:,} bytes, got {over:,} or more"
    with pytest.raises(ValueError, match=message):  # announced: refused before reading
        iowork.fetch_url(f"{server}/{over}")
    with pytest.raises(ValueError, match="must be at most 67,108,864 bytes, got 67,108,865"):
        iowork.fetch_url(f"{server}/{over}/chunked")  # not announced: refused as it arrives
