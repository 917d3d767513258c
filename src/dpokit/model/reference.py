"""Reference log-probs: precomputed once and cached on disk (default), or live from a frozen copy.

Precomputed: before training, one no-grad pass of the initial policy (which *is* the reference)
over the training and evaluation pairs; the summed log-probs are stored in a safetensors file
named by a fingerprint of

- the reference weights: a hash of the model folder's weight files and config.json (the
  in-memory state dict when the model is not a local folder),
- the data: a hash of every pair's token ids in order (this covers the tokenizer, the chat
  template and the truncation settings: anything that changes a token changes the hash),
- the settings that change log-probs: the compute dtype, 4-bit loading (QLoRA), the attention
  implementation, LD-DPO's α (`--ld-alpha`: the cached sums weigh tokens by it) and CACHE_VERSION. The batch layout and the LM-head mode are left out on
  purpose: they are equivalent (tests/test_layouts.py).

Only the pairs a run will use are computed (a `--max-steps` run touches a fraction of a large
file): the file holds one row per pair of the dataset and a `computed` mask, and a later run that
needs more pairs (a longer run, a resumed one) computes the missing ones and extends it.
A resumed run or a β sweep with the same model and data finds the file and skips the pass; a
changed model, dataset or setting never matches it. The file is written atomically and read with
safetensors (no pickle); one that does not match or cannot be read is recomputed, with a log line.
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import DpokitError
from dpokit.faults import inject
from dpokit.io import Log, atomic_write_bytes, counted, file_sha256
from dpokit.model.logprobs import PairLogps

# Bump when the meaning of a cached number changes (tokenization rules, log-prob definition).
CACHE_VERSION = "2"  # 2: the `computed` mask (files cover part of a dataset)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")

PairKey = tuple[tuple[int, ...], ...]  # prompt, chosen, rejected ids (+ masks when set)


def pair_key(pair: TokenizedPair) -> PairKey:
    """What identifies a pair for the reference: its token ids (not its position or row number),
    and which response tokens are scored when `--train-on-turns all` masks some."""
    masks = tuple(tuple(map(int, m)) for m in (pair.chosen_mask, pair.rejected_mask) if m is not None)
    return (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, *masks)


def weights_fingerprint(model_source: str | None, model: torch.nn.Module | None = None) -> str:
    """sha256 of a local model folder's weight files and config (or of a GGUF model file), else of
    `model`'s state dict."""
    digest = hashlib.sha256()
    folder = Path(model_source).expanduser() if model_source else None
    if folder and folder.is_file():  # a GGUF file holds the weights and the config
        digest.update(folder.name.encode() + b"\0" + file_sha256(folder))
        return "files:" + digest.hexdigest()
    files = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern)}) if folder and folder.is_dir() else []
    if files:
        for path in [*files, folder / "config.json"]:
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + file_sha256(path))
        return "files:" + digest.hexdigest()
    if model is None:
        raise ValueError("no weight files and no model to fingerprint")
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "state:" + digest.hexdigest()


def run_reference_weights(model: str | None, reference_model: str | None, policy: torch.nn.Module) -> str | None:
    """Fingerprint of a run's reference weights: `--reference-model` when given, else the initial
    policy (`--model`; call it before any training step). None for a `--reference-model` that is
    not a local folder (its weights are not loaded here)."""
    try:
        return weights_fingerprint(reference_model, None) if reference_model else weights_fingerprint(model, policy)
    except ValueError:
        return None


def reference_fingerprint(weights: str, dtype: str, *, load_in_4bit: bool = False,
                          attention: str | None = None, ld_alpha: float | None = None) -> dict[str, str]:
    """The weights and settings parts of a cache key (the data part is added per dataset):
    everything that changes a reference log-prob. 4-bit base weights give other log-probs than
    full-precision ones, and attention kernels differ in rounding, so each gets its own cache.
    Under --ld-alpha the sums weigh tokens by α: the key holds α exactly (repr), so a cache made
    at another α, or without LD-DPO, never matches; without it the key is what it always was."""
    key = {"version": CACHE_VERSION, "weights": weights, "dtype": dtype,
           "load_in_4bit": str(bool(load_in_4bit)), "attention": str(attention)}
    if ld_alpha is not None:
        key["ld_alpha"] = repr(float(ld_alpha))
    return key


def data_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of every pair's prompt, chosen and rejected token ids, in order, with lengths."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in pair_key(pair):
            digest.update(array("q", [len(ids), *ids]).tobytes())
    return digest.hexdigest()


def cache_path(folder: Path, fingerprint: dict[str, str]) -> Path:
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return folder / f"reference-logps-{key[:24]}.safetensors"


def save_cache(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, fingerprint: dict[str, str],
               computed: torch.Tensor | None = None) -> None:
    """Write the (N,) tensors, which rows are `computed` (all when None) and the fingerprint
    atomically (`io.atomic_write_bytes`: a temporary file, then a rename)."""
    from safetensors.torch import save

    if computed is None:
        computed = torch.ones(len(chosen), dtype=torch.bool)
    atomic_write_bytes(path, save({"chosen": chosen.float().contiguous().cpu(),
                                   "rejected": rejected.float().contiguous().cpu(),
                                   "computed": computed.to(torch.uint8).contiguous().cpu()},
                                  metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)}))


def load_cache(path: Path, fingerprint: dict[str, str], num_pairs: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """The cached (chosen, rejected, computed) tensors, or a reason why the file cannot be used."""
    from safetensors import safe_open

    if not path.is_file():
        return "no cache file yet"
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = json.loads((handle.metadata() or {}).get("fingerprint", "null"))
            if stored != fingerprint:
                return "its fingerprint does not match"
            chosen, rejected = handle.get_tensor("chosen"), handle.get_tensor("rejected")
            computed = handle.get_tensor("computed").bool()
    except Exception as exc:  # noqa: BLE001 - a corrupt cache is recomputed, never trusted
        return f"it cannot be read ({type(exc).__name__})"
    if any(t.shape != (num_pairs,) for t in (chosen, rejected, computed)) or not (
        torch.isfinite(chosen[computed]).all() and torch.isfinite(rejected[computed]).all()
    ):
        return "its contents do not fit the data"
    return chosen, rejected, computed


class PrecomputedReference:
    """Reference log-probs looked up by pair tokens; built by `precompute_reference`."""

    def __init__(self) -> None:
        self._rows: dict[PairKey, int] = {}
        self._chosen: list[torch.Tensor] = []
        self._rejected: list[torch.Tensor] = []
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, pairs: Sequence[TokenizedPair], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        start = sum(len(c) for c in self._chosen)
        for offset, pair in enumerate(pairs):
            self._rows.setdefault(pair_key(pair), start + offset)
        self._chosen.append(chosen.float().cpu())
        self._rejected.append(rejected.float().cpu())
        self._table = None

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, pairs: Sequence[TokenizedPair], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) chosen and rejected reference log-probs of `pairs`, on `device`."""
        if self._table is None or self._table[0].device != device:
            self._table = (torch.cat(self._chosen).to(device), torch.cat(self._rejected).to(device))
        try:
            rows = torch.tensor([self._rows[pair_key(p)] for p in pairs], dtype=torch.long, device=device)
        except KeyError:
            raise KeyError("a pair has no precomputed reference log-probs; use --reference live for data "
                           "that appears during training") from None
        return self._table[0][rows], self._table[1][rows]


def precompute_reference(
    compute: Callable[[Sequence[TokenizedPair]], PairLogps],
    datasets: Sequence[Sequence[TokenizedPair]],
    fingerprint: dict[str, str],
    cache_folder: Path,
    batch_size: int,
    log: Log = print,
    needed: Sequence[Sequence[int] | None] | None = None,
) -> PrecomputedReference:
    """Load each dataset's reference log-probs from the cache, computing (and caching) what is missing.

    `compute` scores a list of pairs without gradients (the initial policy = the reference);
    `fingerprint` holds the weights and settings parts, the data part is added per dataset.
    `needed[k]` lists the indices of dataset k the run will score (None: all of them); only those
    are computed, the file keeps what earlier runs computed.
    """
    reference = PrecomputedReference()
    for pairs, wanted in zip(datasets, needed or [None] * len(datasets), strict=True):
        if not pairs:
            continue
        full = {**fingerprint, "data": data_fingerprint(pairs), "num_pairs": str(len(pairs))}
        path = cache_path(cache_folder, full)
        cached = load_cache(path, full, len(pairs))
        if isinstance(cached, tuple):
            chosen, rejected, computed = cached
        else:
            chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
            computed = torch.zeros(len(pairs), dtype=torch.bool)
        rows = sorted(set(range(len(pairs)) if wanted is None else wanted))
        missing = [i for i in rows if not computed[i]]
        if missing:
            started = time.perf_counter()
            _fill(compute, [pairs[i] for i in missing], missing, chosen, rejected, batch_size)
            computed[missing] = True
            save_cache(path, chosen, rejected, full, computed)
            why = cached if isinstance(cached, str) else "the pairs this run uses were not all in it"
            log(f"reference log-probs of {counted(len(pairs), 'pair')}: computed {len(missing)} (the ones this run uses) "
                f"in {time.perf_counter() - started:.1f} s ({why}), cached in {path}")
        else:
            log(f"reference log-probs of {counted(len(pairs), 'pair')}: reused {path} ({len(rows)} used by this run)")
        reference.add([pairs[i] for i in rows], chosen[rows], rejected[rows])
    return reference


def _fill(compute: Callable[[Sequence[TokenizedPair]], PairLogps], pairs: Sequence[TokenizedPair],
          rows: Sequence[int], chosen: torch.Tensor, rejected: torch.Tensor, batch_size: int) -> None:
    """Score `pairs` in batches and write their log-probs into `chosen[rows]` and `rejected[rows]`."""
    inject("reference-pass")  # tests: an out-of-memory (or a kill) where the pass allocates
    for start in range(0, len(pairs), batch_size):
        out = compute(pairs[start : start + batch_size])
        at = list(rows[start : start + batch_size])
        chosen[at] = out.chosen_logps.detach().float().cpu()
        rejected[at] = out.rejected_logps.detach().float().cpu()


# The live reference under TR-DPO (--sync-reference-steps): its weights follow the policy.


def reference_sync_due(step: int, every: int) -> bool:
    """Whether the reference is updated after optimizer step `step` (1-based; every step counts,
    a skipped one too): after steps τ, 2τ, ... as TRL's SyncRefModelCallback does; never with τ = 0."""
    return every > 0 and step > 0 and step % every == 0


def check_sync_compatible(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Refuse (one line) a reference whose parameters do not match the policy's one to one."""
    ours, theirs = list(reference.named_parameters()), list(policy.named_parameters())
    if len(ours) != len(theirs):
        raise DpokitError(f"--sync-reference-steps needs a reference of the policy's shape: it has {len(ours)} "
                          f"weight tensors, the policy {len(theirs)}")
    for (name, ref), (_, param) in zip(ours, theirs, strict=True):
        if ref.shape != param.shape:
            raise DpokitError(f"--sync-reference-steps needs a reference of the policy's shape: {name} has shape "
                              f"{tuple(ref.shape)} there, {tuple(param.shape)} in the policy")


@torch.no_grad()
def sync_reference(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
    Alignment", §3): soft, θ_ref ← α·θ + (1 − α)·θ_ref_prev; hard (α = 1), θ_ref ← θ, a copy.

    In place, parameter by parameter in `parameters()` order (a tied weight once); buffers are
    left alone (the rotary tables are constants). The soft update is evaluated as
    θ_ref·(1 − α) + α·θ, the order TRL evaluates it in, so both give the same bits.
    """
    for ref, param in zip(reference.parameters(), policy.parameters(), strict=True):
        if alpha == 1.0:
            ref.copy_(param)
        else:
            ref.mul_(1.0 - alpha).add_(param, alpha=alpha)
