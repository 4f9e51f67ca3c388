"""Running the app: the bind rules of spec/http.md, then uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys

from ..errors import BackendMissing, InvalidInput


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(registry, *, host: str = "127.0.0.1", port: int = 8765, allow_actions: bool = False, token_file: str | None = None,
          ready=None) -> int:
    """Serve until stopped. Refuses (InvalidInput, before binding) a non-loopback address
    without a token file, and ``allow_actions`` without one. ``ready(url)`` is called once
    the socket listens (the CLI prints the URL there)."""
    from .auth import load_tokens

    tokens = load_tokens(token_file) if token_file else None
    if tokens is None and not is_loopback(host):
        raise InvalidInput(f"refusing to serve on {host} without --token-file: only a loopback address may be served without a token")
    if allow_actions and tokens is None:
        raise InvalidInput("--allow-actions needs --token-file: actions always need a token, on loopback too")
    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        raise BackendMissing(f"casruns serve needs the web extra ({e.name} is missing): pip install 'casruns[web]'") from None
    registry.check_format()
    app = build_app(registry, tokens=tokens, allow_actions=allow_actions)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, or asyncio does not set TCP_NODELAY on accepted connections, and every
    # response (headers and body are two writes) waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        # "localhost" is bound as 127.0.0.1, never resolved: a hosts file that maps it elsewhere
        # must not turn a tokenless loopback server into a public one
        sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    except OSError as e:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(512)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    hub = getattr(app.ctx, "hub", None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: end the endless streams now
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a requested stop: exit 0 once shut down, not re-raised
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
            if hub is not None:
                hub.close_clients()

    server = Server(config)
    if ready is not None:
        ready(f"http://{shown}:{bound}")
    server.run(sockets=[sock])
    return 0


def main_ready(url: str) -> None:
    sys.stderr.write(f"casruns serve: listening on {url}\n")
    sys.stderr.flush()
