"""Generation from a policy: batched, seeded, chat-template aware, with the KV cache.

`sample()` returns text; `generate_completions()` also keeps the token ids, which the KL
estimate in `dpokit.eval.evaluate` scores under policy and reference. Prompts are rendered and
tokenized by training's own prompt encoding (`PairTokenizer.encode_prompts`: the chat template
with its generation prompt for message lists, BOS exactly when training puts one), so the policy
is sampled in the context it was trained on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.config import ModelConfig, SamplingConfig, validate_sampling
from dpokit.data.conversations import CHAT_ROLES
from dpokit.data.sampled import decode_response
from dpokit.data.sources import RowSkip, parse_json
from dpokit.data.tokenize import PairTokenizer
from dpokit.errors import DpokitError
from dpokit.io import JsonlWriter
from dpokit.model.load import autocast_context, load_policy, load_tokenizer, resolve_device

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    """One sampled response. `response_ids` ends with the stop token it was sampled with (the
    tokenizer's EOS or one the generation config names) when `finished`; `text` is their decoding
    (`data/sampled.py`), which may not tokenize back to them."""

    text: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    finished: bool


# --- prompts -------------------------------------------------------------------------------


def check_prompt(prompt: Any, where: str) -> Prompt:
    """A prompt is a string or a list of {role, content} messages; anything else fails naming `where`."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DpokitError(f"{where}: message {i + 1} must be an object with string 'role' and 'content'")
            if message["role"] not in CHAT_ROLES:
                raise DpokitError(f"{where}: message {i + 1} has role '{message['role']}', not one a chat template "
                                  f"knows ({', '.join(CHAT_ROLES)})")
        return prompt
    raise DpokitError(f"{where}: field 'prompt' must be a string or a non-empty list of messages, "
                      f"got {type(prompt).__name__}")


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read the `prompt` field of each JSON Lines row (prompt files and preference files alike)."""
    path = Path(path)
    if limit is not None and limit < 1:  # 0 would otherwise read one prompt
        raise DpokitError(f"--max-prompts must be at least 1 (or left out for all); got {limit}")
    if not path.is_file():
        raise DpokitError(f"prompts file {path} does not exist" if not path.exists() else f"{path} is not a file")
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8-sig") as handle:  # a UTF-8 BOM (Windows editors) is not part of the text
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            row = parse_json(line, where)
            if not isinstance(row, dict) or "prompt" not in row:
                raise DpokitError(f"{where}: missing field 'prompt'")
            prompts.append(check_prompt(row["prompt"], where))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise DpokitError(f"prompts file {path} holds no rows")
    return prompts


def prompt_text(prompt: Prompt) -> str:
    """The plain text of a prompt, as judges see it: messages become 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def prompt_encoder(tokenizer, template_kwargs: dict[str, Any] | None = None) -> PairTokenizer:
    """Training's tokenizer rules for `tokenizer` (and the run's --chat-template-kwargs); sampling
    uses only its prompt encoding."""
    # The length limit is for pairs, never used here.
    return PairTokenizer(tokenizer, max_length=1, template_kwargs=template_kwargs)


def encode_prompt(tokenizer, prompt: Prompt, where: str = "prompt", encoder: PairTokenizer | None = None) -> list[int]:
    """Token ids of a prompt exactly as training gives them (`PairTokenizer.encode_prompts`): the
    same rendering and the same BOS rule, so the policy is sampled in the context it was trained on."""
    if isinstance(prompt, list) and not getattr(tokenizer, "chat_template", None):
        raise DpokitError(f"{where} is a list of chat messages but the tokenizer has no chat template")
    try:
        [ids] = (encoder or prompt_encoder(tokenizer)).encode_prompts([prompt])
    except RowSkip as bad:
        raise DpokitError(f"{where}: {bad}") from None
    if not ids:
        raise DpokitError(f"{where} is empty and the tokenizer adds no BOS: nothing to condition on")
    return ids


# --- generation ----------------------------------------------------------------------------


def _stop_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer plus any end tokens the model's generation config names (chat models)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if token is not None and token not in ids:
            ids.append(token)
    if not ids:
        raise DpokitError("the tokenizer has no EOS token: generation could never stop early")
    return ids


@contextlib.contextmanager
def _plain_generation_defaults(model):
    """Hide the checkpoint's generation_config during `generate`: its repetition penalty, min_p or
    top_k would otherwise fill our unset fields and silently change the sampling distribution."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _generation_config(stop_ids: list[int], pad_id: int, sampling: SamplingConfig):
    from transformers import GenerationConfig

    common = {"max_new_tokens": sampling.max_new_tokens, "eos_token_id": stop_ids, "pad_token_id": pad_id,
              "num_beams": 1, "use_cache": True}
    if sampling.temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k, **common)


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def generate_completions(model, tokenizer, prompts: Sequence[Prompt], sampling: SamplingConfig, *,
                         template_kwargs: dict[str, Any] | None = None, progress: bool = False,
                         autocast: Callable[[], Any] | None = None) -> Iterator[tuple[int, list[Completion]]]:
    """Yield (prompt index, its `sampling.num_samples` completions) in prompt order, as soon as each
    prompt is done.

    The K samples of a prompt are K rows of the batch; the batch holds `sampling.sample_batch_size`
    rows. The global RNG is forked and seeded once with `sampling.sample_seed`, so a fixed seed,
    prompt list and settings give the same completions, and the caller's RNG state is left
    untouched. `template_kwargs` are the run's --chat-template-kwargs: message prompts are rendered
    with the arguments training rendered them with.
    """
    from tqdm import tqdm

    validate_sampling(sampling)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = _stop_ids(model, tokenizer)
    gen_config = _generation_config(stop_ids, pad_id, sampling)
    encoder = prompt_encoder(tokenizer, template_kwargs)
    encoded = [encode_prompt(tokenizer, p, f"prompt {i + 1}", encoder) for i, p in enumerate(prompts)]
    rows = [(i, k) for i in range(len(prompts)) for k in range(sampling.num_samples)]
    done: dict[int, list[Completion]] = {}
    next_to_yield = 0
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    bar = tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _plain_generation_defaults(model):
            torch.manual_seed(sampling.sample_seed)
            for start in range(0, len(rows), sampling.sample_batch_size):
                chunk = [i for i, _ in rows[start:start + sampling.sample_batch_size]]
                for i, completion in _generate_chunk(model, tokenizer, [encoded[i] for i in chunk], gen_config,
                                                     pad_id, stop_ids, autocast):
                    done.setdefault(chunk[i], []).append(completion)
                while next_to_yield in done and len(done[next_to_yield]) == sampling.num_samples:
                    yield next_to_yield, done.pop(next_to_yield)
                    next_to_yield += 1
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)


def _generate_chunk(model, tokenizer, prompt_rows: list[list[int]], gen_config, pad_id: int, stop_ids: list[int],
                    autocast: Callable[[], Any] | None) -> Iterator[tuple[int, Completion]]:
    """One batch of `model.generate`: (row index in the chunk, its completion)."""
    input_ids, attention_mask = _left_padded(prompt_rows, pad_id, next(model.parameters()).device)
    with autocast() if autocast else contextlib.nullcontext():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config)
    new_tokens = out[:, input_ids.shape[1]:].tolist()
    for i, (prompt_ids, tokens) in enumerate(zip(prompt_rows, new_tokens, strict=True)):
        response, finished = _cut_at_stop(tokens, stop_ids)
        text = decode_response(tokenizer, prompt_ids, response)
        yield i, Completion(text, tuple(prompt_ids), tuple(response), finished)


def _cut_at_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first stop token; what follows is padding."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:position + 1], True
    return tokens, False


def sample(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[list[str]]:
    """Sample `num_samples` completions for each prompt (a string or a list of chat messages).

    Returns one list of completion texts per prompt, in prompt order. `temperature=0` is greedy.
    Completions stop at EOS or after `max_new_tokens` tokens. `template_kwargs`: the extra chat
    template arguments the model was trained with (--chat-template-kwargs), if any.
    """
    if isinstance(prompts, str | dict):
        raise DpokitError("sample() takes a list of prompts; wrap a single prompt in a list")
    prompts = [check_prompt(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    sampling = SamplingConfig(num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=max_new_tokens, sample_seed=seed, sample_batch_size=batch_size)
    results: list[list[str]] = [[] for _ in prompts]
    for index, completions in generate_completions(model, tokenizer, prompts, sampling,
                                                   template_kwargs=template_kwargs, progress=progress):
        results[index] = [c.text for c in completions]
    return results


def run_sample(model: ModelConfig, prompts: Sequence[Prompt], sampling: SamplingConfig, *,
               template_kwargs: dict[str, Any] | None = None, output: str | None = None, progress: bool = False,
               write: Callable[[str], None] = print) -> None:
    """`dpokit sample`: load `model.model`, sample every prompt, stream the rows out as prompts finish.

    With `output`, rows go to `output + ".partial"` as they finish (watch it grow) and the file is
    renamed to `output` when all are done, so `output` itself is only ever complete. Without it,
    completions are printed readably.
    """
    torch_device = resolve_device(model.device)
    tok = load_tokenizer(model.tokenizer or model.model, model.trust_remote_code)
    policy = load_policy(model.model, torch_device, model.trust_remote_code).eval()
    partial = Path(str(output) + ".partial") if output else None
    if partial is not None:
        partial.unlink(missing_ok=True)
    writer = JsonlWriter(partial) if partial is not None else None
    try:
        for index, completions in generate_completions(
            policy, tok, prompts, sampling, template_kwargs=template_kwargs, progress=progress,
            autocast=lambda: autocast_context(torch_device, model.dtype),
        ):
            texts = [c.text for c in completions]
            if writer is not None:
                # finished: False where --max-new-tokens cut the completion (a pair's `*_finished` field)
                writer.write({"prompt": prompts[index], "completions": texts,
                              "finished": [c.finished for c in completions],
                              "prompt_ids": list(completions[0].prompt_ids),  # the ids sampled (data/sampled.py)
                              "completion_ids": [list(c.response_ids) for c in completions]})
            else:
                write(f"prompt {index + 1}: {prompt_text(prompts[index])!r}")
                for k, text in enumerate(texts, start=1):
                    write(f"  [{k}] {text!r}")
    finally:
        if writer is not None:
            writer.close()
    if partial is not None:
        os.replace(partial, output)
        write(f"wrote {len(prompts)} rows of {sampling.num_samples} completion(s) to {output}")


@dataclass
class SampleSet:
    """K completions per prompt from one model, and their judged rewards when a judge was given."""

    prompts: list[Prompt]
    completions: list[list[Completion]]
    rewards: list[list[float]] | None = None

    @property
    def texts(self) -> list[list[str]]:
        return [[c.text for c in per_prompt] for per_prompt in self.completions]

    @property
    def finished(self) -> list[list[bool]]:
        """Per completion: True when it ended (EOS or a stop token), False when cut by max_new_tokens."""
        return [[c.finished for c in per_prompt] for per_prompt in self.completions]
