"""The MoE load-balancing term through training: CLI steps on every MoE family, coefficient 0 is
exactly today's run, resume is bitwise, accumulation and torchrun average the term as the loss.

Expected values come from transformers' own forward (`model(..., output_router_logits=True).aux_loss`
on the padded micro-batches the run scores), not from dpokit's code.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import DataConfig, build_config
from dpokit.data import PairTokenizer, load_tokenized_pairs
from dpokit.data.batching import collate
from dpokit.data.order import epoch_order
from dpokit.eval.report import ROUTER_FILE, write_report
from dpokit.model.router_loss import AUX_RELATIVE_TOLERANCE
from dpokit.train.distributed import Distributed
from dpokit.train.loop import train
from dpokit.train.shards import rank_steps
from helpers.moe_families import MOE_FAMILIES, build_moe
from helpers.toy import make_pairs, write_jsonl

PACK = 24
SEED = 42  # --seed's default: the epoch order the runs below visit the pairs in
# PhiMoE's SparseMixer samples its experts (Gumbel) in train mode, as its authors train it: the
# policy's first forward is not the reference's, so step 1 is not ln 2 + coef x aux there.
STOCHASTIC_IN_TRAINING = {"phimoe"}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("moe") / "train.jsonl", make_pairs(16, seed=1))


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return folder


def _save(family, tok, folder: Path) -> Path:
    model = build_moe(family, tok, "eager")
    if type(model)._supports_sdpa:  # the attention a user's checkpoint would load with
        model = build_moe(family, tok, "sdpa")
    model.save_pretrained(folder)
    return folder


def _records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _own_aux(model_dir: Path, tok, train_file: Path, micro_batches: list[list[int]]) -> float:
    """The pair-weighted mean of transformers' own aux loss over `micro_batches` (indices of the
    training pairs), at the model's initial weights, in train mode as the run scores them."""
    from transformers import AutoModelForCausalLM

    pairs = load_tokenized_pairs(str(train_file), PairTokenizer.from_config(tok, DataConfig(max_length=32)), lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    total = 0.0
    with torch.no_grad():
        for indices in micro_batches:
            batch = collate([pairs[i] for i in indices], tok.pad_token_id, "padded")
            aux = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True,
                        use_cache=False).aux_loss
            total += aux.item() * len(indices)
    return total / sum(len(indices) for indices in micro_batches)


def _train_args(model_dir, tok_dir, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--tokenizer", str(tok_dir), "--data", str(data), "--output", str(out),
            "--batch-size", "4", "--max-length", "32", "--progress", "off", "--learning-rate", "1e-3",
            "--pack-length", str(PACK), *map(str, extra)]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_two_cli_steps_start_at_ln2_plus_the_coefficient_times_the_aux_loss(family, tok, tok_dir, train_file,
                                                                             tmp_path, capsys):
    model_dir = _save(family, tok, tmp_path / "model")
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_train_args(model_dir, tok_dir, train_file, out, "--max-steps", 2)) == 0, capsys.readouterr().err
    logged = capsys.readouterr().out
    first = _records(out)[0]
    coef = float(logged.split("load-balancing loss x ")[1].split(" ")[0])
    check = json.loads((out / "layout_check.json").read_text())
    assert check["fallback"] is False, check
    assert all(c["aux_gap"] <= c["aux_tolerance"] for c in check["checked"]), check  # the guard compared it
    if family in STOCHASTIC_IN_TRAINING:
        assert first["rewards/margins"] != 0.0
        return
    own = _own_aux(model_dir, tok, train_file, [epoch_order(16, SEED, 0)[:4]])
    assert first["aux_loss"] == pytest.approx(own, abs=AUX_RELATIVE_TOLERANCE * own)
    assert first["loss"] == pytest.approx(math.log(2) + coef * own, abs=1e-6)
    assert 0.5 <= first["router/max_expert_share"] <= first["router/max_expert_share_busiest_layer"] <= 1.0


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("throughput/")} for r in records]


def _in_process(model_dir, tok_dir, data, out, **train_fields):
    cfg = build_config({"model": {"model": str(model_dir), "tokenizer": str(tok_dir)},
                        "data": {"data": str(data), "max_length": 32},
                        "speed": {"pack_length": PACK},
                        "loss": {"router_aux_loss_coef": train_fields.pop("coef", None)},
                        "train": {"output": str(out), "batch_size": 4, "learning_rate": 1e-3, "progress": "off",
                                  **train_fields}})
    return train(cfg, log=lambda _: None)


def test_coefficient_zero_is_exactly_todays_run(tok, tok_dir, train_file, tmp_path, monkeypatch):
    model_dir = _save("mixtral", tok, tmp_path / "model")
    _in_process(model_dir, tok_dir, train_file, tmp_path / "zero", max_steps=2, coef=0.0)
    monkeypatch.setattr("dpokit.scoring.router_loss_for", lambda *args: None)  # dpokit before the term existed
    _in_process(model_dir, tok_dir, train_file, tmp_path / "today", max_steps=2)
    zero, today = _records(tmp_path / "zero"), _records(tmp_path / "today")
    assert [r["loss"] for r in zero] == [r["loss"] for r in today]
    assert [r["grad_norm"] for r in zero] == [r["grad_norm"] for r in today]
    assert "aux_loss" in zero[0] and "aux_loss" not in today[0]  # measured, not trained on
    a, b = load_file(str(tmp_path / "zero" / "model.safetensors")), load_file(str(tmp_path / "today" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_with_the_term_is_bitwise(tok, tok_dir, train_file, tmp_path):
    model_dir = _save("qwen2-moe", tok, tmp_path / "model")
    _in_process(model_dir, tok_dir, train_file, tmp_path / "full", max_steps=4, save_every=2)
    _in_process(model_dir, tok_dir, train_file, tmp_path / "resumed", max_steps=4, save_every=2,
                resume=str(tmp_path / "full" / "checkpoints" / "step-0000002"))
    full, resumed = (_without_timings(_records(tmp_path / run)) for run in ("full", "resumed"))
    assert full[2:] == resumed and "aux_loss" in resumed[0]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = write_report(tmp_path / "full")
    assert (tmp_path / "full" / ROUTER_FILE).is_file() and ROUTER_FILE in report.read_text()


def test_accumulation_averages_the_term_over_micro_batches_as_the_loss(tok, tok_dir, train_file, tmp_path):
    # The load-balancing loss is E x sum_e f_e P_e, a product of two means over the routed tokens:
    # it is not a sum over pairs, so 2 x 2 pairs do not give the 4-pair value. Each micro-batch's
    # term weighs its pairs' share of the step, as the loss does.
    model_dir = _save("mixtral", tok, tmp_path / "model")
    order = epoch_order(16, SEED, 0)
    _in_process(model_dir, tok_dir, train_file, tmp_path / "big", max_steps=1)
    _in_process(model_dir, tok_dir, train_file, tmp_path / "small", max_steps=1, batch_size=2,
                gradient_accumulation_steps=2)
    big, small = _records(tmp_path / "big")[0], _records(tmp_path / "small")[0]
    one_batch = _own_aux(model_dir, tok, train_file, [order[:4]])
    two = _own_aux(model_dir, tok, train_file, [order[:2], order[2:4]])
    assert big["aux_loss"] == pytest.approx(one_batch, abs=AUX_RELATIVE_TOLERANCE * one_batch)
    assert small["aux_loss"] == pytest.approx(two, abs=AUX_RELATIVE_TOLERANCE * two)
    assert abs(one_batch - two) > 10 * AUX_RELATIVE_TOLERANCE * one_batch  # they do differ here (1.5e-4 relative)
    for record, aux in ((big, one_batch), (small, two)):
        assert record["loss"] == pytest.approx(math.log(2) + 0.001 * aux, abs=1e-6)


def test_a_coefficient_on_a_dense_model_is_one_line(tiny_model_dir, toy_data, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--progress", "off", "--router-aux-loss-coef", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--router-aux-loss-coef 0.01: llama has no router" in err[0]


@pytest.mark.slow
def test_torchrun_averages_the_term_over_the_ranks_micro_batches(tok, tok_dir, train_file, tmp_path):
    model_dir = _save("mixtral", tok, tmp_path / "model")
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dpokit",
           *_train_args(model_dir, tok_dir, train_file, out, "--max-steps", 1, "--batch-size", 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    order = epoch_order(16, SEED, 0)
    shares = [next(rank_steps(order, 2, 1, Distributed(rank=r, world_size=2)))[1][0] for r in range(2)]
    own = _own_aux(model_dir, tok, train_file, shares)  # rank 0 scores pairs 0 and 2, rank 1 pairs 1 and 3
    first = _records(out)[0]
    assert first["aux_loss"] == pytest.approx(own, abs=AUX_RELATIVE_TOLERANCE * own)
    assert first["loss"] == pytest.approx(math.log(2) + 0.001 * own, abs=1e-6)
