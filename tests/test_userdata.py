"""Your own data (--data / a recipe's data: block): every accepted form becomes a task whose held-out
split is never calibrated or trained on, whose figures name their provenance, and whose bad input gets
one clear line. The walkthrough (examples/byo) runs recipes from the CLI and its reported accuracy is
what a fresh process measures on the saved model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.recipe.recipe import RecipeError, recipe_from_yaml
from torchshrink.recipe.userdata import DataSpec, task_from_data

ROOT = Path(__file__).resolve().parent.parent


def _mlp(features=4, classes=3):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))
    state.put(m, input={"shape": [1, features], "dtype": "float32"})
    return m


def _csv(path, n=50, label="label"):
    g = np.random.default_rng(0)
    with open(path, "w") as f:
        f.write(f"a,b,{label},c,d\n")
        for i in range(n):
            a, b, c, d = g.normal(size=4)
            f.write(f"{a},{b},{'xyz'[i % 3]},{c},{d}\n")
    return path


def _inputs(task):
    return torch.cat([b[0] for b in task.train])


def test_csv_split_is_seeded_disjoint_and_named(tmp_path):
    path = _csv(tmp_path / "t.csv")
    task = task_from_data(DataSpec(str(path), eval_fraction=0.2, batch_size=8), _mlp())
    train_x = _inputs(task)
    assert len(train_x) == 40 and task.primary == "accuracy"
    assert "held-out 20% of t.csv (10 of 50 samples, split seed 0)" in task.provenance["quality"]
    again = task_from_data(DataSpec(str(path), eval_fraction=0.2, batch_size=8), _mlp())
    assert torch.equal(_inputs(again), train_x)  # the same split every time (an independent check can rebuild it)
    calib = torch.cat(task.calibration)
    held = task.inputs[0]
    assert not any(bool((calib == row).all(1).any()) for row in held)  # calibration never sees held-out rows
    assert set(torch.cat([b[1] for b in task.train]).tolist()) <= {0, 1, 2}  # string labels -> 0..K-1


def test_npz_and_a_named_label_column(tmp_path):
    x, y = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32), np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    task = task_from_data(DataSpec(str(tmp_path / "d.npz"), batch_size=4), _mlp())
    assert len(_inputs(task)) == 24 and task.evaluate(_mlp(), _mlp())["accuracy"] >= 0
    path = _csv(tmp_path / "t.csv", label="kind")
    assert task_from_data(DataSpec(str(path), label_column="kind"), _mlp()).primary == "accuracy"


def _image_folder(root, classes=2, per=6, size=8):
    g = np.random.default_rng(0)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per):
            Image.fromarray((g.random((size, size, 3)) * 255).astype(np.uint8)).save(root / f"c{k}" / f"{i}.png")


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 2))
    state.put(m, input={"shape": [1, 3, 16, 16], "dtype": "float32"})
    return m


def test_image_folder_plain_and_with_its_own_val_split(tmp_path):
    _image_folder(tmp_path / "plain", per=10)
    task = task_from_data(DataSpec(str(tmp_path / "plain"), batch_size=4), _cnn())
    assert task.inputs[0].shape[1:] == (3, 16, 16) and float(task.inputs[0].max()) <= 1.0  # resized, [0, 1]
    assert "4 of 20 samples" in task.provenance["quality"]
    _image_folder(tmp_path / "split" / "train", per=6)
    _image_folder(tmp_path / "split" / "val", per=3)
    task = task_from_data(DataSpec(str(tmp_path / "split"), normalize="imagenet"), _cnn())
    assert "split/val (6 images" in task.provenance["quality"] and "normalize imagenet" in task.provenance["quality"]
    assert len(_inputs(task)) == 12


def test_a_factory_gives_train_calibration_eval_and_metric(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    b = lambda: (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))\n"
        "    return {'train': [b(), b()], 'eval': [b()], 'metric': 'accuracy'}\n")
    monkeypatch.chdir(tmp_path)  # the current folder is on the import path, as with python -m
    task = task_from_data(DataSpec("mydata:make"), _mlp())
    assert task.primary == "accuracy" and len(task.calibration) == 2 and "8 samples" in task.provenance["quality"]
    with pytest.raises(ConfigError, match="names code, which a recipe file may not import"):
        task_from_data(DataSpec("mydata:make"), _mlp(), from_file=True)


@pytest.mark.parametrize(("spec", "kind", "needle"), [
    ({"path": "nope.csv"}, DataError, "no such file or folder"),
    ({"path": "x.parquet", "touch": True}, DataError, "is not a data format torchshrink reads"),
    ({"path": "t.csv", "eval_fraction": 1.5}, ConfigError, "eval_fraction=1.5: must be between 0 and 1"),
    ({"path": "t.csv", "batch_size": 0}, ConfigError, "batch_size=0: must be a whole number >= 1"),
    ({"path": "t.csv", "normalise": "none"}, ConfigError, "unknown field 'normalise'"),
    ({"path": "t.csv", "label_column": "nope"}, DataError, "no column 'nope'"),
])
def test_bad_data_specs_are_one_line(tmp_path, monkeypatch, spec, kind, needle):
    monkeypatch.chdir(tmp_path)
    _csv(tmp_path / "t.csv")
    if spec.pop("touch", False):
        (tmp_path / spec["path"]).write_text("x")
    with pytest.raises(kind, match=needle) as e:
        task_from_data(DataSpec.from_dict(spec), _mlp())
    assert "\n" not in str(e.value)


def test_a_recipe_data_block_is_checked_and_kept(tmp_path):
    r = recipe_from_yaml("data: {path: t.csv, eval_fraction: 0.25}\nstages: [{kind: int8-dynamic}]\n")
    assert r.data["path"] == "t.csv" and r.data["eval_fraction"] == 0.25 and "data:" in r.to_yaml()
    with pytest.raises(RecipeError, match="unknown field 'split'"):
        recipe_from_yaml("data: {path: t.csv, split: 0.3}\nstages: [{kind: int8-dynamic}]\n")


# --------------------------------------------------------------------------- the walkthrough, end to end


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    d = tmp_path_factory.mktemp("byo")
    for name in ("models.py", "make_data.py", "train.py"):
        shutil.copy(ROOT / "examples" / "byo" / name, d / name)
    for script in ("make_data.py", "train.py"):
        r = subprocess.run([sys.executable, script], cwd=d, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    return d


def _cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "torchshrink", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


_EVAL = (  # the saved model, rebuilt the way a user rebuilds their own class: factory@folder
    "import json, sys\n"
    "from torchshrink.models import load_model\n"
    "from torchshrink.recipe.userdata import DataSpec, task_from_data\n"
    "m = load_model(sys.argv[1])\n"
    "print(json.dumps(task_from_data(DataSpec(sys.argv[2]), m).evaluate(m, m)))\n"
)


@pytest.mark.parametrize(("model", "data", "shape", "recipe"), [
    ("models:cnn@cnn.safetensors", "data/images", "1,3,32,32", "prune-quantize"),
    ("models:cnn@cnn.safetensors", "data/images", "1,3,32,32", "int8-dynamic"),
    ("models:mlp@mlp.safetensors", "data/wine.csv", "1,13", "slim"),
    ("models:mlp@mlp.safetensors", "data/wine.csv", "1,13", "binary"),
])
def test_walkthrough_recipes_report_what_a_fresh_process_measures(byo, model, data, shape, recipe):
    out = f"out-{recipe}-{model.split(':')[1][:3]}"
    r = _cli(byo, "compress", "-m", model, "--data", data, "--input-shape", shape, "-r", recipe, "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((byo / out / "report.json").read_text())
    assert "held-out 20%" in report["provenance"]["quality"]
    spec = f"{model.split('@')[0]}@{out}/model"
    ev = subprocess.run([sys.executable, "-c", _EVAL, spec, data], cwd=byo, capture_output=True,
                        text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["accuracy"] == report["final"]["quality"]["accuracy"]  # exactly the same number


def test_walkthrough_without_data_refuses_training_recipes_up_front(byo):
    r = _cli(byo, "compress", "-m", "models:cnn@cnn.safetensors", "--input-shape", "1,3,32,32", "-r", "xnor", "-o", "x")
    assert r.returncode == 2 and "stage 1 (xnor) fine-tunes: it needs training data" in r.stderr
    assert not (byo / "x").exists() and not list(byo.glob(".x*"))


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A local Hugging Face BERT folder (2 layers, its own word-piece vocabulary) and a sentence file."""
    transformers = pytest.importorskip("transformers")
    from torchshrink.zoo.text import english_sentences

    d = tmp_path_factory.mktemp("hf")
    sentences = english_sentences()[:240]
    words = sorted({w.strip(".,:;()'\"").lower() for s in sentences for w in s.split()} - {""})[:400]
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    model_dir = d / "bert"
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (d / "sentences.txt").write_text("\n".join(sentences) + "\n")
    (d / "heads.yaml").write_text("data: {path: sentences.txt, max_length: 32}\n"
                                  "stages:\n  - kind: head-prune\n    amount: 0.25\n"
                                  "    finetune: {epochs: 1, lr: 0.0001}\n    recovery: distill\n")
    return d


@pytest.mark.parametrize("recipe", ["bert-int8", "heads.yaml"])
def test_a_local_bert_folder_with_a_sentence_file(bert_folder, recipe):
    out = f"out-{recipe.split('.')[0]}"
    args = ["--data", "sentences.txt"] if recipe == "bert-int8" else []  # heads.yaml names its data itself
    r = _cli(bert_folder, "compress", "-m", "bert", *args, "-r", recipe, "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((bert_folder / out / "report.json").read_text())
    assert "held-out 20% of sentences.txt (48 of 240 texts" in report["provenance"]["quality"]
    assert report["final"]["quality"]["cosine_mean"] > 0.5


def _write_bad(tmp_path, name):
    p = tmp_path / name
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype("float32")
    if name == "latin1.csv":
        p.write_bytes("a,b,c,d,label\n1,2,3,4,caf\xe9\n".encode("latin-1"))
    elif name == "one-array.npz":  # np.save writes .npy bytes whatever the name says
        with open(p, "wb") as f:
            np.save(f, x)
    elif name == "flat.npz":
        np.savez(p, x=x[:, 0])
    elif name == "float-labels.npz":
        np.savez(p, x=x, y=rng.normal(size=20))
    elif name == "negative.npz":
        np.savez(p, x=x, y=-np.ones(20, dtype=int))
    elif name == "short-labels.npz":
        np.savez(p, x=x, y=np.zeros(5, dtype=int))
    elif name == "seven.npz":
        np.savez(p, x=rng.normal(size=(20, 7)).astype("float32"), y=np.zeros(20, dtype=int))
    return p


@pytest.mark.parametrize(("name", "needle"), [
    ("latin1.csv", "is not UTF-8 text (invalid"),
    ("one-array.npz", "is one array, not an .npz archive"),
    ("flat.npz", "array 'x' has shape (20,): inputs are [samples, features...]"),
    ("float-labels.npz", "holds labels of type float64 that are not class indices"),
    ("negative.npz", "holds a negative label (-1)"),
    ("short-labels.npz", "20 inputs ('x') but 5 labels ('y')"),
    ("seven.npz", "the model cannot run on the data's inputs (each of shape (7,)): RuntimeError"),
])
def test_data_a_user_can_get_wrong_is_one_line(tmp_path, name, needle):
    p = _write_bad(tmp_path, name)
    with pytest.raises(DataError) as e:
        task_from_data(DataSpec(str(p)), _mlp())
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_an_error_quoting_brackets_as_text(tmp_path):
    """The CLI's one error line is printed as text: '[samples, features...]' used to vanish as rich markup."""
    p = _write_bad(tmp_path, "flat.npz")
    r = _cli(tmp_path, "compress", "-m", "torchvision:resnet18", "-r", "int8-dynamic", "-d", str(p), "-o",
             str(tmp_path / "out"))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].endswith("inputs are [samples, features...]"), r.stderr
    assert not (tmp_path / "out").exists()


def test_an_npz_declaring_more_than_it_stores_is_refused_before_numpy_allocates(tmp_path):
    """numpy sizes an array from its .npy header, then fills it: a 1 kB archive declaring a 2^40-value array must
    be refused from the header (no allocation), as must one within the cap but larger than its stored bytes."""
    import zipfile

    from numpy.lib import format as npy

    def archive(name, shape):
        p = tmp_path / name
        with zipfile.ZipFile(p, "w") as zf, zf.open("x.npy", "w") as f:
            npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            f.write(b"\0" * 64)
        return p

    for name, shape in (("huge.npz", (1 << 20, 1 << 20)), ("short.npz", (1000, 4))):
        with pytest.raises(DataError) as e:
            task_from_data(DataSpec(str(archive(name, shape))), _mlp())
        assert str(e.value).startswith(f"{tmp_path / name} array 'x' declares shape {shape}") and "\n" not in str(e.value)


def test_files_are_read_only_as_far_as_they_can_be_used(tmp_path, monkeypatch):
    """A table or text file with more rows than torchshrink reads, or an image larger than it decodes, is refused
    while reading (one line), not after holding all of it in memory."""
    import torchshrink.recipe.userdata as ud

    monkeypatch.setattr(ud, "MAX_SAMPLES", 10)
    with pytest.raises(DataError, match="holds more than 10 rows"):
        task_from_data(DataSpec(str(_csv(tmp_path / "t.csv", n=50))), _mlp())
    (tmp_path / "t.txt").write_text("\n".join(f"sentence {i}" for i in range(50)))
    with pytest.raises(DataError, match="holds more than 10 texts"):
        ud._text_task(DataSpec(str(tmp_path / "t.txt")), tmp_path / "t.txt", _mlp())
    monkeypatch.setattr(ud, "MAX_IMAGE_PIXELS", 100)
    for k in ("a", "b"):
        (tmp_path / "img" / k).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / "img" / k / "x.png")
    m = _mlp()
    state.put(m, input={"shape": [1, 3, 8, 8], "dtype": "float32"})
    with pytest.raises(DataError, match=r"x.png is 20x20 pixels; images of at most 100 pixels are read"):
        task_from_data(DataSpec(str(tmp_path / "img")), m)
