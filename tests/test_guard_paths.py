"""The first-batch guard checks the exact path training runs (issue 28), and what it cannot see is
excluded by construction.

- Nemotron's decoder layers call attention without the forward's keyword arguments, so segment
  attention never got a batch's runs and attended with its stand-in mask (every token saw its
  whole row): segment attention now raises there, `--attention auto` falls back with one line,
  an explicit `--attention segments` is a one-line error.
- BART-family decoders count positions by column whatever `position_ids` says, so packed rows
  are wrong: excluded by a probe, caught by the guard on the real batch when a probe misses,
  and `dpokit evaluate` is guarded on its own batches.
- The attention kernel is one choice per run, so the batch the guard checks and every later one
  (training, evaluations, the precomputed reference, scored in batches of the training size)
  take the same kernel; a `--reference-model` is checked as well as the policy.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpokit.model.attention as attention
import dpokit.model.capability as capability
import dpokit.model.logprobs as logprobs
import dpokit.scoring as scoring
from dpokit.cli import main
from dpokit.config import DataConfig, LossConfig, SpeedConfig, build_config
from dpokit.data import PairTokenizer, load_tokenized_pairs
from dpokit.data.order import epoch_order
from dpokit.data.tokenize import TokenizedPair
from dpokit.eval.evaluate import preference_metrics
from dpokit.model.attention import SEGMENT_RUNS, SEGMENTS, attention_impl, choose_attention, segment_attention
from dpokit.model.layout_guard import check_first_batch
from dpokit.scoring import PairScorer
from helpers.families import build_family, family_config
from helpers.toy import make_pairs, write_jsonl

CPU = torch.device("cpu")


def _random_pairs(count: int, lengths, seed: int = 0) -> list[dict]:
    """Rows of toy words; pair i has a prompt and responses of about lengths[i] words in all."""
    import random

    from helpers.toy import toy_words

    rng, words = random.Random(seed), toy_words()
    rows = []
    for i in range(count):
        n = lengths[i]
        text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
        rows.append({"prompt": text(n // 2), "chosen": text(n - n // 2), "rejected": text(max(1, n - n // 2 - 2))})
    return rows


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _step_one(out):
    return next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if "logps/chosen" in json.loads(line))


# ----------------------------------------------------------------------------- finding 1: Nemotron


def test_segment_attention_raises_on_a_packed_batch_that_lost_its_runs():
    # What Nemotron's layers hand it: the segment batch's stand-in mask (a stride-0 view of one
    # True, "every token sees its whole row") and no runs.
    q = k = v = torch.randn(2, 2, 5, 4)
    stand_in = torch.ones((), dtype=torch.bool).expand(2, 1, 5, 5)
    with pytest.raises(ValueError, match="without its runs"):
        segment_attention(None, q, k, v, stand_in)
    real = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5).contiguous()
    out, _ = segment_attention(torch.nn.Module(), q, k, v, real)  # a real mask (padded batch): plain SDPA
    assert out.shape == (2, 5, 2, 4)


def test_nemotron_attention_auto_falls_back_with_one_line_and_explicit_segments_is_refused(tok):
    model, lines = build_family("nemotron", tok, "sdpa"), []
    assert choose_attention(model, "auto", lines.append) == "sdpa" and attention_impl(model) == "sdpa"
    assert len(lines) == 1 and "nemotron" in lines[0] and "keyword arguments" in lines[0]
    with pytest.raises(ValueError, match="--attention segments is not exact for nemotron: its layers do not pass"):
        choose_attention(build_family("nemotron", tok, "sdpa"), "segments")


def test_nemotron_under_every_default_trains_on_the_padded_numbers(tok, tmp_path, monkeypatch, capsys):
    """The issue's end-to-end case, shrunk: the training batches' masks reach the segments
    threshold while one pair's do not (on main the check scored one pair on the mask path and
    said exact; the batch ran segments without runs: step-1 logps/chosen -6225.45 against the
    padded -6223.34 on 8 pairs of 1300-1950 tokens). Here the threshold is lowered instead."""
    data = write_jsonl(tmp_path / "train.jsonl", make_pairs(8, seed=1))
    model_dir = _save(build_family("nemotron", tok, "sdpa"), tok, tmp_path / "model")
    monkeypatch.setattr(attention, "AUTO_SEGMENTS_MIN_MASK_CELLS", 500)  # 1 pair: ~250 cells; 4 pairs: ~900
    flags = ["--model", str(model_dir), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
             "--learning-rate", "1e-3", "--progress", "off"]
    assert main(["train", *flags, "--output", str(tmp_path / "auto")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert main(["train", *flags, "--output", str(tmp_path / "padded"), "--layout", "padded", "--lm-head", "plain"]) == 0
    auto, padded = _step_one(tmp_path / "auto"), _step_one(tmp_path / "padded")
    for name in ("logps/chosen", "logps/rejected", "loss"):
        assert auto[name] == pytest.approx(padded[name], abs=1e-4), name
    assert sum(line.startswith("attention: --attention segments is not exact for nemotron") for line in lines) == 1
    check = json.loads((tmp_path / "auto" / "layout_check.json").read_text())
    assert check["attention"] == "sdpa" and check["fallback"] is False and check["pairs"] == 4


# ----------------------------------------------------------------------------- finding 2: BART family


def _bart(tok, seed: int):
    config = family_config("bart", tok)
    config.init_std = 0.2  # a random model with opinions: log-probs that move with the positions
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("bart") / "eval.jsonl", make_pairs(16, seed=2))


def _padded_figures(policy, reference, tok, eval_file) -> dict:
    pairs = load_tokenized_pairs(str(eval_file), PairTokenizer.from_config(tok, DataConfig()), lambda _: None,
                                 DataConfig())
    scorer = PairScorer(policy, reference, loss=LossConfig(), speed=SpeedConfig(layout="padded", lm_head="plain"),
                        dtype="fp32", pad_id=tok.pad_token_id, device=CPU)
    return {k.removeprefix("eval_"): v for k, v in scorer.evaluate(pairs, 8).items()}


def _evaluate(policy, reference, tok, eval_file, lines) -> dict:
    return preference_metrics(policy, reference, tok, str(eval_file), loss=LossConfig(), batch_size=8, device=CPU,
                              log=lines.append)


def test_evaluate_on_a_bart_decoder_gives_the_padded_figures(tok, eval_file):
    """On main `dpokit evaluate` scored these pairs packed: rewards/margins +0.036, accuracy 0.69,
    where the padded forward gives -0.003 and 0.56 (the sign flips)."""
    policy, reference, lines = _bart(tok, 0), _bart(tok, 8), []
    figures = _evaluate(policy, reference, tok, eval_file, lines)
    padded = _padded_figures(policy, reference, tok, eval_file)
    assert padded["rewards/margins"] < 0 < padded["rewards/accuracies"]
    for name in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/chosen"):
        assert figures[name] == pytest.approx(padded[name], abs=1e-4), name
    assert not [line for line in lines if line.startswith("layout check")]  # excluded by the probe: no fallback


def _blind_probes(monkeypatch):
    """A model the probes do not catch: only the guard on the real batch is left."""
    monkeypatch.setattr(capability, "copies_disagree", lambda model, layout, windows=None: None)


def test_evaluate_is_guarded_on_its_own_batches(tok, eval_file, monkeypatch):
    _blind_probes(monkeypatch)
    policy, reference = _bart(tok, 0), _bart(tok, 8)
    lines = []
    figures = _evaluate(policy, reference, tok, eval_file, lines)
    lines = [line for line in lines if line.startswith("layout check")]
    assert len(lines) == 1 and lines[0].startswith("layout check: bart:") and "--layout padded" in lines[0]
    padded = _padded_figures(policy, reference, tok, eval_file)
    assert figures["rewards/margins"] == pytest.approx(padded["rewards/margins"], abs=1e-4)


def test_the_guard_checks_the_whole_first_batch_where_sequences_pack(tok, tmp_path, monkeypatch):
    """One long pair and short ones: the long pair's two sequences never share a row, the short
    ones do. On main the guard scored the longest pair alone (gap 0.0) while the batch, packed,
    was off by nats; it now scores the batch as training collates it."""
    _blind_probes(monkeypatch)
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": "o", "batch_size": 4}})
    scorer = PairScorer(_bart(tok, 0), loss=cfg.loss, speed=cfg.speed, dtype="fp32", pad_id=tok.pad_token_id,
                        device=CPU)
    ids = lambda n, start: tuple(range(start, start + n))  # noqa: E731
    pairs = [TokenizedPair(ids(12, 4), ids(14, 5), ids(12, 6), 0)] + [
        TokenizedPair(ids(3, 4 + i), ids(3, 7), ids(2, 9), i) for i in range(1, 4)]
    lines = []
    record = check_first_batch(scorer, pairs, tmp_path, lines.append)
    assert record["checked"][0]["gap"] > 0.1 and record["fallback"] and scorer.layouts == ["padded"]
    assert len(lines) == 1 and "the packed layout" in lines[0]
    assert record["pairs"] == 4 and [c["layout"] for c in record["checked"]] == ["packed", "prefix-shared"]


def test_explicit_segments_on_a_model_with_no_exact_packed_layout_is_refused(tok):
    with pytest.raises(ValueError, match="--attention segments is not exact for bart: two copies"):
        capability.configure_forward(_bart(tok, 0), choice="segments", layouts=["packed", "prefix-shared"],
                                     mask_cells=None, log=print)


# ----------------------------------------------------------------------------- the guard's path is training's


def test_every_batch_of_a_run_takes_the_kernel_the_guard_checked(tok, tmp_path, monkeypatch, capsys):
    """The attention kernel is chosen once per run, from a bound on every batch it scores: here
    the first batch's masks are small and the second batch's large (on main the first took the
    masks and the second segments, and only the first was checked). The precomputed reference
    is scored in batches of the training size."""
    order = epoch_order(8, 42, 0)  # the default --seed's first epoch
    lengths = [4] * 8
    for i in order[4:]:
        lengths[i] = 24  # the second batch's pairs are long
    data = write_jsonl(tmp_path / "train.jsonl", _random_pairs(8, lengths))
    model_dir = _save(build_family("llama", tok, "sdpa"), tok, tmp_path / "model")
    monkeypatch.setattr(attention, "AUTO_SEGMENTS_MIN_MASK_CELLS", 2000)  # first batch ~600 cells, second ~4000
    kernels, reference_batches = [], []
    inputs, no_grad_logps = logprobs.attention_inputs, PairScorer.no_grad_logps

    def spy_inputs(model, batch, *args, **kwargs):
        got = inputs(model, batch, *args, **kwargs)
        if batch.layout != "padded" and batch.num_pairs > 1:  # the run's batches, not a probe's one pair
            kernels.append(SEGMENTS if SEGMENT_RUNS in got else "masks")
        return got

    def spy_reference(self, pairs):
        reference_batches.append(len(pairs))
        return no_grad_logps(self, pairs)

    monkeypatch.setattr(logprobs, "attention_inputs", spy_inputs)
    monkeypatch.setattr(PairScorer, "no_grad_logps", spy_reference)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "4", "--layout", "packed", "--progress", "off"]) == 0
    assert set(kernels) == {SEGMENTS}, kernels
    assert len(kernels) == 5, kernels  # the check, the reference pass (two batches of 4), two steps
    assert reference_batches and max(reference_batches) <= 4
    check = json.loads((tmp_path / "run" / "layout_check.json").read_text())
    assert check["attention"] == SEGMENTS and check["pairs"] == 4


def test_auto_settles_one_layout_per_run_and_every_batch_takes_it(tok, tmp_path, monkeypatch):
    """On main `--layout auto` picked packed or prefix-shared per batch and the check ran both;
    now the run takes the one cheaper over its first epoch's batches, and the check runs it."""
    data = write_jsonl(tmp_path / "train.jsonl", make_pairs(16, seed=4))
    model_dir = _save(build_family("llama", tok, "sdpa"), tok, tmp_path / "model")
    layouts, collate = [], scoring.collate

    def spy(pairs, pad_id, layout="padded", pack_length=0):
        layouts.append(layout)
        return collate(pairs, pad_id, layout, pack_length)

    monkeypatch.setattr(scoring, "collate", spy)
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "3", "--batch-size", "4", "--progress", "off"]) == 0
    check = json.loads((tmp_path / "run" / "layout_check.json").read_text())
    assert len(check["layouts"]) == 1 and [c["layout"] for c in check["checked"]] == check["layouts"]
    assert len(layouts) >= 6 and set(layouts) == set(check["layouts"]), layouts  # reference pass and steps


def test_a_reference_model_of_another_architecture_is_checked_too(tok, tmp_path, capsys):
    """`--reference-model` (a BART decoder) is scored in the same batches as the policy (a Llama):
    the layouts must be exact for both. On main only the policy was asked, and the reference's
    packed log-probs moved every reward."""
    data = write_jsonl(tmp_path / "train.jsonl", make_pairs(8, seed=1))
    policy_dir = _save(build_family("llama", tok, "sdpa"), tok, tmp_path / "policy")
    reference_dir = _save(_bart(tok, 8), tok, tmp_path / "reference")
    flags = ["--model", str(policy_dir), "--reference-model", str(reference_dir), "--reference", "live",
             "--data", str(data), "--max-steps", "1", "--batch-size", "4", "--learning-rate", "1e-3",
             "--progress", "off"]
    assert main(["train", *flags, "--output", str(tmp_path / "auto")]) == 0
    assert main(["train", *flags, "--output", str(tmp_path / "padded"), "--layout", "padded", "--lm-head", "plain"]) == 0
    auto, padded = _step_one(tmp_path / "auto"), _step_one(tmp_path / "padded")
    for name in ("rewards/chosen", "rewards/rejected", "loss"):
        assert auto[name] == pytest.approx(padded[name], abs=1e-5), name
    assert json.loads((tmp_path / "auto" / "layout_check.json").read_text())["layouts"] == ["padded"]
