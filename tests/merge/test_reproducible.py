"""The merge's bytes do not depend on how a matrix product sums: any order, block shape, pool size or BLAS kernel.

`merge.deltas` puts each LoRA factor on a power-of-two grid so that every float64 partial sum of
the delta product is exact; these tests check that claim against exact rational arithmetic and
then change the summation order, the blocks, the pool and the BLAS kernel under a whole merge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

import merge.deltas as deltas
import merge.streaming as streaming
from merge.deltas import grid_bits, on_grid
from merge.streaming import AdapterRef, merge_streaming
from merge.writer import HashingFile


@pytest.mark.parametrize("rank", [1, 2, 16, 32, 33, 64, 256])
def test_the_float64_product_of_grid_factors_is_the_exact_sum(rank):
    rng = np.random.default_rng(rank)
    # float32 factors with a wide spread of magnitudes within each row and column, and an rsLoRA-like scale
    left = (rng.standard_normal((6, rank)) * np.exp2(rng.integers(-30, 4, (6, rank)))).astype(np.float32)
    right = (rng.standard_normal((rank, 7)) * np.exp2(rng.integers(-30, 4, (rank, 7)))).astype(np.float32)
    bits = grid_bits(rank)
    assert rank * 2.0 ** (2 * bits) <= 2.0 ** 53
    scaled = left.astype(np.float64) * (16 / rank ** 0.5)
    g_left, g_right = on_grid(scaled, 1, bits), on_grid(right.astype(np.float64), 0, bits)
    # the grid moves an entry by at most half a step, 2^-(bits+1) of 2^e: at most 2^-bits of its row's (column's) largest
    assert np.all(np.abs(g_left - scaled) <= np.abs(scaled).max(axis=1, keepdims=True) * 2.0 ** -bits)
    assert np.all(np.abs(g_right - right) <= np.abs(right).max(axis=0, keepdims=True) * 2.0 ** -bits)
    product = g_left @ g_right
    for i in range(6):
        for j in range(7):
            exact = sum(Fraction(float(g_left[i, k])) * Fraction(float(g_right[k, j])) for k in range(rank))
            assert Fraction(float(product[i, j])) == exact, (i, j)


def _reversed_k(a, b, out=None):
    """Σ_k a[:, k] b[k] from the last k to the first, one float64 addition at a time."""
    total = np.zeros((a.shape[0], b.shape[1])) if out is None else out
    total[...] = 0.0
    for k in reversed(range(a.shape[1])):
        total += a[:, k:k + 1] * b[k]
    return total


def _pairwise_k(a, b, out=None):
    """Σ_k as a balanced tree of float64 additions: (p0 + p1) + (p2 + p3) + ..."""
    terms = [a[:, k:k + 1] * b[k] for k in range(a.shape[1])]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    if out is None:
        return terms[0]
    out[...] = terms[0]
    return out


def _einsum(a, b, out=None):
    return np.einsum("ik,kj->ij", a, b, out=out, optimize=False)


class _NumpyWith:
    """numpy with `matmul` replaced: what `merge.deltas` sees in place of the numpy module."""

    def __init__(self, matmul):
        self.matmul = matmul

    def __getattr__(self, name):
        return getattr(np, name)


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "loramill-manifest.json"}


@pytest.fixture(scope="module")
def mixed(make_base, make_adapter):
    """A float16 base and three adapters of different ranks and scales (one rsLoRA, one with a saved head)."""
    base = make_base(arch="llama", dtype="float16")
    adapters = [
        AdapterRef(make_adapter(base, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"]), 0.7),
        AdapterRef(make_adapter(base, seed=1, r=16, lora_alpha=12, use_rslora=True,
                                target_modules=["q_proj", "up_proj", "v_proj"]), 0.5),
        AdapterRef(make_adapter(base, seed=2, r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                modules_to_save=["lm_head"]), -0.3),
    ]
    return base, adapters


@pytest.mark.parametrize("method,options", [("linear", {}), ("ties", {"density": 0.4}),
                                            ("dare_ties", {"drop_rate": 0.5, "seed": 7}),
                                            ("dare_linear", {"drop_rate": 0.3})])
@pytest.mark.parametrize("product", [_reversed_k, _pairwise_k, _einsum], ids=["reversed", "pairwise", "einsum"])
def test_any_summation_order_with_tiny_blocks_and_a_small_pool_writes_the_same_bytes(method, options, product, mixed, tmp_path,
                                                                      monkeypatch):
    base, adapters = mixed
    options = {"method": method, "dtype": "float32", **options}
    reference = merge_streaming(base, adapters, tmp_path / "reference", **options)

    monkeypatch.setattr(deltas, "np", _NumpyWith(product))
    monkeypatch.setattr(deltas, "PRODUCT_ELEMENTS", 200)  # products of one or two rows
    monkeypatch.setattr(streaming, "BLOCK_ELEMENTS", 3 * 128 + 5)
    monkeypatch.setattr(streaming, "POOL_BLOCKS", 2)
    monkeypatch.setattr(HashingFile, "HANDOVER", 3 * 4096)
    other = merge_streaming(base, adapters, tmp_path / "other", **options)

    assert _files(other.out_dir) == _files(reference.out_dir)
    assert other.manifest["files"] == reference.manifest["files"]


KERNEL_MERGE = """
import json, sys
from threadpoolctl import threadpool_info
from merge.streaming import AdapterRef, merge_streaming
from merge.writer import HashingFile
base, out, adapters = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
result = merge_streaming(base, [AdapterRef(p, w) for p, w in adapters], out, dtype="bfloat16")
kernels = sorted({i.get("architecture") or i["internal_api"] for i in threadpool_info() if i["user_api"] == "blas"})
print(json.dumps({"kernels": kernels, "files": result.manifest["files"]}))
"""


def test_every_blas_kernel_writes_the_same_bytes(mixed, tmp_path):
    """OpenBLAS picks its kernel per CPU; OPENBLAS_CORETYPE forces one, as another machine would."""
    base, adapters = mixed
    runs = {}
    for coretype in ("", "Haswell", "Sandybridge", "Nehalem"):
        env = {"OPENBLAS_CORETYPE": coretype} if coretype else {}
        done = subprocess.run([sys.executable, "-c", KERNEL_MERGE, str(base), str(tmp_path / (coretype or "default")),
                               json.dumps([[str(a.path), a.weight] for a in adapters])],
                              capture_output=True, text=True, timeout=300,
                              env={**{k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}, **env})
        assert done.returncode == 0, done.stderr[-2000:]
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs[tuple(run["kernels"])] = run["files"]
    if len(runs) < 2:
        pytest.skip(f"only one BLAS kernel reachable here: {list(runs)}")
    first, *others = runs.values()
    assert all(files == first for files in others), list(runs)
