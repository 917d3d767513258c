"""Forward pass -> per-sequence summed response log-probs. The one log-prob path of dpokit.

Every batch layout (padded, packed, prefix-shared; see `data.batching`) comes here and ends in
the same sums: log p(token) = logit[token] - logsumexp(logits) on the scored positions only.

Chunked LM head (the default where it is exact): the model body returns final hidden states,
only the N scored positions are gathered, and `ChunkedHeadLogps` applies the output layer to
`chunk` positions at a time, in forward and again (recomputed) in backward, so the
[N x vocab] logits never exist at once: peak memory is one [chunk x vocab] block. Prompt and
padding positions never meet the LM head at all.

Models whose forward post-processes the logits (Gemma 2's `final_logit_softcapping`, Cohere's
`logit_scale`, Granite's `logits_scaling`, ...) or whose head is not a plain Linear are detected
by a one-time probe (`head_is_plain`), which compares `lm_head(body(x))` with `model(x).logits`;
they fall back to the plain path: the model's own logits, scored in chunks of positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.data.batching import PairBatch
from dpokit.model.attention import PACKED_LAYOUTS, attention_inputs
from dpokit.model.capability import ModelForward, describe_forward, head_is_plain, model_body  # noqa: F401 (head_is_plain: for callers)
from dpokit.model.router_loss import RouterAux, RouterLoss

# Float elements of one [chunk x vocab] logits block: 2^22 floats = 16 MiB in fp32. The chunk
# length adapts to the vocabulary, so peak memory does not grow with it.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK = 16


@dataclass
class PairLogps:
    """(B,) tensors: summed response log-probs and response token counts of each half, and
    WPO's pair weights w_c·w_r (no gradient) when asked for (`wpo_pair_weights`), else None;
    the MoE router's load-balancing loss and load of the forward when asked for (`router_loss`)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    pair_weights: torch.Tensor | None = None
    router: RouterAux | None = None


def chunk_positions(vocab_size: int, chunk: int | None = None) -> int:
    """Positions per LM-head chunk: `chunk` when given, else CHUNK_ELEMENTS / vocab (at least 16)."""
    if chunk:
        return chunk
    return max(MIN_CHUNK, CHUNK_ELEMENTS // max(1, vocab_size))


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """(N, V) logits and (N,) targets -> (N,) float32 log-probs, chunked over N (plain path)."""
    return _plain_token_stats(logits, targets, chunk, log_sum_sq=False)[0]


def _plain_token_stats(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None,
                       log_sum_sq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) log-probs of `targets` and, when asked, (N,) log Σ_v p(v)² without gradient (WPO's
    alignment term), from (N, V) logits chunked over N; float32 (float64 for double logits)."""
    step = chunk_positions(logits.shape[-1], chunk)
    acc = torch.promote_types(logits.dtype, torch.float32)
    pieces, squares = [], []
    for start in range(0, logits.shape[0], step):
        block = logits[start : start + step].to(acc)
        picked = block.gather(-1, targets[start : start + step, None]).squeeze(-1)
        lse = torch.logsumexp(block, dim=-1)
        pieces.append(picked - lse)
        if log_sum_sq:
            with torch.no_grad():
                squares.append(torch.logsumexp(2 * block, dim=-1) - 2 * lse)
    if not pieces:
        empty = logits.new_zeros(0, dtype=acc)
        return empty, empty if log_sum_sq else None
    return torch.cat(pieces), torch.cat(squares) if log_sum_sq else None


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul here (bf16 under bf16 autocast), else the tensor's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class ChunkedHeadLogps(torch.autograd.Function):
    """log_softmax(hidden @ W.T + b)[target] for N positions, `chunk` positions at a time.

    Forward keeps only the (N,) logsumexps; backward recomputes each chunk's logits and uses
    d logp / d logits = onehot(target) - softmax(logits). Logits and their softmax are float32
    whatever the compute dtype (bf16 matmuls under autocast), as in the plain path.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype, log_sum_sq: bool):
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for double inputs
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty_like(out)
        # WPO's log Σ_v p(v)², from the same logits block (no second pass over the head); empty when not asked
        squares = torch.empty(h.shape[0] if log_sum_sq else 0, dtype=acc, device=h.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                logits = F.linear(h[s : s + chunk], w, b).to(acc)
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
                out[s : s + chunk] = picked - lse[s : s + chunk]
                if log_sum_sq:
                    squares[s : s + chunk] = torch.logsumexp(2 * logits, dim=-1) - 2 * lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(squares)
        return out, squares

    @staticmethod
    def backward(ctx, grad_out, _grad_squares):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, g_out = h[s : s + chunk], grad_out[s : s + chunk].to(acc)
                logits = F.linear(hc, w, b).to(acc)
                # d(out_n)/d(logits_n) = onehot(target_n) - softmax(logits_n), scaled by grad_out_n.
                grad_logits = torch.exp(logits - lse[s : s + chunk, None]).mul_(-g_out[:, None])
                grad_logits.scatter_add_(-1, targets[s : s + chunk, None], g_out[:, None])
                g = grad_logits.to(dtype)
                if need_h:
                    grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                if need_w:
                    if dtype == acc:
                        grad_w.addmm_(g.t(), hc)
                    else:  # bf16 matmul, float32 accumulation across chunks
                        grad_w += (g.t() @ hc).to(acc)
                if need_b:
                    grad_b += grad_logits.sum(0)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_head_logps(hidden, weight, bias, targets, chunk: int | None = None) -> torch.Tensor:
    """(N, H) final hidden states -> (N,) float32 log-probs of `targets` under the LM head."""
    return _chunked_head_stats(hidden, weight, bias, targets, chunk, log_sum_sq=False)[0]


def _chunked_head_stats(hidden, weight, bias, targets, chunk: int | None,
                        log_sum_sq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunked_head_logps` and, when asked, (N,) log Σ_v p(v)² without gradient."""
    step = chunk_positions(weight.shape[0], chunk)
    out, squares = ChunkedHeadLogps.apply(hidden, weight, bias, targets, step, _compute_dtype(hidden), log_sum_sq)
    return out, squares if log_sum_sq else None


def _saved_tensors_place(forward: ModelForward):
    """save_on_cpu (pinned) for an offloaded model's gradient forward; otherwise nothing."""
    if forward.offload and torch.is_grad_enabled():
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def sequence_logps(model: torch.nn.Module, batch: PairBatch, chunked_head: bool | None = None,
                   chunk: int | None = None, *, ld_alpha: float | None = None,
                   wpo_weights: bool = False, forward: ModelForward | None = None,
                   router: RouterLoss | None = None) -> PairLogps:
    """Run `model` on the batch and sum each sequence's scored-token log-probs.

    chunked_head: None = use the chunked LM head whenever the model passes `head_is_plain`;
    False = the plain path (full logits from the model); True = require the chunked head.
    ld_alpha: LD-DPO's α (`response_sums`); wpo_weights: also WPO's pair weights (`wpo_pair_weights`).
    Both act here, on the scored tokens every layout ends in, so every layout gets them alike.
    forward: what the run found about `model` (`capability.describe_forward`, kept by the scorer);
    None probes it now, for this batch's layout only (a one-off call: tests, tools).
    router: the MoE load-balancing term (`model.router_loss`), computed on this forward's routing.
    """
    if forward is None:
        forward = describe_forward(model, [batch.layout] if batch.layout in PACKED_LAYOUTS else [],
                                   head=chunked_head is None)
    if batch.layout in forward.refusals:
        raise ValueError(f"--layout {batch.layout} is not exact for this model: {forward.refusals[batch.layout]}")
    use_chunked = forward.plain_head if chunked_head is None else chunked_head
    with _saved_tensors_place(forward), router.recording(model) if router else contextlib.nullcontext() as routed:
        logps, log_sum_sq = _scored_token_logps(model, batch, use_chunked, chunk, wpo_weights, forward.windows)
    counts = torch.bincount(batch.score_seq, minlength=2 * batch.num_pairs)
    summed = response_sums(logps, batch.score_seq, counts, ld_alpha)
    weights = None if log_sum_sq is None else wpo_pair_weights(logps, log_sum_sq, batch.score_seq, counts)
    lengths = counts.to(torch.float32)
    b = batch.num_pairs
    aux = router(routed[-1], batch) if router else None
    return PairLogps(summed[:b], summed[b:], lengths[:b], lengths[b:], weights, aux)


def response_positions(score_seq: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(N,) 0-based place of each scored token among its own sequence's scored tokens. Every
    layout lists a sequence's scored tokens in their order in the response (`data.batching`);
    the sequences themselves may come in any order (packed rows)."""
    order = torch.argsort(score_seq, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.empty_like(score_seq)
    positions[order] = torch.arange(score_seq.numel(), device=score_seq.device) - starts[score_seq[order]]
    return positions


def response_sums(token_logps: torch.Tensor, score_seq: torch.Tensor, counts: torch.Tensor,
                  ld_alpha: float | None = None) -> torch.Tensor:
    """(2B,) summed log-probs of each sequence's scored tokens (`counts`: (2B,) tokens per sequence).

    LD-DPO, Liu et al. 2024 (arXiv:2409.06411), §4, as TRL 1.16 computes it: log π̂(y) =
    Σ_{k ≤ ℓ} log p(y_k) + α·Σ_{k > ℓ} log p(y_k), ℓ = min(len_c, len_r) of the pair: the tokens
    past the shorter response count α times. ld_alpha None sums every token once.
    """
    zeros = token_logps.new_zeros(counts.shape[0])
    if ld_alpha is None:
        return zeros.index_add(0, score_seq, token_logps)
    b = counts.shape[0] // 2
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)  # ℓ of each sequence's pair
    tail = response_positions(score_seq, counts) >= shared[score_seq]
    shared_sum = zeros.index_add(0, score_seq, token_logps.masked_fill(tail, 0.0))
    tail_sum = zeros.index_add(0, score_seq, token_logps.masked_fill(~tail, 0.0))
    return shared_sum + ld_alpha * tail_sum


def wpo_pair_weights(token_logps: torch.Tensor, token_log_sum_sq: torch.Tensor, score_seq: torch.Tensor,
                     counts: torch.Tensor) -> torch.Tensor:
    """(B,) w_c·w_r, without gradient: WPO, Zhou et al. 2024 (arXiv:2406.11827), eq. 2 with its
    sampled alignment (§3.2), as TRL 1.16 computes it: w(y) = exp((1/|y|)·Σ_k [log p(y_k) − log Σ_v p(v)²]).

    Σ_v p(v)² is the expected probability of a token sampled from the policy itself, so its own
    samples weigh 1 on average, whatever the policy's entropy; an empty response weighs 1.
    """
    with torch.no_grad():
        aligned = token_logps.detach() - token_log_sum_sq
        mean = aligned.new_zeros(counts.shape[0]).index_add(0, score_seq, aligned) / counts.clamp(min=1)
        weights = torch.exp(mean)
        b = counts.shape[0] // 2
        return weights[:b] * weights[b:]


def _scored_token_logps(model: torch.nn.Module, batch: PairBatch, use_chunked: bool, chunk: int | None,
                        log_sum_sq: bool, windows: dict[str, int | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) float32 log-probs of the batch's scored tokens: the forward, then the LM head; and,
    when asked, their (N,) log Σ_v p(v)² (WPO)."""
    inputs = {"use_cache": False, **attention_inputs(model, batch, windows)}
    shape = batch.input_ids.shape  # FlashAttention runs packed rows as one flattened row
    if use_chunked:
        body, head = model_body(model), model.get_output_embeddings()
        if body is None or not isinstance(head, torch.nn.Linear):
            raise ValueError("the chunked LM head needs a model with a body and a Linear output layer")
        hidden = body(**inputs).last_hidden_state.view(*shape, -1)[batch.score_rows, batch.score_cols]
        if log_sum_sq:
            return _chunked_head_stats(hidden, head.weight, head.bias, batch.targets, chunk, log_sum_sq=True)
        return chunked_head_logps(hidden, head.weight, head.bias, batch.targets, chunk), None
    logits = model(**inputs).logits.view(*shape, -1)
    return _plain_token_stats(logits[batch.score_rows, batch.score_cols], batch.targets, chunk, log_sum_sq)
