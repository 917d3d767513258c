"""Fitting a run into `--memory-budget`: which micro-batch and which memory levers, from probes.

Pure planning: the probe itself (one training step in a child process) is passed in as a
function (train/memory_probe.py runs the real one; tests pass a fake). A setting is a micro-batch
size b that divides the per-step batch B the user asked for (accumulation B / b keeps the global
batch, so the loss trajectory is the one asked for) and a level of levers, cumulative in the
order they are offered (selective recompute, gradient checkpointing, then the device's own lever;
gradient checkpointing supersedes selective recompute: it recomputes what that keeps).

The search probes few settings, because each probe is a training step:
1. (B, no lever): the run as asked. When it fits, that is the plan (one probe).
2. (1, each level): the cheapest step at a level, the last level's the smallest peak there is. A
   level is probed only while it could win: levers save memory and cost time, so the next level
   helps only at a micro-batch the levels probed so far do not fit, and only if the step there,
   at the last level's own speed, would beat the best plan found so far.
3. A model from those: peak(b, level) = base + b * per_pair(level), base and per_pair(none) from
   the two no-lever probes, per_pair(level) from its b = 1 probe; step time(b, level) =
   (B / b) * (c + d * b) * ratio(level), c + d * b through the no-lever probes' times and
   ratio(level) = its b = 1 time over the no-lever b = 1 time (the levers' cost is measured, not
   assumed). The fastest setting predicted to fit is probed to verify it; one that does not fit
   after all is struck out and the next is tried.

"Fits" means a measured peak within the budget less `margin` (what a long run adds to one step's
peak: allocator fragmentation, the whole data set in memory; docs/memory-budget.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dpokit.config import RunConfig
from dpokit.errors import DpokitError
from dpokit.io import atomic_write_text

PLAN_FILE = "memory_plan.json"
# The budget's share kept free above a probed peak: what a run's later steps add to its first
# (benchmarks/RESULTS.md section 13). On the CPU with malloc's adaptive mmap threshold the heap keeps
# each step's freed fragments (model/host_memory.py): runs peaked up to 1.25x their one-step probe
# there on the bench model and 1.20-1.42x on the real model (a 35% margin leaves a run at 1.42x its
# probe within 0.92 of the budget), and within 1.03x with the threshold fixed.
MARGIN = 0.10
HEAP_MARGIN = 0.35
MAX_VERIFIES = 3  # predicted settings probed before giving up on the model's predictions
MALLOC_LEVER_BYTES = 1 << 20  # the malloc lever fixes glibc's mmap threshold here (model/host_memory.py)
LEVER_WORDS = {"selective_recompute": "selective recompute", "gradient_checkpointing": "gradient checkpointing",
               "activation_offload": "activation offload", "malloc_threshold": "malloc threshold 1 MiB"}


@dataclass(frozen=True)
class Setting:
    micro_batch: int
    levers: tuple[str, ...] = ()


@dataclass
class Probe:
    setting: Setting
    peak: int | None  # bytes at its highest (None: the child died without a reading)
    seconds: float  # the probed step's wall time
    scoring: dict | None = None  # the scoring path the step took (memory_probe.scoring_path); None: not known


ProbeFn = Callable[[Setting], Probe]


class NoPlanFits(DpokitError):
    """Every setting probed over the budget; `smallest` is the lowest peak found."""

    def __init__(self, smallest: Probe, probes: list[Probe]) -> None:
        super().__init__(f"no plan fits; smallest peak {smallest.peak}")
        self.smallest, self.probes = smallest, probes


@dataclass
class MemoryPlan:
    """The plan a run follows (memory_plan.json) and how it was found."""

    budget: int  # bytes
    budget_text: str  # as given: 8GiB, auto
    requested: int  # pairs per optimizer step in this process, as asked (batch size x accumulation)
    micro_batch: int
    levers: list[str]
    peak: int  # the chosen setting's probed peak, bytes
    margin: float
    probe_seconds: float  # wall time of all probes, child start-up included
    probes: list[dict] = field(default_factory=list)  # every probe: micro_batch, levers, peak, seconds
    scoring: dict | None = None  # the chosen probe's scoring path (None: a plan written before it was kept)

    @property
    def accumulation(self) -> int:
        return self.requested // self.micro_batch

    def line(self, global_batch: int) -> str:
        levers = ", ".join(LEVER_WORDS[name] for name in self.levers) or "no memory lever"
        spare = 1 - self.peak / self.budget
        return (f"memory plan: micro-batch {self.micro_batch} x accumulation {self.accumulation} (global "
                f"{global_batch}), {levers}; probed peak {gib(self.peak)} of budget {gib(self.budget)} "
                f"({spare:.0%} spare, margin {self.margin:.0%}); {len(self.probes)} probe(s) in "
                f"{self.probe_seconds:.0f} s")

    def write(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / PLAN_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> MemoryPlan | None:
        path = Path(folder) / PLAN_FILE
        try:  # a run planned before resuming has one; another has none
            return cls(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
        except (ValueError, TypeError) as exc:
            raise DpokitError(f"{path}: not a dpokit memory plan ({exc}); remove it to plan again") from None


def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


def micro_batches(requested: int) -> list[int]:
    """The micro-batch sizes that split `requested` pairs evenly, largest first."""
    return [b for b in range(requested, 0, -1) if requested % b == 0]


def offered_levers(cfg: RunConfig, device_type: str, malloc_auto_fixes: bool) -> list[str]:
    """The levers the plan may pull, cheapest first as far as known (the probes measure it): those
    the user left off, and that do something on this device. `malloc_auto_fixes`: the auto mmap
    threshold is fixed for this data already."""
    s = cfg.scale
    # Selective recompute is refused under --compile (config/validate.py), so never offered there.
    levers = [] if s.gradient_checkpointing or s.selective_recompute or cfg.speed.compile else ["selective_recompute"]
    if not s.gradient_checkpointing:
        levers.append("gradient_checkpointing")
    if device_type == "cuda" and not s.activation_offload:
        levers.append("activation_offload")
    if device_type == "cpu" and s.malloc_mmap_threshold == "auto" and not malloc_auto_fixes:
        levers.append("malloc_threshold")
    return levers


def planned_config(cfg: RunConfig, setting: Setting, requested: int) -> RunConfig:
    """`cfg` run at `setting`: the micro-batch, accumulation to the same per-step batch, the levers on."""
    s = cfg.scale
    checkpointing = s.gradient_checkpointing or "gradient_checkpointing" in setting.levers
    scale = replace(s, gradient_checkpointing=checkpointing,
                    selective_recompute=(s.selective_recompute or "selective_recompute" in setting.levers)
                    and not checkpointing,
                    activation_offload=s.activation_offload or "activation_offload" in setting.levers,
                    malloc_mmap_threshold=(str(MALLOC_LEVER_BYTES) if "malloc_threshold" in setting.levers
                                           else s.malloc_mmap_threshold))
    train = replace(cfg.train, batch_size=setting.micro_batch,
                    gradient_accumulation_steps=requested // setting.micro_batch)
    return replace(cfg, train=train, scale=scale)


def level_of(levers: Sequence[str]) -> tuple[str, ...]:
    """The levers in effect when `levers` are pulled: gradient checkpointing supersedes selective recompute."""
    if "gradient_checkpointing" in levers:
        return tuple(name for name in levers if name != "selective_recompute")
    return tuple(levers)


def choose_setting(requested: int, levers: Sequence[str], budget: int, probe: ProbeFn, *,
                   margin: float | Callable[[Setting], float] = MARGIN) -> tuple[Setting, list[Probe]]:
    """The fastest setting whose probed peak is within budget x (1 - margin), and every probe made
    (in order); `margin` may depend on the setting. Raises NoPlanFits when none is."""
    margin_of = margin if callable(margin) else lambda _setting: margin
    seen: dict[Setting, Probe] = {}

    def limit(setting: Setting) -> float:
        return budget * (1 - margin_of(setting))

    def measure(setting: Setting) -> Probe:
        if setting not in seen:
            seen[setting] = probe(setting)
        return seen[setting]

    def fits(p: Probe) -> bool:
        return p.peak is not None and p.peak <= limit(p.setting)

    top = Setting(requested)
    if fits(measure(top)):
        return top, list(seen.values())
    levels = [level_of(levers[:k]) for k in range(len(levers) + 1)]
    ones = [measure(Setting(1, levels[0]))]
    verified = 0
    while True:
        model = _Model(seen[top], ones, requested)
        probed = levels[: len(ones)]
        options = [(model.seconds(s, seen), s) for s in _grid(requested, probed)
                   if (seen[s].peak if s in seen else model.peak(s)) <= limit(s) and (s not in seen or fits(seen[s]))]
        best = min(options, key=lambda o: (o[0], -o[1].micro_batch, len(o[1].levers)), default=None)
        if len(ones) < len(levels) and _next_level_may_win(model, seen, probed[-1], requested, limit, best):
            ones.append(measure(Setting(1, levels[len(ones)])))
            continue
        if best is None or verified == MAX_VERIFIES:
            break
        verified += 1
        if fits(measure(best[1])):
            return best[1], list(seen.values())
    measured = [p for p in seen.values() if p.peak is not None]
    raise NoPlanFits(min(measured, key=lambda p: p.peak) if measured else ones[-1], list(seen.values()))


def _next_level_may_win(model: _Model, seen: dict[Setting, Probe], level: tuple[str, ...], requested: int,
                        limit: Callable[[Setting], float], best: tuple[float, Setting] | None) -> bool:
    """Whether the next level of levers could give a faster plan than `best`: a lever saves memory
    and costs time (recomputation, page faults), so it can win only at a micro-batch where `level`
    does not fit, and there no faster than `level` itself would run."""
    for b in micro_batches(requested):
        s = Setting(b, level)
        over = seen[s].peak is None or seen[s].peak > limit(s) if s in seen else model.peak(s) > limit(s)
        if over and (best is None or model.seconds(s, seen) < best[0]):
            return True
    return False


def _grid(requested: int, levels: list[tuple[str, ...]]) -> list[Setting]:
    return [Setting(b, level) for level in levels for b in micro_batches(requested)]


class _Model:
    """Peak and step time of unprobed settings, from the probes (see the module's docstring)."""

    def __init__(self, top: Probe, ones: list[Probe], requested: int) -> None:
        self.requested = requested
        one, unknown = ones[0], float("inf")  # a probe without a reading counts as over any budget
        if requested > 1 and top.peak is not None and one.peak is not None:
            self.per_pair0 = max(0.0, (top.peak - one.peak) / (requested - 1))
            self.base = one.peak - self.per_pair0
        else:  # no slope to read: all of a b = 1 peak scales with b (an overestimate: it plans smaller)
            self.per_pair0 = unknown if requested > 1 or one.peak is None else float(one.peak)
            self.base = 0.0
        self.per_pair = {p.setting.levers: (p.peak - self.base if p.peak is not None else unknown) for p in ones}
        self.per_pair[()] = self.per_pair0
        self.slope = (top.seconds - one.seconds) / (requested - 1) if requested > 1 else 0.0
        self.ratio = {p.setting.levers: p.seconds / one.seconds if one.seconds > 0 else 1.0 for p in ones}
        self.fixed = one.seconds - self.slope  # c of c + d * b

    def peak(self, s: Setting) -> float:
        return self.base + s.micro_batch * self.per_pair[s.levers]

    def seconds(self, s: Setting, seen: dict[Setting, Probe]) -> float:
        """One optimizer step at `s`: measured when probed, else from the model."""
        per_micro = seen[s].seconds if s in seen else (self.fixed + self.slope * s.micro_batch) * self.ratio[s.levers]
        return self.requested / s.micro_batch * per_micro
