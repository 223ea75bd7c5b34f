"""The gateway's own API keys, and the key it presents to nodes that want one: clients need
the gateway's key (probes excepted); the nodes see the gateway's node key, never the
client's, on forwarded requests and on the gateway's own health and index calls."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import running_server
from gateway_nodes import node_repository, running_gateway, start_gateway
from tls_certs import make_certs
from tritonclient.utils import InferenceServerException

CLIENT_KEY = "client-key-1"
NODE_KEY = "node-key-1"


def _ident(client: object, module: object, headers: dict[str, str] | None) -> list[float]:
    inp = module.InferInput("INPUT0", [4], "FP32")  # type: ignore[attr-defined]
    inp.set_data_from_numpy(np.arange(4, dtype=np.float32))
    result = client.infer("ident", [inp], headers=headers)  # type: ignore[attr-defined]
    return [float(v) for v in result.as_numpy("OUTPUT0").ravel()]


def test_clients_need_the_gateway_key_and_nodes_see_theirs(tmp_path: Path) -> None:
    (tmp_path / "node.keys").write_text(NODE_KEY + "\n")
    (tmp_path / "client.keys").write_text(CLIENT_KEY + "\n")
    repo = node_repository(tmp_path)
    node_args = ("--api-key-file", str(tmp_path / "node.keys"), "--readiness", "any")
    with running_server(tmp_path, repo, *node_args) as node:
        gateway_args = ("--api-key-file", str(tmp_path / "client.keys"),
                        "--node-api-key-file", str(tmp_path / "node.keys"))  # fmt: skip
        with running_gateway(tmp_path, {"n1": node}, *gateway_args) as gateway:
            for module, url in ((httpclient, gateway.http_url), (grpcclient, gateway.grpc_url)):
                client = module.InferenceServerClient(url)
                try:
                    assert client.is_server_ready()  # probes stay open
                    with pytest.raises(InferenceServerException) as refused:
                        _ident(client, module, None)
                    assert refused.value.status() in ("401", "StatusCode.UNAUTHENTICATED")
                    # the node's key is not the gateway's: a client cannot use it here
                    with pytest.raises(InferenceServerException):
                        _ident(client, module, {"authorization": f"Bearer {NODE_KEY}"})
                    # a fresh dict each call: tritonclient's HTTP client adds headers to it
                    good = {"authorization": f"Bearer {CLIENT_KEY}"}
                    assert _ident(client, module, good) == [0.0, 1.0, 2.0, 3.0]
                finally:
                    client.close()


def test_the_gateway_serves_https_and_grpc_over_tls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    certs = make_certs(tmp_path)
    with running_server(tmp_path, node_repository(tmp_path), "--readiness", "any") as node:
        tls = ("--tls-cert", certs.server, "--tls-key", certs.server_key)
        gateway = start_gateway(tmp_path, {"n1": node}, *tls, ready_context=certs.ca)
        try:
            secure_http = httpclient.InferenceServerClient(
                gateway.http_url, ssl=True, ssl_options={"ca_certs": certs.ca}
            )
            secure_grpc = grpcclient.InferenceServerClient(
                gateway.grpc_url, ssl=True, root_certificates=certs.ca
            )
            for client, module in ((secure_http, httpclient), (secure_grpc, grpcclient)):
                assert _ident(client, module, None) == [0.0, 1.0, 2.0, 3.0]
                client.close()
            plain = httpclient.InferenceServerClient(gateway.http_url)
            with pytest.raises(Exception):  # noqa: B017 - any failure: TLS is not optional
                plain.is_server_live()
            plain.close()
        finally:
            assert gateway.stop() == 0, gateway.log()


def test_the_gateway_exports_its_own_metrics(tmp_path: Path) -> None:
    node_args = ("--readiness", "any")
    with running_server(tmp_path, node_repository(tmp_path), *node_args) as node:
        gateway = start_gateway(tmp_path, {"n1": node})
        try:
            client = httpclient.InferenceServerClient(gateway.http_url)
            try:
                for _ in range(3):
                    _ident(client, httpclient, None)
            finally:
                client.close()
            url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
            with urllib.request.urlopen(url) as resp:
                text = resp.read().decode()
        finally:
            assert gateway.stop() == 0, gateway.log()
    assert 'kernelport_gateway_node_up{node="n1"} 1\n' in text
    assert 'kernelport_gateway_forwarded_requests_total{node="n1"} 3\n' in text
    assert "kernelport_gateway_retried_requests_total 0\n" in text
