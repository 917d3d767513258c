"""On the demo's own pairs, no cut-off sample is taught to end (issue 15, part 1).

The demo's bundled base model samples its pairs exactly as `dpokit demo` does (fewer prompts and
steps, to stay quick); `benchmarks/invented_eos.py` (the measurement behind the README's figures)
DPO-trains on them and splits the margin per token."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dpokit.data import PairTokenizer, PreferencePair, TokenizeStats, load_tokenized_pairs, read_pairs
from dpokit.experiments.demo.bundled import base_model_dir
from dpokit.experiments.demo.sentiment import PRESETS
from dpokit.model.load import load_policy, load_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_demo_pairs_put_no_eos_on_cut_samples_and_no_margin_on_invented_eos(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import invented_eos

    settings = replace(PRESETS["default"], train_prompts=16, steps=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs: a tiny model loses more than it gains from more
    try:
        results = invented_eos.measure(settings, tmp_path, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    forced, marked = results["forced"], results["marked"]
    assert forced["samples_cut"] == marked["samples_cut"] > 0.2  # the same samples, many cut at 32 tokens
    assert marked["rows_marked_unfinished"] > 0 and forced["rows_marked_unfinished"] == 0

    # Tokenized as training tokenizes them: a cut response holds no EOS at all, a finished one ends with one.
    tokenizer = load_tokenizer(str(base_model_dir()))
    eos = tokenizer.eos_token_id
    data = read_pairs(str(tmp_path / "marked.jsonl"))
    flags = {p.index: (p.chosen_finished, p.rejected_finished) for p in data}
    pairs = load_tokenized_pairs(str(tmp_path / "marked.jsonl"), PairTokenizer(tokenizer, max_length=80), lambda _: None)
    assert len(pairs) == len(flags)
    for pair in pairs:
        for ids, finished in zip((pair.chosen_ids, pair.rejected_ids), flags[pair.index], strict=True):
            assert ids.count(eos) == (1 if finished else 0) and (ids[-1] == eos) == finished

    # Each sample, cut or finished, tokenizes back to exactly the ids it was generated as.
    model = load_policy(str(base_model_dir()), torch.device("cpu")).eval()
    prompts, samples = invented_eos.demo_samples(settings, model, tokenizer)
    tokenize = PairTokenizer(tokenizer, max_length=80)
    for prompt, completion in ((p, c) for p, per in zip(prompts, samples.completions, strict=True) for c in per):
        pair = PreferencePair(prompt, completion.text, completion.text + " x", 1, chosen_finished=completion.finished)
        [encoded] = tokenize.encode([pair], TokenizeStats())
        assert (tuple(encoded.prompt), tuple(encoded.chosen)) == (completion.prompt_ids, completion.response_ids)

    # Before: EOS on every response, and training puts part of the margin on the invented ones.
    assert forced["invented_eos_tokens"] > 0 and forced["share_on_invented_eos"] > 0.02
    assert marked["invented_eos_tokens"] == 0 and marked["share_on_invented_eos"] == 0.0
    assert marked["mean_margin"] > 0
