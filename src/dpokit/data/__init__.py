"""Preference data: read rows, tokenize pairs, batch them."""

from __future__ import annotations

from collections.abc import Callable

from dpokit.data.read import PreferencePair, read_jsonl_pairs
from dpokit.data.tokenize import PairTokenizer, TokenizedPair, TokenizeStats
from dpokit.errors import DpokitError

__all__ = ["PairTokenizer", "PreferencePair", "TokenizeStats", "TokenizedPair", "load_tokenized_pairs"]


def load_tokenized_pairs(
    path: str, pair_tokenizer: PairTokenizer, log: Callable[[str], None] = print
) -> list[TokenizedPair]:
    """Read and tokenize a file of pairs, report what was cut or dropped, refuse an empty result."""
    pairs, stats = pair_tokenizer.tokenize(read_jsonl_pairs(path))
    log(f"{path}: {stats.summary()}")
    if not pairs:
        raise DpokitError(
            f"{path}: no usable pairs after tokenization ({stats.summary()}); "
            "raise --max-length or check the data"
        )
    return pairs
