"""engine.Index: the fused query end to end, the pool, refusals, the JSON schema, the demo, and query images
prepared exactly like indexed images."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import world
from world import source_image

import engine
from engine.cli import main


@pytest.mark.parametrize("weights", ["rrf", "auto"])
def test_exact_copy_comes_back_first(idx, tiny_index, weights):
    for n in (0, 7, 21, 33):
        res = idx.query(image=source_image(tiny_index, n), prompt=None, k=3, weights=weights)
        assert res.results[0].id.endswith(f"img{n:04d}.{'jpg' if n % 2 else 'png'}")
        assert res.results[0].evidence["clip"] == pytest.approx(1.0, abs=1e-3)
        for name in ("clip", "dino"):
            r = idx.rank(name, idx.encode_query(source_image(tiny_index, n)), 1)
            assert idx.reader.records(r.rows)["id"][0] == res.results[0].id


def test_pool_has_every_feature_for_every_candidate(idx, tiny_index):
    q = idx.encode_query(source_image(tiny_index, 5), "yellow square")
    pool = idx.pool(q, depth=4)
    assert len(pool) >= 4
    for f in engine.feature_names():
        assert pool.feats[f].shape == (len(pool),)
        assert np.isfinite(pool.feats[f]).all(), f  # computed even for rows another ranker brought in


def test_mismatched_models_are_refused(tiny_index, tiny, capsys):
    with pytest.raises(engine.ModelMismatchError, match="built with models 'tiny'"):
        engine.open_index(tiny_index, models="offline")
    other = engine.load_encoders(dataclasses.replace(engine.get_profile("tiny"), seed=1), device="cpu")
    i = engine.open_index(tiny_index)
    with pytest.raises(engine.ModelMismatchError, match="weights_sha256"):
        i.use_encoders(other)
    assert main(["query", str(tiny_index), "--prompt", "x", "--models", "offline"]) == 2
    assert "built with models 'tiny'" in capsys.readouterr().err


def test_bad_query_images_and_damaged_index_are_refused(idx, tmp_path, tiny_index, capsys):
    with pytest.raises(engine.QueryInputError, match="does not exist"):
        idx.query(image=tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(engine.QueryInputError, match="bad.jpg cannot be used: corrupt or truncated"):
        idx.query(image=tmp_path / "bad.jpg")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(engine.QueryInputError, match="not an image"):
        idx.query(image=tmp_path / "text.png")
    with pytest.raises(engine.QueryInputError, match="needs an image, a prompt"):
        idx.query(image=None, prompt="  ")
    assert main(["query", str(tmp_path), "--prompt", "x"]) == 2
    assert "not an attrib index" in capsys.readouterr().err
    assert main(["query", str(tiny_index), "--image", str(tmp_path / "bad.jpg")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_weights_file_for_other_models_is_refused(idx, tmp_path):
    w = engine.FusionWeights(features=["clip", "bm25:rr"], weights=[1.0, 2.0], bias=0.0, mean=[0, 0], std=[1, 1],
                             models={"fingerprint": "0000000000000000", "profile": "offline"}, threshold=0.5)
    w.save(tmp_path / "w.json")
    with pytest.raises(engine.ModelMismatchError, match="learned for models 0000000000000000"):
        idx.query(prompt="red", weights=tmp_path / "w.json")
    w.models = {"fingerprint": idx.fingerprint, "profile": "tiny"}
    w.save(tmp_path / "ok.json")
    res = idx.query(prompt="red circle", weights=tmp_path / "ok.json", k=3)
    assert res.fusion["method"] == "weighted" and res.verdict.threshold == 0.5
    d = json.loads((tmp_path / "ok.json").read_text())
    d["features"] = ["clip", "sift:z"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(engine.FusionWeightsError, match="unknown fusion feature 'sift:z'"):
        idx.query(prompt="red", weights=tmp_path / "bad.json")


RESULT_KEYS = {"rank", "row", "id", "image", "caption", "score", "above_threshold", "evidence", "ranks"}
EVIDENCE_KEYS = {"clip", "clip_text", "dino", "dino_patch", "dino_layout", "bm25", "phrase", "phrase_order", "fuzzy",
                 "fuzzy_cover", "caption_clip", "caption_dups"}


def test_cli_json_schema_is_stable(tiny_index, capsys):
    img = source_image(tiny_index, 4)
    assert main(["query", str(tiny_index), "--image", img, "--prompt", "a green triangle", "-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"schema_version", "query", "models", "fusion", "verdict", "results", "timings_ms", "warnings"}
    assert out["schema_version"] == 1
    assert out["query"] == {"image": img, "prompt": "a green triangle"}
    assert {"profile", "pretrained", "fingerprint"} <= set(out["models"]) and out["models"]["pretrained"] is False
    assert "UNTRAINED" in out["models"]["warning"] and any("UNTRAINED" in w for w in out["warnings"])
    assert {"method", "threshold", "note"} <= set(out["fusion"])
    assert {"likely_source", "threshold", "n_above", "label"} <= set(out["verdict"])
    assert len(out["results"]) == 4
    for i, r in enumerate(out["results"]):
        assert RESULT_KEYS | {"text"} <= set(r) <= RESULT_KEYS | {"share", "text", "support", "carried_by",
                                                                  "caption_match_only"}
        assert set(r["text"]) == {"words", "phrases", "spans", "duplicates"}
        assert r["rank"] == i + 1 and isinstance(r["id"], str) and isinstance(r["score"], float)
        assert set(r["evidence"]) == EVIDENCE_KEYS
        assert all(v is None or isinstance(v, float) for v in r["evidence"].values())
        assert set(r["ranks"]) == set(engine.main_rankers())
    assert {"encode_clip_image", "encode_clip_text", "encode_dino", "candidates", "features", "fusion",
            "total"} <= set(out["timings_ms"])
    # the table view prints the same results for people
    assert main(["query", str(tiny_index), "--image", img, "--prompt", "a green triangle", "-k", "2"]) == 0
    err = capsys.readouterr().err
    assert out["results"][0]["id"] in err and "UNTRAINED" in err


def test_demo_runs_end_to_end_and_reuses_its_cache(tmp_path, capsys):
    assert main(["demo", "--models", "tiny", "--cache", str(tmp_path / "demo"), "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert len(out["results"]) == 5 and out["models"]["profile"] == "tiny"
    assert "indexing the demo training set" in cap.err
    assert (tmp_path / "demo" / "index-tiny" / "manifest.json").exists()
    assert main(["demo", "--models", "tiny", "--cache", str(tmp_path / "demo")]) == 0
    err = capsys.readouterr().err
    assert "reusing the cached index" in err and "attribution for" in err


def test_query_images_are_prepared_exactly_like_indexed_images(tmp_path, tiny):
    """A big JPEG (decoded at reduced scale) and a transparent PNG give the same encoder inputs on both sides,
    whether the query is a path or an in-memory image."""
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    big, _ = world.scene(3, size=900)
    big.save(src / "big.jpg", quality=92)
    rgba = Image.new("RGBA", (120, 90), (0, 0, 0, 0))
    rgba.paste(world.scene(4, size=60)[0], (30, 15))
    rgba.save(src / "alpha.png")
    for i in range(6):
        world.scene(10 + i)[0].save(src / f"other{i}.png")
    engine.build_index(src, tmp_path / "idx", encoders=tiny, progress=False,
                       settings=engine.IndexSettings(pca_sample=4))
    idx = engine.open_index(tmp_path / "idx")
    idx.use_encoders(tiny)
    for name in ("big.jpg", "alpha.png"):
        for query in (src / name, Image.open(src / name)):
            top = idx.query(image=query, k=1, weights="rrf").results[0]
            assert top.id == name
            assert top.evidence["clip"] == pytest.approx(1.0, abs=2e-3)
            assert top.evidence["dino_patch"] == pytest.approx(1.0, abs=2e-3)
    # the path query is pixel-identical to what was indexed: cosine 1 up to fp16 storage
    assert (idx.query(image=src / "big.jpg", k=1, weights="rrf").results[0].evidence["dino"]
            == pytest.approx(1.0, abs=1e-3))


def test_excluded_rows_never_come_back(idx, tiny_index):
    """Masking (calibration holds records out): excluded rows leave every ranker, the pool and the results, and
    the rankers still fill k from the rest."""
    q = idx.encode_query(source_image(tiny_index, 9), "a red circle on a blue background")
    full = idx.search(q, k=10, weights="rrf")
    top = [c.row for c in full.results[:3]]
    res = idx.search(q, k=10, weights="rrf", exclude=top)
    assert len(res.results) == 10 and not set(top) & {c.row for c in res.results}
    assert not set(top) & set(idx.pool(q, exclude=top).rows.tolist())
    for name in engine.rankers.ranker_names():
        r = idx.rank(name, q, 5, exclude=top)
        assert not set(top) & set(r.rows.tolist()), name
        if len(idx.rank(name, q, 8)) >= 8:
            assert len(r) == 5, name
    with pytest.raises(engine.QueryInputError, match="rows to exclude"):
        idx.search(q, exclude=[10_000])


def test_dense_stores_searched_side_by_side_give_the_serial_answer(idx, tiny_index):
    """The pool searches every vector store but the costliest on the helper thread: the same rows, in the same
    order, as one store after the other, with and without excluded rows."""
    from engine.rankers import RowFilter

    q = idx.encode_query(source_image(tiny_index, 12), "a green cross on a red background")
    firsts = [r for r in idx.rankers.values() if r.first_stage and r.available(q) and r.dense_query(q) is not None]
    assert len({r.dense_query(q)[0] for r in firsts}) >= 2  # clip and dino: there is something to run side by side
    wanted = {r.name: r.first_stage_depth(6) for r in firsts}
    for exclude in (None, RowFilter(np.array([0, 3, 12], np.int64))):
        serial = idx._pool._dense_first_stages(q, firsts, wanted, exclude, None)
        side = idx._pool._dense_first_stages(q, firsts, wanted, exclude, lambda fn, *a: idx._worker.submit(fn, *a))
        assert serial.keys() == side.keys() == wanted.keys()
        for name in serial:
            assert serial[name].tolist() == side[name].tolist(), name
            if exclude is not None:
                assert not {0, 3, 12} & set(side[name].tolist())
