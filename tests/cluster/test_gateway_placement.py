"""Placement and policy choices as pure functions: LPT by hand, stability, rotation."""

from __future__ import annotations

from kernelport.cluster.merge import merge_index, merge_stats
from kernelport.cluster.placement import Chooser, lpt_assign, makespan, replace_placement

COSTS = {"m1": 7.0, "m2": 5.0, "m3": 4.0, "m4": 3.0, "m5": 1.0}


def test_lpt_matches_the_assignment_computed_by_hand() -> None:
    # Longest first, each onto the node with the least cost so far:
    # m1(7)->a [a=7]; m2(5)->b [b=5]; m3(4)->b [b=9]; m4(3)->a [a=10]; m5(1)->b [b=10]
    placed = lpt_assign(COSTS, ["a", "b"])
    assert placed == {"m1": "a", "m2": "b", "m3": "b", "m4": "a", "m5": "b"}
    assert makespan(placed, COSTS) == 10.0


def test_lpt_on_three_nodes_and_eligibility() -> None:
    placed = lpt_assign(COSTS, ["a", "b", "c"])
    # m1->a(7); m2->b(5); m3->c(4); m4->c(7); m5->b(6)
    assert placed == {"m1": "a", "m2": "b", "m3": "c", "m4": "c", "m5": "b"}
    only_b = lpt_assign(COSTS, ["a", "b"], {m: ["a", "b"] for m in COSTS} | {"m1": ["b"]})
    assert only_b["m1"] == "b"
    assert lpt_assign({"x": 1.0}, ["a"], {"x": []}) == {}


def test_models_without_cost_spread_evenly() -> None:
    placed = lpt_assign(dict.fromkeys(["a1", "a2", "a3", "a4"], 0.0), ["n1", "n2"])
    assert sorted(placed.values()) == ["n1", "n1", "n2", "n2"]


def test_placement_is_stable_under_small_changes() -> None:
    nodes = ["a", "b"]
    eligible = {m: nodes for m in COSTS}
    current = lpt_assign(COSTS, nodes)
    wobble = dict(COSTS, m4=3.3, m3=3.8)  # fresh LPT would differ only marginally
    assert replace_placement(current, wobble, nodes, eligible) == current


def test_placement_moves_when_the_assignment_really_changes() -> None:
    nodes = ["a", "b"]
    eligible = {m: nodes for m in COSTS}
    current = {"m1": "a", "m2": "a", "m3": "a", "m4": "b", "m5": "b"}  # a=16, b=4
    new = replace_placement(current, COSTS, nodes, eligible)
    assert new == lpt_assign(COSTS, nodes)


def test_a_model_whose_node_is_gone_is_placed_again() -> None:
    current = lpt_assign(COSTS, ["a", "b"])
    new = replace_placement(current, COSTS, ["a"], {m: ["a"] for m in COSTS})
    assert set(new.values()) == {"a"} and set(new) == set(COSTS)


def test_round_robin_alternates_per_model() -> None:
    chooser = Chooser("round_robin")
    picks = [chooser.choose("m", ["a", "b"], {}) for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]
    assert chooser.choose("other", ["a", "b"], {}) == "a"


def test_least_outstanding_prefers_the_idle_node_and_rotates_ties() -> None:
    chooser = Chooser("least_outstanding")
    assert [chooser.choose("m", ["a", "b"], {"a": 3, "b": 0}) for _ in range(3)] == ["b"] * 3
    ties = [chooser.choose("m", ["a", "b"], {"a": 0, "b": 0}) for _ in range(4)]
    assert sorted(ties) == ["a", "a", "b", "b"]


def test_lpt_packing_uses_the_placement_and_fails_over() -> None:
    chooser = Chooser("lpt_packing")
    chooser.placement = {"m": "b"}
    assert [chooser.choose("m", ["a", "b"], {}) for _ in range(3)] == ["b"] * 3
    assert chooser.choose("m", ["a"], {}) == "a"  # b lost it


def test_merged_index_and_statistics() -> None:
    index = merge_index(
        [
            [{"name": "m", "version": "1", "state": "UNAVAILABLE"}],
            [{"name": "m", "version": "1", "state": "READY"}, {"name": "k", "version": "1"}],
        ]
    )
    assert [(e["name"], e.get("state")) for e in index] == [("k", None), ("m", "READY")]
    one = {
        "name": "m",
        "version": "1",
        "last_inference": 5,
        "inference_count": 2,
        "inference_stats": {"success": {"count": 2, "ns": 10}},
        "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 2, "ns": 8}}],
    }
    two = dict(one, last_inference=9, inference_count="3")  # protobuf JSON writes int64 as text
    merged = merge_stats([{"model_stats": [one]}, {"model_stats": [two]}])["model_stats"]
    assert merged[0]["inference_count"] == 5
    assert merged[0]["last_inference"] == 9
    assert merged[0]["version"] == "1"
    assert merged[0]["inference_stats"]["success"] == {"count": 4, "ns": 20}
    assert merged[0]["batch_stats"] == [{"batch_size": 1, "compute_infer": {"count": 4, "ns": 16}}]
