"""The architecture conformance matrix: every family in `helpers.families.FAMILIES` (one line each).

For each family (tiny random model, fp32, local/sliding windows shorter than the sequences):
- every layout x LM head x attention implementation (eager, sdpa, and dpokit's segment
  attention over sdpa), run as the scorer runs it (with what `capability.describe_forward` found
  about the model), gives each sequence's summed response log-prob of a one-sequence-at-a-time
  forward to 1e-5, or the layout is excluded: `auto` never picks it and asking for it explicitly
  fails with the reason; segment attention runs exactly where documented (SEGMENTS_EXCLUDED);
- two train-mode forwards of the same input are bitwise equal (dropout off, config fields too);
- (slow) two CLI training steps and `dpokit sample` run, and the first-batch layout check agrees.
"""

import json

import pytest
import torch

from dpokit.cli import main
from dpokit.config import build_config
from dpokit.data.batching import LAYOUTS, collate
from dpokit.errors import DpokitError
from dpokit.model.attention import (
    PACKED_LAYOUTS,
    SEGMENTS,
    attention_impl,
    attention_inputs,
    block_attention_mask,
)
from dpokit.model.capability import configure_forward, describe_forward
from dpokit.model.load import disable_dropout
from dpokit.model.logprobs import sequence_logps
from dpokit.scoring import PairScorer
from helpers.families import FAMILIES, WINDOW, attention_kinds, build_family, family_pairs
from helpers.toy import make_pairs, write_jsonl

PACK = 24  # packed rows hold two or three sequences, prefix-shared rows two pairs


@pytest.fixture(scope="module")
def pairs(tok):
    kept = family_pairs(tok)
    assert min(len(p.prompt_ids) + min(len(p.chosen_ids), len(p.rejected_ids)) for p in kept) > WINDOW
    return kept


def _one_at_a_time(model, pairs):
    """(chosen, rejected) summed response log-probs, each sequence alone through model(...).logits."""
    sums = {"chosen": [], "rejected": []}
    for p in pairs:
        for half, response in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            ids = torch.tensor([list(p.prompt_ids + response)])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            n = len(p.prompt_ids)
            sums[half].append(sum(logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1])))
    return torch.tensor(sums["chosen"]), torch.tensor(sums["rejected"])


def _scorer(model, layout="auto"):
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d.jsonl"}, "train": {"output": "o"},
                        "speed": {"layout": layout}})
    return PairScorer(model, loss=cfg.loss, speed=cfg.speed, dtype=cfg.model.dtype, pad_id=0,
                      device=torch.device("cpu"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_layout_is_exact_or_excluded(family, tok, pairs):
    for attn in attention_kinds(family):
        model = build_family(family, tok, attn).eval()
        forward = describe_forward(model)  # what the scorer finds about the model, once per run
        with torch.no_grad():
            chosen, rejected = _one_at_a_time(model, pairs)
            heads = [False, True] if forward.plain_head else [False]  # auto's probe excludes the rest
            for layout in LAYOUTS:
                batch = collate(pairs, tok.pad_token_id, layout, PACK)
                where = f"{family}/{attn}/{layout}"
                if layout in forward.refusals:
                    assert layout not in _scorer(model).layouts, where
                    with pytest.raises(DpokitError, match=f"--layout {layout} is not exact"):
                        _scorer(model, layout)
                    with pytest.raises(ValueError, match="not exact"):
                        sequence_logps(model, batch)  # probed on the spot when called without `forward`
                    continue
                for chunked in heads:
                    out = sequence_logps(model, batch, chunked_head=chunked, chunk=5, forward=forward)
                    msg = f"{where}/chunked={chunked}"
                    torch.testing.assert_close(out.chosen_logps.double(), chosen, atol=1e-5, rtol=0, msg=msg)
                    torch.testing.assert_close(out.rejected_logps.double(), rejected, atol=1e-5, rtol=0, msg=msg)


# Where each family cannot be exact, and why (the README's table). Everything else is exact.
_POSITIONS_BY_COLUMN = {"packed", "prefix-shared"}
EXCLUDED = {"bloom": {"packed", "prefix-shared"}, "falcon-alibi": {"packed", "prefix-shared"},
            "mpt": {"prefix-shared"}, "gpt-neo": {"prefix-shared"},
            "bart": _POSITIONS_BY_COLUMN, "mbart": _POSITIONS_BY_COLUMN, "marian": _POSITIONS_BY_COLUMN}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exclusions_are_exactly_the_documented_ones(family, tok):
    model = build_family(family, tok, attention_kinds(family)[-1])
    assert set(describe_forward(model).refusals) == EXCLUDED.get(family, set())


# Families with sdpa whose packed rows keep the [T x T] masks under --attention auto, and why
# (the one log line); every other family with a packed layout and sdpa runs segment attention.
SEGMENTS_EXCLUDED = {"mistral": "sliding-window", "mixtral": "sliding-window", "phi3": "sliding-window",
                     "qwen2-sliding": "sliding-window", "gemma3": "sliding-window", "starcoder2": "sliding-window",
                     "falcon": "does not pass attention arguments", "falcon-alibi": "does not pass attention arguments",
                     "stablelm": "does not pass attention arguments",
                     "nemotron": "do not pass the forward's keyword arguments to attention"}


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if "segments" in attention_kinds(f)))
def test_segment_attention_runs_exactly_where_documented(family, tok):
    model, lines = build_family(family, tok, "sdpa"), []
    configure_forward(model, choice="auto", layouts=PACKED_LAYOUTS, mask_cells=None, log=lines.append)
    if EXCLUDED.get(family) == set(PACKED_LAYOUTS):  # no packed row to attend: nothing to choose
        assert attention_impl(model) == "sdpa" and lines == []
    elif family in SEGMENTS_EXCLUDED:
        assert attention_impl(model) == "sdpa" and len(lines) == 1 and SEGMENTS_EXCLUDED[family] in lines[0], lines
    else:
        assert attention_impl(model) == SEGMENTS and lines == []


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_train_mode_forwards_are_bitwise_equal(family, tok, pairs):
    # Every float dropout field of the config set to 0.3, as a checkpoint trained with dropout has.
    model = build_family(family, tok, "eager", dropout=0.3)
    disable_dropout(model)
    model.train()
    ids = torch.tensor([list(pairs[0].prompt_ids + pairs[0].chosen_ids)] * 2)
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)


def test_sliding_window_mask_counts_positions_not_columns():
    # One prefix-shared block: prompt (3) + chosen (2) + rejected (2); rejected sits at positions 3, 4.
    batch = collate([_pair((1, 2, 3), (4, 5), (6, 7))], 0, "prefix-shared")
    allowed = block_attention_mask(batch.segment_ids, batch.branch_ids, batch.position_ids, window=3)[0, 0]
    rejected_second = 6  # column of the rejected token at position 4
    assert allowed[rejected_second].tolist() == [False, False, True, False, False, True, True]


def _pair(prompt, chosen, rejected):
    from dpokit.data.tokenize import TokenizedPair

    return TokenizedPair(prompt, chosen, rejected, 0)


def test_flash_packed_rows_are_one_flattened_row_with_explicit_varlen_arguments(tok, pairs):
    # No FlashAttention on CPU: check the arguments it would get, then emulate varlen attention
    # with them (a block-causal mask built from cu_seq_lens only) and compare with padded.
    model = build_family("llama", tok, "eager").eval()
    batch = collate(pairs, tok.pad_token_id, "packed", PACK)
    model.config._attn_implementation = "flash_attention_2"
    try:
        inputs = attention_inputs(model, batch)
    finally:
        model.config._attn_implementation = "eager"
    rows, width = batch.input_ids.shape
    assert rows > 1 and inputs["attention_mask"] is None
    assert inputs["input_ids"].shape == (1, rows * width) and inputs["position_ids"].shape == (1, rows * width)
    cu = inputs["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and torch.equal(cu, inputs["cu_seq_lens_k"])
    assert cu[0] == 0 and cu[-1] == rows * width
    assert inputs["max_length_q"] == inputs["max_length_k"] == int((cu[1:] - cu[:-1]).max())
    assert set((cu[:-1] % width).tolist()) >= {0}  # every row starts a sequence
    # Every sequence starts at position 0 and counts up to its end.
    positions = inputs["position_ids"][0]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        assert torch.equal(positions[start:end], torch.arange(end - start))
    sequence = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())[None]
    mask = block_attention_mask(sequence, torch.zeros_like(sequence), inputs["position_ids"])
    with torch.no_grad():
        hidden = model.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                              attention_mask=torch.where(mask, 0.0, torch.finfo(torch.float32).min)).last_hidden_state
        logits = model.lm_head(hidden).view(rows, width, -1)[batch.score_rows, batch.score_cols]
        emulated = torch.log_softmax(logits, -1).gather(-1, batch.targets[:, None])[:, 0]
        summed = torch.zeros(2 * len(pairs)).index_add(0, batch.score_seq, emulated)
        padded = sequence_logps(model, collate(pairs, tok.pad_token_id, "padded"), chunked_head=False)
    torch.testing.assert_close(summed, torch.cat([padded.chosen_logps, padded.rejected_logps]), atol=1e-5, rtol=0)


def _save(family, tok, folder, attn):
    model = build_family(family, tok, attn)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    # Passed with --tokenizer: from a folder whose config.json says qwen2 (say), transformers 5
    # loads the family's own tokenizer class instead of this word-level one.
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("conformance") / "train.jsonl", make_pairs(8, seed=1))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cli_trains_two_steps_and_samples(family, tok, tok_dir, train_file, tmp_path, capsys):
    model_dir = _save(family, tok, tmp_path / "model", attention_kinds(family)[-1])
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--model", str(model_dir), "--tokenizer", str(tok_dir), "--data", str(train_file), "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--progress", "off",
                 "--learning-rate", "1e-3", "--pack-length", str(PACK)]) == 0, capsys.readouterr().err
    check = json.loads((out / "layout_check.json").read_text())
    assert check["fallback"] is False, check  # the matrix says every layout auto picks is exact
    assert main(["sample", "--model", str(out), "--tokenizer", str(tok_dir), "--prompt", "the film was", "--max-new-tokens", "4",
                 "--num-samples", "2", "--progress", "off"]) == 0, capsys.readouterr().err
    assert "the film was" in capsys.readouterr().out


@pytest.mark.parametrize("family,layout,why", [("bloom", "packed", "ALiBi"), ("falcon-alibi", "prefix-shared", "ALiBi"),
                                               ("mpt", "prefix-shared", "ALiBi"),
                                               ("gpt-neo", "prefix-shared", "local attention"),
                                               ("bart", "packed", "position_ids"),
                                               ("marian", "prefix-shared", "position_ids")])
def test_an_explicit_layout_that_cannot_be_exact_is_a_one_line_error(family, layout, why, tok, tok_dir, train_file,
                                                                     tmp_path, capsys):
    model_dir = _save(family, tok, tmp_path / "model", "eager")
    capsys.readouterr()  # saving the model prints a progress bar
    code = main(["train", "--model", str(model_dir), "--tokenizer", str(tok_dir), "--data", str(train_file), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--layout", layout, "--progress", "off"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"--layout {layout} is not exact for" in err[0] and why in err[0]
