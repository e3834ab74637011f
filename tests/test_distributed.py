"""Data-parallel training on CPU (gloo): two processes started by torchrun train every method
to the same weights as one process with the same global batch, score validation (loss, GLUE
predictions, generations) the same, and stop on a signal so that a rerun resumes exactly.

The torchrun workers run this file as a script (`worker`); the one-process references run in
the test process meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rosa_bench import runs  # noqa: E402
from rosa_bench.errors import UserError  # noqa: E402
from rosa_bench.train import distributed  # noqa: E402

BATCH = 8  # the global batch: 8 in one process, 4 in each of two
# The tiny models' own dropout is off: one process and two draw different masks.
BASE = ["model=tiny-gpt2", "dataset=e2e", "dataset.max_train_samples=16", "dataset.max_eval_samples=5",
        "train.max_steps=3",
        "logging.log_every=1", "logging.progress=false", "logging.sample_max_new_tokens=3",
        "+model.tiny.resid_pdrop=0.0", "+model.tiny.embd_pdrop=0.0", "+model.tiny.attn_pdrop=0.0"]
# 16 rows / 8 = 2 steps an epoch: step 3 is in the second epoch (ROSA resamples there).
SCENARIOS = {
    "full": [],
    # 24 validation rows (later override wins) hold several meaning representations to decode
    "lora": ["dataset.max_eval_samples=24", "logging.eval_generate_every=3", "dataset.generation.num_beams=1",
             "dataset.generation.max_new_tokens=4", "dataset.generation.batch_size=2",
             "dataset.generation.stop_at_blank_line=false"],
    "peft_lora": [],
    "rosa": [],
    "loraxs": [],
    "rocoft": ["fnmodel.select=prune", "fnmodel.calib_batches=2"],
    "cola": [],
}
GLUE = ["model=tiny-bert", "dataset=glue", "dataset.task=mrpc", "fnmodel=lora",
        "dataset.max_train_samples=16", "dataset.max_eval_samples=7", "train.max_steps=2",
        "logging.progress=false", "+model.tiny.hidden_dropout_prob=0.0",
        "+model.tiny.attention_probs_dropout_prob=0.0"]
DROPOUT = [*BASE, "fnmodel=lora", "fnmodel.dropout=0.1", "train.max_steps=4"]


def scenario_overrides() -> dict[str, list[str]]:
    found = {name: [*BASE, f"fnmodel={name}", *extra] for name, extra in SCENARIOS.items()}
    return found | {"glue": GLUE}


def run_once(overrides: list[str], batch_size: int, out: Path) -> Path:
    from rosa_bench.pipeline import train
    from tests.test_config import composed

    overrides = [*overrides, f"train.batch_size={batch_size}"]
    return train(composed([*overrides, f"output.path={out}"]), overrides)


# ---- the torchrun worker ----------------------------------------------------------------------
def worker(out: Path) -> None:
    from tests.test_config import composed

    distributed.start(composed(BASE))  # joins the process group
    sharded_generation_matches_one_process()
    gradient_averaging_cases()
    replica_check_fails_on_different_weights()
    for name, overrides in scenario_overrides().items():
        run_once(overrides, BATCH // 2, out / name)
    preempted_run(out)


def preempted_run(out: Path) -> None:
    """With dropout (each process its own masks): SIGTERM reaches process 1 only, at step 2;
    both stop after step 2 with a checkpoint, and the rerun ends where an uninterrupted run does
    (which needs each process's own RNG back)."""
    from rosa_bench.methods.base import Method

    run_once(DROPOUT, BATCH // 2, out / "straight")

    def signal_rank_1(self, trainer):
        if distributed.rank() == 1 and trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    original, Method.on_step_end = Method.on_step_end, signal_rank_1
    try:
        run_once(DROPOUT, BATCH // 2, out / "stopped")
        raise AssertionError("training did not stop on SIGTERM")
    except SystemExit as stop:
        assert stop.code == 128 + signal.SIGTERM, stop.code
    finally:
        Method.on_step_end = original
    state = runs.read_json(the_run(out / "stopped") / "checkpoints" / "last" / "state.json")
    assert state["global_step"] == 2 and len(state["rank_rng"]) == 2
    run_once(DROPOUT, BATCH // 2, out / "stopped")


def sharded_generation_matches_one_process() -> None:
    """Batches dealt out to the processes and gathered: the very texts of one process."""
    from rosa_bench.generation import generate
    from rosa_bench.pipeline import build, resolve
    from rosa_bench.train.evaluation import generate_samples, sharded_generate
    from tests.test_config import composed

    parts = build(resolve(composed([*BASE, "fnmodel=lora", *SCENARIOS["lora"]])))
    prompts = parts.task.generation_sets["validation"].prompts
    assert len(prompts) > 2  # batches of 2: the second process decodes fewer prompts
    settings = parts.task.generation
    alone = generate(parts.model, parts.tokenizer, prompts, settings, progress=False)
    assert sharded_generate(parts.model, parts.tokenizer, prompts, settings, progress=False) == alone
    assert any(alone)
    samples = [generate_samples(parts.model, parts.tokenizer, prompts, torch.device("cpu"), 3, sharded=flag)
               for flag in (False, True)]
    assert samples[0] == samples[1]


def gradient_averaging_cases() -> None:
    """Gradients outside DDP: averaged; missing on one process counts as zero there; missing
    everywhere stays missing."""
    me = distributed.rank()
    both, one, none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), float(me + 1))
    one.grad = torch.full((3,), 4.0) if me == 1 else None
    distributed.average_unsynced_gradients([both, one, none], torch.nn.Linear(1, 1))
    assert both.grad.tolist() == [1.5] * 3 and one.grad.tolist() == [2.0] * 3 and none.grad is None


def replica_check_fails_on_different_weights() -> None:
    distributed.check_replicas_agree({"w": torch.ones(2)})
    try:
        distributed.check_replicas_agree({"w": torch.ones(2) * (1 + distributed.rank())})
    except RuntimeError:
        return
    raise AssertionError("different replicas were not detected")


# ---- the tests ----------------------------------------------------------------------------------
def the_run(root: Path) -> Path:
    (config,) = root.rglob(runs.CONFIG_FILE)
    return config.parent


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "checkpoints" / "last" / "model.safetensors"))


def last_scalars(folder: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("valid")}


def assert_same_scores(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, dict):
            assert_same_scores(got[key], value)
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_two_processes_train_and_score_as_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    worker_out = tmp_path / "ddp"
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", __file__, str(worker_out)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = {name: run_once(overrides, BATCH, tmp_path / "one" / name)
                  for name, overrides in scenario_overrides().items()}
        log, _ = launch.communicate(timeout=900)
    finally:
        launch.kill()
    assert launch.returncode == 0, "\n".join(line for line in log.splitlines() if "Map" not in line)[-5000:]
    for name, one in single.items():
        two = the_run(worker_out / name)
        want, got = final_weights(one), final_weights(two)
        assert got.keys() == want.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=f"{name}: {key}")
        assert_same_scores(runs.read_metrics(two)["final"], runs.read_metrics(one)["final"])
        assert_same_scores(last_scalars(two), last_scalars(one))
    assert "valid/BLEU" in last_scalars(single["lora"])  # generation scores were compared
    assert "accuracy" in runs.read_metrics(single["glue"])["final"]["validation"]
    straight, stopped = the_run(worker_out / "straight"), the_run(worker_out / "stopped")
    assert runs.read_metrics(stopped)["global_step"] == 4
    for key, value in final_weights(straight).items():
        torch.testing.assert_close(final_weights(stopped)[key], value, atol=0, rtol=0)


def test_sigterm_stops_after_the_step_and_a_rerun_resumes_exactly(tmp_path, monkeypatch):
    from rosa_bench.methods.base import Method

    overrides = [*BASE, "fnmodel=lora", "fnmodel.dropout=0.1", "train.max_steps=5"]
    straight = final_weights(run_once(overrides, 4, tmp_path / "straight"))
    calls = []

    def signal_during_step_3(self):  # after step 3's backward, before its optimizer step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(Method, "before_optimizer_step", signal_during_step_3)
        with pytest.raises(SystemExit) as stop:
            run_once(overrides, 4, tmp_path / "stopped")
    assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back
    folder = the_run(tmp_path / "stopped")
    assert runs.read_json(folder / "checkpoints" / "last" / "state.json")["global_step"] == 3
    assert not runs.is_complete(folder)
    resumed = final_weights(run_once(overrides, 4, tmp_path / "stopped"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=0, rtol=0)


def test_a_sweep_may_change_precision_between_jobs(tmp_path):
    """Hydra's multirun runs its jobs in one process: Accelerate's state must not pin the
    first job's precision."""
    for precision in ("fp32", "bf16"):
        folder = run_once([*BASE, "train.max_steps=1", f"train.precision={precision}"], 4, tmp_path)
        assert runs.is_complete(folder)


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(UserError, match="train.precision=fp16 needs a CUDA device"):
        run_once([*BASE, "train.precision=fp16"], 4, tmp_path)
    assert not list(tmp_path.glob("*/*"))  # refused before the run folder exists


def test_cola_adapter_device_this_process_cannot_reach_is_a_clear_error(tmp_path):
    beyond = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(UserError, match=f"adapter_device='{beyond}' is not reachable from process 0"):
        run_once([*BASE, "fnmodel=cola", f"fnmodel.adapter_device={beyond}"], 4, tmp_path)


def test_launches_that_are_not_data_parallel_are_refused():
    with pytest.raises(UserError, match="WORLD_SIZE=2 processes but Accelerate joined 1"):
        distributed.check_world(1, {"WORLD_SIZE": "2"})
    distributed.check_world(2, {"WORLD_SIZE": "2"})
    distributed.check_world(1, {})
    parent = ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"]
    with pytest.raises(UserError, match="--num_processes=2.*torchrun --nproc_per_node"):
        distributed.check_accelerate_launch(parent, {})
    with pytest.raises(UserError, match="--num_processes=3"):
        distributed.check_accelerate_launch(["accelerate", "launch", "--num-processes=3", "x.py"], {})
    distributed.check_accelerate_launch(parent, {"WORLD_SIZE": "2"})  # really launched 2
    distributed.check_accelerate_launch(["accelerate", "launch", "--num_processes", "1", "x.py"], {})


def test_slurm_launcher_requeues_and_runs_one_ddp_job_per_node():
    from hydra import compose, initialize_config_dir

    from rosa_bench.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                 "hydra.launcher.partition=gpu", "hydra.launcher.account=lab"])
    launcher = cfg.hydra.launcher
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    assert (launcher.partition, launcher.account, launcher.nodes) == ("gpu", "lab", 1)
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4  # one process per GPU


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
