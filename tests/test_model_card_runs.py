"""The model card states the run as it was (issues 28 and 36): runs of each kind are trained with
the real CLI on a tiny model, and every figure on each card is checked against the run's own
`dpokit_config.yaml`, `trainer_state.json`, `run_summary.json` and `adapter_config.json`."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard

from dpokit.cli import main
from dpokit.train.checkpoint import STATE_FILE, list_checkpoints
from helpers.toy import make_pairs, write_jsonl

# Each kind: its flags, and the loss options its card must list (no others: simpo_gamma on a sigmoid run
# does nothing). 64 pairs; a global batch of 8 makes 8 steps an epoch.
KINDS = {
    # gradient accumulation, a quarter epoch, rows cut by a short --max-length, held-out data
    "accumulated": (["--batch-size", "4", "--gradient-accumulation-steps", "2", "--max-steps", "2",
                     "--max-length", "6", "--eval-data", "{eval}", "--simpo-gamma", "3"],
                    {"beta", "label_smoothing", "f_divergence"}),
    "sft_three_epochs": (["--loss", "sft", "--epochs", "3", "--batch-size", "8", "--orpo-lambda", "0.5"], set()),
    "combined": (["--loss", "ipo,sft", "--loss-weights", "1,0.5", "--max-steps", "2", "--f-divergence",
                  "alpha_divergence", "--rdpo-alpha", "0.2"],
                 {"loss_weights", "beta", "f_divergence", "alpha_divergence_coef"}),
    "lora": (["--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj,v_proj", "--max-steps", "2"],
             {"beta", "label_smoothing", "f_divergence"}),
}
NOT_LOSS_OPTIONS = {"loss", "learning_rate", "batch_size", "gradient_accumulation_steps", "seed", "steps", "epochs",
                    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    base = root / "my-base"  # a local base whose own card names the Hub model it comes from
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nbase_model: org/tiny-llama\nlicense: mit\n---\n# my base\n")
    train = write_jsonl(root / "train.jsonl", make_pairs(64, seed=1))
    held_out = write_jsonl(root / "heldout.jsonl", make_pairs(8, seed=2))
    for name, (flags, _) in KINDS.items():
        flags = [flag.replace("{eval}", str(held_out)) for flag in flags]
        assert main(["train", "--model", str(base), "--data", str(train), "--output", str(root / name),
                     "--learning-rate", "1e-3", "--progress", "off", *flags]) == 0
    assert main(["export", str(root / "lora"), "--merge", "--output", str(root / "merged")]) == 0
    return root


def _card(folder) -> tuple[dict, str, dict[str, dict[str, str]]]:
    """(front matter, text, {section title: {row name: shown value}})."""
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    tables, title = {}, None
    for line in body.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("| ") and not line.startswith(("| |", "| ---")):
            name, value = (cell.strip() for cell in line.strip("|").split("|"))
            tables.setdefault(title, {})[name] = value
    return yaml.safe_load(front), text, tables


def _same(shown: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return shown == (", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return float(shown) == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_figure_on_the_card_is_the_runs(runs, kind):
    folder = runs / kind
    front, text, tables = _card(folder)
    config = yaml.safe_load((folder / "dpokit_config.yaml").read_text())
    state = json.loads((list_checkpoints(folder)[-1] / STATE_FILE).read_text())
    summary = json.loads((folder / "run_summary.json").read_text())
    last = [r for r in state["history"] if "loss" in r][-1]
    reached = {"steps": state["step"], "epochs": last["epoch"]}
    training = tables["Training"]
    for name, shown in training.items():
        if name in reached:
            assert _same(shown, reached[name]), name
        elif name == "lora_target_modules":
            saved = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
            assert shown == ", ".join(sorted({m.rsplit(".", 1)[-1] for m in saved})) == "q_proj, v_proj"
        elif name != "loss":
            section = next(s for s in ("loss", "train", "lora") if name in config[s])
            assert _same(shown, config[section][name]), name
    assert set(training) - NOT_LOSS_OPTIONS == KINDS[kind][1]
    assert training["loss"] == ", ".join(config["loss"]["loss"])
    if config["train"]["gradient_accumulation_steps"] > 1:
        assert training["gradient_accumulation_steps"] == "2"
    for name, value in summary["data"].items():
        if not isinstance(value, dict):
            assert tables["Data"][name] == str(value), name
    for name, shown in tables[f"Final training figures (step {state['step']})"].items():
        assert _same(shown, last[name]), name
    assert str(runs) not in text  # no path of this machine
    assert front["base_model"] == "org/tiny-llama" and "the local model `my-base`" in text
    assert f'from_pretrained("path/to/{kind}")' in text and 'from_pretrained("' + kind + '")' not in text


def test_the_figures_that_were_wrong(runs):
    cut = _card(runs / "accumulated")[2]
    assert int(cut["Data"]["rows_cut"]) > 0 and cut["Training"]["epochs"] == "0.25"
    assert _card(runs / "sft_three_epochs")[2]["Training"]["epochs"] == "3"
    front, text, _ = _card(runs / "sft_three_epochs")
    assert "Direct Preference Optimization" not in text and "supervised fine-tuning" in text
    assert "dpo" not in front["tags"] and "Citation" not in text


def test_a_lora_run_is_an_adapter_and_its_merged_export_a_model(runs):
    front, text, _ = _card(runs / "lora")
    assert front["library_name"] == "peft" and "lora" in front["tags"] and text.count("A LoRA adapter") == 2
    assert ModelCard.load(runs / "lora" / "README.md").data.library_name == "peft"  # the Hub's own reader
    assert "PeftModel.from_pretrained(base, \"path/to/lora\")" in text
    front, text, tables = _card(runs / "merged")
    assert front["library_name"] == "transformers" and "merged into the base weights" in text
    assert tables["Training"]["lora_r"] == "4" and 'from_pretrained("path/to/merged")' in text
