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
    both = ("gradient_checkpointing", "malloc_threshold")  # the CPU's levels, as a run offers them
    sel = ("selective_recompute",)
    per_pair = per_pair or {(): 150, sel: 100, ("gradient_checkpointing",): 50, both: 45}
    ratio = ratio or {(): 1.0, sel: 1.1, ("gradient_checkpointing",): 1.3, both: 1.6}

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


def test_a_level_that_cannot_win_is_not_probed():
    # Limit 900 MB: (4, none) fits at 10 s; checkpointing could win only at micro-batch 8 (9 s at
    # no-lever speed), so it is probed: 1.3 x slower, (8, checkpointing) 11.7 s. It fits at every
    # micro-batch, so the malloc lever (less memory, more time) cannot win and is not probed.
    seen = []
    both = ["gradient_checkpointing", "malloc_threshold"]
    setting, _ = choose_setting(8, both, 1000 * MB, fake_probe(log=seen), margin=0.1)
    assert setting == Setting(4)
    assert seen == [Setting(8), Setting(1), Setting(1, ("gradient_checkpointing",)), Setting(4)]
    # At 550 MB (limit 495) checkpointing fits only up to micro-batch 4 (400 MB): the malloc level
    # might fit 8 (560 MB at 45 a pair: no), so it is probed, and the plan is (4, checkpointing).
    seen.clear()
    setting, _ = choose_setting(8, both, 550 * MB, fake_probe(log=seen), margin=0.1)
    assert Setting(1, tuple(both)) in seen and setting == Setting(4, ("gradient_checkpointing",))
    # No fixed cost a micro-batch: (4, none) is as fast as (8, anything) can be, so though 8 does
    # not fit without levers, no lever is probed.
    seen.clear()
    setting, _ = choose_setting(8, both, 1000 * MB, fake_probe(fixed=0.0, log=seen), margin=0.1)
    assert setting == Setting(4) and seen == [Setting(8), Setting(1), Setting(4)]


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
    assert margin_for(Setting(4), device_type="cpu", heap_fixed=False) == 0.35
    assert margin_for(malloc, device_type="cpu", heap_fixed=False) == 0.10
    assert margin_for(Setting(4), device_type="cpu", heap_fixed=True) == 0.10
    assert margin_for(Setting(4), device_type="cuda", heap_fixed=False) == 0.10


def test_plan_written_followed_and_reused_on_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(32, seed=3))
    calls = []
    monkeypatch.setattr(memory_budget, "run_probe", lambda cfg, data, s, requested, server: fake_probe(log=calls)(s))
    out = tmp_path / "run"
    # CPU, malloc's adaptive heap: 35% margin, so (4, none) at 800 MB fits 1250 MB; (8, none) at 1400 does not.
    assert main(_train_args(tiny_model_dir, data, out, "--memory-budget", "1250MB", "--save-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "memory plan: micro-batch 4 x accumulation 2 (global 8), no memory lever" in printed
    assert "global batch 8 = 4 x 2 accumulation" in printed  # the run follows it
    plan = json.loads((out / PLAN_FILE).read_text())
    # (8), (1), (1, selective recompute), (1, checkpointing), then (4) verified; (8, checkpointing)
    # fits at 600 MB, so the malloc lever, slower still, is never probed.
    assert (plan["micro_batch"], plan["requested"], plan["budget"], len(plan["probes"])) == (4, 8, 1250 * MB, 5)
    calls.clear()
    resume = ["--save-every", "2", "--resume", str(out / "checkpoints" / "step-0000002")]
    assert main(_train_args(tiny_model_dir, data, out, "--memory-budget", "1250MB", *resume)) == 0
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
    monkeypatch.setattr(memory_budget, "run_probe", lambda cfg, data, s, requested, server: fake_probe()(s))
    assert main(_train_args(tiny_model_dir, data, out, "--memory-budget", "250MB", "--overwrite")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no plan fits; the smallest peak found is 0.23 GiB" in error[0]
    assert "--max-length" in error[0] and "--lora-r" in error[0] and "Traceback" not in error[0]
    assert {p.name for p in out.iterdir()} - {".dpokit.lock"} == {"checkpoints", *earlier}
    assert all((out / name).read_text() == text for name, text in earlier.items())


def _run_data(model_dir, tmp_path, rows, seed, batch_size=2):
    from dpokit.model.load import load_tokenizer
    from dpokit.train.setup import load_run_data

    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(rows, seed=seed))
    cfg = build_config({"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32},
                        "train": {"output": str(tmp_path / "out"), "batch_size": batch_size}})
    run_data = load_run_data(load_tokenizer(str(model_dir)), data=cfg.data, train=cfg.train, world_size=1,
                             log=lambda _line: None)
    return cfg, run_data


def test_a_real_probe_in_a_child_reports_a_plausible_peak(tiny_model_dir, tmp_path):
    from dpokit.train.memory_probe import run_probe

    cfg, data = _run_data(tiny_model_dir, tmp_path, 8, seed=5)
    probe = run_probe(cfg, data, Setting(2, ("gradient_checkpointing",)), 2)
    # A Python process with torch and transformers imported holds ~200 MB or more; the tiny model a few MB.
    assert 100 * MB < probe.peak < 4 * 2**30 and probe.seconds > 0
    assert not (tmp_path / "out").exists()  # the probe writes nothing of the run's
    # The scoring path it took: one layout, settled as the run settles it (Llama: a packed one).
    assert probe.scoring["layouts"] in (["packed"], ["prefix-shared"])


class _Abort:
    """Unpickled in a probe: the probe dies by a signal, as under the out-of-memory killer."""

    def __reduce__(self):
        import os

        return (os.abort, ())


def test_a_probe_killed_by_a_signal_reads_as_over_and_the_server_serves_on(tiny_model_dir, tmp_path):
    import pickle
    import signal

    from dpokit.train.memory_probe import ProbeServer, run_probe

    cfg, data = _run_data(tiny_model_dir, tmp_path, 8, seed=9)
    spec = tmp_path / "killed.pkl"
    spec.write_bytes(pickle.dumps({"config": _Abort()}))
    with ProbeServer() as server:
        status, _peak = server.run(spec, tmp_path / "killed.json", tmp_path / "killed.log")
        assert status == -signal.SIGABRT and not (tmp_path / "killed.json").exists()
        serving = server.process.pid
        probe = run_probe(cfg, data, Setting(2), 2, server)
        assert server.process.pid == serving and 100 * MB < probe.peak < 4 * 2**30
    assert server.process is None  # closed with the block


def test_the_probe_takes_the_runs_step_without_its_set_up_work(tiny_model_dir, tmp_path, monkeypatch):
    """In the child: no reference pass, no first-batch check (set-up work, not the step); the
    layout the run's own scorer settles on for the same data and micro-batch."""
    import torch

    import dpokit.scoring
    from dpokit.train.distributed import Distributed
    from dpokit.train.memory_probe import longest_pairs, probe_step, scoring_path
    from dpokit.train.setup import build_run_scorer, load_run_policy, load_run_tokenizer

    cfg, data = _run_data(tiny_model_dir, tmp_path, 12, seed=8, batch_size=4)

    def refused(*_args, **_kwargs):
        raise AssertionError("a probe ran the run's set-up work")

    with monkeypatch.context() as patched:
        patched.setattr(dpokit.scoring, "precompute_reference", refused)
        patched.setattr(dpokit.scoring, "check_first_batch", refused)
        found = probe_step(cfg, data, longest_pairs(data.train_pairs, 4), accumulating=False)
    assert found["seconds"] > 0 and found["rss_peak"] > 0
    # The run's own scorer for the same config and data (its set-up work done), and its path.
    ctx, cpu, quiet = Distributed(), torch.device("cpu"), lambda _line: None
    policy, weights = load_run_policy(model=cfg.model, lora=cfg.lora, loss=cfg.loss, scale=cfg.scale,
                                      device=cpu, ctx=ctx)
    run_scorer = build_run_scorer(policy, load_run_tokenizer(model=cfg.model, data=cfg.data, log=quiet), data, cfg,
                                  reference_weights=weights, device=cpu, ctx=ctx, log=quiet, output=tmp_path / "run",
                                  reference_cache=None)
    assert found["scoring"] == scoring_path(run_scorer)


def test_a_run_moved_off_the_probed_path_stops_before_its_first_step(tok, pairs, tmp_path, monkeypatch):
    """The probe skips the first-batch check; a run that check moves to padded rows and the plain
    head (full logits: more memory than probed) stops in one line, naming the fix."""
    import torch

    import dpokit.model.attention
    import dpokit.model.capability
    from dpokit.model.layout_guard import check_first_batch
    from dpokit.scoring import PairScorer
    from dpokit.train.memory_plan import MemoryPlan
    from dpokit.train.memory_probe import scoring_path
    from helpers.families import build_family

    # Mistral with its sliding window hidden from the masks: the check will fall back to padded + plain.
    monkeypatch.setattr(dpokit.model.capability, "applied_windows", lambda model: {dpokit.model.attention.FULL: None})
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d.jsonl"}, "train": {"output": "o"}})
    scorer = PairScorer(build_family("mistral", tok, "sdpa"), loss=cfg.loss, speed=cfg.speed, dtype="fp32",
                        pad_id=tok.pad_token_id, device=torch.device("cpu"))
    scorer.settle_layout([pairs])
    plan = MemoryPlan(budget=2**30, budget_text="1GiB", requested=4, micro_batch=4, levers=[], peak=2**29,
                      margin=0.3, probe_seconds=1.0, scoring=scoring_path(scorer))
    memory_budget.check_probed_path(plan, scorer)  # the path probed: the run goes on
    memory_budget.check_probed_path(None, scorer)  # no plan
    check_first_batch(scorer, pairs, tmp_path, lambda _line: None)
    assert scorer.layouts == ["padded"]
    with pytest.raises(DpokitError, match=r"^--memory-budget: the plan was probed with layout (packed|prefix-shared), "
                       r"and the first-batch check moved this run to padded with the plain LM head.*"
                       r"--layout padded --lm-head plain"):
        memory_budget.check_probed_path(plan, scorer)


def test_data_inspect_prints_the_plan_without_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(16, seed=6))
    monkeypatch.setattr(memory_budget, "run_probe", lambda cfg, data, s, requested, server: fake_probe()(s))
    args = ["data", "inspect", str(data), "--model", str(tiny_model_dir), "--max-length", "32", "--batch-size", "8"]
    assert main([*args, "--memory-budget", "1250MB"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "memory plan: micro-batch 4 x accumulation 2 (global 8), no memory lever; probed peak 0.75 GiB")  # 800 MB
    assert main(["data", "inspect", str(data), "--memory-budget", "1000MB"]) == 2  # a plan needs the model
    assert "--memory-budget needs --model" in capsys.readouterr().err


def test_checkpointing_supersedes_selective_recompute_in_the_levels_probed():
    # Offered cheapest first: selective recompute, then checkpointing, which recomputes what it keeps.
    sel, ckpt = ("selective_recompute",), ("gradient_checkpointing",)
    seen = []
    probe = fake_probe(per_pair={(): 150, sel: 100, ckpt: 50}, ratio={(): 1.0, sel: 1.05, ckpt: 1.3}, log=seen)
    # Limit 360 MB: (1, none) 350 at 16 s a step; (1, selective) 300 at 16.8; (2, checkpointing) 300 at 15.6.
    setting, _ = choose_setting(8, ["selective_recompute", "gradient_checkpointing"], 400 * MB, probe, margin=0.1)
    assert Setting(1, sel) in seen and Setting(1, ckpt) in seen  # never the two together
    assert all(s.levers in ((), sel, ckpt) for s in seen) and setting == Setting(2, ckpt)
    # Limit 630 MB: (4, selective) 600 MB at 2 x 5 x 1.05 = 10.5 s beats (2, none) at 12 s and
    # (8, checkpointing) at 9 x 1.3 = 11.7 s.
    setting, _ = choose_setting(8, ["selective_recompute", "gradient_checkpointing"], 700 * MB,
                                fake_probe(per_pair={(): 150, sel: 100, ckpt: 50},
                                           ratio={(): 1.0, sel: 1.05, ckpt: 1.3}), margin=0.1)
    assert setting == Setting(4, sel)


def test_a_planned_level_sets_the_run_options_it_names(tiny_model_dir, tmp_path):
    from dpokit.train.memory_plan import offered_levers, planned_config

    cfg, _ = _run_data(tiny_model_dir, tmp_path, 8, seed=5)
    assert offered_levers(cfg, "cpu", malloc_auto_fixes=False)[:2] == ["selective_recompute", "gradient_checkpointing"]
    sel = planned_config(cfg, Setting(1, ("selective_recompute",)), 2).scale
    ckpt = planned_config(cfg, Setting(1, ("gradient_checkpointing",)), 2).scale
    assert (sel.selective_recompute, sel.gradient_checkpointing) == (True, False)
    assert (ckpt.selective_recompute, ckpt.gradient_checkpointing) == (False, True)
    cfg.scale.selective_recompute = True  # asked for: offered no more, and checkpointing replaces it when pulled
    assert "selective_recompute" not in offered_levers(cfg, "cpu", malloc_auto_fixes=False)
    ckpt = planned_config(cfg, Setting(1, ("gradient_checkpointing",)), 2).scale
    assert (ckpt.selective_recompute, ckpt.gradient_checkpointing) == (False, True)
    cfg.scale.selective_recompute, cfg.speed.compile = False, True  # refused together: never offered
    assert offered_levers(cfg, "cpu", malloc_auto_fixes=False)[:1] == ["gradient_checkpointing"]


def test_a_model_that_refuses_selective_recompute_makes_that_level_fit_nothing(tok, tmp_path):
    # Falcon changes a kept matmul output in place (model/recompute.py): the plan's probe of the
    # lever reads as over any budget, so the plan moves on; asked for by the user, it is the run's error.
    from dpokit.train.memory_probe import run_probe
    from helpers.families import build_family

    folder = tmp_path / "falcon"
    build_family("falcon", tok, "sdpa").save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg, data = _run_data(folder, tmp_path, 8, seed=5)
    assert run_probe(cfg, data, Setting(1, ("selective_recompute",)), 2).peak is None
    cfg.scale.selective_recompute = True
    with pytest.raises(DpokitError, match="^--selective-recompute: this model's layers change"):
        run_probe(cfg, data, Setting(1), 2)
