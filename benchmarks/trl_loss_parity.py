"""dpokit's WPO (--wpo), LD-DPO (--ld-alpha) and logged metrics against TRL 1.16's DPOTrainer, same model, same pairs.

    PYTHONPATH=src /tmp/trlenv/bin/python benchmarks/trl_loss_parity.py

TRL lives in its own virtual environment (never a dependency of dpokit). A tiny random Llama in
float64 is the policy, a second one (other seed) the reference; six pairs of token ids whose
responses differ in length (so LD-DPO has tails to weigh). TRL's side is its own DPOTrainer:
`_compute_loss` on a batch built by the trainer's own collator, so TRL's LD-DPO reduction, WPO
weights and loss run as they do in training. dpokit's side is `PairScorer` (one log-prob path,
then the loss plan) in every batch layout.

TRL's fused LM head accumulates its per-token statistics in float32 whatever the model's dtype, so
two comparisons are printed per setting:

- fp64: TRL's per-token log p(y) and log Σ_v p(v)² replaced by exact float64 ones (log_softmax of
  the model's own float64 logits); everything after them, i.e. what this parity is about, is TRL's.
- TRL kernel: TRL untouched (its float32 kernel), which bounds what a user sees.

Per setting: the largest |difference| of the batch loss (mean over the six pairs) over the
layouts, and, from one-pair batches, of each pair's loss, summed log-probs (LD-weighted),
rewards (β·lr on the sums, for every loss, IPO and sigmoid_norm included), and WPO weight (TRL's
weight read as its weighted loss / its unweighted loss on the same pair); "metrics": the batch's
logged `rewards/*` and `logps/*` means (dpokit's `PairMetrics`, TRL's `_metrics`).
`tests/test_trl_parity.py` runs this where TRL is installed.
"""

from __future__ import annotations

import copy
import random
import sys
import tempfile
from pathlib import Path

import torch

SETTINGS = [  # (name, --loss, --wpo, --ld-alpha)
    ("sigmoid (DPO)", "sigmoid", False, None),
    ("sigmoid + WPO", "sigmoid", True, None),
    ("ipo", "ipo", False, None),
    ("ipo + WPO", "ipo", True, None),
    ("sigmoid_norm", "sigmoid_norm", False, None),
    ("apo_zero + WPO", "apo_zero", True, None),
    ("sigmoid + LD α=0.5", "sigmoid", False, 0.5),
    ("sigmoid + LD α=0", "sigmoid", False, 0.0),
    ("nca_pair + LD α=0.3", "nca_pair", False, 0.3),
    ("sigmoid + WPO + LD α=0.5", "sigmoid", True, 0.5),
]
LAYOUTS = ("padded", "packed", "prefix-shared")
BETA = 0.1
VOCAB = 64


def build_models():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg._attn_implementation = "sdpa"  # eager attention takes its softmax in float32 whatever the dtype
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval())
    return models


def build_pairs(n: int = 6, seed: int = 0):
    from dpokit.data.tokenize import TokenizedPair

    rng = random.Random(seed)
    words = lambda k: tuple(rng.randrange(4, VOCAB) for _ in range(k))  # noqa: E731
    pairs = []
    for i in range(n):
        c, r = rng.randint(2, 9), rng.randint(2, 9)
        pairs.append(TokenizedPair((2, *words(rng.randint(3, 7))), (*words(c - 1), 3), (*words(r - 1), 3), index=i))
    return pairs


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"])} | {f"w{i}": i for i in range(4, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


# ----------------------------------------------------------------------------- TRL's side
def trl_trainer(policy, reference, loss: str, wpo: bool, ld_alpha: float | None, folder: str, exact: bool):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=folder, use_cpu=True, bf16=False, fp16=False, report_to=[], beta=BETA,
                     loss_type=[loss], use_weighting=wpo, ld_alpha=ld_alpha, max_length=None,
                     precompute_ref_log_probs=False, disable_tqdm=True)
    data = Dataset.from_list([{"prompt": "w4 w5", "chosen": " w6", "rejected": " w7"}])
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=data, processing_class=build_tokenizer())
    if exact:
        for model in (trainer.model, trainer.ref_model):
            _exact_fp64_head(model)
    return trainer


def _exact_fp64_head(model) -> None:
    """Swap the per-token log p(y) and log Σ_v p(v)² of TRL's fused head (float32 statistics) for
    exact float64 ones from the model's own logits; TRL's reduction and loss then run on them."""
    fused = model.forward

    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        out = fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        if not fused_lm_head:
            return out
        logp = torch.log_softmax(fused(*args, **kwargs).logits[:, :-1].double(), -1)
        targets = labels[:, 1:]
        scored = targets != -100
        out["log_probs"] = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~scored, 0.0)
        if out.log_sum_sq_probs is not None:
            out["log_sum_sq_probs"] = torch.logsumexp(2 * logp, -1).masked_fill(~scored, 0.0)
        return out

    model.forward = forward


def trl_loss(trainer, pairs) -> tuple[float, dict[str, float]]:
    """TRL's batch loss on `pairs` (its collator, its `_compute_loss`) and the metrics it logs."""
    batch = trainer.data_collator([{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
                                    "rejected_ids": list(p.rejected_ids)} for p in pairs])
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    metrics.clear()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    logged = {k: v[-1] for k, v in metrics.items()}
    return float(loss), logged


# ----------------------------------------------------------------------------- dpokit's side
def dpokit_scorer(policy, reference, loss: str, wpo: bool, ld_alpha: float | None, layout: str, chunked: bool):
    from dpokit.config import LossConfig, SpeedConfig
    from dpokit.scoring import PairScorer

    config = LossConfig(loss=(loss,), beta=BETA, wpo=wpo, ld_alpha=ld_alpha)
    return PairScorer(policy, reference, loss=config, speed=SpeedConfig(layout=layout), dtype="fp32", pad_id=0,
                      device=torch.device("cpu"), layouts=[layout], chunked_head=chunked)


def compare(setting, policy, reference, pairs, folder: str, exact: bool) -> dict[str, float]:
    """Largest |dpokit − TRL| of each compared quantity over layouts and pairs."""
    from dpokit.metrics import PairMetrics

    _, loss, wpo, ld_alpha = setting
    trainer = trl_trainer(policy, reference, loss, wpo, ld_alpha, folder, exact)
    plain = trl_trainer(policy, reference, loss, False, ld_alpha, folder, exact) if wpo else None
    gaps: dict[str, float] = {}

    def note(name: str, a: float, b: float) -> None:
        gaps[name] = max(gaps.get(name, 0.0), abs(a - b))

    trl_batch, trl_logged = trl_loss(trainer, pairs)
    per_pair = [(trl_loss(trainer, [p]), trl_loss(plain, [p])[0] if plain else None) for p in pairs]
    for layout in LAYOUTS:
        for chunked in (True, False) if layout == "padded" else (True,):
            scorer = dpokit_scorer(policy, reference, loss, wpo, ld_alpha, layout, chunked)
            with torch.no_grad():
                ours = scorer(pairs)
            note("batch loss", float(ours.out.losses.mean()), trl_batch)
            metrics = PairMetrics(BETA)
            metrics.add(ours.out, ours.policy)
            for name, value in metrics.compute().items():
                if name != "loss" and name in trl_logged:
                    note("metrics", value, trl_logged[name])
            for i, ((trl_pair_loss, logged), trl_unweighted) in enumerate(per_pair):
                note("pair loss", float(ours.out.losses[i]), trl_pair_loss)
                note("logps", float(ours.policy.chosen_logps[i]), logged["logps/chosen"])
                note("logps", float(ours.policy.rejected_logps[i]), logged["logps/rejected"])
                note("rewards", float(ours.out.chosen_rewards[i]), logged["rewards/chosen"])
                note("rewards", float(ours.out.rejected_rewards[i]), logged["rewards/rejected"])
                if wpo:
                    note("WPO weight", float(ours.policy.pair_weights[i]), trl_pair_loss / trl_unweighted)
    return gaps


def run(exact: bool = True) -> list[tuple[str, dict[str, float]]]:
    policy, reference = build_models()
    pairs = build_pairs()
    with tempfile.TemporaryDirectory() as folder:
        return [(setting[0], compare(setting, policy, reference, pairs, folder, exact)) for setting in SETTINGS]


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import warnings

    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
          f"tiny Llama (float64), 6 pairs, β = {BETA}; dpokit in layouts {', '.join(LAYOUTS)} (padded also plain head)")
    columns = ("batch loss", "pair loss", "logps", "rewards", "metrics", "WPO weight")
    for exact, title in ((True, "fp64 (exact per-token log-probs fed to TRL)"), (False, "TRL's own float32 kernel")):
        print(f"\nmax |dpokit − TRL|, {title}")
        print(f"| setting | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
        for name, gaps in run(exact):
            cells = [f"{gaps[c]:.1e}" if c in gaps else "-" for c in columns]
            print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
