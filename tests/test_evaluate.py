"""Evaluation figures mean what their names say: KL against an exact enumeration, win rates,
log-probs against a direct computation, preference figures equal to training's."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.config import DataConfig, LossConfig, SamplingConfig
from dpokit.eval.evaluate import Sampler, evaluate_on_prompts, judged_comparison, preference_metrics
from dpokit.eval.judges import load_judge
from dpokit.eval.kl import completion_logps, kl_estimate, mean_and_stderr
from dpokit.eval.sampling import SampleSet, generate_completions
from dpokit.model.load import load_tokenizer
from helpers.toy import build_tiny_llama, build_tokenizer

PROMPTS = ["the film was", "my friend", "the music seemed very", "this movie", "the cast"]


def test_mean_and_stderr_hand_worked():
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx((5 / 3) ** 0.5 / 2)  # s² = (2.25 + 0.25 + 0.25 + 2.25) / 3, se = s / √4
    assert mean_and_stderr([7.0]) == (7.0, 0.0)


def test_win_rate_counts_every_pair_and_ties_half():
    prompts = ["a", "b"]
    policy = SampleSet(prompts, [[], []], rewards=[[1.0, 2.0], [0.0, 0.0]])
    reference = SampleSet(prompts, [[], []], rewards=[[2.0, 0.0], [1.0, 1.0]])
    out = judged_comparison(policy, reference)
    # Prompt a: 1>2 no, 1>0 yes, 2=2 half, 2>0 yes -> 2.5 / 4. Prompt b: all losses -> 0.
    assert out["win_rate"] == pytest.approx((0.625 + 0.0) / 2)
    assert out["reward_policy"] == pytest.approx(0.75) and out["reward_reference"] == pytest.approx(1.0)
    assert out["reward_gain"] == pytest.approx(-0.25)


@pytest.fixture(scope="module")
def two_models():
    tokenizer = build_tokenizer("word")
    policy, reference = build_tiny_llama(tokenizer, seed=0).eval(), build_tiny_llama(tokenizer, seed=1).eval()
    with torch.no_grad():  # sharper next-token distributions than a fresh init's near-uniform ones
        policy.lm_head.weight.mul_(8)
        reference.lm_head.weight.mul_(8)
    return tokenizer, policy, reference


def test_completion_logps_match_a_direct_forward(two_models):
    tokenizer, model, _ = two_models
    (_, completions), = list(generate_completions(model, tokenizer, ["the film was"],
                                                  SamplingConfig(num_samples=5, max_new_tokens=6, sample_seed=0)))
    ours = completion_logps(model, completions, pad_id=tokenizer.pad_token_id, batch_size=3)  # odd chunks
    for c, value in zip(completions, ours, strict=True):
        ids = torch.tensor([c.prompt_ids + c.response_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        n = len(c.prompt_ids)
        direct = sum(logprobs[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))
        assert value == pytest.approx(direct, abs=1e-4)


def _exact_two_token_kl(policy, reference, prompt_ids, eos_id):
    """KL(π ‖ π_ref) over responses cut at two tokens, by enumerating every first token."""
    def next_logprobs(model, rows):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor(rows)).logits[:, -1].double(), dim=-1)

    vocab = policy.config.vocab_size
    p1, q1 = next_logprobs(policy, [prompt_ids])[0], next_logprobs(reference, [prompt_ids])[0]
    rows = [prompt_ids + [t] for t in range(vocab)]
    p2, q2 = next_logprobs(policy, rows), next_logprobs(reference, rows)
    second = (p2.exp() * (p2 - q2)).sum(dim=-1)
    second[eos_id] = 0.0  # a response that ended at EOS has no second token
    return float((p1.exp() * (p1 - q1 + second)).sum())


def test_kl_estimate_agrees_with_exact_enumeration(two_models):
    tokenizer, policy, reference = two_models
    prompts = ["the film was", "my friend"]
    sampling = SamplingConfig(num_samples=1000, max_new_tokens=2, sample_batch_size=500)
    samples = Sampler(tokenizer, sampling).draw(policy, prompts)
    exact = []
    for per_prompt in samples.completions:
        exact.append(_exact_two_token_kl(policy, reference, list(per_prompt[0].prompt_ids), tokenizer.eos_token_id))
    estimate = kl_estimate(policy, reference, samples, pad_id=tokenizer.pad_token_id, batch_size=500)
    assert estimate["sequences"] == 2000
    assert sum(exact) / 2 > 1.0  # two different random models: a KL well away from 0
    assert abs(estimate["kl"] - sum(exact) / 2) < 4 * estimate["kl_stderr"]
    assert estimate["kl_stderr"] < 0.1 * estimate["kl"]


def test_identical_models_kl_zero_and_win_rate_exactly_half(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    figures, reference_samples = evaluate_on_prompts(
        policy, reference, PROMPTS, Sampler(tokenizer, SamplingConfig(num_samples=3, max_new_tokens=8),
                                            judge=load_judge("sentiment")), log=lambda _: None)
    kl = figures["kl"]
    assert abs(kl["kl"]) <= max(kl["kl_stderr"], 1e-6) and kl["sequences"] == 15
    assert figures["judged"]["win_rate"] == 0.5
    assert figures["judged"]["reward_policy"] == figures["judged"]["reward_reference"]
    assert len(reference_samples.completions) == len(PROMPTS)


def test_trained_policy_moves_away_and_wins(trained_run, tiny_model_dir):
    tokenizer = load_tokenizer(str(trained_run))
    policy = AutoModelForCausalLM.from_pretrained(trained_run).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    figures, _ = evaluate_on_prompts(policy, reference, PROMPTS * 2,
                                     Sampler(tokenizer, SamplingConfig(num_samples=4, max_new_tokens=8),
                                             judge=load_judge("sentiment")), log=lambda _: None)
    kl, judged = figures["kl"], figures["judged"]
    assert kl["kl"] > 3 * kl["kl_stderr"] > 0
    # The toy task prefers upbeat words, so the trained policy should please the sentiment judge more.
    assert judged["reward_policy"] > judged["reward_reference"]
    assert judged["win_rate"] > 0.5
    # The same figures prompt by prompt (for paired comparisons between models): they average to the totals.
    per_prompt = figures["per_prompt"]
    assert {len(values) for values in per_prompt.values()} == {len(PROMPTS * 2)}
    for name, total in (("kl", kl["kl"]), ("reward_policy", judged["reward_policy"]),
                        ("reward_reference", judged["reward_reference"])):
        assert sum(per_prompt[name]) / len(per_prompt[name]) == pytest.approx(total, abs=1e-9)
    # Tempered sampling: the KL still comes from separate temperature-1 samples, so it is unchanged.
    tempered, _ = evaluate_on_prompts(policy, reference, PROMPTS * 2,
                                      Sampler(tokenizer, SamplingConfig(num_samples=4, max_new_tokens=8,
                                                                        temperature=0.5)), log=lambda _: None)
    assert tempered["kl"]["kl"] == pytest.approx(kl["kl"])
    assert tempered["per_prompt"]["kl"] == pytest.approx(per_prompt["kl"])
    assert "reward_policy" not in tempered["per_prompt"]  # no judge, no rewards


def test_preference_metrics_equal_the_training_evaluation(trained_run, tiny_model_dir, toy_data):
    _, eval_file = toy_data
    tokenizer = load_tokenizer(str(trained_run))
    policy = AutoModelForCausalLM.from_pretrained(trained_run).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    figures = preference_metrics(policy, reference, tokenizer, str(eval_file), loss=LossConfig(beta=0.1),
                                 data=DataConfig(max_length=32), batch_size=8, device=torch.device("cpu"),
                                 log=lambda _: None)
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert figures["pairs"] == 16
    for name in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert figures[name] == pytest.approx(final["eval_" + name], abs=1e-5), name
    assert figures["rewards/accuracies"] > 0.9
