"""A free local port, without importing gradio: load generators and tests start the app on their own port."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (another process could still take it before the app binds)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
