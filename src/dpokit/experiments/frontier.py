"""One reward–KL frontier: train runs, evaluate each against one reference, draw the picture.

The DPO paper's Figure 2 for your own model and judge: each run is one point, its mean judged
reward against its KL to the reference. A `FrontierRunner` holds what every point shares (the
judge, the reference model, the evaluation prompts, the sampling settings and the reference's
samples and scores, drawn once: every run is compared with the same ones, same seed, same
prompts); `add_run` trains and evaluates one configuration and records its row, `finish` writes
the picture and the summary. The sweep, online DPO and the demo are each a loop of `add_run`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dpokit.config import JudgeConfig, RunConfig, SamplingConfig
from dpokit.data.templates import parse_template_kwargs
from dpokit.errors import DpokitError
from dpokit.eval.evaluate import Sampler, evaluate_on_prompts, held_out_against
from dpokit.eval.judges import load_judge
from dpokit.eval.report import plot_frontier, report_after_training
from dpokit.eval.sampling import Prompt, SampleSet
from dpokit.eval.synced_reference import sync_every
from dpokit.folder_swap import Replacement
from dpokit.io import FolderLock, Log, SaidOnce, atomic_write_text
from dpokit.model.load import load_policy, load_tokenizer, resolve_device
from dpokit.paths import check_replaceable
from dpokit.trackers import open_trackers
from dpokit.train.loop import train

CSV_FIELDS = ("run", "method", "beta", "reward", "reward_stderr", "kl", "kl_stderr", "win_rate",
              "win_rate_stderr", "eval_reward_accuracy", "eval_reward_margin")
CSV_FILE, PNG_FILE = "frontier.csv", "frontier.png"


def replace_root(cfg: RunConfig, lock: FolderLock, log: Log, refusal: str | None = None) -> Replacement:
    """The experiment's folder (`cfg.train.output`, locked): new, empty, or a dpokit run's that
    --overwrite replaces (`refusal` says what to do without it). The new contents are swapped in
    at once; the old wait beside them until the experiment's first run has a checkpoint (the
    runner's `replacing`, committed with that run), and come back if it fails before."""
    check_replaceable(cfg.train.output, overwrite=cfg.train.overwrite,
                      **({"refusal": refusal} if refusal else {}))
    return Replacement.at_once(cfg.train.output, lock, log)


def write_frontier_csv(rows: Sequence[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@dataclass
class RunEvaluation:
    row: dict  # the run's frontier row (CSV_FIELDS, and the caller's extra fields)
    figures: dict  # everything evaluate_on_prompts measured (the run's evaluation.json)


def refuse_push(base: RunConfig, command: str) -> None:
    """Several runs would push to one repository, each over the last: the user picks one later."""
    if base.train.push_to_hub:
        raise DpokitError(f"--push-to-hub: dpokit {command} trains several runs; push the one you choose "
                          "afterwards (hf upload REPO RUN_FOLDER)")


class FrontierRunner:
    """Train, evaluate and place runs on one reward–KL frontier in `root`.

    `sampler` draws and judges the evaluation samples of every run and of the reference; the
    reference's are drawn at the first evaluation and kept. With `write_csv`, frontier.csv is
    rewritten after each run, so an interrupted experiment keeps what it finished.
    """

    def __init__(self, root: Path, *, reference, prompts: Sequence[Prompt], sampler: Sampler,
                 write_csv: bool = True, report_to: tuple[str, ...] = ("none",), log: Log = print):
        if sampler.judge is None:
            raise DpokitError("a reward–KL frontier needs a judge to score the samples")
        self.root, self.reference, self.prompts, self.sampler = Path(root), reference, list(prompts), sampler
        self.write_csv, self.report_to, self.log = write_csv, report_to, log
        self.notices = SaidOnce(log)  # each note on the runs' shared settings, once per command
        self.replacing: Replacement | None = None  # the root's replacement, committed with the first run's
        self.reference_samples: SampleSet | None = None
        self.reference_row: dict | None = None
        self.rows: list[dict] = []

    @classmethod
    def load(cls, base: RunConfig, judging: JudgeConfig, sampling: SamplingConfig, *, root: Path,
             prompts: Sequence[Prompt], reference: str, progress: bool = False, log: Log = print) -> FrontierRunner:
        """Load the judge, the tokenizer and the `reference` model that `base`'s runs are evaluated with."""
        model = base.model
        device = resolve_device(model.device)
        judge = load_judge(judging.judge, device=device, batch_size=judging.judge_batch_size)
        tokenizer = load_tokenizer(model.tokenizer or model.model, model.trust_remote_code)
        reference_model = load_policy(reference, device, model.trust_remote_code).eval()
        sampler = Sampler(tokenizer, sampling, judge=judge, judging=judging, dtype=model.dtype,
                          template_kwargs=parse_template_kwargs(base.data.chat_template_kwargs), progress=progress)
        return cls(root, reference=reference_model, prompts=prompts, sampler=sampler, report_to=base.train.report_to,
                   log=log)

    def beside(self, root: Path, *, progress: bool, log: Log) -> FrontierRunner:
        """A frontier of its own in `root` that shares this one's judge, reference, prompts,
        sampling and reference samples: its points compare with this one's."""
        other = FrontierRunner(root, reference=self.reference, prompts=self.prompts,
                               sampler=replace(self.sampler, progress=progress), report_to=self.report_to, log=log)
        other.reference_samples, other.reference_row = self.reference_samples, self.reference_row
        other.notices = self.notices
        return other

    @property
    def points(self) -> list[dict]:
        """The reference's row (at KL 0), then every run's, in the order they were added."""
        return [self.reference_row, *self.rows] if self.reference_row else list(self.rows)

    def add_run(self, cfg: RunConfig, name: str, *, method: str, beta: float | None, **fields) -> RunEvaluation:
        """Train `cfg`, evaluate it, write its report; record its row, named `name` (its "run"
        column), with `fields` added (e.g. a `label` for the picture)."""
        result = train(cfg, log=self.log, notice=self.notices, within=self.replacing)
        try:
            done = self.evaluate(cfg.train.output, name, method, beta, final_eval=result.final_eval,
                                 trust_remote_code=cfg.model.trust_remote_code)
        finally:  # once, with the evaluation in it (a failed evaluation still leaves the run its report)
            report_after_training(cfg.train.output, self.log, result.trackers)
        done.row.update(fields)
        self.rows.append(done.row)
        if self.write_csv:
            write_frontier_csv(self.points, self.root / CSV_FILE)
        return done

    def evaluate(self, run_dir: str | Path, name: str, method: str, beta: float | None, *,
                 final_eval: dict | None = None, trust_remote_code: bool = False) -> RunEvaluation:
        """Evaluate one trained run folder on the prompts against the reference: its frontier row.
        Writes the run's evaluation.json (`add_run` then writes its report, which shows it)."""
        device = next(self.reference.parameters()).device
        policy = load_policy(str(run_dir), device, trust_remote_code).eval()
        if sync_every(run_dir):  # TR-DPO trained (and evaluated) against a moving reference:
            final_eval = held_out_against(policy, self.reference, self.sampler.tokenizer, run_dir, device=device,
                                          dtype=self.sampler.dtype, log=self.log)  # the row's is the KL's
        done = self.evaluate_policy(policy, name, method, beta, final_eval=final_eval)
        del policy
        atomic_write_text(Path(run_dir) / "evaluation.json", json.dumps(done.figures, indent=1))
        return done

    def evaluate_policy(self, policy, name: str, method: str, beta: float | None, *,
                        final_eval: dict | None = None) -> RunEvaluation:
        """Evaluate a loaded policy (a run's final model, or a checkpoint along it) on the prompts
        against the reference: its frontier row."""
        figures, self.reference_samples = evaluate_on_prompts(
            policy, self.reference, self.prompts, self.sampler, reference_samples=self.reference_samples,
            log=self.log)
        judged, kl = figures["judged"], figures["kl"]
        final_eval = final_eval or {}
        row = {"run": name, "method": method, "beta": beta,
               "reward": judged["reward_policy"], "reward_stderr": judged["reward_policy_stderr"],
               "kl": kl["kl"], "kl_stderr": kl["kl_stderr"], "win_rate": judged["win_rate"],
               "win_rate_stderr": judged["win_rate_stderr"],
               "eval_reward_accuracy": final_eval.get("eval_rewards/accuracies"),
               "eval_reward_margin": final_eval.get("eval_rewards/margins")}
        self.log(f"{name}: judged reward {judged['reward_policy']:+.4f} (reference "
                 f"{judged['reward_reference']:+.4f}), win rate {judged['win_rate']:.3f}, "
                 f"KL {kl['kl']:.4f} ± {kl['kl_stderr']:.4f}")
        self.reference_row = {"run": "reference", "method": "reference", "beta": None,
                              "reward": judged["reward_reference"], "reward_stderr": judged["reward_reference_stderr"],
                              "kl": 0.0, "kl_stderr": 0.0, "win_rate": 0.5}
        return RunEvaluation(row, figures)

    def finish(self, summary_file: str, summary: dict, *, title: str, points: Sequence[dict] | None = None,
               envelopes: Sequence[str] = ()) -> None:
        """Draw frontier.png (of `points`, default: the reference and every run; the methods in
        `envelopes` as their upper envelope, see `plot_frontier`) and write `summary`."""
        plot_frontier(self.points if points is None else points, self.root / PNG_FILE, title=title,
                      envelopes=envelopes)
        atomic_write_text(self.root / summary_file, json.dumps(summary, indent=1))
        if self.report_to != ("none",):  # the frontier, as a tracker run of its own beside the runs'
            trackers = open_trackers(self.report_to, run_dir=self.root, run_name=f"{self.root.name}-frontier",
                                     config={"frontier": {"summary": summary_file}}, log=self.log)
            trackers.log_images({"frontier": self.root / PNG_FILE}, step=0)
            trackers.finish()
