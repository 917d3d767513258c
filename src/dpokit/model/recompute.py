"""Selective recomputation: keep the matmul and attention outputs for backward, recompute the rest.

Without checkpointing, a decoder layer keeps every intermediate its backward reads. In a Llama-style
layer in fp32 that is about 11.7k floats per token (SmolLM2-135M, hidden 576, MLP 1536): besides
the matmul inputs, each RMSNorm keeps its input and its normalised value, the rotary embedding
its outputs, the MLP the activation's input and output and their product. Everything but the
matmuls and attention is elementwise: cheap to compute again from the matmul outputs beside it.

`--selective-recompute` runs each decoder layer under PyTorch's selective activation
checkpointing (`torch.utils.checkpoint.create_selective_checkpoint_contexts`) through the model's
own gradient-checkpointing hook: the outputs of the ops in `saved_ops()` (matmuls, grouped
matmuls, the fused attention kernels) are kept from the forward; every other op of the layer is
run again in the backward from them and the layer's input. The recomputed ops are the same ops on
the same inputs, so the gradients are the plain backward's (tests/test_recompute.py: every family
of the conformance matrix and the real model). On SmolLM2-135M-Instruct in fp32 on the CPU it
removed 1108 of the 1826 MB that full checkpointing removes from a step's peak, and a run's peak
RSS fell 26% (max length 768) and 30% (2048) at the plain path's speed within 5% (benchmarks/
RESULTS.md section 9); `--gradient-checkpointing` keeps only each layer's input and recomputes the
matmuls too.
"""

from __future__ import annotations

import functools

import torch

from dpokit.errors import DpokitError


def saved_ops() -> frozenset:
    """The ops whose outputs are kept: everything that multiplies by a weight or attends. Missing
    ones (an older torch) are skipped: their outputs are then recomputed, which is slower, not wrong."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
             "_efficient_attention_forward")
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


class CachedOutputMutated(DpokitError):
    """A kept matmul or attention output was changed in place later in the forward."""


class KeepMatmuls:
    """The policy of one checkpointed layer call: keep the outputs of `saved` ops, recompute the rest.

    The guard: a kept output must reach the backward as the forward made it. A layer that changes
    one in place afterwards (Falcon's eager attention divides its score matmul in place; its MLP adds
    the attention output into its last matmul's) would hand the backward the changed value, and the
    recomputed ops after it would compute from that: wrong gradients with no error, because the
    change goes through `matmul`'s untracked `_unsafe_view`, which PyTorch's own mutation check does
    not see. Every op of the forward passes through here, so an in-place write into the storage of a
    kept output raises `CachedOutputMutated` on the spot: on the run's own forwards, at no cost.
    It sees the ops of one layer call; a write into a layer's kept output from outside the layer is
    left to PyTorch's version check (which raises where the write goes through a tracked view).
    """

    def __init__(self, saved: frozenset):
        self.saved = saved
        self.kept: set[int] = set()  # storage addresses of the outputs kept so far in this call

    def __call__(self, ctx, op, *args, **kwargs):
        from torch.utils.checkpoint import CheckpointPolicy

        for tensor in _written_tensors(op, args, kwargs):
            if tensor.untyped_storage().data_ptr() in self.kept:
                raise CachedOutputMutated(f"--selective-recompute: this model's layers change a matmul or attention "
                                          f"output in place ({op}) after it was kept for the backward, so the "
                                          "backward would be wrong; use --gradient-checkpointing instead")
        if op not in self.saved:
            return CheckpointPolicy.PREFER_RECOMPUTE
        outputs = ctx.op_output if isinstance(ctx.op_output, tuple | list) else (ctx.op_output,)
        self.kept.update(t.untyped_storage().data_ptr() for t in outputs
                         if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes())
        return CheckpointPolicy.MUST_SAVE


def _written_tensors(op, args, kwargs) -> list[torch.Tensor]:
    """The tensors `op` writes into (in-place and out= arguments), from its schema."""
    schema = op._schema
    if not schema.is_mutable:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            values = value if isinstance(value, tuple | list) else (value,)
            written.extend(v for v in values if isinstance(v, torch.Tensor))
    return written


def _contexts(saved: frozenset):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(KeepMatmuls(saved))


def checkpoint_kwargs(selective: bool) -> dict:
    """The keyword arguments of `torch.utils.checkpoint.checkpoint` for the model's layers:
    non-reentrant (works under DDP, FSDP2 and with frozen LoRA base weights), and with `selective`
    the policy above (a fresh pair of contexts per layer call, as the API requires)."""
    kwargs: dict = {"use_reentrant": False}
    if selective:
        kwargs["context_fn"] = functools.partial(_contexts, saved_ops())
    return kwargs


def check_selective_recompute(model: torch.nn.Module) -> None:
    """One short forward with gradients through `model` (its layers checkpointed selectively), so a
    model whose layers change a kept output in place is refused while the run is set up rather than at
    its first step (`KeepMatmuls` guards every forward after it too)."""
    was_training = model.training
    device = next(model.parameters()).device
    ids = torch.arange(min(8, model.config.vocab_size), device=device).unsqueeze(0)
    try:
        model.train()
        with torch.enable_grad():
            model(input_ids=ids)
    finally:
        model.train(was_training)
