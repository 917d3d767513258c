"""Canonical pairs -> token ids, with BOS once, EOS once and an exact prompt/response boundary.

The rules, in order (docs/training.md, "Tokenization", repeats them for users):

0. Rendering (`data/render.py`): text pairs are used as written, the sequence being `prompt + response`.
   Conversational pairs go through the tokenizer's chat template (or `--chat-template`): the
   prompt is the conversation rendered with the generation prompt, and each response is the text
   the full conversation (prompt + reply) renders to after it. If the prompt's rendering is not a
   prefix of the full rendering the boundary is undefined: the row is skipped as
   `template_boundary` (a template that raises for a row: `template_error`). The template also
   gets the row's `tools` and template arguments (`data/templates.py`); a row with tools or tool
   calls that the template does not render (its text is the same without them) is skipped as
   `tools_unsupported`.
1. Special tokens: the prompt starts with BOS exactly once when the tokenizer itself adds BOS or
   the rendered text already starts with it (a template that writes BOS is not doubled by the
   tokenizer, and a BOS written into the text is not doubled either). Each response ends with EOS
   exactly once: an EOS already at its end is not doubled, and whitespace a template writes after
   its own EOS (`<|im_end|>\\n`) is dropped, since generation stops at EOS and never produces it.
   A response holding BOS, or EOS before its end (a literal `</s>` in the text, say), cannot
   satisfy this: the row is skipped (`special_token_in_response`). One exception, responses of
   several messages under templates that write BOS or EOS at every turn (ChatML's `<|im_end|>`,
   and `<|im_start|>` where it is BOS, as in SmolLM2; Llama 3's `<|eot_id|>`): a BOS or EOS the
   template writes inside a conversational response is part of the rendered text, exactly as the
   template writes it, and only one inside a message's own text is suspect; the response still
   ends with exactly one final EOS. Where BOS and EOS are one
   token (GPT-2, Pythia, OPT) a response's final EOS is that token, never a stray BOS. A prompt
   left with no token at all (empty text, no BOS) gives the first response token nothing to be
   predicted from: the row is skipped (`empty_prompt`). A response marked unfinished
   (`chosen_finished` / `rejected_finished` false, `data/pairs.py`: cut off by a sampler's token
   limit) never ended, so it gets no EOS: its tokens are those a finished one would have, less the
   final EOS, and a chat template's turn end after its text is not rendered (`data/render.py`).
   Sampling encodes prompts with these same rules 0 and 1 (`PairTokenizer.encode_prompts`; no
   truncation), so a policy is sampled in exactly the context it was trained on.
2. Boundary: a response's tokens are the tokens of the full text `prompt + response` after the
   prompt's own tokens. When the tokenizer merges characters across the boundary (the full
   text's tokens do not start with the prompt's), the prompt keeps its stand-alone tokens -
   the ones a model sees at generation time - and the response is tokenized on its own; such
   pairs are counted as `boundary_merges`.
3. Truncation, only when prompt + the longer response exceed `max_length`: the prompt is cut to
   `max_prompt_length` tokens if that is set, else just enough that the longer response keeps
   `min_response_share` of `max_length` (all of it when shorter; at least one token) - from the
   left by default (`keep_end`: BOS and the prompt's end are kept), from the right with
   `keep_start` - then both responses are cut from the right to the room left (a cut response
   loses its EOS, since it did not end). So no pair is lost to length by default; only with
   `min_response_share` 0 (prompts never cut) is a pair whose prompt leaves no room for a single
   response token dropped (`prompt_too_long`).
4. Pairs whose chosen and rejected tokens are identical carry no preference: dropped
   (`identical_tokens`).
5. Pairs built from samples (`chosen_ids` / `rejected_ids`, `data/sampled.py`) skip rules 0-2 for
   their ids: the sampled ids are used verbatim, once checked to be the row's (the prompt's ids
   are its encoding by rules 0-1, each response's ids decode to its text; else
   `sampled_ids_mismatch`), so a response cut inside a character, or ended by a stop token that
   is not the tokenizer's EOS, trains on what was sampled. Rules 3 and 4 apply as to any pair.
Every cut and drop is counted in `TokenizeStats`, with the row numbers of the drops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

from dpokit.config import TRUNCATION_MODES, DataConfig
from dpokit.data.pairs import PreferencePair, Text
from dpokit.data.render import PairRenderer, read_chat_template
from dpokit.data.sampled import sampled_pair_ids
from dpokit.data.sources import RowSkip
from dpokit.data.special_tokens import special_token_problem, tokenizer_adds_bos
from dpokit.data.templates import parse_template_kwargs
from dpokit.data.turns import assistant_spans, token_mask
from dpokit.errors import DpokitError

# Share of --max-length a long prompt leaves to the responses when --max-prompt-length is not set.
MIN_RESPONSE_SHARE = DataConfig.min_response_share  # the default, from its one place
_CHUNK = 512  # pairs encoded per batched tokenizer call


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. `prompt_ids` includes BOS; each response ends with its EOS unless it
    was marked unfinished or cut by truncation."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    index: int
    scores: tuple[float, float] | None = None
    chosen_mask: tuple[bool, ...] | None = None  # several messages: True on the assistant's tokens, in the loss
    rejected_mask: tuple[bool, ...] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens processed for this pair: two full sequences."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class EncodedPair:
    """A pair's ids after rules 0-2, before truncation (what the data doctor measures)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    index: int
    scores: tuple[float, float] | None = None
    chosen_mask: tuple[bool, ...] | None = None  # several messages: True on the assistant's tokens, trained
    rejected_mask: tuple[bool, ...] | None = None


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    rows_cut: int = 0
    dropped_prompt_too_long: int = 0
    dropped_identical: int = 0
    boundary_merges: int = 0
    dropped_rows: list[int] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    where: Callable[[int], str] = field(default=lambda n: f"row {n}", repr=False, compare=False)

    def drop(self, reason: str, row: int, message: str) -> None:
        self.dropped_rows.append(row)
        self.skipped.setdefault(reason, []).append(row)
        self.examples.setdefault(reason, message)

    def summary(self, rows_read: int | None = None) -> str:
        """`rows_read`: every row of the source, those skipped before tokenizing included."""
        skipped = sum(len(rows) for reason, rows in self.skipped.items()
                      if reason not in ("prompt_too_long", "identical_tokens"))
        return (
            f"{self.kept}/{self.rows if rows_read is None else rows_read} pairs kept; {self.prompts_cut} prompts and {self.responses_cut} "
            f"responses cut to fit; dropped {self.dropped_prompt_too_long} with a prompt too long, "
            f"{self.dropped_identical} with chosen == rejected tokens"
            + (f", {skipped} that cannot be tokenized exactly (see below)" if skipped else "")
            + f"; {self.boundary_merges} boundary merges"
        )


class PairTokenizer:
    """Applies the module's rules with one Hugging Face tokenizer and one set of limits."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None,
                 truncation_mode: str = "keep_end", strict: bool = False,
                 min_response_share: float = MIN_RESPONSE_SHARE, template_kwargs: dict | None = None):
        if tokenizer.eos_token_id is None:
            raise DpokitError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
        if truncation_mode not in TRUNCATION_MODES:
            raise DpokitError(f"--truncation-mode must be one of {', '.join(TRUNCATION_MODES)}; "
                              f"got {truncation_mode!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.strict = strict
        self.min_response_share = min_response_share
        self.renderer = PairRenderer(tokenizer, template_kwargs)  # rule 0
        self.eos_id: int = tokenizer.eos_token_id
        self.bos_id: int | None = tokenizer.bos_token_id
        self.adds_bos = tokenizer_adds_bos(tokenizer)
        self._blank: dict[int, bool] = {}

    @classmethod
    def from_config(cls, tokenizer, data) -> PairTokenizer:
        """Build from a `DataConfig`; `--chat-template FILE` replaces the tokenizer's template
        (so a tokenizer saved afterwards carries the template the model was trained with)."""
        if data.chat_template:
            tokenizer.chat_template = read_chat_template(data.chat_template)
        return cls(tokenizer, data.max_length, data.max_prompt_length, data.truncation_mode, data.strict,
                   data.min_response_share,
                   template_kwargs=parse_template_kwargs(getattr(data, "chat_template_kwargs", None)))

    def render(self, pair: PreferencePair) -> tuple[str, str, str]:
        """Rule 0: (prompt, chosen, rejected) texts whose concatenations are the full rendered sequences."""
        return self.renderer.render(pair)

    # --- rules 1 and 2: ids with an exact boundary ---------------------------------------------

    def encode(self, pairs: Sequence[PreferencePair], stats: TokenizeStats) -> list[EncodedPair]:
        """Rules 0-2 for a chunk of pairs (one batched tokenizer call per field)."""
        if any(pair.sampled_ids is not None for pair in pairs):
            return self._encode_sampled(pairs, stats)
        rendered = []
        for pair in pairs:
            stats.rows += 1
            try:
                rendered.append((pair, self.render(pair)))
            except RowSkip as bad:
                self._skip(stats, bad.reason, pair.index, str(bad))
        if not rendered:
            return []
        prompts = self._encode([p for _, (p, _, _) in rendered])
        full_chosen = self._encode([p + c for _, (p, c, _) in rendered])
        full_rejected = self._encode([p + r for _, (p, _, r) in rendered])
        out = []
        for (pair, (prompt_text, chosen_text, rejected_text)), prompt, fc, fr in zip(
            rendered, prompts, full_chosen, full_rejected, strict=True
        ):
            chosen, merged_c = self._response_ids(prompt, fc, chosen_text)
            rejected, merged_r = self._response_ids(prompt, fr, rejected_text)
            try:
                masks = (self._turn_mask(pair, pair.chosen, prompt_text, chosen_text, chosen, merged_c),
                         self._turn_mask(pair, pair.rejected, prompt_text, rejected_text, rejected, merged_r))
            except RowSkip as bad:
                self._skip(stats, bad.reason, pair.index, str(bad))
                continue
            finished = (pair.chosen_finished, pair.rejected_finished)
            chosen, rejected = self._with_end(chosen, finished[0]), self._with_end(rejected, finished[1])
            problem = (special_token_problem(self.tokenizer, chosen, "chosen", pair.chosen, finished[0])
                       or special_token_problem(self.tokenizer, rejected, "rejected", pair.rejected, finished[1]))
            if problem:
                # A BOS, or an EOS before the end, inside a response (often a literal "</s>" in scraped
                # text) would teach the model to stop and carry on: no exact tokenization exists.
                self._skip(stats, "special_token_in_response", pair.index, problem)
                continue
            prompt = self._with_one_bos(prompt)
            if not prompt:
                # Nothing precedes the first response token, so no position predicts it.
                self._skip(stats, "empty_prompt", pair.index,
                           "field 'prompt' has no tokens and the tokenizer adds no BOS to start from")
                continue
            stats.boundary_merges += merged_c or merged_r
            out.append(EncodedPair(prompt, chosen, rejected, pair.index, pair.scores,
                                   _ended_mask(masks[0], chosen, finished[0]),
                                   _ended_mask(masks[1], rejected, finished[1])))
        return out

    def _encode_sampled(self, pairs: Sequence[PreferencePair], stats: TokenizeStats) -> list[EncodedPair]:
        """Rule 5, in row order: pairs carrying their sampled ids get those ids, checked; the others rules 0-2."""
        out = []
        for pair in pairs:
            if pair.sampled_ids is None:
                out += self.encode([pair], stats)
                continue
            stats.rows += 1
            try:
                [prompt] = self.encode_prompts([pair.prompt])
                ids = sampled_pair_ids(self.tokenizer, pair.sampled_ids, prompt, pair.chosen, pair.rejected)
            except RowSkip as bad:
                self._skip(stats, bad.reason, pair.index, str(bad))
                continue
            out.append(EncodedPair(*ids, pair.index, pair.scores))
        return out

    def _turn_mask(self, pair: PreferencePair, reply: Text, prompt_text: str, response_text: str,
                   ids: list[int], merged: bool) -> list[bool] | None:
        """A response holding others' messages (tool results, user turns), in either
        --train-on-turns mode: True on the tokens that are the assistant's own (`data/turns.py`);
        None (every token trained) for text or assistant messages alone."""
        if isinstance(reply, str) or all(m["role"] == "assistant" for m in reply):
            return None
        spans = assistant_spans(self.renderer.turn_renderer(pair), pair.prompt, reply, prompt_text,
                                prompt_text + response_text, self.tokenizer.eos_token)
        text = response_text if merged else prompt_text + response_text
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if encoded["input_ids"][len(encoded["input_ids"]) - len(ids):] != ids:
            raise RowSkip("template_boundary", "the response's tokens shift when tokenized with offsets")
        shift = 0 if merged else len(prompt_text)
        offsets = encoded["offset_mapping"][len(encoded["input_ids"]) - len(ids):]
        return token_mask([(start - shift, end - shift) for start, end in offsets], spans)

    def encode_prompts(self, prompts: Sequence[str | Sequence[dict]]) -> list[list[int]]:
        """Prompt ids exactly as training gives them (rules 0 and 1, no truncation): what sampling
        feeds the model, so it is sampled in the context it was trained on. Raises RowSkip when the
        chat template fails for a prompt."""
        return [self._with_one_bos(ids) for ids in self._encode([self.renderer.render_prompt(p) for p in prompts])]

    def _skip(self, stats: TokenizeStats, reason: str, index: int, problem: str) -> None:
        message = f"{stats.where(index)}: {problem}"
        if self.strict:
            raise DpokitError(f"{message} (--strict)")
        stats.drop(reason, index, message)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _response_ids(self, prompt: list[int], full: list[int], response: str) -> tuple[list[int], bool]:
        if full[: len(prompt)] == prompt:
            return full[len(prompt) :], False
        return self._encode([response])[0], True

    def _with_one_bos(self, prompt: list[int]) -> list[int]:
        if self.bos_id is None:
            return prompt
        had_bos = bool(prompt) and prompt[0] == self.bos_id
        start = 0
        while start < len(prompt) and prompt[start] == self.bos_id:
            start += 1
        return ([self.bos_id] if self.adds_bos or had_bos else []) + prompt[start:]

    def _with_end(self, ids: list[int], finished: bool) -> list[int]:
        """Rule 1's end of a response: one EOS when it finished, none when it was cut off (the same
        tokens without their EOS, as truncation leaves them)."""
        ended = self._with_one_eos(ids)
        return ended if finished else ended[:-1]

    def _with_one_eos(self, ids: list[int]) -> list[int]:
        end = len(ids)
        while end and ids[end - 1] != self.eos_id and self._is_blank(ids[end - 1]):
            end -= 1
        if end and ids[end - 1] == self.eos_id:
            ids = ids[:end]  # whatever a template writes after its own EOS is never generated
        while ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return [*ids, self.eos_id]

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank:
            self._blank[token_id] = not self.tokenizer.decode([token_id]).strip()
        return self._blank[token_id]

    # --- rules 3 and 4: truncation and identical pairs -----------------------------------------

    def fit(self, pair: EncodedPair, stats: TokenizeStats) -> TokenizedPair | None:
        prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
        longest = max(len(chosen), len(rejected))
        if len(prompt) + longest > self.max_length:
            cut = False
            keep = self.max_prompt_length if self.max_prompt_length is not None else self._prompt_budget(longest)
            if keep is not None and len(prompt) > keep:
                if self.truncation_mode == "keep_start":
                    prompt = prompt[:keep]
                else:
                    head = prompt[:1] if self.bos_id is not None and prompt[:1] == [self.bos_id] else []
                    prompt = head + prompt[len(prompt) - (keep - len(head)) :]
                stats.prompts_cut += 1
                cut = True
            room = self.max_length - len(prompt)
            if room < 1:
                stats.dropped_prompt_too_long += 1
                stats.drop("prompt_too_long", pair.index, f"{stats.where(pair.index)}: the prompt alone has "
                                                          f"{len(prompt)} tokens (--max-length {self.max_length}, "
                                                          "--min-response-share 0: prompts are not cut)")
                return None
            if max(len(chosen), len(rejected)) > room:
                chosen, rejected = chosen[:room], rejected[:room]
                stats.responses_cut += 1
                cut = True
            stats.rows_cut += cut
        if chosen == rejected:
            stats.dropped_identical += 1
            stats.drop("identical_tokens", pair.index, f"{stats.where(pair.index)}: chosen and rejected have the same tokens")
            return None
        return TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), pair.index, pair.scores,
                             *_cut_masks(pair, len(chosen), len(rejected)))

    def _prompt_budget(self, longest: int) -> int | None:
        """Prompt tokens that leave the longer response `min_response_share` of max_length (all of
        it when shorter, one token at least); None when prompts are never cut (share 0)."""
        if self.min_response_share <= 0:
            return None
        floor = max(1, math.ceil(self.min_response_share * self.max_length))
        return max(1, self.max_length - min(longest, floor))

    # --- everything -----------------------------------------------------------------------------

    def iter_encoded(self, pairs: Iterable[PreferencePair], stats: TokenizeStats) -> Iterator[EncodedPair]:
        iterator = iter(pairs)
        while chunk := list(islice(iterator, _CHUNK)):
            yield from self.encode(chunk, stats)

    def tokenize(self, pairs: Iterable[PreferencePair],
                 where: Callable[[int], str] = lambda n: f"row {n}") -> tuple[list[TokenizedPair], TokenizeStats]:
        """All rules over an iterable of pairs, encoded in chunks (the input is read once)."""
        stats = TokenizeStats(where=where)
        out = []
        for encoded in self.iter_encoded(pairs, stats):
            tokenized = self.fit(encoded, stats)
            if tokenized is not None:
                out.append(tokenized)
        stats.kept = len(out)
        return out, stats


def _ended_mask(mask: list[bool] | None, ids: list[int], finished: bool) -> tuple[bool, ...] | None:
    """A token mask after rule 1: `ids` is a prefix of the raw response, plus the final EOS (trained)
    when it finished."""
    if mask is None:
        return None
    return (*mask[: len(ids) - 1], True) if finished else tuple(mask[: len(ids)])


def _cut_masks(pair: EncodedPair, chosen: int, rejected: int) -> tuple[tuple[bool, ...] | None, ...]:
    """The masks of a pair whose responses truncation cut to `chosen` and `rejected` tokens."""
    return tuple(None if mask is None else tuple(mask[:n])
                 for mask, n in ((pair.chosen_mask, chosen), (pair.rejected_mask, rejected)))
