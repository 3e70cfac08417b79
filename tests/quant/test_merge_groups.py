"""merge_groups: the connected components of the scale-sharing relation, groups of two or more."""

from __future__ import annotations

import random

import networkx
import pytest

from qgraph.quant.plan import merge_groups


def test_chains_and_stars_merge_and_singletons_drop():
    pairs = [("a", "b"), ("c", "b"), ("x", "y"), ("z", "z")]
    assert merge_groups(pairs, ["a", "b", "c", "lonely", "x", "y", "z"]) == (
        frozenset({"a", "b", "c"}), frozenset({"x", "y"}))
    assert merge_groups([], ["a", "b"]) == ()


@pytest.mark.parametrize("seed", range(5))
def test_the_components_are_networkx_ones(seed):
    generator = random.Random(seed)
    tensors = [f"t{index}" for index in range(60)]
    pairs = [(generator.choice(tensors), generator.choice(tensors)) for _ in range(40)]
    relation = networkx.Graph()
    relation.add_nodes_from(tensors)
    relation.add_edges_from(pairs)
    expected = sorted((frozenset(c) for c in networkx.connected_components(relation) if len(c) > 1),
                      key=lambda group: sorted(group)[0])
    assert merge_groups(pairs, tensors) == tuple(expected)
