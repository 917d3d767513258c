"""The real-model tier: SmolLM2-135M-Instruct (trained weights, 49,152-token vocabulary, ChatML,
BOS `<|im_start|>`, EOS `<|im_end|>`) on real UltraFeedback rows (tests/data/
ultrafeedback_real_model_rows.jsonl, 8 single-reply rows; see its SOURCE.md).

The model comes from the package registry through benchmarks/real_model.py (cached once); these
tests skip, saying why, only where the registry cannot be reached. All slow (they still run in CI):
about a minute of model loading and short forwards on two cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.config import DataConfig
from dpokit.data import read_pairs
from dpokit.data.batching import LAYOUTS, collate
from dpokit.data.tokenize import PairTokenizer
from dpokit.model.attention import choose_attention
from dpokit.model.load import load_tokenizer
from dpokit.model.logprobs import sequence_logps

pytestmark = pytest.mark.slow

ROWS = Path(__file__).resolve().parent / "data" / "ultrafeedback_real_model_rows.jsonl"
FETCHER = Path(__file__).resolve().parents[1] / "benchmarks" / "real_model.py"
U32 = 2.0**-24  # fp32 unit roundoff
MAX_LENGTH = "256"  # every carried row fits (SOURCE.md: under 200 tokens)


def _fetcher():
    spec = importlib.util.spec_from_file_location("real_model", FETCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_paths() -> tuple[Path, Path]:
    """(GGUF file, Hugging Face folder) of SmolLM2-135M-Instruct, fetched once into the cache."""
    fetcher = _fetcher()
    try:
        return fetcher.real_model_gguf(), fetcher.real_model_folder()
    except fetcher.RegistryUnreachable as exc:
        pytest.skip(f"SmolLM2-135M-Instruct not available: {exc}")


@pytest.fixture(scope="session")
def real_folder(real_paths) -> Path:
    return real_paths[1]


@pytest.fixture(scope="module")
def real_tok(real_folder):
    return load_tokenizer(str(real_folder))


@pytest.fixture(scope="module")
def real_pairs(real_tok):
    """The carried rows, read and tokenized by the training pipeline: (raw pairs, tokenized, renderer)."""
    pairs = list(read_pairs(str(ROWS), DataConfig()))
    pair_tokenizer = PairTokenizer(real_tok, max_length=int(MAX_LENGTH))
    tokenized, stats = pair_tokenizer.tokenize(pairs)
    assert stats.kept == len(pairs) == 8 and not stats.skipped
    return pairs, tokenized, pair_tokenizer


def test_chatml_pairs_decode_to_exactly_the_rendered_text(real_tok, real_pairs):
    pairs, tokenized, pair_tokenizer = real_pairs
    bos, eos = real_tok.bos_token_id, real_tok.eos_token_id
    assert (real_tok.bos_token, real_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    for pair, tp in zip(pairs, tokenized, strict=True):
        prompt, chosen, rejected = pair_tokenizer.render(pair)
        # ChatML: the template writes the system turn SmolLM2 adds, the user turn, and opens the reply.
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert tp.prompt_ids[0] == bos and tp.prompt_ids[1] != bos  # the template's BOS, not doubled
        for response, ids in ((chosen, tp.chosen_ids), (rejected, tp.rejected_ids)):
            assert ids.count(eos) == 1 and ids[-1] == eos and bos not in ids, pair.index
            # The reply ends at its <|im_end|>: the newline the template writes after it is not trained.
            assert response.endswith("<|im_end|>\n")
            decoded = real_tok.decode(list(tp.prompt_ids + ids), skip_special_tokens=False)
            assert decoded == prompt + response.removesuffix("\n"), pair.index


def _sum_tolerance(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """How far two fp32 computations of the same summed log-prob may lie apart: the classical bound
    for a sum of n terms taken in two different orders, 2·n·u·Σ|ℓ_t| (u = 2⁻²⁴); every ℓ_t ≤ 0, so
    Σ|ℓ_t| = |sum|. Kernels (eager, sdpa, segments) and layouts reorder the body's and the head's
    reductions, each of whose roundings feeds a term; measured gaps sit well below this bound, and a
    wrong mask, position or head shows as 1e-2 and more."""
    return 2 * counts * U32 * sums.abs()


@pytest.mark.parametrize("attention", ["eager", "sdpa", "segments"])
def test_every_layout_and_head_gives_the_padded_log_probs_on_the_real_weights(real_folder, real_tok, real_pairs,
                                                                              attention):
    from transformers import AutoModelForCausalLM

    tokenized = real_pairs[1][5:7]  # the two shortest pairs: every layout packs them into one row
    pad = real_tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(
        real_folder, dtype=torch.float32, attn_implementation="sdpa" if attention == "segments" else attention).eval()
    if attention == "segments":
        choose_attention(model, "segments", log=lambda line: None, mask_cells=0)
    with torch.no_grad():
        plain = sequence_logps(model, collate(tokenized, pad, "padded"), chunked_head=False)
        expected = torch.cat([plain.chosen_logps, plain.rejected_logps])
        counts = torch.cat([plain.chosen_lengths, plain.rejected_lengths])
        tolerance = _sum_tolerance(expected, counts)
        for layout in LAYOUTS:
            for chunked in (False, True):
                out = sequence_logps(model, collate(tokenized, pad, layout, 256), chunked_head=chunked, chunk=4096)
                got = torch.cat([out.chosen_logps, out.rejected_logps])
                gap = (got - expected).abs()
                assert torch.all(gap <= tolerance), (attention, layout, chunked, gap.tolist(), tolerance.tolist())
    if attention == "eager":  # the baseline itself, against the unbatched forward, one sequence at a time
        _assert_matches_one_at_a_time(model, tokenized, expected, tolerance)


def _assert_matches_one_at_a_time(model, tokenized, expected, tolerance):
    sums = []
    with torch.no_grad():
        for half in ("chosen_ids", "rejected_ids"):
            for tp in tokenized:
                ids = torch.tensor([list(tp.prompt_ids + getattr(tp, half))])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                n = len(tp.prompt_ids)
                sums.append(sum(logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1])).item())
    gap = (torch.tensor(sums) - expected.double()).abs()
    assert torch.all(gap <= tolerance.double()), (gap.tolist(), tolerance.tolist())


@pytest.fixture(scope="module")
def trained_run(real_folder, tmp_path_factory):
    """Two CLI training steps on the 8 rows (defaults: auto layout, chunked head, cached reference)."""
    out = tmp_path_factory.mktemp("real") / "run"
    assert main(["train", "--model", str(real_folder), "--data", str(ROWS), "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--max-length", MAX_LENGTH, "--learning-rate", "1e-5",
                 "--log-every", "1", "--progress", "off", "--seed", "0"]) == 0
    return out


def test_two_cli_steps_start_at_ln2_and_the_first_batch_guard_passes(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    # Step 1: the policy is the reference, so every log-ratio is 0 up to fp32 rounding of the two
    # passes (β = 0.1 scales a sum gap of ~1e-4 to ~1e-5 in the sigmoid's argument).
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(steps[0]["rewards/margins"]) < 1e-4
    assert math.isfinite(steps[1]["loss"])
    check = json.loads((trained_run / "layout_check.json").read_text())
    assert check["fallback"] is False and check["checked"], check  # the path training ran was checked
    assert all(c["exact"] for c in check["checked"]), check


def test_evaluate_runs_on_the_trained_folder(trained_run, real_folder, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(trained_run), "--reference-model", str(real_folder), "--data", str(ROWS),
                 "--max-length", MAX_LENGTH, "--json", "--output", str(report)]) == 0
    figures = json.loads(report.read_text())
    flat = json.dumps(figures)
    assert "accurac" in flat and "margin" in flat, figures
    capsys.readouterr()


def test_sample_from_the_gguf_file_is_coherent_and_ends_at_im_end(real_paths, tmp_path, capsys):
    gguf, _ = real_paths
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n"
                               for text in ("What is the capital of France?", "Name three colors.")))
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--model", str(gguf), "--prompts", str(prompts), "--temperature", "0",
                 "--max-new-tokens", "48", "--output", str(out), "--progress", "off"]) == 0
    france, colors = [json.loads(line) for line in out.read_text().splitlines()]
    assert france["finished"] == [True] and colors["finished"] == [True]  # stopped at <|im_end|>
    assert "Paris" in france["completions"][0], france
    named = [c for c in ("red", "blue", "green", "yellow", "orange", "purple", "black", "white")
             if c in colors["completions"][0].lower()]
    assert len(named) >= 3, colors
    capsys.readouterr()


def test_a_lora_run_and_its_merged_export_give_the_same_log_probs(real_folder, real_tok, real_pairs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    assert main(["train", "--model", str(real_folder), "--data", str(ROWS), "--output", str(run), "--max-steps", "1",
                 "--batch-size", "2", "--max-length", MAX_LENGTH, "--lora-r", "8", "--learning-rate", "1e-3",
                 "--progress", "off"]) == 0
    assert main(["export", str(run), "--merge", "--output", str(tmp_path / "merged")]) == 0
    tokenized = real_pairs[1][5:7]
    batch = collate(tokenized, real_tok.pad_token_id, "padded")
    base = AutoModelForCausalLM.from_pretrained(real_folder, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run)).eval()  # the adapter unmerged: x·W + x·A·B·α/r
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        want = sequence_logps(adapted, batch, chunked_head=False)
        got = sequence_logps(merged, batch, chunked_head=False)
        with adapted.disable_adapter():
            before = sequence_logps(adapted, batch, chunked_head=False)
    want_all, got_all = torch.cat([want.chosen_logps, want.rejected_logps]), torch.cat([got.chosen_logps, got.rejected_logps])
    counts = torch.cat([want.chosen_lengths, want.rejected_lengths])
    assert torch.all((got_all - want_all).abs() <= _sum_tolerance(want_all, counts))
    # ... and the adapter changed something, so the comparison is not between two base models.
    moved = (want_all - torch.cat([before.chosen_logps, before.rejected_logps])).abs()
    assert torch.any(moved > 10 * _sum_tolerance(want_all, counts))
    capsys.readouterr()


def test_selective_recompute_gives_the_plain_gradients_on_the_real_weights(real_folder, real_tok, real_pairs):
    # The path a CPU run takes (prefix-shared rows, segment attention, chunked head) on trained weights.
    import copy

    from transformers import AutoModelForCausalLM

    from dpokit.config import LoraSection
    from dpokit.model.load import prepare_policy
    from test_recompute import _backward, _matmuls

    plain = AutoModelForCausalLM.from_pretrained(real_folder, dtype=torch.float32, attn_implementation="sdpa")
    choose_attention(plain, "segments", log=lambda line: None, mask_cells=0)
    selective = prepare_policy(copy.deepcopy(plain), LoraSection(), False, selective_recompute=True)
    plain.train(), selective.train()
    batch = collate(real_pairs[1][5:7], real_tok.pad_token_id, "prefix-shared", 256)
    expected, plain_ops = _backward(plain, batch, None)
    got, selective_ops = _backward(selective, batch, None)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)
    assert _matmuls(selective_ops) == _matmuls(plain_ops)
