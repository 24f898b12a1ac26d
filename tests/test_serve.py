"""`attrib serve`: the API against the library, the hostile cases (each followed by a normal request that must
still be answered), the queue, batching and timeouts, the token, CORS, the page, one real uvicorn process
(client disconnect, SIGTERM while a request is in flight) and a headless-Chromium upload (marked ``browser``)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import world
from PIL import Image

import engine
from engine.serve import ServeSettings, create_app
from engine.serve.uploads import sniff_image_type

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 24
TOKEN = "s3cret-token-for-tests"
BOUNDARY = "attribTestBoundary"


# --------------------------------------------------------------------------------------------- the world
@pytest.fixture(scope="module")
def sw(tmp_path_factory, tiny):
    """A flat folder index (ids without '/') of 24 tiny scenes, opened with the tiny encoders."""
    root = tmp_path_factory.mktemp("serve-world")
    caps = world.image_folder(root / "src", N_IMAGES, nested=False)
    engine.build_index(root / "src", root / "index", encoders=tiny, progress=False,
                       settings=engine.IndexSettings(pca_sample=16))
    idx = engine.open_index(root / "index")
    idx.use_encoders(tiny)
    yield {"root": root, "index": idx, "captions": caps, "src": root / "src"}
    idx.close()


def image_path(sw, i: int) -> Path:
    return next(p for p in sw["src"].glob(f"img{i:04d}.*") if p.suffix in (".png", ".jpg"))


def client(sw, **settings):
    from fastapi.testclient import TestClient

    return TestClient(create_app(sw["index"], ServeSettings(**settings)))


def upload(c, sw, i: int, prompt: str | None = None, k: int = 5, headers=None, **extra):
    p = image_path(sw, i)
    data = {"k": str(k), **({"prompt": prompt} if prompt else {}), **extra}
    return c.post("/v1/attribute", files={"image": (p.name, p.read_bytes(), "image/png")}, data=data,
                  headers=headers or {})


def assert_serves(c, sw, headers=None, i: int = 3) -> dict:
    """A normal request after a hostile one: answered, with the uploaded record on top."""
    r = upload(c, sw, i, sw["captions"][i], headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["id"] == image_path(sw, i).name
    return body


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"]
    return body


def multipart(fields: dict[str, str], image: bytes | None = None, filename: str = "x.png") -> bytes:
    out = b""
    for k, v in fields.items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    if image is not None:
        out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                "Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


MP = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def two_images(png: bytes) -> bytes:
    one = multipart({}, png)
    part = one[: -len(f"--{BOUNDARY}--\r\n")]
    return part + one


def without_timings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("timings_ms", "query")}


def asgi_post(c, chunks: list[bytes], content_length: int | None, disconnect: bool = False):
    """POST /v1/attribute straight through ASGI (in the TestClient's event loop), the body in ``chunks``; then,
    with ``disconnect``, the client goes away. Returns (chunks the app pulled, the messages it sent)."""
    app = c.app
    sent: list[dict] = []
    pulled = [0]

    async def call():
        import anyio

        messages = [{"type": "http.request", "body": ch, "more_body": True} for ch in chunks]
        messages.append({"type": "http.disconnect"} if disconnect else {"type": "http.request", "body": b""})

        async def receive():
            if messages:
                if messages[0]["type"] == "http.request" and messages[0]["body"]:
                    pulled[0] += 1
                return messages.pop(0)
            await anyio.sleep_forever()

        async def send(message):
            sent.append(message)

        headers = [(b"host", b"testserver"), (b"content-type", MP["content-type"].encode())]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/attribute", "raw_path": b"/v1/attribute", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "headers": headers}
        await app(scope, receive, send)

    c.portal.call(call)
    return pulled[0], sent


# --------------------------------------------------------------------------------------------- the API
def test_attribute_answers_the_library_json(sw):
    idx = sw["index"]
    prompt = sw["captions"][5]
    lib = idx.query(image=str(image_path(sw, 5)), prompt=prompt, k=5).to_dict()
    with client(sw) as c:
        r = upload(c, sw, 5, prompt, k=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["schema_version"] == lib["schema_version"] == 1
        assert without_timings(body) == without_timings(lib)
        assert body["query"] == {"image": f"upload:{image_path(sw, 5).name}", "prompt": prompt}
        assert body["results"][0]["id"] == image_path(sw, 5).name
        assert {"encode_clip_image", "encode_dino", "queue_wait", "search_total", "total"} <= set(body["timings_ms"])
        assert any("UNTRAINED" in w for w in body["warnings"]) and "UNTRAINED" in body["models"]["warning"]
        rid = r.headers["x-attrib-request-id"]
        assert r.headers["x-attrib-report"] == f"/v1/attribute/{rid}/report"
        again = c.get(f"/v1/attribute/{rid}")
        assert again.status_code == 200 and again.json() == body
        assert_error(c.get("/v1/attribute/" + "A" * 22), 404, "not_found")


def test_prompt_only_and_image_only_queries(sw):
    idx = sw["index"]
    prompt = sw["captions"][7]
    with client(sw) as c:
        for r in (c.post("/v1/attribute", data={"prompt": prompt, "k": "4"}),  # urlencoded
                  c.post("/v1/attribute", content=multipart({"prompt": prompt, "k": "4"}), headers=MP)):
            assert r.status_code == 200, r.text
            assert without_timings(r.json()) == without_timings(idx.query(prompt=prompt, k=4).to_dict())
            assert r.json()["query"] == {"image": None, "prompt": prompt}
        r = upload(c, sw, 9, k=3)
        assert r.status_code == 200
        lib = idx.query(image=str(image_path(sw, 9)), k=3).to_dict()
        assert without_timings(r.json()) == without_timings(lib)
        r = c.post("/v1/attribute", data={"prompt": prompt, "weights": "rrf"})
        assert r.status_code == 200 and r.json()["fusion"]["method"] == "rrf" and len(r.json()["results"]) == 10


def test_form_mistakes_get_one_line_json_errors(sw):
    png = image_path(sw, 1).read_bytes()
    with client(sw, max_prompt_chars=50, max_k=20) as c:
        cases = [
            (c.post("/v1/attribute", data={"k": "3"}), 400, "empty_query"),
            (c.post("/v1/attribute", files={"image": ("gen.png", b"", "image/png")}), 400, "empty_image"),
            (c.post("/v1/attribute", data={"prompt": "a cat", "k": "0"}), 400, "bad_k"),
            (c.post("/v1/attribute", data={"prompt": "a cat", "k": "21"}), 400, "bad_k"),
            (c.post("/v1/attribute", data={"prompt": "a cat", "k": "ten"}), 400, "bad_k"),
            (c.post("/v1/attribute", data={"prompt": "a cat", "weights": "nope"}), 400, "unknown_weights"),
            (c.post("/v1/attribute", data={"prompt": "a cat", "colour": "red"}), 400, "bad_form"),
            (c.post("/v1/attribute", content=b"prompt=a&prompt=b", headers={"content-type":
                    "application/x-www-form-urlencoded"}), 400, "bad_form"),
            (c.post("/v1/attribute", data={"prompt": "a cat", "image": "/etc/passwd"}), 400, "bad_form"),
            (c.post("/v1/attribute", data={"prompt": "x" * 51}), 400, "prompt_too_long"),
            (c.post("/v1/attribute", json={"prompt": "a cat"}), 415, "unsupported_media_type"),
            (c.post("/v1/attribute", content=two_images(png), headers=MP), 400, "bad_form"),
            (c.get("/v1/attribute"), 405, "method_not_allowed"),
            (c.get("/v1/nothing-here"), 404, "not_found"),
        ]
        for r, status, code in cases:
            assert_error(r, status, code)
            assert_serves(c, sw)
        assert "valid: auto, rrf" in assert_error(
            c.post("/v1/attribute", data={"prompt": "a", "weights": "x"}), 400, "unknown_weights")["detail"]


def test_weights_for_other_models_are_refused_at_start_up(sw):
    shipped = ROOT / "engine" / "data" / "weights-offline.json"
    with pytest.raises(engine.AttribError, match="fingerprint|models"):
        create_app(sw["index"], ServeSettings(weights=(("offline", str(shipped)),)))


# --------------------------------------------------------------------------------------------- hostile uploads
def test_oversized_uploads_are_refused_while_reading(sw):
    big = world.jpeg_bytes(world.noise_photo(1, 800, 800), quality=100)
    assert len(big) > 200_000
    with client(sw, max_upload_mb=0.1) as c:
        r = c.post("/v1/attribute", files={"image": ("big.jpg", big, "image/jpeg")})
        assert "limit of" in assert_error(r, 413, "upload_too_large")["detail"]
        assert_serves(c, sw)
        # no Content-Length (chunked): the body is counted as it arrives, and refused before it is all read
        head = multipart({"prompt": "a"})[: -len(f"--{BOUNDARY}--\r\n")] + (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n').encode()
        chunks = [head] + [big[i:i + 8192] for i in range(0, len(big), 8192)] + [f"\r\n--{BOUNDARY}--\r\n".encode()]
        pulled, sent = asgi_post(c, chunks, content_length=None)
        assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"] == "upload_too_large"
        assert pulled * 8192 < 0.1 * 1024 * 1024 + 64 * 1024 + 3 * 8192 < len(big)  # stopped at the limit
        assert_serves(c, sw)


def test_decompression_bombs_are_refused_from_the_header(sw):
    with client(sw) as c:
        for w, h in ((100_000, 100_000), (8_000, 6_000)):  # beyond PIL's own limit, and beyond the index's 40 M
            r = c.post("/v1/attribute", files={"image": ("bomb.png", world.png_bomb_header(w, h), "image/png")})
            body = assert_error(r, 413, "image_too_large")
            assert "decompression bomb" in body["detail"] and "40000000" in body["detail"]
            assert_serves(c, sw)
    with client(sw, max_pixels=5_000) as c:  # a server's own stricter limit
        r = c.post("/v1/attribute", files={"image": ("a.png", image_path(sw, 2).read_bytes(), "image/png")})
        assert "5000" in assert_error(r, 413, "image_too_large")["detail"]


def test_non_image_and_corrupt_bytes(sw):
    png = image_path(sw, 2).read_bytes()
    jpg = world.jpeg_bytes(world.scene(2)[0])
    with client(sw) as c:
        for data in (b"this is a text file pretending to be a png", b"<svg onload=alert(1)>", b"%PDF-1.4\n",
                     b"\x00" * 100):
            r = c.post("/v1/attribute", files={"image": ("a.png", data, "image/png")}, data={"prompt": "a cat"})
            assert "sniffed" in assert_error(r, 415, "not_an_image")["detail"]
            assert_serves(c, sw)
        for data in (jpg[: len(jpg) // 2], b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, png[:60]):
            r = c.post("/v1/attribute", files={"image": ("a.jpg", data, "image/jpeg")})
            assert "corrupt or truncated" in assert_error(r, 422, "unreadable_image")["detail"]
            assert_serves(c, sw)
        # the declared type is ignored: a PNG sent as text/plain is still a PNG
        r = c.post("/v1/attribute", files={"image": ("a.txt", png, "text/plain")})
        assert r.status_code == 200
    assert sniff_image_type(png) == "image/png" and sniff_image_type(jpg) == "image/jpeg"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp" and sniff_image_type(b"GIF8") is None


def test_truncated_multipart_bodies(sw):
    png = image_path(sw, 4).read_bytes()
    body = multipart({"prompt": "a cat", "k": "3"}, png)
    with client(sw) as c:
        assert c.post("/v1/attribute", content=body, headers=MP).status_code == 200
        for cut in (len(body) - 5, len(body) // 2, 30, 1):
            r = c.post("/v1/attribute", content=body[:cut], headers=MP)
            assert r.status_code == 400 and r.json()["error"] in ("truncated_body", "bad_form"), r.text
            assert_serves(c, sw)
        assert_error(c.post("/v1/attribute", content=b"garbage", headers=MP), 400, "bad_form")
        assert_error(c.post("/v1/attribute", content=body, headers={"content-type": "multipart/form-data"}),
                     400, "bad_form")  # no boundary
        assert_serves(c, sw)


def test_a_client_that_disconnects_mid_upload(sw):
    """Straight through ASGI: half a body, then the client is gone. Nothing leaks; the next request is served."""
    png = world.jpeg_bytes(world.noise_photo(3, 400, 400), quality=95)
    body = multipart({"prompt": "a"}, png)
    with client(sw) as c:
        pulled, sent = asgi_post(c, [body[: len(body) // 2]], content_length=len(body), disconnect=True)
        assert pulled == 1
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
        assert json.loads(sent[1]["body"])["error"] == "client_disconnected"
        svc = _service(c)
        assert svc.admitted == 0 and svc.worker.pending() == 0
        assert_serves(c, sw)


# --------------------------------------------------------------------------------------------- records
def test_path_like_ids_are_404_and_real_ids_are_served_reencoded(sw):
    src = image_path(sw, 6)
    with client(sw) as c:
        hostile = ["..", "..%2F..%2Fetc%2Fpasswd", "a..b", "%2Fetc%2Fpasswd", "img0006.png%00", "img0006.png%2F..",
                   "..%5C..%5Cwindows", "%00", quote_path(str(src)), "nonexistent.png", "x" * 2000]
        for rid in hostile:
            r = c.get(f"/v1/records/{rid}/image")
            assert r.status_code == 404, (rid, r.status_code)
            assert r.headers["content-type"].startswith("application/json")
            ok = c.get(f"/v1/records/{src.name}/image")
            assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
        data = ok.content
        assert data != src.read_bytes() and data[:3] == b"\xff\xd8\xff"  # re-encoded, never the raw file
        im = Image.open(io.BytesIO(data))
        assert im.size == Image.open(src).size  # 96 px: not enlarged
        row = int(sw["index"].reader.rows_of([src.name])[0])
        by_row = c.get(f"/v1/rows/{row}/image")
        assert by_row.status_code == 200 and by_row.content == data
        assert c.get(f"/v1/rows/{row}/image?size=32").status_code == 200
        assert max(Image.open(io.BytesIO(c.get(f"/v1/rows/{row}/image?size=32").content)).size) == 32
        assert_error(c.get(f"/v1/rows/{row}/image?size=5"), 400, "bad_size")
        for bad in ("-1", str(N_IMAGES), "99999999999"):
            assert c.get(f"/v1/rows/{bad}/image").status_code == 404
        assert_error(c.get("/v1/rows/abc/image"), 400, "bad_request")
        assert_serves(c, sw)


def quote_path(p: str) -> str:
    from urllib.parse import quote

    return quote(p, safe="")


# --------------------------------------------------------------------------------------------- security options
def test_bearer_token_on_every_endpoint_but_healthz(sw):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with client(sw, token=TOKEN) as c:
        ok = assert_serves(c, sw, headers=auth)
        rid = upload(c, sw, 3, headers=auth).headers["x-attrib-request-id"]
        protected = [("get", "/v1/info"), ("get", "/openapi.json"), ("get", "/docs"), ("get", f"/v1/attribute/{rid}"),
                     ("get", f"/v1/attribute/{rid}/report"), ("get", f"/v1/records/{image_path(sw, 1).name}/image"),
                     ("get", "/v1/rows/0/image")]
        for headers in ({}, {"Authorization": "Bearer wrong-token-xyz"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            for method, path in protected:
                r = getattr(c, method)(path, headers=headers)
                assert_error(r, 401, "unauthorized")
                assert r.headers["www-authenticate"].startswith("Bearer")
            r = upload(c, sw, 3, headers=headers)  # refused before the body is parsed
            assert_error(r, 401, "unauthorized")
            assert_serves(c, sw, headers=auth)
        for method, path in protected:
            assert getattr(c, method)(path, headers=auth).status_code == 200, path
        # no token needed: the health check and the page's static files (they hold no data)
        assert c.get("/healthz").status_code == 200 and c.get("/healthz").json()["auth"] is True
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        # the report link carries a key for this one result (a frame cannot send headers)
        r = upload(c, sw, 3, headers=auth)
        link = r.headers["x-attrib-report"]
        assert "?key=" in link
        assert c.get(link).status_code == 200
        assert_error(c.get(link[:-3] + "abc"), 401, "unauthorized")
        other = upload(c, sw, 4, headers=auth).headers["x-attrib-report"]
        assert_error(c.get(other.split("?")[0] + "?" + link.split("?")[1]), 401, "unauthorized")  # not transferable
        assert ok["results"]


def test_cors_is_off_unless_an_origin_is_given(sw):
    origin = {"Origin": "https://tools.example.org"}
    with client(sw) as c:
        r = c.get("/v1/info", headers=origin)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/attribute", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    with client(sw, cors_origins=("https://tools.example.org",), token=TOKEN) as c:
        pre = c.options("/v1/attribute", headers={**origin, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin["Origin"]
        r = upload(c, sw, 3, headers={**origin, "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin["Origin"]
        assert "x-attrib-report" in r.headers["access-control-expose-headers"].lower()
        r = c.get("/v1/info", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"})
        assert "access-control-allow-origin" not in r.headers


def test_settings_are_checked(sw):
    for bad in (dict(token="short"), dict(token="has a space in it"), dict(cors_origins=("example.org",)),
                dict(cors_origins=("https://example.org/path",)), dict(weights=(("auto", "x.json"),)),
                dict(weights=(("../x", "x.json"),)), dict(queue=0), dict(max_upload_mb=float("nan")),
                dict(timeout_s=-1), dict(max_pixels=0)):
        with pytest.raises(engine.AttribError):
            ServeSettings(**bad)
    s = ServeSettings(token=TOKEN, weights=(("mine", "w.json"),), cors_origins=("https://a.org",))
    assert s.to_dict()["token"] is None and ServeSettings.from_dict(s.to_env()) == s


def test_serve_command_refuses_bad_arguments_in_one_line(sw, tmp_path, capsys):
    from engine.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(sw["root"] / "index"), "--weights", "no-equals-sign"]) == 2
    assert main(["serve", str(sw["root"] / "index"), "--port", "70000"]) == 2
    assert main(["serve", str(sw["root"] / "index"), "--models", "offline"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 4 and "Traceback" not in err


# --------------------------------------------------------------------------------------------- queue and batching
def blocked_worker(app):
    """Block the worker thread until the returned event is set (returns the event and the blocking future)."""
    gate, running = threading.Event(), threading.Event()

    def hold():
        running.set()
        gate.wait(30)

    fut = app.state.service.worker.submit_call(hold)
    assert running.wait(10)
    return gate, fut


def wait_until(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_answers_503_then_recovers(sw):
    with client(sw, queue=2) as c:
        svc = _service(c)
        gate, _ = blocked_worker(_app(c))
        out: dict[int, int] = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, upload(c, sw, i).status_code))
                   for i in (1, 2)]
        for t in threads:
            t.start()
        wait_until(lambda: svc.admitted == 2)
        t0 = time.perf_counter()
        r = upload(c, sw, 5)
        assert time.perf_counter() - t0 < 5
        body = assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1" and "retry after 1 s" in body["detail"]
        assert svc.refused == 1
        gate.set()
        for t in threads:
            t.join(30)
        assert out == {1: 200, 2: 200}
        assert_serves(c, sw)


def test_a_request_that_waits_too_long_gets_504_and_is_skipped(sw):
    with client(sw, timeout_s=0.5) as c:
        svc = _service(c)
        gate, _ = blocked_worker(_app(c))
        r = upload(c, sw, 1)
        assert_error(r, 504, "timeout")
        gate.set()
        # the worker takes the job off the queue, waits its batching window, then skips it: wait for the outcome
        wait_until(lambda: svc.worker.pending() == 0 and svc.worker.stats.skipped + svc.worker.stats.queries > 0)
        assert svc.worker.stats.skipped == 1 and svc.worker.stats.queries == 0  # its query never ran
        assert_serves(c, sw)


def test_requests_that_arrive_together_are_encoded_in_one_batch(sw):
    idx = sw["index"]
    ids = [2, 8, 13, 21]
    with client(sw) as c:
        svc = _service(c)
        gate, _ = blocked_worker(_app(c))
        out: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, upload(c, sw, i, sw["captions"][i]).json()))
                   for i in ids]
        for t in threads:
            t.start()
        wait_until(lambda: svc.worker.pending() == len(ids))
        batches = svc.worker.stats.batches
        gate.set()
        for t in threads:
            t.join(30)
        assert svc.worker.stats.batches == batches + 1 and svc.worker.stats.largest_batch == len(ids)
        for i in ids:  # batched encoding gives the answers of one-by-one queries
            lib = idx.query(image=str(image_path(sw, i)), prompt=sw["captions"][i], k=5).to_dict()
            got = out[i]
            assert [r["id"] for r in got["results"]] == [r["id"] for r in lib["results"]]
            np.testing.assert_allclose([r["score"] for r in got["results"]], [r["score"] for r in lib["results"]],
                                       rtol=1e-4, atol=1e-5)
            assert got["results"][0]["id"] == image_path(sw, i).name


def _app(c):
    return c.app


def _service(c):
    return c.app.state.service


# --------------------------------------------------------------------------------------------- page, docs, info
class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.inline_script = False
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_script = True


def test_page_docs_and_static_files_are_local_under_a_strict_csp(sw):
    with client(sw) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        script_src = re.search(r"script-src ([^;]+)", csp).group(1)
        assert script_src.strip() == "'self'" and "unsafe" not in csp and "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp and "form-action 'none'" in csp
        t = Tags()
        t.feed(r.text)
        assert not t.inline_script
        assert not [a for _, a in t.tags for k, v in a.items() if k.startswith("on")]
        urls = [a.get("src") or a.get("href") for tag, a in t.tags if a.get("src") or a.get("href")]
        assert urls and all(u.startswith(("/", "data:")) or u == "#" for u in urls), urls  # no other host
        for name, mime in (("app.js", "text/javascript"), ("app.css", "text/css"), ("docs.js", "text/javascript"),
                           ("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
            s = c.get(f"/static/{name}")
            assert s.status_code == 200 and s.headers["content-type"].startswith(mime)
            assert s.headers["x-content-type-options"] == "nosniff"
        assert "innerHTML" not in c.get("/static/app.js").text  # server text goes in as textContent only
        for bad in ("nope.js", "..%2Fapp.py", "%2Fetc%2Fpasswd", "index.html"):
            assert c.get(f"/static/{bad}").status_code == 404
        d = c.get("/docs")
        assert d.status_code == 200 and "/static/swagger-ui-bundle.js" in d.text and "cdn" not in d.text.lower()
        t = Tags()
        t.feed(d.text)
        assert not t.inline_script and "script-src 'self'" in d.headers["content-security-policy"]
        spec = c.get("/openapi.json").json()
        form = spec["paths"]["/v1/attribute"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(form["properties"]) == {"image", "prompt", "k", "weights"}
        assert {"/v1/info", "/healthz", "/v1/records/{record_id}/image", "/v1/attribute/{request_id}/report"} <= set(
            spec["paths"])
        j = c.get("/v1/info")
        for h, v in (("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"), ("cache-control", "no-store")):
            assert j.headers[h] == v
        assert j.headers["content-security-policy"].startswith("default-src 'none'")


def test_info_and_health(sw):
    with client(sw, max_k=50) as c:
        info = c.get("/v1/info").json()
        assert info["index"]["manifest"]["counts"]["records"] == N_IMAGES
        assert info["service"]["weights"] == ["auto", "rrf"] and info["service"]["limits"]["max_k"] == 50
        assert info["service"]["limits"]["max_pixels"] == 40_000_000
        assert "UNTRAINED" in info["warning"]
        h = c.get("/healthz").json()
        assert h == {"status": "ok", "auth": False, "queued": 0, "admitted": 0}


def test_the_report_of_a_result(sw):
    hostile = '<script>alert(1)</script>".png'
    png = image_path(sw, 11).read_bytes()
    with client(sw) as c:
        r = c.post("/v1/attribute", files={"image": (hostile, png, "image/png")},
                   data={"prompt": sw["captions"][11], "k": "6"})
        assert r.status_code == 200
        rep = c.get(r.headers["x-attrib-report"])
        assert rep.status_code == 200 and rep.headers["content-type"].startswith("text/html")
        csp = rep.headers["content-security-policy"]
        assert "frame-ancestors 'self'" in csp and "sandbox" in csp and "default-src 'none'" in csp
        page = rep.text
        assert page.count('<article class="card') == 6
        assert 'class="banner"' in page and "UNTRAINED" in page and "<mark>" in page
        assert page.count('class="heat q"') == 6  # a patch heatmap for every result
        assert "<script" not in page.lower() and "&lt;script&gt;" in page  # the hostile file name, escaped
        assert str(sw["root"] / "index") not in page  # the index folder's path is not shown
        assert f'<h3 class="id">{image_path(sw, 11).name}</h3>' in page
        assert_error(c.get("/v1/attribute/not-a-real-id-0000000/report"), 404, "not_found")
        assert_error(c.get("/v1/attribute/..%2F..%2Fetc/report"), 404, "not_found")


def test_results_are_kept_within_bounds(sw):
    with client(sw, keep_results=2) as c:
        rids = [c.post("/v1/attribute", data={"prompt": "a red circle"}).headers["x-attrib-request-id"]
                for _ in range(3)]
        assert c.get(f"/v1/attribute/{rids[0]}").status_code == 404
        assert all(c.get(f"/v1/attribute/{r}").status_code == 200 for r in rids[1:])


# --------------------------------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, raw: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: (\d+)", head, re.I)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split(b" ", 2)[1]), rest


def post_request(body: bytes, port: int) -> bytes:
    return (f"POST /v1/attribute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {MP['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()


def test_a_real_uvicorn_process_survives_hostile_clients_and_stops_cleanly_on_sigterm(sw):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(sw["root"] / "index"),
                             "--port", str(port), "--no-access-log", "--queue", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                status, body = http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5)
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < end, "the server did not start"
            time.sleep(0.3)
        png = image_path(sw, 3).read_bytes()
        good = multipart({"prompt": sw["captions"][3], "k": "3"}, png)

        def normal():
            status, body = http(port, post_request(good, port) + good)
            assert status == 200, body[:300]
            assert json.loads(body)["results"][0]["id"] == image_path(sw, 3).name

        normal()
        # a client that goes away mid-upload, then one that never sends its body, then garbage on the socket
        big = multipart({"prompt": "x"}, world.jpeg_bytes(world.noise_photo(5, 600, 600), quality=95))
        for partial in (big[: len(big) // 3], b""):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(post_request(big, port) + partial)
            normal()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n")
            s.recv(1024)
        normal()
        status, body = http(port, b"GET /v1/records/..%2F..%2Fetc%2Fpasswd/image HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n")
        assert status == 404
        status, body = http(port, b"GET /v1/records/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 404
        normal()

        # SIGTERM while a request is in flight: it is answered, then the process exits 0
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(post_request(good, port) + good[: len(good) // 2])
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert proc.poll() is None, "the server quit with a request in flight"
            s.sendall(good[len(good) // 2:])
            status, body = read_response(s)
        assert status == 200 and json.loads(body)["results"][0]["id"] == image_path(sw, 3).name
        assert proc.wait(60) == 0
        out = proc.stdout.read().decode()
        assert "Traceback" not in out and "serving 24 records" in out
        with pytest.raises(OSError):  # nothing listens any more
            http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------------------------- a real browser
SHOTS_DIR = Path("/tmp/attrib-serve-shots")


@pytest.fixture()
def live_server(sw):
    """The app under uvicorn on a free loopback port, in a thread of this process (tiny models already loaded)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(sw["index"], ServeSettings()), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    wait_until(lambda: server.started, 30)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(30)
    assert not t.is_alive()


@pytest.mark.browser
def test_upload_through_the_page_in_headless_chromium(chromium, live_server, sw, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    i = 14
    target = image_path(sw, i).name
    driver = world.headless_chromium(tmp_path / "profile")
    try:
        driver.set_page_load_timeout(60)
        driver.set_window_size(1280, 900)
        driver.get_log("performance")  # drop what the browser did on its own before the page
        driver.get(live_server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.execute_script(  # /v1/info has filled the form in
            "return [...document.querySelectorAll('#weights option')].map(o => o.value).join()") == "auto,rrf")
        assert driver.find_element(By.ID, "banner").is_displayed()  # untrained weights, from /v1/info
        assert "Untrained weights" in driver.find_element(By.ID, "banner").text

        driver.find_element(By.ID, "image").send_keys(str(image_path(sw, i)))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        driver.find_element(By.ID, "prompt").send_keys(sw["captions"][i])
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li .id"))
        assert driver.find_elements(By.CSS_SELECTOR, "#results li .id")[0].text == target
        assert "Done in" in driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "verdict").text == "No calibrated threshold: ranked candidates only"

        # the report in its frame: the cards, evidence bars, highlighted caption terms and patch heatmaps
        wait.until(lambda d: d.execute_script(  # the frame's document is same-origin (sandboxed, no scripts)
            "const f = document.getElementById('report'); return f.contentDocument.readyState === 'complete'"
            " && f.contentDocument.querySelectorAll('article.card').length"))
        frame = driver.find_element(By.ID, "report")
        wait.until(lambda d: frame.size["height"] > 2000)  # sized to its content by the page: no inner scrolling
        driver.switch_to.frame(frame)
        cards = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "article.card"))
        assert len(cards) == 10
        assert cards[0].find_element(By.CSS_SELECTOR, "h3.id").text == target
        assert cards[0].find_elements(By.CSS_SELECTOR, ".ev .bar span") and driver.find_elements(By.TAG_NAME, "mark")
        assert driver.find_elements(By.CSS_SELECTOR, "image.heat") and driver.find_element(
            By.CSS_SELECTOR, ".banner").is_displayed()
        assert driver.execute_script("return document.scripts.length") == 0
        assert driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        driver.switch_to.default_content()

        SHOTS_DIR.mkdir(parents=True, exist_ok=True)
        for name, (w, h) in {"laptop-1280": (1280, 900), "phone-390": (390, 844)}.items():
            driver.set_window_size(w, h)
            time.sleep(0.3)
            inner = driver.execute_script("return window.innerWidth")
            scroll = driver.execute_script("return document.documentElement.scrollWidth")
            assert scroll <= inner, f"horizontal scrolling at {w}px: scrollWidth {scroll} > innerWidth {inner}"
            widest = driver.execute_script(
                "return Math.max(...[...document.querySelectorAll('main *')]"
                ".map(e => e.getBoundingClientRect().right))")
            assert widest <= inner + 0.5, f"an element sticks out at {w}px ({widest} > {inner})"
            driver.switch_to.frame(driver.find_element(By.ID, "report"))
            f_inner = driver.execute_script("return window.innerWidth")
            assert driver.execute_script("return document.documentElement.scrollWidth") <= f_inner
            driver.switch_to.default_content()
            assert driver.save_screenshot(str(SHOTS_DIR / f"page-{name}.png"))
            full_h = min(int(driver.execute_script("return document.documentElement.scrollHeight")), 8000)
            driver.set_window_size(w, full_h)
            time.sleep(0.3)
            assert driver.save_screenshot(str(SHOTS_DIR / f"page-{name}-full.png"))

        # a refused upload shows the server's one-line reason
        bad = tmp_path / "not-an-image.png"
        bad.write_text("plain text", encoding="utf-8")
        driver.set_window_size(1280, 900)
        driver.find_element(By.ID, "image").send_keys(str(bad))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "not an image" in d.find_element(By.ID, "status").text)

        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                  and "/v1/attribute" not in e.get("message", "")]  # the 415 above is logged as a failed fetch
        assert severe == [], f"console errors (a CSP violation would show here): {severe}"
        urls = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        assert any(u.endswith("/v1/attribute") for u in urls) and any("/report" in u for u in urls)
        others = [u for u in urls if not u.startswith((live_server + "/", "data:", "blob:"))]
        assert others == [], f"the page reached outside its server: {others[:5]}"
    finally:
        driver.quit()


def test_a_running_server_answers_from_the_newest_generation(tmp_path, tiny):
    """A deletion (or append, or rebuild) committed while the server runs is seen by the next request."""
    from fastapi.testclient import TestClient

    world.image_folder(tmp_path / "src", 10, nested=False)
    engine.build_index(tmp_path / "src", tmp_path / "index", encoders=tiny, progress=False,
                       settings=engine.IndexSettings(pca_sample=8))
    idx = engine.open_index(tmp_path / "index")
    idx.use_encoders(tiny)
    src = tmp_path / "src" / "img0004.png"
    with TestClient(create_app(idx, ServeSettings())) as c:
        first = c.post("/v1/attribute", files={"image": (src.name, src.read_bytes(), "image/png")}, data={"k": "3"})
        assert first.json()["results"][0]["id"] == src.name
        assert c.get(f"/v1/records/{src.name}/image").status_code == 200
        engine.delete_records(tmp_path / "index", ids=[src.name])
        after = c.post("/v1/attribute", files={"image": (src.name, src.read_bytes(), "image/png")}, data={"k": "3"})
        assert after.status_code == 200 and src.name not in {r["id"] for r in after.json()["results"]}
        assert c.get(f"/v1/records/{src.name}/image").status_code == 404
