"""The bundled demo base model: ships with the package, matches its manifest, loads and samples."""

import fnmatch
import re
from pathlib import Path

import pytest
import torch

from dpokit.experiments.demo.bundled import BASE_MODEL_DIR, base_model_dir, load_base_model, verify_base_model
from dpokit.experiments.demo.corpus import review_openings

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_files_match_the_manifest_and_are_small():
    manifest = verify_base_model()
    files = manifest["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sorted(p.name for p in BASE_MODEL_DIR.iterdir() if p.is_file()) == sorted([*files, "MANIFEST.json"])
    total = sum(p.stat().st_size for p in BASE_MODEL_DIR.iterdir())
    assert total <= 20 * 2**20
    assert all(files[name]["bytes"] == (BASE_MODEL_DIR / name).stat().st_size for name in files)
    # Pretrained for real: held-out loss far below what word frequencies alone give.
    training = manifest["training"]
    assert training["held_out_loss"] < 0.5 * training["unigram_cross_entropy"]
    assert base_model_dir() == BASE_MODEL_DIR


def test_package_data_globs_cover_every_shipped_file():
    """Each file of the model folder must be named by a package-data glob, or wheels lack it."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib (to read pyproject.toml) needs Python >= 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["dpokit"]
    package_root = ROOT / "src" / "dpokit"
    for path in BASE_MODEL_DIR.iterdir():
        relative = path.relative_to(package_root).as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative


def test_loads_with_manifest_config_and_samples_varied_text():
    model, tokenizer = load_base_model()
    manifest = verify_base_model()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "tie_word_embeddings"):
        assert getattr(model.config, key) == manifest["model_config"][key], key
    assert not model.training and len(tokenizer) == model.config.vocab_size
    prompt = tokenizer("I watched this movie", return_tensors="pt")["input_ids"]
    assert prompt[0, 0].item() == tokenizer.bos_token_id

    def sample(seed):
        torch.manual_seed(seed)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             top_p=0.95, temperature=1.0, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        return out[0, prompt.shape[1]:]

    tokens = sample(0)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert text.strip() and len(set(tokens.tolist())) > 3, text
    assert torch.equal(tokens, sample(0))  # a fixed seed gives the same continuation
    assert re.search(r"[a-z]{3,}", text), text


def test_review_openings_are_short_in_the_bundled_tokenizer():
    _, tokenizer = load_base_model()
    for opening in review_openings(200, seed=0, held_out=False) + review_openings(50, seed=0, held_out=True):
        ids = tokenizer(opening, add_special_tokens=False)["input_ids"]
        assert 2 <= len(ids) <= 8, opening
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == opening  # byte-level BPE round-trips exactly
