"""Coverage of structured pruning: every torchvision classification model pruned to 30% fewer
channels (forward runs, output shape unchanged, MACs reduced), and Hugging Face architectures
built from small configs (head / FFN / layer pruning + save_pretrained/from_pretrained).

Run: flock /tmp/torchshrink-bench.lock .venv/bin/python benchmarks/prune_coverage.py [--check]
Input: 64x64 (the smallest size most models take) to fit the time; models that need more
(ViT/Swin/MaxViT and the like) use their required size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
torch.set_num_threads(1)  # no timing here; leave the other core to other work

import torchshrink  # noqa: E402
from torchshrink.measure.bench import Target, markdown_table, write_results  # noqa: E402
from torchshrink.prune.structured import (  # noqa: E402
    ChannelPruneConfig,
    FfnPruneConfig,
    HeadPruneConfig,
    LayerDropConfig,
    from_pretrained,
)
from torchshrink.prune.structured.channel import batch_macs  # noqa: E402

OUT = Path(__file__).parent / "results"
SIZE = {"vit": 224, "swin": 224, "maxvit": 224, "inception": 96, "googlenet": 64, "regnet_y_128gf": 64}


def _size(name: str) -> int:
    for k, v in SIZE.items():
        if name.startswith(k):
            return v
    return 64


def vision_rows(limit: int | None) -> list[dict]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names[:limit]:
        t0 = time.perf_counter()
        row = {"model": name, "input": _size(name)}
        try:
            m = torchvision.models.get_model(name, weights=None).eval()
            x = torch.randn(1, 3, row["input"], row["input"])
            with torch.no_grad():
                ref = m(x)
            p = torchshrink.prune(m, ChannelPruneConfig(amount=0.3), data=[x])
            with torch.no_grad():
                out = p(x)
            row["shape_ok"] = out.shape == ref.shape
            row["macs_ratio"] = batch_macs(p, x) / batch_macs(m, x)
            rep = torchshrink.report(p)[-1].notes
            row["groups_pruned"] = rep["pruned_groups"]
            row["groups_unpruned"] = len(rep["unpruned"])
            row["pass"] = bool(row["shape_ok"] and row["macs_ratio"] < 0.999)
        except Exception as e:  # a failure is a row of the table, not the end of the run
            row["pass"] = False
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            traceback.print_exc(limit=2)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def hf_rows() -> list[dict]:
    import transformers as tf

    tok = {"input_ids": torch.randint(0, 100, (2, 16))}
    archs = {
        "bert": (lambda: tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=100)), tok),
        "gpt2": (lambda: tf.GPT2Model(tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=100)), tok),
        "llama-gqa": (lambda: tf.LlamaModel(tf.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128, vocab_size=100)), tok),
        "vit": (lambda: tf.ViTModel(tf.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)), {"pixel_values": torch.randn(2, 3, 32, 32)}),
    }
    rows = []
    for arch, (make, batch) in archs.items():
        torch.manual_seed(0)
        m = make().eval()
        ref = m(**batch).last_hidden_state
        for cfg in (HeadPruneConfig(amount=0.5), FfnPruneConfig(amount=0.5), LayerDropConfig(amount=0.5)):
            row = {"model": arch, "unit": cfg.kind}
            try:
                p = torchshrink.prune(m, cfg, data=[batch])
                out = p(**batch).last_hidden_state
                with tempfile.TemporaryDirectory() as d:
                    p.save_pretrained(d)
                    try:
                        native = type(m).from_pretrained(d).eval()
                        row["native_from_pretrained"] = bool(torch.allclose(native(**batch).last_hidden_state, out, atol=1e-5))
                    except Exception as e:
                        row["native_from_pretrained"] = f"no ({type(e).__name__})"
                    back = from_pretrained(d)
                    row["roundtrip"] = bool(torch.allclose(back(**batch).last_hidden_state, out, atol=1e-5))
                row["params_ratio"] = sum(x.numel() for x in p.parameters()) / sum(x.numel() for x in m.parameters())
                row["pass"] = bool(out.shape == ref.shape and row["roundtrip"] and row["params_ratio"] < 1)
            except Exception as e:
                row["pass"], row["error"] = False, f"{type(e).__name__}: {e}"[:200]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    vision = vision_rows(args.limit)
    hf = hf_rows()
    rate = sum(r["pass"] for r in vision) / max(len(vision), 1)
    hf_ok = sum(r["pass"] for r in hf) / max(len(hf), 1)
    targets = [
        Target("torchvision classification models pruned 30% (runs, same output shape, fewer MACs): pass rate",
               100 * rate, ">=", 95.0, "%", f"{sum(r['pass'] for r in vision)}/{len(vision)} models"),
        Target("HF head/FFN/layer pruning + save_pretrained round trip: pass rate", 100 * hf_ok, ">=", 100.0, "%",
               f"{sum(r['pass'] for r in hf)}/{len(hf)} cases"),
    ]
    vision_rows_md = [[r["model"], "yes" if r["pass"] else "NO", f"{r.get('macs_ratio', float('nan')):.3f}",
                       r.get("groups_pruned", ""), r.get("groups_unpruned", ""), r.get("error", "")] for r in vision]
    hf_rows_md = [[r["model"], r["unit"], "yes" if r["pass"] else "NO", f"{r.get('params_ratio', float('nan')):.3f}",
                   r.get("roundtrip", r.get("error", "")), r.get("native_from_pretrained", "")] for r in hf]
    tables = {
        "Method": "channel-prune amount=0.3 (local, l1) on every torchvision classification model, batch 1, "
                  "64x64 input (224 for ViT/Swin/MaxViT, 96 for Inception) to fit the time.",
        f"torchvision: {rate:.1%} pass": markdown_table(
            ["model", "pass", "MACs ratio", "groups pruned", "groups left", "error"], vision_rows_md),
        "Hugging Face architectures built from a config": markdown_table(
            ["HF arch", "unit", "pass", "params ratio", "torchshrink from_pretrained", "transformers from_pretrained"],
            hf_rows_md),
    }
    ok = write_results("prune_coverage", targets, tables, {"vision_pass_rate": rate, "vision": vision, "hf": hf}, OUT)
    print("\n".join(f"{'PASS' if t.passed else 'FAIL'}: {t.name} ({t.value:.1f})" for t in targets))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
