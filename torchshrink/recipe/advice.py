"""What a run tells the user besides its figures: warnings when a stage made the model slower or quality
fell, and the faster whole-model variant kept where layer-by-layer choices made the whole slower."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from torchshrink.measure.report import Measurement, compare
from torchshrink.recipe.task import Task

if TYPE_CHECKING:
    from torchshrink.recipe.runner import StageResult


def faster_variant(new: nn.Module, la: Any, lb: Any, timed_pair: Callable[[nn.Module, nn.Module], tuple[Any, Any]],
                   label: str) -> tuple[nn.Module, Any, str]:
    """Sparse kernels are chosen layer by layer, each timed alone; where the stage made the whole model
    slower, the same model with those layers dense (same weights, same file) is timed against it in one
    interleaved run and kept if it is faster. Returns (model, its latency, the reason or "")."""
    if lb.p50_ms <= 1.05 * la.p50_ms:
        return new, lb, ""
    from torchshrink.prune.sparse import dense_twin

    twin = dense_twin(new)
    if twin is None:
        return new, lb, ""
    t_sparse, t_dense = timed_pair(new, twin)
    if t_dense.p50_ms >= 0.97 * t_sparse.p50_ms:
        return new, lb, ""
    return twin, t_dense, (f"stage {label}: its CSR layers each timed faster alone, but the whole model ran faster "
                           f"with them dense ({t_dense.p50_ms:.3f} vs {t_sparse.p50_ms:.3f} ms): kept dense")


QUALITY_WARN_PP = 1.0  # a drop in accuracy (pp) or in cosine / agreement (x100) that is warned about


def _drop_pp(task: Task, before: Measurement, after: Measurement) -> float | None:
    a, b = before.quality.get(task.primary), after.quality.get(task.primary)
    if a is None or b is None:
        return None
    return 100.0 * (a - b) if task.higher_is_better else 100.0 * (b - a)


def run_warnings(stages: list[StageResult], before: Measurement, final: Measurement, task: Task) -> list[str]:
    """What a user must not miss: a stage that made the model slower at the measured batch, and quality
    that fell by more than QUALITY_WARN_PP (accuracy points, or cosine x 100)."""
    out = []
    for s in stages:
        ratio = s.vs_previous.get("latency_p50_ms", {}).get("ratio")
        if ratio is not None and ratio > 1.05:
            out.append(f"stage {s.name} made the model slower: {ratio:.2f}x the latency before it (batch "
                       f"{task.inputs[0].shape[0]}, this machine)")
    ratio = compare(before, final).get("latency_p50_ms", {}).get("ratio")
    if ratio is not None and ratio > 1.05:
        out.append(f"the compressed model is slower than the original here: {ratio:.2f}x its latency")
    drop = _drop_pp(task, before, final)
    if drop is not None and drop > QUALITY_WARN_PP:
        unit = "pp" if task.primary == "accuracy" else "points (x100)"
        out.append(f"{task.primary} fell by {drop:.2f} {unit} ({task.provenance.get('quality', 'task data')})")
    return out
