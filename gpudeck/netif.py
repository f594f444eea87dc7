"""Which local network interface reaches a peer, for GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME.

Without it gloo advertises the address the host name resolves to, 127.0.0.1 on many machines, and the
other nodes of a job hang until a timeout. Machines with docker0 or several NICs hit the same.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915


def local_address_towards(peer: str) -> str:
    """The source address the kernel picks to reach `peer` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((peer, 9))
        return probe.getsockname()[0]


def interface_address(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_towards(peer: str) -> str | None:
    """The name of the interface that holds the address used to reach `peer`, if one can be found."""
    try:
        source = local_address_towards(peer)
    except OSError:
        return None
    if source.startswith("127."):
        return "lo"
    for _, name in socket.if_nameindex():
        if interface_address(name) == source:
            return name
    return None
