"""TLS on HTTP, gRPC and metrics with tritonclient's SSL options; mutual TLS with --tls-ca.

A throwaway CA, a server certificate (SAN 127.0.0.1 / localhost), a client certificate and
a self-signed "rogue" client certificate are made with the openssl CLI for this module.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server, serve_command
from helpers import identity_config, write_model
from tls_certs import Certs, make_certs
from tritonclient.utils import InferenceServerException

from kernelport.cli import main
from kernelport.config import Config
from kernelport.server import Server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    return make_certs(tmp_path_factory.mktemp("certs"))


KEY = "tls-and-key"


def key_headers() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}  # fresh: tritonclient's http infer adds to it


def client_context(certs: Certs, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def repository(tmp: Path) -> Path:
    write_model(tmp, "ident", identity_config("FP32", [4]))
    return tmp


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("tls")
    args = ("--tls-cert", certs.server, "--tls-key", certs.server_key, "--api-key", KEY)
    with running_server(
        tmp, repository(tmp / "repo"), *args, ssl_context=client_context(certs)
    ) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("mtls")
    args = ("--tls-cert", certs.server, "--tls-key", certs.server_key, "--tls-ca", certs.ca)
    probe = client_context(certs, certs.client, certs.client_key)
    with running_server(tmp, repository(tmp / "repo"), *args, ssl_context=probe) as server:
        yield server


def inputs(module: object) -> list[object]:
    tensor = module.InferInput("INPUT0", [4], "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return [tensor]


def _infer_http(client: httpclient.InferenceServerClient, headers: object = None) -> None:
    result = client.infer("ident", inputs(httpclient), headers=headers)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))


def _infer_grpc(client: grpcclient.InferenceServerClient, headers: object = None) -> None:
    result = client.infer("ident", inputs(grpcclient), headers=headers)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))


def _get(url: str, context: ssl.SSLContext | None = None) -> int:
    with urllib.request.urlopen(url, timeout=30, context=context) as resp:
        return int(resp.status)


def test_tls_on_every_listener(tls_server: RunningServer, certs: Certs) -> None:
    http = httpclient.InferenceServerClient(
        tls_server.http_url, ssl=True, ssl_options={"ca_certs": certs.ca}
    )
    _infer_http(http, key_headers())
    rpc = grpcclient.InferenceServerClient(
        tls_server.grpc_url, ssl=True, root_certificates=certs.ca
    )
    _infer_grpc(rpc, key_headers())
    # API keys still apply over TLS.
    with pytest.raises(InferenceServerException) as info:
        _infer_http(http)
    assert info.value.status() == "401"
    with pytest.raises(InferenceServerException) as info:
        _infer_grpc(rpc)
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    metrics = f"https://127.0.0.1:{tls_server.metrics_port}"
    assert _get(metrics + "/healthz", client_context(certs)) == 200
    assert "TLS on" in tls_server.log()
    # Plain text is not served, and a client that does not trust the CA refuses the server.
    with pytest.raises(OSError):
        _get(f"http://{tls_server.http_url}/v2/health/live")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(metrics + "/healthz", ssl.create_default_context())
    plain = grpcclient.InferenceServerClient(tls_server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        plain.is_server_live()
    assert info.value.status() == "StatusCode.UNAVAILABLE"


def test_mutual_tls_requires_a_client_certificate(mtls_server: RunningServer, certs: Certs) -> None:
    live = f"https://{mtls_server.http_url}/v2/health/live"
    with pytest.raises(OSError):
        _get(live, client_context(certs))  # no client certificate
    with pytest.raises(OSError):
        _get(live, client_context(certs, certs.rogue, certs.rogue_key))  # not signed by the CA
    assert _get(live, client_context(certs, certs.client, certs.client_key)) == 200
    options = {"ca_certs": certs.ca, "certfile": certs.client, "keyfile": certs.client_key}
    _infer_http(
        httpclient.InferenceServerClient(mtls_server.http_url, ssl=True, ssl_options=options)
    )
    anonymous = grpcclient.InferenceServerClient(
        mtls_server.grpc_url, ssl=True, root_certificates=certs.ca
    )
    with pytest.raises(InferenceServerException) as info:
        anonymous.is_server_live()
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    rpc = grpcclient.InferenceServerClient(
        mtls_server.grpc_url,
        ssl=True,
        root_certificates=certs.ca,
        private_key=certs.client_key,
        certificate_chain=certs.client,
    )
    _infer_grpc(rpc)
    metrics = f"https://127.0.0.1:{mtls_server.metrics_port}/metrics"
    with pytest.raises(OSError):
        _get(metrics, client_context(certs))
    assert _get(metrics, client_context(certs, certs.client, certs.client_key)) == 200


def test_tls_settings_errors(
    tmp_path: Path, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--tls-cert", certs.server]) == 2
    assert "tls_key (--tls-key): required when tls_cert is set" in capsys.readouterr().err
    assert main(["serve", "--tls-key", certs.server_key]) == 2
    assert "tls_cert (--tls-cert): required" in capsys.readouterr().err
    assert main(["serve", "--tls-ca", certs.ca]) == 2
    assert "tls_ca: mutual TLS needs tls_cert and tls_key" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    serve = [*serve_command(), "--tls-cert", str(garbage)]
    result = subprocess.run(
        [*serve, "--tls-key", str(garbage)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert f"startup failed: TLS: cannot use certificate {garbage}" in result.stderr


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("missing-key", "cannot read --tls-key"),
        ("garbage-cert", "cannot use certificate"),
        ("wrong-key", "cannot use certificate"),
        ("garbage-ca", "cannot use client CA file"),
    ],
)
async def test_unusable_tls_files_stop_startup(
    tmp_path: Path, certs: Certs, which: str, expected: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    files = {"tls_cert": certs.server, "tls_key": certs.server_key}
    if which == "missing-key":
        files["tls_key"] = str(tmp_path / "nope.key")
    elif which == "garbage-cert":
        files["tls_cert"] = str(garbage)
    elif which == "wrong-key":
        files["tls_key"] = certs.client_key
    else:
        files["tls_ca"] = str(garbage)
    server = Server(Config.from_mapping({**files, "model_repository": [str(tmp_path)]}))
    with pytest.raises(RuntimeError, match=expected):
        await server.startup()  # fails before it loads, binds or starts anything
