"""Every setting of a run: the dataclasses, their allowed values, YAML, validation.

The bottom layer: nothing here imports from the rest of dpokit but errors. Modules:
`choices` (allowed values, the loss catalogue), `fields` (declaring, typing and converting an
option), `sections` (RunConfig and its sections), `commands` (sections of the other commands),
`parsers` (--columns, --chat-template-kwargs), `validate`, `load` (YAML and layers).
"""

from dpokit.config.choices import (
    BATCH_LAYOUTS,
    COLUMN_TARGETS,
    DATA_FORMATS,
    DTYPES,
    F_DIVERGENCES,
    LOSS_KINDS,
    PAIRINGS,
    RESERVED_TEMPLATE_ARGS,
    TRUNCATION_MODES,
    TURN_MODES,
    LossKind,
    loss_options_in_use,
)
from dpokit.config.commands import (
    DemoConfig,
    EvaluateCommandConfig,
    JudgeConfig,
    OnlineConfig,
    SampleCommandConfig,
    SamplingConfig,
    SweepConfig,
    validate_sampling,
)
from dpokit.config.fields import INPUT, OUTPUT, coerce, flag_of, format_value, kind_of, option, section
from dpokit.config.load import build_config, dump_yaml, load_yaml, with_absolute_model_paths
from dpokit.config.parsers import parse_columns, parse_template_kwargs
from dpokit.config.sections import (
    DataConfig,
    LoraSection,
    LossConfig,
    ModelConfig,
    RunConfig,
    ScaleConfig,
    SpeedConfig,
    TrainConfig,
    iter_options,
    section_classes,
)
from dpokit.config.validate import check_loss_config, loss_kind, loss_weights, validate, validate_data

__all__ = [
    "BATCH_LAYOUTS", "COLUMN_TARGETS", "INPUT", "OUTPUT", "DATA_FORMATS", "DTYPES", "F_DIVERGENCES", "LOSS_KINDS", "PAIRINGS",
    "RESERVED_TEMPLATE_ARGS", "TRUNCATION_MODES", "TURN_MODES", "DataConfig", "DemoConfig",
    "EvaluateCommandConfig", "JudgeConfig", "LoraSection", "LossConfig", "LossKind", "ModelConfig",
    "OnlineConfig", "RunConfig", "SampleCommandConfig", "SamplingConfig", "ScaleConfig", "SpeedConfig",
    "SweepConfig", "TrainConfig", "build_config", "check_loss_config", "coerce", "dump_yaml", "flag_of",
    "format_value", "iter_options", "kind_of", "load_yaml", "loss_kind", "loss_options_in_use", "loss_weights", "option",
    "parse_columns", "parse_template_kwargs", "section", "section_classes", "validate", "validate_data",
    "validate_sampling", "with_absolute_model_paths",
]
