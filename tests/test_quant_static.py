

def test_fused_layers_keep_the_users_names_through_save_and_load(digits_cnn, tmp_path):
    """The report lists an INT8 fused layer by the layers it replaced; a reloaded (or resumed) model too."""
    import torchshrink as ts
    from torchshrink.recipe.report import layer_summary
    from torchshrink.recipe.task import digits_task

    q = ts.quantize(digits_cnn, ts.Int8StaticConfig(), data=digits_task().calibration)
    names = [r["layer"] for r in layer_summary(q)]
    assert names[0] == "features.0+features.1+features.2 (fused)"
    ts.save(q, tmp_path / "m")
    assert [r["layer"] for r in layer_summary(ts.load(tmp_path / "m"))] == names


def test_layers_whose_int8_kernel_saturates_get_7_bit_weights(tmp_path):
    """x86's 3x3 depthwise INT8 kernel sums uint8 x int8 pairs in int16 and saturates near full range (even with VNNI;
    on CPUs without VNNI any GEMM may): a layer measured off its exact integer result gets 7-bit weights, so torch's
    INT8 output follows the exact math here on every CPU; a layer that does not saturate is untouched."""
    import torch
    from torch import nn

    import torchshrink as ts
    from torchshrink.export.onnx import export_twin
    from torchshrink.quant.modules import Int8Conv2d

    torch.manual_seed(0)
    dw = nn.Conv2d(144, 144, 3, padding=1, groups=144, bias=False)
    full = nn.Conv2d(144, 16, 1, bias=False)
    model = nn.Sequential(dw, full).eval()
    nn.init.uniform_(dw.weight, -1, 1)
    x = torch.rand(2, 144, 28, 28) * 4
    q = ts.quantize(model, ts.Int8StaticConfig(), data=[x])

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    with torch.no_grad():
        assert cos(q(x), model(x)) > 0.9995
        assert cos(q(x), export_twin(q)(x)) > 0.9999  # torch's INT8 follows the exact integer math (ONNX's graph)
    layers = [m for m in q.modules() if isinstance(m, Int8Conv2d)]
    narrowed = ts.report(q)[-1].notes.get("narrowed_weights", {})
    assert layers[1].qweight.abs().max() == 127  # the 1x1 conv does not saturate: its 8-bit weights are kept
    if narrowed:
        assert layers[0].qweight.abs().max() <= 64 and "7-bit weights" in next(iter(narrowed.values()))
    ts.save(q, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(ts.load(tmp_path / "m")(x), q(x))


def test_static_int8_after_a_stage_that_left_csr_layers_keeps_them_as_calls(tmp_path):
    """prune-quantize on timm's EfficientNet-B0: the prune stage timed CSR faster for the classifier and made it a
    SparseLinear, whose forward branches on the batch size; the int8-static stage then failed to trace, after the
    prune stage's training. torchshrink's own modules are leaves of static INT8's trace: it quantizes the rest, keeps
    the CSR layer as a call, and the graph saves and loads."""
    import torch
    from torch import nn

    import torchshrink as ts
    from torchshrink.prune.sparse import SparseLinear
    from torchshrink.quant.modules import Int8Conv2d

    torch.manual_seed(0)
    head = nn.Linear(8 * 4 * 4, 5)
    with torch.no_grad():
        head.weight.mul_(torch.rand_like(head.weight) > 0.9)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), SparseLinear.from_linear(head)).eval()
    x = torch.randn(4, 3, 4, 4)
    q = ts.quantize(model, ts.Int8StaticConfig(), data=[x])
    assert isinstance(q.get_submodule("3"), SparseLinear) and any(isinstance(m, Int8Conv2d) for m in q.modules())
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0) > 0.999
        assert q(x[:1]).shape == (1, 5)  # the batch-1 branch of SparseLinear runs too
    ts.save(q, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(ts.load(tmp_path / "m")(x), q(x))
