"""Segment attention: packed and prefix-shared rows as plain causal runs through SDPA's fused kernel.

The runs are the mask builder's pattern in another form (proved equal here), no [T x T] mask
or score matrix is built (every SDPA call is causal, maskless, and no longer than one
sequence), gradients and the training losses equal the padded forward's, and a model that
cannot take it falls back (auto) or is refused (explicit) with one line.
"""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from dpokit.cli import main
from dpokit.data.batching import collate, most_mask_cells
from dpokit.data.tokenize import TokenizedPair
from dpokit.model.attention import (
    AUTO_SEGMENTS_MIN_MASK_CELLS,
    SEGMENT_RUNS,
    SEGMENTS,
    attention_impl,
    attention_inputs,
    block_attention_mask,
    choose_attention,
    segment_runs,
)
from dpokit.model.logprobs import sequence_logps
from helpers.families import build_family
from helpers.toy import make_pairs, save_tiny_model, write_jsonl

PACK = 24




def _allowed_by_runs(runs, width: int) -> torch.Tensor:
    """(R, T, T) bool: query column t sees key column s under the runs (causal within each run)."""
    allowed = torch.zeros(len(runs.rows), width, width, dtype=torch.bool)
    for row, row_runs in enumerate(runs.rows):
        for spans, keep in row_runs:
            columns = [c for a, b in spans for c in range(a, b)]
            for i, t in enumerate(columns[keep:], start=keep):
                allowed[row, t, columns[: i + 1]] = True
    return allowed


def test_runs_of_one_prefix_shared_block_are_prompt_plus_each_branch():
    # prompt (3) + chosen (2) + rejected (2) in one row, then a packed row of two sequences.
    shared = collate([TokenizedPair((1, 2, 3), (4, 5), (6, 7), 0)], 0, "prefix-shared")
    assert segment_runs(shared.segment_ids, shared.branch_ids).rows == (((((0, 5),), 0), (((0, 3), (5, 7)), 3)),)
    packed = collate([TokenizedPair((1, 2, 3), (4, 5), (6,), 0)], 0, "packed", pack_length=12)
    assert segment_runs(packed.segment_ids, packed.branch_ids).rows == (((((0, 5),), 0), (((5, 9),), 0)),)


@pytest.mark.parametrize("layout", ["packed", "prefix-shared"])
def test_runs_give_exactly_the_mask_builders_pattern(layout, tok, pairs):
    batch = collate(pairs, tok.pad_token_id, layout, PACK)
    mask = block_attention_mask(batch.segment_ids, batch.branch_ids, batch.position_ids)[:, 0]
    real = batch.segment_ids >= 0  # padding columns: no run covers them, no real token sees them
    from_runs = _allowed_by_runs(segment_runs(batch.segment_ids, batch.branch_ids), batch.input_ids.shape[1])
    both_real = real[:, :, None] & real[:, None, :]
    assert torch.equal(from_runs & both_real, mask & both_real)
    assert not from_runs[~both_real].any()


def test_segment_attention_builds_no_square_mask(tok, pairs, monkeypatch):
    model = build_family("llama", tok, "segments").train()
    assert attention_impl(model) == SEGMENTS
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask, is_causal, k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    batch = collate(pairs, tok.pad_token_id, "prefix-shared", PACK)
    sequence_logps(model, batch).chosen_logps.sum().backward()
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert calls and all(mask is None and causal for mask, causal, _ in calls)
    assert max(keys for *_, keys in calls) == longest < batch.input_ids.shape[1]


@pytest.mark.parametrize("layout", ["packed", "prefix-shared"])
def test_gradients_equal_the_padded_forward(layout, tok, pairs):
    grads = {}
    for name, attn, lay in (("padded", "sdpa", "padded"), ("segments", "segments", layout)):
        model = build_family("qwen3", tok, attn).train()  # GQA: 2 query heads per key head
        out = sequence_logps(model, collate(pairs, tok.pad_token_id, lay, PACK))
        (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["padded"].keys() == grads["segments"].keys()
    for n, g in grads["padded"].items():
        torch.testing.assert_close(grads["segments"][n], g, atol=1e-5, rtol=1e-5, msg=n)


def test_auto_decides_once_per_run_from_the_most_mask_cells_any_batch_can_have(tok, pairs):
    """Rows just under 4k tokens (the 4k set's reference pass: 8 x 4091) would need masks of rows x
    width^2 cells, 5 bytes each on the CPU: a run whose batches can reach 2^24 cells runs segments,
    on every batch, its narrow ones too; a run of short rows keeps the masks on every batch."""
    tokens = torch.randint(4, 40, (3 * 1100,), generator=torch.Generator().manual_seed(0)).tolist()
    wide = [TokenizedPair(tokens[:1100], tokens[1100:2200], tokens[2200:3300 - k], k) for k in range(2)]
    cells = max(most_mask_cells(wide, 2, layout) for layout in ("packed", "prefix-shared"))
    assert cells >= AUTO_SEGMENTS_MIN_MASK_CELLS
    model = build_family("llama", tok, "sdpa")
    assert choose_attention(model, "auto", mask_cells=cells) == SEGMENTS
    one = collate(wide[:1], tok.pad_token_id, "prefix-shared")
    assert one.input_ids.shape[0] * one.input_ids.shape[1] ** 2 < AUTO_SEGMENTS_MIN_MASK_CELLS
    assert SEGMENT_RUNS in attention_inputs(model, one)  # a narrow batch of the same run: segments too
    short = most_mask_cells(pairs, 4, "packed", PACK)
    assert short < AUTO_SEGMENTS_MIN_MASK_CELLS
    assert choose_attention(model, "auto", mask_cells=short) == "sdpa"  # the same model in a run of short rows
    narrow = attention_inputs(model, collate(pairs, tok.pad_token_id, "packed", PACK))
    assert SEGMENT_RUNS not in narrow and narrow["attention_mask"].stride()[-1] != 0  # a real [T x T] mask


def test_most_mask_cells_bounds_every_batch_the_pairs_can_make():
    rng = random.Random(0)
    for trial in range(200):
        count, per_batch, pack = rng.randint(1, 12), rng.randint(1, 6), rng.choice([0, 0, 16, 40])
        pool = [TokenizedPair(tuple(range(rng.randint(1, 30))), tuple(range(rng.randint(1, 30))),
                              tuple(range(rng.randint(1, 30))), i) for i in range(count)]
        for layout in ("packed", "prefix-shared"):
            bound = most_mask_cells(pool, per_batch, layout, pack)
            for _ in range(10):
                batch = collate(rng.sample(pool, min(count, rng.randint(1, per_batch))), 0, layout, pack)
                rows, width = batch.input_ids.shape
                assert rows * width * width <= bound, (trial, layout)


def test_auto_falls_back_with_one_line_and_explicit_is_refused(tok):
    lines = []
    model = build_family("mistral", tok, "sdpa")  # sliding window: needs a windowed mask
    assert choose_attention(model, "auto", log=lines.append) == "sdpa" and attention_impl(model) == "sdpa"
    assert len(lines) == 1 and "sliding-window" in lines[0]
    with pytest.raises(ValueError, match="--attention segments is not exact for mistral"):
        choose_attention(model, "segments")
    assert choose_attention(build_family("llama", tok, "sdpa"), "masks") == "sdpa"


def test_explicit_segments_run_on_every_row_and_masks_stay_exact(tok, pairs):
    batch = collate(pairs, tok.pad_token_id, "packed", PACK)
    explicit = build_family("llama", tok, "sdpa")
    assert choose_attention(explicit, "segments", mask_cells=0) == SEGMENTS  # whatever the batches' size
    assert SEGMENT_RUNS in attention_inputs(explicit, batch)
    masks = build_family("llama", tok, "sdpa")
    assert choose_attention(masks, "masks") == "sdpa"
    padded, logps = collate(pairs, tok.pad_token_id, "padded"), {}
    for name, model in (("padded", build_family("llama", tok, "sdpa")), ("segments", explicit), ("masks", masks)):
        model.eval()
        with torch.no_grad():
            logps[name] = sequence_logps(model, padded if name == "padded" else batch).chosen_logps
    torch.testing.assert_close(logps["segments"], logps["padded"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps["masks"], logps["padded"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segments")
    return save_tiny_model(folder / "model"), write_jsonl(folder / "train.jsonl", make_pairs(16, seed=3))


def _losses(run_files, out, *flags):
    model, data = run_files
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "4",
                 "--batch-size", "4", "--max-length", "48", "--learning-rate", "1e-3", "--progress", "off",
                 "--reference", "live", *flags]) == 0
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_loss_trajectory_equals_the_padded_math_path(run_files, tmp_path, capsys):
    padded = _losses(run_files, tmp_path / "padded", "--layout", "padded", "--attention", "masks",
                     "--lm-head", "plain")
    for layout in ("packed", "prefix-shared"):
        segments = _losses(run_files, tmp_path / layout, "--layout", layout, "--attention", "segments")
        assert len(segments) == len(padded) == 4
        assert max(abs(a - b) for a, b in zip(segments, padded, strict=True)) <= 1e-5, (layout, segments, padded)
    assert "attention:" not in capsys.readouterr().out  # no fallback line: the tiny Llama takes segments


def test_activation_offload_on_the_cpu_is_a_one_line_error(run_files, tmp_path, capsys):
    model, data = run_files
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--progress", "off", "--activation-offload"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--activation-offload" in err[0] and "cpu" in err[0], err
