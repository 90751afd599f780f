"""Item ID schemes: how each catalog item is written as text the model reads and generates.

- ``sequential`` (default, leak-free): items that occur in training sequences are numbered first,
  1, 2, 3, ..., in order of first appearance while walking users (in a seeded hash order) through
  their *training* items in time order; items seen only in validation or test come after all of
  them. P5 numbered items along full histories, test items included, which lets "max(history)+1"
  guess the test item (notes/p5-and-peers.md §4.2); numbering from training data only removes that.
- ``random``: a seeded random permutation of 1..N.
- ``collaborative``: items that co-occur in training sequences share ID prefixes. The co-occurrence
  graph (items within a window of each other in a training sequence) is kept sparse and split by
  spectral clustering, recursively, until clusters hold at most ``leaf_size`` items. An ID is the
  path of cluster tokens plus the position in the leaf: ``<a3><b12><c7>``. Items without training
  co-occurrences form their own branch at the end.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

SCHEMES = ("sequential", "random", "collaborative")
LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def assign_ids(stats: pd.DataFrame, scheme: str, seed: int, cooc: sp.csr_matrix | None = None,
               clusters: int = 16, leaf_size: int = 64) -> pd.DataFrame:
    """Catalog with ``index`` (0..N-1, ID order) and ``id_text`` for every item of ``stats``.

    ``stats`` has one row per item: item, n_train, train_key (first training appearance; NaN if
    none), other_key (first appearance in validation/test order)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown indexing scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    df = stats.copy()
    if scheme == "sequential":
        in_train = df["train_key"].notna()
        first = df[in_train].sort_values(["train_key", "item"], kind="stable")
        rest = df[~in_train].sort_values(["other_key", "item"], kind="stable")
        df = pd.concat([first, rest], ignore_index=True)
        df["id_text"] = [str(i) for i in range(1, len(df) + 1)]
    elif scheme == "random":
        df = df.sort_values("item", kind="stable").reset_index(drop=True)
        perm = np.random.default_rng(seed).permutation(len(df)) + 1
        df["number"] = perm
        df = df.sort_values("number").reset_index(drop=True)
        df["id_text"] = df.pop("number").astype(str)
    else:
        if cooc is None:
            raise ValueError("collaborative indexing needs the co-occurrence matrix")
        df = df.sort_values("item", kind="stable").reset_index(drop=True)
        paths = collaborative_paths(cooc, clusters, leaf_size, seed)
        df["id_text"] = ["".join(p) for p in paths]
        df = df.sort_values("id_text", key=lambda s: s.map(_path_sort_key), kind="stable").reset_index(drop=True)
    df["index"] = np.arange(len(df), dtype="int64")
    return df


def _path_sort_key(text: str) -> tuple:
    return tuple(int(tok[1:]) for tok in text.strip("<>").split("><"))


def collaborative_paths(adj: sp.csr_matrix, clusters: int, leaf_size: int, seed: int) -> list[list[str]]:
    """Token path for every node of a (symmetric, sparse) co-occurrence graph."""
    n = adj.shape[0]
    rng = np.random.default_rng(seed)
    paths: list[list[str]] = [[] for _ in range(n)]
    degree = np.asarray(adj.sum(axis=1)).ravel()
    isolated = np.flatnonzero(degree == 0)
    connected = np.flatnonzero(degree > 0)

    def split(nodes: np.ndarray, level: int) -> None:
        if len(nodes) <= leaf_size or level >= len(LEVEL_LETTERS) - 1:
            for j, node in enumerate(nodes):
                paths[node].append(f"<{LEVEL_LETTERS[level]}{j}>")
            return
        labels = _spectral_labels(adj[nodes][:, nodes], min(clusters, len(nodes)), rng)
        if len(np.unique(labels)) < 2:  # no structure left: split evenly
            labels = np.arange(len(nodes)) * clusters // len(nodes)
        for c, lab in enumerate(np.unique(labels)):
            part = nodes[labels == lab]
            for node in part:
                paths[node].append(f"<{LEVEL_LETTERS[level]}{c}>")
            split(part, level + 1)

    top = [connected] if len(connected) else []
    if len(isolated):
        top.append(isolated)
    if len(top) == 1:
        split(top[0], 0)
    else:
        # branch 0..: clusters of the connected items; the last branch: items without co-occurrences
        labels = _spectral_labels(adj[connected][:, connected], min(clusters - 1, len(connected)), rng) \
            if len(connected) > leaf_size else np.zeros(len(connected), dtype=int)
        groups = [connected[labels == lab] for lab in np.unique(labels)] + [isolated]
        for c, part in enumerate(groups):
            for node in part:
                paths[node].append(f"<a{c}>")
            split(part, 1)
    return paths


def _spectral_labels(adj: sp.csr_matrix, k: int, rng: np.random.Generator) -> np.ndarray:
    """Spectral clustering of a sparse graph into (at most) k groups."""
    from scipy.cluster.vq import kmeans2
    from scipy.sparse.linalg import eigsh

    n = adj.shape[0]
    if k < 2 or n <= k:
        return np.arange(n) % max(k, 1)
    a = adj.astype(np.float64) + sp.identity(n, format="csr") * 1e-3  # regularise isolated nodes
    d = np.asarray(a.sum(axis=1)).ravel()
    dinv = sp.diags(1.0 / np.sqrt(d))
    m = dinv @ a @ dinv
    try:
        v0 = rng.standard_normal(n)
        _, vecs = eigsh(m, k=k, which="LA", v0=v0, maxiter=max(1000, 20 * n), tol=1e-4)
    except Exception:  # ARPACK did not converge: fall back to an even split
        return np.arange(n) * k // n
    x = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    _, labels = kmeans2(x, k, minit="++", seed=rng)
    return labels
