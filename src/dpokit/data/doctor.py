"""The data doctor: what `dpokit train` would make of a source, before any GPU time is spent.

`inspect_data` runs the very pipeline training uses (read -> normalise -> render -> tokenize ->
truncate) and reports rows read and kept, skips by reason with row numbers, length statistics,
what truncation would cut, duplicate prompts, identical pairs, tied scores and length bias.

With a tokenizer (`--model`), lengths are tokens as fed to the model (prompt with its BOS, each
response with its EOS), measured before truncation. Without one, lengths are characters of the
text as written (message contents summed for conversational rows, since no template is
available), and truncation is not estimated (`truncated` is null): the report says which.
Length statistics and length bias cover every pair that was not skipped for a data reason,
measured before truncation (so a pair later dropped as `prompt_too_long` still counts).
"""

from __future__ import annotations

import io
import json
import math
from array import array
from collections import Counter
from itertools import islice
from typing import Any

from dpokit.data.conversations import AGENT_ROLES
from dpokit.data.pairs import PreferencePair, ReadStats, Text, read_pairs
from dpokit.data.templates import KWARGS_COLUMN, TOOLS_COLUMN, has_tool_calls, parse_template_kwargs
from dpokit.data.tokenize import PairTokenizer, TokenizeStats
from dpokit.errors import DpokitError
from dpokit.io import atomic_write_bytes

_CHUNK = 512
FIELDS = ("prompt", "chosen", "rejected")


def glued_text(pair: PreferencePair) -> bool:
    """A text pair whose prompt and response meet with no whitespace ("the ovenTo cook"): they are
    concatenated exactly as written, so the model sees the two words run together."""
    return not pair.is_chat and bool(pair.prompt) and not pair.prompt[-1:].isspace() and any(
        not response[:1].isspace() for response in (pair.chosen, pair.rejected))


def glued_text_warning(rows: int) -> str:
    return (f"warning: {rows} rows have no whitespace between prompt and response; text layouts are "
            "concatenated exactly as written")


class _Tally:
    """Per-pair measurements, accumulated in compact arrays."""

    def __init__(self) -> None:
        self.lengths = {name: array("l") for name in FIELDS}
        self.prompt_counts: Counter[int] = Counter()
        self.glued = 0
        self.turns = array("l")  # assistant turns per conversation (prompt + chosen)
        self.response_messages = array("l")  # messages in the chosen response
        self.with_tools = self.with_tool_calls = self.with_template_kwargs = 0

    def add_pair(self, pair: PreferencePair) -> None:
        self.prompt_counts[hash(_prompt_key(pair.prompt))] += 1
        if pair.is_chat:
            self.add_conversation(pair)
        self.glued += glued_text(pair)

    def add_conversation(self, pair: PreferencePair) -> None:
        conversation = [*pair.prompt, *pair.chosen]
        self.turns.append(sum(m["role"] == "assistant" and (i == 0 or conversation[i - 1]["role"] not in AGENT_ROLES)
                              for i, m in enumerate(conversation)))
        self.response_messages.append(len(pair.chosen))
        self.with_tools += bool(pair.extra.get(TOOLS_COLUMN))
        self.with_tool_calls += any(has_tool_calls(m) for m in (pair.prompt, pair.chosen, pair.rejected))
        self.with_template_kwargs += pair.extra.get(KWARGS_COLUMN) is not None

    def conversations(self, data) -> dict[str, Any] | None:
        """Turns, tools and template arguments of conversational pairs (None for text layouts)."""
        if not self.turns:
            return None
        return {"assistant_turns": _describe(self.turns), "response_messages": _describe(self.response_messages),
                "rows_with_tools": self.with_tools, "rows_with_tool_calls": self.with_tool_calls,
                "rows_with_template_kwargs": self.with_template_kwargs,
                "template_kwargs": parse_template_kwargs(getattr(data, "chat_template_kwargs", None)),
                "train_on_turns": getattr(data, "train_on_turns", "last")}

    def add_lengths(self, prompt: int, chosen: int, rejected: int) -> None:
        for name, value in zip(FIELDS, (prompt, chosen, rejected), strict=True):
            self.lengths[name].append(value)


def inspect_data(spec: str, data, tokenizer=None, plot: str | None = None) -> dict[str, Any]:
    """Report on `spec` read with the `DataConfig` `data`; token statistics when `tokenizer`."""
    reader = read_pairs(spec, data)
    tally = _Tally()
    stats = TokenizeStats(where=reader.source.where)
    pair_tokenizer = PairTokenizer.from_config(tokenizer, data) if tokenizer is not None else None
    kept = 0
    iterator = iter(reader)
    while chunk := list(islice(iterator, _CHUNK)):
        for pair in chunk:
            tally.add_pair(pair)
        if pair_tokenizer is None:
            for pair in chunk:
                tally.add_lengths(*(_characters(getattr(pair, name)) for name in FIELDS))
            kept += len(chunk)
            continue
        for encoded in pair_tokenizer.encode(chunk, stats):
            tally.add_lengths(len(encoded.prompt), len(encoded.chosen), len(encoded.rejected))
            kept += pair_tokenizer.fit(encoded, stats) is not None
    report = _report(reader.stats, stats, tally, kept, data, tokenized=pair_tokenizer is not None)
    if plot:
        save_length_plot(tally, report["lengths"]["units"], plot)
        report["plot"] = plot
    return report


def _report(read: ReadStats, stats: TokenizeStats, tally: _Tally, kept: int, data, tokenized: bool) -> dict:
    skipped_rows = {**read.skipped, **stats.skipped}
    units = "tokens" if tokenized else "characters"
    chosen, rejected = tally.lengths["chosen"], tally.lengths["rejected"]
    n = len(chosen)
    differences = [c - r for c, r in zip(chosen, rejected, strict=True)]
    repeated = [count for count in tally.prompt_counts.values() if count > 1]
    report: dict[str, Any] = {
        "source": read.source,
        "source_kind": read.kind,
        "row_unit": read.unit,
        "layout": read.layout,
        "rows_read": read.rows_read,
        "rows_kept": kept,
        "skipped": {reason: len(rows) for reason, rows in skipped_rows.items()},
        "skipped_rows": skipped_rows,
        "lengths": {
            "units": units,
            "measured": "before truncation, prompt with BOS and responses with EOS" if tokenized
            else "the text as written; pass --model for tokens",
            **{name: _describe(tally.lengths[name]) for name in FIELDS},
            "longest_sequence": _describe(array("l", (p + max(c, r) for p, c, r in zip(
                tally.lengths["prompt"], chosen, rejected, strict=True)))),
        },
        "truncated": None,
        "length_bias": {
            "pairs": n,
            "chosen_longer": _fraction(sum(d > 0 for d in differences), n),
            "rejected_longer": _fraction(sum(d < 0 for d in differences), n),
            "equal": _fraction(sum(d == 0 for d in differences), n),
            "mean_difference": _round(sum(differences) / n) if n else None,
            "units": units,
        },
        "duplicate_prompts": {"rows": sum(count - 1 for count in repeated), "distinct_prompts": len(repeated)},
        "identical_pairs": len(skipped_rows.get("identical", [])) + len(skipped_rows.get("identical_tokens", [])),
        "tied_scores": {"rows_with_scores": read.rows_with_scores, "tied": read.tied_scores}
        if read.rows_with_scores else None,
        "unfinished_responses": dict(read.unfinished),  # marked chosen/rejected_finished false: no EOS
        "conversations": tally.conversations(data),
        "boundary": {"merges": stats.boundary_merges if tokenized else None,
                     "glued_text_rows": tally.glued if read.layout in ("standard", "implicit") else None},
    }
    if tokenized:
        report["truncated"] = {
            "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
            "truncation_mode": data.truncation_mode, "min_response_share": data.min_response_share,
            "rows_cut": stats.rows_cut,
            "prompts_cut": stats.prompts_cut, "responses_cut": stats.responses_cut,
            "rows_dropped": stats.dropped_prompt_too_long,
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lines = [f"{report['source']}: {report['source_kind']}, {report['layout']} layout"]
    skipped = report["skipped"]
    lines.append(f"rows read {report['rows_read']}, kept {report['rows_kept']}, skipped {sum(skipped.values())}")
    for reason, rows in report["skipped_rows"].items():
        shown = ", ".join(map(str, rows[:20])) + (", ..." if len(rows) > 20 else "")
        lines.append(f"  {reason}: {len(rows)} ({report['row_unit']}s {shown})")
    lengths = report["lengths"]
    lines.append(f"lengths in {lengths['units']} ({lengths['measured']}):")
    lines.append(f"  {'':<17}{'min':>8}{'mean':>10}{'median':>9}{'p95':>9}{'max':>9}")
    for name in (*FIELDS, "longest_sequence"):
        s = lengths[name]
        if s["count"]:
            lines.append(f"  {name:<17}{s['min']:>8}{s['mean']:>10.1f}{s['median']:>9}{s['p95']:>9}{s['max']:>9}")
    cut = report["truncated"]
    if cut is None:
        lines.append("truncation: not estimated without a tokenizer (pass --model)")
    else:
        prompt_rule = _prompt_rule(cut)
        lines.append(
            f"truncation at --max-length {cut['max_length']} ({prompt_rule}): {cut['rows_cut']} rows cut "
            f"({cut['prompts_cut']} prompts, "
            f"{cut['responses_cut']} pairs of responses), {cut['rows_dropped']} dropped with a prompt too long"
        )
    bias = report["length_bias"]
    if bias["pairs"]:
        lines.append(
            f"length bias: chosen longer in {bias['chosen_longer']:.1%} of pairs (rejected longer "
            f"{bias['rejected_longer']:.1%}, equal {bias['equal']:.1%}); mean chosen - rejected = "
            f"{bias['mean_difference']:+.1f} {bias['units']}"
            # Only longer chosen answers teach length; longer rejected ones teach the opposite, if anything.
            + (" (DPO can learn verbosity from this)" if bias["chosen_longer"] > bias["rejected_longer"]
               and bias["mean_difference"] > 0 else "")
        )
    dup = report["duplicate_prompts"]
    lines.append(f"duplicate prompts: {dup['rows']} rows repeat an earlier prompt ({dup['distinct_prompts']} "
                 f"distinct prompts repeated); identical pairs: {report['identical_pairs']}")
    ties = report["tied_scores"]
    lines.append("scores: none found" if ties is None else
                 f"scores: {ties['tied']} of {ties['rows_with_scores']} rows have tied scores")
    unfinished = report["unfinished_responses"]
    if any(unfinished.values()):
        lines.append(f"responses marked unfinished (cut off, so they get no EOS): {unfinished['chosen']} chosen, "
                     f"{unfinished['rejected']} rejected")
    chat = report["conversations"]
    if chat is not None:
        lines.append(f"conversations: {chat['assistant_turns']['mean']} assistant turns on average (max "
                     f"{chat['assistant_turns']['max']}), {chat['rows_with_tools']} rows with tools, "
                     f"{chat['rows_with_tool_calls']} with tool calls, template arguments {chat['template_kwargs']} "
                     f"(+ {chat['rows_with_template_kwargs']} rows with their own)")
    boundary = report["boundary"]
    if boundary["merges"] is not None:
        lines.append(f"boundary merges (tokens merged across prompt|response): {boundary['merges']}")
    if boundary["glued_text_rows"]:
        lines.append(glued_text_warning(boundary["glued_text_rows"]))
    if "plot" in report:
        lines.append(f"histogram written to {report['plot']}")
    return "\n".join(lines)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def save_length_plot(tally: _Tally, units: str, path: str) -> None:
    """Histograms of prompt lengths, chosen vs rejected lengths, and their differences (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DpokitError("--plot needs matplotlib: pip install 'dpokit[plot]'") from None
    lengths = tally.lengths
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(lengths["prompt"], bins=40, color="tab:gray")
    axes[0].set_title("prompt")
    axes[1].hist([lengths["chosen"], lengths["rejected"]], bins=40, label=["chosen", "rejected"],
                 color=["tab:green", "tab:red"], alpha=0.7, histtype="stepfilled")
    axes[1].legend()
    axes[1].set_title("responses")
    axes[2].hist([c - r for c, r in zip(lengths["chosen"], lengths["rejected"], strict=True)], bins=40,
                 color="tab:blue")
    axes[2].axvline(0, color="black", linewidth=1)
    axes[2].set_title("chosen - rejected (length bias)")
    for ax in axes:
        ax.set_xlabel(units)
    axes[0].set_ylabel("pairs")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _describe(values: array) -> dict[str, Any]:
    if not values:
        return {"count": 0, "min": None, "mean": None, "median": None, "p95": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)
    return {"count": n, "min": ordered[0], "mean": _round(sum(ordered) / n), "median": ordered[(n - 1) // 2],
            "p95": ordered[min(n - 1, math.ceil(0.95 * n) - 1)], "max": ordered[-1]}


def _characters(text: Text) -> int:
    return len(text) if isinstance(text, str) else sum(len(m["content"] or "") for m in text)


def _prompt_key(prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _fraction(part: int, whole: int) -> float | None:
    return _round(part / whole) if whole else None


def _round(x: float) -> float:
    return round(x, 4)


def _prompt_rule(cut: dict) -> str:
    """How long prompts are cut, in the options' words (never printing an unset option as None)."""
    mode = cut["truncation_mode"]
    if cut["max_prompt_length"] is not None:
        return f"--max-prompt-length {cut['max_prompt_length']}, {mode}"
    if cut["min_response_share"] > 0:
        return f"long prompts cut ({mode}) so responses keep --min-response-share {cut['min_response_share']:g}"
    return "prompts are never cut: no --max-prompt-length, --min-response-share 0"
