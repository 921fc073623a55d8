"""Sockets for the control plane: 'host:port' parsing, name lookup and connecting
within a timeout, the address that reaches an accepted peer's own listener, and the mutual-TLS
contexts."""
from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from typing import Any

from p2pkv.transport.base import off_engine_cpus

__all__ = ["parse_address", "dial", "dial_back", "tls_contexts"]


def tls_contexts(cert: str | None, key: str | None, ca: str | None) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """Mutual TLS for the control (and, for tcp, data) connections: each side presents
    `cert`/`key` and accepts only peers whose certificate `ca` signed. Peers are
    identified by the CA, not by host name (P and D are often dialled by IP)."""
    if not (cert or key or ca):
        return None, None
    if not (cert and key and ca):
        raise ValueError("TLS needs all of tls_cert, tls_key and tls_ca (mutual TLS)")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    server.load_cert_chain(cert, key)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    client.load_cert_chain(cert, key)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_REQUIRED
    return server, client


def parse_address(address: str, what: str = "peer address") -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'scheme://host:port' → (host, port), or a ValueError that says what is wrong."""
    if not isinstance(address, str):
        raise ValueError(f"{what} must be a 'host:port' string, got {type(address).__name__} {address!r:.80}")
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what} {address!r:.80} is not 'host:port' (for example '127.0.0.1:5555')")
    if int(port) > 65535:
        raise ValueError(f"{what} {address!r:.80}: port {int(port)} is out of range (0-65535)")
    return host, int(port)


def dial_back(where: str, listen: str) -> str:
    """The address of an accepted peer's own listener: the port its handshake announced (`listen`) at the
    host its connection came from (`where`, 'host:port' as accept saw it), so that what a peer can make
    us dial is its own host, never an address named in a message."""
    host = where.rpartition(":")[0].strip("[]")
    port = parse_address(listen, "announced listen address")[1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"connection source {where!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _resolve(host: str, port: int, timeout: float) -> list[tuple]:
    """`getaddrinfo` for a stream socket, given at most `timeout` seconds (the system resolver has no timeout of
    its own): socket.timeout when it takes longer, socket.gaierror when the name does not resolve."""
    out: list[Any] = []

    def run() -> None:
        off_engine_cpus()
        try:
            out.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            out.append(e)
    t = threading.Thread(target=run, name="p2pkv-resolve", daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise socket.timeout(f"cannot resolve host {host!r} within the {timeout:g} s timeout")
    if isinstance(out[0], OSError):
        raise out[0]
    return out[0]


def dial(host: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket to the first address of `host` that answers, all within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        infos = _resolve(host, port, timeout)
    except socket.gaierror as e:
        raise socket.gaierror(e.errno, f"cannot resolve host {host!r}: {e.strerror}") from None
    err: OSError = OSError(f"no address for host {host!r}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise err
