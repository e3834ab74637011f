"""The methods side by side at CPU scale, re-runnable by one command (see docs/results.md).

    python benchmarks/reproduce.py              # run every missing run, then write the report
    python benchmarks/reproduce.py --plan       # list the runs and what is done; train nothing
    python benchmarks/reproduce.py --report     # tables, figures and docs/results.md only

Runs, in order of value: the learning-rate grid (one GLUE task, every method), GLUE with
minilm-l6 (every method x seeds, the task chosen for the grid first), E2E with smollm2-135m
(test set decoded with the LoRA paper's protocol), and the ROSA-vs-LoRA rank sweep. Every run
goes through the trainer's Python API into `<runs>/<experiment>/...`; a complete run is
skipped and an interrupted one resumes from its checkpoint, so stopping and restarting the
command loses at most the run in progress. The report is written from whatever is complete
and lists what is still to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rosa_bench import runs  # noqa: E402
from rosa_bench.config import DatasetConfig  # noqa: E402
from rosa_bench.data import default_run_subdir, glue  # noqa: E402

WALL_FILE = "reproduce.json"  # per run: wall-clock seconds and machine load, beside metrics.json
EXPERIMENTS = ("lr_grid", "glue", "e2e", "rank_sweep")


@dataclass(frozen=True)
class MethodSpec:
    """One compared configuration: a key for tables and the overrides that select it."""

    key: str
    overrides: tuple[str, ...]
    low_rank: bool = True  # takes the shared rank and target layers

    @property
    def name(self) -> str:
        return self.overrides[0].split("=", 1)[1]


@dataclass(frozen=True)
class Budget:
    """The training budget every method gets on a dataset: same rows, steps, batch, schedule."""

    overrides: tuple[str, ...]
    note: str
    rosa_every: int = 0  # ROSA resamples every this many steps (0: per its config, each epoch)

    @property
    def rosa(self) -> tuple[str, ...]:
        """ROSA resamples per epoch in its paper; where one epoch is the whole budget it
        resamples every `rosa_every` steps instead."""
        if not self.rosa_every:
            return ()
        return ("fnmodel.factorize_level=step", f"fnmodel.factorize_freq={self.rosa_every}")


@dataclass(frozen=True)
class Preset:
    """Everything the command runs. `cpu` is the documented one; `smoke` uses tiny models."""

    glue_model: str
    glue_tasks: tuple[str, ...]  # the first is the learning-rate grid's and the rank sweep's task
    glue_methods: tuple[MethodSpec, ...]
    glue_targets: str
    glue_budget: Budget
    lr_grid: dict[str, tuple[float, ...]]  # method key -> learning rates (key "*": the rest)
    seeds: tuple[int, ...]
    rank: int
    sweep_methods: tuple[str, ...]
    sweep_ranks: tuple[int, ...]
    e2e_model: str
    e2e_methods: tuple[str, ...]  # keys of glue_methods: they reuse the grid's learning rate
    e2e_targets: str
    e2e_budget: Budget
    e2e_test_samples: int | None = None  # None: the whole test set (630 MRs)
    time_note: str = ""  # how the budget was sized
    extra: tuple[str, ...] = ()  # overrides added to every run (logging)
    grid_widen: int = 2  # how many 1-2-5 steps a grid may grow past its edge (see grid_rates)

    def grid(self, key: str) -> tuple[float, ...]:
        return self.lr_grid.get(key, self.lr_grid["*"])


def method_specs(rank: int) -> tuple[MethodSpec, ...]:
    r = f"fnmodel.rank={rank}"
    return (MethodSpec("full", ("fnmodel=full",), low_rank=False),
            MethodSpec("lora", ("fnmodel=lora", r)),
            MethodSpec("peft_lora", ("fnmodel=peft_lora", r)),
            MethodSpec("rosa", ("fnmodel=rosa", r)),
            MethodSpec("loraxs", ("fnmodel=loraxs", r)),
            MethodSpec("rocoft-row", ("fnmodel=rocoft", "fnmodel.mode=row", r)),
            MethodSpec("rocoft-column", ("fnmodel=rocoft", "fnmodel.mode=column", r)),
            MethodSpec("cola", ("fnmodel=cola", "fnmodel.adapter=lowrank", r)))


GLUE_STEPS = 63  # 2,000 rows / batch 32, one epoch
E2E_STEPS = 150
PRESETS = {
    "cpu": Preset(
        glue_model="minilm-l6", glue_tasks=("sst2", "cola", "mrpc", "rte", "stsb"),
        glue_methods=method_specs(8), glue_targets="[query,value]",
        glue_budget=Budget(("dataset.max_train_samples=2000", "train.epochs=1", "train.batch_size=32",
                            "train.eval_batch_size=64", "train.scheduler=linear", "train.warmup_ratio=0.06",
                            "logging.eval_every=16", "train.precision=bf16"),
                           f"the first 2,000 training rows, 1 epoch ({GLUE_STEPS} steps of batch 32), AdamW, "
                           "linear decay after 6% warm-up, weight decay 0, gradient clipping 1.0, bf16 "
                           "autocast (fp32 weights); the full dev set evaluated at steps 16, 32, 48 and 63",
                           rosa_every=GLUE_STEPS // 4),
        lr_grid={"full": (2e-5, 5e-5, 1e-4, 2e-4), "loraxs": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
                 "*": (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)}, grid_widen=3,
        seeds=(0, 1, 2), rank=8, sweep_methods=("lora", "rosa"), sweep_ranks=(1, 2, 4, 8, 16, 32),
        e2e_model="smollm2-135m", e2e_methods=("full", "lora", "rosa", "loraxs", "rocoft-row"),
        e2e_targets="[q_proj,v_proj]",
        e2e_budget=Budget((f"train.max_steps={E2E_STEPS}", "train.batch_size=8", "train.scheduler=linear",
                           "train.warmup_ratio=0.06", "dataset.max_eval_samples=400",
                           "logging.eval_every=25", "train.precision=bf16",
                           "dataset.generation.precision=bf16"),
                          f"{E2E_STEPS} steps of batch 8 (1,200 shuffled training rows), AdamW, linear decay "
                          "after 6% warm-up, bf16 autocast (fp32 weights); validation loss on the first 400 "
                          "dev rows every 25 steps; test decoding with bf16 weights (about half the fp32 "
                          "time on this CPU; see the time note)",
                          rosa_every=E2E_STEPS // 4),
        extra=("logging.progress=false", "logging.log_every=4"),
        time_note=(
            "Sized for 6 h on a quiet 2-core machine from the step-time benchmark (README: minilm-l6 "
            "0.74 s per LoRA step of 32 x 64 tokens, 1.1 s full; smollm2-135m 4.1 s per LoRA step of "
            "8 x 128 tokens, 6.6 s full): about 45 s per GLUE run (63 steps on short sentences plus "
            "four dev-set passes) x 182 runs = 2.3 h, and about 30 min per E2E run (150 steps, "
            "validation and beam-10 decoding of 630 MRs) x 5 = 2.5 h. Run in fp32, the plan measured "
            "7.2 h (those runs are in git history at e6347b2): the sizing had left out the GLUE dev "
            "passes (16-63% of a GLUE run) and E2E's beam search (about 20 min a run). Three changes "
            "that keep every budget's rows, steps and protocol brought it down: validation in "
            "length-sorted batches (scores move by at most 1.4e-7; `benchmarks/results/eval_order.json`), "
            "bf16 autocast over fp32 weights for training and validation on both datasets, and bf16 "
            "weights for E2E decoding (this CPU has bf16 instructions; E2E full fine-tuning took "
            "0.69x its fp32 time with scores within 0.15 points, see diagnostics/e2e_fp32). Earlier, "
            "the E2E test-set loss (4,693 reference rows, about 11 min per run here; not among the E2E "
            "scores asked for) was dropped from the plan (`evaluate.py --no-loss`) before any E2E run "
            "started."),
    ),
    "smoke": Preset(
        glue_model="tiny-bert", glue_tasks=("rte", "stsb"),
        glue_methods=(MethodSpec("full", ("fnmodel=full",), low_rank=False),
                      MethodSpec("lora", ("fnmodel=lora", "fnmodel.rank=2")),
                      MethodSpec("rosa", ("fnmodel=rosa", "fnmodel.rank=2"))),
        glue_targets="[query,value]",
        glue_budget=Budget(("dataset.max_train_samples=8", "dataset.max_eval_samples=8", "train.max_steps=2",
                            "train.batch_size=4"), "2 steps of batch 4", rosa_every=1),
        lr_grid={"*": (1e-3, 1e-2)}, seeds=(0, 1), rank=2, sweep_methods=("lora", "rosa"),
        sweep_ranks=(1, 2), e2e_model="tiny-llama", e2e_methods=("full", "lora"),
        e2e_targets="[q_proj,v_proj]",
        e2e_budget=Budget(("train.max_steps=2", "train.batch_size=4", "dataset.max_train_samples=8",
                           "dataset.max_eval_samples=8", "dataset.generation.max_new_tokens=4",
                           "dataset.generation.num_beams=2", "logging.sample_max_new_tokens=2"), "2 steps"),
        e2e_test_samples=3, extra=("logging.progress=false", "logging.log_every=1"), grid_widen=0,
    ),
}


@dataclass
class Job:
    experiment: str
    task: str  # glue task or "e2e"
    method: MethodSpec
    lr: float | None  # None: waiting for the learning-rate grid
    seed: int
    rank: int | None
    overrides: list[str]
    folder: Path
    evaluate_test: bool = False

    @property
    def name(self) -> str:
        return self.folder.name

    def stale(self) -> bool:
        """The folder holds a run started with other settings than this job's (the preset
        changed since): its scores must not stand for this job's. Where the runs root lives
        (`output.path`, however spelled) is not a setting."""
        recorded = runs.read_overrides(self.folder)
        return recorded is not None and _settings(recorded) != _settings(self.overrides)

    def done(self) -> bool:
        complete = runs.is_complete(self.folder) and not self.stale()
        return complete and (not self.evaluate_test or (self.folder / "eval_test.json").is_file())

    def status(self) -> str:
        if self.lr is None:
            return "waiting for the learning-rate grid"
        if self.stale():
            return "stale: made with other settings"
        if self.done():
            return "done"
        return "unfinished" if (self.folder / runs.CONFIG_FILE).is_file() else "to run"


def _settings(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("output.path=")]


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


def run_name(method: MethodSpec, rank: int | None, lr: float | None, seed: int) -> str:
    parts = [method.key] + ([f"r{rank}"] if method.low_rank else []) + [f"lr{_lr_text(lr) if lr else '?'}",
                                                                         f"s{seed}"]
    return "_".join(parts)


def make_job(preset: Preset, out: Path, experiment: str, task: str, method: MethodSpec, lr: float | None,
             seed: int, rank: int | None = None) -> Job:
    glue = task != "e2e"
    rank = (rank or preset.rank) if method.low_rank else None
    dataset = DatasetConfig(name="glue", task=task) if glue else DatasetConfig(name="e2e")
    name = run_name(method, rank, lr, seed)
    folder = out / experiment / default_run_subdir(dataset) / name
    spec = list(method.overrides)
    if method.low_rank:
        spec = [o for o in spec if not o.startswith("fnmodel.rank=")] + [
            f"fnmodel.rank={rank}", f"fnmodel.targets={preset.glue_targets if glue else preset.e2e_targets}"]
    data = ["dataset=glue", f"dataset.task={task}"] if glue else ["dataset=e2e"]
    model = preset.glue_model if glue else preset.e2e_model
    budget = preset.glue_budget if glue else preset.e2e_budget
    if method.name == "rosa":
        spec += budget.rosa
    overrides = [f"model={model}", *data, *spec, *budget.overrides, *preset.extra, f"seed={seed}",
                 f"train.lr={lr if lr is not None else 0}", f"output.path={out / experiment}",
                 f"output.name={name}"]
    return Job(experiment, task, method, lr, seed, rank, overrides, folder, evaluate_test=not glue)


def best_value(folder: Path) -> float:
    best = runs.read_metrics(folder).get("best") or {}
    value = best.get("value")
    return math.nan if value is None else float(value)


def next_rate(lr: float, up: bool) -> float:
    """The neighbour of `lr` on the 1-2-5 series (2e-3 -> 5e-3 up, -> 1e-3 down)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10 ** exponent, 6)
    steps = {1.0: (2.0, 0.5), 2.0: (5.0, 1.0), 5.0: (10.0, 2.0)}
    up_to, down_to = steps.get(mantissa, (2 * mantissa, mantissa / 2))
    return float(f"{(up_to if up else down_to) * 10 ** exponent:.3g}")


def finished_grid_rates(preset: Preset, out: Path, method: MethodSpec) -> list[float]:
    """Rates on the 1-2-5 series from 1e-6 to 0.5 with a finished grid run on disk: a run that
    an earlier, different grid asked for still counts (and is shown), never silently dropped."""
    series = [m * 10.0 ** e for e in range(-6, 0) for m in (1, 2, 5)]
    return [float(f"{lr:.3g}") for lr in series
            if make_job(preset, out, "lr_grid", preset.glue_tasks[0], method, float(f"{lr:.3g}"),
                        preset.seeds[0]).done()]


def grid_rates(preset: Preset, out: Path, method: MethodSpec) -> tuple[list[float], float | None]:
    """The method's learning-rate grid and its chosen rate (None while runs are missing).

    The grid widens by one 1-2-5 step, up to `preset.grid_widen` times, while its best rate sits
    on an edge: a best rate at the grid's edge says only that the optimum lies beyond it. The
    choice is over every finished grid run of the method (earlier grids' included). Every GLUE
    selection metric is higher-is-better; ties go to the smaller rate."""
    rates, widened = sorted(preset.grid(method.key)), 0
    while True:
        tried = sorted(set(rates) | set(finished_grid_rates(preset, out, method)))
        jobs = [make_job(preset, out, "lr_grid", preset.glue_tasks[0], method, lr, preset.seeds[0])
                for lr in tried]
        if not all(job.done() for job in jobs):
            return tried, None
        scored = [(best_value(job.folder), -job.lr) for job in jobs]
        finite = [pair for pair in scored if not math.isnan(pair[0])]
        if not finite:
            return tried, None
        best = -max(finite)[1]
        if widened == preset.grid_widen or rates[0] < best < rates[-1]:
            return tried, best
        if best >= rates[-1]:
            rates.append(next_rate(rates[-1], up=True))
        else:
            rates.insert(0, next_rate(rates[0], up=False))
        widened += 1


def chosen_lrs(preset: Preset, out: Path) -> dict[str, float | None]:
    """Per method, the grid's learning rate with the best validation score on the grid task;
    None until the method's (possibly widened) grid is complete."""
    return {method.key: grid_rates(preset, out, method)[1] for method in preset.glue_methods}


def plan(preset: Preset, out: Path) -> list[Job]:
    """Every run, most valuable first, E2E's long runs (half an hour each) last. Jobs after the
    grid carry lr=None until it is done."""
    lrs = chosen_lrs(preset, out)
    methods = {m.key: m for m in preset.glue_methods}
    grid_task = preset.glue_tasks[0]
    jobs = [make_job(preset, out, "lr_grid", grid_task, m, lr, preset.seeds[0])
            for m in preset.glue_methods for lr in grid_rates(preset, out, m)[0]]
    jobs += [make_job(preset, out, "glue", task, m, lrs[m.key], seed)
             for task in preset.glue_tasks for seed in preset.seeds for m in preset.glue_methods]
    jobs += [make_job(preset, out, "rank_sweep", grid_task, methods[key], lrs[key], seed, rank)
             for rank in preset.sweep_ranks if rank != preset.rank
             for seed in preset.seeds for key in preset.sweep_methods]
    jobs += [make_job(preset, out, "e2e", "e2e", methods[key], lrs[key], preset.seeds[0])
             for key in preset.e2e_methods]
    return jobs


# ---- running ----------------------------------------------------------------------------------

def run_config(overrides: list[str]):
    """The validated config train.py would run with these overrides (conf/ composed by Hydra)."""
    from hydra import compose, initialize_config_dir

    from rosa_bench.cli import CONF_DIR, normalize_overrides
    from rosa_bench.config import validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose(config_name="config", overrides=normalize_overrides(overrides)))


def train_in_process(overrides: list[str]) -> None:
    from rosa_bench.pipeline import train

    train(run_config(overrides), overrides)


def evaluate_test(folder: Path, max_samples: int | None) -> None:
    from rosa_bench.evaluate import evaluate_run

    evaluate_run(folder, "test", "best", max_samples, progress=False, loss=False)


def _add_wall(folder: Path, key: str, seconds: float, load: tuple[float, float],
              resumed: bool = False) -> None:
    path = folder / WALL_FILE
    record = runs.read_json(path) if path.is_file() else {}
    record[key] = record.get(key, 0.0) + seconds  # resumed runs add their sessions up
    # a stopped session's seconds were never recorded, so a resumed run's time is not its cost
    record["resumed"] = bool(record.get("resumed")) or resumed
    record.setdefault("load_1min", []).extend(round(x, 2) for x in load)
    record["cpus"] = os.cpu_count()
    runs.write_json(path, record)


@dataclass(frozen=True)
class Runner:
    """How a run is trained and its test split scored (the tests swap in stand-ins)."""

    train: Callable[[list[str]], None] = train_in_process
    evaluate: Callable[[Path, int | None], None] = evaluate_test


def run_job(job: Job, preset: Preset, keep_checkpoints: bool, runner: Runner = Runner()) -> None:
    if not runs.is_complete(job.folder):
        resumed = (job.folder / runs.CONFIG_FILE).is_file()
        start, load = time.perf_counter(), os.getloadavg()[0]
        runner.train(job.overrides)
        _add_wall(job.folder, "train_s", time.perf_counter() - start, (load, os.getloadavg()[0]), resumed)
    if job.evaluate_test and not (job.folder / "eval_test.json").is_file():
        start, load = time.perf_counter(), os.getloadavg()[0]
        runner.evaluate(job.folder, preset.e2e_test_samples)
        _add_wall(job.folder, "test_s", time.perf_counter() - start, (load, os.getloadavg()[0]))
    if not keep_checkpoints:  # every score is in metrics.json and eval_test.json by now
        shutil.rmtree(job.folder / runs.CHECKPOINTS, ignore_errors=True)


class StaleRuns(Exception):
    """Run folders made with other settings than the plan's: neither trusted nor overwritten."""


def stale_message(jobs: list[Job], shown: int = 5) -> str:
    lines = [f"{len(jobs)} planned run folder(s) hold runs made with other settings than the plan's "
             "(the preset changed since they ran). Their scores would not stand for the plan, and "
             "they are not overwritten: remove them (committed runs stay in git history) or restore "
             "the settings. `--plan` lists them all as 'stale'."]
    for job in jobs[:shown]:
        recorded, planned = _settings(runs.read_overrides(job.folder) or []), _settings(job.overrides)
        added = [o for o in planned if o not in recorded]
        dropped = [o for o in recorded if o not in planned]
        lines.append(f"  {job.folder}: only in the plan {added}, only in the run {dropped}")
    if len(jobs) > shown:
        lines.append(f"  ... and {len(jobs) - shown} more")
    return "\n".join(lines)


def run_all(preset: Preset, out: Path, keep_checkpoints: bool = False, log: Callable[[str], None] = print,
            runner: Runner = Runner()) -> list[str]:
    """Run the next runnable job until none is left (re-planning after each: the grid's
    result decides later learning rates). Returns the folders of runs that failed. Raises
    StaleRuns, before training anything further, when a planned folder holds a run made with
    other settings."""
    failed: list[str] = []
    while True:
        runnable = [j for j in plan(preset, out) if j.lr is not None]
        stale = [j for j in runnable if j.stale()]
        if stale:
            raise StaleRuns(stale_message(stale))
        todo = [j for j in runnable if not j.done() and str(j.folder) not in failed]
        if not todo:
            return failed
        job = todo[0]
        log(f"{time.strftime('%H:%M:%S')} [{len(todo)} runnable left] {job.experiment}/{job.task}/{job.name}")
        try:
            run_job(job, preset, keep_checkpoints, runner)
        except Exception:  # one broken run must not stop the others; it is reported
            log(traceback.format_exc())
            failed.append(str(job.folder))


# ---- the report ---------------------------------------------------------------------------------

def wall(folder: Path) -> dict[str, float]:
    path = folder / WALL_FILE
    return runs.read_json(path) if path.is_file() else {}


def job_record(job: Job) -> dict:
    metrics = runs.read_metrics(job.folder)
    best = metrics.get("best") or {}
    record = {"experiment": job.experiment, "task": job.task, "method": job.method.key, "rank": job.rank,
              "lr": job.lr, "seed": job.seed, "run": job.name, "status": job.status(),
              "steps": metrics.get("global_step"), "trainable_params": metrics.get("trainable_params"),
              "metric": best.get("metric"), "best_valid": best.get("value"), "best_step": best.get("step")}
    record |= {f"valid/{k}": v for k, v in (best.get("scores") or {}).items()}
    timing = wall(job.folder)
    record |= {"train_s": timing.get("train_s"), "test_s": timing.get("test_s"),
               "load_1min_max": max(timing.get("load_1min") or [math.nan]),
               "resumed": bool(timing.get("resumed"))}
    test = job.folder / "eval_test.json"
    if test.is_file():
        record |= {f"test/{k}": v for k, v in runs.read_json(test)["scores"].items()}
    return record


def records(jobs: list[Job]):
    import pandas as pd

    return pd.DataFrame([job_record(j) for j in jobs])


@dataclass
class Stats:
    mean: float
    std: float
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        spread = f" ± {self.std:.{digits}f}" if self.n > 1 else ""
        return f"{self.mean:.{digits}f}{spread} (n={self.n})"


def stats(values) -> Stats:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return Stats(math.nan, math.nan, 0)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return Stats(mean, std, len(values))


def majority_score(task: str) -> float:
    """The dev-set score of always answering the most frequent class: where a run that learned
    nothing lands (its accuracy for accuracy tasks; 0 for Matthews correlation, and for
    Pearson, which a constant prediction leaves undefined)."""
    spec = glue.TASKS[task]
    if not spec.labels or spec.metric != "accuracy":
        return 0.0
    source = run_config(["dataset=glue", f"dataset.task={task}"]).dataset
    labels = glue.load_raw(source)["validation"]["label"]
    return max(Counter(labels).values()) / len(labels)


def verdict(method: Stats, lora: Stats, claim: str, chance: float | None = None) -> str:
    """How `method` reads against LoRA. The seed spread is the larger of the two standard
    deviations: a difference inside it is not a difference this many seeds can show. With
    `chance` (the majority-class score), a side within that spread (at least 0.01) of it
    learned nothing, and a comparison of two such sides says nothing about the claim."""
    if method.n == 0 or lora.n == 0:
        return "not measured yet"
    delta = method.mean - lora.mean
    if method.n < 2 or lora.n < 2:
        return f"Δ {delta:+.3f}; one seed, no spread to judge it by"
    spread = max(method.std, lora.std)
    if chance is not None:
        near = max(spread, 0.01)
        unlearned = [name for name, s in (("the method", method), ("LoRA", lora)) if s.mean - chance <= near]
        if len(unlearned) == 2:
            return (f"Δ {delta:+.3f}; both within {near:.3f} of the majority-class score ({chance:.3f}): "
                    "neither learned the task at this budget, so this says nothing about the claim")
        if unlearned:
            return (verdict(method, lora, claim) + f"; but {unlearned[0]} is within {near:.3f} of the "
                    f"majority-class score ({chance:.3f})")
    if abs(delta) <= spread:
        where = "inside the seed spread"
        return f"Δ {delta:+.3f}, {where} ({spread:.3f}): " + (
            "consistent with the claim, no advantage shown" if claim == "geq" else "agrees (close)")
    if delta > 0:
        return f"Δ {delta:+.3f}, above the seed spread ({spread:.3f}): agrees" + (
            "" if claim == "geq" else " (and better)")
    return f"Δ {delta:+.3f}, below the seed spread ({spread:.3f}): disagrees"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _fmt_int(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value):,}"


def _mean(values) -> float:
    s = stats(values)
    return s.mean


def _rel(path: Path, doc: Path) -> str:
    return os.path.relpath(path, doc.parent)


GLUE_METRIC_NAMES = {"sst2": "acc", "cola": "mcc", "mrpc": "acc", "rte": "acc", "stsb": "pearson"}
E2E_SCORES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
CLAIMS = (("rosa", "geq", "ROSA ≥ LoRA at equal rank"),
          ("loraxs", "close", "LoRA-XS close to LoRA with far fewer parameters"),
          ("rocoft-row", "close", "RoCoFT (rows) close to LoRA at lower cost"),
          ("rocoft-column", "close", "RoCoFT (columns) close to LoRA at lower cost"),
          ("cola", "close", "ColA close to LoRA"),
          ("peft_lora", "close", "our LoRA against HF PEFT's (same method: should agree)"))


def figures_for(root: Path, out: Path) -> list[Path]:
    """figures.py's curves and tables for one experiment root (nothing when it has no runs)."""
    from rosa_bench.figures import Options, make_figures
    from rosa_bench.figures.collect import find_run_folders

    if not root.is_dir() or not find_run_folders(root):
        return []
    if out.exists():
        shutil.rmtree(out)
    written = make_figures(root, out, Options(band="std")).written
    for path in [p for p in written if p.name == "runs.csv"]:  # holds this machine's data paths;
        path.unlink()                                           # results/runs.csv has every run
    return [p for p in written if p.exists()]


def rank_sweep_figure(preset: Preset, out: Path, results: Path) -> Path | None:
    """Score against trainable parameters for the sweep ranks and the main table's shared-rank
    runs together (figures.py draws it per root; the two roots are read into one collection)."""
    import pandas as pd

    from rosa_bench.figures import plots, tables
    from rosa_bench.figures.collect import Collection, collect, find_run_folders
    from rosa_bench.figures.groups import configurations

    task = preset.glue_tasks[0]
    methods = "|".join(k.replace("-", r"\-") for k in preset.sweep_methods)
    parts = []
    for experiment in ("glue", "rank_sweep"):
        root = out / experiment / "glue" / task
        if root.is_dir() and find_run_folders(root):
            try:
                parts.append(collect(root, name_filter=rf"^({methods})_r\d+_"))
            except Exception:  # no matching run yet
                continue
    if not parts:
        return None
    coll = Collection(runs=pd.concat([p.runs for p in parts]), configs=pd.concat([p.configs for p in parts]),
                      curves=pd.concat([p.curves for p in parts], ignore_index=True))
    coll.runs["task"] = task
    if coll.configs["fnmodel.rank"].nunique() < 2:
        return None
    confs = configurations(coll.configs, ["fnmodel.name", "fnmodel.rank"])
    metric = tables.selection_metric(coll, None)
    table = tables.summary(coll, confs, metric)
    target = results / "rank_sweep"
    tables.write_tables(table, target, "rank_sweep")
    fig = plots.rank_sweep_figure(table, tables.best_column(metric),
                                  f"GLUE {task}, {preset.glue_model}: best validation {metric}")
    return plots.save(fig, target, "rank_sweep", 100)[0]


def _glue_section(preset: Preset, df, lrs: dict) -> tuple[list[str], dict]:
    """The main GLUE table (method x task) and the per-claim reading; returns lines and the
    numbers behind them."""
    glue = df[df.experiment == "glue"]
    done = glue[glue.status == "done"]
    header = ["method", "trainable params", "lr"] + [
        f"{t} ({GLUE_METRIC_NAMES.get(t, 'score')})" for t in preset.glue_tasks] + ["wall-clock s / run"]
    rows, numbers = [], {}
    for m in preset.glue_methods:
        mine = done[done.method == m.key]
        cells = {t: stats(mine[mine.task == t].best_valid) for t in preset.glue_tasks}
        numbers[m.key] = {t: dataclasses.asdict(s) for t, s in cells.items()}
        params = mine.trainable_params.dropna()
        rows.append([m.key, _fmt_int(params.iloc[0]) if len(params) else "–",
                     _lr_text(lrs[m.key]) if lrs.get(m.key) else "–",
                     *[cells[t].text() for t in preset.glue_tasks], f"{_mean(mine.train_s):.0f}"
                     if len(mine) else "–"])
    chance = {t: majority_score(t) for t in preset.glue_tasks}
    rows.append(["*majority class*", "0", "–", *[f"{chance[t]:.3f}" for t in preset.glue_tasks], "–"])
    numbers["majority_class"] = chance
    lines = [md_table(header, rows), "",
             "*majority class*: the score of always answering the dev set's most frequent class, the "
             "level of a run that learned nothing (0 for Matthews and Pearson correlation).", ""]
    lines += ["How each paper's claim reads here (Δ = method − LoRA, best validation score, per task):", ""]
    claim_rows = []
    for key, kind, text in CLAIMS:
        if key not in numbers or "lora" not in numbers:
            continue
        readings = [[text, t, verdict(Stats(**numbers[key][t]), Stats(**numbers["lora"][t]), kind, chance[t])]
                    for t in preset.glue_tasks]
        measured = [r for r in readings if r[2] != "not measured yet"]
        claim_rows += measured or [[text, "–", "not measured yet"]]
    lines += [md_table(["claim", "task", "reading"], claim_rows), ""]
    params = done.groupby("method").trainable_params.first()
    timing = done.groupby("method").train_s.mean()
    if "lora" in params:
        extra = []
        for key in ("loraxs", "rocoft-row", "rocoft-column", "cola", "rosa", "full"):
            if key in params:
                extra.append(f"{key}: {params[key] / params['lora']:.3g}x LoRA's trainable parameters, "
                             f"{timing[key] / timing['lora']:.2f}x its wall-clock per run")
        lines += ["Cost against LoRA (trainable parameters include the 770-parameter classification head "
                  "where it trains; wall-clock per run includes evaluation and was measured on a loaded "
                  "machine, see below): " + "; ".join(extra) + ".", ""]
    return lines, numbers


def _grid_section(preset: Preset, df, lrs: dict) -> list[str]:
    grid = df[df.experiment == "lr_grid"]
    all_lrs = sorted(set(grid.lr.dropna()))
    rows = []
    for m in preset.glue_methods:
        mine = grid[grid.method == m.key]
        cells = []
        for lr in all_lrs:
            hit = mine[mine.lr == lr]
            if not len(hit):
                cells.append("")
                continue
            value = hit.best_valid.iloc[0]
            text = "pending" if hit.status.iloc[0] != "done" else f"{value:.3f}"
            cells.append(f"**{text}**" if lrs.get(m.key) == lr else text)
        rows.append([m.key, *cells])
    edge = [m.key for m in preset.glue_methods if lrs.get(m.key) is not None
            and lrs[m.key] in (grid[grid.method == m.key].lr.min(), grid[grid.method == m.key].lr.max())]
    note = (f"Still on the edge of the widened grid (the best rate may lie beyond it): {', '.join(edge)}."
            if edge else "Every chosen rate is an interior optimum of its grid.")
    return [md_table(["method", *[_lr_text(x) for x in all_lrs]], rows), "", note, ""]


def _sweep_section(preset: Preset, df) -> list[str]:
    task = preset.glue_tasks[0]
    sweep = df[(df.task == task) & df.method.isin(preset.sweep_methods)
               & df.experiment.isin(["glue", "rank_sweep"]) & (df.status == "done")]
    rows = []
    for rank in preset.sweep_ranks:
        row = [str(rank)]
        for key in preset.sweep_methods:
            mine = sweep[(sweep.method == key) & (sweep["rank"] == rank)]
            params = mine.trainable_params.dropna()
            row += [_fmt_int(params.iloc[0]) if len(params) else "–", stats(mine.best_valid).text()]
        rows.append(row)
    header = ["rank"] + [f"{k} {c}" for k in preset.sweep_methods for c in ("params", "best valid")]
    return [md_table(header, rows), ""]


def _e2e_section(preset: Preset, df) -> list[str]:
    e2e = df[df.experiment == "e2e"]
    header = ["method", "trainable params", "lr", "steps", "best valid loss (step)", *E2E_SCORES,
              "train s", "test decode s"]
    rows = []
    for key in preset.e2e_methods:
        hit = e2e[e2e.method == key]
        if not len(hit) or hit.status.iloc[0] != "done":
            rows.append([key] + ["–"] * (len(header) - 2) + [hit.status.iloc[0] if len(hit) else "–"])
            continue
        r = hit.iloc[0]
        rows.append([key, _fmt_int(r.trainable_params), _lr_text(r.lr), int(r.steps),
                     f"{r.best_valid:.4f} ({int(r.best_step)})",
                     *[f"{r.get(f'test/{s}', math.nan):.4g}" for s in E2E_SCORES],
                     f"{r.train_s:.0f}", f"{r.test_s:.0f}"])
    lines = [md_table(header, rows), ""]
    done, claims = e2e[e2e.status == "done"], []
    if "lora" in set(done.method) and "test/BLEU" in done:
        bleu = {m: stats(done[done.method == m]["test/BLEU"]) for m in set(done.method)}
        claims = [[text, verdict(bleu[key], bleu["lora"], kind)] for key, kind, text in CLAIMS if key in bleu]
    if claims:
        lines += ["Test BLEU against LoRA (Δ in BLEU points):", "",
                  md_table(["claim", "reading"], claims), ""]
    return lines


def decoding(df, out: Path) -> str:
    """The decoding settings as the finished E2E runs recorded them (eval_test.json)."""
    for run in df[(df.experiment == "e2e") & (df.status == "done")].run:
        record = runs.read_json(out / "e2e" / "e2e_nlg" / run / "eval_test.json").get("generation") or {}
        if record:
            keys = ("num_beams", "length_penalty", "no_repeat_ngram_size", "max_new_tokens")
            return "recorded in eval_test.json: " + ", ".join(f"{k}={record.get(k)}" for k in keys)
    return "`conf/dataset/e2e.yaml`: beam 10, length penalty 0.9, no-repeat n-gram 4, at most 64 new tokens"


def quiet_projection(df, cpus: int) -> tuple[float, int]:
    """Hours the whole plan takes on a machine doing nothing else, projected from the finished
    runs that ran alone (1-minute load at their start and end at most cpus + 0.6): each planned
    run counts its group's median, the group being (experiment, task), else the task (the rank
    sweep's runs take the GLUE task's median). A group none of whose runs ran alone counts its
    fastest finished run (at least its time alone, so the projection errs long). Resumed runs
    measure nothing: their stopped session's time was never recorded. Returns (hours, planned
    runs with no measured group)."""
    done = df[(df.status == "done") & ~df.resumed.astype(bool)]
    done = done.assign(s=done.train_s.fillna(0) + done.test_s.fillna(0))
    alone = done[done.load_1min_max <= cpus + 0.6]
    by_group = done.groupby(["experiment", "task"]).s.min().to_dict()
    by_group |= alone.groupby(["experiment", "task"]).s.median().to_dict()
    by_task = done.groupby("task").s.min().to_dict() | alone.groupby("task").s.median().to_dict()
    total, unmeasured = 0.0, 0
    for experiment, task in zip(df.experiment, df.task, strict=True):
        median = by_group.get((experiment, task), by_task.get(task))
        if median is None:
            unmeasured += 1
        else:
            total += median
    return total / 3600, unmeasured


READING_MARKS = ("<!-- reading: written by hand against the committed runs; --report keeps it -->",
                 "<!-- /reading -->")


def kept_reading(doc: Path) -> list[str]:
    """The hand-written reading of the previous report, carried over word for word: regenerating
    the tables must not erase the prose that interprets them."""
    text = doc.read_text() if doc.is_file() else ""
    start, end = text.find(READING_MARKS[0]), text.find(READING_MARKS[1])
    return [text[start:end + len(READING_MARKS[1])], ""] if 0 <= start < end else []


def write_report(preset: Preset, out: Path, results: Path, doc: Path, command: str) -> None:
    """CSV/JSON of every planned run, figures.py's figures and tables per experiment, and the
    Markdown report that reads them against the papers' claims."""
    jobs = plan(preset, out)
    df = records(jobs)
    lrs = chosen_lrs(preset, out)
    results.mkdir(parents=True, exist_ok=True)
    df.to_csv(results / "runs.csv", index=False)
    figures = {e: figures_for(out / e, results / e) for e in EXPERIMENTS if e != "rank_sweep"}
    sweep_png = rank_sweep_figure(preset, out, results)
    glue_lines, glue_numbers = _glue_section(preset, df, lrs)
    pending = df[df.status != "done"]
    total_s = float(df.train_s.fillna(0).sum() + df.test_s.fillna(0).sum())
    quiet_h, unmeasured = quiet_projection(df, os.cpu_count() or 1)
    loads = df.load_1min_max.dropna()
    summary = {"complete": not len(pending), "runs": len(df), "done": int((df.status == "done").sum()),
               "chosen_lr": lrs, "glue": glue_numbers, "wall_clock_s": total_s,
               "quiet_projection_h": quiet_h, "quiet_projection_unmeasured_runs": unmeasured,
               "max_load_1min": float(loads.max()) if len(loads) else None, "cpus": os.cpu_count(),
               "budgets": {"glue": preset.glue_budget.note, "e2e": preset.e2e_budget.note}}
    runs.write_json(results / "summary.json", summary)

    rel = lambda p: _rel(p, doc)  # noqa: E731
    status = ("complete" if not len(pending) else
              f"PARTIAL: {summary['done']} of {len(df)} runs done, {len(pending)} still to run")
    lines = [
        "# Results: every method side by side at CPU scale", "",
        f"Status: **{status}**. Made by `{command}` (resumable: the same command skips finished runs "
        "and continues; `--report` rewrites this page from what is finished). Numbers behind every "
        f"table: [`runs.csv`]({rel(results / 'runs.csv')}) (one row per planned run, finished or not) "
        f"and [`summary.json`]({rel(results / 'summary.json')}).", "",
        *kept_reading(doc),
        "## Protocol", "",
        f"- GLUE with `{preset.glue_model}` on {', '.join(preset.glue_tasks)}: {preset.glue_budget.note}. "
        f"Rank {preset.rank} for every low-rank method (RoCoFT: {preset.rank} rows or columns), all on the "
        f"same layers (`fnmodel.targets={preset.glue_targets}`, LoRA's GLUE choice; the LoRA-XS and RoCoFT "
        "papers adapt more layers, ROSA's code the whole attention), the classification head trains for "
        "every method except ColA (its backbone, head included, stays frozen by design, so its head is "
        f"the random initial one). Seeds {', '.join(map(str, preset.seeds))}. The score is the best "
        "validation score over the evaluations of a run (best-on-validation, as the LoRA and ROSA papers "
        "report GLUE; GLUE's test labels are not public), on the full dev set; mean ± sample std over seeds.",
        f"- ROSA resamples its subspace every {preset.glue_budget.rosa_every or 'epoch'} steps on GLUE and "
        f"every {preset.e2e_budget.rosa_every or 'epoch'} on E2E (the paper resamples each epoch; one epoch "
        "is the whole budget here, so a run trains four subspaces in turn).",
        f"- Learning rate: per method, the best validation score on `{preset.glue_tasks[0]}` (seed "
        f"{preset.seeds[0]}) over the grid below, then fixed for every task, seed and rank, and for E2E. "
        f"A grid whose best rate lies on its edge grows by one step of the 1-2-5 series in that "
        f"direction, at most {preset.grid_widen} times, so that the chosen rate is an interior optimum "
        f"where the widened grid finds one. "
        f"Because the grid task's dev set both picks the rate and reports the score, the "
        f"`{preset.glue_tasks[0]}` column is optimistic for every method alike.",
        f"- E2E with `{preset.e2e_model}` ({', '.join(preset.e2e_methods)}; targets "
        f"`{preset.e2e_targets}`): {preset.e2e_budget.note}. The checkpoint with the lowest validation loss "
        "decodes the "
        + ("whole test set (630 meaning representations)" if preset.e2e_test_samples is None else
           f"first {preset.e2e_test_samples} test meaning representations")
        + f" with the LoRA paper's protocol ({decoding(df, out)}), scored by `evaluate.py` (BLEU, NIST, "
        "METEOR, ROUGE-L, CIDEr against all references of each MR). One seed.",
        f"- Planned size: {len(df)} runs. {preset.time_note}",
        f"- Machine: {os.cpu_count()} CPU cores shared with other jobs (highest 1-minute load average "
        f"seen at a run's start or end: {summary['max_load_1min']}); wall-clock is therefore inflated "
        f"and noisy, useful only as a rough ratio between methods. Total wall-clock of the finished "
        f"runs: {total_s / 3600:.2f} h. Projected for the whole plan on this machine doing nothing "
        f"else (per task, the median wall-clock of the runs that ran alone, else its fastest run; "
        f"resumed runs left out, their stopped sessions unrecorded): "
        f"{quiet_h:.1f} h"
        + (f" plus {unmeasured} run(s) of kinds not measured yet." if unmeasured else ".")
        + ("" if unmeasured or quiet_h <= 6 else " That is over the 6 h this plan was sized for: see the "
           "time note above."), "",
        "## Learning-rate grid", "",
        f"Best validation score on `{preset.glue_tasks[0]}` (seed {preset.seeds[0]}); bold: chosen.", "",
        *_grid_section(preset, df, lrs),
        "## GLUE", "",
        "Best validation score, mean ± std over seeds (n = finished seeds). Every finished run is in the "
        "table; none is dropped.", "", *glue_lines,
        "## ROSA against LoRA across ranks", "",
        *_sweep_section(preset, df),
    ]
    if sweep_png:
        lines += [f"![rank sweep]({rel(sweep_png)})", ""]
    lines += ["## E2E", "", *_e2e_section(preset, df)]
    curve = results / "e2e" / "e2e_nlg" / "curve_valid_loss.png"
    if curve.is_file():
        lines += [f"![E2E validation loss]({rel(curve)})", ""]
    glue_figs = sorted(p for p in figures.get("glue", []) if p.suffix == ".png")
    if glue_figs:
        lines += ["Validation curves per GLUE task (figures.py): " + ", ".join(
            f"[{p.parent.name} {p.stem.removeprefix('curve_')}]({rel(p)})" for p in glue_figs), ""]
    if len(pending):
        lines += ["## Still to run", "", f"Resume with `{command}`.", ""]
        counts = pending.groupby(["experiment", "status"]).size()
        lines += [f"- {e}: {n} run(s) {s}" for (e, s), n in counts.items()] + [""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")


# ---- command line -------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="what to run (smoke: tiny models, seconds)")
    p.add_argument("--runs", default="benchmarks/results/reproduce/runs",
                   help="root of the run folders (committed without checkpoints, so that a finished run "
                        "survives a fresh clone and is never trained twice)")
    p.add_argument("--results", default="benchmarks/results/reproduce", help="CSV, JSON and figures")
    p.add_argument("--doc", default="docs/results.md", help="the Markdown report")
    p.add_argument("--plan", action="store_true", help="list the runs and their status; train nothing")
    p.add_argument("--report", action="store_true", help="only write the report from finished runs")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep runs' checkpoints (by default removed once the run is scored)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    preset, out = PRESETS[args.preset], Path(args.runs)
    command = "python benchmarks/reproduce.py" + ("" if args.preset == "cpu" else f" --preset {args.preset}")
    if args.plan:
        for job in plan(preset, out):
            print(f"{job.status():>35}  {job.experiment}/{job.task}/{job.name}")
        return 0
    try:
        failed = [] if args.report else run_all(preset, out, args.keep_checkpoints,
                                                 log=lambda s: print(s, flush=True))
    except StaleRuns as err:
        print(err, file=sys.stderr)
        return 2
    write_report(preset, out, Path(args.results), Path(args.doc), command)
    for folder in failed:
        print(f"failed (see the log above; rerun to retry): {folder}")
    return 1 if failed else 0


if __name__ == "__main__":
    # Relative to the working directory, so that committed run records name the documented
    # location beside the project root ("../shared/data") rather than this machine's path.
    os.environ.setdefault("ROSA_BENCH_DATA", os.path.relpath(ROOT.parent / "shared" / "data"))
    sys.exit(main(sys.argv[1:]))
