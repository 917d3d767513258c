"""The values an option may take: the one copy every layer above reads.

Config is the bottom layer: the dataclasses, their `--help` and their checks are written in
terms of these, and data/, losses.py and experiments/ import them from here (never the other
way round). The loss catalogue says what each loss needs and which options change it; the math
behind each name lives in `dpokit.losses`, which pairs one function with every name here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DTYPES = ("fp32", "bf16", "fp16")
DATA_FORMATS = ("standard", "implicit", "conversational", "sharegpt")  # --data-format, besides auto
TURN_MODES = ("last", "all")  # --train-on-turns
TRUNCATION_MODES = ("keep_end", "keep_start")
# Names --columns may map a source column to.
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "conversations", "score_chosen", "score_rejected")
# Chat-template arguments dpokit sets itself, so --chat-template-kwargs cannot.
RESERVED_TEMPLATE_ARGS = ("messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
                          "continue_final_message", "return_dict", "chat_template")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
LR_SCHEDULERS = ("cosine", "linear", "constant")
PROGRESS_MODES = ("auto", "on", "off")
ATTENTION_KINDS = ("auto", "segments", "masks")  # --attention of packed and prefix-shared rows
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # --report-to, besides none
PARALLEL_STRATEGIES = ("ddp", "fsdp")
BATCH_LAYOUTS = ("padded", "packed", "prefix-shared")  # --layout, besides auto
LM_HEADS = ("auto", "chunked", "plain")
REFERENCE_MODES = ("auto", "precomputed", "live")
PAIRINGS = ("best_worst", "all")  # --pairing of online rounds


@dataclass(frozen=True)
class LossKind:
    """What one loss needs and which options change it."""

    needs_reference: bool = True  # reads reference log-probs (False: no reference model is built)
    uses_label_smoothing: bool = False  # ε changes the loss
    f_divergence: bool = False  # an --f-divergence other than reverse_kl is meaningful
    batch_statistics: bool = False  # keeps running statistics over the training batches (alone in --loss)
    uses_beta: bool = True  # β enters the loss (not only the logged rewards)
    options: tuple[str, ...] = ()  # the LossConfig fields of its own that change it (--simpo-gamma, ...)


_SIGMOID = LossKind(uses_label_smoothing=True, f_divergence=True)

# Every loss name --loss accepts, in the order --help lists them.
LOSS_KINDS: dict[str, LossKind] = {
    "sigmoid": _SIGMOID,
    "dpo": _SIGMOID,  # another name for sigmoid
    "robust": LossKind(uses_label_smoothing=True, f_divergence=True),
    "hinge": LossKind(f_divergence=True),
    "ipo": LossKind(f_divergence=True),
    "exo_pair": LossKind(uses_label_smoothing=True, f_divergence=True),
    "nca_pair": LossKind(),
    "bco_pair": LossKind(),
    "sppo_hard": LossKind(),
    "aot": LossKind(uses_label_smoothing=True),
    "aot_unpaired": LossKind(uses_label_smoothing=True),
    "apo_zero": LossKind(),
    "apo_down": LossKind(),
    "discopop": LossKind(f_divergence=True, options=("discopop_tau",)),
    "sigmoid_norm": LossKind(f_divergence=True),
    "rdpo": LossKind(f_divergence=True, options=("rdpo_alpha",)),
    "dpop": LossKind(options=("dpop_lambda",)),
    "beta_dpo": LossKind(batch_statistics=True, options=("beta_dpo_alpha", "beta_dpo_rho")),
    # sft ignores --f-divergence (so it combines with any) and β (it is the chosen response's NLL)
    "sft": LossKind(needs_reference=False, f_divergence=True, uses_beta=False),
    "simpo": LossKind(needs_reference=False, options=("simpo_gamma",)),
    "orpo": LossKind(needs_reference=False, uses_beta=False, options=("orpo_lambda",)),  # β: rewards only
}
NEEDS_LABEL_SMOOTHING = ("exo_pair",)  # losses that are undefined at ε = 0
SORTS_PAIRS = ("aot", "aot_unpaired")  # sort the batch's log-ratios, so per-pair weights (--wpo) lose their pair
PER_TOKEN_LOSSES = ("ipo", "sigmoid_norm", "sft", "simpo", "orpo")  # average log-probs per token (no --ld-alpha)


def loss_options_in_use(names: Sequence[str], f_divergence: str = "reverse_kl") -> tuple[str, ...]:
    """The LossConfig options that change a loss made of `names` (besides the names themselves,
    their weights and the run-wide --sync-reference-*, --wpo, --ld-alpha): the shared ones, then each loss's own."""
    kinds = [LOSS_KINDS[name] for name in names]
    scored = any(kind.f_divergence and kind.needs_reference for kind in kinds)  # sft accepts it, ignores it
    used = {"beta": any(kind.uses_beta for kind in kinds),
            "label_smoothing": any(kind.uses_label_smoothing for kind in kinds),
            "f_divergence": scored,
            "alpha_divergence_coef": scored and f_divergence == "alpha_divergence"}
    own = [option for kind in kinds for option in kind.options]
    return tuple(name for name, on in used.items() if on) + tuple(dict.fromkeys(own))


def losses_where(trait: str) -> list[str]:
    """The loss names whose LossKind has `trait` set, in catalogue order."""
    return [name for name, kind in LOSS_KINDS.items() if getattr(kind, trait)]
