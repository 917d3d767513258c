"""--memory-budget: the size parser, the planner's choice (fake probes), the plan in a run (written,
followed, reused on resume), the one-line refusal, and a real child-process probe on a tiny model."""

from __future__ import annotations

import json

import pytest

from dpokit.cli import main
from dpokit.config import build_config
from dpokit.config.parsers import parse_memory_budget
from dpokit.errors import DpokitError
from dpokit.train import memory_budget
from dpokit.train.memory_plan import PLAN_FILE, NoPlanFits, Probe, Setting, choose_setting, micro_batches
from helpers.toy import make_pairs, write_jsonl

MB = 10**6


@pytest.mark.parametrize(("text", "size"), [("8GiB", 8 * 2**30), ("1500MB", 1500 * MB), ("1.5 GiB", 3 * 2**29),
                                            ("12e9", 12 * 10**9), ("auto", "auto"), (None, None)])
def test_sizes_parse(text, size):
    assert parse_memory_budget(text) == size


@pytest.mark.parametrize("text", ["8GX", "-1GB", "0", "abc", "nan", "100", "GiB"])
def test_bad_sizes_are_one_line_naming_the_option(text):
    with pytest.raises(DpokitError, match=r"^--memory-budget must be auto or a size"):
        parse_memory_budget(text)


def fake_probe(base=200, per_pair=None, fixed=1.0, per_b=1.0, ratio=None, log=None):
    """Peak base + b x per_pair[levers] MB; time (fixed + per_b x b) x ratio[levers] s."""
    both = ("gradient_checkpointing", "malloc_threshold")  # the CPU's levers, as a run offers them
    per_pair = per_pair or {(): 150, ("gradient_checkpointing",): 50, both: 45}
    ratio = ratio or {(): 1.0, ("gradient_checkpointing",): 1.3, both: 1.6}

    def probe(s: Setting) -> Probe:
        if log is not None:
            log.append(s)
        return Probe(s, int((base + s.micro_batch * per_pair[s.levers]) * MB),
                     (fixed + per_b * s.micro_batch) * ratio[s.levers])
    return probe


def test_micro_batches_divide_the_step_largest_first():
    assert micro_batches(8) == [8, 4, 2, 1] and micro_batches(6) == [6, 3, 2, 1] and micro_batches(1) == [1]


def test_the_run_as_asked_when_it_fits_one_probe():
    seen = []
    setting, probes = choose_setting(8, ["gradient_checkpointing"], 2000 * MB, fake_probe(log=seen), margin=0.1)
    assert setting == Setting(8) and seen == [Setting(8)]


def test_the_fastest_setting_that_fits_keeps_the_batch():
    # Limit 900 MB: (8, none) 1400 over; (4, none) 800 fits and, at 8/4 x (1 + 4) = 10 s a step,
    # beats (8, checkpointing) 600 MB at 9 x 1.3 = 11.7 s and (2, none) at 12 s.
    seen = []
    setting, _ = choose_setting(8, ["gradient_checkpointing"], 1000 * MB, fake_probe(log=seen), margin=0.1)
    assert setting == Setting(4)
    assert seen == [Setting(8), Setting(1), Setting(1, ("gradient_checkpointing",)), Setting(4)]  # verified last


def test_the_peak_line_spares_a_probe_it_predicts_over():
    # Limit 720 MB: the line through (1, none) 350 and (8, none) 1400 puts (4, none) at 800, over,
    # so it is never probed; (8, checkpointing) at 600 MB and 11.7 s beats (2, none) at 12 s.
    seen = []
    setting, _ = choose_setting(8, ["gradient_checkpointing"], 800 * MB, fake_probe(log=seen), margin=0.1)
    assert setting == Setting(8, ("gradient_checkpointing",))
    assert seen == [Setting(8), Setting(1), Setting(1, ("gradient_checkpointing",)), setting]


def test_a_lever_cheaper_than_a_smaller_micro_batch_is_chosen():
    # Batch efficiency high (fixed cost 10 s per micro-batch), checkpointing cheap (x 1.05):
    # (8, checkpointing) at 18 x 1.05 = 18.9 s beats (4, none) at 2 x 14 = 28 s.
    setting, _ = choose_setting(8, ["gradient_checkpointing"], 1000 * MB,
                                fake_probe(fixed=10.0, ratio={(): 1.0, ("gradient_checkpointing",): 1.05}),
                                margin=0.1)
    assert setting == Setting(8, ("gradient_checkpointing",))


def test_a_prediction_the_verification_disproves_is_struck_out():
    # The probe at (4, none) measures more than the line through b = 1 and b = 8 predicts.
    probe = fake_probe()

    def lumpy(s: Setting) -> Probe:
        p = probe(s)
        return Probe(s, 950 * MB, p.seconds) if s == Setting(4) else p
    setting, probes = choose_setting(8, ["gradient_checkpointing"], 1000 * MB, lumpy, margin=0.1)
    assert Setting(4) in [p.setting for p in probes] and setting != Setting(4)
    assert setting == Setting(8, ("gradient_checkpointing",))  # 600 MB, next fastest at 11.7 s


def test_nothing_fits_names_the_smallest_peak():
    with pytest.raises(NoPlanFits) as refused:
        choose_setting(8, ["gradient_checkpointing"], 250 * MB, fake_probe(), margin=0.1)
    assert refused.value.smallest.setting == Setting(1, ("gradient_checkpointing",))
    assert refused.value.smallest.peak == 250 * MB


def _train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--batch-size", "8",
            "--max-steps", "4", "--max-length", "32", "--progress", "off", "--learning-rate", "1e-3", *extra]


def test_the_margin_is_wider_where_the_heap_keeps_fragments():
    from dpokit.train.memory_budget import margin_for

    malloc = Setting(4, ("gradient_checkpointing", "malloc_threshold"))
    assert margin_for(Setting(4), device_type="cpu", heap_fixed=False) == 0.30
    assert margin_for(malloc, device_type="cpu", heap_fixed=False) == 0.10
    assert margin_for(Setting(4), device_type="cpu", heap_fixed=True) == 0.10
    assert margin_for(Setting(4), device_type="cuda", heap_fixed=False) == 0.10


def test_plan_written_followed_and_reused_on_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(32, seed=3))
    calls = []
    monkeypatch.setattr(memory_budget, "run_probe", lambda cfg, pairs, s, requested: fake_probe(log=calls)(s))
    out = tmp_path / "run"
    # CPU, malloc's adaptive heap: 30% margin, so (4, none) at 800 MB fits 1150 MB; (8, none) at 1400 does not.
    assert main(_train_args(tiny_model_dir, data, out, "--memory-budget", "1150MB", "--save-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "memory plan: micro-batch 4 x accumulation 2 (global 8), no memory lever" in printed
    assert "global batch 8 = 4 x 2 accumulation" in printed  # the run follows it
    plan = json.loads((out / PLAN_FILE).read_text())
    assert (plan["micro_batch"], plan["requested"], plan["budget"], len(plan["probes"])) == (4, 8, 1150 * MB, 5)
    calls.clear()
    resume = ["--save-every", "2", "--resume", str(out / "checkpoints" / "step-0000002")]
    assert main(_train_args(tiny_model_dir, data, out, "--memory-budget", "1150MB", *resume)) == 0
    printed = capsys.readouterr().out
    assert calls == [] and "memory plan: micro-batch 4 x accumulation 2" in printed and "resuming from" in printed
    # Another budget on resume: refused in one line (the plan would be another).
    assert main(_train_args(tiny_model_dir, data, out, "--memory-budget", "2GiB", *resume)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--memory-budget differs" in error[0]


def test_no_plan_fits_is_refused_before_training_leaving_the_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(16, seed=4))
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)  # an earlier run the refused one would replace
    earlier = {"dpokit_config.yaml": "model: {}\n", "metrics.jsonl": '{"step": 1}\n'}
    for name, text in earlier.items():
        (out / name).write_text(text)
    monkeypatch.setattr(memory_budget, "run_probe", lambda cfg, pairs, s, requested: fake_probe()(s))
    assert main(_train_args(tiny_model_dir, data, out, "--memory-budget", "250MB", "--overwrite")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no plan fits; the smallest peak found is 0.23 GiB" in error[0]
    assert "--max-length" in error[0] and "--lora-r" in error[0] and "Traceback" not in error[0]
    assert {p.name for p in out.iterdir()} - {".dpokit.lock"} == {"checkpoints", *earlier}
    assert all((out / name).read_text() == text for name, text in earlier.items())


def test_a_real_probe_in_a_child_reports_a_plausible_peak(tiny_model_dir, tmp_path):
    from dpokit.data import PairTokenizer, load_tokenized_pairs
    from dpokit.model.load import load_tokenizer
    from dpokit.train.memory_probe import run_probe

    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(8, seed=5))
    cfg = build_config({"model": {"model": str(tiny_model_dir)}, "data": {"data": str(data), "max_length": 32},
                        "train": {"output": str(tmp_path / "out"), "batch_size": 2}})
    pairs = load_tokenized_pairs(str(data), PairTokenizer.from_config(load_tokenizer(str(tiny_model_dir)), cfg.data),
                                 lambda _: None, cfg.data, {})
    probe = run_probe(cfg, pairs, Setting(2, ("gradient_checkpointing",)), 2)
    # A Python process with torch and transformers imported holds ~200 MB or more; the tiny model a few MB.
    assert 100 * MB < probe.peak < 4 * 2**30 and probe.seconds > 0
    assert not (tmp_path / "out").exists()  # the probe writes nothing of the run's


def test_data_inspect_prints_the_plan_without_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(16, seed=6))
    monkeypatch.setattr(memory_budget, "run_probe", lambda cfg, pairs, s, requested: fake_probe()(s))
    args = ["data", "inspect", str(data), "--model", str(tiny_model_dir), "--max-length", "32", "--batch-size", "8"]
    assert main([*args, "--memory-budget", "1150MB"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "memory plan: micro-batch 4 x accumulation 2 (global 8), no memory lever; probed peak 0.75 GiB")  # 800 MB
    assert main(["data", "inspect", str(data), "--memory-budget", "1000MB"]) == 2  # a plan needs the model
    assert "--memory-budget needs --model" in capsys.readouterr().err
