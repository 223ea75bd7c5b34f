"""LAN discovery: the head advertises itself over mDNS; ``kernelport join`` finds it.

mDNS only says where the Ray head is. Membership and health are Ray's and our heartbeats':
an advertisement of a crashed head lingers for minutes (RFC 6762 TTLs), so nothing here
judges liveness. The TXT record carries no secret, only whether one is needed (``auth``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass

SERVICE_TYPE = "_kernelport._tcp.local."


@dataclass(frozen=True, slots=True)
class Head:
    """What a head advertises."""

    cluster: str
    ray_address: str  # HOST:PORT of the Ray GCS
    auth: str  # "token" (Ray token authentication) or "none"
    http: str  # the gateway's KServe V2 HTTP base URL
    grpc: str  # the gateway's gRPC HOST:PORT


def _zeroconf(interface: str | None) -> object:
    from zeroconf import IPVersion, Zeroconf

    if interface is None:
        return Zeroconf(ip_version=IPVersion.V4Only)
    return Zeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)


class Advertiser:
    """Registers ``head`` on the LAN until ``close()``, from a child process: zeroconf's
    blocking API runs its own event loop thread, which a Ray driver's process starves."""

    def __init__(self, head: Head, interface: str | None = None) -> None:
        fields = {"head": asdict(head), "interface": interface}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "kernelport.cluster.raycluster.discovery", json.dumps(fields)],
            stdin=subprocess.PIPE,
        )

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()  # the child unregisters and exits
        try:
            self._process.wait(10)
        except Exception:  # pragma: no cover - a child stuck in unregistering
            self._process.kill()
            self._process.wait()


class _Registration:
    """The registration itself (in the advertising child process)."""

    def __init__(self, head: Head, interface: str | None = None) -> None:
        from zeroconf import ServiceInfo

        host, _, port = head.ray_address.rpartition(":")
        self._zc = _zeroconf(interface)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{head.cluster}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(host)],
            port=int(port),
            properties={
                "cluster": head.cluster,
                "ray": head.ray_address,
                "auth": head.auth,
                "http": head.http,
                "grpc": head.grpc,
            },
            server=f"kernelport-{head.cluster}.local.",
        )
        self._zc.register_service(self._info)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._zc.unregister_service(self._info)  # type: ignore[attr-defined]
        self._zc.close()  # type: ignore[attr-defined]


def find_head(cluster: str | None, timeout: float, interface: str | None = None) -> Head | None:
    """The first head advertised on the LAN (of ``cluster`` if given), or None."""
    from zeroconf import ServiceBrowser, ServiceStateChange

    zc = _zeroconf(interface)
    found: list[Head] = []
    done = threading.Event()

    def changed(zeroconf: object, service_type: str, name: str, state_change: object) -> None:
        if state_change is not ServiceStateChange.Added:
            return
        info = zeroconf.get_service_info(service_type, name, 3000)  # type: ignore[attr-defined]
        if info is None:
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        head = Head(
            props.get("cluster", ""),
            props.get("ray", ""),
            props.get("auth", "none"),
            props.get("http", ""),
            props.get("grpc", ""),
        )
        if head.ray_address and (cluster is None or head.cluster == cluster):
            found.append(head)
            done.set()

    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[changed])  # type: ignore[arg-type]
    try:
        done.wait(timeout)
    finally:
        browser.cancel()
        zc.close()  # type: ignore[attr-defined]
    return found[0] if found else None


def _advertise(argument: str) -> None:  # pragma: no cover - the advertising child process
    fields = json.loads(argument)
    registration = _Registration(Head(**fields["head"]), fields["interface"])
    try:
        sys.stdin.read()  # until the head closes our stdin (or exits)
    finally:
        registration.close()


if __name__ == "__main__":  # pragma: no cover
    _advertise(sys.argv[1])
