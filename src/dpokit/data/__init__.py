"""Preference data: read rows, normalise them to pairs, tokenize pairs, batch them."""

from __future__ import annotations

from dpokit.data.doctor import glued_text, glued_text_warning
from dpokit.data.pairs import PreferencePair, ReadStats, read_pairs
from dpokit.data.tokenize import PairTokenizer, TokenizedPair, TokenizeStats
from dpokit.errors import DpokitError
from dpokit.io import Log, counted

__all__ = ["PairTokenizer", "PreferencePair", "ReadStats", "TokenizeStats", "TokenizedPair",
           "load_tokenized_pairs", "read_pairs", "skip_report"]

_ROWS_SHOWN = 20


def load_tokenized_pairs(
    path: str, pair_tokenizer: PairTokenizer, log: Log = print, data=None, counts: dict | None = None
) -> list[TokenizedPair]:
    """Read, normalise and tokenize a source of pairs (`data`: a DataConfig, default settings
    when None); log what was skipped, cut or dropped, by reason and row; refuse an empty result.
    `counts`, when given, receives the figures logged: rows read, pairs kept, rows cut, skips by reason."""
    reader = read_pairs(path, data)
    glued = [0]

    def counting_glued_text():  # the data doctor's warning, counted while the pairs stream past
        for pair in reader:
            glued[0] += glued_text(pair)
            yield pair

    pairs, stats = pair_tokenizer.tokenize(counting_glued_text(), where=reader.source.where)
    read = reader.stats
    log(f"{path}: {counted(read.rows_read, 'row')} read ({read.layout} layout); {stats.summary(read.rows_read)}")
    for line in skip_report(read, stats):
        log(f"{path}: {line}")
    if any(read.unfinished.values()):
        log(f"{path}: {read.unfinished['chosen']} chosen and {read.unfinished['rejected']} rejected responses "
            "marked unfinished (cut off): no EOS appended")
    if glued[0]:
        log(f"{path}: {glued_text_warning(glued[0])}")
    if counts is not None:
        counts.update(rows_read=read.rows_read, pairs_kept=len(pairs), rows_cut=stats.rows_cut,
                      skipped={reason: len(rows) for reason, rows in {**read.skipped, **stats.skipped}.items()})
    if not pairs:
        first = next(iter({**read.examples, **stats.examples}.values()), None)
        raise DpokitError(
            f"{path}: no usable pairs ({stats.summary(read.rows_read)})"
            + (f"; first problem: {first}" if first else "; raise --max-length or check the data")
        )
    return pairs


def skip_report(read: ReadStats, stats: TokenizeStats, rows_shown: int = _ROWS_SHOWN) -> list[str]:
    """One line per skip reason: how many rows, which ones, and the first row's problem."""
    lines = []
    for reason, rows in {**read.skipped, **stats.skipped}.items():
        unit = read.unit + ("s" if len(rows) > 1 else "")
        shown = ", ".join(map(str, rows[:rows_shown])) + (", ..." if len(rows) > rows_shown else "")
        example = read.examples.get(reason) or stats.examples.get(reason, "")
        example = example.removeprefix(f"{read.source}, ")
        lines.append(f"skipped {len(rows)} ({reason}) at {unit} {shown} - e.g. {example}")
    return lines
