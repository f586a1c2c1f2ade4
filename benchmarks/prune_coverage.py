"""Coverage of structured pruning outside the tested set (#19): every torchvision classification
model pruned to 30% fewer channels, and Hugging Face architectures built from small configs (their
head classes included) x {heads, FFN neurons, layers}. Each case either prunes -- forward runs, same
output shape, fewer MACs / parameters, and ``ts.save`` -> ``ts.load`` in ANOTHER process gives the
same outputs -- or refuses with one line. A model that prunes but fails any of those is "broken";
the target is none. HF cases also try transformers' own ``from_pretrained`` on ``save_pretrained``.

Run: flock /tmp/torchshrink-bench.lock .venv/bin/python benchmarks/prune_coverage.py [--check]
Input: 64x64 (the smallest size most models take) to fit the time; models that need more
(ViT/Swin/MaxViT and the like) use their required size.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
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
from torchshrink.core.errors import TorchshrinkError  # noqa: E402
from torchshrink.measure.bench import Target, markdown_table, write_results  # noqa: E402
from torchshrink.measure.quality import main_output  # noqa: E402
from torchshrink.prune.structured import ChannelPruneConfig, FfnPruneConfig, HeadPruneConfig, LayerDropConfig  # noqa: E402
from torchshrink.prune.structured.channel import batch_macs  # noqa: E402
from torchshrink.prune.structured.trace import call_model  # noqa: E402

OUT = Path(__file__).parent / "results"
SIZE = {"vit": 224, "swin": 224, "maxvit": 224, "inception": 96, "googlenet": 64, "regnet_y_128gf": 64}

WORKER = r"""
import json, sys, torch, logging, warnings
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING); torch.set_num_threads(1)
import torchshrink
from torchshrink.measure.quality import main_output
from torchshrink.prune.structured.trace import call_model
for line in sys.stdin:
    d = json.loads(line)["dir"]
    try:
        m = torchshrink.load(d + "/model")
        chk = torch.load(d + "/check.pt", weights_only=True)
        with torch.no_grad():
            out = main_output(call_model(m, chk["batch"]))
        ref = chk["out"]
        diff = float((out - ref).abs().max()) if out.shape == ref.shape else float("inf")
        print(json.dumps({"reload_exact": diff <= 1e-5 * max(1.0, float(ref.abs().max())), "reload_diff": diff}), flush=True)
    except Exception as e:
        print(json.dumps({"reload_exact": False, "reload_error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}), flush=True)
"""


class Reloader:
    """A separate Python process that loads each saved model with ts.load and compares its outputs
    with the ones the pruning process saw (it never imported or built the pruned model)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def check(self, model: torch.nn.Module, batch, out: torch.Tensor) -> dict:
        d = tempfile.mkdtemp(prefix="ts-coverage-")
        try:
            torchshrink.save(model, Path(d) / "model")
            torch.save({"batch": batch, "out": out}, Path(d) / "check.pt")
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps({"dir": d}) + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())
        except Exception as e:  # a save failure is a row of the table
            return {"reload_exact": False, "reload_error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _size(name: str) -> int:
    for k, v in SIZE.items():
        if name.startswith(k):
            return v
    return 64


def _outcome(row: dict, e: Exception | None = None) -> None:
    """pruned (all checks hold) | refused (one-line torchshrink error) | broken (anything else)."""
    if e is not None:
        one_line = isinstance(e, TorchshrinkError) and "\n" not in str(e)
        row["outcome"] = "refused" if one_line else "broken"
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        return
    ok = row.get("shape_ok") and row.get("smaller") and row.get("reload_exact")
    row["outcome"] = "pruned" if ok else "broken"


def vision_rows(limit: int | None, reloader: Reloader) -> list[dict]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names[:limit]:
        t0 = time.perf_counter()
        row: dict = {"model": name, "input": _size(name)}
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
            row["smaller"] = row["macs_ratio"] < 0.999
            rep = torchshrink.report(p)[-1].notes
            row["groups_pruned"] = rep["pruned_groups"]
            row["groups_unpruned"] = len(rep["unpruned"])
            row["rolled_back"] = [f"{', '.join(r['layers'][:2])}: {r['reason'][:100]}" for r in rep["rolled_back"]]
            row.update(reloader.check(p, x, out))
            _outcome(row)
        except Exception as e:  # a failure is a row of the table, not the end of the run
            _outcome(row, e)
            if row["outcome"] == "broken":
                traceback.print_exc(limit=2)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _hf_archs() -> dict:
    import transformers as tf

    tok = {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))}
    s2s = {**tok, "decoder_input_ids": tok["input_ids"][:, :8]}
    small = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    dec = dict(small, max_position_embeddings=64)
    return {
        "bert (SequenceClassification)": (lambda: tf.BertForSequenceClassification(tf.BertConfig(**small)), tok),
        "roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(**small)), tok),
        "distilbert": (lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=4, n_heads=4, hidden_dim=128, vocab_size=100)), tok),
        "albert (shared layers)": (lambda: tf.AlbertModel(tf.AlbertConfig(embedding_size=32, **small)), tok),
        "electra": (lambda: tf.ElectraModel(tf.ElectraConfig(embedding_size=32, **small)), tok),
        "gpt2 (LMHead)": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=100)), tok),
        "opt (CausalLM)": (lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                                   ffn_dim=128, vocab_size=100, word_embed_proj_dim=64)), tok),
        "llama-gqa (CausalLM)": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**dict(dec, num_attention_heads=8, num_key_value_heads=2))), tok),
        "qwen2 (CausalLM)": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**dict(dec, num_key_value_heads=2))), tok),
        "mistral (CausalLM)": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**dict(dec, num_key_value_heads=2))), tok),
        "gemma (CausalLM)": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**dict(dec, num_key_value_heads=2, head_dim=16))), tok),
        "phi (CausalLM)": (lambda: tf.PhiForCausalLM(tf.PhiConfig(**dec)), tok),
        "gpt-neox (CausalLM, fused qkv)": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**dec)), tok),
        "t5 (ConditionalGeneration)": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=100, d_model=64, d_ff=128, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=16)), s2s),
        "bart (ConditionalGeneration)": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=100, d_model=64, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)), s2s),
        "vit (ImageClassification)": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
            **dict(small, vocab_size=None), image_size=32, patch_size=8)), {"pixel_values": torch.randn(2, 3, 32, 32)}),
    }


def hf_rows(reloader: Reloader) -> list[dict]:
    rows = []
    for arch, (make, batch) in _hf_archs().items():
        torch.manual_seed(0)
        m = make().eval()
        with torch.no_grad():
            ref = main_output(call_model(m, batch))
        for cfg in (HeadPruneConfig(amount=0.5), FfnPruneConfig(amount=0.5), LayerDropConfig(amount=0.5)):
            row: dict = {"model": arch, "unit": cfg.kind}
            try:
                p = torchshrink.prune(m, cfg, data=[batch])
                with torch.no_grad():
                    out = main_output(call_model(p, batch))
                row["shape_ok"] = out.shape == ref.shape
                row["params_ratio"] = sum(x.numel() for x in p.parameters()) / sum(x.numel() for x in m.parameters())
                row["smaller"] = row["params_ratio"] < 1
                row.update(reloader.check(p, batch, out))
                with tempfile.TemporaryDirectory() as d:
                    p.save_pretrained(d, torchshrink_loader=True)
                    try:
                        native = type(m).from_pretrained(d).eval()
                        with torch.no_grad():
                            same = torch.allclose(main_output(call_model(native, batch)), out, atol=1e-5)
                        row["native_from_pretrained"] = "exact" if same else "loads, outputs differ"
                    except Exception as e:
                        row["native_from_pretrained"] = f"no ({type(e).__name__})"
                _outcome(row)
            except Exception as e:
                _outcome(row, e)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _count(rows: list[dict], outcome: str) -> int:
    return sum(r["outcome"] == outcome for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--skip-vision", action="store_true", help="HF part only (the vision rows of the last run are kept)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    out_dir = Path(args.out)
    reloader = Reloader()
    try:
        hf = hf_rows(reloader)
        if args.skip_vision:
            vision = json.loads((out_dir / "prune_coverage.json").read_text())["vision"]
        else:
            vision = vision_rows(args.limit, reloader)
    finally:
        reloader.close()
    nv, nh = max(len(vision), 1), max(len(hf), 1)
    pruned_v = [r for r in vision if r["outcome"] == "pruned"]
    rolled = [r for r in vision if r.get("rolled_back")]
    hf_pruned = [r for r in hf if r["outcome"] == "pruned"]
    native_eligible = [r for r in hf_pruned if r["unit"] != "head-prune"]
    targets = [
        Target("torchvision models silently broken (pruned but fails forward / shape / reload)", _count(vision, "broken"),
               "<=", 0, "", f"{len(vision)} models; {len(rolled)} with groups rolled back by the check"),
        Target("torchvision models pruned (forward, same shape, fewer MACs, exact reload in another process)",
               100 * len(pruned_v) / nv, ">=", 95.0, "%", f"{len(pruned_v)}/{len(vision)}; the rest refused in one line"),
        Target("HF cases silently broken", _count(hf, "broken"), "<=", 0, "",
               f"{len(_hf_archs())} architectures x heads / FFN / layers = {len(hf)} cases"),
        Target("HF cases pruned with exact reload in another process (ts.load)", 100 * len(hf_pruned) / nh, ">=", 90.0,
               "%", f"{len(hf_pruned)}/{len(hf)}; the rest refused in one line"),
        Target("HF FFN / layer cases that also load exactly with transformers' own from_pretrained",
               100 * sum(r.get("native_from_pretrained") == "exact" for r in native_eligible) / max(len(native_eligible), 1),
               ">=", 100.0, "%", f"of {len(native_eligible)} pruned FFN / layer cases (head-pruned models of classes that "
               "derive head size from hidden size / heads cannot be described by their config)"),
    ]
    vision_md = [[r["model"], r["outcome"], f"{r.get('macs_ratio', float('nan')):.3f}", r.get("groups_pruned", ""),
                  r.get("groups_unpruned", ""), "yes" if r.get("reload_exact") else r.get("reload_error", "no"),
                  "; ".join(r.get("rolled_back", [])) or r.get("error", "")] for r in vision]
    hf_md = [[r["model"], r["unit"], r["outcome"], f"{r.get('params_ratio', float('nan')):.3f}",
              "yes" if r.get("reload_exact") else r.get("reload_error", ""), r.get("native_from_pretrained", ""),
              r.get("error", "")] for r in hf]
    tables = {
        "Method": "channel-prune amount=0.3 (local, l1) on every torchvision classification model, batch 1, 64x64 input "
                  "(224 for ViT/Swin/MaxViT, 96 for Inception) to fit the time; head-prune / ffn-prune / layer-drop at "
                  "0.5 on Hugging Face architectures built from small configs (random weights, one calibration batch). "
                  "Reload: ts.save here, ts.load in a separate Python process, max |difference| of the outputs <= 1e-5 x "
                  "max(1, |output|). 'pruned' = forward runs, output shape unchanged, fewer MACs (vision) / parameters "
                  "(HF), exact reload; 'refused' = one-line torchshrink error; 'broken' = anything else.",
        f"torchvision: {len(pruned_v)}/{len(vision)} pruned, {_count(vision, 'refused')} refused, "
        f"{_count(vision, 'broken')} broken": markdown_table(
            ["model", "outcome", "MACs ratio", "groups pruned", "groups left", "reload exact", "rolled back / error"], vision_md),
        f"Hugging Face: {len(hf_pruned)}/{len(hf)} pruned, {_count(hf, 'refused')} refused, {_count(hf, 'broken')} broken":
            markdown_table(["HF arch", "unit", "outcome", "params ratio", "ts.load in another process exact",
                            "transformers from_pretrained", "refusal"], hf_md),
    }
    ok = write_results("prune_coverage", targets, tables, {"vision_pass_rate": len(pruned_v) / nv, "vision": vision, "hf": hf}, out_dir)
    print("\n".join(f"{'PASS' if t.passed else 'FAIL'}: {t.name} ({t.value:.1f})" for t in targets))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
