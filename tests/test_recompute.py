"""--selective-recompute (model/recompute.py) on the conformance matrix: every family either trains
with the plain backward's gradients while recomputing only elementwise work, or is refused in one line.

What is checked, per family x attention kind x layout the family is exact in:
- the gradients of a scalar function of the summed log-probs equal the plain backward's (fp32; the
  recomputed ops are the same ops on the same inputs, so only the order in which autograd adds
  a parameter's gradient contributions may differ: 1e-5 relative);
- the backward runs exactly the plain backward's matmuls (none recomputed: the saved ones are
  used) and more elementwise ops (that work really is recomputed: nothing is kept for it);
- a model whose layers change a kept output in place (Falcon) is refused, at set-up and by the guard
  on every forward.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpokit.config import LoraSection, build_config
from dpokit.data.batching import LAYOUTS, collate
from dpokit.errors import DpokitError
from dpokit.model.capability import describe_forward
from dpokit.model.load import disable_dropout, prepare_policy
from dpokit.model.logprobs import sequence_logps
from dpokit.model.recompute import CachedOutputMutated, checkpoint_kwargs
from helpers.families import FAMILIES, attention_kinds, build_family

PACK = 24
MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
POINTWISE = "<pointwise ops>"
# Families whose layers change a matmul output in place (the guard refuses them when the policy is set up).
MUTATES_KEPT_OUTPUTS = {"falcon", "falcon-alibi"}  # the MLP adds into its last matmul's output


class _OpCounter(TorchDispatchMode):
    """How many times each aten op runs inside the block."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        if torch.Tag.pointwise in func.tags:  # elementwise compute (not a view, not a cached op's stand-in)
            self.counts[POINTWISE] = self.counts.get(POINTWISE, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward(model, batch, forward) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Each parameter's gradient of a scalar function of the log-probs, and the backward's op counts."""
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, chunked_head=True, chunk=5, forward=forward)
    loss = (out.chosen_logps - 0.5 * out.rejected_logps).sum()
    with _OpCounter() as ops:
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, ops.counts


def _matmuls(counts: dict[str, int]) -> int:
    return sum(counts.get(name, 0) for name in MATMULS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_selective_recompute_gives_the_plain_gradients_and_recomputes_no_matmul(family, tok, pairs):
    for attn in attention_kinds(family):
        plain = build_family(family, tok, attn)
        disable_dropout(plain)
        selective = copy.deepcopy(plain)
        if family in MUTATES_KEPT_OUTPUTS:
            with pytest.raises(DpokitError, match=r"--selective-recompute: .* in place \(aten\.\w+_\.Tensor\)"):
                prepare_policy(selective, LoraSection(), False, selective_recompute=True)
            continue
        prepare_policy(selective, LoraSection(), False, selective_recompute=True)
        plain.train(), selective.train()
        forward = describe_forward(plain)
        for layout in (lay for lay in LAYOUTS if lay not in forward.refusals):
            where = f"{family}/{attn}/{layout}"
            batch = collate(pairs, tok.pad_token_id, layout, PACK)
            expected, plain_ops = _backward(plain, batch, forward)
            got, selective_ops = _backward(selective, batch, forward)
            assert got.keys() == expected.keys(), where
            for name, grad in expected.items():
                scale = grad.abs().max().item() or 1.0
                torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=f"{where}: {name}")
            assert _matmuls(selective_ops) == _matmuls(plain_ops), (where, selective_ops, plain_ops)
            assert selective_ops[POINTWISE] > plain_ops[POINTWISE], where


def test_full_checkpointing_recomputes_the_matmuls_that_selective_recompute_keeps(tok, pairs):
    # The counter above can see a recomputed matmul: full checkpointing's backward runs the forward's again.
    plain = build_family("llama", tok, "sdpa")
    full = prepare_policy(copy.deepcopy(plain), LoraSection(), True)
    plain.train(), full.train()
    batch = collate(pairs, tok.pad_token_id, "padded")
    _, plain_ops = _backward(plain, batch, None)
    _, full_ops = _backward(full, batch, None)
    assert _matmuls(full_ops) > _matmuls(plain_ops)


def _cfg(speed=None, **scale):
    return build_config({"model": {"model": "m"}, "data": {"data": "d.jsonl"}, "train": {"output": "o"},
                         "speed": speed or {}, "scale": scale})


def test_selective_recompute_with_checkpointing_fsdp_or_compile_is_refused_in_one_line():
    with pytest.raises(DpokitError, match="--selective-recompute and --gradient-checkpointing .* choose one"):
        _cfg(selective_recompute=True, gradient_checkpointing=True)
    with pytest.raises(DpokitError, match="--selective-recompute is not checked under --parallel fsdp"):
        _cfg(selective_recompute=True, parallel="fsdp")
    # torch.compile fails in the first backward on the selective policy (a raw traceback after
    # loading the model and the reference pass): refused with the configuration instead.
    with pytest.raises(DpokitError, match="--selective-recompute does not run under --compile"):
        _cfg({"compile": True}, selective_recompute=True)
    assert _cfg(selective_recompute=True).scale.selective_recompute
    assert _cfg({"compile": True}, gradient_checkpointing=True).speed.compile


def test_the_guard_stops_a_training_forward_that_changes_a_kept_output(tok, pairs):
    # Falcon's layers add into a kept matmul output; set up without the early check, the run's own
    # forward is where the guard stops it, before any backward could use the changed value.
    model = build_family("falcon", tok, "sdpa")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(selective=True))
    model.train()
    with pytest.raises(CachedOutputMutated, match=r"in place \(aten\.add_\.Tensor\)"):
        sequence_logps(model, collate(pairs, tok.pad_token_id, "padded"), chunked_head=True)


@pytest.mark.parametrize(("full", "flag"), [(True, "--gradient-checkpointing"), (False, "--selective-recompute")])
def test_a_model_without_gradient_checkpointing_is_refused_in_one_line(tok, full, flag):
    model = build_family("llama", tok)
    model.supports_gradient_checkpointing = False  # as transformers marks a model class without it
    with pytest.raises(DpokitError, match=f"^{flag}: LlamaForCausalLM does not support gradient checkpointing"):
        prepare_policy(model, LoraSection(), full, selective_recompute=not full)
