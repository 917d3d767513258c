"""LoRA through peft: only adapters train, the reference is the base (adapters off, no copy),
resume is exact, and `dpokit export --merge` writes a plain model with the adapted logits.
Also the precision options that go with it: fp16 loss scaling and the 4-bit guard."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpokit import cli, scoring
from dpokit.config import LoraSection, build_config
from dpokit.data import PairTokenizer, load_tokenized_pairs
from dpokit.data.batching import LAYOUTS, collate, collate_padded
from dpokit.data.pairs import PreferencePair
from dpokit.errors import DpokitError
from dpokit.losses import LossPlan
from dpokit.model import load as models
from dpokit.model import logprobs
from dpokit.model.logprobs import head_is_plain, sequence_logps
from dpokit.train import loop, setup
from dpokit.train.checkpoint import list_checkpoints
from helpers.toy import build_tiny_llama, build_tokenizer, make_pairs


def _config(model_dir, data, out, lora=True, **train):
    section = {"output": str(out), "max_steps": 4, "batch_size": 8, "learning_rate": 1e-2, "progress": "off",
               "warmup_steps": 1, **train}
    layers = {"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32}, "train": section}
    if lora:
        layers["lora"] = {"lora_r": 4, "lora_alpha": 8.0}
    return build_config(layers)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, toy_data, tmp_path_factory):
    """Train with LoRA in-process, keeping the policy object, and refusing any frozen copy."""
    captured = {}
    real = setup.prepare_policy
    patch = pytest.MonkeyPatch()
    patch.setattr(setup, "prepare_policy", lambda *a: captured.setdefault("policy", real(*a)))
    patch.setattr(models, "frozen_reference", lambda m: pytest.fail("LoRA must not copy the model"))
    out = tmp_path_factory.mktemp("lora") / "run"
    try:
        loop.train(_config(tiny_model_dir, toy_data[0], out), log=lambda _: None)
    finally:
        patch.undo()
    return out, captured["policy"]


def test_only_the_adapters_change(lora_run, tiny_model_dir):
    out, policy = lora_run
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    adapters = 0
    for name, param in policy.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            if "lora_B" in name:  # peft starts B at zero, so the adapter begins as a no-op
                assert param.abs().max() > 0, name
            adapters += 1
            continue
        assert not param.requires_grad, name
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param.detach(), base[key]), name
    assert adapters == 2 * 7 * 2  # A and B on the 7 linear layers of each of the 2 blocks (all-linear)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


def test_reference_log_probs_are_the_base_models(lora_run, tiny_model_dir, toy_data):
    _, policy = lora_run
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    pairs = load_tokenized_pairs(str(toy_data[1]), PairTokenizer(tokenizer, 32, None), log=lambda _: None)
    batch = collate_padded(pairs[:6], tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        reference = sequence_logps(models.AdaptersDisabled(policy), batch)
        expected = sequence_logps(base, batch)
        adapted = sequence_logps(policy, batch)
    assert torch.allclose(reference.chosen_logps, expected.chosen_logps, atol=1e-5, rtol=0)
    assert torch.allclose(reference.rejected_logps, expected.rejected_logps, atol=1e-5, rtol=0)
    assert not torch.allclose(adapted.chosen_logps, expected.chosen_logps, atol=1e-3)  # adapters are back on
    assert (adapted.chosen_logps - adapted.rejected_logps).mean() > (expected.chosen_logps -
                                                                     expected.rejected_logps).mean()


def test_export_merge_reloads_with_from_pretrained_and_gives_the_adapted_logits(lora_run, tiny_model_dir,
                                                                                 tmp_path, capsys):
    from peft import PeftModel

    out, _ = lora_run
    assert cli.main(["export", str(out), "--output", str(tmp_path / "plain")]) == 2
    assert "pass --merge" in capsys.readouterr().err
    assert cli.main(["export", str(out), "--merge", "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[2, 5, 9, 11, 3, 17, 8]])
    with torch.no_grad():
        expected, got = adapted(ids).logits, merged(ids).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(got, base(ids).logits, atol=1e-3)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_lora_resume_after_a_crash_is_exact(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    full = tmp_path / "full"
    loop.train(_config(tiny_model_dir, toy_data[0], full, max_steps=5), log=lambda _: None)
    real = LossPlan.__call__  # the loss of every micro-batch
    calls = {"n": 0}

    def crash_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(LossPlan, "__call__", crash_in_step_4)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected"):
        loop.train(_config(tiny_model_dir, toy_data[0], out, max_steps=5, save_every=1), log=lambda _: None)
    monkeypatch.setattr(LossPlan, "__call__", real)
    checkpoint = list_checkpoints(out)[-1]
    assert checkpoint.name == "step-0000003"
    assert all("lora_" in k for k in load_file(str(checkpoint / "model.safetensors")))  # adapters only
    loop.train(_config(tiny_model_dir, toy_data[0], out, max_steps=5, save_every=1, resume="auto"),
               log=lambda _: None)
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_trains_with_a_loss_scale_saved_in_checkpoints(tiny_model_dir, toy_data, tmp_path):
    out = tmp_path / "fp16"
    cfg = _config(tiny_model_dir, toy_data[0], out, lora=False, max_steps=3, learning_rate=1e-3)
    cfg.model.dtype = "fp16"
    result = loop.train(cfg, log=lambda _: None)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 3 and all(0 < x < 1 for x in losses)
    saved = torch.load(list_checkpoints(out)[-1] / "training_state.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 0
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay float32


def test_bad_lora_and_4bit_options_are_one_line(tiny_model_dir, toy_data, tmp_path):
    with pytest.raises(DpokitError, match="--load-in-4bit needs --lora-r > 0"):
        build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": "o"},
                      "lora": {"load_in_4bit": True}})
    with pytest.raises(DpokitError, match="--lora-dropout must be in"):
        build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": "o"},
                      "lora": {"lora_r": 4, "lora_dropout": 1.5}})
    if torch.cuda.is_available():
        pytest.skip("the 4-bit CPU guard only applies without CUDA")
    cfg = _config(tiny_model_dir, toy_data[0], tmp_path / "q")
    cfg.lora.load_in_4bit = True
    with pytest.raises(DpokitError, match="--load-in-4bit needs a CUDA GPU"):
        loop.train(cfg, log=lambda _: None)
    cfg = _config(tiny_model_dir, toy_data[0], tmp_path / "t", overwrite=True)
    cfg.lora.lora_target_modules = ("no_such_proj",)
    with pytest.raises(DpokitError, match="--lora-target-modules no_such_proj"):
        loop.train(cfg, log=lambda _: None)


# PEFT adds the adapters' output to the base layer's matmul output: under selective recompute that
# output is kept, and the guard (model/recompute.py) would stop the run were the addition in place.
@pytest.mark.parametrize("option", ["gradient_checkpointing", "selective_recompute"])
def test_recomputing_with_lora_changes_memory_not_results(option, tiny_model_dir, toy_data, tmp_path, monkeypatch,
                                                         same_training):
    captured = {}
    real = setup.prepare_policy
    monkeypatch.setattr(setup, "prepare_policy", lambda *a: captured.setdefault(any(a[2:]), real(*a)))
    losses = []
    for recomputing in (False, True):
        cfg = _config(tiny_model_dir, toy_data[0], tmp_path / str(recomputing), max_steps=2)
        setattr(cfg.scale, option, recomputing)
        result = loop.train(cfg, log=lambda _: None)
        losses.append([r["loss"] for r in result.history if "loss" in r])
    base = captured[True].get_base_model()
    assert base.is_gradient_checkpointing and not captured[False].get_base_model().is_gradient_checkpointing
    a = load_file(str(tmp_path / "False" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "True" / "adapter_model.safetensors"))
    same_training(a, b, losses=tuple(losses), atol=1e-6)


def _lora_policy_and_base(tokenizer):
    """A LoRA-wrapped tiny Llama with non-zero adapters (so they matter), and its base alone."""
    base = build_tiny_llama(tokenizer, seed=3)
    policy = models.prepare_policy(build_tiny_llama(tokenizer, seed=3), LoraSection(lora_r=4, lora_alpha=8.0),
                                   gradient_checkpointing=False)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return policy, base.eval()


def _logps_and_grads(model, batch, chunked):
    """Log-probs, and for the policy (a module) the adapters' gradients of a loss that weighs
    chosen and rejected differently; the adapters-disabled reference runs without gradients."""
    if not isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return sequence_logps(model, batch, chunked_head=chunked, chunk=5), {}
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, chunked_head=chunked, chunk=5)
    (out.chosen_logps.sum() - 0.37 * out.rejected_logps.sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_policy_and_reference_log_probs_in_every_layout_and_head():
    """Through the PEFT wrapper and with adapters disabled: every layout x LM head gives the
    padded/plain log-probs (fp32, 1e-5) and adapter gradients, and `auto` takes the chunked head."""
    tokenizer = build_tokenizer("word")
    policy, base = _lora_policy_and_base(tokenizer)
    rows = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(make_pairs(6, 5))]
    pairs, _ = PairTokenizer(tokenizer, max_length=64).tokenize(rows)
    reference = models.AdaptersDisabled(policy)
    assert head_is_plain(policy) and head_is_plain(reference)  # so --lm-head auto takes the chunked head
    with torch.no_grad():
        base_logps = sequence_logps(base, collate(pairs, tokenizer.pad_token_id, "padded"), chunked_head=False)
    for name, model in (("policy", policy), ("reference", reference)):
        expected, expected_grads = _logps_and_grads(model, collate(pairs, tokenizer.pad_token_id, "padded"), False)
        if name == "reference":  # adapters off: the base model's log-probs
            torch.testing.assert_close(expected.chosen_logps, base_logps.chosen_logps, atol=1e-5, rtol=0)
        else:
            assert not torch.allclose(expected.chosen_logps, base_logps.chosen_logps, atol=1e-2)
            assert expected_grads and all("lora_" in n for n in expected_grads)
        for layout in LAYOUTS:
            for chunked in (False, True):
                out, grads = _logps_and_grads(model, collate(pairs, tokenizer.pad_token_id, layout), chunked)
                where = f"{name}/{layout}/chunked={chunked}"
                torch.testing.assert_close(out.chosen_logps, expected.chosen_logps, atol=1e-5, rtol=0, msg=where)
                torch.testing.assert_close(out.rejected_logps, expected.rejected_logps, atol=1e-5, rtol=0, msg=where)
                assert grads.keys() == expected_grads.keys(), where
                for param, grad in grads.items():
                    # fp32 gradients are sums over every scored token, computed in another order per
                    # layout: their rounding scales with the tensor's largest entry (seen: 2.7e-5 on
                    # entries up to 10.2 on one AMD CPU), while a wrong mask moves them by O(1).
                    scale = expected_grads[param].abs().max().item()
                    torch.testing.assert_close(grad, expected_grads[param], atol=1e-5 * max(1.0, scale), rtol=1e-4,
                                               msg=where)


@pytest.mark.parametrize("layout", ["auto", *LAYOUTS])
def test_lora_trains_with_a_live_reference_and_the_chunked_head_in_every_layout(layout, tiny_model_dir, toy_data,
                                                                               tmp_path, capsys, monkeypatch):
    calls = []
    real = logprobs.chunked_head_logps
    monkeypatch.setattr(logprobs, "chunked_head_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(toy_data[0]), "--output", str(out),
                     "--lora-r", "4", "--reference", "live", "--layout", layout, "--lm-head", "chunked",
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--progress", "off"])
    assert code == 0, capsys.readouterr().err
    guard = json.loads((out / "layout_check.json").read_text())
    assert guard["lm_head"] == "chunked" and not guard["fallback"]
    # Each step: the policy's forward and the adapters-disabled reference's; plus the first-batch
    # guard's one chunked scoring per layout it checked.
    assert len(calls) == 2 * 2 + len(guard["checked"])
    assert (out / "adapter_model.safetensors").is_file()


def test_compile_under_lora_compiles_the_body_the_chunked_head_calls(monkeypatch):
    tokenizer = build_tokenizer("word")
    policy, _ = _lora_policy_and_base(tokenizer)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: compiled.append(self))
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": "o"},
                        "speed": {"compile": True}})
    scoring.compile_if_asked(policy, cfg.speed)
    assert compiled == [policy.get_base_model().model]  # the Llama body, with the adapters in its layers

