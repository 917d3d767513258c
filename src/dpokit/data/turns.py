"""Which tokens of a response of several messages are the assistant's.

A response holding others' messages (an agent's turn with its tool results under `--train-on-turns
last`; under `all`, every turn from the first assistant turn where chosen and rejected differ to
the end) holds their text and template markup too; only the assistant's own tokens carry loss.
An assistant message's tokens are the text its turn adds after the template's generation prompt
(the role header is context, as in a single-turn prompt), up to and including its end-of-turn
(EOS or the template's own marker); whitespace a template writes after an EOS is never generated,
so it is not trained. Spans come from rendering the conversation turn by turn, so they are the
template's own; a template that renders an earlier turn differently once later turns follow
(one that drops reasoning from past turns, say) has no exact mask: `template_boundary`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dpokit.data.conversations import Message
from dpokit.data.sources import RowSkip

Render = Callable[[list[Message], bool], str]  # (messages, add_generation_prompt) -> text


def assistant_spans(render: Render, prompt: Sequence[Message], reply: Sequence[Message], prompt_text: str,
                    full_text: str, eos_text: str) -> list[tuple[int, int]]:
    """Character spans, relative to the response text, of each assistant message in `reply`."""
    spans = []
    for j, message in enumerate(reply):
        if message["role"] != "assistant":
            continue
        head = render([*prompt, *reply[:j]], True)
        done = render([*prompt, *reply[: j + 1]], False)
        # A cut-off last reply's text stops before the turn end its rendering adds (data/render.py).
        cut_off = j == len(reply) - 1 and done.startswith(full_text)
        if not (full_text.startswith(head) and (full_text.startswith(done) or cut_off) and len(head) <= len(done)):
            raise RowSkip("template_boundary", f"the chat template renders response message {j} differently "
                                               "once later turns follow: no exact mask for its tokens")
        end = len(done)
        if done.rstrip().endswith(eos_text):
            end = len(done.rstrip())
        spans.append((len(head) - len(prompt_text), min(end, len(full_text)) - len(prompt_text)))
    return spans


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for each token (character offsets) inside an assistant span; a token across a span's
    edge belongs to neither side exactly: `template_boundary`."""
    mask = []
    for start, end in offsets:
        inside = any(a <= start and end <= b for a, b in spans)
        if not inside and any(start < a < end or start < b < end for a, b in spans):
            raise RowSkip("template_boundary", "a token spans the edge of an assistant turn: no exact mask")
        mask.append(inside)
    return mask
