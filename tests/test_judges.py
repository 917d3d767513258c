"""Judges: the VADER sentiment judge, user callables, HF reward models, and failures that name the row."""

import math

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.eval.judges import RewardModelJudge, load_judge, score_responses
from helpers.toy import build_tokenizer


def test_sentiment_judge_orders_and_bounds_short_texts():
    judge = load_judge("sentiment")
    texts = ["a wonderful, brilliant and moving film", "it was a film", "an awful, boring and tedious mess", ""]
    positive, neutral, negative, empty = judge(["p"] * 4, texts)
    assert positive > 0.5 and negative < -0.5 and neutral == 0.0 and empty == 0.0
    many = judge([""] * 3, ["great " * 40, "awful " * 40, "great awful"])
    assert all(-1.0 <= s <= 1.0 for s in many)
    # Only the response is judged: the prompt does not move the score.
    assert judge(["an awful prompt"], ["a lovely day"]) == judge(["a lovely prompt"], ["a lovely day"])


def test_module_function_specs(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_judge("my_judges:length")(["a", "b"], ["xy", "xyz"]) == [2.0, 3.0]
    assert load_judge(f"{tmp_path / 'my_judges.py'}:length")(["a"], ["abcd"]) == [4.0]
    with pytest.raises(DpokitError, match="'NOT_CALLABLE' is not a callable"):
        load_judge("my_judges:NOT_CALLABLE")
    with pytest.raises(DpokitError, match="cannot import module 'no_such_module'"):
        load_judge("no_such_module:f")
    with pytest.raises(DpokitError, match="unknown judge 'nonsense'"):
        load_judge("nonsense")


def test_failures_name_the_row():
    def picky(prompts, responses):
        return [1.0 / (len(r) - 3) for r in responses]  # a 3-character response divides by zero

    responses = ["aaaa", "bbbbb", "ccccccc", "ddddd", "eee", "ffff"]
    with pytest.raises(DpokitError, match=r"judge failed on row 4 \(response 'eee'\): ZeroDivisionError"):
        score_responses(picky, ["p"] * 6, responses, batch_size=4)
    with pytest.raises(DpokitError, match=r"returned nan for row 2"):
        score_responses(lambda p, r: [0.0, 1.0, math.nan], ["p"] * 3, ["a", "b", "c"], batch_size=8)
    with pytest.raises(DpokitError, match=r"returned 'x' for row 1"):
        score_responses(lambda p, r: [0.0, "x"], ["p"] * 2, ["a", "b"])
    with pytest.raises(DpokitError, match="returned 1 scores for rows 0-1"):
        score_responses(lambda p, r: [0.0], ["p"] * 2, ["a", "b"])
    assert score_responses(lambda p, r: [len(x) for x in r], ["p"] * 3, ["a", "bb", "ccc"], batch_size=2) == [
        1.0, 2.0, 3.0]


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_judge_on_a_tiny_random_classifier(tmp_path, num_labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer("word")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    judge = load_judge(str(tmp_path / "rm"), batch_size=3)
    assert isinstance(judge, RewardModelJudge)
    prompts = ["the film was", "my friend", "the plot seemed very", "the cast"]
    responses = [" great", " dull and flat and weak", " fun", " charming so very warm"]
    scores = judge(prompts, responses)
    # Scored alone, without padding: batching must not change any score.
    expected = []
    for p, r in zip(prompts, responses, strict=True):
        ids = tokenizer(p + r, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        expected.append(float(logits[0] if num_labels == 1 else logits[1] - logits[0]))
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 4


def test_reward_model_judge_rejects_a_folder_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpokitError, match="no config.json"):
        load_judge(str(tmp_path / "empty"))
