"""GGUF model files (`--model FILE.gguf`): a tiny Llama written as GGUF (helpers/tiny_gguf.py)
loads with exactly its weights and its tokenizer, trains through the CLI into a plain model folder,
and every other command takes it; a bad file gets one line naming it and exit 2.
The real GGUF (SmolLM2-135M-Instruct, Q4_1/Q8_0) is exercised by tests/test_real_model.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpokit import cli
from dpokit.model.load import load_model_config, load_policy, load_tokenizer
from helpers.tiny_gguf import chatml_tokenizer, write_tiny_gguf
from helpers.toy import make_pairs, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the GGUF file, the model whose weights it holds)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf")


@pytest.fixture(scope="module")
def chat_pairs(tmp_path_factory):
    """Conversational pairs (one user message, one assistant reply) of the toy task."""
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in make_pairs(8, seed=3)]
    return write_jsonl(tmp_path_factory.mktemp("chat") / "pairs.jsonl", rows)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_gguf_file_loads_with_exactly_its_weights_as_a_plain_model(tiny_gguf, tmp_path):
    path, original = tiny_gguf
    model = load_policy(str(path), CPU)
    loaded, expected = _state(model), _state(original)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():  # float32 in the file: dequantizing is exact
        assert torch.equal(loaded[name], tensor), name
    assert model.dtype == torch.float32
    # No quantizer and no quantization record: it trains and saves like any model.
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")
    assert "quantization" not in (tmp_path / "saved" / "config.json").read_text()
    config = load_model_config(str(path))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, len(chatml_tokenizer()))


def test_a_gguf_file_brings_its_tokenizer_and_chat_template(tiny_gguf):
    path, _ = tiny_gguf
    tokenizer, expected = load_tokenizer(str(path)), chatml_tokenizer()
    messages = [{"role": "user", "content": "the film was"}, {"role": "assistant", "content": "great fun"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == expected.apply_chat_template(messages, tokenize=False)
    assert tokenizer(text)["input_ids"] == expected(text)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_train_from_a_gguf_file_writes_a_plain_model_folder(tiny_gguf, chat_pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(path), "--reference-model", str(path), "--data", str(chat_pairs),
                     "--output", str(out), "--max-steps", "2", "--batch-size", "4", "--max-length", "48",
                     "--log-every", "1", "--progress", "off"])
    assert code == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert "quantization" not in (out / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)  # a normal folder: no gguf_file, no dpokit
    assert model.config.hidden_size == 64
    assert (out / "tokenizer_config.json").is_file()


def test_every_command_that_loads_a_model_takes_a_gguf_file(tiny_gguf, chat_pairs, tmp_path, capsys):
    path, original = tiny_gguf
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "the plot"}]}])
    assert cli.main(["sample", "--model", str(path), "--prompts", str(prompts), "--max-new-tokens", "4",
                     "--temperature", "0", "--output", str(tmp_path / "samples.jsonl"), "--progress", "off"]) == 0
    assert json.loads((tmp_path / "samples.jsonl").read_text())["completions"]
    assert cli.main(["evaluate", "--model", str(path), "--reference-model", str(path), "--data", str(chat_pairs),
                     "--max-length", "48", "--json", "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())
    assert cli.main(["data", "inspect", str(chat_pairs), "--model", str(path), "--max-length", "48"]) == 0
    assert cli.main(["export", str(path), "--output", str(tmp_path / "exported")]) == 0
    exported = load_policy(str(tmp_path / "exported"), CPU)
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    capsys.readouterr()


def _bad_files(folder, tiny_path):
    data = tiny_path.read_bytes()
    files = {
        "text.gguf": b"hello, not a model\n",
        "empty.gguf": b"",
        "header_only.gguf": data[:200],
        "truncated.gguf": data[: len(data) // 2],
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    write_tiny_gguf(folder / "mpt.gguf", architecture="mpt")  # an architecture transformers does not read
    write_tiny_gguf(folder / "q8_1.gguf", raw_types={"blk.0.attn_q.weight": "Q8_1"})  # no dequantizer
    (folder / "dir.gguf").mkdir()
    return folder


@pytest.fixture(scope="module")
def bad_gguf(tiny_gguf, tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("badgguf"), tiny_gguf[0])


@pytest.mark.parametrize("name, fragment", [
    ("missing.gguf", "does not exist"),
    ("dir.gguf", "is a folder, not a GGUF file"),
    ("text.gguf", "is not a GGUF file"),
    ("empty.gguf", "is not a GGUF file"),
    ("header_only.gguf", "is truncated or damaged"),
    ("truncated.gguf", "is truncated or damaged"),
    ("mpt.gguf", "architecture mpt is not supported"),
    ("q8_1.gguf", "Dequantization for Q8_1 is not yet implemented"),
])
@pytest.mark.parametrize("option", ["--model", "--reference-model"])
def test_a_bad_gguf_file_gets_one_line_naming_it(bad_gguf, tiny_gguf, chat_pairs, tmp_path, capsys,
                                                 name, fragment, option):
    bad = bad_gguf / name
    model = str(bad) if option == "--model" else str(tiny_gguf[0])
    argv = ["train", "--model", model, "--data", str(chat_pairs), "--output", str(tmp_path / "run"),
            "--max-steps", "1", "--batch-size", "2", "--max-length", "48", "--progress", "off"]
    if option == "--reference-model":
        argv += ["--reference-model", str(bad)]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(bad) in err and fragment in err, err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_reference_cache_is_keyed_by_the_gguf_files_bytes(tiny_gguf, tmp_path):
    from dpokit.model.reference import weights_fingerprint

    path, _ = tiny_gguf
    other, _ = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    key = weights_fingerprint(str(path))  # no model given: the file alone names the weights
    assert key.startswith("files:") and key == weights_fingerprint(str(path))
    assert weights_fingerprint(str(other)) != key
