"""The MoE router's load-balancing loss (`model.router_loss`) on every MoE family transformers ships.

- every layout (padded, packed, prefix-shared) x LM head x attention gives the load-balancing loss
  transformers' own forward computes on the padded batch (its 2D attention mask), gradient
  included, and the same log-probs; the layouts a family cannot run exactly are the documented ones;
- the test data can tell: counting padding, or each shared prompt once, moves the value;
- each family's default coefficient (the one its own forward applies), and the refusals;
- the term on the loss: coef 0 is exactly today's loss and gradient; the reference never routes
  with `output_router_logits`; the first-batch guard checks the term too.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.config import build_config
from dpokit.data.batching import LAYOUTS, collate
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import DpokitError
from dpokit.model import router_loss
from dpokit.model.attention import choose_attention, layout_blocker
from dpokit.model.layout_guard import check_first_batch
from dpokit.model.logprobs import head_is_plain, sequence_logps
from dpokit.model.router_loss import AUX_RELATIVE_TOLERANCE, RouterLoss, routed_token_weights, router_loss_for
from dpokit.scoring import PairScorer
from helpers.families import build_family
from helpers.moe_families import MOE_FAMILIES, build_moe

PACK = 24  # packed rows hold two or three sequences, prefix-shared rows two pairs
# Families whose attention (linear attention, Mamba, compressed or indexed attention) has no exact
# packed mask: `layout_blocker` refuses both packed layouts, so they train padded.
MOE_EXCLUDED = {name: {"packed", "prefix-shared"} for name in (
    "deepseek-v4", "granitemoe-hybrid", "jamba", "lara-mini", "minimax", "qwen3-next", "qwen3.5-moe", "qwen4-exp")}
# The coefficient each family's own forward applies (TRL 1.16 reads `router_aux_loss_coef` from the
# config instead, 0 where it has none: DBRX keeps its weight in ffn_config.moe_loss_weight, JetMoE in
# aux_loss_coef, so TRL trains those two without the term by default).
DEFAULT_COEF = {**dict.fromkeys(MOE_FAMILIES, 0.001), "olmoe": 0.01, "flex-olmo": 0.01, "jetmoe": 0.01,
                "dbrx": 0.01, "flint": 0.0005}
TRL_DEFAULT_DIFFERS = {"dbrx": 0.0, "jetmoe": 0.0}
quiet = lambda _line: None  # noqa: E731


def _tolerance(value: float) -> float:
    return AUX_RELATIVE_TOLERANCE * max(1.0, abs(value))


def _build(family, tok, attn):
    if attn == "eager":
        return build_moe(family, tok, "eager")
    model = build_moe(family, tok, "sdpa")
    choose_attention(model, "auto", log=quiet)  # segments where exact (no mask size given), masks elsewhere
    return model


def _attention_kinds(family, tok) -> list[str]:
    return ["eager", "segments"] if type(build_moe(family, tok, "eager"))._supports_sdpa else ["eager"]


def _own_aux(model, batch) -> torch.Tensor:
    """transformers' own load-balancing loss on a padded batch (its forward, its 2D attention mask)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True,
                 use_cache=False).aux_loss


def _grads(loss, model) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params, strict=True)]


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_every_layout_gives_the_padded_load_balancing_loss(family, tok, pairs):
    padded = collate(pairs, tok.pad_token_id, "padded")
    for attn in _attention_kinds(family, tok):
        model = _build(family, tok, attn).eval()
        router = router_loss_for(model, None, quiet)
        with torch.no_grad():
            own = _own_aux(model, padded).item()
            plain = sequence_logps(model, padded, chunked_head=False)
        own_grads = _grads(_own_aux(model, padded), model)
        blocked = {lay for lay in LAYOUTS if layout_blocker(model, lay) is not None}
        assert blocked == MOE_EXCLUDED.get(family, set()), family
        for layout in sorted(set(LAYOUTS) - blocked):
            batch = collate(pairs, tok.pad_token_id, layout, PACK)
            for chunked in ([False, True] if head_is_plain(model) else [False]):
                where = f"{family}/{attn}/{layout}/chunked={chunked}"
                out = sequence_logps(model, batch, chunked_head=chunked, chunk=5, router=router)
                aux = out.router.aux_loss
                assert abs(aux.item() - own) <= _tolerance(own), (where, aux.item(), own)
                for name in ("chosen_logps", "rejected_logps"):
                    torch.testing.assert_close(getattr(out, name), getattr(plain, name), atol=1e-5, rtol=0, msg=where)
                if attn == "eager":  # the gradient is the padded one too (the prompt's weight 2 included)
                    for mine, theirs in zip(_grads(aux, model), own_grads, strict=True):
                        scale = max(1.0, theirs.abs().max().item())
                        torch.testing.assert_close(mine, theirs, atol=1e-5 * scale, rtol=0, msg=where)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_padding_or_a_prompt_counted_once_would_move_it(family, tok, pairs):
    # What makes the test above able to fail: on these pairs, a mask that counts padding, or that
    # counts each shared prompt once (as a prefix-shared row routes it), gives another value.
    model = build_moe(family, tok).eval()
    router = router_loss_for(model, None, quiet)
    with torch.no_grad():
        padded = collate(pairs, tok.pad_token_id, "padded")
        right = _own_aux(model, padded).item()
        with router.recording(model) as recorded:
            model.base_model(input_ids=padded.input_ids, attention_mask=padded.attention_mask)
        ones = torch.ones_like(padded.attention_mask, dtype=torch.float32)
        counting_padding = router.function(recorded[-1], router.num_experts, router.top_k, ones).item()
        assert abs(counting_padding - right) > _tolerance(right), family
        if layout_blocker(model, "prefix-shared") is None:
            shared = collate(pairs, tok.pad_token_id, "prefix-shared", PACK)
            with router.recording(model) as recorded:
                sequence_logps(model, shared, chunked_head=False)
            once = router.function(recorded[-1], router.num_experts, router.top_k,
                                   (shared.segment_ids >= 0).float()).item()
            assert abs(once - right) > 10 * _tolerance(right), family


def _pair(prompt, chosen, rejected):
    return TokenizedPair(prompt, chosen, rejected, 0)


def test_routed_token_weights_count_what_the_padded_layout_routes():
    pairs = [_pair((1, 2, 3), (4, 5), (6, 7)), _pair((8,), (9,), (10, 11, 12))]
    padded = collate(pairs, 0, "padded")
    assert torch.equal(routed_token_weights(padded), padded.attention_mask.float())
    packed = collate(pairs, 0, "packed")  # rows as wide as the longest sequence: padding in some
    assert torch.equal(routed_token_weights(packed), (packed.segment_ids >= 0).float())
    assert routed_token_weights(packed).sum() == padded.attention_mask.sum() == 5 + 5 + 2 + 4 < packed.input_ids.numel()
    shared = collate(pairs, 0, "prefix-shared", 64)
    # One row: [1 2 3 4 5 6 7 | 8 9 10 11 12]; each prompt weighs 2 (routed with both responses).
    assert routed_token_weights(shared).tolist() == [[2, 2, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1]]


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_the_default_coefficient_is_the_one_the_model_applies(family, tok):
    model = build_moe(family, tok)
    lines = []
    router = router_loss_for(model, None, lines.append)
    applied = getattr(model, "router_aux_loss_coef", getattr(model, "aux_loss_coef", None))  # what its forward uses
    assert router.coef == applied == pytest.approx(DEFAULT_COEF[family])
    assert lines == [f"router: the load-balancing loss x {router.coef:g} is added to the training loss "
                     f"({model.config.model_type}'s own coefficient; 0: off)"]
    trl = getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0)  # TRL 1.16's default
    assert trl == TRL_DEFAULT_DIFFERS.get(family, router.coef)
    assert router_loss_for(model, 0.05, quiet).coef == 0.05
    off = router_loss_for(model, 0.0, lines.append)
    assert off.coef == 0.0 and "not trained on" in lines[-1]


def test_a_model_without_a_router_refuses_a_coefficient(tok):
    dense = build_family("llama", tok)
    with pytest.raises(DpokitError, match=r"^--router-aux-loss-coef 0.01: llama has no router") as err:
        router_loss_for(dense, 0.01, quiet)
    assert "\n" not in str(err.value)
    assert router_loss_for(dense, None, quiet) is None and router_loss_for(dense, 0.0, quiet) is None


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_a_router_without_a_loss_in_transformers_is_off_and_refuses_a_coefficient(model_type, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                  moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, n_routed_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config)
    lines = []
    assert router_loss_for(model, None, lines.append) is None and lines == []  # its config names no coefficient
    with pytest.raises(DpokitError, match=f"{model_type} has a router, but transformers' .* defines no load-balancing"):
        router_loss_for(model, 0.001, quiet)


def test_a_negative_coefficient_is_refused():
    with pytest.raises(DpokitError, match="--router-aux-loss-coef must be a number >= 0"):
        build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": "o"},
                      "loss": {"router_aux_loss_coef": -0.01}})


def _scorer(model, router, reference=None, layout="packed"):
    cfg = build_config({"model": {"model": "m"}, "data": {"data": "d"}, "train": {"output": "o"},
                        "speed": {"layout": layout}})
    return PairScorer(model, reference, loss=cfg.loss, speed=cfg.speed, dtype="fp32", pad_id=0,
                      device=torch.device("cpu"), router=router)


def test_the_term_on_the_loss_and_coefficient_zero_is_exactly_todays_loss(tok, pairs):
    model, reference = build_moe("qwen2-moe", tok).train(), build_moe("qwen2-moe", tok).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    today = _scorer(model, None, reference)(pairs)
    router = router_loss_for(model, None, quiet)
    off = _scorer(model, RouterLoss(0.0, router.num_experts, router.top_k, router.function, "qwen2_moe"), reference)(pairs)
    assert torch.equal(off.out.losses, today.out.losses)
    for a, b in zip(torch.autograd.grad(off.out.losses.sum(), params), torch.autograd.grad(today.out.losses.sum(), params),
                    strict=True):
        assert torch.equal(a, b)
    assert off.policy.router is not None and not off.policy.router.aux_loss.requires_grad  # measured, not trained
    on = _scorer(model, router, reference)(pairs)
    aux = on.policy.router.aux_loss
    assert aux.requires_grad and math.isfinite(aux.item())
    torch.testing.assert_close(on.out.losses, today.out.losses + router.coef * aux.detach(), atol=1e-7, rtol=0)


def _count_router_requests(model) -> list[bool]:
    """Whether each forward of `model`'s body returned router logits from now on."""
    asked = []
    model.base_model.register_forward_hook(lambda _m, _args, output: asked.append(output.router_logits is not None))
    return asked


def test_the_reference_never_asks_for_router_logits(tok, pairs):
    policy, reference = build_moe("mixtral", tok).train(), build_moe("mixtral", tok).eval()
    router = router_loss_for(policy, None, quiet)
    scorer = _scorer(policy, router, reference)  # its capability probes run here, before the count starts
    policy_asked, reference_asked = _count_router_requests(policy), _count_router_requests(reference)
    scorer(pairs)
    scorer.evaluate(pairs, 2)
    assert policy_asked and all(policy_asked)
    assert reference_asked and not any(reference_asked)
    policy_asked.clear()
    scorer.no_grad_logps(pairs)  # the precomputed reference pass: the policy's weights, as the reference
    assert policy_asked == [False]


def test_the_first_batch_guard_checks_the_load_balancing_loss(tok, pairs, tmp_path, monkeypatch):
    model = build_moe("mixtral", tok).train()
    scorer = _scorer(model, router_loss_for(model, None, quiet), layout="auto")
    record = check_first_batch(scorer, pairs, tmp_path, quiet)
    assert not record["fallback"] and all(c["aux_gap"] <= c["aux_tolerance"] for c in record["checked"])
    # A packed mask that forgot to drop padding: the log-probs agree, the load-balancing loss does not.
    right = router_loss.routed_token_weights
    monkeypatch.setattr(router_loss, "routed_token_weights",
                        lambda batch: right(batch) if batch.layout == "padded" else torch.ones(batch.input_ids.shape))
    lines = []
    scorer = _scorer(model, router_loss_for(model, None, quiet), layout="auto")
    record = check_first_batch(scorer, [max(pairs, key=lambda p: len(p.chosen_ids) - len(p.rejected_ids))],
                               tmp_path, lines.append)
    assert record["fallback"] and scorer.layouts == ["padded"]
    assert "router's load-balancing loss differs by" in lines[-1] and "using --layout padded" in lines[-1]


def test_lora_and_gradient_checkpointing_record_the_same_routing(tok, pairs):
    from dpokit.config import LoraSection
    from dpokit.model.load import prepare_policy

    plain = build_moe("qwen2-moe", tok).train()
    wrapped = prepare_policy(build_moe("qwen2-moe", tok).train(), LoraSection(lora_r=4), gradient_checkpointing=True)
    router = router_loss_for(wrapped, None, quiet)  # found through the peft wrapper
    batch = collate(pairs, tok.pad_token_id, "prefix-shared", PACK)
    expected = sequence_logps(plain, batch, router=router).router.aux_loss
    got = sequence_logps(wrapped, batch, router=router).router.aux_loss  # adapters start at zero
    torch.testing.assert_close(got, expected, atol=_tolerance(expected.item()), rtol=0)
    got.backward()  # through the checkpointed (recomputed) forward: the adapters get the term's gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_" in n)
