"""The numeric pieces of the stores against brute force: patch scores, the codecs, the projection, dense search."""
from __future__ import annotations

import numpy as np
import pytest

from engine._stores import DinoProjection, cell_similarities, l2n, patch_scores


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


def test_layout_scores_keep_every_bit_of_the_gather_they_replaced():
    """Calibrated thresholds were learned on layout scores computed by gathering each query cell's 9 neighbours
    and averaging column-major: the strided-diagonal version keeps every bit of them."""
    rng = np.random.default_rng(2)
    for grid in (1, 2, 3, 5, 8, 16):
        C = grid * grid
        idx = np.arange(C)
        r, c = idx // grid, idx % grid
        cols = []
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                ok = (rr >= 0) & (rr < grid) & (cc >= 0) & (cc < grid)
                cols.append(np.where(ok, rr * grid + cc, idx) * C + idx)
        gather = np.stack(cols, axis=1)
        for n in (1, 7, 300):
            q = l2n(rng.standard_normal((C, 16))).astype(np.float32)
            cells = l2n(rng.standard_normal((n, C, 16))).astype(np.float32)
            sims = cell_similarities(q, cells)
            want = sims.reshape(n, C * C)[:, gather].max(axis=2).mean(axis=1).astype(np.float32)
            assert np.array_equal(patch_scores(q, cells, grid)[1], want), (grid, n)


def test_codebook_codecs_round_trip_and_checksums_catch_any_byte():
    from engine._codebooks import Codebooks
    from engine._segment import row_sums

    rng = np.random.default_rng(2)
    clip = l2n(rng.standard_normal((600, 32)).astype(np.float32))
    dino = l2n(rng.standard_normal((600, 48)).astype(np.float32))
    cells = l2n(rng.standard_normal((600, 16, 8)).astype(np.float32))
    proj = DinoProjection.identity(24, 8)
    fp = Codebooks.train(1, proj, clip, dino, cells, "flat", "fp16", 600, 50_000, 4)
    np.testing.assert_array_equal(fp.decode_refine("clip", fp.refine_codes("clip", clip)),
                                  clip.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(fp.decode_patches(fp.encode_patches(cells)),
                                  cells.astype(np.float16).astype(np.float32))
    pq = Codebooks.train(1, proj, clip, dino, cells, "ivf", "pq", 600, 100, 4)
    assert pq.stores["clip"].codec == "pq" and pq.stores["clip"].nlist > 1 and pq.patch_code_shape[1] == 4
    back = pq.decode_refine("dino", pq.refine_codes("dino", dino))
    assert np.abs(np.sum(back * dino, axis=1) - 1).max() < 0.01  # 8-bit refine codes: cosine within 1%
    cos = np.sum(pq.decode_patches(pq.encode_patches(cells)) * cells, axis=2)
    assert cos.mean() > 0.6  # random 8-d cells through 4 sub-quantizers of 256 centroids
    codes = pq.encode_patches(cells[:5])
    sums = row_sums(codes)
    for pos in (0, 7, 13, 31):
        flipped = codes.copy().reshape(5, -1)
        flipped[2, pos] ^= 0xFF
        got = row_sums(flipped.reshape(codes.shape))
        assert got[2] != sums[2] and np.array_equal(np.delete(got, 2), np.delete(sums, 2))


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
    assert r.ids_of(np.array([12_345]))[0] == "r12345" and len(r.all_ids()[1]) == n
    assert r.rows_of(["r7", "nope"]).tolist() == [7, -1]
    assert r.records(np.zeros(0, np.int64)).height == 0


@pytest.mark.parametrize("ann,codec", [("flat", "fp16"), ("ivf", "fp16"), ("ivf", "pq")])
def test_dense_search_matches_brute_force(tmp_path, tiny, ann, codec):
    """Exact stores equal brute force over their fp16 vectors; the compressed one keeps recall@10 >= 0.9."""
    import engine
    from engine._reader import IndexReader

    n = 3000
    rng = np.random.default_rng(0)
    centres = l2n(rng.standard_normal((40, 64)).astype(np.float32))
    x = l2n(centres[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, 64)).astype(np.float32))
    w = engine.IndexWriter(tmp_path / "idx", tiny.identity, engine.IndexSettings(ann=ann, codec=codec, chunk=n,
                                                                                  pca_sample=64))
    d = tiny.dino_dim
    w.add_images([f"v{i}" for i in range(n)], [None] * n, [""] * n, [{}] * n, x,
                 rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32),
                 rng.standard_normal((n, 64, d)).astype(np.float32))
    w.finalize({"path": "synthetic", "kind": "test"})
    r = IndexReader(tmp_path / "idx", nprobe=None if ann == "flat" else 10_000)  # probe every list: exhaustive
    assert r.codebooks.stores["clip"].codec == codec and r.codebooks.stores["clip"].ann == ann
    q = l2n(x[:20] + 0.1 * rng.standard_normal((20, 64)).astype(np.float32))
    x16 = x.astype(np.float16).astype(np.float32)
    brute = q @ x16.T
    for i, (rows, scores) in enumerate(r.search("clip", q, 10)):
        want = np.argsort(-brute[i], kind="stable")[:10]
        if codec == "fp16":
            np.testing.assert_array_equal(rows, want)
            np.testing.assert_allclose(scores, brute[i][want], atol=1e-4)
        else:
            assert len(set(rows.tolist()) & set(want.tolist())) >= 9
    has, v = r.vectors("clip", np.array([3, 2999, 3]))
    assert has.all() and v.shape == (3, 64)
    np.testing.assert_allclose(v, x16[[3, 2999, 3]], atol=1e-6 if codec == "fp16" else 0.02)


def test_caption_search_orders_equal_scores_by_row(tmp_path):
    """Identical captions score the same: the k kept are the lowest live rows, whatever the order tantivy holds
    the documents in (added here in reverse row order, over several of its segments; its own tie order changes
    when it merges them) and whatever the k; deleted rows never take a place."""
    from engine._stores import TextSink, TextStore

    class Live:
        deleted = np.array([2, 5], np.int64)

        def keep(self, rows):
            return ~np.isin(rows, self.deleted)

        def overfetch(self, n):
            return n + len(self.deleted)

    sink = TextSink(tmp_path / "text")
    for batch in (range(299, 200, -1), range(200, 100, -1), range(100, -1, -1)):
        for row in batch:
            sink.add(row, "a red car" if row % 3 else "a red car on a red road")
        sink.commit()
    sink.close()
    store = TextStore(tmp_path / "text", live=Live())
    short = [r for r in range(300) if r % 3 and r not in (2, 5)]  # the higher score (a shorter caption)
    long = list(range(0, 300, 3))
    for k in (1, 5, 100, 198, 250, 400):
        rows, scores = store.search(["red", "car"], k)
        assert rows.tolist() == (short + long)[:k], k
        assert np.all(np.diff(scores) <= 0)
    store = TextStore(tmp_path / "text")
    assert store.search(["car"], 4)[0].tolist() == [1, 2, 4, 5]  # "car" once in each caption: shorter ones first


def test_a_full_disk_under_the_caption_index_is_an_oserror(tmp_path, monkeypatch):
    """Tantivy's errors (the texts it gave on a full tmpfs) become the OSError of a full disk: a write that names
    the reason; a worker thread's failed write ("writer was killed", no reason given) when less space is left
    than the heap it wrote out. With space to spare, that error stays what it is."""
    import errno

    from engine import _stores

    sink = _stores.TextSink(tmp_path / "text")
    real = sink.writer

    class Failing:
        def add_document(self, doc):
            raise ValueError("An index writer was killed.. A worker thread encountered an error (io::Error most "
                             "likely) or panicked.")

        def commit(self):
            raise ValueError("Failed to open file for write: 'IoError { io_error: Custom { kind: StorageFull, error: "
                             "PathError { path: \"/x/text/.tmpN5SHnf\", err: Os { code: 28, kind: StorageFull, "
                             "message: \"No space left on device\" } } }, filepath: \"c78d.fieldnorm\" }'")

    sink.writer = Failing()
    monkeypatch.setattr(_stores, "_free_bytes", lambda path: 1 << 20)
    with pytest.raises(OSError) as e:
        sink.add(1, "a red car")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "text")
    with pytest.raises(OSError) as e:
        sink.commit()
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(_stores, "_free_bytes", lambda path: 1 << 40)
    with pytest.raises(ValueError, match="writer was killed"):
        sink.add(1, "a red car")
    sink.writer = real
    sink.abort()
