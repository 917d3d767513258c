"""Sampling settings change what is sampled, as each one promises: temperature 0 is greedy, top-k 1
is greedy, a low temperature lowers the entropy of the samples, top-p never samples outside the
nucleus. Each test catches: `eval/sampling.py` ignoring temperature, top-p and top-k (always
sampling from the model's own distribution)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dpokit.config import SamplingConfig
from dpokit.eval.sampling import encode_prompt, generate_completions
from helpers.toy import build_tiny_llama, build_tokenizer

PROMPTS = ["the film was", "my friend", "the music seemed very"]


@pytest.fixture(scope="module")
def tok_and_model():
    tokenizer = build_tokenizer("word")
    model = build_tiny_llama(tokenizer, seed=3).eval()
    with torch.no_grad():  # a random head gives near-uniform next tokens: sharpen it, so settings matter
        model.lm_head.weight.mul_(8.0)
    return tokenizer, model


def _ids(model, tokenizer, prompts, **settings) -> list[list[tuple[int, ...]]]:
    sampling = SamplingConfig(**{"max_new_tokens": 6, "sample_batch_size": 8, **settings})
    return [[c.response_ids for c in completions]
            for _, completions in generate_completions(model, tokenizer, prompts, sampling)]


def _greedy(model, tokenizer, prompt: str, steps: int) -> tuple[int, ...]:
    """Argmax decoding by hand, one full forward per token (no cache, no generate)."""
    ids = encode_prompt(tokenizer, prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tuple(out)


def _first_token_probs(model, tokenizer, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encode_prompt(tokenizer, prompt)])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def test_temperature_zero_is_greedy_and_the_same_for_every_seed(tok_and_model):
    tokenizer, model = tok_and_model
    greedy = [[_greedy(model, tokenizer, p, 6)] * 2 for p in PROMPTS]
    assert _ids(model, tokenizer, PROMPTS, temperature=0, num_samples=2, sample_seed=1) == greedy
    assert _ids(model, tokenizer, PROMPTS, temperature=0, num_samples=2, sample_seed=2) == greedy


def test_top_k_one_is_greedy(tok_and_model):
    tokenizer, model = tok_and_model
    greedy = [[_greedy(model, tokenizer, p, 6)] * 3 for p in PROMPTS]
    for seed in (1, 2):
        assert _ids(model, tokenizer, PROMPTS, top_k=1, num_samples=3, sample_seed=seed) == greedy
    plain = _ids(model, tokenizer, PROMPTS, num_samples=3, sample_seed=1)
    assert plain != greedy  # the premise: ancestral samples are not all greedy


def test_a_low_temperature_lowers_the_entropy_of_the_samples(tok_and_model):
    tokenizer, model = tok_and_model
    probs = _first_token_probs(model, tokenizer, PROMPTS[0])

    def first_tokens(temperature):
        [samples] = _ids(model, tokenizer, PROMPTS[:1], temperature=temperature, num_samples=200, max_new_tokens=1,
                         sample_batch_size=200)
        return Counter(s[0] for s in samples)

    exact = {t: -(torch.softmax(probs.log() / t, -1) * torch.log_softmax(probs.log() / t, -1)).sum().item()
             for t in (1.0, 0.3)}
    assert exact[0.3] < exact[1.0] - 1.0  # the premise: the two distributions are far apart
    hot, cold = _entropy(first_tokens(1.0)), _entropy(first_tokens(0.3))
    # 200 samples estimate each entropy to well within 0.5 nats here (the plug-in estimate is biased low
    # by about (support - 1) / 400 nats)
    assert abs(hot - exact[1.0]) < 0.5 and abs(cold - exact[0.3]) < 0.5, (hot, cold, exact)


def test_top_p_never_samples_outside_the_nucleus(tok_and_model):
    tokenizer, model = tok_and_model
    probs = _first_token_probs(model, tokenizer, PROMPTS[0])
    ranked = probs.argsort(descending=True)
    # The nucleus of 0.5: the most likely tokens until their mass reaches 0.5.
    reach = int((probs[ranked].cumsum(0) < 0.5).sum()) + 1
    nucleus = set(ranked[:reach].tolist())

    def first_tokens(top_p):
        [samples] = _ids(model, tokenizer, PROMPTS[:1], top_p=top_p, num_samples=200, max_new_tokens=1,
                         sample_batch_size=200)
        return {s[0] for s in samples}

    assert probs[ranked[reach:]].sum() > 0.3  # the premise: the tail is sampled often without top-p
    assert first_tokens(0.5) <= nucleus
    assert not first_tokens(1.0) <= nucleus
