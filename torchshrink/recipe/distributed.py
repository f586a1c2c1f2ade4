"""Data-parallel fine-tuning of a recipe stage with torch.distributed (DDP, gloo on CPU).

Every process applies the stage the same way (same seed), wraps the prepared model in
DistributedDataParallel and runs the shared fine-tune loop (:func:`torchshrink.recipe.train.finetune`)
on its slice of every batch: rank r gets the r-th contiguous part, so the averaged gradient equals
the single-process gradient of the whole batch, and the result matches a one-process run up to
floating-point order. BatchNorm layers normalize training batches with statistics reduced over
all ranks (:func:`sync_norms`: PyTorch's ``SyncBatchNorm`` runs on GPUs only), so a slice is
normalized as it would be in the whole batch. Rank 0 hands back the trained weights;
``finalize`` then runs once, as in :func:`torchshrink.recipe.runner.run_stage`.

Two ways in:
- ``run_stage_ddp(model, stage, task_factory, world_size=2)`` spawns the processes itself;
- under torchrun: ``torchrun --nproc-per-node 2 -m torchshrink.recipe.distributed --model M --recipe R --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchshrink.core.api import finalize, step
from torchshrink.core.data import Batch
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.recipe.recipe import Stage
from torchshrink.recipe.runner import prepare_stage
from torchshrink.recipe.task import Task
from torchshrink.recipe.train import TrainingError, finetune, recovery_loss

log = logging.getLogger(__name__)
TaskFactory = Callable[[], Task]


class Shard:
    """Iterates ``data`` and yields this rank's contiguous slice of every batch (tensors,
    (inputs, labels) tuples or dicts of tensors)."""

    def __init__(self, data: Iterable[Any], rank: int, world_size: int) -> None:
        self.data, self.rank, self.world = data, rank, world_size

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def _cut(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            n = x.shape[0]
            if n < self.world:
                raise DataError(f"a batch of {n} sample(s) cannot be split over {self.world} processes; "
                                "use a batch size >= the number of processes")
            return x.tensor_split(self.world)[self.rank]
        if isinstance(x, dict):
            return {k: self._cut(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return type(x)(self._cut(v) for v in x)
        return x

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            yield self._cut(batch)


def ddp_finetune_stage(model: nn.Module, stage: Stage, task: Task, seed: int = 0) -> nn.Module:
    """Inside an initialized process group: apply ``stage`` and fine-tune it with DDP.
    Returns the prepared, trained model (not finalized), identical on every rank."""
    if not dist.is_initialized():
        raise ConfigError("ddp_finetune_stage needs an initialized process group (torchrun, or run_stage_ddp)")
    rank, world = dist.get_rank(), dist.get_world_size()
    new = prepare_stage(model, stage, task, seed)
    if stage.finetune is None or stage.finetune.epochs == 0:
        return new
    ft = dataclasses.replace(stage.finetune, seed=stage.finetune.seed + seed)
    base_loss = recovery_loss(stage.recovery, model, ft)
    train = Shard(task.require_train(), rank, world)
    # a hold parametrization (e.g. one-shot pruning's masks) that the first step would register must exist
    # before DDP wraps the model: registering it later re-creates the weight's gradient accumulator, DDP's
    # all-reduce hook on the old one never fires, and each rank trains those weights on its own slice
    step(new, 0, ft.epochs * len(train))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers: running stats are synced by sync_norms
        ddp = nn.parallel.DistributedDataParallel(new, find_unused_parameters=True, broadcast_buffers=False)

    def loss(student: nn.Module, b: Batch) -> torch.Tensor:
        return base_loss(ddp, b)

    with sync_norms(new):
        finetune(new, train, ft, loss_fn=loss, on_step=lambda m, i, total: step(new, i, total))
    check_in_sync(new)
    return new


def check_in_sync(model: nn.Module, rtol: float = 1e-6) -> None:
    """Raise if any parameter differs across the ranks (sum and sum of squares compared): DDP did
    not average its gradients, so the ranks trained different models."""
    params = dict(model.named_parameters())
    if not params:
        return
    stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in params.values()])
    lo, hi = stats.clone(), stats.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    bad = [n for n, d, h in zip(params, (hi - lo).abs(), hi.abs(), strict=True) if bool((d > rtol * (h + 1.0)).any())]
    if bad:
        raise TrainingError(f"after DDP fine-tuning the parameters {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                            "differ across ranks: their gradients were not averaged (a module or parametrization "
                            "replaced them after DistributedDataParallel wrapped the model)")


def _synced_norm(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``m``'s training-mode forward with batch statistics summed over all ranks (autograd flows
    through the reduction, as in SyncBatchNorm); running statistics are updated with the global
    batch's mean and unbiased variance, so they stay identical on every rank."""
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.new_tensor([x.numel() / c])
    with warnings.catch_warnings():  # deprecated for a private replacement; still the public autograd all-reduce
        warnings.simplefilter("ignore", FutureWarning)
        stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
    if m.track_running_stats and m.running_mean is not None and m.running_var is not None:
        with torch.no_grad():
            m.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
            f = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            m.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            m.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=f)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
    if m.affine:
        y = y * m.weight.view(shape) + m.bias.view(shape)
    return y


@contextlib.contextmanager
def sync_norms(model: nn.Module) -> Iterator[int]:
    """While active, every BatchNorm of ``model`` in training mode normalizes with statistics
    of the whole distributed batch (CPU / gloo). Yields the number of synced layers."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def synced(m: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        plain = m.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            return _synced_norm(m, x) if m.training else plain(x)
        return forward

    for m in norms:
        m.forward = synced(m)  # type: ignore[method-assign]
    try:
        yield len(norms)
    finally:
        for m in norms:
            del m.forward


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(rank: int, world: int, port: int, model: nn.Module, stage: Stage, task_factory: TaskFactory,
             seed: int, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task = task_factory()
        trained = ddp_finetune_stage(model, stage, task, seed)
        if rank == 0:  # finalize once and hand the result over in torchshrink's own save format
            from torchshrink.export.io import save

            save(finalize(trained, data=task.calibration, inplace=True), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the work is done and saved: skip the interpreter's teardown, where a rank that ran autograd-aware
    # collectives (sync_norms) could abort ("terminate called without an active exception")
    os._exit(0)


def run_stage_ddp(model: nn.Module, stage: Stage, task_factory: TaskFactory, *, world_size: int = 2,
                  seed: int = 0, threads: int = 1, timeout_s: float = 600) -> nn.Module:
    """Like :func:`torchshrink.recipe.runner.run_stage`, with the fine-tuning spread over
    ``world_size`` local processes (gloo). ``task_factory`` (a picklable, module-level function
    such as ``torchshrink.recipe.task.digits_task``) builds the same task in every process."""
    import torch.multiprocessing as tmp_mp

    if world_size < 1:
        raise ConfigError(f"world_size={world_size} must be >= 1")
    if stage.finetune is not None and stage.finetune.epochs > 0:
        from torchshrink.export.io import load

        with tempfile.TemporaryDirectory() as d:
            out = str(Path(d) / "model")
            ctx = tmp_mp.start_processes(_spawned, args=(world_size, _free_port(), model, stage, task_factory, seed,
                                                         out, threads), nprocs=world_size, join=False,
                                         start_method="spawn")
            import time

            deadline = time.monotonic() + timeout_s
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"DDP fine-tuning did not finish within {timeout_s:.0f} s")
            if not Path(out).is_dir():
                raise RuntimeError("DDP fine-tuning ended without a model from rank 0")
            return load(out).eval()
    task = task_factory()
    return finalize(prepare_stage(model, stage, task, seed), data=task.calibration, inplace=True)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - exercised through torchrun
    """torchrun entry point: every stage of a recipe with DDP fine-tuning; rank 0 saves the model."""
    from torchshrink.export.io import save
    from torchshrink.models import load_model
    from torchshrink.recipe.recipe import load_recipe
    from torchshrink.recipe.task import task_for

    ap = argparse.ArgumentParser(prog="python -m torchshrink.recipe.distributed")
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        model = load_model(args.model).eval()
        recipe = load_recipe(args.recipe)
        task = task_for(model)
        current = model
        for i, stage in enumerate(recipe.stages):
            current = finalize(ddp_finetune_stage(current, stage, task, args.seed * 1000 + i), data=task.calibration,
                               inplace=True)
        if dist.get_rank() == 0:
            save(current, args.out, recipe=recipe.to_dict(), force=True)
            log.info("wrote %s", args.out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
