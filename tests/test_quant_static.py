

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
