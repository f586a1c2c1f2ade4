"""Your own data for a run (``--data`` / a recipe's ``data:`` block), as a :class:`Task`.

Accepted (``DataSpec.path``):

- ``package.module:factory`` (typed by the user, never read from a recipe file): called with no
  arguments, returns a :class:`Task` or a dict with ``train`` (labelled batches, optional),
  ``calibration`` (optional: taken from ``train`` otherwise), ``eval`` (required) and ``metric``
  (``"accuracy"``, ``"cosine"`` or a function ``(model, reference, eval) -> {name: value}``).
- a folder in the ImageFolder layout (``CLASS/*.png|jpg|...``; or ``train/`` + ``val/`` or ``test/``
  holding that layout): images resized to the model's input size, scaled to [0, 1], and normalized
  with ``normalize`` (``imagenet`` for torchvision models by default, else ``none``).
- a ``.csv`` with a header (the label column: ``label_column``, else one named label / target / y /
  class, else the last one) or a ``.npz`` (arrays ``x`` and ``y``, or the first two): tabular rows.
- a ``.txt`` (one sentence or document per line) or ``.jsonl`` (``text_field``, default ``text``;
  an optional ``label``) for a text model with a tokenizer (a Hugging Face folder, zoo:minilm).

Unless the data names its own held-out split (``val/`` / ``test/``), ``eval_fraction`` of the samples
(seeded shuffle) is held out for evaluation and never calibrated or trained on; calibration uses the
first training batches. Every figure's provenance -- which split, how many samples -- goes into
:attr:`Task.provenance` and from there into the report.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.measure.quality import accuracy, fidelity, main_output
from torchshrink.recipe.task import Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NORMALIZE = {"none": None, "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
MAX_SAMPLES = 200_000
MAX_ARRAY_ELEMENTS = 1 << 30  # one .npz array (4 GiB as float32): a declared shape is checked before it is read
MAX_IMAGE_PIXELS = 1 << 26  # one image (67 M pixels), read from its header before it is decoded
FORMS = ("package.module:factory, an image folder (CLASS/*.png), a .csv / .npz table, "
         "or a .txt / .jsonl text file")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What ``--data`` or a recipe's ``data:`` block names, and how to split and read it."""

    path: str
    eval_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 32
    calib_batches: int = 4
    normalize: str | None = None  # images: none | imagenet (default: imagenet for torchvision models)
    label_column: str | None = None  # .csv
    text_field: str = "text"  # .jsonl
    max_length: int = 128  # text: tokens per sequence

    @classmethod
    def from_dict(cls, d: Any, where: str = "data") -> DataSpec:
        if isinstance(d, str):
            d = {"path": d}
        if not isinstance(d, dict) or "path" not in d:
            raise ConfigError(f"{where}: give a path (or a mapping with `path:`); accepted: {FORMS}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - allowed)
        if bad:
            raise ConfigError(f"{where}: unknown field {bad[0]!r}; allowed: {', '.join(sorted(allowed))}")
        spec = cls(**d)
        if not isinstance(spec.path, str) or not spec.path:
            raise ConfigError(f"{where}.path must be a non-empty string")
        if not 0.0 < float(spec.eval_fraction) < 1.0:
            raise ConfigError(f"{where}.eval_fraction={spec.eval_fraction!r}: must be between 0 and 1")
        for name in ("batch_size", "calib_batches", "max_length"):
            v = getattr(spec, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{where}.{name}={v!r}: must be a whole number >= 1")
        if spec.normalize is not None and spec.normalize not in NORMALIZE:
            raise ConfigError(f"{where}.normalize={spec.normalize!r}; allowed: {', '.join(NORMALIZE)}")
        return spec


def is_factory(path: str) -> bool:
    return ":" in path and not Path(path).exists() and "/" not in path and "\\" not in path


def task_from_data(spec: DataSpec, model: nn.Module, *, from_file: bool = False) -> Task:
    """The task for ``model`` on the user's data. ``from_file``: the spec came from a recipe file, where
    a ``package.module:factory`` (code) is refused."""
    if is_factory(spec.path):
        if from_file:
            raise ConfigError(f"data: {spec.path!r} names code, which a recipe file may not import; give it as "
                              "--data on the command line instead")
        return _factory_task(spec, model)
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"--data {spec.path}: no such file or folder; accepted: {FORMS}")
    try:
        return _read_task(spec, path, model)
    except UnicodeDecodeError as e:
        raise DataError(f"--data {spec.path} is not UTF-8 text ({e.reason} at byte {e.start:,})") from None


def _read_task(spec: DataSpec, path: Path, model: nn.Module) -> Task:
    if path.is_dir():
        x_tr, y_tr, x_ev, y_ev, how = _images(spec, path, model)
    elif path.suffix.lower() in (".csv", ".npz"):
        x, y = _table(spec, path)
        x_tr, y_tr, x_ev, y_ev, how = _split(spec, x, y, path.name)
    elif path.suffix.lower() in (".txt", ".jsonl"):
        return _text_task(spec, path, model)
    else:
        raise DataError(f"--data {spec.path}: {path.suffix or 'this file'} is not a data format torchshrink reads; "
                        f"accepted: {FORMS}")
    return _tensor_task(spec, model, x_tr, y_tr, x_ev, y_ev, how)


# --------------------------------------------------------------------------- reading


def _labels(values: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Class labels: integers as they are, anything else mapped to 0..K-1 in sorted order."""
    try:
        ints = [int(float(v)) for v in values]
        if all(float(v) == int(float(v)) for v in values):
            return torch.tensor(ints, dtype=torch.long), []
    except ValueError:
        pass
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[v] for v in values], dtype=torch.long), names


def _int_labels(a: np.ndarray, what: str) -> torch.Tensor:
    """Class labels 0..K-1 from an array: integers, or floats that are whole numbers; else one DataError."""
    if a.dtype.kind not in "iub" and not (a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all()):
        raise DataError(f"{what} holds labels of type {a.dtype} that are not class indices (e.g. {a.reshape(-1)[:3]}); "
                        "labels are integers 0..K-1 (leave them out for an output-similarity check)")
    y = torch.from_numpy(a.astype(np.int64))
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{what} holds a negative label ({int(y.min())}); labels are class indices 0..K-1")
    return y


def _table(spec: DataSpec, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    if path.suffix.lower() == ".npz":
        _check_npz_shapes(path)
        try:
            z = np.load(path, allow_pickle=False)  # never unpickles
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise _unreadable_npz(path, e) from None
        if not isinstance(z, np.lib.npyio.NpzFile):  # a single .npy array saved under an .npz name
            raise DataError(f"{path} is one array, not an .npz archive: save it with np.savez(path, x=..., y=...)")
        with z:
            names = list(z.files)
            xk = next((k for k in ("x", "X", "inputs", "data", "features") if k in names), names[0] if names else None)
            if xk is None:
                raise DataError(f"{path} holds no arrays")
            yk = next((k for k in ("y", "Y", "labels", "label", "target", "targets") if k in names and k != xk), None)
            if yk is None and len(names) > 1:
                yk = next(k for k in names if k != xk)
            try:
                x = torch.from_numpy(np.asarray(z[xk], dtype=np.float32))
                y = _int_labels(np.asarray(z[yk]), f"{path} array {yk!r}") if yk is not None else None
            except DataError:
                raise
            except ValueError as e:  # object arrays (refused: no unpickling), strings where numbers belong
                raise DataError(f"{path}: arrays must be numeric ({(str(e).splitlines() or [''])[0][:120]})") from None
        if x.dim() < 2:
            raise DataError(f"{path} array {xk!r} has shape {tuple(x.shape)}: inputs are [samples, features...]")
        if y is not None and len(y) != len(x):
            raise DataError(f"{path}: {len(x):,} inputs ({xk!r}) but {len(y):,} labels ({yk!r})")
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = _at_most(csv.reader(f), MAX_SAMPLES + 1, f"{path} holds more than {MAX_SAMPLES:,} rows; "
                            f"torchshrink reads at most {MAX_SAMPLES:,} samples")
        if len(rows) < 3:
            raise DataError(f"{path} needs a header row and at least two data rows")
        header, body = rows[0], [r for r in rows[1:] if r]
        col = spec.label_column or next((h for h in header if h.strip().lower() in ("label", "target", "y", "class")),
                                        header[-1])
        if col not in header:
            raise DataError(f"{path}: no column {col!r}; columns: {', '.join(header[:20])}")
        j = header.index(col)
        try:
            x = torch.tensor([[float(v) for i, v in enumerate(r) if i != j] for r in body], dtype=torch.float32)
        except ValueError as e:
            raise DataError(f"{path}: every column but the label {col!r} must be numeric ({e})") from None
        y, _ = _labels([r[j] for r in body])
    if len(x) > MAX_SAMPLES:
        raise DataError(f"{path} holds {len(x):,} samples; torchshrink reads at most {MAX_SAMPLES:,}")
    return x, y


def _at_most(items: Iterable[Any], limit: int, message: str) -> list[Any]:
    """The items as a list, refused (one DataError) as soon as there are more than ``limit``: a file is read only
    as far as it can be used."""
    out = []
    for item in items:
        if len(out) >= limit:
            raise DataError(message)
        out.append(item)
    return out


def _check_npz_shapes(path: Path) -> None:
    """Read every array's .npy header in the archive and refuse one whose declared shape is larger than its stored
    bytes or than MAX_ARRAY_ELEMENTS, before numpy allocates it (numpy sizes the array from the header, then fills
    it from the compressed stream: a few kB could otherwise declare terabytes)."""
    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(f, max_header_size=10_000)
                    elif version == (2, 0):
                        shape, _, dtype = npy.read_array_header_2_0(f, max_header_size=10_000)
                    else:  # 3.0: structured arrays with non-Latin-1 field names, never a numeric table
                        raise DataError(f"{path} array {info.filename[:-4]!r} is a .npy {version[0]}.{version[1]} "
                                        "record array; inputs and labels are plain numeric arrays")
                count = 1
                for d in shape:
                    count *= int(d)
                if count > MAX_ARRAY_ELEMENTS or count * dtype.itemsize > info.file_size:
                    raise DataError(f"{path} array {info.filename[:-4]!r} declares shape {tuple(shape)} ({count:,} "
                                    f"values) with {info.file_size:,} bytes stored; at most {MAX_ARRAY_ELEMENTS:,} "
                                    "values per array, backed by the file")
    except zipfile.BadZipFile:
        return  # not an archive: np.load reads it (a lone .npy) or says what it is
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise _unreadable_npz(path, e) from None


def _unreadable_npz(path: Path, e: BaseException) -> DataError:
    return DataError(f"{path} is not a readable .npz archive of numeric arrays ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0][:120]})")


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    inp = state.get(model, "input")
    shape = list(inp["shape"]) if inp and inp.get("kind") != "tokens" else []
    if len(shape) != 4:
        raise DataError("an image folder needs the model's input size: give --input-shape 1,C,H,W")
    return int(shape[1]), int(shape[2]), int(shape[3])


def _read_image_folder(root: Path, size: tuple[int, int, int], classes: list[str] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders (ImageFolder layout: {root}/CLASS/image.png)")
    c, h, w = size
    xs, ys = [], []
    for k, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for p in files:
            if len(xs) >= MAX_SAMPLES:
                raise DataError(f"{root} holds more than {MAX_SAMPLES:,} images")
            try:
                with Image.open(p) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise DataError(f"{p} is {im.width}x{im.height} pixels; images of at most "
                                        f"{MAX_IMAGE_PIXELS:,} pixels are read (resize it first)")
                    im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, Image.DecompressionBombError) as e:
                raise DataError(f"{p} is not a readable image ({e})") from None
            xs.append(torch.from_numpy(a.reshape(h, w, -1)).permute(2, 0, 1).contiguous())
            ys.append(k)
    if not xs:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), classes


def _images(spec: DataSpec, root: Path, model: nn.Module) -> tuple[Any, Any, Any, Any, str]:
    size = _image_shape(model)
    norm = spec.normalize or ("imagenet" if str(state.get(model, "source", "")).startswith("torchvision:") else "none")
    held = next((root / n for n in ("val", "test", "valid", "validation") if (root / n).is_dir()), None)
    if held is not None and (root / "train").is_dir():
        x_tr, y_tr, classes = _read_image_folder(root / "train", size)
        x_ev, y_ev, _ = _read_image_folder(held, size, classes)
        how = f"{root.name}/{held.name} ({len(x_ev)} images; trained / calibrated on {root.name}/train)"
    else:
        x, y, _ = _read_image_folder(root, size)
        x_tr, y_tr, x_ev, y_ev, how = _split(spec, x, y, root.name)
    stats = NORMALIZE[norm]
    if stats is not None:
        mean, std = (torch.tensor(v[: size[0]]).reshape(1, -1, 1, 1) for v in stats)
        x_tr, x_ev = (x_tr - mean) / std, (x_ev - mean) / std
    return x_tr, y_tr, x_ev, y_ev, f"{how}; images {size[1]}x{size[2]}, normalize {norm}"


def _held_out(spec: DataSpec, n: int, name: str, unit: str = "samples") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(evaluation indices, training indices, how they were drawn): the seeded split every form uses."""
    n_eval = int(round(n * spec.eval_fraction))
    if n_eval < 1 or n - n_eval < 1:
        raise DataError(f"{name} holds {n} {unit}: too few to hold {spec.eval_fraction:.0%} out for evaluation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
    how = f"the held-out {spec.eval_fraction:.0%} of {name} ({n_eval} of {n} {unit}, split seed {spec.seed})"
    return order[:n_eval], order[n_eval:], how


def _split(spec: DataSpec, x: torch.Tensor, y: torch.Tensor | None, name: str) -> tuple[Any, Any, Any, Any, str]:
    ev, tr, how = _held_out(spec, len(x), name)
    return x[tr], (y[tr] if y is not None else None), x[ev], (y[ev] if y is not None else None), how


# --------------------------------------------------------------------------- tasks


def _batches(x: torch.Tensor, y: torch.Tensor | None, size: int) -> list[Any]:
    return [(x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size] for i in range(0, len(x), size)]


def _is_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> bool:
    try:
        with torch.inference_mode():
            out = main_output(model.eval()(x[:2]))
    except Exception as e:  # noqa: BLE001 - the user's model on the user's data: whatever it raises is one line
        raise DataError(f"the model cannot run on the data's inputs (each of shape {tuple(x.shape[1:])}): "
                        f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    if y is None:
        return False
    return out.dim() == 2 and out.shape[1] > int(y.max())


def _tensor_task(spec: DataSpec, model: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor | None,
                 x_ev: torch.Tensor, y_ev: torch.Tensor | None, how: str) -> Task:
    train = _batches(x_tr, y_tr, spec.batch_size)
    calib = [b[0] if isinstance(b, tuple) else b for b in train[: spec.calib_batches]]
    held = _batches(x_ev, y_ev, spec.batch_size)
    inputs = (x_ev[: min(spec.batch_size, len(x_ev))],)
    n_calib = sum(len(c) for c in calib)
    if _is_classifier(model, x_ev, y_ev):
        quality, primary = (lambda m, ref: {"accuracy": accuracy(m, held)}), "accuracy"
        what = f"top-1 accuracy on {how}"
    else:
        unlabelled = [b[0] if isinstance(b, tuple) else b for b in held]
        quality = lambda m, ref: {k: v for k, v in fidelity(m, ref, unlabelled).items() if k.startswith("cosine")}  # noqa: E731
        primary, what = "cosine_mean", f"output cosine vs the original on {how}"
    return Task(name=f"data:{Path(spec.path).name}", inputs=inputs, train=train if y_tr is not None else None,
                calibration=calib, quality=quality, primary=primary,
                provenance={"quality": what, "calibration": f"{n_calib} training samples ({len(calib)} batches)",
                            "train": f"{len(x_tr)} samples" if y_tr is not None else "none (no labels)"})


def _factory_task(spec: DataSpec, model: nn.Module) -> Task:
    from torchshrink.models import import_factory

    made = import_factory(spec.path, "data spec", f"accepted: {FORMS}")()
    if isinstance(made, Task):
        return made
    if not isinstance(made, dict) or "eval" not in made:
        raise DataError(f"{spec.path} must return a torchshrink Task or a dict with `eval` (and optionally "
                        f"`train`, `calibration`, `metric`); it returned {type(made).__name__}")
    from torchshrink.core.data import as_batches

    held = list(made["eval"])
    train = made.get("train")
    calib = made.get("calibration") or ([b.inputs[0] if len(b.inputs) == 1 and not b.kwargs else b
                                         for b in as_batches(train, limit=spec.calib_batches)] if train else None)
    if calib is None:
        raise DataError(f"{spec.path}: give `calibration` or `train` batches (calibration never uses `eval`)")
    metric = made.get("metric", "accuracy" if next(as_batches(held, limit=1)).labels is not None else "cosine")
    if callable(metric):
        quality: Callable[[nn.Module, nn.Module], dict[str, float]] = lambda m, ref: dict(metric(m, ref, held))  # noqa: E731
        primary = next(iter(metric(model, model, held)), "metric")
    elif metric == "accuracy":
        quality, primary = (lambda m, ref: {"accuracy": accuracy(m, held)}), "accuracy"
    elif metric == "cosine":
        quality = lambda m, ref: {k: v for k, v in fidelity(m, ref, held).items() if k.startswith("cosine")}  # noqa: E731
        primary = "cosine_mean"
    else:
        raise DataError(f"{spec.path}: metric={metric!r}; allowed: accuracy, cosine, or a function")
    first = next(as_batches(held, limit=1))
    n_eval = sum(b.size for b in as_batches(held))
    return Task(name=f"data:{spec.path}", inputs=tuple(first.inputs), train=train, calibration=calib,
                quality=quality, primary=primary,
                provenance={"quality": f"{primary} on the `eval` batches of {spec.path} ({n_eval} samples)",
                            "calibration": f"{len(calib)} batches from {spec.path}",
                            "train": f"`train` of {spec.path}" if train is not None else "none"})


def _tokenizer(model: nn.Module) -> Any:
    source = str(state.get(model, "source", ""))
    if source == "zoo:minilm":
        from torchshrink.zoo.minilm import minilm_tokenizer

        return minilm_tokenizer()
    if source.startswith("hf:"):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source[3:], local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise DataError(f"the model folder {source[3:]} has no usable tokenizer ({type(e).__name__})") from None
    raise DataError("a text file needs a text model with a tokenizer (a Hugging Face folder or zoo:minilm)")


def _text_task(spec: DataSpec, path: Path, model: nn.Module) -> Task:
    if path.suffix.lower() == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i + 1} is not JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get(spec.text_field), str):
                        raise DataError(f"{path}:{i + 1} has no string field {spec.text_field!r}")
                    texts.append(rec[spec.text_field])
                    if len(texts) > MAX_SAMPLES:
                        break
    else:
        with open(path, encoding="utf-8") as f:
            texts = _at_most((t.strip() for t in f if t.strip()), MAX_SAMPLES, f"{path} holds more than "
                             f"{MAX_SAMPLES:,} texts; torchshrink reads at most {MAX_SAMPLES:,}")
    if len(texts) > MAX_SAMPLES:
        raise DataError(f"{path} holds more than {MAX_SAMPLES:,} texts; torchshrink reads at most {MAX_SAMPLES:,}")
    ev_idx, tr_idx, how = _held_out(spec, len(texts), path.name, "texts")
    ev, tr = [texts[i] for i in ev_idx.tolist()], [texts[i] for i in tr_idx.tolist()]
    tok = _tokenizer(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or spec.max_length
    length = min(spec.max_length, int(limit))

    def enc(chunk: list[str]) -> dict[str, torch.Tensor]:
        e = tok(chunk, padding=True, truncation=True, max_length=length, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    def batches(items: list[str]) -> list[dict[str, torch.Tensor]]:
        return [enc(items[i:i + spec.batch_size]) for i in range(0, len(items), spec.batch_size)]

    train, held = batches(tr), batches(ev)
    calib = train[: spec.calib_batches]
    first = held[0]
    return Task(name=f"data:{path.name}", inputs=(first["input_ids"], first["attention_mask"]), train=train,
                calibration=calib,
                quality=lambda m, ref: {k: v for k, v in fidelity(m, ref, held).items() if k.startswith("cosine")},
                primary="cosine_mean",
                provenance={"quality": f"output cosine vs the original on {how}",
                            "calibration": f"{sum(len(b['input_ids']) for b in calib)} training texts",
                            "train": f"{len(tr)} texts (distillation from the original)"})
