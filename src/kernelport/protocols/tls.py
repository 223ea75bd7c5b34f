"""TLS for every listener from one certificate, key and optional client CA (mutual TLS)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from kernelport.config import Config


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and the CA client certificates
    must chain to (``None``: clients are not asked for a certificate)."""

    cert: Path
    key: Path
    ca: Path | None = None

    @classmethod
    def from_config(cls, config: Config) -> TlsFiles | None:
        if config.tls_cert is None or config.tls_key is None:
            return None  # Config insists on both or neither
        return cls(config.tls_cert, config.tls_key, config.tls_ca)

    def check(self) -> None:
        """Load the files as the listeners will, so a bad one stops startup with its name."""
        for setting, path in (("--tls-cert", self.cert), ("--tls-key", self.key),
                              ("--tls-ca", self.ca)):  # fmt: skip
            if path is not None:
                try:
                    path.read_bytes()
                except OSError as exc:
                    raise RuntimeError(
                        f"TLS: cannot read {setting} {path}: {exc.strerror}"
                    ) from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise RuntimeError(
                f"TLS: cannot use certificate {self.cert} with key {self.key}: {exc}"
            ) from None
        if self.ca is not None:
            try:
                context.load_verify_locations(cafile=self.ca)
            except (OSError, ssl.SSLError) as exc:
                raise RuntimeError(f"TLS: cannot use client CA file {self.ca}: {exc}") from None

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config`` (they apply to pre-bound sockets too)."""
        return {
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
            "ssl_ca_certs": str(self.ca) if self.ca is not None else None,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if self.ca is not None else ssl.CERT_NONE,
        }

    def server_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A server-side context offering ``alpn`` (HTTP/2 listeners need ``["h2"]``)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            context.load_verify_locations(cafile=self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(alpn)
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = self.ca.read_bytes() if self.ca is not None else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
