"""The config package: list options parsed once on load (YAML lists, comma strings, older run
folders), written back as YAML lists; config imports nothing above it; one copy of each set of
allowed values."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

import dpokit.config
import dpokit.losses
from dpokit.cli import build_parser
from dpokit.cli.common import config_from_args
from dpokit.config import (
    LOSS_KINDS,
    LossConfig,
    SweepConfig,
    build_config,
    dump_yaml,
    iter_options,
    kind_of,
    load_yaml,
    section_classes,
)
from dpokit.errors import DpokitError
from dpokit.train.checkpoint import check_resumable

REQUIRED = {"model": {"model": "m"}, "data": {"data": "d.jsonl"}, "train": {"output": "out"}}


@pytest.mark.parametrize("text", [
    "loss:\n  loss: [sigmoid, sft]\n  loss_weights: [1, 0.5]\nlora_target_modules: [q_proj, v_proj]\n",
    "loss:\n  loss: sigmoid,sft\n  loss_weights: '1,0.5'\nlora_target_modules: q_proj, v_proj\n",
    "loss: sigmoid, sft\nloss_weights: 1, 0.5\nlora_target_modules: q_proj,v_proj\n",
])
def test_yaml_lists_and_comma_strings_load_as_tuples(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    cfg = build_config(REQUIRED, load_yaml(path))
    assert cfg.loss.loss == ("sigmoid", "sft") and cfg.loss.loss_weights == (1.0, 0.5)
    assert cfg.lora.lora_target_modules == ("q_proj", "v_proj")


def test_command_line_lists_become_tuples():
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d.jsonl", "--output", "o",
                                      "--loss", "sigmoid,sft", "--loss-weights", "1,0.5"])
    cfg = config_from_args(args)
    assert cfg.loss.loss == ("sigmoid", "sft") and cfg.loss.loss_weights == (1.0, 0.5)
    assert cfg.loss.loss_spec == "sigmoid,sft"


def test_dump_writes_yaml_lists_that_load_back(tmp_path):
    cfg = build_config(REQUIRED, {"loss": {"loss": "sigmoid,sft", "loss_weights": "1,0.5"}})
    text = dump_yaml(cfg)
    saved = yaml.safe_load(text)
    assert saved["loss"]["loss"] == ["sigmoid", "sft"] and saved["loss"]["loss_weights"] == [1.0, 0.5]
    assert saved["lora"]["lora_target_modules"] == ["all-linear"]
    (tmp_path / "dpokit_config.yaml").write_text(text)
    assert build_config(load_yaml(tmp_path / "dpokit_config.yaml")) == cfg


# What dpokit_config.yaml held before lists were parsed on load: comma strings, or the text of a
# YAML list given in the user's file.
OLDER_RUN_CONFIG = {"loss": {"loss": "sigmoid,sft", "loss_weights": "1,0.5", "beta": 0.1},
                    "lora": {"lora_target_modules": "all-linear"}}


@pytest.mark.parametrize("loss", ["sigmoid,sft", "['sigmoid', 'sft']"])
def test_an_older_run_folders_config_still_loads(tmp_path, loss):
    older = {**REQUIRED, "loss": {**OLDER_RUN_CONFIG["loss"], "loss": loss}, "lora": OLDER_RUN_CONFIG["lora"]}
    (tmp_path / "dpokit_config.yaml").write_text(yaml.safe_dump(older))
    cfg = build_config(load_yaml(tmp_path / "dpokit_config.yaml"))
    assert cfg.loss.loss == ("sigmoid", "sft") and cfg.lora.lora_target_modules == ("all-linear",)
    assert LossConfig(**older["loss"]).loss == ("sigmoid", "sft")  # as evaluate reads a run's loss section


def test_resume_compares_an_older_checkpoints_lists_by_value(tmp_path):
    cfg = build_config(REQUIRED, {"loss": {"loss": "sigmoid,sft", "loss_weights": "1,0.5"}})
    check_resumable({**REQUIRED, **OLDER_RUN_CONFIG}, cfg, tmp_path)  # same settings, older spelling
    other = build_config(REQUIRED, {"loss": {"loss": "sigmoid,sft", "loss_weights": "1,2"}})
    with pytest.raises(DpokitError, match="--loss-weights differs"):
        check_resumable({**REQUIRED, **OLDER_RUN_CONFIG}, other, tmp_path)


@pytest.mark.parametrize(("layer", "flag"), [
    ({"loss": {"loss": "sigmoid,,sft"}}, "--loss"),
    ({"loss": {"loss_weights": "1,x"}}, "--loss-weights"),
    ({"lora": {"lora_target_modules": "q_proj,,v_proj"}}, "--lora-target-modules"),
])
def test_a_bad_list_is_one_line_naming_the_option(layer, flag):
    with pytest.raises(DpokitError) as info:
        build_config(REQUIRED, layer)
    assert str(info.value).startswith(flag) and "\n" not in str(info.value)


def test_a_list_assigned_as_text_after_construction_is_refused():
    cfg = build_config(REQUIRED)
    cfg.loss.loss = "sigmoid"  # skips the conversion: would read as 's', 'i', ...
    with pytest.raises(DpokitError, match="--loss: expected a list"):
        dpokit.config.validate(cfg)


def test_sweep_betas_are_numbers():
    assert SweepConfig().betas == (0.01, 0.05, 0.1, 0.3, 1.0)
    assert SweepConfig(betas="0.1, 1").betas == (0.1, 1.0)


def test_every_option_has_a_resolved_type():
    for _, f in iter_options():
        assert not isinstance(f.type, str), f.name
        kind_of(f)
    list_options = {f.name for _, f in iter_options() if kind_of(f).is_list}
    assert list_options == {"loss", "loss_weights", "lora_target_modules", "report_to"}


def test_config_imports_nothing_above_it():
    folder = Path(dpokit.config.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpokit"):
                assert node.module.startswith("dpokit.config") or node.module == "dpokit.errors", (path, node.module)


def test_allowed_values_have_one_copy():
    from dpokit.data import batching, pairs, tokenize
    from dpokit.experiments import online
    from dpokit.losses import F_DIVERGENCES, LOSSES

    assert batching.LAYOUTS is dpokit.config.BATCH_LAYOUTS and pairs.LAYOUTS is dpokit.config.DATA_FORMATS
    assert tokenize.TRUNCATION_MODES is dpokit.config.TRUNCATION_MODES and online.PAIRINGS is dpokit.config.PAIRINGS
    assert F_DIVERGENCES is dpokit.config.F_DIVERGENCES
    assert list(LOSSES) == list(LOSS_KINDS)  # the registry pairs a function with every catalogue name
    assert set(dpokit.losses._FUNCTIONS) == set(LOSS_KINDS)  # and has no function the catalogue lacks
    help_text = " ".join(dataclasses.fields(LossConfig)[0].metadata["help"].split())
    assert all(name in help_text for name in LOSS_KINDS)


def test_sections_convert_values_given_to_the_constructor():
    assert set(section_classes()) == {"model", "data", "loss", "train", "lora", "scale", "speed"}
    with pytest.raises(DpokitError, match="--max-length: expected int"):
        dpokit.config.DataConfig(max_length="long")


def test_an_option_in_the_wrong_section_is_refused():
    # gradient_checkpointing is a scale option; set on speed it would be read by nothing
    with pytest.raises(DpokitError, match="unknown option speed.gradient_checkpointing"):
        build_config(REQUIRED, {"speed": {"gradient_checkpointing": True}})
