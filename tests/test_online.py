"""Online DPO: pairing rules, the fixed reference, and `dpokit online` for two tiny rounds."""

import json
import math

import pytest
import yaml

from dpokit.cli import main
from dpokit.config import build_config
from dpokit.errors import DpokitError
from dpokit.experiments.online import preference_pairs
from dpokit.train.loop import train
from helpers.toy import make_pairs, save_tiny_model, write_jsonl


def test_best_worst_pairs_the_top_score_over_the_bottom_one():
    rows, stats = preference_pairs(["p"], [["a", "b", "c", "d"]], [[0.5, -0.2, 0.9, 0.1]], "best_worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("c", "b")]
    assert (rows[0]["score_chosen"], rows[0]["score_rejected"]) == (0.9, -0.2)
    assert stats == {"pairs": 1, "skipped": {"tied_scores": 0, "identical": 0}}


def test_all_pairs_skip_ties_and_identical_texts():
    # Scores 0.5, 0.5, 0.1: (a, b) tie; a > c and b > c give two pairs. Then a prompt whose
    # two samples are the same text with different scores cannot happen, but equal text with
    # equal score is a tie; identical text with different scores is skipped as identical.
    rows, stats = preference_pairs(["p", "q"], [["a", "b", "c"], ["x", "x"]], [[0.5, 0.5, 0.1], [0.3, 0.2]], "all")
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows) == [("p", "a", "c"), ("p", "b", "c")]
    assert stats["skipped"] == {"tied_scores": 1, "identical": 1}


def test_message_prompts_give_conversational_rows_and_bad_pairing_fails():
    prompt = [{"role": "user", "content": "hi"}]
    rows, _ = preference_pairs([prompt], [["good", "bad"]], [[1.0, -1.0]])
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "good"}] and rows[0]["prompt"] == prompt
    with pytest.raises(DpokitError, match="--pairing must be one of"):
        preference_pairs(["p"], [["a", "b"]], [[1.0, 0.0]], "some")


def _first_loss(model, reference, data, out):
    cfg = build_config({"model": {"model": str(model), "reference_model": reference and str(reference)},
                        "data": {"data": str(data), "max_length": 32},
                        "train": {"output": str(out), "learning_rate": 1e-3, "batch_size": 8, "max_steps": 1,
                                  "progress": "off"}})
    return train(cfg, log=lambda _: None).history[0]["loss"]


def test_reference_model_replaces_the_copy_of_the_policy(tiny_model_dir, toy_data, tmp_path):
    # Policy == reference gives every pair the loss ln 2 at the first step; another reference does not.
    other = save_tiny_model(tmp_path / "other", seed=1)
    train_file, _ = toy_data
    assert _first_loss(tiny_model_dir, None, train_file, tmp_path / "a") == pytest.approx(math.log(2), abs=1e-6)
    assert _first_loss(tiny_model_dir, tiny_model_dir, train_file, tmp_path / "b") == pytest.approx(math.log(2),
                                                                                                     abs=1e-6)
    assert abs(_first_loss(tiny_model_dir, other, train_file, tmp_path / "c") - math.log(2)) > 1e-3


def test_online_command_two_tiny_rounds(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in make_pairs(8, seed=5)])
    held_out = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": r["prompt"]} for r in make_pairs(4, seed=6)])
    out = tmp_path / "online"
    code = main(["online", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--eval-prompts",
                 str(held_out), "--judge", "sentiment", "--rounds", "2", "--samples-per-prompt", "4",
                 "--output", str(out), "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3",
                 "--max-new-tokens", "6", "--num-samples", "2", "--max-length", "32", "--progress", "off"])
    assert code == 0
    summary = json.loads((out / "online.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [p["run"] for p in summary["points"]] == ["reference", "round-1", "round-2"]
    assert summary["rounds"][1]["policy_sampled"] == str(out / "round-1")
    for number in (1, 2):
        # Each round trains from the previous policy; the reference stays the starting model.
        saved = yaml.safe_load((out / f"round-{number}" / "dpokit_config.yaml").read_text())["model"]
        assert saved["model"] == (str(tiny_model_dir) if number == 1 else str(out / "round-1"))
        assert saved["reference_model"] == str(tiny_model_dir)
        rows = [json.loads(line) for line in (out / "pairs" / f"round-{number}.jsonl").read_text().splitlines()]
        assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
        assert all(r["chosen_ids"] and r["rejected_ids"] and r["prompt_ids"] for r in rows)  # trained verbatim
        assert len(rows) <= 8  # best over worst: at most one pair per prompt
        assert (out / f"round-{number}" / "evaluation.json").is_file()
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "round" in capsys.readouterr().out


def test_the_frontier_samples_with_the_runs_chat_template_kwargs(tiny_model_dir, tmp_path):
    from dpokit.config import JudgeConfig, SamplingConfig
    from dpokit.experiments.frontier import FrontierRunner

    base = build_config({"model": {"model": str(tiny_model_dir)},
                         "data": {"data": "d.jsonl", "chat_template_kwargs": '{"enable_thinking": false}'},
                         "train": {"output": str(tmp_path)}})
    runner = FrontierRunner.load(base, JudgeConfig(judge="sentiment"), SamplingConfig(), root=tmp_path, prompts=["a"],
                                 reference=str(tiny_model_dir))
    assert runner.sampler.template_kwargs == {"enable_thinking": False}  # what training renders chat rows with
