"""mammacls serve through an ASGI client: the contract, the limits, the token, hostile uploads, batching."""

import asyncio
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mammacls.inference.pixels import InMemoryFile  # noqa: E402
from mammacls.serve.app import ServerSettings, create_app  # noqa: E402
from mammacls.serve.batching import DynamicBatcher, Overloaded  # noqa: E402
from mammacls.serve.service import PredictionService, ServiceOptions  # noqa: E402
from mammacls.serve.uploads import UploadLimits  # noqa: E402
from mammacls.schemas import PREDICTIONS  # noqa: E402
from tests.conftest import schema_errors, textured_image  # noqa: E402
from tests.dicom_files import ultrasound_dicom  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOKEN = "a-long-enough-test-token"


@pytest.fixture(scope="module")
def opened(tmp_path_factory) -> PredictionService:
    """The shipped model, opened once for the module (each app gets its own service around it)."""
    import os

    old = os.environ.get("MAMMACLS_CACHE_DIR")
    os.environ["MAMMACLS_CACHE_DIR"] = str(tmp_path_factory.mktemp("serve-cache"))
    try:
        yield PredictionService.open(ServiceOptions(model="default", device="cpu"))
    finally:
        os.environ.pop("MAMMACLS_CACHE_DIR") if old is None else os.environ.__setitem__("MAMMACLS_CACHE_DIR", old)


def _service(opened: PredictionService, **options) -> PredictionService:
    return PredictionService(opened.predictor, ServiceOptions(model="default", device="cpu", **options))


@pytest.fixture
def service(opened) -> PredictionService:
    return _service(opened)


@pytest.fixture(scope="module")
def client(opened):
    limits = UploadLimits(max_bytes=8 * 1024 * 1024, max_files=4)
    with TestClient(create_app(_service(opened), ServerSettings(limits=limits))) as test_client:
        yield test_client


def _png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (its pixel data cut off): sizes are refused before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 1 << 20) + b"IDAT" + zlib.compress(b"\0" * 4096)


def _bomb(side: int = 8000) -> bytes:
    """A real, complete PNG of side x side zeros: 64 MB of pixels in about 64 KB."""
    raw = zlib.compress(b"\x00" * ((side + 1) * side), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _files(*named: tuple[str, bytes]):
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def test_health_and_model_summary(client, opened):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "default" and health["backend"] == "onnxruntime"
    assert health["token_required"] is False
    summary = client.get("/v1/model").json()
    card = opened.predictor.ref.card
    assert summary["classes"] == ["benign", "malignant", "normal"]
    assert summary["input"]["img_size"] == card.img_size and summary["members"] == card.members
    assert summary["calibration"]["temperature"] == pytest.approx(card.temperature)
    assert "not a medical device" in summary["intended_use"]
    assert "ImageNet" in summary["licences"]["pretrained_weights"]
    assert summary["training_sources"] == ["BUS-BRA", "Dataset_BUSI_with_GT"]
    assert "path" not in client.post("/v1/predict", files=_files(("a.png", (EXAMPLES / "benign_105.png")
                                                                    .read_bytes()))).json()["model"]


def test_server_and_cli_agree(client, tmp_path, cache):
    from mammacls.predict import predict_paths

    synthetic = tmp_path / "synthetic.png"
    Image.fromarray(textured_image(np.random.default_rng(3), 0, size=(200, 160))).save(synthetic)
    paths = [EXAMPLES / "benign_105.png", EXAMPLES / "malignant_102.png", EXAMPLES / "normal_103.png", synthetic]
    cli = predict_paths(paths, model="default", device="cpu")["predictions"]
    answer = client.post("/v1/predict", files=_files(*((p.name, p.read_bytes()) for p in paths)))
    assert answer.status_code == 200
    assert answer.json()["schema"] == PREDICTIONS and schema_errors(PREDICTIONS, answer.json()) == []
    served = answer.json()["predictions"]
    assert [r["path"] for r in served] == [p.name for p in paths]
    assert [r["label"] for r in served] == [r["label"] for r in cli]
    assert [r["label"] for r in served[:3]] == ["benign", "malignant", "normal"]
    for mine, theirs in zip(served, cli):
        assert mine["status"] == theirs["status"] and set(mine) == set(theirs) - {"path"} | {"path"}
        for c in ("benign", "malignant", "normal"):
            assert abs(mine["probabilities"][c] - theirs["probabilities"][c]) <= 1e-4


@pytest.mark.parametrize("name, data, fragment", [
    ("truncated.png", None, "cannot decode image"),
    ("empty.png", b"", "empty file"),
    ("notes.txt", b"patient notes, not a scan\n", "not an image"),
    ("huge.png", _png_header_only(20000, 20000), "too large"),
    ("bomb.png", None, "too large"),
    ("tiny.png", None, "too small"),
])
def test_hostile_files_are_errors_and_the_server_keeps_serving(client, name, data, fragment):
    if name == "truncated.png":
        data = (EXAMPLES / "malignant_102.png").read_bytes()[:2000]
    elif name == "bomb.png":
        data = _bomb()
    elif name == "tiny.png":
        data = _png(np.zeros((8, 8), np.uint8))
    alone = client.post("/v1/predict", files=_files((name, data)))
    assert alone.status_code == 422, alone.text
    assert fragment in alone.json()["error"] and alone.json()["errors"][0]["path"] == name
    assert schema_errors(PREDICTIONS, alone.json()) == []
    mixed = client.post("/v1/predict", files=_files((name, data), ("ok.png", (EXAMPLES / "normal_103.png").read_bytes())))
    assert mixed.status_code == 200
    document = mixed.json()
    assert [e["path"] for e in document["errors"]] == [name] and fragment in document["errors"][0]["error"]
    assert [p["label"] for p in document["predictions"]] == ["normal"]


def test_request_level_refusals_are_one_line_4xx(client):
    scan = (EXAMPLES / "benign_105.png").read_bytes()
    cases = [
        (client.post("/v1/predict", json={"files": []}), 415, "multipart/form-data"),
        (client.post("/v1/predict", data={"other": "x"}, files=_files()), 415, "multipart/form-data"),
        (client.post("/v1/predict", data={"lesion_map": "false"}, files=[("note", (None, "x"))]), 400, "no files"),
        (client.post("/v1/predict", files=_files(*[(f"{k}.png", scan) for k in range(5)])), 413, "more than 4 files"),
        (client.post("/v1/predict", files=_files(("big.png", b"\0" * (9 * 1024 * 1024)))), 413, "larger than 8 MB"),
        (client.post("/v1/predict?explain=shap", files=_files(("a.png", scan))), 400, "gradcam"),
        (client.post("/v1/predict", content=b"--xyz\r\nnot a part", headers={
            "content-type": "multipart/form-data; boundary=xyz"}), 400, "malformed"),
        (client.get("/v1/nothing"), 404, "Not Found"),
    ]
    for response, status, fragment in cases:
        assert response.status_code == status, (fragment, response.text)
        body = response.json()
        assert set(body) == {"error"} and fragment in body["error"] and "\n" not in body["error"]
    assert client.get("/healthz").status_code == 200  # and it keeps serving


def test_body_limit_holds_without_a_content_length(service):
    limits = UploadLimits(max_bytes=1024 * 1024, max_files=4)
    boundary = "b0undary"

    def body():  # streamed: no Content-Length for the server to trust
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
               "Content-Type: image/png\r\n\r\n").encode()
        for _ in range(40):
            yield b"\0" * 65536

    with TestClient(create_app(service, ServerSettings(limits=limits))) as limited:
        response = limited.post("/v1/predict", content=body(),
                                headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "larger than 1 MB" in response.json()["error"]


def test_token_guards_the_api_but_not_health_or_page(service):
    with TestClient(create_app(service, ServerSettings(token=TOKEN))) as guarded:
        scan = _files(("a.png", (EXAMPLES / "benign_105.png").read_bytes()))
        assert guarded.get("/healthz").json()["token_required"] is True
        assert guarded.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN}):
            refused = guarded.post("/v1/predict", files=scan, headers=headers)
            assert refused.status_code == 401 and "token" in refused.json()["error"]
            assert refused.headers["www-authenticate"] == "Bearer"
            assert guarded.get("/v1/model", headers=headers).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert guarded.post("/v1/predict", files=scan, headers=good).json()["predictions"][0]["label"] == "benign"
        assert guarded.get("/v1/model", headers=good).status_code == 200


def test_other_origins_are_refused_unless_named(opened):
    scan = _files(("a.png", (EXAMPLES / "benign_105.png").read_bytes()))
    with TestClient(create_app(_service(opened), ServerSettings())) as plain:
        refused = plain.post("/v1/predict", files=scan, headers={"Origin": "https://elsewhere.example"})
        assert refused.status_code == 403 and "cross-origin" in refused.json()["error"]
        assert plain.post("/v1/predict", files=scan, headers={"Origin": "http://testserver"}).status_code == 200
    with TestClient(create_app(_service(opened), ServerSettings(cors=("https://ris.example",)))) as open_to_one:
        allowed = open_to_one.post("/v1/predict", files=scan, headers={"Origin": "https://ris.example"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ris.example"
        assert open_to_one.get("/v1/model", headers={"Origin": "https://other.example"}).status_code == 403


def test_exposed_host_needs_a_token():
    from mammacls.errors import MammaclsError
    from mammacls.serve.server import check_settings, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    with pytest.raises(MammaclsError, match="--token|token") as refused:
        check_settings("0.0.0.0", 8765, None, UploadLimits(), 2)
    assert refused.value.exit_code == 2
    with pytest.raises(MammaclsError, match="too short"):
        check_settings("0.0.0.0", 8765, "short", UploadLimits(), 2)
    check_settings("0.0.0.0", 8765, TOKEN, UploadLimits(), 2)  # guarded: allowed


def test_page_and_docs_load_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and "default" in page.text and "not for diagnosis" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    docs = client.get("/docs").text
    assert '"validatorUrl": null' in docs
    for text in (page.text, docs, client.get("/static/app.js").text, client.get("/static/app.css").text):
        for attribute in ("src=", "href=", "url("):
            for chunk in text.split(attribute)[1:]:
                target = chunk.lstrip("\"'( ")
                assert not target.startswith(("http:", "https:", "//")), target[:80]
    assert client.get("/static/apidocs/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"


def test_dicom_cine_loop_uploads_and_no_patient_field_comes_back(client, tmp_path):
    gray = textured_image(np.random.default_rng(5), 1, size=(160, 128))
    loop = ultrasound_dicom(tmp_path / "loop.dcm", gray, frames=3, patient_id="PID-SECRET-0001")
    single = ultrasound_dicom(tmp_path / "single", gray, patient_id="PID-SECRET-0001")  # no suffix: by preamble
    response = client.post("/v1/predict", files=_files(("loop.dcm", loop.read_bytes()), ("single", single.read_bytes())))
    assert response.status_code == 200, response.text
    document = response.json()
    assert schema_errors(PREDICTIONS, document) == []
    assert [c["path"] for c in document["cine"]] == ["loop.dcm"] and document["cine"][0]["frames"] == 3
    assert [p["path"] for p in document["predictions"]] == [f"loop.dcm#frame={k}" for k in (1, 2, 3)] + ["single"]
    assert "PID-SECRET" not in response.text and "SECRET" not in json.dumps(document)


def test_uploads_are_decoded_as_files_are(tmp_path, service):
    gray = textured_image(np.random.default_rng(9), 2, size=(120, 90))
    path = tmp_path / "scan.png"
    Image.fromarray(gray).save(path)
    from_disk = service.predictor.frames_of(path)[0]
    from_memory = service.predictor.frames_of(InMemoryFile("scan.png", path.read_bytes()))[0]
    assert np.array_equal(from_disk.resized, from_memory.resized) and from_disk.reason == from_memory.reason


def test_concurrent_requests_share_batches(service):
    import httpx

    app = create_app(service, ServerSettings())
    scan = (EXAMPLES / "malignant_102.png").read_bytes()

    async def run() -> list[int]:
        await service.start()
        before = service.batcher.stats.batches
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                answers = await asyncio.gather(*(http.post("/v1/predict", files=_files((f"{k}.png", scan)))
                                                 for k in range(8)))
            return [a.status_code for a in answers], service.batcher.stats.batches - before
        finally:
            await service.stop()

    statuses, batches = asyncio.run(run())
    assert statuses == [200] * 8
    assert batches < 8  # eight one-image requests did not make eight network calls


def test_batcher_bounds_its_queue_and_splits_batches():
    calls: list[int] = []

    def classify(frames):
        import time

        calls.append(len(frames))
        time.sleep(0.05)
        return [{"n": f} for f in frames]

    async def run():
        batcher = DynamicBatcher(classify, max_batch=4, max_wait_s=0.01, max_queue=6)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(list(range(5))))  # one request, two batches
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit([9, 9])  # 5 queued + 2 > 6
        second = asyncio.ensure_future(batcher.submit([7]))
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return results, batcher.stats

    (first, second), stats = asyncio.run(run())
    assert [r["n"] for r in first] == [0, 1, 2, 3, 4] and second == [{"n": 7}]
    assert max(calls) <= 4 and sum(calls) == 6 and stats.refused == 1


def test_overloaded_server_answers_503_with_retry_after(opened):
    import httpx

    service = _service(opened, max_batch=1, max_wait_ms=0.0, max_queue=1)
    app = create_app(service, ServerSettings())
    scan = (EXAMPLES / "normal_103.png").read_bytes()

    async def run():
        await service.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                return await asyncio.gather(*(http.post("/v1/predict", files=_files((f"{k}.png", scan)))
                                              for k in range(6)))
        finally:
            await service.stop()

    answers = asyncio.run(run())
    busy = [a for a in answers if a.status_code == 503]
    assert busy and any(a.status_code == 200 for a in answers)
    assert all(a.headers["retry-after"] == "1" and "busy" in a.json()["error"] for a in busy)


def test_serve_refuses_an_exposed_host_without_a_token_in_one_line(cache):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mammacls", "serve", "--host", "0.0.0.0"], capture_output=True,
                          text=True, timeout=60, env={**__import__("os").environ, "MAMMACLS_TOKEN": ""})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "--token" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
