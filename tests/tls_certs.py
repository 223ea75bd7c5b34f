"""Test certificates made with the openssl CLI (TLS tests of the server and the gateway)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    """PEM file names in ``dir``: ``certs.ca``, ``certs.server``, ``certs.server_key``, ..."""

    dir: Path

    def __getattr__(self, name: str) -> str:
        stem, _, kind = name.rpartition("_")
        return str(self.dir / (f"{stem}.key" if kind == "key" else f"{name}.pem"))


EC = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def _openssl(cwd: Path, command: str) -> None:
    # Every argument is free of spaces: the files are named relative to cwd.
    subprocess.run(["openssl", *command.split()], cwd=cwd, check=True, capture_output=True)


def _leaf(cwd: Path, name: str, extensions: str) -> None:
    """A key and a certificate for ``name``, signed by the CA in ``cwd``."""
    _openssl(cwd, f"req {EC} -keyout {name}.key -out {name}.csr -subj /CN={name}")
    (cwd / f"{name}.ext").write_text(
        f"{extensions}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        cwd,
        f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
        f"-out {name}.pem -extfile {name}.ext",
    )


def make_certs(cwd: Path) -> Certs:
    """A throwaway CA, a server certificate (SAN 127.0.0.1 / localhost), a client certificate
    and a self-signed "rogue" one, made with the openssl CLI in ``cwd``."""
    _openssl(
        cwd,
        f"req -x509 {EC} -keyout ca.key -out ca.pem -days 2 -subj /CN=kernelport-test-ca "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    )
    _leaf(cwd, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _leaf(cwd, "client", "extendedKeyUsage=clientAuth")
    _openssl(cwd, f"req -x509 {EC} -keyout rogue.key -out rogue.pem -days 2 -subj /CN=rogue")
    return Certs(cwd)
