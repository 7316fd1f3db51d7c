"""Loaded by every Python process of an offline test run (it is put first on PYTHONPATH).

Blocks and records every attempt to reach the network: internet-family socket
connections and host-name lookups. Local Unix sockets (the case processes' pipes) pass.
"""

import os
import socket

_LOG = os.environ.get("LORABENCH_NETWORK_LOG")
_connect = socket.socket.connect


def _record(what: str) -> None:
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what}\n")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record(f"connect {address!r}")
        raise OSError("network access blocked by the offline test")
    return _connect(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    _record(f"getaddrinfo {host!r}")
    raise socket.gaierror(socket.EAI_NONAME, "name lookup blocked by the offline test")


socket.socket.connect = _guarded_connect
socket.getaddrinfo = _guarded_getaddrinfo
