"""The numeric pieces of the stores against brute force: patch scores, the fp16 patch store, the projection."""
from __future__ import annotations

import numpy as np
import pytest

from engine._stores import DinoProjection, PatchStore, VectorStore, build_faiss, cell_similarities, l2n, patch_scores


def brute_patch_scores(q: np.ndarray, c: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    n, C = c.shape[0], grid * grid
    chamfer, layout = np.zeros(n), np.zeros(n)
    for k in range(n):
        sims = q @ c[k].T  # (Cq, Cc)
        chamfer[k] = sims.max(axis=1).mean()
        best = []
        for src in range(C):
            r, col = divmod(src, grid)
            nb = [sims[src, (r + dr) * grid + col + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                  if 0 <= r + dr < grid and 0 <= col + dc < grid]
            best.append(max(nb))
        layout[k] = np.mean(best)
    return chamfer, layout


def test_patch_scores_match_brute_force():
    rng = np.random.default_rng(1)
    for grid in (3, 4, 8):
        q = l2n(rng.standard_normal((grid * grid, 12))).astype(np.float32)
        c = l2n(rng.standard_normal((7, grid * grid, 12))).astype(np.float32)
        ch, lay = patch_scores(q, c, grid)
        bch, blay = brute_patch_scores(q, c, grid)
        np.testing.assert_allclose(ch, bch, atol=1e-5)
        np.testing.assert_allclose(lay, blay, atol=1e-5)
        assert cell_similarities(q, c).shape == (7, grid * grid, grid * grid)
    # a shifted copy keeps a perfect chamfer score; layout forgives a one-cell shift but not a larger one
    grid = 4
    base = l2n(rng.standard_normal((grid, grid, 8))).astype(np.float32)
    one = np.roll(base, 1, axis=1).reshape(-1, 8)
    two = np.roll(base, 2, axis=1).reshape(-1, 8)
    ch, lay = patch_scores(base.reshape(-1, 8), np.stack([base.reshape(-1, 8), one, two]), grid)
    np.testing.assert_allclose(ch, [1.0, 1.0, 1.0], atol=1e-5)
    assert lay[0] > 0.999 and lay[1] > lay[2]
    assert patch_scores(base.reshape(-1, 8), np.zeros((0, 16, 8), np.float32), grid)[0].shape == (0,)


def test_patch_store_returns_exact_float32_copies(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 16, 8)).astype(np.float16)
    (tmp_path / "p.f16").write_bytes(x.tobytes())
    store = PatchStore(tmp_path / "p.f16", 10, 16, 8)
    got = store.get(np.array([9, 0, 3, 3]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x[[9, 0, 3, 3]].astype(np.float32))
    assert store.get(np.zeros(0, np.int64)).shape == (0, 16, 8)


def test_projection_is_deterministic_and_normalised(tmp_path):
    rng = np.random.default_rng(3)
    cls, pm = rng.standard_normal((50, 32)), rng.standard_normal((50, 32))
    cells = rng.standard_normal((50, 16, 32))
    a = DinoProjection.fit(cls, pm, cells, 8)
    b = DinoProjection.fit(cls, pm, cells, 8)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_allclose(a.components.T @ a.components, np.eye(8), atol=1e-5)  # orthonormal basis
    g = a.global_desc(cls[:3], pm[:3])
    assert g.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
    p = a.project_cells(cells[:2])
    assert p.shape == (2, 16, 8)
    np.testing.assert_allclose(np.linalg.norm(p, axis=2), 1.0, atol=1e-5)
    a.save(tmp_path / "proj.npz")
    c = DinoProjection.load(tmp_path / "proj.npz")
    np.testing.assert_array_equal(c.project_cells(cells[:2]), p)


def test_record_metadata_is_served_in_request_order_across_batches(tmp_path, tiny):
    """Metadata is written in batches of 8,192 rows; lookups across batches keep the asked-for order."""
    import engine
    from engine._reader import IndexReader

    w = engine.IndexWriter(tmp_path / "idx", tiny.identity, engine.IndexSettings())
    n = 20_000
    for i in range(n):
        w.add_caption_only(f"r{i}", f"caption number {i}")
    w.finalize({"path": "generated", "kind": "test"})
    r = IndexReader(tmp_path / "idx")
    rows = np.array([19_999, 5, 8_192, 8_191, 16_384, 5])
    got = r.records(rows)
    assert got["id"].to_list() == [f"r{i}" for i in rows]
    assert got["caption"][0] == "caption number 19999" and got["image"].null_count() == len(rows)
    assert r.ids[12_345] == "r12345" and len(r.ids) == n
    assert r.records(np.zeros(0, np.int64)).height == 0


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_faiss_search_matches_brute_force(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = l2n(rng.standard_normal((2000, 32)).astype(np.float32))
    info = build_faiss(x, tmp_path / "v.faiss", kind)
    if kind == "ivf":
        info["nprobe"] = info["nlist"]  # probe every list: exhaustive, so it must equal brute force
    store = VectorStore(tmp_path / "v.faiss", info)
    q = l2n(rng.standard_normal((5, 32)).astype(np.float32))
    scores, slots = store.search(q, 10)
    x16 = x.astype(np.float16).astype(np.float32)  # the stores keep fp16 codes
    brute = q @ x16.T
    want = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(slots, want)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, want, 1), atol=1e-4)
    np.testing.assert_allclose(store.vectors(np.array([3, 1999])), x16[[3, 1999]], atol=1e-6)
