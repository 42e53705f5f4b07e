"""Running the app under uvicorn: safe binding (loopback unless a token guards it), the socket opened
here so a taken port is one clear line, and a graceful stop on SIGTERM (requests in flight finish)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from mammacls.errors import MammaclsError, param
from mammacls.serve.uploads import UploadLimits

GRACEFUL_STOP_S = 30


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(host: str, port: int, token: str | None, limits: UploadLimits, workers: int) -> None:
    """Refuse what is unsafe or meaningless before the model is opened (exit code 2)."""
    if not is_loopback(host) and not token:
        raise MammaclsError(f"{param('host')} {host} is reachable from other machines: give {param('token')} "
                            "(or MAMMACLS_TOKEN) so that only those who know it can send scans", exit_code=2)
    if token is not None and len(token) < 16:
        raise MammaclsError(f"{param('token')} is too short to guard a server: use at least 16 characters "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')", exit_code=2)
    if not 0 <= port <= 65535:
        raise MammaclsError(f"{param('port')} {port}: use 1-65535 (0: any free port)", exit_code=2)
    for name, value in (("max_upload_mb", limits.max_bytes), ("max_files", limits.max_files), ("workers", workers)):
        if value < 1:
            raise MammaclsError(f"{param(name)} must be at least 1", exit_code=2)


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host.strip("[]"), port), family=family, reuse_port=False)
    except OSError as exc:
        raise MammaclsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", exit_code=2) from None


def serve_forever(app, sock: socket.socket, on_ready: Callable[[str], None] | None = None,
                  log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until Ctrl+C or SIGTERM; uvicorn lets requests in flight finish."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_STOP_S,
                            server_header=False, date_header=False, proxy_headers=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        host, port = sock.getsockname()[:2]
        on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")
    server.run(sockets=[sock])
