"""Nothing taken silently (issue 21.2, 21.4): caps and warnings say what they did; readers tolerate a BOM,
swap columns, skip unknown chat roles, and fail at once on a hub id they cannot reach."""

from __future__ import annotations

import json

import pytest

from dpokit import paths
from dpokit.config import DataConfig, build_config
from dpokit.data import read_pairs
from dpokit.errors import DpokitError
from dpokit.eval.sampling import read_prompts
from dpokit.model.load import check_model_source
from dpokit.settings_checks import fit_max_length
from dpokit.train.loop import train


def _config(model, data, out, **train_options):
    data_options = {k: train_options.pop(k) for k in ("eval_data", "max_length") if k in train_options}
    return build_config({"model": {"model": str(model)}, "data": {"data": str(data), **data_options},
                         "train": {"output": str(out), "max_steps": 1, "progress": "off", **train_options}})


def test_max_length_past_the_context_is_capped_with_one_line_and_warnings_name_numbers(tiny_model_dir, toy_data,
                                                                                        tmp_path):
    lines: list[str] = []
    small = tmp_path / "small.jsonl"  # one batch: the checks, not the training, are under test
    small.write_text("".join(toy_data[0].read_text().splitlines(keepends=True)[:8]))
    cfg = _config(tiny_model_dir, small, tmp_path / "a", max_length=4096, warmup_steps=8, eval_every=1,
                  learning_rate=1e-3)
    train(cfg, log=lines.append)
    capped = [line for line in lines if "--max-length 4096" in line]
    assert capped == ["--max-length 4096 is beyond the model's context (256 positions, the model's "
                      "max_position_embeddings); using --max-length 256"]
    assert cfg.data.max_length == 256
    assert "max_length: 256" in (tmp_path / "a" / "dpokit_config.yaml").read_text()
    assert ("warning: a warm-up of 8 steps is longer than the whole run (1 step(s)): the learning rate never "
            "reaches --learning-rate 0.001 (highest 0.000125, at step 1)") in lines
    assert "warning: --eval-every 1 does nothing without --eval-data" in lines

    lines.clear()
    train(_config(tiny_model_dir, small, tmp_path / "b", max_length=32, eval_data=str(small)),
          log=lines.append)
    assert any(line.startswith("warning: --eval-data is the training data") for line in lines)
    assert not any("beyond the model's context" in line or "warm-up" in line for line in lines)


def test_fit_max_length_refuses_a_prompt_limit_past_the_context():
    class Config:
        max_position_embeddings = 512

    assert fit_max_length(1024, None, object(), None, print) == 1024  # nothing declares a limit
    with pytest.raises(DpokitError, match=r"--max-prompt-length \(600\) must be below the model's context"):
        fit_max_length(1024, 600, Config(), None, print)


def test_unknown_chat_role_is_a_skip_reason(tmp_path):
    rows = [{"chosen": [{"role": role, "content": "hi"}, {"role": "assistant", "content": " a"}],
             "rejected": [{"role": role, "content": "hi"}, {"role": "assistant", "content": " b"}]}
            for role in ("user", "usr")]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reader = read_pairs(str(path), DataConfig())
    assert len(list(reader)) == 1
    assert reader.stats.skipped == {"unknown_role": [2]}


def test_columns_swap_is_a_mapping(tmp_path):
    path = tmp_path / "reversed.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": " worse", "rejected": " better"}) + "\n")
    pairs = list(read_pairs(str(path), DataConfig(columns="chosen=rejected,rejected=chosen")))
    assert (pairs[0].chosen, pairs[0].rejected) == (" better", " worse")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_a_utf8_bom_is_not_part_of_the_first_field(tmp_path, suffix):
    texts = {".csv": "prompt,chosen,rejected\nQ,a,b\n", ".tsv": "prompt\tchosen\trejected\nQ\ta\tb\n",
             ".jsonl": '{"prompt": "Q", "chosen": "a", "rejected": "b"}\n',
             ".json": '[{"prompt": "Q", "chosen": "a", "rejected": "b"}]'}
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + texts[suffix].encode())
    reader = read_pairs(str(path), DataConfig())
    pairs = list(reader)
    assert reader.stats.layout == "standard" and pairs[0].prompt == "Q"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "Q"}\n')
    assert read_prompts(prompts) == ["Q"]


def test_no_connection_fails_at_once_for_models_and_data(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(paths, "_answers", lambda host: False)
    with pytest.raises(DpokitError, match=r"tokenizer no_such_tok: no such folder; as a hub id: offline \(no conn"):
        check_model_source("no_such_tok", "tokenizer")
    with pytest.raises(DpokitError, match=r"data mydata/pairs: no such file or folder; as a hub id: offline"):
        read_pairs("mydata/pairs")


def test_data_inspect_caps_max_length_as_train_does(tiny_model_dir, toy_data, capsys):
    from dpokit import cli

    assert cli.main(["data", "inspect", str(toy_data[1]), "--model", str(tiny_model_dir), "--max-length", "4096",
                     "--json"]) == 0
    captured = capsys.readouterr()
    assert "using --max-length 256" in captured.err
    json.loads(captured.out)  # stdout stays one JSON object
