"""Sources -> canonical pairs: open a source (`sources.py`) and normalise its rows (`formats.py`).

`read_pairs(spec, data_config)` is the one entry point; the pairs it yields are produced lazily,
row by row, so each source row is parsed into Python objects exactly once.
"""

from __future__ import annotations

from dpokit.data.formats import PairReader, PreferencePair, ReadStats
from dpokit.data.sources import open_source
from dpokit.errors import DpokitError

__all__ = ["PairReader", "PreferencePair", "ReadStats", "read_pairs"]


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
