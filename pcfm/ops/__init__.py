"""Ops on ragged, PyG-style batches (points concatenated, ``batch`` / ``ptr`` per event).

Each op has a pure-torch path that runs anywhere; faster backends (torch-cluster, Triton
kernels) are used when present and can be forced or avoided with ``backend=``.
"""
from pcfm.ops.cluster import fps, knn, knn_graph

__all__ = ["knn", "knn_graph", "fps"]
