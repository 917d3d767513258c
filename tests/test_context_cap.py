"""Issue 33: the model's own positions (its config) cap --max-length; the tokenizer's model_max_length
is advisory (said in one line, the user's length kept) and caps only when the config gives no limit.
One rule for train, data inspect, evaluate and the reward-model judge."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from dpokit import cli
from dpokit.config import build_config
from dpokit.settings_checks import context_limit, fit_max_length
from dpokit.train.loop import train
from helpers.toy import make_pairs, save_tiny_model, write_jsonl


def _model(folder, *, positions: int, tokenizer_length: int):
    """A tiny Llama whose config declares `positions` and whose tokenizer says `tokenizer_length`
    (a context extension that left the tokenizer's field behind)."""
    save_tiny_model(folder)
    config = AutoConfig.from_pretrained(folder)
    config.max_position_embeddings = positions
    config.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = tokenizer_length
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("ctx") / "extended", positions=8192, tokenizer_length=1024)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ctx-data") / "d.jsonl", make_pairs(4, seed=3))


def _cfg(model, data, out, max_length):
    return build_config({"model": {"model": str(model)}, "data": {"data": str(data), "max_length": max_length},
                         "train": {"output": str(out), "max_steps": 1, "batch_size": 4, "progress": "off"}})


def test_train_keeps_a_length_within_the_models_positions_past_the_tokenizers_field(extended, pairs_file, tmp_path):
    lines: list[str] = []
    cfg = _cfg(extended, pairs_file, tmp_path / "run", 4200)
    train(cfg, log=lines.append)
    assert cfg.data.max_length == 4200
    assert "max_length: 4200" in (tmp_path / "run" / "dpokit_config.yaml").read_text()
    assert not any("beyond the model's context" in line for line in lines)
    advisory = [line for line in lines if "model_max_length" in line]
    assert advisory == ["note: the tokenizer's model_max_length (1024) is below --max-length 4200; keeping 4200: "
                        "the model's max_position_embeddings (8192) decides, the tokenizer's field is advisory"]


def test_a_models_own_512_positions_still_cap(tmp_path, pairs_file):
    model = _model(tmp_path / "m512", positions=512, tokenizer_length=4096)
    lines: list[str] = []
    cfg = _cfg(model, pairs_file, tmp_path / "run", 4200)
    train(cfg, log=lines.append)
    assert cfg.data.max_length == 512
    assert [line for line in lines if "--max-length 4200" in line] == [
        "--max-length 4200 is beyond the model's context (512 positions, the model's max_position_embeddings); "
        "using --max-length 512"]


def test_data_inspect_follows_the_same_rule(extended, pairs_file, capsys):
    assert cli.main(["data", "inspect", str(pairs_file), "--model", str(extended), "--max-length", "4200",
                     "--json"]) == 0
    captured = capsys.readouterr()
    assert "using --max-length" not in captured.err
    assert "keeping 4200" in captured.err
    json.loads(captured.out)


class _Config:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_the_tokenizers_field_caps_only_when_the_config_declares_no_positions():
    tokenizer = _Config(model_max_length=1024)
    assert context_limit(_Config(max_position_embeddings=8192), tokenizer) == (
        8192, "the model's max_position_embeddings")
    assert context_limit(_Config(), tokenizer) == (
        1024, "the tokenizer's model_max_length; the model's config declares none")
    assert context_limit(_Config(), _Config(model_max_length=int(1e30))) is None
    lines: list[str] = []
    assert fit_max_length(4200, None, _Config(), tokenizer, lines.append) == 1024
    assert lines == ["--max-length 4200 is beyond the model's context (1024 positions, the tokenizer's "
                     "model_max_length; the model's config declares none); using --max-length 1024"]
    lines.clear()
    assert fit_max_length(900, None, _Config(max_position_embeddings=8192), tokenizer, lines.append) == 900
    assert lines == []  # within both: nothing to say


def test_the_reward_model_judge_truncates_at_the_models_positions(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from dpokit.eval.judges import RewardModelJudge
    from helpers.toy import build_tokenizer

    tokenizer = build_tokenizer("word")
    tokenizer.model_max_length = 16
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    assert RewardModelJudge(str(tmp_path / "rm")).max_length == 128
