"""What a new user meets following the README (issue 22): metrics that read right, skipped steps
that are logged, errors that name the right thing, files with the usual modes, quiet pipes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpokit import scoring
from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.experiments.demo.bundled import base_model_dir
from dpokit.losses import LossOutput
from dpokit.metrics import PairMetrics
from dpokit.model.logprobs import PairLogps
from dpokit.train import checkpoint as ckpt
from dpokit.train import loop, metrics_window, setup, step
from helpers.toy import GLOOMY, OPENERS, UPBEAT, make_pairs, write_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"


def _config(model_dir, data, out, eval_data=None, **train):
    section = {"output": str(out), "learning_rate": 1e-3, "batch_size": 4, "max_steps": 3, "progress": "off",
               **train}
    data_section = {"data": str(data), "max_length": 32}
    if eval_data:
        data_section["eval_data"] = str(eval_data)
    return build_config({"model": {"model": str(model_dir)}, "data": data_section, "train": section})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("walk")
    return write_jsonl(folder / "t.jsonl", make_pairs(12, seed=3)), write_jsonl(folder / "e.jsonl", make_pairs(8, seed=4))


# --- item 3: throughput is training time; ties at the start are ties -----------------------------


def test_throughput_leaves_out_evaluation_and_saving(tiny_model_dir, small_data, tmp_path, monkeypatch):
    # The metrics clock jumps 1000 s during each evaluation and each checkpoint save; a window
    # that counted them could not reach 4 pairs / 1000 s.
    clock = {"offset": 0.0}
    monkeypatch.setattr(metrics_window, "time", SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + clock["offset"]))

    def jumping(real):
        def wrapper(*args, **kwargs):
            clock["offset"] += 1000.0
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(scoring.PairScorer, "evaluate", jumping(scoring.PairScorer.evaluate))
    monkeypatch.setattr(ckpt, "save_checkpoint", jumping(ckpt.save_checkpoint))
    out = tmp_path / "run"
    loop.train(_config(tiny_model_dir, small_data[0], out, small_data[1], eval_every=1, save_every=1),
               log=lambda _: None)
    steps = [r for r in _records(out) if "throughput/pairs_per_s" in r]
    assert len(steps) == 3 and clock["offset"] >= 4000  # evaluated and saved after steps 1 and 2
    assert all(r["throughput/pairs_per_s"] > 0.04 for r in steps), [r["throughput/pairs_per_s"] for r in steps]


def _pairs_of_varied_lengths(n: int, seed: int) -> list[dict]:
    """Prompts and responses of 3-18 words: batches of different widths and packings."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(OPENERS) + " was" + " very" * rng.randint(0, 6),
             "chosen": " " + " ".join(rng.choice(UPBEAT) for _ in range(rng.randint(1, 12))),
             "rejected": " " + " ".join(rng.choice(GLOOMY) for _ in range(rng.randint(1, 12)))} for _ in range(n)]


@pytest.mark.parametrize("layout", ["packed", "prefix-shared"])  # padded agreed exactly here already
def test_policy_equal_to_reference_reads_as_ties_in_the_packed_layouts(tmp_path, layout):
    # The demo's model: the cached reference (one pass at twice the batch size) and the policy's
    # passes in batches of 8 differ by float32 rounding (before: step-0 held-out accuracy 0.25
    # packed, 0.0625 prefix-shared).
    rows = _pairs_of_varied_lengths(32, seed=0)
    data, held_out = write_jsonl(tmp_path / "d.jsonl", rows[:16]), write_jsonl(tmp_path / "e.jsonl", rows[16:])
    cfg = _config(base_model_dir(), data, tmp_path / "run", held_out, max_steps=1, batch_size=8, eval_every=1)
    cfg.data.max_length, cfg.speed.layout = 64, layout
    result = loop.train(cfg, log=lambda _: None)
    step0, step1 = result.history[0], result.history[1]
    assert step0["step"] == 0 and step0["eval_rewards/accuracies"] == 0.0
    assert step1["step"] == 1 and step1["rewards/accuracies"] == 0.0
    assert abs(step1["rewards/margins"]) < 1e-4  # the margins themselves are noise, not learning


def test_a_margin_beyond_float_noise_counts_as_a_win():
    """Catches: a tie tolerance scaled wrong (metrics.py's TIE_ROUNDOFF_UNITS x 4096, or / 4096): the
    tolerance is written out by hand, not recomputed from the constants under test."""
    logps = PairLogps(chosen_logps=torch.tensor([-50.0, -50.0, -50.0]),
                      rejected_logps=torch.tensor([-50.0, -50.0, -50.0]),
                      chosen_lengths=torch.tensor([10, 10, 10]), rejected_lengths=torch.tensor([10, 10, 10]))
    beta = 0.1
    # β x 64 units of float32 roundoff (2**-24) x 2 x (|-50| + |-50|) = 0.1 x 64 x 200 / 16777216
    tolerance = 7.62939453125e-05
    margins = torch.tensor([0.0, 0.5 * tolerance, 2 * tolerance])
    out = LossOutput(losses=torch.zeros(3), chosen_rewards=margins, rejected_rewards=torch.zeros(3))
    metrics = PairMetrics(beta)
    metrics.add(out, logps)
    assert metrics.compute()["rewards/accuracies"] == pytest.approx(1 / 3)


# --- items 4 and 5: skipped and non-finite steps say what happened ------------------------------


def test_fp16_step_skipped_by_the_loss_scaler_is_logged_and_counted(tiny_model_dir, small_data, tmp_path,
                                                                    monkeypatch, recwarn):
    # A first loss scale of 2**40 overflows fp16 gradients for sure; the backoff brings it to 2**10.
    monkeypatch.setattr(setup, "grad_scaler", lambda device, dtype, ctx: torch.amp.GradScaler(
        device.type, init_scale=2.0**40, backoff_factor=2.0**-30, enabled=dtype == "fp16"))
    out, lines = tmp_path / "fp16", []
    cfg = _config(tiny_model_dir, small_data[0], out)
    cfg.model.dtype = "fp16"
    result = loop.train(cfg, log=lines.append)
    assert result.nonfinite_skipped == 1
    assert any(line.startswith("step 1: the fp16 gradient overflowed") for line in lines), lines
    records = _records(out)
    assert records[0] == {"step": 1, "epoch": records[0]["epoch"], "skipped": "fp16_gradient_overflow",
                          "loss_scale": 1024.0}
    assert [r["step"] for r in records if "loss" in r] == [2, 3]
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_a_non_finite_gradient_is_not_called_a_non_finite_loss(tiny_model_dir, small_data, tmp_path, monkeypatch):
    real = step.clip_grad_norm

    def overflowing(params, max_norm):
        return real(params, max_norm) * float("inf")

    monkeypatch.setattr(step, "clip_grad_norm", overflowing)
    with pytest.raises(DpokitError, match=r"step 1: non-finite gradient \(norm inf; the loss [0-9.]+ is finite\)"):
        loop.train(_config(tiny_model_dir, small_data[0], tmp_path / "run"), log=lambda _: None)


# --- item 14: every published file gets the usual mode ----------------------------------------


def test_checkpoint_and_final_weights_are_written_with_the_usual_mode(tiny_model_dir, small_data, tmp_path):
    old = os.umask(0o022)
    try:
        loop.train(_config(tiny_model_dir, small_data[0], tmp_path / "run", max_steps=2, save_every=1),
                   log=lambda _: None)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" and "checkpoints" in p.parts for p in files)
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o644} == {}


# --- item 10: a reader that goes away is a normal end -------------------------------------------


def test_a_closed_pipe_is_a_quiet_normal_exit(small_data):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "data", "inspect", str(small_data[0])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head` that has read what it wanted, before dpokit writes
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert stderr == ""


# --- item 2: a causal LM is not a judge ---------------------------------------------------------


def test_a_causal_lm_given_as_judge_is_refused_naming_the_missing_head(tiny_model_dir):
    from dpokit.eval.judges import load_judge

    with pytest.raises(DpokitError, match=r"lack the scoring head \(score\.weight missing\)"):
        load_judge(str(tiny_model_dir))


# --- item 7: a run names its models from any directory -----------------------------------------


def test_a_run_trained_from_a_relative_model_path_evaluates_and_exports_from_elsewhere(
        tiny_model_dir, small_data, tmp_path, monkeypatch):
    import yaml

    from dpokit.config import ModelConfig
    from dpokit.eval.evaluate import evaluate_models
    from dpokit.model.export import export_model

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    relative = os.path.relpath(tiny_model_dir, work)
    loop.train(_config(relative, small_data[0], "runs/a", max_steps=1), log=lambda _: None)
    saved = yaml.safe_load((work / "runs" / "a" / "dpokit_config.yaml").read_text())
    assert saved["model"]["model"] == str(Path(tiny_model_dir).resolve())

    monkeypatch.chdir(elsewhere)
    run = str(work / "runs" / "a")
    result = evaluate_models(ModelConfig(model=run), data={"data": str(small_data[1]), "max_length": 32},
                             log=lambda _: None)
    assert result["reference"] == str(Path(tiny_model_dir).resolve())
    assert export_model(run, elsewhere / "exported", merge=False).is_dir()


# --- item 12: one option name, one meaning --------------------------------------------------------


def test_evaluate_reference_model_is_the_reference_and_the_old_spelling_says_so(trained_run, toy_data, capsys):
    from dpokit.cli import main

    args = ["evaluate", "--model", str(trained_run), "--data", str(toy_data[1]), "--max-length", "32", "--json"]
    assert main([*args, "--reference-model", str(trained_run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == str(trained_run)
    assert result["preferences"]["rewards/margins"] == 0.0  # the policy against itself
    assert main([*args, "--reference", str(trained_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"use --reference-model {trained_run}" in err[0], err


def _help(*command: str) -> str:
    from dpokit.cli import build_parser

    parser = build_parser()
    for action in parser._subparsers._group_actions:
        parser = action.choices[command[0]]
    return " ".join(parser.format_help().split())


def test_help_lists_only_what_each_command_uses():
    from dpokit.experiments.demo.sentiment import settings_for

    sample = _help("sample")
    assert "--reference-model" not in sample and "loss scaling" not in sample and "--dtype" in sample
    assert "--reference-model" in _help("evaluate")
    full_betas = len(settings_for("full").betas)
    assert full_betas == 5 and "five β" in _help("demo")


def test_sweep_trains_a_combined_loss(tiny_model_dir, small_data, tmp_path):
    import yaml

    from dpokit.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the film"}, {"prompt": "the plot"}])
    out = tmp_path / "sweep"
    code = main(["sweep", "--beta", "0.1", "--loss", "sigmoid,sft", "--loss-weights", "1,0.5", "--model",
                 str(tiny_model_dir), "--data", str(small_data[0]), "--output", str(out), "--max-steps", "1",
                 "--batch-size", "4", "--max-length", "32", "--prompts", str(prompts), "--judge", "sentiment",
                 "--num-samples", "1", "--max-new-tokens", "2", "--progress", "off"])
    assert code == 0
    saved = yaml.safe_load((out / "sigmoid+sft-beta0.1" / "dpokit_config.yaml").read_text())
    assert saved["loss"]["loss"] == ["sigmoid", "sft"] and saved["loss"]["loss_weights"] == [1.0, 0.5]


# --- item 13: train and the data doctor agree, and say only what holds ---------------------------


def _rows_file(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    return write_jsonl(path, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])


def test_train_warns_about_glued_prompt_and_response_text_like_the_doctor(tiny_model_dir, tmp_path):
    from dpokit.config import DataConfig
    from dpokit.data import PairTokenizer, load_tokenized_pairs
    from dpokit.data.doctor import format_report, inspect_data
    from dpokit.model.load import load_tokenizer

    data = _rows_file(tmp_path / "glued.jsonl", [("the film was", "great", "dull"), ("the plot", " fun", " flat"),
                                                 ("the cast", "warm", " bleak")])
    lines = []
    load_tokenized_pairs(str(data), PairTokenizer.from_config(load_tokenizer(str(tiny_model_dir)), DataConfig()),
                         lines.append)
    warning = "warning: 2 rows have no whitespace between prompt and response"
    assert any(warning in line for line in lines), lines
    assert warning in format_report(inspect_data(str(data), DataConfig()))


def test_doctor_names_verbosity_only_when_chosen_answers_are_longer(tmp_path):
    from dpokit.config import DataConfig
    from dpokit.data.doctor import format_report, inspect_data
    from helpers.toy import build_tokenizer

    longer_rejected = _rows_file(tmp_path / "r.jsonl", [("the film", " fun", " dull and flat"),
                                                        ("the plot", " great", " bleak so grim")])
    text = format_report(inspect_data(str(longer_rejected), DataConfig(), tokenizer=build_tokenizer("word")))
    assert "rejected longer 100.0%" in text and "learn verbosity" not in text
    assert "length None" not in text
    assert "long prompts cut (keep_end) so responses keep --min-response-share 0.25" in text
    never = format_report(inspect_data(str(longer_rejected), DataConfig(min_response_share=0),
                                       tokenizer=build_tokenizer("word")))
    assert "prompts are never cut: no --max-prompt-length, --min-response-share 0" in never
    longer_chosen = _rows_file(tmp_path / "c.jsonl", [("the film", " fun and warm", " dull")])
    assert "(DPO can learn verbosity from this)" in format_report(inspect_data(str(longer_chosen), DataConfig()))


def test_an_eval_set_with_no_usable_row_counts_the_rows_it_read(tiny_model_dir, small_data, tmp_path):
    same = _rows_file(tmp_path / "same.jsonl", [("the film", " fun", " fun"), ("the plot", " dull", " dull")])
    lines = []
    with pytest.raises(DpokitError, match=r"same\.jsonl: no usable pairs \(0/2 pairs kept"):
        loop.train(_config(tiny_model_dir, small_data[0], tmp_path / "run", same), log=lines.append)
    assert not [line for line in lines if "0/0" in line]


# --- item 6: LoRA run folders work wherever a model is taken ------------------------------------


def test_a_lora_run_folder_samples_evaluates_and_reports(tiny_model_dir, small_data, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpokit.cli import main
    from dpokit.model.load import load_policy

    run = tmp_path / "lora"
    cfg = _config(tiny_model_dir, small_data[0], run, max_steps=2, learning_rate=1e-2)
    cfg.lora.lora_r, cfg.lora.lora_alpha = 4, 8.0
    loop.train(cfg, log=lambda _: None)
    assert not (run / "config.json").exists()

    merged = load_policy(str(run), torch.device("cpu")).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run)).eval()
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the film"}])
    assert main(["sample", "--model", str(run), "--prompt", "the film", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--data", str(small_data[1]), "--max-length", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == str(Path(tiny_model_dir).resolve())  # the base, from the run's config
    assert result["preferences"]["rewards/margins"] != 0.0  # the adapter is in the policy
    assert main(["report", str(run), "--prompts", str(prompts), "--max-new-tokens", "3"]) == 0
    assert (run / "samples.json").is_file()


# --- item 11: a stop signal under torchrun ends like a single process ------------------------------


@pytest.mark.slow
def test_sigterm_to_the_launcher_prints_the_resume_line_once_and_exits_143(tiny_model_dir, tmp_path):
    import signal

    from dpokit.train.checkpoint import list_checkpoints

    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(64, seed=5))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dpokit.cli.torchrun", "--standalone", "--nproc-per-node", "2", "-m", "dpokit",
           "train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps", "200",
           "--batch-size", "2", "--max-length", "32", "--progress", "off", "--save-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 180
    while not list_checkpoints(out) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler or `kill` would
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 143, output[-3000:]
    assert output.count("SIGTERM received: stopped after step") == 1, output[-3000:]
    assert "--resume auto" in output and "Traceback" not in output, output[-3000:]


# --- item 16: the README's torchrun commands run as written after `make demo` ---------------------


def test_readme_torchrun_commands_use_the_venv():
    root = Path(__file__).resolve().parents[1]
    blocks = [block for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
              for block in doc.read_text(encoding="utf-8").split("```")[1::2]]
    launches = [line.strip() for block in blocks for line in block.splitlines() if "torchrun " in line
                and not line.strip().startswith("#")]
    assert launches, "the README or docs/ show a torchrun launch"
    assert all(line.startswith((".venv/bin/torchrun ", ".venv/bin/dpokit-torchrun ")) for line in launches), launches


# --- item 15: the demo's picture and the README say the same ---------------------------------------


def test_frontier_draws_each_method_as_the_upper_envelope_of_its_checkpoints(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from dpokit.eval.report import plot_frontier

    drawn = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append((list(a[0]), list(a[1]), k)) or
                        real_plot(self, *a, **k))
    points = [{"method": "reference", "beta": None, "reward": 0.2, "kl": 0.0},
              {"method": "DPO", "beta": 1.0, "reward": 0.45, "kl": 1.0, "run_name": "b1", "step": 10, "final": False},
              {"method": "DPO", "beta": 1.0, "reward": 0.6, "kl": 4.0, "run_name": "b1", "step": 20, "final": True},
              {"method": "DPO", "beta": 0.1, "reward": 0.3, "kl": 2.0, "run_name": "b01", "step": 10, "final": False},
              {"method": "DPO", "beta": 0.1, "reward": 0.7, "kl": 10.0, "run_name": "b01", "step": 20, "final": True},
              {"method": "Preferred-FT", "beta": None, "reward": 0.4, "kl": 3.0, "run_name": "ft", "step": 20,
               "final": True, "label": "20 steps"},
              {"method": "online DPO", "beta": 1.0, "reward": 0.8, "kl": 9.0, "label": "round 2"},
              {"method": "online DPO", "beta": 1.0, "reward": 0.6, "kl": 4.0, "label": ""}]
    plot_frontier(points, tmp_path / "f.png", envelopes=("DPO", "Preferred-FT"))
    lines = {(tuple(x), tuple(y)) for x, y, _ in drawn}
    # Each run along its training, in step order; each method's frontier from the star, thick.
    assert ((1.0, 4.0), (0.45, 0.6)) in lines and ((2.0, 10.0), (0.3, 0.7)) in lines
    thick = [(x, y) for x, y, k in drawn if k.get("linewidth", 0) > 2]
    # DPO: (2, 0.3) lies under the hull; Preferred-FT: one point, straight from the star.
    assert thick == [([0.0, 1.0, 4.0, 10.0], [0.2, 0.45, 0.6, 0.7]), ([0.0, 3.0], [0.2, 0.4])]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_demo_options_match_the_presets():
    from dpokit.experiments.demo.sentiment import settings_for

    demo_doc = Path(__file__).resolve().parents[1] / "docs" / "demo.md"
    readme = " ".join(demo_doc.read_text(encoding="utf-8").split())
    quick, full = settings_for("quick"), settings_for("full")
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    assert (f"`--quick`: a smoke version ({quick.train_prompts} training and {quick.eval_prompts} held-out prompts, "
            f"{quick.max_new_tokens} new tokens, one β ({quick.betas[0]:g}), {quick.steps} steps, a checkpoint every "
            f"{quick.checkpoint_every}, {words[quick.online_rounds - 1]} online round after the offline one)" in readme
            and len(quick.betas) == 1)
    assert (f"`--full`: {full.train_prompts} prompts × {full.samples_per_prompt} samples, {full.max_new_tokens} new "
            f"tokens, {words[len(full.betas)]} β ({', '.join(f'{b:g}' for b in full.betas)}), {full.steps} steps, "
            f"{words[full.online_rounds]} rounds counting the offline β = {full.online_beta:g} run "
            f"({words[full.online_rounds - 1]} online rounds of {full.online_steps} steps), a checkpoint every "
            f"{full.checkpoint_every} steps, {full.eval_prompts} held-out prompts × {full.eval_samples} samples"
            in readme)
    assert "the upper envelope of its points" in readme  # as frontier.png draws it (plot_frontier's envelopes)
