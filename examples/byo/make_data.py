"""Write the walkthrough's data from scikit-learn's bundled sets (nothing is downloaded):

- data/images/CLASS/*.png: 3x32x32 colour images made from scikit-learn's digits, upscaled, tinted,
  shifted and noised (a harder task than the 8x8 digits torchshrink's zoo trains on);
- data/wine.csv: the wine table (13 numeric features, standardized, and a `label` column).
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_wine

OUT = Path(__file__).resolve().parent / "data"


def images(rng: np.random.Generator) -> None:
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        small = Image.fromarray((img / 16.0 * 255).astype(np.uint8)).resize((24, 24), Image.BILINEAR)
        canvas = np.zeros((32, 32), dtype=np.float32)
        dy, dx = rng.integers(0, 9, size=2)
        canvas[dy:dy + 24, dx:dx + 24] = np.asarray(small, dtype=np.float32) / 255.0
        tint = rng.uniform(0.4, 1.0, size=3)
        rgb = canvas[None] * tint[:, None, None] + rng.normal(0, 0.08, size=(3, 32, 32))
        rgb = (np.clip(rgb, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        folder = OUT / "images" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:04d}.png")


def table() -> None:
    w = load_wine()
    x = (w.data - w.data.mean(0)) / w.data.std(0)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "wine.csv", "w") as f:
        f.write(",".join([n.replace(",", " ") for n in w.feature_names] + ["label"]) + "\n")
        for row, label in zip(x, w.target, strict=True):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")


if __name__ == "__main__":
    images(np.random.default_rng(0))
    table()
    print(f"wrote {OUT}/images (1797 images, 10 classes) and {OUT}/wine.csv (178 rows, 3 classes)")
