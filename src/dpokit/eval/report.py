"""Pictures and a one-page summary of a run: training curves, the reward–KL frontier, report.md.

matplotlib is imported lazily and used through its object API (`Figure` + the Agg canvas), so
nothing here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.config import SamplingConfig
from dpokit.errors import DpokitError
from dpokit.eval.envelope import frontier, upper_envelope
from dpokit.eval.evaluate import EVALUATION_SECTIONS, Sampler, format_number, run_template_kwargs
from dpokit.eval.sampling import prompt_text, read_prompts
from dpokit.io import RUN_CONFIG_FILE, Log, atomic_write_bytes, atomic_write_text, read_run_config
from dpokit.model.load import load_policy, load_tokenizer, resolve_device
from dpokit.model_card import write_model_card
from dpokit.trackers import Trackers

CURVES_FILE = "training_curves.png"
ROUTER_FILE = "router_load.png"
REPORT_FILE = "report.md"
SAMPLES_FILE = "samples.json"
EVALUATION_FILE = "evaluation.json"

# Panels of the training-curve figure: title -> the metrics drawn in it.
CURVE_PANELS = {
    "loss": ["loss"],
    "reward accuracy": ["rewards/accuracies"],
    "reward margin": ["rewards/margins"],
    "implicit rewards β·(log π − log π_ref)": ["rewards/chosen", "rewards/rejected"],
    "summed response log-probs": ["logps/chosen", "logps/rejected"],
    "log-prob drift from the first logged value": ["logps/chosen_drift", "logps/rejected_drift"],
    "learning rate": ["learning_rate"],
}
# Mixture-of-Experts runs (`model.router_loss`): a second figure, so a collapsing router shows.
ROUTER_PANELS = {
    "router load-balancing loss (aux_loss)": ["aux_loss"],
    "busiest expert's share of routed tokens": ["router/max_expert_share", "router/max_expert_share_busiest_layer"],
}


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def _save_png(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DpokitError(f"{run_dir} is not a dpokit run folder (no metrics.jsonl)")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DpokitError(f"{path}, line {line_no}: not valid JSON") from None
    return records


def plot_training_curves(records: Sequence[dict], path: str | Path, panels: dict[str, list[str]] | None = None) -> Path:
    """One panel per `panels` entry (CURVE_PANELS); training lines solid, held-out (`eval_`) points dashed."""
    panels = CURVE_PANELS if panels is None else panels
    ncols = math.ceil(len(panels) / 2)
    figure, axes = _figure(13 * max(ncols, 2) / 3, 7, ncols=ncols, nrows=2)
    colors = {"chosen": "tab:green", "rejected": "tab:red", "busiest_layer": "tab:orange"}
    for ax in axes.flat[len(panels):]:  # a grid cell left over
        ax.set_visible(False)
    for ax, (title, names) in zip(axes.flat, panels.items(), strict=False):
        drawn = False
        for name in names:
            color = next((c for key, c in colors.items() if key in name.split("/")[-1]), "tab:blue")
            what = name.split("/")[-1] if len(names) > 1 else ""
            for prefix, style in (("", {"linestyle": "-"}), ("eval_", {"linestyle": "--", "marker": "o",
                                                                        "markersize": 3})):
                points = [(r["step"], r[prefix + name]) for r in records if prefix + name in r]
                if points:
                    xs, ys = zip(*points, strict=True)
                    label = f"{'held-out' if prefix else 'train'} {what}".strip()
                    ax.plot(xs, ys, color=color, label=label, **style)
                    drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "reward accuracy":
            ax.set_ylim(-0.02, 1.02)
        if drawn and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save_png(figure, Path(path))


def plot_frontier(points: Sequence[dict[str, Any]], path: str | Path, title: str | None = None,
                  envelopes: Sequence[str] = ()) -> Path:
    """The reward–KL frontier: judged reward against KL(π ‖ π_ref), one point per evaluated model.

    Each point is a dict with `method`, `beta`, `reward`, `kl` and optionally `reward_stderr`
    and `kl_stderr` (drawn as error bars) and `label` (shown next to it instead of its β; empty:
    no label). A point whose method is "reference" (β None, KL 0) is drawn as a star: where every
    run started. A method not in `envelopes` is one line through its points by KL (a sweep's β,
    online rounds). A method in `envelopes` is drawn as the DPO paper draws it: its points (those
    of one run along its training, `run_name` and `step`, joined by a faint line, its checkpoints
    smaller than its final model), and its frontier, the upper envelope of its points from the
    star (`dpokit.eval.envelope`), as a thick line.
    """
    if not points:
        raise DpokitError("plot_frontier: no points to draw")
    figure, axes = _figure(7.5, 5)
    ax = axes[0, 0]
    methods = sorted({str(p["method"]) for p in points if p["method"] != "reference"})
    spans = ((max(p["kl"] for p in points) - min(p["kl"] for p in points)) or 1.0,
             (max(p["reward"] for p in points) - min(p["reward"] for p in points)) or 1.0)
    start = next((p for p in points if p["method"] == "reference"), None)
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for method, color in zip(methods, palette * (1 + len(methods) // len(palette)), strict=False):
        mine = sorted((p for p in points if str(p["method"]) == method), key=lambda p: p["kl"])
        if method in envelopes:
            _draw_with_envelope(ax, mine, start, color, method)
        else:
            ax.errorbar([p["kl"] for p in mine], [p["reward"] for p in mine], **_error_bars(mine), color=color,
                        marker="o", capsize=3, linestyle="-", linewidth=1, label=method)
        _annotate(ax, mine, color, spans)
    if start is not None:
        ax.scatter([start["kl"]], [start["reward"]], marker="*", s=160, color="black", zorder=3, label="reference")
    ax.set_xlabel("KL(π ‖ π_ref) per response, nats (estimated from policy samples)")
    ax.set_ylabel("mean judged reward")
    ax.set_title(title or "reward–KL frontier")
    ax.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save_png(figure, Path(path))


def _error_bars(points: Sequence[dict[str, Any]]) -> dict:
    return {"xerr": [p.get("kl_stderr") or 0 for p in points], "yerr": [p.get("reward_stderr") or 0 for p in points]}


def _draw_with_envelope(ax, mine: Sequence[dict[str, Any]], start: dict[str, Any] | None, color: str,
                        method: str) -> None:
    """One method's points, each run's joined in step order, and its upper envelope from `start`."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for p in mine:
        runs.setdefault(str(p.get("run_name", p.get("run", ""))), []).append(p)
    for run in runs.values():
        if len(run) > 1:
            along = sorted(run, key=lambda p: p.get("step") or 0)
            ax.plot([p["kl"] for p in along], [p["reward"] for p in along], color=color, linewidth=0.8, alpha=0.35)
    for final in (False, True):
        shown = [p for p in mine if p.get("final", True) is final]
        if shown:
            ax.errorbar([p["kl"] for p in shown], [p["reward"] for p in shown], **_error_bars(shown), color=color,
                        marker="o", markersize=6 if final else 3.5, capsize=2, elinewidth=0.8 if final else 0.5,
                        alpha=1.0 if final else 0.6, linestyle="none")
    mine_points = [(p["kl"], p["reward"]) for p in mine]
    envelope = frontier(mine_points, (start["kl"], start["reward"])) if start else upper_envelope(mine_points)
    ax.plot([x for x, _ in envelope], [y for _, y in envelope], color=color, linewidth=2.2,
            label=f"{method} (frontier: upper envelope)")


def _annotate(ax, mine: Sequence[dict[str, Any]], color: str, spans: tuple[float, float]) -> None:
    """Each point's label, up and to the right, clear of the error bars; below and to the right when
    the next point is close (its error bars would hide the label)."""
    for i, p in enumerate(mine):
        label = p.get("label", f"β={p['beta']:g}" if p.get("beta") is not None else p["method"])
        if not label:  # an empty label: the point needs none, or another method's curve labels it
            continue
        nxt = mine[i + 1] if i + 1 < len(mine) else None
        crowded = nxt is not None and nxt["kl"] - p["kl"] < 0.1 * spans[0] and \
            abs(nxt["reward"] - p["reward"]) < 0.15 * spans[1]
        ax.annotate(label, (p["kl"], p["reward"]), textcoords="offset points",
                    xytext=(6, -5) if crowded else (6, 5), va="top" if crowded else "bottom",
                    fontsize=8, color=color)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    lines = ["| figure | value |", "| --- | --- |"]
    for name, value in rows:
        shown = format_number(value) if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


def write_report(run_dir: str | Path, log: Log | None = None) -> Path:
    """Write training_curves.png and report.md into a run folder; returns the report's path.

    Uses what the folder holds: metrics.jsonl (required), dpokit_config.yaml, and when present
    samples.json (before/after samples, from `dpokit report --prompts`) and evaluation.json.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    sections = [f"# dpokit run: {run_dir.name}", ""]
    if records:
        plot_training_curves(records, run_dir / CURVES_FILE)
        sections += [f"![training curves]({CURVES_FILE})", ""]
    if any("aux_loss" in r for r in records):
        plot_training_curves(records, run_dir / ROUTER_FILE, ROUTER_PANELS)
        sections += ["## Mixture-of-Experts router", "", "The load-balancing loss added to the training loss "
                     "(`--router-aux-loss-coef`), and the share of the routed tokens whose top-k includes the "
                     "busiest expert (k/E when balanced, 1 when every token goes to one expert).", "",
                     f"![router load]({ROUTER_FILE})", ""]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if any(k.startswith("eval_") for k in r)]
    if train_records:
        last = train_records[-1]
        sections += [f"## Final training figures (step {last['step']})", "",
                     _table([(k, v) for k, v in last.items() if k not in ("step",)]), ""]
    if eval_records:
        last = eval_records[-1]
        sections += [f"## Held-out figures (step {last['step']})", "",
                     _table([(k, v) for k, v in last.items() if k.startswith("eval_")]), ""]
    evaluation = run_dir / EVALUATION_FILE
    if evaluation.is_file():
        result = json.loads(evaluation.read_text(encoding="utf-8"))
        for section in EVALUATION_SECTIONS:
            if section in result:
                sections += [f"## Evaluation: {section}", "", _table(list(result[section].items())), ""]
    samples = run_dir / SAMPLES_FILE
    if samples.is_file():
        data = json.loads(samples.read_text(encoding="utf-8"))
        sections += [f"## Samples before / after training ({data.get('settings', '')})", "",
                     "| prompt | before (reference) | after (policy) |", "| --- | --- | --- |"]
        sections += [f"| {_cell(r['prompt'])} | {_cell(r['before'])} | {_cell(r['after'])} |" for r in data["rows"]]
        sections.append("")
    config = run_dir / RUN_CONFIG_FILE
    if config.is_file():
        sections += ["## Configuration", "", "```yaml", config.read_text(encoding="utf-8").rstrip(), "```", ""]
    path = run_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(sections))
    if (run_dir / RUN_CONFIG_FILE).is_file():  # the model card follows what the run now holds (an evaluation)
        write_model_card(run_dir)
    if log:
        log(f"wrote {path} and {run_dir / CURVES_FILE}")
    return path


def report_after_training(run_dir: str | Path, log: Log, trackers: Trackers | None = None) -> None:
    """Training curves and report.md of a run `train()` just finished, with one log line; the
    model is already saved, so a failure here only warns. The run's trackers (`TrainResult.trackers`)
    get the training curves, then are finished."""
    try:
        log(f"report: {write_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
        log(f"warning: could not write the report ({type(exc).__name__}: {exc}); run `dpokit report {run_dir}`")
    if trackers is not None:
        trackers.log_images({"training_curves": Path(run_dir) / CURVES_FILE, "router_load": Path(run_dir) / ROUTER_FILE})
        trackers.finish()


def sample_before_after(run_dir: str | Path, prompts_path: str, sampling: SamplingConfig, *, max_prompts: int = 4,
                        device: str = "auto", dtype: str = "fp32", log: Log = print) -> Path:
    """Sample the run's base model and trained policy on the same prompts with the same seed (and
    the run's chat-template arguments), and save the pairs as samples.json for the report."""
    run_dir = Path(run_dir)
    prompts = read_prompts(prompts_path, max_prompts)
    base = ((read_run_config(run_dir) or {}).get("model") or {}).get("model")
    if base is None:
        raise DpokitError(f"{run_dir}: no dpokit_config.yaml naming the base model, so no 'before' samples")
    torch_device = resolve_device(device)
    sampler = Sampler(load_tokenizer(str(run_dir)), sampling, dtype=dtype, template_kwargs=run_template_kwargs(run_dir))
    texts = {}
    for who, name in (("before", base), ("after", str(run_dir))):
        log(f"sampling {len(prompts)} prompts from {name}")
        model = load_policy(name, torch_device).eval()
        texts[who] = sampler.draw(model, prompts).texts
        del model
    rows = [{"prompt": prompt_text(p), "before": b[0], "after": a[0]}
            for p, b, a in zip(prompts, texts["before"], texts["after"], strict=True)]
    settings = (f"temperature {sampling.temperature}, top-p {sampling.top_p}, top-k {sampling.top_k}, "
                f"seed {sampling.sample_seed}")
    path = run_dir / SAMPLES_FILE
    atomic_write_text(path, json.dumps({"settings": settings, "rows": rows}, indent=1))
    return path
