"""Network-namespace "hosts" for cluster tests (root only): a bridge namespace and N hosts,
10.<net>.0.i/24 each, with no link to the root namespace (nothing leaves the sandbox).

Names carry this process's pid, so parallel runs and other users' namespaces never collide.
Recipe: shared/tools/netns (bridge with multicast snooping off, so mDNS floods to all ports).
"""

from __future__ import annotations

import os
import shutil
import subprocess


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Lan:
    def __init__(self, hosts: int) -> None:
        self.prefix = f"kp{os.getpid()}"
        self.bridge = f"{self.prefix}-lan"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(1, hosts + 1)]
        self.net = 64 + os.getpid() % 128

    def ip(self, host: int) -> str:
        """The address of host ``host`` (1-based)."""
        return f"10.{self.net}.0.{host}"

    def up(self) -> None:
        run = _ip
        run("netns", "add", self.bridge)
        run("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        run("-n", self.bridge, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        run("-n", self.bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts, start=1):
            run("netns", "add", ns)
            run("link", "add", f"{self.prefix}v{i}", "netns", ns, "type", "veth", "peer",
                "name", f"port{i}", "netns", self.bridge)  # fmt: skip
            run("-n", self.bridge, "link", "set", f"port{i}", "master", "br0")
            run("-n", self.bridge, "link", "set", f"port{i}", "up")
            run("-n", ns, "link", "set", "lo", "up")
            run("-n", ns, "link", "set", f"{self.prefix}v{i}", "name", "eth0")
            run("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            run("-n", ns, "link", "set", "eth0", "up")
            run("-n", ns, "link", "set", "eth0", "multicast", "on")

    def exec(self, host: int) -> list[str]:
        """The command prefix that runs a program on host ``host``."""
        return ["ip", "netns", "exec", self.hosts[host - 1]]

    def down(self) -> None:
        for ns in [*self.hosts, self.bridge]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
