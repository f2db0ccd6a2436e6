"""Which addresses and interface a job's sockets use: the torch.distributed rendezvous, gloo/NCCL
and Open MPI's TCP transports. No torch; Linux interface lookup."""
from __future__ import annotations

import fcntl
import socket
import struct

from contracts.errors import UserError

LOCAL_NAMES = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}
_SIOCGIFADDR = 0x8915


def single_host(hosts: list[str]) -> bool:
    """All ranks on this machine under its own names: loopback is enough."""
    return set(hosts) <= LOCAL_NAMES


def check_hosts_resolve(hosts: list[str], source: str) -> None:
    """Every host name resolves here: an unknown one is one line naming it, not Open MPI's
    'not allocated or oversubscribed its slots'."""
    for host in sorted(set(hosts) - LOCAL_NAMES):
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError) as e:
            raise UserError(f"{source}: host '{host}' does not resolve ({getattr(e, 'strerror', e)}); fix its name "
                            "or add it to DNS or /etc/hosts") from None


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (IPv6 when host has a colon); raises OSError
    when the port is taken. Port 0: any free port (see getsockname)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for a process about to bind it)."""
    with listening_socket(host, 0) as sock:
        return sock.getsockname()[1]


def interface_address(name: str) -> str:
    """IPv4 address of a network interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            raise UserError(f"config: 'cluster.interface' = {name!r} has no IPv4 address on "
                            f"{socket.gethostname()}; pick an interface that has one") from None
    return socket.inet_ntoa(packed[20:24])


def _loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1"


def _address_of(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except (socket.gaierror, UnicodeError):
        return ""


def rendezvous_address(master_addr: str, interface: str, hosts: list[str]) -> str:
    """`master_addr: auto` means: the configured interface's address, loopback for a single-host
    job, else the address this host's name resolves to, refused if that is loopback while some
    host resolves to an address elsewhere (remote ranks would hang; hosts that resolve to loopback, or
    that this machine cannot resolve, as fake Slurm nodes, do not count as remote)."""
    if master_addr != "auto":
        return master_addr
    if interface:
        return interface_address(interface)
    if single_host(hosts):
        return "127.0.0.1"
    name = socket.gethostname()
    addr = socket.gethostbyname(name)
    if _loopback(addr) and any(a and not _loopback(a) for a in map(_address_of, set(hosts))):
        raise UserError(f"config: this multi-host job's rendezvous would be {name}'s address, but {name} resolves "
                        f"to {addr} (loopback: Debian/Ubuntu hosts files map the host name to 127.0.1.1), which "
                        "remote ranks cannot reach; set 'cluster.interface' (e.g. ib0 or eth0) or 'cluster.master_addr'")
    return addr
