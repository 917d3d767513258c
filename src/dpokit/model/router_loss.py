"""The router's load-balancing loss of Mixture-of-Experts models, as their authors train them.

A MoE model's training recipe adds `coef x aux` to its loss, aux being the Switch Transformer
load-balancing statistic (Fedus et al. 2021, eqs. 4-6) that transformers computes in each
family's `load_balancing_loss_func`: E * sum_e f_e * P_e, f_e the share of the routed (token,
top-k slot) assignments that go to expert e and P_e the mean router probability of e, both
pooled over the MoE layers and over the tokens the forward routes. dpokit calls the family's own
function (no copy of it), on the router logits of the policy's forward, with its own token mask:

- padding never counts (every layout);
- every layout computes the padded layout's value: the statistic over the token occurrences the
  padded layout routes. Packed rows route the same tokens, so they pass a mask of their real
  columns. A prefix-shared row routes each prompt once where the padded layout routes it twice
  (with the chosen and with the rejected response), so its prompt columns weigh 2 in the mask.
  The function weights tokens linearly by the mask (f_e and P_e are mask-weighted means), so this
  is the padded value exactly, gradient included, and `--layout auto` may switch layouts from
  batch to batch without changing the objective.

The router logits are asked of the model body with `output_router_logits=True` (a forward
pre-hook), for the chunked LM head (which calls the body) and the plain one (which calls the
model): the model's own aux computation stays off, since it would take whatever attention mask
the forward got, a packed row's 4D mask included, as its token mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dpokit.data.batching import SHARED, PairBatch
from dpokit.errors import DpokitError
from dpokit.io import Log

# The arguments of the Switch-style `load_balancing_loss_func` transformers 5.24 ships for its MoE
# causal LMs (one function, copied per family); a family whose function takes others (Doge's
# product-key routing, `num_keys`) is not computed here.
_STANDARD_ARGUMENTS = ("gate_logits", "num_experts", "top_k", "attention_mask")


@dataclass
class RouterAux:
    """What the router did in one forward: the load-balancing loss (a () tensor with gradient)
    and, per MoE layer, the share of the routed tokens whose top-k includes the busiest expert
    ((L,), no gradient; k/E when balanced, 1 when every token goes to one expert)."""

    aux_loss: torch.Tensor
    max_expert_share: torch.Tensor


@dataclass(frozen=True)
class RouterLoss:
    """A run's load-balancing term: `coef` x the family's `load_balancing_loss_func`. With coef 0
    the loss and the expert load are still measured (and logged), not trained on."""

    coef: float
    num_experts: int
    top_k: int
    function: Callable
    model_type: str

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module) -> Iterator[list]:
        """While inside, each forward of `model`'s body asks for its router logits and appends
        them (a tuple of (tokens, E) tensors, one per MoE layer) to the yielded list."""
        body = _body(model)
        recorded: list = []

        def ask(_module, args, kwargs):
            return args, {**kwargs, "output_router_logits": True}

        def keep(_module, _args, _kwargs, output):
            recorded.append(tuple(getattr(output, "router_logits", None) or ()))

        handles = [body.register_forward_pre_hook(ask, with_kwargs=True),
                   body.register_forward_hook(keep, with_kwargs=True)]
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, router_logits: tuple[torch.Tensor, ...], batch: PairBatch) -> RouterAux:
        """The load-balancing loss and the busiest-expert shares of one forward over `batch`."""
        weights = routed_token_weights(batch)
        layers = tuple(_token_rows(logits, weights, self.num_experts) for logits in router_logits)
        if not layers:  # a MoE config whose layers are all dense routes nothing
            zero = weights.new_zeros((), dtype=torch.float32)
            return RouterAux(zero, weights.new_zeros(0, dtype=torch.float32))
        with contextlib.nullcontext() if self.coef else torch.no_grad():  # measured only: no graph
            aux = self.function(layers, self.num_experts, self.top_k, weights.to(layers[0].device))
        return RouterAux(aux, busiest_expert_share(layers, weights, self.top_k))


def routed_token_weights(batch: PairBatch) -> torch.Tensor:
    """(R, T) float: how many times the padded layout routes the token in each column (0 on padding).

    Padded: its attention mask. Packed: 1 on every real column. Prefix-shared: 2 on a block's
    prompt (routed with the chosen and again with the rejected response in the padded layout),
    1 on the responses."""
    if batch.layout == "padded":
        return batch.attention_mask.to(torch.float32)
    real = (batch.segment_ids >= 0).to(torch.float32)
    if batch.layout == "prefix-shared":
        real = real + (batch.branch_ids == SHARED).to(torch.float32) * real
    return real


def busiest_expert_share(layers: tuple[torch.Tensor, ...], weights: torch.Tensor, top_k: int) -> torch.Tensor:
    """(L,) for each layer, the weighted share of tokens whose top-k experts (by router
    probability, as the load-balancing function selects them) include that layer's busiest one."""
    flat = weights.reshape(-1).to(torch.float32)
    shares = []
    with torch.no_grad():
        for logits in layers:
            chosen = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices
            load = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
            load.scatter_add_(0, chosen.reshape(-1), flat.to(logits.device).repeat_interleave(top_k))
            shares.append(load.max() / flat.sum().clamp(min=1e-12))
    return torch.stack(shares)


def _token_rows(logits: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """One layer's router logits as (R*T, E) rows in the batch's column order (a FlashAttention
    varlen forward runs the rows as one (1, R*T) row: the same order)."""
    if logits.shape[-1] != num_experts or logits.numel() != weights.numel() * num_experts:
        raise ValueError(f"router logits of shape {tuple(logits.shape)} for a batch of {tuple(weights.shape)} "
                         f"tokens and {num_experts} experts")
    return logits.reshape(-1, num_experts)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under DDP (`module`) and peft (`get_base_model`) wrappers."""
    model = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _body(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body whose forward returns the router logits."""
    lm = _causal_lm(model)
    body = getattr(lm, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is lm:
        raise ValueError(f"{type(lm).__name__} has no transformer body to ask for router logits")
    return body


def _text_config(model: torch.nn.Module):
    config = getattr(_causal_lm(model), "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def router_loss_for(model: torch.nn.Module, coef: float | None, log: Log = print) -> RouterLoss | None:
    """The run's load-balancing term for `model` under `--router-aux-loss-coef coef` (None: the
    coefficient the model's own forward applies; 0: measured and logged, not trained on), or None
    for a model without one; one log line says which.

    A model without a router (no `output_router_logits` in its config, TRL's test) and a router
    whose loss dpokit cannot compute refuse an explicit coefficient with one line."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if not hasattr(config, "output_router_logits"):
        if coef:
            raise DpokitError(f"--router-aux-loss-coef {coef:g}: {model_type} has no router (it is not a "
                              "Mixture-of-Experts model), so there is no load-balancing loss to weight; leave it unset")
        return None
    lm = _causal_lm(model)
    default = _own_coefficient(lm)
    why_not = _unsupported(lm)
    if why_not is not None:
        if coef:
            raise DpokitError(f"--router-aux-loss-coef {coef:g}: {model_type} has a router, but {why_not}; "
                              "leave it unset or 0")
        if default:
            log(f"router: {model_type}'s config names a load-balancing coefficient ({default:g}), but {why_not}; "
                "training without it")
        return None
    value = default if coef is None else coef
    source = "--router-aux-loss-coef" if coef is not None else f"{model_type}'s own coefficient"
    if value:
        log(f"router: the load-balancing loss x {value:g} is added to the training loss ({source}; 0: off)")
    else:
        log(f"router: the load-balancing loss is logged (aux_loss), not trained on ({source} is 0)")
    return RouterLoss(float(value), int(lm.num_experts), int(lm.num_experts_per_tok),
                      _family_function(lm), model_type)


def _own_coefficient(lm: torch.nn.Module) -> float:
    """The coefficient the model's own forward multiplies its aux loss by (`router_aux_loss_coef`;
    JetMoE's `aux_loss_coef`; DBRX sets it from `ffn_config.moe_loss_weight`), else its config's."""
    for holder in (lm, getattr(lm, "config", None)):
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            value = getattr(holder, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return 0.0


def _family_function(lm: torch.nn.Module) -> Callable | None:
    return getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)


def _unsupported(lm: torch.nn.Module) -> str | None:
    """Why dpokit cannot compute this router's load-balancing loss, or None when it can."""
    function = _family_function(lm)
    if function is None:
        return f"transformers' {type(lm).__name__} defines no load-balancing loss"
    if tuple(inspect.signature(function).parameters) != _STANDARD_ARGUMENTS:
        return f"its load-balancing loss takes other arguments than the Switch Transformer one ({function.__module__})"
    counts = (getattr(lm, "num_experts", None), getattr(lm, "num_experts_per_tok", None))
    if not all(isinstance(n, int) and n > 0 for n in counts):
        return f"{type(lm).__name__} does not say how many experts it routes to"
    return None


def with_router_loss(out, aux: RouterAux | None, router: RouterLoss | None):
    """A `LossOutput` whose per-pair losses carry `coef x aux`: the step's loss (a sum over its
    pairs / their count) then adds coef x the pair-weighted mean of its micro-batches' aux losses,
    and the logged `loss` includes the term, as TRL's does."""
    if aux is None or router is None or not router.coef:
        return out
    return dataclasses.replace(out, losses=out.losses + router.coef * aux.aux_loss.to(out.losses.dtype))


# The router's figures in metrics.jsonl, each the pair-weighted mean over the logged batches:
# the load-balancing loss (TRL's `aux_loss`), and the busiest expert's share of the routed tokens,
# averaged over the MoE layers and in the busiest layer (k/E when balanced, 1 when collapsed).
ROUTER_METRICS = ("aux_loss", "router/max_expert_share", "router/max_expert_share_busiest_layer")


def router_metric_rows(aux: RouterAux | None, like: torch.Tensor) -> list[torch.Tensor]:
    """One (B,) row per ROUTER_METRICS entry, the batch's value repeated per pair (zeros without
    a router), so that summing a row over pairs weighs each batch by its pairs, as the loss does."""
    if aux is None:
        return [torch.zeros_like(like) for _ in ROUTER_METRICS]
    shares = aux.max_expert_share.detach().float().to(like.device)
    figures = [aux.aux_loss.detach().float().to(like.device),
               shares.mean() if shares.numel() else like.new_zeros(()),
               shares.max() if shares.numel() else like.new_zeros(())]
    return [figure.expand_as(like) for figure in figures]


# Every layout computes the padded layout's load-balancing loss: the same mask-weighted sums in
# another order. Measured on the MoE matrix (tests/test_router_loss.py): at most 2 float32 ulps
# (4.8e-7 at 3.2); 32 ulps of the value allow for the reordered sums of longer batches. Counting
# padding, or each shared prompt once, moves it by 1e-5 to 1e-1 there.
AUX_RELATIVE_TOLERANCE = 32 * 2.0**-24


def check_router_gap(entry: dict, padded: RouterAux | None, other: RouterAux | None) -> dict:
    """The first-batch guard's entry for a layout (`layout_guard`), with the gap between its
    load-balancing loss and the padded one's when the run has the term: a layout whose log-probs
    agree but whose aux loss does not is not exact either."""
    if padded is None or other is None:
        return entry
    reference = padded.aux_loss.item()
    gap = abs(other.aux_loss.item() - reference)
    tolerance = AUX_RELATIVE_TOLERANCE * max(1.0, abs(reference))
    entry.update(aux_gap=gap, aux_tolerance=tolerance)
    if gap > tolerance and entry["exact"]:
        entry.update(exact=False, gap=None, error=f"the router's load-balancing loss differs by {gap:.3g} "
                                                   f"({reference:.6g} padded), the log-probs by {entry['gap']:.3g}")
    return entry
