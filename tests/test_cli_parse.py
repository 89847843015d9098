"""`faceparse parse` and `faceparse model init-random` as a user runs them; scripts/gpu_check.sh."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from faceparse.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "faceparse" / "samples" / "astronaut.png"


def _faceparse(*args: str, model: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FACEPARSE_MODEL": model, "FACEPARSE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "faceparse.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    """a.png and a.jpg (same stem), a rotated JPEG, and a file that is not an image."""
    folder = tmp_path / "in"
    folder.mkdir()
    face = Image.open(SAMPLE).convert("RGB")
    shutil.copy(SAMPLE, folder / "a.png")
    face.resize((333, 517)).save(folder / "a.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    face.resize((200, 100)).save(folder / "rotated.jpg", exif=exif)
    (folder / "notes.jpg").write_text("not an image")
    return [folder / "a.png", folder / "a.jpg", folder / "notes.jpg", folder / "rotated.jpg"]


def test_parse_writes_outputs_per_input_and_reports_bad_files(tmp_path: Path, inputs: list[Path],
                                                              tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    result = _faceparse("parse", *map(str, inputs), "--out", str(out), "--batch-size", "2", "--masks",
                        model=str(tiny_model_dir), tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    # One line for the bad file, naming it and its error code; no traceback.
    bad_lines = [line for line in result.stderr.splitlines() if "notes.jpg" in line]
    assert len(bad_lines) == 1 and "invalid_image" in bad_lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "a.png", "rotated.jpg"]
    for name, size in [("a.png", (512, 512)), ("a.jpg", (333, 517)), ("rotated.jpg", (100, 200))]:
        folder = out / name
        mask = Image.open(folder / "mask.png")
        assert mask.mode == "L" and mask.size == size
        assert Image.open(folder / "overlay.png").size == size
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["model"] == str(tiny_model_dir) and summary["job_id"] is None
        assert summary["warning"] == "random weights: masks are noise"
        assert summary["image"] == {"width": size[0], "height": size[1]}
        assert sum(label["pixels"] for label in summary["labels"]) == size[0] * size[1]
        assert np.asarray(mask).max() <= 18
        for label in summary["labels"]:
            binary = np.asarray(Image.open(folder / "masks" / f"{label['name']}.png"))
            assert int((binary == 255).sum()) == label["pixels"]


def test_parse_exits_zero_when_all_succeed(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = _faceparse("parse", str(SAMPLE), "--out", str(tmp_path / "o"), model=str(tiny_model_dir),
                        tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "o" / "astronaut.png" / "masks").exists()  # only with --masks
    assert "RANDOM WEIGHTS" in result.stderr  # loud about the stand-in


def test_parse_without_a_model_is_one_clear_paragraph(tmp_path: Path) -> None:
    result = _faceparse("parse", str(SAMPLE), "--out", str(tmp_path / "o"),
                        model="no-such-org/no-such-model", tmp_path=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no-such-org/no-such-model" in errors[0] and "Fix:" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_init_random_writes_a_loadable_marked_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "m"
    result = CliRunner().invoke(main, ["model", "init-random", str(target), "--arch", "tiny", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "RANDOM-WEIGHT" in caplog.text
    config = json.loads((target / "config.json").read_text())
    assert config["faceparse_random_weights"] is True
    assert [config["id2label"][str(i)] for i in range(19)][:4] == ["background", "skin", "nose", "eye_g"]
    assert json.loads((target / "preprocessor_config.json").read_text())["size"] == {"height": 512,
                                                                                     "width": 512}
    from worker.model import load_parser

    parser = load_parser(str(target), device="cpu")
    image = Image.open(io.BytesIO(SAMPLE.read_bytes())).convert("RGB")
    assert parser.parse_batch([image])[0].shape == (512, 512)


def test_gpu_check_script_is_valid_and_its_commands_exist() -> None:
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for tool in ("timeout", "tee", "mktemp", "grep"):
        assert shutil.which(tool), tool
    # The Python entry points it calls exist and answer --help.
    for module in re.findall(r'"\$PY" -m ([\w.]+)', text):
        if module in ("pip", "pytest"):
            continue
        help_run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, cwd=ROOT,
                                  timeout=60)
        assert help_run.returncode == 0, (module, help_run.stderr)
    for path in re.findall(r"tests/[\w/]+\.py", text):
        assert (ROOT / path).exists(), path
    assert "--batch-sizes 1,8,32" in text and "--parity" in text
