"""Rows -> canonical pairs: detect the layout, map columns, check each row, count what is skipped.

Layouts (`--data-format`, `auto` detects from the first row that has a usable `chosen`):

- `standard`: `prompt`, `chosen`, `rejected` strings; the sequence is `prompt + response`
  exactly as written (no separator is added).
- `implicit`: `chosen`, `rejected` full transcripts (Anthropic HH-RLHF). Each is split after its
  last `"\\n\\nAssistant:"`; the prompt is everything up to and including it. Rows whose two
  transcripts differ before that point have no single prompt: skipped as `prompt_mismatch`.
- `conversational`: `chosen`, `rejected` as lists of `{role, content}` messages, optionally with
  a `prompt` (a string, meaning one user message, or a list of messages). A list holding more
  than assistant messages is a whole conversation: it is split before its last assistant turn,
  and that context must be the same for chosen and rejected and must end with `prompt` when one
  is given (else `prompt_mismatch`). An assistant turn is everything after the last user or
  system message: an agent's `tool_calls`, the `tool` results and its answer form one response;
  a list that starts with an assistant message and holds only assistant and tool messages is a
  response as a whole. With a `prompt`, lists that start with an assistant message and do not
  repeat the prompt are completions appended to it, later user turns included (TRL's layout).
  A response ends with an assistant message (else `no_assistant_turn`). Messages keep
  `tool_calls`, `tool_call_id`, `name`, `reasoning_content`.
- `sharegpt`: `conversations` as `{from, value}` messages (human/gpt/system), and `chosen`,
  `rejected` as one such message or a list of them.

`--columns prompt=question,chosen=good,rejected=bad` renames columns first; a dotted source
reaches into a nested field (`score_chosen=metadata.score`). Scores come from `score_chosen` and
`score_rejected`, at the top level or inside one nested object (`metadata`), when both are
numbers. Every other column is kept on the pair as `extra`.

Optional in every layout, `chosen_finished` / `rejected_finished` (JSON booleans; `true`/`false`
in CSV/TSV, whose fields are all text) say whether a response really ended (EOS or a stop string)
or was cut off, by a sampler's token limit say: a response marked `false` gets no EOS when
tokenized (`data/tokenize.py`, rule 1), since it never ended. Absent or null means finished, so a
field present in some rows only is fine; any other value is an error naming the row and field.

Optional too, `chosen_ids` / `rejected_ids` (and `prompt_ids`): the token ids a pair built from
samples was sampled as (`data/sampled.py`); tokenization trains on exactly those.

Rows skipped (each counted with its row number; `--strict` turns all but `tied_scores` into
errors): `non_string` (a field that should be text is not), `malformed_messages`, `unknown_role`,
`no_assistant_turn`, `prompt_mismatch`, `no_prompt`, `empty_response`, `identical` (chosen == rejected),
`tied_scores` (only with `--drop-tied-scores`). A row that is not an object or lacks a column
its layout needs is a broken file, not a bad row: that is always an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dpokit.config import DATA_FORMATS as LAYOUTS
from dpokit.config import TURN_MODES, parse_columns
from dpokit.data.conversations import (
    Message,
    chat_messages,
    sharegpt_messages,
    split_conversations,
)
from dpokit.data.sampled import SAMPLED_ID_FIELDS, SampledIds, read_sampled_ids
from dpokit.data.sources import Row, RowSkip, RowSource, open_source, value_type
from dpokit.errors import DpokitError

HH_ASSISTANT = "\n\nAssistant:"
_DETECT_WITHIN = 100  # rows examined for a usable `chosen` before giving up on auto-detection

Text = str | list[Message]


@dataclass(frozen=True)
class PreferencePair:
    """One canonical pair. Text layouts hold strings; chat layouts hold message lists (the
    prompt as the conversation so far, each response as the assistant message(s) that follow).
    `index` is the row number (the line, for JSON Lines)."""

    prompt: Text
    chosen: Text
    rejected: Text
    index: int
    scores: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chosen_finished: bool = True  # False: the response was cut off, so it gets no EOS
    rejected_finished: bool = True
    sampled_ids: SampledIds | None = None  # a pair built from samples: the ids to train on (data/sampled.py)

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.chosen, str)


@dataclass
class ReadStats:
    """What reading found. `skipped` maps reason -> row numbers; `examples` holds the first
    message per reason, so a summary can say exactly what was wrong."""

    source: str = ""
    kind: str = ""
    unit: str = "line"
    layout: str = ""
    rows_read: int = 0
    rows_with_scores: int = 0
    tied_scores: int = 0
    unfinished: dict[str, int] = field(default_factory=lambda: {"chosen": 0, "rejected": 0})  # kept pairs' cut responses
    skipped: dict[str, list[int]] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, row: int, message: str) -> None:
        self.skipped.setdefault(reason, []).append(row)
        self.examples.setdefault(reason, message)




class PairReader:
    """Iterate canonical pairs from a source; `stats` fills in as rows are read."""

    def __init__(self, source: RowSource, layout: str = "auto", columns: str | None = None,
                 strict: bool = False, drop_tied_scores: bool = False, train_on_turns: str = "last"):
        if layout not in ("auto", *LAYOUTS):
            raise DpokitError(f"--data-format must be one of auto, {', '.join(LAYOUTS)}; got {layout!r}")
        if train_on_turns not in TURN_MODES:
            raise DpokitError(f"--train-on-turns must be one of {', '.join(TURN_MODES)}; got {train_on_turns!r}")
        self.all_turns = train_on_turns == "all"
        self.source, self.layout, self.strict = source, layout, strict
        self.columns = parse_columns(columns)
        self.drop_tied_scores = drop_tied_scores
        self.stats = ReadStats(source=source.name, kind=source.kind, unit=source.unit)

    def __iter__(self) -> Iterator[PreferencePair]:
        rows = self.source.rows
        layout = self.layout
        buffered: list[tuple[int, Row]] = []
        if layout == "auto":
            layout, buffered = self._detect(rows)
        self.stats.layout = layout
        normalise = _LAYOUT_FUNCTIONS[layout]
        if self.all_turns and layout in ("conversational", "sharegpt"):
            normalise = partial(normalise, all_turns=True)
        for number, raw in _chain(buffered, rows):
            self.stats.rows_read += 1
            row = self._mapped(raw, number)
            where = self.source.where(number)
            scores = _scores(row)
            if scores is not None:
                self.stats.rows_with_scores += 1
                self.stats.tied_scores += scores[0] == scores[1]
            finished = tuple(self._finished(row, name, where) for name in FINISHED_KEYS)
            sampled_ids = read_sampled_ids(row, where)
            try:
                prompt, chosen, rejected, used = normalise(row, where)
                _check_responses(chosen, rejected)
                if self.drop_tied_scores and scores is not None and scores[0] == scores[1]:
                    self.stats.skip("tied_scores", number, f"{where}: tied scores {scores[0]}")
                    continue
            except RowSkip as bad:
                message = f"{where}: {bad}"
                if self.strict:
                    raise DpokitError(f"{message} (--strict)") from None
                self.stats.skip(bad.reason, number, message)
                continue
            for response, done in zip(("chosen", "rejected"), finished, strict=True):
                self.stats.unfinished[response] += not done
            extra = {k: v for k, v in row.items()
                     if k not in used and k not in _SCORE_KEYS + FINISHED_KEYS + SAMPLED_ID_FIELDS}
            yield PreferencePair(prompt, chosen, rejected, number, scores, extra, *finished, sampled_ids)
        if self.stats.rows_read == 0:
            raise DpokitError(f"data file {self.source.name} holds no rows")

    def _finished(self, row: Row, name: str, where: str) -> bool:
        """A response's `*_finished` flag: True when absent or null."""
        value = row.get(name)
        if value is None:
            return True
        if isinstance(value, str) and self.source.kind in ("csv", "tsv") and value.lower() in ("true", "false"):
            return value.lower() == "true"  # CSV fields are all text
        if not isinstance(value, bool):
            raise DpokitError(f"{where}: field '{name}' must be true or false, got {value_type(value)} "
                              f"{str(value)[:20]!r}")
        return value

    def _mapped(self, raw: Row, number: int) -> Row:
        if not self.columns:
            return raw
        row, renamed = dict(raw), {}
        for target, source in self.columns.items():
            value, found = _lookup(raw, source)
            if not found:
                raise DpokitError(
                    f"{self.source.where(number)}: missing column '{source}' (mapped to {target} by --columns)"
                )
            if "." not in source:
                row.pop(source, None)
            renamed[target] = value
        row.update(renamed)  # after every pop, so a swap (chosen=rejected,rejected=chosen) keeps both
        return row

    def _detect(self, rows: Iterator[tuple[int, Row]]) -> tuple[str, list[tuple[int, Row]]]:
        """Read ahead until a row shows the layout; return it and the rows read ahead."""
        buffered: list[tuple[int, Row]] = []
        for number, raw in rows:
            buffered.append((number, raw))
            row = self._mapped(raw, number)
            layout = detect_layout(row, self.source.where(number), final=len(buffered) >= _DETECT_WITHIN)
            if layout is not None:
                return layout, buffered
        if not buffered:
            raise DpokitError(f"data file {self.source.name} holds no rows")
        number, raw = buffered[0]
        detect_layout(self._mapped(raw, number), self.source.where(number), final=True)
        raise AssertionError("unreachable: detect_layout(final=True) returns or raises")


def detect_layout(row: Row, where: str, final: bool = True) -> str | None:
    """The layout a row is written in. With `final`, an undetectable row is an error."""
    if "conversations" in row and "chosen" in row and "rejected" in row:
        return "sharegpt"
    if "chosen" in row and "rejected" in row:
        chosen = row["chosen"]
        if isinstance(chosen, list):
            return "conversational"
        if isinstance(chosen, str):
            return "standard" if "prompt" in row else "implicit"
        if not final:
            return None
        raise DpokitError(
            f"{where}: cannot detect the layout: field 'chosen' must be a string or a list of messages, "
            f"got {type(chosen).__name__}"
        )
    columns = ", ".join(sorted(row)) or "none"
    raise DpokitError(
        f"{where}: unknown layout (columns: {columns}); expected prompt/chosen/rejected, chosen/rejected "
        "or conversations/chosen/rejected - map yours with --columns prompt=...,chosen=...,rejected=..."
    )


# --- layouts: row -> (prompt, chosen, rejected, columns used) ---------------------------------


def _standard(row: Row, where: str):
    _require(row, ("prompt", "chosen", "rejected"), "standard", where)
    prompt, chosen, rejected = (_string(row, name) for name in ("prompt", "chosen", "rejected"))
    return prompt, chosen, rejected, {"prompt", "chosen", "rejected"}


def _implicit(row: Row, where: str):
    _require(row, ("chosen", "rejected"), "implicit", where)
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    prompt_c, response_c = split_transcript(chosen, "chosen")
    prompt_r, response_r = split_transcript(rejected, "rejected")
    if prompt_c != prompt_r:
        at = first_difference(prompt_c, prompt_r)
        raise RowSkip("prompt_mismatch", f"chosen and rejected transcripts differ before the last assistant "
                                         f"turn (from character {at})")
    return prompt_c, response_c, response_r, {"chosen", "rejected", "prompt"}


def split_transcript(text: str, name: str) -> tuple[str, str]:
    """HH-RLHF transcript -> (everything up to and including the last assistant tag, the reply)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowSkip("no_assistant_turn", f"field '{name}' has no {HH_ASSISTANT!r} turn to split at")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _conversational(row: Row, where: str, all_turns: bool = False):
    _require(row, ("chosen", "rejected"), "conversational", where)
    chosen, rejected = chat_messages(row, "chosen"), chat_messages(row, "rejected")
    prompt = None
    if "prompt" in row and row["prompt"] is not None:
        value = row["prompt"]
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else chat_messages(row, "prompt")
    return (*split_conversations(prompt, chosen, rejected, all_turns), {"prompt", "chosen", "rejected", "messages"})


def _sharegpt(row: Row, where: str, all_turns: bool = False):
    _require(row, ("conversations", "chosen", "rejected"), "sharegpt", where)
    prompt = sharegpt_messages(row, "conversations")
    chosen, rejected = sharegpt_messages(row, "chosen"), sharegpt_messages(row, "rejected")
    return (*split_conversations(prompt, chosen, rejected, all_turns), {"conversations", "chosen", "rejected"})


_LAYOUT_FUNCTIONS = {"standard": _standard, "implicit": _implicit, "conversational": _conversational,
                     "sharegpt": _sharegpt}
_SCORE_KEYS = ("score_chosen", "score_rejected")
FINISHED_KEYS = ("chosen_finished", "rejected_finished")


# --- field checks -------------------------------------------------------------------------------


def _require(row: Row, names: tuple[str, ...], layout: str, where: str) -> None:
    for name in names:
        if name not in row:
            raise DpokitError(f"{where}: missing field '{name}' (layout {layout}; see --data-format, --columns)")


def _string(row: Row, name: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise RowSkip("non_string", f"field '{name}' must be a string, got {value_type(value)}")
    return value


def _check_responses(chosen: Text, rejected: Text) -> None:
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        text = response if isinstance(response, str) else "".join(m["content"] or "" for m in response)
        if not text.strip() and not any("tool_calls" in m for m in response):
            raise RowSkip("empty_response", f"field '{name}' is an empty response")
    if chosen == rejected:
        raise RowSkip("identical", "chosen and rejected are identical (no preference)")


def _scores(row: Row) -> tuple[float, float] | None:
    holders = [row] + [v for v in row.values() if isinstance(v, dict)]
    for holder in holders:
        if all(key in holder for key in _SCORE_KEYS):
            pair = (_number(holder["score_chosen"]), _number(holder["score_rejected"]))
            return None if None in pair else pair  # type: ignore[return-value]
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _lookup(row: Row, dotted: str) -> tuple[Any, bool]:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None, False
        value = value[part]
    return value, True


def first_difference(a: str, b: str) -> int:
    """Index of the first character where two strings differ (or the shorter one's length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _chain(first: list, rest: Iterator):
    yield from first
    yield from rest


def read_pairs(spec: str, data=None) -> PairReader:
    """An iterable of `PreferencePair`s from `spec`, configured by a `DataConfig` (or defaults);
    its `.stats` (rows read, layout, rows skipped by reason) is complete once iterated."""
    config, data_dir = getattr(data, "data_config", None), getattr(data, "data_dir", None)
    source = open_source(spec, config, data_dir)
    if (config or data_dir) and source.kind != "hub dataset":
        raise DpokitError(f"--data-config / --data-dir apply to hub datasets only; {spec} is a local {source.kind}")
    if data is None:
        return PairReader(source)
    return PairReader(source, data.data_format, data.columns, data.strict, data.drop_tied_scores,
                      getattr(data, "train_on_turns", "last"))
