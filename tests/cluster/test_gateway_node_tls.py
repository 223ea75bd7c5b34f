"""TLS from the gateway to its nodes: nodes given as https:// are reached over TLS on HTTP
and gRPC, verified against --node-tls-ca; a node that demands client certificates gets the
gateway's --node-tls-cert. Without the right CA the node is never marked up."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import RunningServer, running_server
from gateway_nodes import node_repository, running_gateway, start_gateway, status
from tls_certs import make_certs

from kernelport.cluster.settings import GatewayConfig, parse_node

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl CLI is needed to make test certificates"
)


def _https_node(name: str, http_url: str, grpc_url: str) -> str:
    return f"{name}=https://{http_url},grpc={grpc_url}"


def _infer_through(gateway: RunningServer) -> None:
    for module, url in ((httpclient, gateway.http_url), (grpcclient, gateway.grpc_url)):
        client = module.InferenceServerClient(url)
        try:
            inp = module.InferInput("INPUT0", [4], "FP32")
            inp.set_data_from_numpy(np.arange(4, dtype=np.float32))
            out = client.infer("ident", [inp]).as_numpy("OUTPUT0")
            assert out.tolist() == [0.0, 1.0, 2.0, 3.0]
        finally:
            client.close()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_the_gateway_reaches_https_nodes_over_tls(tmp_path: Path, mutual: bool) -> None:
    certs = make_certs(tmp_path)
    repo = node_repository(tmp_path)
    node_args = ["--tls-cert", certs.server, "--tls-key", certs.server_key, "--readiness", "any"]
    poll = ssl.create_default_context(cafile=certs.ca)
    gateway_args = ["--node-tls-ca", certs.ca]
    if mutual:
        node_args += ["--tls-ca", certs.ca]  # the node refuses clients without a certificate
        poll.load_cert_chain(certs.client, certs.client_key)
        gateway_args += ["--node-tls-cert", certs.client, "--node-tls-key", certs.client_key]
    with running_server(tmp_path, repo, *node_args, ssl_context=poll) as node:
        node_arg = _https_node("n1", node.http_url, node.grpc_url)
        with running_gateway(tmp_path, {}, "--node", node_arg, *gateway_args) as gateway:
            assert [n["up"] for n in status(gateway)["nodes"]] == [True]
            _infer_through(gateway)


def test_a_node_the_gateway_cannot_verify_stays_down(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    repo = node_repository(tmp_path)
    node_args = ["--tls-cert", certs.server, "--tls-key", certs.server_key, "--readiness", "any"]
    poll = ssl.create_default_context(cafile=certs.ca)
    with running_server(tmp_path, repo, *node_args, ssl_context=poll) as node:
        node_arg = _https_node("n1", node.http_url, node.grpc_url)
        # trusting only the rogue certificate: the node's chain does not verify, the node is
        # never up, so the gateway never becomes ready
        with pytest.raises(AssertionError, match="gateway ready"):
            start_gateway(tmp_path, {}, "--node", node_arg, "--node-tls-ca", certs.rogue,
                          timeout=5)  # fmt: skip


def test_settings_check_node_tls() -> None:
    plain = parse_node("a=http://127.0.0.1:1,grpc=127.0.0.1:2")
    secure = parse_node("b=https://127.0.0.1:3,grpc=127.0.0.1:4")
    assert not plain.tls and secure.tls
    with pytest.raises(ValueError, match=r"nodes \['a'\] are http://"):
        GatewayConfig(node=(plain, secure), node_tls_ca=Path("ca.pem"))
    with pytest.raises(ValueError, match="node_tls_cert and node_tls_key: give both"):
        GatewayConfig(node=(secure,), node_tls_cert=Path("c.pem"))
    assert GatewayConfig(node=(plain,)).node_ssl_context() is None
    with pytest.raises(ValueError, match="is not http"):
        parse_node("c=ftp://127.0.0.1:3,grpc=127.0.0.1:4")
