"""Pairs built from samples train on the token ids that were sampled, never on re-tokenized text.

A sampled response's text is its ids decoded (`decode_response`), and decoding loses
information: a response cut inside a multi-byte character, or any invalid UTF-8, becomes U+FFFD,
and the stop token the model ended on is dropped (a chat model's generation config may stop on
`<|im_end|>` where the tokenizer's EOS is `<|endoftext|>`). Tokenizing that text again trains on
ids the model never produced. So the pair rows `online` and the demo write carry the ids beside
the text (`SAMPLED_ID_FIELDS`):

- `chosen_ids`, `rejected_ids` (both or neither): each response's ids exactly as sampled, ending
  with the stop token it was sampled with when it finished, with none when the token limit cut it;
- `prompt_ids` (optional): the prompt's ids as the sampler fed them.

Tokenization (`data/tokenize.py`, rule 5) takes such a pair's ids verbatim once they are shown
to be the row's own: `prompt_ids` must equal the prompt's encoding by training's rules (what the
sampler used: `PairTokenizer.encode_prompts`), and each response's ids must decode to the row's
response text (the sampler wrote the text as that decoding). A row that fails is skipped as
`sampled_ids_mismatch`, naming the field; truncation and the identical-pair check then apply as to
any pair. The `*_finished` flags are not consulted: the sampled ids already end as they ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpokit.data.sources import RowSkip, value_type
from dpokit.errors import DpokitError

SAMPLED_ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
MISMATCH = "sampled_ids_mismatch"


@dataclass(frozen=True)
class SampledIds:
    """The ids a pair's responses (and, when given, its prompt) were sampled as."""

    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    prompt: tuple[int, ...] | None = None


def decode_response(tokenizer, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    """The response's text as it continues the prompt: decoding the response alone loses the
    leading space under SentencePiece and word-level tokenizers, so cut the decoded prompt off
    the decoded whole where it is a prefix. Special tokens (the stop token) are left out."""
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    whole = tokenizer.decode(list(prompt_ids) + list(response_ids), skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head):]
    return tokenizer.decode(list(response_ids), skip_special_tokens=True)


def read_sampled_ids(row: dict[str, Any], where: str) -> SampledIds | None:
    """A row's sampled ids, None when it has none; a malformed field is an error naming it."""
    given = {name: row.get(name) for name in SAMPLED_ID_FIELDS if row.get(name) is not None}
    if not given:
        return None
    if "chosen_ids" not in given or "rejected_ids" not in given:
        missing = next(name for name in ("chosen_ids", "rejected_ids") if name not in given)
        raise DpokitError(f"{where}: field '{missing}' is missing: 'chosen_ids' and 'rejected_ids' (the sampled "
                          "token ids of the responses) go together")
    ids = {name: _token_ids(value, name, where) for name, value in given.items()}
    return SampledIds(ids["chosen_ids"], ids["rejected_ids"], ids.get("prompt_ids"))


def _token_ids(value: Any, name: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        shown = value_type(value) if not isinstance(value, (list, tuple)) else "a list holding " + (
            "nothing" if not value else "something other than non-negative integers")
        raise DpokitError(f"{where}: field '{name}' must be a non-empty list of token ids, got {shown}")
    return tuple(value)


def sampled_pair_ids(tokenizer, ids: SampledIds, prompt_ids: list[int], chosen: Any,
                     rejected: Any) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of a pair built from samples, checked against the row:
    `prompt_ids` is the prompt encoded by training's rules, `chosen`/`rejected` the row's responses
    (text, or the one assistant message holding it). Raises RowSkip when the ids are not the row's."""
    if ids.prompt is not None and list(ids.prompt) != prompt_ids:
        raise RowSkip(MISMATCH, "field 'prompt_ids' is not the prompt's tokens under this tokenizer and chat "
                                "template (sampled with another one?)")
    if not prompt_ids:
        raise RowSkip("empty_prompt", "field 'prompt' has no tokens and the tokenizer adds no BOS to start from")
    for name, response_ids, response in (("chosen", ids.chosen, chosen), ("rejected", ids.rejected, rejected)):
        text = _response_text(response, name)
        if max(response_ids) >= len(tokenizer):
            raise RowSkip(MISMATCH, f"field '{name}_ids' holds id {max(response_ids)}, beyond the tokenizer's "
                                    f"{len(tokenizer)} tokens")
        if decode_response(tokenizer, prompt_ids, response_ids) != text:
            raise RowSkip(MISMATCH, f"field '{name}_ids' does not decode to the text of '{name}' (edited after "
                                    "sampling, or sampled with another tokenizer?)")
    return list(prompt_ids), list(ids.chosen), list(ids.rejected)


def _response_text(response: Any, name: str) -> str:
    """A sampled response's text: the string, or the content of its one assistant message."""
    if isinstance(response, str):
        return response
    if len(response) == 1 and response[0].get("role") == "assistant" and isinstance(response[0].get("content"), str):
        return response[0]["content"]
    raise RowSkip(MISMATCH, f"field '{name}_ids' goes with one sampled reply, but '{name}' holds "
                            f"{len(response)} messages")
