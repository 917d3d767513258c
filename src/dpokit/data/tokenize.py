"""Pairs of strings -> token ids, with BOS once, EOS once and an exact prompt/response boundary.

The rules, in order (README "How pairs are tokenized" repeats them for users):

1. Special tokens: the prompt starts with BOS exactly once when the tokenizer itself adds BOS
   (a BOS already written into the text is not doubled); each response ends with EOS exactly
   once (an EOS already written at its end is not doubled).
2. Boundary: a response's tokens are the tokens of the full text `prompt + response` after the
   prompt's own tokens. When the tokenizer merges characters across the boundary (the full
   text's tokens do not start with the prompt's), the prompt keeps its stand-alone tokens -
   the ones a model sees at generation time - and the response is tokenized on its own; such
   pairs are counted as `boundary_merges`.
3. Truncation, only when prompt + the longer response exceed `max_length`: the prompt is cut
   from the left to `max_prompt_length` tokens (BOS kept) if that is set, then both responses
   are cut from the right to the room left (a cut response loses its EOS, since it did not
   end). A pair whose prompt leaves no room for a single response token is dropped.
4. Pairs whose chosen and rejected tokens are identical carry no preference: dropped.
Every cut and drop is counted in `TokenizeStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dpokit.data.read import PreferencePair
from dpokit.errors import DpokitError


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. `prompt_ids` includes BOS; each response includes its EOS."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    index: int

    @property
    def num_tokens(self) -> int:
        """Tokens processed for this pair: two full sequences."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    dropped_prompt_too_long: int = 0
    dropped_identical: int = 0
    boundary_merges: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.rows} pairs kept; {self.prompts_cut} prompts and {self.responses_cut} "
            f"responses cut to fit; dropped {self.dropped_prompt_too_long} with a prompt too long, "
            f"{self.dropped_identical} with chosen == rejected; {self.boundary_merges} boundary merges"
        )


class PairTokenizer:
    """Applies the module's rules with one Hugging Face tokenizer and one set of limits."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None):
        if tokenizer.eos_token_id is None:
            raise DpokitError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.eos_id: int = tokenizer.eos_token_id
        self.bos_id: int | None = tokenizer.bos_token_id if _tokenizer_adds_bos(tokenizer) else None

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def tokenize(self, pairs: Sequence[PreferencePair]) -> tuple[list[TokenizedPair], TokenizeStats]:
        stats = TokenizeStats(rows=len(pairs))
        prompts = self._encode([p.prompt for p in pairs])
        full_chosen = self._encode([p.prompt + p.chosen for p in pairs])
        full_rejected = self._encode([p.prompt + p.rejected for p in pairs])
        out = []
        for pair, prompt, fc, fr in zip(pairs, prompts, full_chosen, full_rejected, strict=True):
            chosen, merged_c = self._response_ids(prompt, fc, pair.chosen)
            rejected, merged_r = self._response_ids(prompt, fr, pair.rejected)
            stats.boundary_merges += merged_c or merged_r
            tokenized = self._assemble(prompt, chosen, rejected, pair.index, stats)
            if tokenized is not None:
                out.append(tokenized)
        stats.kept = len(out)
        return out, stats

    def _response_ids(self, prompt: list[int], full: list[int], response: str) -> tuple[list[int], bool]:
        if full[: len(prompt)] == prompt:
            return full[len(prompt) :], False
        return self._encode([response])[0], True

    def _assemble(
        self, prompt: list[int], chosen: list[int], rejected: list[int], index: int, stats: TokenizeStats
    ) -> TokenizedPair | None:
        if self.bos_id is not None:
            while prompt and prompt[0] == self.bos_id:
                prompt = prompt[1:]
            prompt = [self.bos_id, *prompt]
        chosen, rejected = _with_one_eos(chosen, self.eos_id), _with_one_eos(rejected, self.eos_id)

        if len(prompt) + max(len(chosen), len(rejected)) > self.max_length:
            keep = self.max_prompt_length
            if keep is not None and len(prompt) > keep:
                head = prompt[:1] if self.bos_id is not None else []
                prompt = head + prompt[len(prompt) - (keep - len(head)) :]
                stats.prompts_cut += 1
            room = self.max_length - len(prompt)
            if room < 1:
                stats.dropped_prompt_too_long += 1
                stats.dropped_rows.append(index)
                return None
            if max(len(chosen), len(rejected)) > room:
                chosen, rejected = chosen[:room], rejected[:room]
                stats.responses_cut += 1
        if chosen == rejected:
            stats.dropped_identical += 1
            stats.dropped_rows.append(index)
            return None
        return TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), index)


def _with_one_eos(ids: list[int], eos_id: int) -> list[int]:
    while ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return [*ids, eos_id]


def _tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer's own encoding starts with BOS (Llama-style), not for GPT-2-style."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos
