"""What the commands that serve over HTTP (`vlmtune serve`, `vlmtune ui`) share: a listening socket
taken before anything loads (a port in use or an address this machine does not have is said in one
line), and SIGTERM treated as Ctrl-C."""

from __future__ import annotations

import errno
import socket

from vlmtune.errors import VlmtuneError


def bind(host: str, port: int, command: str) -> socket.socket:
    """A listening socket on host:port, taken now so that a port in use is found before loading.

    Args:
        command: the command asking (`vlmtune serve`), named in the message when the port is taken.

    Raises:
        VlmtuneError: the port is in use, or may not be bound.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise VlmtuneError(f"--host {host}: not an address this machine can listen on ({e})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise VlmtuneError(f"port {port} on {host} is already in use (another `{command}`?); stop that "
                               "server or choose another port with --port") from None
        raise VlmtuneError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def stop_on_sigterm(signum, frame) -> None:
    """A SIGTERM handler: stop the way Ctrl-C does (`signal.signal(signal.SIGTERM, stop_on_sigterm)`)."""
    raise KeyboardInterrupt
