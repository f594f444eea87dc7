"""Whether a job request is well formed and could ever fit a cluster, in one place for every part.

The coordinator refuses such a submit; the dashboard says the same while its form is filled. Both
ask here, with the same sentences, so a person reads one wording wherever the answer comes from.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpudeck.text import counted

MAX_GPUS = 4096
MAX_NODES = 1024
MAX_GPUS_PER_NODE = 64

NodeSize = tuple[str, int]
"""A node's name and how many GPUs it has."""


def be(n: int) -> str:
    return "is" if n == 1 else "are"


def have(n: int) -> str:
    return "has" if n == 1 else "have"


def spread_need(nodes: int, per_node: int, adjective: str = "") -> str:
    """'needs 4 GPUs on one node' or 'needs 2 nodes with 4 <adjective>GPUs each'."""
    if nodes == 1:
        return f"needs {counted(per_node, 'GPU')} on one node"
    return f"needs {nodes} nodes with {counted(per_node, adjective + 'GPU')} each"


def _range_error(flag: str, value: object, most: int) -> str | None:
    """The sentence for a count outside 1..most, or None. Rejects bools, which Python counts as ints."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{flag} must be a whole number, not {value!r}"
    if value < 1:
        return f"{flag} must be at least 1, not {value}"
    if value > most:
        return f"{flag} must be at most {most}, not {value}"
    return None


def validate_request(gpus: int | None, nodes: int | None, gpus_per_node: int | None) -> str | None:
    """None if the request is well formed, else a sentence saying what is wrong with it."""
    if gpus is not None and (nodes is not None or gpus_per_node is not None):
        return "give either --gpus, or --nodes with --gpus-per-node, not both"
    if gpus is not None:
        return _range_error("--gpus", gpus, MAX_GPUS)
    if nodes is None and gpus_per_node is None:
        return "say how many GPUs the job needs: --gpus G, or --nodes N with --gpus-per-node G"
    if gpus_per_node is None:
        return "--nodes needs --gpus-per-node too"
    if nodes is None:
        return "--gpus-per-node needs --nodes too"
    return _range_error("--nodes", nodes, MAX_NODES) or _range_error("--gpus-per-node", gpus_per_node,
                                                                     MAX_GPUS_PER_NODE)


def impossible_reason(gpus: int | None, nodes: int | None, gpus_per_node: int | None,
                      cluster: Sequence[NodeSize]) -> str | None:
    """A sentence when the request could never fit these nodes, even with every GPU free; None when
    it could. An empty cluster gives None, since nodes may still join."""
    problem = validate_request(gpus, nodes, gpus_per_node)
    if problem is not None or not cluster:
        return problem
    if gpus is not None:
        return _too_few_gpus(gpus, cluster)
    assert nodes is not None and gpus_per_node is not None
    return _too_few_nodes(nodes, gpus_per_node, cluster)


def _too_few_gpus(wanted: int, cluster: Sequence[NodeSize]) -> str | None:
    total = sum(size for _, size in cluster)
    if total >= wanted:
        return None
    return (f"needs {counted(wanted, 'GPU')} but the {counted(len(cluster), 'node')} {have(len(cluster))} "
            f"only {counted(total, 'GPU')} in all")


def _too_few_nodes(nodes: int, per_node: int, cluster: Sequence[NodeSize]) -> str | None:
    need = spread_need(nodes, per_node)
    if len(cluster) < nodes:
        return f"{need} but there {be(len(cluster))} only {counted(len(cluster), 'node')}"
    big = sorted(name for name, size in cluster if size >= per_node)
    if len(big) >= nodes:
        return None
    if big:
        return f"{need} but only {counted(len(big), 'node')} {have(len(big))} that many ({', '.join(big)})"
    name, size = min(cluster, key=lambda node: (-node[1], node[0]))
    return f"{need} but the largest node, {name}, has {counted(size, 'GPU')}"
