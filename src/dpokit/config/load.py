"""Reading and writing the config: YAML files, layers of values, the resolved tree.

`load_yaml` reads a user's file (or a run folder's dpokit_config.yaml, also one an older dpokit
wrote with comma strings for lists); `build_config` stacks layers of {section: {option: value}}
over the defaults and validates the result; `dump_yaml` writes what a run used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from dpokit.config.fields import coerce
from dpokit.config.sections import RunConfig, iter_options, section_classes
from dpokit.config.validate import validate
from dpokit.errors import DpokitError


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
    for key, value in raw.items():
        if key in classes and isinstance(value, dict):
            names = {f.name: f for f in dataclasses.fields(classes[key])}
            for sub, subvalue in value.items():
                if sub not in names:
                    raise DpokitError(f"{path}: unknown option '{key}.{sub}'")
                _set_once(values, key, sub, coerce(subvalue, names[sub], f"{_at(path, sub)}: {key}.{sub}"),
                          f"{_at(path, sub)}: {key}.{sub}")
        elif key.replace("-", "_") in by_name:
            section, f = by_name[key.replace("-", "_")]
            _set_once(values, section, f.name, coerce(value, f, f"{_at(path, key)}: {key}"), f"{_at(path, key)}: {key}")
        else:
            raise DpokitError(f"{path}: unknown option '{key}'")
    return values


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
