"""The gateway's Prometheus metrics, read from its node table at each scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kernelport.cluster.nodes import NodeTable


class GatewayCollector(Collector):
    """Per node: up, requests in flight, requests forwarded, removals from routing; and the
    requests sent again to another node because the first could not be reached."""

    def __init__(self, table: NodeTable) -> None:
        self._table = table

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(
            "kernelport_gateway_node_up", "1 while the node is in routing", labels=["node"]
        )
        outstanding = GaugeMetricFamily(
            "kernelport_gateway_node_outstanding",
            "Requests the gateway has in flight to the node",
            labels=["node"],
        )
        forwarded = CounterMetricFamily(
            "kernelport_gateway_forwarded_requests",
            "Requests forwarded to the node (sent, whatever the answer)",
            labels=["node"],
        )
        removals = CounterMetricFamily(
            "kernelport_gateway_node_removals",
            "Times the node was taken out of routing (failed checks or unreachable)",
            labels=["node"],
        )
        for node in self._table.nodes.values():
            up.add_metric([node.name], 1 if node.up else 0)
            outstanding.add_metric([node.name], node.outstanding)
            forwarded.add_metric([node.name], node.forwarded)
            removals.add_metric([node.name], node.removals)
        retried = CounterMetricFamily(
            "kernelport_gateway_retried_requests",
            "Requests sent to another node because the first could not be reached",
        )
        retried.add_metric([], self._table.retried)
        yield from (up, outstanding, forwarded, removals, retried)
