import pytest

from torchshrink.core.errors import ConfigError
from torchshrink.search.budget import Budget, parse_budget


def test_parse_issue_example():
    b = parse_budget("--max-size 2MB --max-latency-ratio 0.5 --max-accuracy-drop 1.0")
    assert b == Budget(max_size_bytes=2_000_000, max_latency_ratio=0.5, max_accuracy_drop=1.0)


def test_parse_ratio_units_and_equals_form():
    b = parse_budget("max-size=0.25x, max_accuracy_drop=0")
    assert b.max_size_ratio == 0.25 and b.max_size_bytes is None and b.max_accuracy_drop == 0.0
    assert parse_budget("--max-size 1.5MiB").max_size_bytes == int(1.5 * 1024**2)
    assert parse_budget("--max-size 500kb").max_size_bytes == 500_000
    assert Budget(max_size_ratio=0.25).size_limit(1000) == 250
    assert Budget(max_size_ratio=0.5, max_size_bytes=100).size_limit(1000) == 100


@pytest.mark.parametrize("text, fragment", [
    ("--max-size two", "is not a size"),
    ("--max-size 2MB --max-speed 3", "unknown constraint 'max-speed'"),
    ("--max-latency-ratio", "needs a value"),
    ("--max-latency-ratio -1", "must be > 0"),
    ("--max-size 3x", "(0, 1]x"),
    ("", "empty budget"),
])
def test_bad_budget_strings_name_the_problem_and_show_an_example(text, fragment):
    with pytest.raises(ConfigError) as e:
        parse_budget(text)
    assert fragment in str(e.value)
    assert "--max-size 2MB --max-latency-ratio 0.5 --max-accuracy-drop 1.0" in str(e.value)


def test_violations_are_zero_when_met_and_positive_when_not():
    b = parse_budget("--max-size 0.25x --max-accuracy-drop 1.0 --max-latency-ratio 0.5")
    ok = b.violations({"size_bytes": 200, "latency_ratio": 0.4, "accuracy_drop": 0.5}, 1000)
    assert ok == {"size": 0.0, "latency": 0.0, "accuracy": 0.0}
    bad = b.violations({"size_bytes": 500, "latency_ratio": 1.0, "accuracy_drop": 3.0}, 1000)
    assert bad["size"] == pytest.approx(1.0) and bad["latency"] == pytest.approx(1.0) and bad["accuracy"] == pytest.approx(0.2)


def test_cli_search_rejects_a_bad_budget_with_an_example(tmp_path):
    import typer
    from typer.testing import CliRunner

    from torchshrink.search.command import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # typer needs two commands to keep "search" as a subcommand
    res = CliRunner().invoke(app, ["search", "--model", "zoo:digits-cnn", "--budget", "--max-size=lots",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "is not a size" in res.output and "--max-accuracy-drop 1.0" in res.output


def test_the_rerun_line_names_the_data_and_input_the_search_measured_on(tmp_path, monkeypatch):
    """A search on the user's data printed a rerun command without --data / --input-shape, so the rerun measured
    something else (random inputs) than the search reported."""
    import numpy as np
    from typer.testing import CliRunner

    from torchshrink.cli import app

    monkeypatch.chdir(tmp_path)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=g.normal(size=(40, 3, 4, 4)).astype("float32"), y=g.integers(0, 10, 40))
    res = CliRunner().invoke(app, ["search", "--model", "tests.conftest:tiny_net", "--data", "d.npz", "--input-shape",
                                   "2,3,4,4", "--budget", "--max-size 0.9x", "--method", "greedy", "--trials", "1",
                                   "--out", "s", "--threads", "1"])
    assert res.exit_code == 0, res.stderr
    line = " ".join(res.stdout.split())
    assert "rerun with: torchshrink compress --model tests.conftest:tiny_net --recipe s/recipe.yaml --data d.npz " \
           "--input-shape 2,3,4,4 --out OUT" in line
