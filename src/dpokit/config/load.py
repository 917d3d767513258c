"""Reading and writing the config: YAML files, layers of values, the resolved tree.

`load_yaml` reads a user's file, whose relative paths name files beside it (or a run folder's
dpokit_config.yaml, also one an older dpokit wrote with comma strings for lists, whose paths are
as the run's command line gave them); `build_config` stacks layers of {section: {option: value}}
over the defaults and validates the result; `dump_yaml` writes what a run used.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from dpokit.config.fields import OUTPUT, coerce
from dpokit.config.sections import RunConfig, iter_options, section_classes
from dpokit.config.validate import validate
from dpokit.errors import DpokitError

# The resolved config a training run writes into its folder (what `--resume`, `evaluate` and
# `export` read back to learn how the run was trained).
RUN_CONFIG_FILE = "dpokit_config.yaml"


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML config; sections as in RunConfig, or flat option names at the top level."""
    path = Path(path)
    if path.is_dir():
        raise DpokitError(f"config file {path} is a folder; give --config a YAML file")
    if not path.is_file():
        raise DpokitError(f"config file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_strict_loader(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise DpokitError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise DpokitError(f"{path}: expected a mapping of options at the top level")
    by_name = {f.name: (section, f) for section, f in iter_options()}
    classes = section_classes()
    values: dict[str, dict[str, Any]] = {}
    # A user's file names paths beside it; a run's own record names them as its command line did.
    folder = None if path.name == RUN_CONFIG_FILE else path.parent
    for key, value in raw.items():
        if key in classes and isinstance(value, dict):
            names = {f.name: f for f in dataclasses.fields(classes[key])}
            for sub, subvalue in value.items():
                if sub not in names:
                    raise DpokitError(f"{_at(path, sub)}: unknown option '{key}.{sub}'{_where_instead(sub, by_name)}")
                where = f"{_at(path, sub)}: {key}.{sub}"
                _set_once(values, key, sub, _beside(coerce(subvalue, names[sub], where), names[sub], folder), where)
        elif key.replace("-", "_") in by_name:
            section, f = by_name[key.replace("-", "_")]
            where = f"{_at(path, key)}: {key}"
            _set_once(values, section, f.name, _beside(coerce(value, f, where), f, folder), where)
        else:
            raise DpokitError(f"{_at(path, key)}: unknown option '{key}'{_where_instead(key, by_name)}")
    return values


def _where_instead(name: Any, by_name: dict[str, tuple[str, dataclasses.Field]]) -> str:
    """Where an unknown key may belong: its section when it is an option of another one, the
    nearest option name otherwise (`training:` -> the section `train:`)."""
    name = str(name).replace("-", "_")
    if name in by_name:
        section = by_name[name][0]
        return f"; it belongs in the section '{section}:' ({section}: {{{name}: ...}}), or at the top level"
    close = difflib.get_close_matches(name, [*section_classes(), *by_name], n=1, cutoff=0.6)
    if not close:
        return "; see dpokit train --help for the options"
    what = "the section" if close[0] in section_classes() else "the option"
    return f"; did you mean {what} '{close[0]}'?"


_RESUME_WORDS = ("auto", "none", "no")  # --resume values that are not a folder


def _beside(value: Any, f: dataclasses.Field, folder: Path | None) -> Any:
    """A relative path in a config file names a file beside that file, not in the current folder:
    an output always; an input when it exists there (else it is kept as written: a hub id, or a
    path from the current folder, as before). `folder` None: kept as written."""
    kind = f.metadata.get("path")
    if folder is None or not kind or not isinstance(value, str) or (f.name == "resume" and value in _RESUME_WORDS):
        return value
    if Path(value).expanduser().is_absolute():
        return value
    if kind == OUTPUT or (folder / value).exists():
        return str(folder / value)
    local, colon, split = value.partition(":")  # FOLDER:SPLIT (a saved dataset's split)
    if colon and local and (folder / local).exists():
        return f"{folder / local}:{split}"
    return value


def _set_once(values: dict[str, dict[str, Any]], section: str, name: str, value: Any, where: str) -> None:
    """A flat key and its section form (`beta:` and `loss: {beta:}`) name one option: one value."""
    if name in values.get(section, {}):
        raise DpokitError(f"{where}: {section}.{name} is already set in this file; keep one")
    values.setdefault(section, {})[name] = value


class _Key(str):
    """A YAML mapping key that remembers its line, for messages."""

    line: int = 0


def _at(path: Path, key: Any) -> str:
    return f"{path} line {key.line}" if getattr(key, "line", 0) else str(path)


def _strict_loader(path: Path) -> type:
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently) and records each key's line."""

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, str) and key in seen:
                    raise DpokitError(f"{path} line {line}: '{key}' is given twice (first on line {seen[key]}); "
                                      "keep one")
                if isinstance(key, str):
                    seen[key] = line
            mapping = super().construct_mapping(node, deep=deep)
            lines = {key: seen[key] for key in mapping if isinstance(key, str)}
            return {_with_line(key, lines.get(key)): value for key, value in mapping.items()}

    return StrictLoader


def _with_line(key: Any, line: int | None) -> Any:
    if not isinstance(key, str) or line is None:
        return key
    tagged = _Key(key)
    tagged.line = line
    return tagged


def build_config(*layers: dict[str, dict[str, Any]]) -> RunConfig:
    """Defaults, then each layer of {section: {field: value}} in order; then validate.

    Values are converted to each field's type as they are set (a layer written in code may give
    `"loss": "sigmoid,sft"` as a YAML file or a flag would)."""
    config = RunConfig()
    for layer in layers:
        for section, values in layer.items():
            target = getattr(config, section)
            known = {f.name for f in dataclasses.fields(target)}
            unknown = sorted(set(values) - known)
            if unknown:  # a value set beside its field would be read by nothing
                raise DpokitError(f"unknown option {section}.{unknown[0]}")
            setattr(config, section, dataclasses.replace(target, **values))
    validate(config)
    return config


def with_absolute_model_paths(config: RunConfig) -> RunConfig:
    """A copy whose local model, tokenizer and reference paths are absolute (hub ids stay as given),
    so the run folder's dpokit_config.yaml still names them when read from another directory."""

    def resolved(name: str | None) -> str | None:
        if not name:
            return name
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    model = dataclasses.replace(config.model, model=resolved(config.model.model),
                                tokenizer=resolved(config.model.tokenizer),
                                reference_model=resolved(config.model.reference_model))
    return dataclasses.replace(config, model=model)


def dump_yaml(config: RunConfig) -> str:
    """The resolved config as YAML, list options as YAML lists (load_yaml reads them back)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
