"""The demo's bundled base model: a small Llama pretrained by `dpokit.experiments.demo.pretrain` on generated
movie reviews, shipped inside the package (no download, no pretrained weights from elsewhere).

`load_base_model()` checks every file against MANIFEST.json's sha256 before loading, so a
corrupted or half-replaced folder fails with one clear line instead of a silently different model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dpokit.errors import DpokitError

BASE_MODEL_DIR = Path(__file__).resolve().parent / "base_model"
MANIFEST = "MANIFEST.json"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: str | Path = BASE_MODEL_DIR) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DpokitError(f"{path}: missing; the bundled demo model is not installed "
                          "(regenerate it with `python -m dpokit.experiments.demo.pretrain`)") from None
    except (OSError, ValueError) as exc:
        raise DpokitError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise DpokitError(f"{path}: field 'files' must map each file name to its sha256")
    return manifest


def verify_base_model(folder: str | Path = BASE_MODEL_DIR) -> dict:
    """Check each file listed in the manifest against its sha256; return the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise DpokitError(f"{path}: listed in {MANIFEST} but missing")
        digest = file_sha256(path)
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if digest != expected:
            raise DpokitError(f"{path}: sha256 {digest[:12]}... does not match {MANIFEST} "
                              f"({str(expected)[:12]}...); the file is corrupted or was replaced")
    return manifest


def base_model_dir(verify: bool = True) -> Path:
    """The bundled model folder, loadable with `from_pretrained` (checked first unless told not to)."""
    if verify:
        verify_base_model(BASE_MODEL_DIR)
    return BASE_MODEL_DIR


def load_base_model(folder: str | Path = BASE_MODEL_DIR, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the bundled base model, verified against its manifest, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    verify_base_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model, tokenizer
