"""Cluster mode without Ray: packing, slot counts, the slot's node server, commands."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import identity_config, write_model

from kernelport.cluster.raycluster import commands, launch
from kernelport.cluster.raycluster.controller import slots_wanted
from kernelport.cluster.raycluster.plan import pack
from kernelport.cluster.raycluster.slot import NodeServer, free_memory, model_sizes


def test_pack_balances_cost_longest_first() -> None:
    costs = {"a": 7.0, "b": 5.0, "c": 4.0, "d": 3.0}
    placed = pack(costs, {}, {"s1": 10, "s2": 10}, ["s1", "s2"])
    # LPT by hand: a->s1 (7), b->s2 (5), c->s2 (9), d->s1 (10)
    assert placed.assignment == {"a": "s1", "b": "s2", "c": "s2", "d": "s1"}
    assert placed.unplaced == ()


def test_pack_respects_free_memory_and_reports_what_fits_nowhere() -> None:
    costs = {"big": 1.0, "small": 1.0, "huge": 1.0}
    sizes = {"big": 600, "small": 100, "huge": 5000}
    placed = pack(costs, sizes, {"s1": 500, "s2": 1000}, ["s1", "s2"])
    assert placed.assignment["big"] == "s2"  # s1 is less loaded but has no room for it
    assert placed.assignment["small"] == "s1"
    assert placed.unplaced == ("huge",)


def test_pack_keeps_placed_models_and_moves_only_the_orphans() -> None:
    costs = {"a": 1.0, "b": 1.0, "c": 1.0}
    keep = {"a": "s2", "b": "gone", "c": "s1"}
    placed = pack(costs, {}, {"s1": 1, "s2": 1}, ["s1", "s2"], keep=keep)
    assert placed.assignment["a"] == "s2" and placed.assignment["c"] == "s1"
    assert placed.assignment["b"] in ("s1", "s2")


def test_slots_one_per_gpu_else_per_cpu_slot() -> None:
    assert slots_wanted({"CPU": 8.0, "GPU": 2.0}, 1.0) == (2, True)
    assert slots_wanted({"CPU": 5.0}, 2.0) == (2, False)
    assert slots_wanted({"CPU": 1.0}, 0) == (0, False)


def test_model_sizes_and_free_memory(tmp_path: Path) -> None:
    write_model(tmp_path, "m", identity_config("FP32", [4]))
    (tmp_path / ".hidden").mkdir()
    sizes = model_sizes(tmp_path)
    assert list(sizes) == ["m"] and sizes["m"] > 0
    assert free_memory() > 0


def test_node_server_serves_reports_and_stops(tmp_path: Path) -> None:
    write_model(tmp_path, "m", identity_config("FP32", [4]))
    server = NodeServer("s", str(tmp_path), "127.0.0.1", slots_on_machine=2)
    try:
        info = server.info()
        assert info["name"] == "s" and info["model_sizes"]["m"] > 0
        assert info["free_memory"] <= free_memory()
        request = urllib.request.Request(
            f"{info['http']}/v2/repository/models/m/load", b"{}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
        assert server.heartbeat()["alive"]
        os.kill(info["server_pid"], signal.SIGKILL)
        server.process.wait(30)
        assert not server.heartbeat()["alive"]
    finally:
        server.stop()


def test_node_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        NodeServer("s", str(tmp_path / "missing"), "127.0.0.1", extra_args=("--bogus",))


def test_ray_start_commands() -> None:
    head = launch.ray_start_command(head=True, port=7000, node_ip="10.0.0.1", num_cpus=2,
                                    object_store_bytes=80, temp_dir="/t",
                                    system_config={"x": 1})  # fmt: skip
    assert head[-1] == "--block" and "--head" in head and '{"x": 1}' in head
    join = launch.ray_start_command(head=False, address="h:1", num_gpus=1)
    assert join[join.index("--address") + 1] == "h:1" and "--num-gpus" in join
    assert launch.auth_env("t" * 16) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t" * 16}
    assert launch.auth_env(None) == {}


def test_tokens_must_be_long_enough(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        launch.read_token(short)
    assert launch.read_token(None) is None


def test_stop_ray_ends_its_process() -> None:
    process = launch.start_ray([sys.executable, "-c", "import time; time.sleep(60)"], None, None)
    launch.stop_ray(process, timeout=10)
    assert process.returncode is not None


def test_sizes_parse() -> None:
    assert commands._bytes("80MB") == 80 * 2**20
    assert commands._bytes("1g") == 2**30 and commands._bytes("123") == 123


def test_join_without_a_head_fails_fast(tmp_path: Path) -> None:
    args = argparse.Namespace(
        command="join", token_file=None, address=None, cluster_name=f"none-{os.getpid()}",
        discovery_timeout=0.5, mdns_interface="127.0.0.1", log_level="warning",
    )  # fmt: skip
    assert commands.run(args) == 2


def test_a_head_advertised_over_mdns_is_found_by_name() -> None:
    from kernelport.cluster.raycluster.discovery import Advertiser, Head, find_head

    name = f"unit-{os.getpid()}"
    head = Head(name, "127.0.0.1:6399", "token", "http://127.0.0.1:1", "127.0.0.1:2")
    advertiser = Advertiser(head, "127.0.0.1")
    try:
        assert find_head(name, 30, "127.0.0.1") == head
        assert find_head(f"{name}-other", 0.5, "127.0.0.1") is None
    finally:
        advertiser.close()


async def test_the_gateway_table_takes_and_drops_cluster_nodes() -> None:
    import aiohttp

    from kernelport.cluster.nodes import NodeTable
    from kernelport.cluster.settings import GatewayConfig, parse_node

    first = parse_node("a=http://127.0.0.1:1,grpc=127.0.0.1:2")
    config = GatewayConfig.load(None, {"node": (first,), "policy": "lpt_packing"}, {})
    async with aiohttp.ClientSession() as session:
        table = NodeTable(config, session)
        node = table.add_node(parse_node("b=http://127.0.0.1:3,grpc=127.0.0.1:4"))
        node.up, node.ready_models = True, frozenset({"m"})
        assert table.pick("m").name == "b"
        table.remove_node("b")
        table.remove_node("b")  # twice: nothing left to do
        assert list(table.nodes) == ["a"]
        with pytest.raises(Exception, match="not served"):
            table.pick("m")


def test_placement_score_prefers_the_lighter_busiest_slot() -> None:
    from kernelport.cluster.raycluster.controller import _score

    costs = {"a": 2.0, "b": 1.0}
    assert _score({"a": "s1", "b": "s1"}, costs) == (3.0, 2)
    assert _score({"a": "s1", "b": "s2"}, costs) == (2.0, 1)
    assert _score({}, costs) == (0.0, 0)
