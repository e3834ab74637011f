"""Data-parallel plumbing for the trainer: launching (torchrun, `accelerate launch`, SLURM
tasks), the per-process views of a run (sharded evaluation, reduced logs, per-rank RNG) and a
clean stop on SIGTERM / SIGUSR1 / SIGUSR2.

One rule holds everywhere: N processes train the same model as one process with the same
global batch. Each process's loss is the mean over its own items (label tokens, or examples)
rescaled so that DDP's gradient average is the mean over every process's items; gradients
that autograd leaves to a method (ColA's adapters) are averaged here; evaluation shards rows
and generation shards whole batches, and every process gets the gathered scores.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from rosa_bench.config import RunConfig
from rosa_bench.errors import UserError
from rosa_bench.train import checkpoint as ckpt
from rosa_bench.train.logger import peak_memory_mb

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
CPU_LAUNCH = "torchrun --nproc_per_node N train.py ..."
T = TypeVar("T")


# ---- launching ------------------------------------------------------------------------------
def use_cpu() -> bool:
    """Train on CPU (gloo) when no GPU is visible or the launcher asked for it. Accelerate
    treats a torchrun launch on a GPU-less machine as N single-process runs unless told so."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return asked or not torch.cuda.is_available()


def start(run: RunConfig) -> PartialState:
    """Join the process group (once per process) and refuse launches that would not be
    data-parallel; also resets Accelerate's per-run state, so one process can run a sweep
    whose jobs differ in precision."""
    _export_slurm_tasks()
    check_accelerate_launch(_parent_argv(), os.environ)
    state = PartialState(cpu=use_cpu())
    if dist.is_initialized():
        atexit.unregister(_leave_process_group)  # once, however many runs this process starts
        atexit.register(_leave_process_group)
    check_world(state.num_processes, os.environ)
    if run.train.precision == "fp16" and state.device.type == "cpu":
        raise UserError("train.precision=fp16 needs a CUDA device; this process trains on cpu. "
                        "Choose train.precision=fp32 or bf16")
    if state.device.type == "cuda" and state.local_process_index >= torch.cuda.device_count():
        raise UserError(f"process {state.process_index} is local process {state.local_process_index} but "
                        f"only {torch.cuda.device_count()} CUDA devices are visible: start at most one "
                        "process per GPU (--nproc_per_node / --num_processes)")
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return state


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does: left to static destruction, its
    background threads can abort a finished process ('terminate called without an active
    exception'), which the launcher reports as a failed run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_world(num_processes: int, env: Any) -> None:
    """A launcher that started WORLD_SIZE processes must get one data-parallel job."""
    launched = int(env.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and num_processes != launched:
        raise UserError(f"the launcher started WORLD_SIZE={launched} processes but Accelerate joined "
                        f"{num_processes}: they would train {launched} separate copies of the run. "
                        f"On CPU launch with {CPU_LAUNCH}")


def check_accelerate_launch(parent_argv: Sequence[str], env: Any) -> None:
    """`accelerate launch --cpu --num_processes N` starts one process whatever N is."""
    if "WORLD_SIZE" in env or "launch" not in parent_argv:
        return
    wanted = 1
    for i, arg in enumerate(parent_argv):
        key, _, value = arg.replace("-", "_").partition("=")
        if key == "__num_processes":
            value = value or (parent_argv[i + 1] if i + 1 < len(parent_argv) else "")
            wanted = int(value) if value.isdigit() else wanted
    if wanted > 1:
        raise UserError(f"accelerate launch started one process although --num_processes={wanted} "
                        "(with --cpu it always does); for data-parallel CPU training run "
                        f"{CPU_LAUNCH}, or accelerate launch --multi_gpu --num_processes {wanted} ...")


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _export_slurm_tasks() -> None:
    """A submitit job with several tasks (one per GPU) becomes one torch.distributed job: the
    rank, world size and rendezvous address come from SLURM's task variables."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "WORLD_SIZE" in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


# ---- the process group ------------------------------------------------------------------------
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_processes(values: Sequence[float], op: Any = None) -> list[float]:
    """Element-wise sum (or `op`, e.g. dist.ReduceOp.MAX) of `values` over every process."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _gather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in rank order (no pickling: bytes travel as uint8 tensors)."""
    device = _comm_device()
    local = torch.tensor(list(data), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.numel()], device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:local.numel()] = local.to(device)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:int(s)].cpu().numpy().tobytes() for p, s in zip(parts, sizes)]


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in rank order."""
    if world_size() == 1:
        return [value]
    return [json.loads(b) for b in _gather_bytes(json.dumps(value).encode())]


def gather_tensors(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every process's named CPU tensors, in rank order, dtypes kept exactly."""
    if world_size() == 1:
        return [tensors]
    data = save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    return [load_tensors(b) for b in _gather_bytes(data)]


def shard(rows: T) -> T:
    """This process's contiguous share of a list or dataset: concatenating the shards in rank
    order gives the rows back in their order."""
    n, size, me = len(rows), world_size(), rank()
    if size == 1:
        return rows
    lo, hi = me * n // size, (me + 1) * n // size
    return rows.select(range(lo, hi)) if hasattr(rows, "select") else rows[lo:hi]


# ---- training -----------------------------------------------------------------------------------
def prepare_model(accelerator: Any, model: nn.Module) -> nn.Module:
    """DDP-wrap the model when it has trainable parameters; a fully frozen backbone (ColA,
    whose adapters live outside it) is only placed and given mixed precision."""
    frozen = not any(p.requires_grad for p in model.parameters())
    return accelerator.prepare_model(model, evaluation_mode=frozen)


def loss_items(batch: dict[str, torch.Tensor], causal: bool) -> int:
    """How many terms the model's mean loss averages over: label tokens after the causal
    shift, or examples."""
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if causal else labels.shape[0]


def global_mean(loss: torch.Tensor, items: int) -> torch.Tensor:
    """Rescale this process's mean loss so that averaging gradients over processes gives the
    gradient of the mean over all processes' items, as one process with the whole batch."""
    size = world_size()
    if size == 1:
        return loss
    total = sum_over_processes([items])[0]
    return loss * (items * size / total)


def average_unsynced_gradients(params: Sequence[nn.Parameter], model: nn.Module) -> None:
    """Average over processes the gradients of `params` that DDP did not (those outside the
    DDP-wrapped `model`, e.g. filled in by a method's hook). A parameter with no gradient on
    every process keeps none, so the optimizer skips it as it would in one process."""
    if world_size() == 1:
        return
    synced = {id(p) for p in model.parameters()} if isinstance(model, nn.parallel.DistributedDataParallel) \
        else set()
    params = [p for p in params if id(p) not in synced]
    if not params:
        return
    present = sum_over_processes([float(p.grad is not None) for p in params], dist.ReduceOp.MAX)
    params = [p for p, has in zip(params, present) if has]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    device = _comm_device()
    flat = torch.cat([p.grad.reshape(-1).to(device, torch.float32) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


class LogWindow:
    """Training loss (item-weighted), tokens and time between two log lines, summed over
    processes when read."""

    def __init__(self, clock: Any):
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.items, self.tokens = 0.0, 0, 0
        self.start = self.clock()

    def add(self, loss: float, items: int, tokens: int) -> None:
        self.loss_sum += loss * items
        self.items += items
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        """Loss, tokens/s over all processes and the highest peak memory of any process; resets."""
        elapsed = max(self.clock() - self.start, 1e-9)
        loss_sum, items, tokens = sum_over_processes([self.loss_sum, self.items, self.tokens])
        peak = sum_over_processes([peak_memory_mb()], dist.ReduceOp.MAX if world_size() > 1 else None)[0]
        self.reset()
        return {"loss": loss_sum / max(items, 1), "tokens_per_s": tokens / elapsed, "peak_mem_mb": peak}


# ---- per-rank RNG ---------------------------------------------------------------------------------
def decorrelate_rng(seed: int) -> None:
    """Processes other than the first draw their own dropout masks (the model, built before,
    is identical everywhere)."""
    if rank() > 0:
        set_seed(seed + rank())


def gather_rng_states() -> dict[str, Any]:
    """Every process's RNG state, for the checkpoint's JSON state ({} with one process, whose
    RNG the checkpoint already holds)."""
    if world_size() == 1:
        return {}
    tensors, meta = ckpt.rng_state()
    mine = {"tensors": {k: v.tolist() for k, v in tensors.items()}, "meta": meta}
    return {"rank_rng": gather_json(mine)}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Give this process back its own RNG state, when the checkpoint was written by as many
    processes (otherwise the first process's, restored already, plus a per-rank reseed)."""
    saved = state.get("rank_rng") or []
    if len(saved) == world_size() > 1:
        mine = saved[rank()]
        ckpt.set_rng_state({k: torch.tensor(v, dtype=torch.uint8) for k, v in mine["tensors"].items()},
                           mine["meta"])
    elif world_size() > 1:
        decorrelate_rng(int(state.get("global_step", 0)) + 1)


def check_replicas_agree(state: dict[str, torch.Tensor]) -> None:
    """Raise if the processes' trained tensors differ (they must be exact replicas)."""
    if world_size() == 1:
        return
    mine = [[float(t.double().sum()), float(t.double().pow(2).sum())] for _, t in sorted(state.items())]
    if any(other != mine for other in gather_json(mine)):
        raise RuntimeError("data-parallel processes ended with different weights; please report this")


# ---- stopping on a signal ------------------------------------------------------------------------
class StopOnSignal:
    """SIGTERM / SIGUSR1 / SIGUSR2 ask the trainer to stop after the current optimizer step.

    Inside the block, a signal only sets a flag. `requested()` (called by every process at
    each step end) agrees across processes, so all stop after the same step; after the
    checkpoint is written, `exit()` hands the signal to whatever handled it before (submitit's
    handler requeues the job, then exits with status -1) and exits."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                old = signal.getsignal(sig)
                if old is not signal.SIG_IGN:
                    self.previous[sig] = old
                    signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        print(f"received {signal.Signals(signum).name}: stopping after this step, checkpoint "
              "in checkpoints/last", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        if world_size() > 1:
            self.received = int(sum_over_processes([self.received], dist.ReduceOp.MAX)[0])
        return bool(self.received)

    def exit(self) -> None:
        """Leave the process: the previous handler decides (submitit: requeue); without one,
        the status a shell reports for the signal (128 + its number)."""
        signum = self.received
        previous = self.previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        try:
            if callable(previous):
                previous(signum, None)
        finally:
            if world_size() > 1:
                dist.barrier()  # nobody leaves before the first process has requeued
        raise SystemExit(-1 if callable(previous) else 128 + signum)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore stop signals: the trainer process stops them itself, after
    finishing its step (a worker killed by SLURM's signal would abort the step)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

