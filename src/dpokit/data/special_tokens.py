"""Where a tokenizer's BOS and EOS may stand in a pair (rule 1 of `data/tokenize.py`): the check that
skips a response holding one where the text, not the template, put it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from dpokit.data.pairs import Text


def special_token_problem(tokenizer, ids: list[int], name: str, response: Text, finished: bool = True) -> str | None:
    """Why the response `ids` (after rule 1) of field `name` cannot be trained, or None: a BOS, or an
    EOS before its end, that the response's own text holds."""
    if not ids:
        return f"field '{name}' holds nothing but the EOS token, and is marked unfinished"
    # A finished response's final token is its EOS, which is BOS too for GPT-2, Pythia and OPT.
    body = ids[:-1] if finished else ids
    found = [(kind, token) for kind, token, token_id in (("EOS", tokenizer.eos_token, tokenizer.eos_token_id),
                                                          ("BOS", tokenizer.bos_token, tokenizer.bos_token_id))
             if token_id is not None and token_id in body]
    if not found:
        return None
    if isinstance(response, str):
        kind, token = found[0]
        return f"field '{name}' contains the {kind} token {token!r}" + (" before its end" if kind == "EOS" else "")
    return _special_in_messages(response, name, found)


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer's own encoding starts with BOS (Llama-style), not for GPT-2-style."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def _special_in_messages(messages: Sequence[dict], name: str, found: list[tuple[str, str]]) -> str | None:
    """A chat response's BOS and EOS tokens are the template's own (an earlier turn's end, a turn's
    start where BOS is ChatML's `<|im_start|>`), part of the rendered text as its final EOS is,
    unless a message's own text holds one: that one names the problem."""
    for i, message in enumerate(messages):
        for kind, token in found:
            if token and any(token in text for text in _strings(message)):
                return f"field '{name}', message {i} holds the {kind} token {token!r} in its own text"
    return None


def _strings(value) -> Iterator[str]:
    """Every string inside a message list (contents, tool call names and arguments, ...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
