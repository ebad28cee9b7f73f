"""The Python client's own behaviour, without a server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from serve.client import Client


def test_wait_until_serving_times_out_and_leaves_no_thread_behind():
    """Before the fix, the timed-out channel_ready_future kept a watcher thread that raised "Channel closed"
    once the channel was closed (pytest turns that unhandled thread exception into an error, pyproject.toml)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket is closed
    before = set(threading.enumerate())
    client = Client(f"127.0.0.1:{port}")
    with pytest.raises(TimeoutError, match="not SERVING within"):
        client.wait_until_serving(timeout_s=0.5)
    # The watcher must be gone while the channel is still open (before the fix it lived until close()).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and [t for t in threading.enumerate() if t not in before and t.is_alive()]:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    client.close()
