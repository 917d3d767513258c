"""Where rows come from: a local file or folder, or a Hugging Face hub dataset, read once.

`open_source(spec)` returns a `RowSource` whose `rows` iterator yields `(number, dict)` once per
row; nothing is materialised twice, so a large file costs one parse. Row numbers are what an
error message names: the line for JSON Lines, the 1-based row (header excluded) for everything
else.

Accepted specs:
- `*.jsonl` / `*.ndjson` (and a `*.json` file that is not a JSON array): JSON Lines;
- `*.json` starting with `[`: a JSON array of objects;
- `*.csv` / `*.tsv`: a header row, then one pair per row (string fields only);
- `*.parquet`: read in record batches with pyarrow;
- a folder written by `datasets.save_to_disk` (`folder` or `folder:split` for a DatasetDict);
- `*.jsonl.gz` / `*.ndjson.gz` / `*.json.gz`: the same, gzip-compressed, decompressed as read
  (`.zst` is refused with a one-line hint: no small zstd library is a dependency);
- a hub dataset id, `org/name`, `org/name:split` (default split `train`) or
  `org/name:config:split`, when online; `--data-config` / `--data-dir` name its configuration
  and data folder (`datasets.load_dataset(name, config, data_dir=..., split=...)`).
`datasets`/`pyarrow` are imported only for the last three, so JSON Lines training never pays
for them.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError, first_line
from dpokit.paths import hub_offline_by_setting, hub_unreachable

Row = dict[str, Any]
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".gz", ".zst")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+){0,2}$")
_BATCH = 1024


class RowSkip(Exception):
    """A bad row (as opposed to a broken file, which is a DpokitError): skipped and counted, or an
    error with --strict. Raised while a row becomes a pair (`pairs`) or token ids (`tokenize`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def value_type(value: Any) -> str:
    """A value's type in a message about a row, in JSON's words for null."""
    return "null" if value is None else type(value).__name__


@dataclass
class RowSource:
    """One opened source. `where(n)` names row n in messages, e.g. `data.jsonl, line 7`."""

    name: str
    kind: str
    unit: str
    rows: Iterator[tuple[int, Row]]

    def where(self, number: int) -> str:
        return f"{self.name}, {self.unit} {number}"


def open_source(spec: str | Path, config: str | None = None, data_dir: str | None = None) -> RowSource:
    """Open `spec`; `config` and `data_dir` are for hub datasets only (see `parse_hub_spec`)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _saved_dataset(path, None, spec)
    if path.is_file():
        return _local_file(path, spec)
    folder, _, split = spec.rpartition(":")
    if folder and Path(folder).expanduser().is_dir():
        return _saved_dataset(Path(folder).expanduser(), split, spec)
    if _HUB_ID.match(spec) and not spec.lower().endswith(FILE_SUFFIXES) and not path.parent.is_dir():
        return _hub_dataset(*parse_hub_spec(spec, config), data_dir, spec)
    raise DpokitError(f"data file {spec} does not exist")


def _local_file(path: Path, name: str) -> RowSource:
    suffix = path.suffix.lower()
    if suffix in (".gz", ".zst"):
        return _compressed_file(path, name, suffix)
    if suffix == ".parquet":
        return RowSource(name, "parquet", "row", _parquet_rows(path, name))
    if suffix in (".csv", ".tsv"):
        return RowSource(name, suffix[1:], "row", _csv_rows(path, name, "\t" if suffix == ".tsv" else ","))
    handle = _open_text(path, name)
    first = _first_char(handle, name)
    if suffix == ".json" and first == "[":
        return RowSource(name, "json", "row", _json_array_rows(handle, name))
    return RowSource(name, "jsonl", "line", _jsonl_rows(handle, name))


def _compressed_file(path: Path, name: str, suffix: str) -> RowSource:
    """JSON Lines or a JSON array, gzip-compressed: decompressed while read, never whole in memory
    (a JSON array is parsed whole, as uncompressed)."""
    inner = Path(path.stem).suffix.lower()
    if suffix == ".zst":
        raise DpokitError(f"{name}: zstd-compressed data is not read (no zstd library is a dependency); "
                          f"decompress it first (zstd -d {path.name}) or recompress with gzip")
    if inner not in (".jsonl", ".ndjson", ".json"):
        raise DpokitError(f"{name}: only .jsonl.gz, .ndjson.gz and .json.gz are read compressed")
    handle = gzip.open(path, "rt", encoding="utf-8-sig", newline="")  # noqa: SIM115 - the row iterator closes it; utf-8-sig drops a BOM
    try:
        first = _first_char(handle, name)
    except (OSError, EOFError) as exc:
        handle.close()
        raise DpokitError(f"{name}: not a readable gzip file ({first_line(exc)})") from None
    if inner == ".json" and first == "[":
        return RowSource(name, "json.gz", "row", _gzip_errors(_json_array_rows(handle, name), name, "row"))
    return RowSource(name, "jsonl.gz", "line", _gzip_errors(_jsonl_rows(handle, name), name, "line"))


def _gzip_errors(rows: Iterator[tuple[int, Row]], name: str, unit: str) -> Iterator[tuple[int, Row]]:
    """A truncated or corrupt gzip stream fails mid-read: one line naming the file and the last row."""
    number = 0
    try:
        for number, row in rows:  # noqa: B007 - used after an error
            yield number, row
    except (OSError, EOFError) as exc:
        raise DpokitError(f"{name}: the gzip stream breaks after {unit} {number} ({first_line(exc)})") from None


def _open_text(path: Path, name: str):
    try:  # utf-8-sig: a byte-order mark (Excel, Notepad) is dropped, not read as part of the first field
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DpokitError(f"cannot read data file {name}: {exc.strerror}") from None


def _first_char(handle, name: str) -> str:
    """The first non-blank character, leaving the handle rewound."""
    try:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                handle.seek(0)
                return stripped[0]
    except UnicodeDecodeError:
        raise DpokitError(f"{name}: not UTF-8 text") from None
    handle.seek(0)
    return ""


def _jsonl_rows(handle, name: str) -> Iterator[tuple[int, Row]]:
    line_no = 0
    with handle:
        try:
            for line_no, line in enumerate(handle, start=1):  # noqa: B007 - used after a decode error
                if not line.strip():
                    continue
                row = parse_json(line, f"{name}, line {line_no}")
                yield line_no, _object(row, f"{name}, line {line_no}")
        except UnicodeDecodeError:
            raise DpokitError(f"{name}: not UTF-8 text (line {line_no + 1})") from None


def _json_array_rows(handle, name: str) -> Iterator[tuple[int, Row]]:
    with handle:
        try:
            text = handle.read()
        except UnicodeDecodeError:
            raise DpokitError(f"{name}: not UTF-8 text") from None
    rows = parse_json(text, name, whole_file=True)
    check_each = _SURROGATE_ESCAPE.search(text) is not None
    for number, row in enumerate(rows, start=1):
        if check_each:
            _refuse_lone_surrogates(row, f"{name}, row {number}")
        yield number, _object(row, f"{name}, row {number}")


# A \uD800-\uDFFF escape: half of a UTF-16 pair, which json decodes to a lone surrogate when unpaired.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json(text: str, where: str, whole_file: bool = False) -> Any:
    """json.loads with one-line errors naming `where` ("FILE, line N"; a `whole_file` adds the
    line): invalid JSON, nesting past the parser's depth, and a lone UTF-16 surrogate escape,
    which is no character and cannot be encoded for the tokenizer (a whole file's rows are
    checked by the caller, which can name the row)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        line = f", line {exc.lineno}" if whole_file else ""
        raise DpokitError(f"{where}{line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DpokitError(f"{where}: JSON nested deeper than the parser can read") from None
    if not whole_file and _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(value, where)
    return value


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        escape = f"\\u{ord(exc.object[exc.start]):04x}"
        raise DpokitError(f"{where}: a lone UTF-16 surrogate escape ({escape}) is not a character; "
                          "fix or drop the row") from None


def _object(row: Any, where: str) -> Row:
    if not isinstance(row, dict):
        raise DpokitError(f"{where}: expected a JSON object (one pair per row), got {type(row).__name__}")
    return row


def _csv_rows(path: Path, name: str, delimiter: str) -> Iterator[tuple[int, Row]]:
    # Long responses exceed csv's default 128 KiB field limit; raise it for this read.
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    handle = _open_text(path, name)
    number = 0
    try:
        with handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise DpokitError(f"{name}: no header row")
            for number, values in enumerate(reader, start=1):  # noqa: B007 - used after an error
                if not values:
                    continue
                if len(values) != len(header):
                    raise DpokitError(
                        f"{name}, row {number}: {len(values)} fields but the header has {len(header)}"
                    )
                yield number, dict(zip(header, values, strict=True))
    except csv.Error as exc:
        raise DpokitError(f"{name}, row {number + 1}: not valid CSV ({exc})") from None
    except UnicodeDecodeError:
        raise DpokitError(f"{name}: not UTF-8 text (row {number + 1})") from None
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(path: Path, name: str) -> Iterator[tuple[int, Row]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DpokitError(f"{name}: reading parquet needs pyarrow (pip install datasets)") from None
    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=_BATCH)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except DpokitError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; the user needs one line
        raise DpokitError(f"{name}: cannot read parquet ({first_line(exc)})") from None


def _saved_dataset(folder: Path, split: str | None, name: str) -> RowSource:
    if not ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
        raise DpokitError(f"data path {name} is a folder but not one written by datasets.save_to_disk")
    try:
        import datasets
    except ImportError:
        raise DpokitError(f"{name}: reading a saved dataset needs `pip install datasets`") from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise DpokitError(f"{name}: cannot load the saved dataset ({first_line(exc)})") from None
    return RowSource(name, "saved dataset", "row", _dataset_rows(_pick_split(loaded, split, name), name))


def parse_hub_spec(spec: str, config: str | None = None) -> tuple[str, str, str | None]:
    """`org/name[:split]` or `org/name:config:split` -> (name, split, config); `config` is the
    `--data-config` flag, which a config named in the spec must not contradict."""
    name, *parts = spec.split(":")
    split = parts[-1] if parts else "train"
    named = parts[0] if len(parts) == 2 else None
    if named and config and named != config:
        raise DpokitError(f"data {spec} names config '{named}' but --data-config is '{config}'; keep one")
    return name, split, named or config


def _hub_dataset(name: str, split: str, config: str | None = None, data_dir: str | None = None,
                 spec: str | None = None) -> RowSource:
    spec = spec or name
    reason = hub_unreachable()
    if reason and not hub_offline_by_setting():  # no connection: fail now, not after a minute of retries
        raise DpokitError(f"data {spec}: no such file or folder; as a hub id: {reason}")
    try:
        import datasets
    except ImportError:
        raise DpokitError(f"{name}: reading a hub dataset needs `pip install datasets`") from None
    try:
        loaded = datasets.load_dataset(name, config, data_dir=data_dir, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, missing, gated, bad split: all one line
        if reason:  # HF_HUB_OFFLINE: datasets looked in its cache only
            raise DpokitError(f"data {spec}: no such file or folder; as a hub id: {reason} and not cached") from None
        raise DpokitError(
            f"data {name} is not a local file and could not be loaded from the hub "
            f"(split {split}): {first_line(exc)}"
        ) from None
    label = ":".join(part for part in (name, config, split) if part) + (f" (data_dir {data_dir})" if data_dir else "")
    return RowSource(label, "hub dataset", "row", _dataset_rows(loaded, name))


def _pick_split(loaded, split: str | None, name: str):
    splits = list(loaded.keys()) if hasattr(loaded, "keys") and not hasattr(loaded, "features") else None
    if splits is None:
        if split:
            raise DpokitError(f"{name}: this saved dataset has no splits; drop ':{split}'")
        return loaded
    if split is None:
        if len(splits) == 1 or "train" in splits:
            split = splits[0] if len(splits) == 1 else "train"
        else:
            raise DpokitError(f"{name}: holds splits {', '.join(splits)}; choose one with {name}:SPLIT")
    if split not in splits:
        raise DpokitError(f"{name}: no split '{split}' (splits: {', '.join(splits)})")
    return loaded[split]


def _dataset_rows(dataset, name: str) -> Iterator[tuple[int, Row]]:
    number = 0
    try:
        for batch in dataset.iter(batch_size=_BATCH):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                number += 1
                yield number, dict(zip(columns, values, strict=True))
    except Exception as exc:  # noqa: BLE001
        raise DpokitError(f"{name}, row {number + 1}: cannot read ({first_line(exc)})") from None
