"""Ops on ragged, PyG-style batches (points concatenated, ``batch`` / ``ptr`` per event).

Each op has a pure-torch path that runs anywhere; faster backends (torch-cluster, Triton
kernels, torch's FlashAttention varlen) are used when present and can be forced or avoided
with ``backend=``.

- :func:`knn`, :func:`knn_graph`, :func:`fps`: neighbours and farthest-point sampling per event;
- :func:`varlen_attention`: every point attends to all points of its event, with an optional
  per-head 3D distance bias;
- :func:`edge_attention`: every node attends to its incoming graph edges, with an optional
  per-edge bias.
"""
from pcfm.ops.attention import edge_attention, varlen_attention
from pcfm.ops.cluster import fps, knn, knn_graph, torch_cluster_available

__all__ = ["knn", "knn_graph", "fps", "torch_cluster_available", "varlen_attention", "edge_attention"]
