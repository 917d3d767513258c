"""Settings that would be taken silently: capped with one line, warned about with the numbers.

Each check runs before any heavy work and says what it did; none changes a setting without a line.
"""

from __future__ import annotations

from typing import Any

from dpokit.errors import DpokitError
from dpokit.io import Log
from dpokit.paths import local_path

# Config attributes that hold a model's number of positions, in the order architectures use them.
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Tokenizers without a known limit report a huge sentinel (int(1e30)); anything this large means "none".
_NO_LIMIT = 10**9


def _model_positions(model_config: Any) -> tuple[int, str] | None:
    for name in _POSITION_FIELDS:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"the model's {name}"
    return None


def _tokenizer_length(tokenizer: Any) -> int | None:
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < _NO_LIMIT else None


def context_limit(model_config: Any, tokenizer: Any = None) -> tuple[int, str] | None:
    """(positions, where that number comes from): the positions the model's config declares; the
    tokenizer's model_max_length only when the config declares none (the tokenizer's field is
    advisory: it goes stale after a context extension, or when a tokenizer is copied from the base
    model). None when neither says."""
    positions = _model_positions(model_config)
    if positions is not None:
        return positions
    length = _tokenizer_length(tokenizer)
    return (length, "the tokenizer's model_max_length; the model's config declares none") if length else None


def fit_max_length(max_length: int, max_prompt_length: int | None, model_config: Any, tokenizer: Any,
                   log: Log) -> int:
    """--max-length, capped (with one line) at the positions the model has (`context_limit`): past
    them a model trains on positions it never learned (or fails on an index). A tokenizer's
    smaller model_max_length is said in one line and the user's length kept."""
    limit = context_limit(model_config, tokenizer)
    if limit is None or max_length <= limit[0]:
        advised = _tokenizer_length(tokenizer)
        if limit is not None and advised is not None and advised < max_length:
            log(f"note: the tokenizer's model_max_length ({advised}) is below --max-length {max_length}; keeping "
                f"{max_length}: {limit[1]} ({limit[0]}) decides, the tokenizer's field is advisory")
        return max_length
    positions, source = limit
    if max_prompt_length is not None and max_prompt_length >= positions:
        raise DpokitError(f"--max-prompt-length ({max_prompt_length}) must be below the model's context "
                          f"({positions} positions, {source})")
    log(f"--max-length {max_length} is beyond the model's context ({positions} positions, {source}); "
        f"using --max-length {positions}")
    return positions


def warn_idle_options(cfg, log: Log) -> None:
    """Options that do nothing in this run, and held-out data that is the training data."""
    t, d, lo = cfg.train, cfg.data, cfg.loss
    if t.eval_every and not d.eval_data:
        log(f"warning: --eval-every {t.eval_every} does nothing without --eval-data")
    if lo.sync_reference_alpha != type(lo)().sync_reference_alpha and not lo.sync_reference_steps:
        log(f"warning: --sync-reference-alpha {lo.sync_reference_alpha} does nothing without --sync-reference-steps")
    train_file, eval_file = local_path(d.data), local_path(d.eval_data)
    if d.eval_data and (d.eval_data == d.data or (train_file is not None and train_file == eval_file)):
        log(f"warning: --eval-data is the training data ({d.data}): its figures measure fit, not generalisation")


def warn_warmup(warmup: int, total_steps: int, learning_rate: float, log: Log) -> None:
    """A warm-up longer than the run never reaches the peak learning rate."""
    if warmup > total_steps:
        highest = learning_rate * total_steps / warmup
        log(f"warning: a warm-up of {warmup} steps is longer than the whole run ({total_steps} step(s)): the "
            f"learning rate never reaches --learning-rate {learning_rate:g} (highest {highest:.3g}, at step "
            f"{total_steps})")
