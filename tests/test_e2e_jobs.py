"""End to end: the API over HTTP (gunicorn), two real `faceparse worker` processes, Redis and moto S3."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceparse.client import ApiError
from tests.fixtures.stack import InputServer, Stack, png_bytes, wait_until

TIMEOUT = 60


def _put(stack: Stack, key: str, data: bytes) -> str:
    stack.s3().put_object(Bucket=stack.bucket, Key=key, Body=data)
    return f"s3://{stack.bucket}/{key}"


def _key_exists(stack: Stack, url: str) -> bool:
    return stack.store.exists(url)


def test_s3_input_succeeds_with_outputs_summary_and_metrics(stack: Stack, tmp_path: Path) -> None:
    client = stack.client("alice")
    src = _put(stack, f"in/{uuid.uuid4().hex}.png", png_bytes(64, 48))
    job = client.submit(src, outputs=["mask", "overlay", "summary", "masks"])
    assert job["status"] == "queued"
    [done] = client.wait([job["id"]], timeout=TIMEOUT)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None
    assert done["summary"]["image"] == {"width": 64, "height": 48}
    assert done["summary"]["warning"]  # the tiny random stand-in says its masks are noise
    assert done["summary"]["model"] and done["summary"]["job_id"] == job["id"]
    for stage in ("queue_ms", "fetch_ms", "decode_ms", "inference_ms", "upload_ms", "total_ms"):
        assert done["metrics"][stage] >= 0, stage
    prefix = f"s3://{stack.bucket}/data/jobs/{job['id']}/"
    assert done["outputs"]["mask"]["key"] == prefix + "mask.png"
    assert done["outputs"]["masks"], "one mask per label present"
    assert all(ref["key"].startswith(prefix + "masks/") for ref in done["outputs"]["masks"].values())

    files = client.download(done, tmp_path / "out")
    mask = np.asarray(Image.open(tmp_path / "out" / "mask.png"))
    assert mask.shape == (48, 64) and mask.max() <= 18
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sum(label["pixels"] for label in summary["labels"]) == 64 * 48
    assert len(files) == 3 + len(done["outputs"]["masks"])


def test_upload_and_data_url(stack: Stack, tmp_path: Path) -> None:
    client = stack.client("alice")
    photo = tmp_path / "face.png"
    photo.write_bytes(png_bytes(30, 20, seed=1))
    uploaded = client.submit(photo)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(16, 24, seed=2)).decode()
    inline = client.submit(data_url, outputs=["mask"])
    a, b = client.wait([uploaded["id"], inline["id"]], timeout=TIMEOUT)
    assert a["status"] == b["status"] == "succeeded", (a, b)
    assert a["summary"]["image"] == {"width": 30, "height": 20}
    assert b["summary"]["image"] == {"width": 16, "height": 24}
    assert set(b["outputs"]) == {"mask"}


def test_bad_image_fails_with_its_code_while_its_neighbour_succeeds(stack: Stack) -> None:
    client = stack.client("alice")
    bad = client.submit(_put(stack, f"in/{uuid.uuid4().hex}.png", b"this is not an image"))
    good = client.submit(_put(stack, f"in/{uuid.uuid4().hex}.png", png_bytes(20, 20, seed=3)))
    missing = client.submit(f"s3://{stack.bucket}/in/does-not-exist-{uuid.uuid4().hex}.png")
    b, g, m = client.wait([bad["id"], good["id"], missing["id"]], timeout=TIMEOUT)
    assert b["status"] == "failed" and b["error"]["code"] in ("invalid_image", "unsupported_format"), b
    assert m["status"] == "failed" and m["error"]["code"] == "input_not_found", m
    assert b["attempts"] == 1 and m["attempts"] == 1  # bad input is never retried
    assert g["status"] == "succeeded"


def test_batch_over_an_s3_prefix(stack: Stack) -> None:
    client = stack.client("alice")
    folder = f"batch-{uuid.uuid4().hex[:8]}/"
    for i in range(3):
        _put(stack, f"{folder}{i}.png", png_bytes(24, 24, seed=10 + i))
    batch = client.submit_batch(prefix=f"s3://{stack.bucket}/{folder}")
    assert len(batch["job_ids"]) == 3
    jobs = client.wait(batch["job_ids"], timeout=TIMEOUT)
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert sorted(j["input"] for j in jobs) == [f"s3://{stack.bucket}/{folder}{i}.png" for i in range(3)]
    counts = client.batch(batch["id"])
    assert json.dumps(counts).count("succeeded") >= 1
    assert counts["job_ids"] == batch["job_ids"] or sorted(counts["job_ids"]) == sorted(batch["job_ids"])


def test_idempotency_key_tenants_and_auth(stack: Stack) -> None:
    alice, bob = stack.client("alice"), stack.client("bob")
    src = _put(stack, f"in/{uuid.uuid4().hex}.png", png_bytes(10, 10))
    key = uuid.uuid4().hex
    first = alice.submit(src, idempotency_key=key)
    again = alice.submit(src, idempotency_key=key)
    other = bob.submit(src, idempotency_key=key)
    assert again["id"] == first["id"]
    assert other["id"] != first["id"]
    with pytest.raises(ApiError) as not_yours:
        bob.get(first["id"])
    assert not_yours.value.status == 404
    with pytest.raises(ApiError) as anonymous:
        stack.client(None).get(first["id"])  # type: ignore[arg-type]
    assert anonymous.value.status == 401
    assert alice.wait([first["id"]], timeout=TIMEOUT)[0]["status"] == "succeeded"
    assert bob.wait([other["id"]], timeout=TIMEOUT)[0]["status"] == "succeeded"


def test_cancel_while_running_never_ends_succeeded(stack: Stack, input_server: InputServer,
                                                   s3_env: dict[str, str]) -> None:
    client = stack.client("alice")
    job = client.submit(input_server.url("running.png", gated=True))
    wait_until(lambda: "running.png" in input_server.waiting(), timeout=TIMEOUT, what="the worker's fetch")
    assert client.get(job["id"])["status"] == "processing"
    canceled = client.cancel(job["id"])
    assert canceled["status"] == "canceled"
    input_server.release("running.png")
    prefix = f"s3://{stack.bucket}/data/jobs/{job['id']}/"
    # The worker finishes its fetch, sees the cancel and stops: no outputs, still canceled.
    wait_until(lambda: f"job {job['id']} canceled while running" in _worker_logs(stack),
               timeout=TIMEOUT, what="the worker to notice the cancel")
    final = client.get(job["id"])
    assert final["status"] == "canceled" and final["outputs"] == {}
    assert stack.store.list(prefix) == []


def test_cancel_while_queued_is_never_processed(stack: Stack, input_server: InputServer) -> None:
    client = stack.client("alice")
    # Hold both workers in a fetch, so the next job has to wait in the queue.
    blockers = [client.submit(input_server.url(f"block-{i}.png", gated=True)) for i in range(2)]
    wait_until(lambda: len(input_server.waiting()) == 2, timeout=TIMEOUT, what="both workers busy")
    queued = client.submit(_put(stack, f"in/{uuid.uuid4().hex}.png", png_bytes(12, 12)))
    assert client.cancel(queued["id"])["status"] == "canceled"
    for i in range(2):
        input_server.release(f"block-{i}.png")
    client.wait([b["id"] for b in blockers], timeout=TIMEOUT)
    wait_until(lambda: f"job {queued['id']} skipped: canceled" in _worker_logs(stack),
               timeout=TIMEOUT, what="a worker to drop the canceled job's message")
    final = client.get(queued["id"])
    assert final["status"] == "canceled" and final["attempts"] == 0 and final["outputs"] == {}


def _worker_logs(stack: Stack) -> str:
    return "".join(w.log() for w in stack.workers)


def test_mask_matches_image_size_after_decode(stack: Stack, s3_env: dict[str, str]) -> None:
    # A JPEG input: the worker writes a mask the size of the decoded image.
    buf = io.BytesIO()
    Image.new("RGB", (33, 17), (200, 150, 120)).save(buf, format="JPEG")
    client = stack.client("alice")
    job = client.submit(_put(stack, f"in/{uuid.uuid4().hex}.jpg", buf.getvalue()), outputs=["mask"])
    [done] = client.wait([job["id"]], timeout=TIMEOUT)
    assert done["status"] == "succeeded"
    data = stack.store.get(done["outputs"]["mask"]["key"])
    assert Image.open(io.BytesIO(data)).size == (33, 17)


def test_submit_and_status_commands(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from faceparse.client import status_command, submit_command
    from tests.fixtures.stack import API_KEYS

    a, b = tmp_path / "a.png", tmp_path / "a.jpg"
    a.write_bytes(png_bytes(18, 14, seed=5))
    Image.new("RGB", (14, 18), (10, 20, 30)).save(b, format="JPEG")
    out = tmp_path / "out"
    code = submit_command([str(a), str(b)], api_url=stack.api_url, api_key=API_KEYS["alice"],
                          wait=True, out=out)
    assert code == 0, capsys.readouterr()
    for name, size in (("a.png", (18, 14)), ("a.jpg", (14, 18))):  # never collide
        assert Image.open(out / name / "mask.png").size == size
        assert (out / name / "overlay.png").is_file() and (out / name / "summary.json").is_file()
    job_id = capsys.readouterr().out.split("job ")[1].split()[0]
    assert status_command(job_id, api_url=stack.api_url, api_key=API_KEYS["alice"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id
    assert status_command(job_id, api_url=stack.api_url, api_key=API_KEYS["bob"]) == 1
