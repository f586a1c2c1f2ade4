"""The one native-kernel loader: every instruction-set level this CPU runs computes what the torch
fallback computes, one OpenMP runtime (torch's), the kernels are torch ops that torch.export and
torch.compile see, an exported program runs where nothing was built, and no compiler means fallbacks."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torchshrink.binary import kernels as BK
from torchshrink.binary.modules import PackedBinaryLinear
from torchshrink.core import native
from torchshrink.prune import SparseLinear
from torchshrink.quant import kernels as QK
from torchshrink.quant.modules import Int8DynamicLinear

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: only the fallbacks run")


def _all_kernels() -> dict[str, torch.Tensor]:
    """Every kernel on fixed inputs (odd sizes, an outlier row, a zero row), through the public wrappers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 129, generator=g)
    x[3] *= 40
    x[5] = 0.0
    w = torch.randn(23, 129, generator=g)
    w[w.abs() < 0.8] = 0.0
    torch.manual_seed(0)  # the bias
    lin = SparseLinear.from_linear(nn.Linear(129, 23))
    lin._set_weight(w)
    out = {"csr": lin(x), "csr1": lin(x[:1])}
    out["rows_q"], out["rows_s"], out["rows_z"] = QK.quant_rows(x, 255)
    out["t_q"], out["t_s"], out["t_z"] = QK.quant_tensor(x, 127)
    acc, colsum, bias = torch.randn(37, 23, generator=g) * 50, torch.randn(23, generator=g), torch.randn(23, generator=g)
    s, z = torch.rand(37, generator=g) * 0.1, torch.randint(0, 255, (37,), dtype=torch.int32, generator=g)
    out["epi"] = QK.rows_epilogue(acc.clone(), s, z, colsum, bias, gelu=True)
    out["epi_codes"] = QK.rows_epilogue_codes(acc.clone(), s, z, colsum, bias, False, 127)[1][0]
    res, lw, lb = torch.randn(37, 23, generator=g), torch.rand(23, generator=g) + 0.5, torch.randn(23, generator=g)
    out["addnorm"] = QK.add_layernorm(acc.clone(), res, lw, lb, 1e-12, (s, z, colsum), bias)
    packed = BK.pack_signs(w, "auto")
    out["pack"] = packed
    out["xnor"] = BK.xnor_gemm(BK.pack_signs(x, "auto"), packed, 129, "auto")
    out["binlin"] = BK.binary_linear_fused(x, torch.randn(129, generator=g) * 0.1, packed, torch.rand(23, generator=g),
                                           bias, None)
    return out


def _compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for k, r in ref.items():
        if r.dtype.is_floating_point:
            assert torch.allclose(got[k], r, rtol=1e-5, atol=1e-4 * float(r.abs().max()) + 1e-6), k
        else:
            assert torch.equal(got[k], r), k  # codes, packed bits and integer dot products: exactly


@needs_native
@pytest.mark.parametrize("level", native.LEVELS)
def test_every_level_this_cpu_runs_matches_the_torch_fallback(level, monkeypatch):
    if native.LEVELS.index(level) < native.LEVELS.index(native.cpu_level()):
        pytest.skip(f"this CPU cannot run the {level} build")
    monkeypatch.setenv("TORCHSHRINK_KERNELS", "torch")
    ref = _all_kernels()
    monkeypatch.delenv("TORCHSHRINK_KERNELS")
    lib = native.load(native.build(level))
    assert lib is not None
    monkeypatch.setattr(native, "_LIB", lib)
    monkeypatch.setattr(native, "_STATE", {"tried": True, "level": level})
    _compare(_all_kernels(), ref)


def test_kernel_isa_env_only_lowers_the_level(monkeypatch):
    monkeypatch.setattr(native, "cpu_level", lambda: native.LEVELS[-1 if len(native.LEVELS) == 1 else 1])
    best = native.cpu_level()
    monkeypatch.setenv("TORCHSHRINK_KERNEL_ISA", native.LEVELS[0])
    assert native.chosen_level() == best  # never above what the CPU runs
    monkeypatch.setenv("TORCHSHRINK_KERNEL_ISA", "default")
    assert native.chosen_level() == "default"
    monkeypatch.setenv("TORCHSHRINK_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="TORCHSHRINK_KERNEL_ISA='sse9'; allowed: "):
        native.chosen_level()


@needs_native
@pytest.mark.skipif(native.torch_openmp() is None, reason="torch ships no libgomp here: the kernels build without OpenMP")
def test_one_openmp_runtime_torchs_own(tmp_path):
    code = (
        "import re, torch; from torchshrink.core import native; from torchshrink.quant import kernels as QK\n"
        "assert native.library() is not None\n"
        "QK.quant_rows(torch.randn(4096, 1024), 255)  # a parallel region\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('\\n'.join(sorted({p for p in re.findall(r'\\S*lib[gi]?omp\\S*', maps)})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = r.stdout.split()
    assert [Path(p).resolve() for p in loaded] == [native.torch_openmp().resolve()], loaded


def _traceable_model() -> nn.Module:
    torch.manual_seed(0)
    sparse = nn.Linear(64, 48)
    with torch.no_grad():
        sparse.weight[sparse.weight.abs() < 0.08] = 0.0
    binary = PackedBinaryLinear(48, 32, mode="xnor")
    binary.weight_bits.copy_(torch.randint(0, 256, binary.weight_bits.shape, dtype=torch.uint8))
    binary.scale.uniform_(0.5, 1.5)
    q = Int8DynamicLinear.from_float(nn.Linear(32, 16), kernel="onednn", activation="token", post_op="gelu")
    return nn.Sequential(SparseLinear.from_linear(sparse), nn.ReLU(), binary, q).eval()


@needs_native
def test_kernels_are_torch_ops_for_export_and_compile(monkeypatch):
    model, x = _traceable_model(), torch.randn(5, 64)
    with torch.no_grad():
        ref = model(x)
        program = torch.export.export(model, (x,))
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert {"torchshrink.csr_linear.default", "torchshrink.binary_linear.default",
                "torchshrink.quant_rows.default", "torchshrink.rows_epilogue_.default"} <= ops
        assert torch.allclose(program.module()(x), ref, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph break on our ops
        assert torch.allclose(compiled(x), ref, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("TORCHSHRINK_KERNELS", "torch")  # a machine where nothing was built
        assert torch.allclose(program.module()(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(os.environ.get("TORCHSHRINK_KERNELS") == "torch", reason="TORCHSHRINK_KERNELS=torch: no build is tried")
def test_no_compiler_means_torch_fallbacks_with_one_warning(monkeypatch, tmp_path, caplog):
    model, x = _traceable_model(), torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TORCHSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_STATE", {})
    with caplog.at_level(logging.WARNING, logger="torchshrink.core.native"):
        assert native.library() is None and native.library() is None
        with torch.no_grad():
            got = _traceable_model()(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert "torch fallbacks" in native.describe()
    built = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(built) == 1 and "torch fallbacks" in built[0].getMessage()
    assert not list((tmp_path / "cache").rglob("*.so"))
