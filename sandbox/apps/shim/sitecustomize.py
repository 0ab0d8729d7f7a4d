"""Loaded by every Python process of a sandbox pod (PYTHONPATH): the pod's own network namespace, on 127.0.0.1.

A container binds its port on every address of its network namespace (`0.0.0.0:8080`); here all pods share
the host's, so a bind of the wildcard to a port the sandbox mapped (BUILDKIT_SANDBOX_POD_PORTS,
`containerPort=hostPort,...`) binds 127.0.0.1:hostPort instead, where probes, Services and the API server's
proxy reach it. A loopback bind (`127.0.0.1:p`), which only the pod itself could reach, gets a free port no one
else is told of, and this process's own connections to `127.0.0.1:p` or `localhost:p` go there. A wildcard bind
of a port nobody mapped gets a free port too: nothing outside could know it. The socket module is patched at
the class, so any server built on it (http.server, asyncio, uvicorn, aiohttp) is covered without changing the
app. IPv6 wildcard binds are refused (EADDRNOTAVAIL): sandbox pods are IPv4 only.
"""

import errno
import os
import socket

_MAPPED = {int(c): int(h) for c, _, h in (item.partition("=") for item in
                                            os.environ.get("BUILDKIT_SANDBOX_POD_PORTS", "").split(",") if item)}
_LOOPBACK: dict = {}
_WILDCARD = ("", "0.0.0.0")
_LOCAL = ("127.0.0.1", "localhost")
_bind = socket.socket.bind
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _bind_in_pod(self, address):
    if isinstance(address, tuple) and len(address) >= 2 and self.family == socket.AF_INET6 \
            and address[0] in ("::", "") and address[1] in _MAPPED:
        raise OSError(errno.EADDRNOTAVAIL, "the sandbox's pods have no IPv6 address: bind 0.0.0.0")
    if self.family == socket.AF_INET and isinstance(address, tuple) and len(address) == 2:
        host, port = address
        if host in _WILDCARD and port:
            if port in _MAPPED:
                return _bind(self, ("127.0.0.1", _MAPPED[port]))
            result = _bind(self, ("127.0.0.1", 0))
            _LOOPBACK[port] = self.getsockname()[1]
            return result
        if host in _LOCAL and port:
            result = _bind(self, ("127.0.0.1", 0))
            _LOOPBACK[port] = self.getsockname()[1]
            return result
    return _bind(self, address)


def _in_pod(address):
    if isinstance(address, tuple) and len(address) == 2 and address[0] in _LOCAL:
        port = address[1]
        if port in _LOOPBACK:
            return ("127.0.0.1", _LOOPBACK[port])
        if port in _MAPPED:
            return ("127.0.0.1", _MAPPED[port])
    return address


def _connect_in_pod(self, address):
    return _connect(self, _in_pod(address) if self.family == socket.AF_INET else address)


def _connect_ex_in_pod(self, address):
    return _connect_ex(self, _in_pod(address) if self.family == socket.AF_INET else address)


socket.socket.bind = _bind_in_pod
socket.socket.connect = _connect_in_pod
socket.socket.connect_ex = _connect_ex_in_pod
