"""Run records users read outside dpokit: the model card, `dpokit runs`, and the Hub push checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from dpokit import cli, hub
from dpokit.errors import DpokitError
from dpokit.model_card import hub_id, write_model_card
from dpokit.runinfo import find_runs, read_run, write_run_summary


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _fake_run(folder: Path, *, model: str, data: str, loss, beta: float, losses: list[float]) -> Path:
    folder.mkdir(parents=True)
    config = {"model": {"model": model}, "data": {"data": data}, "loss": {"loss": loss, "beta": beta},
              "train": {"learning_rate": 1e-6}}
    (folder / "dpokit_config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps({"step": i + 1, "loss": value, "rewards/accuracies": 0.5}) for i, value in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_read_run_takes_the_last_records_of_metrics(trained_run):
    records = _metrics(trained_run)
    last_train = [r for r in records if "loss" in r][-1]
    last_eval = [r for r in records if "eval_loss" in r][-1]
    row = read_run(trained_run).row()
    assert row["steps"] == last_train["step"] == 16
    assert row["loss_final"] == last_train["loss"]
    assert row["reward_accuracy"] == last_train["rewards/accuracies"]
    assert row["eval_loss"] == last_eval["eval_loss"]
    assert row["beta"] == 0.1 and row["judged_reward"] is None
    assert row["wall_s"] > 0  # training wrote run_summary.json


def test_training_leaves_a_model_card_and_the_data_counts(trained_run):
    card = ModelCard.load(trained_run / "README.md")
    assert card.data.library_name == "transformers" and "dpo" in card.data.tags
    summary = json.loads((trained_run / "run_summary.json").read_text())
    assert summary["data"]["rows_read"] == 64 and summary["data"]["pairs_kept"] == 64
    assert "| rows_read | 64 |" in card.text


def test_push_to_hub_offline_is_refused_before_training(tiny_model_dir, toy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output",
                     str(tmp_path / "run"), "--max-steps", "1", "--push-to-hub", "me/my-model"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("dpokit: error: --push-to-hub me/my-model: the Hub is switched off here")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_model_card_of_a_trained_run_parses_with_the_hub_reader(trained_run, tmp_path):
    write_run_summary(tmp_path, wall_seconds=12.5, data={"rows_read": 64, "pairs_kept": 63,
                                                         "skipped": {"identical": 1}})
    card_path = write_model_card(tmp_path, run_folder=trained_run, name="toy-dpo")
    card = ModelCard.load(card_path)  # the Hub's own parser: front matter and text
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"dpo", "dpokit", "loss-sigmoid"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is not a Hub model id
    last = [r for r in _metrics(trained_run) if "loss" in r][-1]
    assert f"| loss | {last['loss']:.6g} |" in card.text
    assert "Held-out figures (step 16)" in card.text
    assert "rafailov2023direct" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/toy-dpo")' in card.text  # not a bare name


def test_model_card_names_hub_model_and_dataset(tmp_path):
    run = _fake_run(tmp_path / "run", model="Qwen/Qwen2-0.5B", data="trl-lib/ultrafeedback_binarized:train",
                    loss=["sigmoid", "sft"], beta=0.1, losses=[0.69, 0.5])
    (run / "run_summary.json").write_text(json.dumps({"wall_seconds": 3.0, "data": {"rows_read": 10, "pairs_kept": 9,
                                                                                    "skipped": {"identical": 1}}}))
    card = ModelCard.load(write_model_card(run))
    assert card.data.base_model == "Qwen/Qwen2-0.5B"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert {"loss-sigmoid", "loss-sft"} <= set(card.data.tags)
    assert "| skipped: identical | 1 |" in card.text and "| loss | sigmoid, sft |" in card.text


def test_hub_id_tells_hub_names_from_paths(tmp_path):
    assert hub_id("gpt2") == "gpt2" and hub_id("org/name:test") == "org/name"
    assert hub_id(str(tmp_path)) is None and hub_id("./x") is None and hub_id("a/b/c") is None


def test_runs_lists_a_sweep_root_sorted(tmp_path, capsys):
    root = tmp_path / "sweep"
    _fake_run(root / "sigmoid-beta0.1", model="m", data="d.jsonl", loss="sigmoid", beta=0.1, losses=[0.7, 0.4])
    _fake_run(root / "sigmoid-beta0.5", model="m", data="d.jsonl", loss="sigmoid", beta=0.5, losses=[0.7, 0.6])
    _fake_run(root / "ipo-beta0.1", model="m", data="d.jsonl", loss="ipo", beta=0.1, losses=[0.9, 0.2])
    (root / "frontier.csv").write_text("run\n")
    assert [p.name for p in find_runs([root])] == ["ipo-beta0.1", "sigmoid-beta0.1", "sigmoid-beta0.5"]
    assert cli.main(["runs", str(root), "--sort", "loss_final", "--reverse", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["run"]).name for r in rows] == ["sigmoid-beta0.5", "sigmoid-beta0.1", "ipo-beta0.1"]
    assert [r["loss_final"] for r in rows] == [0.6, 0.4, 0.2]
    assert cli.main(["runs", str(root), "--sort", "beta"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "model", "loss", "β"]
    assert "KL" not in table[0]  # no run was evaluated: the column is left out
    assert [line.split()[0].rsplit("/", 1)[-1] for line in table[2:]] == ["ipo-beta0.1", "sigmoid-beta0.1",
                                                                         "sigmoid-beta0.5"]


def test_runs_refuses_what_is_not_a_run_folder(tmp_path, capsys):
    assert cli.main(["runs", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["runs", str(tmp_path)]) == 2
    assert "no dpokit runs" in capsys.readouterr().err


def test_push_is_refused_before_training_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DpokitError, match="HF_HUB_OFFLINE"):
        hub.check_push_possible("me/my-model")
    with pytest.raises(DpokitError, match="repository id"):
        hub.check_push_possible("not a repo")


def test_push_uploads_the_folder_without_checkpoints(monkeypatch, tmp_path):
    calls = {}

    class FakeApi:
        def create_repo(self, repo, **options):
            calls["create"] = (repo, options)
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, **options):
            calls["upload"] = options

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = hub.push_run(tmp_path, "me/my-model", private=True, log=lambda _: None)
    assert url == "https://huggingface.co/me/my-model"
    assert calls["create"] == ("me/my-model", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"]["folder_path"] == str(tmp_path) and calls["upload"]["repo_id"] == "me/my-model"
    assert "checkpoints/*" in calls["upload"]["ignore_patterns"]
