"""Recovery of a damaged causal LM by distillation from its teacher (torchshrink.llm.recover.distill_lm), on
tiny Llama configs (no download)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import ConfigError, DataError, ModelLoadError
from torchshrink.llm.recover import distill_lm

tf = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
ROW = 16


def _llama(**over):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY, **over})).eval()


def _rows(n=16, length=ROW, seed=2):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


HELD = _rows(4, seed=3)


def _noisy(teacher, std=0.05, seed=1):
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in student.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * std)
    return student


def _kl(teacher, student, rows=HELD):
    """KL(teacher || student) per token on ``rows``."""
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=rows, use_cache=False).logits.float(), -1)
        s = F.log_softmax(student(input_ids=rows, use_cache=False).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _ppl(model, rows=HELD):
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=rows, use_cache=False).logits[:, :-1].float(), -1)
    return math.exp(-float(logp.gather(-1, rows[:, 1:, None]).mean()))


def _decoder_linears(model):
    return [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]


def test_distill_moves_a_perturbed_student_toward_the_teacher():
    teacher = _llama()
    student = _noisy(teacher)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = _kl(teacher, student)
    assert before > 1e-3
    rep = distill_lm(student, teacher, _rows(), steps=30, lr=1e-3, batch=2, autocast=False)
    after = _kl(teacher, student)
    assert after < 0.7 * before, (before, after)
    assert math.isfinite(rep["loss"]) and rep["loss"] >= 0
    assert rep["autocast_bf16"] is False and rep["batch"] == 2 and rep["lr"] == 1e-3
    # the teacher is untouched, and the student's train / grad flags are restored
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert not student.training and not teacher.training
    assert all(p.requires_grad for p in student.parameters())


def test_distill_is_deterministic_for_a_seed():
    teacher = _llama()
    a, b = _noisy(teacher), _noisy(teacher)
    ra = distill_lm(a, teacher, _rows(), steps=5, lr=1e-3, batch=2, autocast=False, seed=7)
    rb = distill_lm(b, teacher, _rows(), steps=5, lr=1e-3, batch=2, autocast=False, seed=7)
    assert ra["loss"] == rb["loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_zeros_stay_zeros():
    teacher = _llama()
    student = _noisy(teacher)
    g = torch.Generator().manual_seed(4)
    masks = {}
    with torch.no_grad():
        for name, lin in _decoder_linears(student):
            keep = torch.rand(lin.weight.shape, generator=g) >= 0.5
            lin.weight.mul_(keep)
            masks[name] = (lin.weight == 0).clone()
            assert 0.4 < float(masks[name].float().mean()) < 0.6
    before = {name: lin.weight.detach().clone() for name, lin in _decoder_linears(student)}
    rep = distill_lm(student, teacher, _rows(), steps=5, lr=1e-3, batch=2, autocast=False)
    assert rep["kept_zeros"] == len(masks) == 2 * 7  # q k v o gate up down, two layers
    changed = 0
    for name, lin in _decoder_linears(student):
        w = lin.weight.detach()
        assert torch.equal(w == 0, masks[name]), name  # exactly the same zeros, no new ones, none revived
        changed += int((w != before[name]).sum())
    assert changed > 0.5 * sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("tie", [False, True])
def test_embeddings_frozen_by_default(tie):
    teacher = _llama(tie_word_embeddings=tie)
    student = _noisy(teacher)
    with torch.no_grad():  # move the embeddings too, so there is something to learn there
        student.model.embed_tokens.weight.add_(torch.randn(student.model.embed_tokens.weight.shape,
                                                           generator=torch.Generator().manual_seed(5)) * 0.05)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    emb = student.model.embed_tokens.weight.detach().clone()
    head = student.lm_head.weight.detach().clone()
    q = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    distill_lm(student, teacher, _rows(), steps=3, lr=1e-3, batch=2, autocast=False)
    assert torch.equal(student.model.embed_tokens.weight, emb)
    assert torch.equal(student.lm_head.weight, head) == tie  # an untied head trains, a tied one is frozen
    assert not torch.equal(student.model.layers[0].self_attn.q_proj.weight, q)
    assert student.model.embed_tokens.weight.requires_grad  # restored afterwards

    distill_lm(student, teacher, _rows(), steps=3, lr=1e-3, batch=2, autocast=False, freeze_embeddings=False)
    assert not torch.equal(student.model.embed_tokens.weight, emb)


def test_report_steps_tokens_and_curve():
    teacher = _llama()
    student = _noisy(teacher)
    seen, logged = [], []

    def evaluate(model):
        assert not model.training  # evaluated in eval mode
        seen.append(1)
        return _ppl(model)

    n, batch = 23, 2
    rep = distill_lm(student, teacher, _rows(), steps=n, lr=1e-3, batch=batch, autocast=False, evaluate=evaluate,
                     eval_every=10, log=logged.append)
    assert rep["steps"] == n and rep["tokens"] == n * batch * ROW
    curve = rep["curve"]
    assert [p["step"] for p in curve] == [0, 10, 20, 23]
    assert [p["tokens"] for p in curve] == [0, 10 * batch * ROW, 20 * batch * ROW, n * batch * ROW]
    assert len(seen) == 4 and logged == curve
    assert curve[0]["metric"] == pytest.approx(_ppl(_noisy(teacher)), rel=1e-6)  # the start, before training
    assert curve[-1]["metric"] == pytest.approx(_ppl(student), rel=1e-6)  # the end
    assert all(math.isfinite(p["metric"]) and p["seconds"] >= 0 for p in curve)

    # when the last step is an eval step, the end point is not repeated
    rep = distill_lm(_noisy(teacher), teacher, _rows(), steps=20, lr=1e-3, batch=batch, autocast=False,
                     evaluate=evaluate, eval_every=10)
    assert [p["step"] for p in rep["curve"]] == [0, 10, 20]
    # no evaluate: no curve
    assert distill_lm(_noisy(teacher), teacher, _rows(), steps=2, batch=batch, autocast=False)["curve"] == []


def test_depth_pruned_student_with_hidden_term():
    teacher = _llama()
    student = copy.deepcopy(teacher)
    del student.model.layers[1]
    student.config.num_hidden_layers = 1
    assert len(student.model.layers) == 1
    before = _kl(teacher, student)
    rep = distill_lm(student, teacher, _rows(), steps=20, lr=1e-3, batch=2, autocast=False, hidden_weight=1.0)
    assert rep["steps"] == 20 and rep["hidden_weight"] == 1.0 and math.isfinite(rep["loss"])
    assert _kl(teacher, student) < before


def test_hidden_term_reads_the_normed_stream_the_head_reads():
    # the cosine term compares hidden_states[-1]: it must be what lm_head consumes (after the final norm)
    m = _llama()
    with torch.no_grad():
        out = m(input_ids=HELD, use_cache=False, output_hidden_states=True)
    assert torch.allclose(m.lm_head(out.hidden_states[-1]), out.logits, atol=1e-6)


def test_hidden_and_label_terms_add_to_the_loss():
    teacher = _llama()
    kw = dict(steps=1, lr=0.0, batch=2, autocast=False)
    plain = distill_lm(_noisy(teacher), teacher, _rows(), **kw)["loss"]
    hidden = distill_lm(_noisy(teacher), teacher, _rows(), hidden_weight=1.0, **kw)["loss"]
    label = distill_lm(_noisy(teacher), teacher, _rows(), label_weight=1.0, **kw)["loss"]
    assert hidden > plain and label > plain + 3  # next-token CE of ~uniform 64-way logits is about ln 64 = 4.2
    # the identical student has zero KL loss
    assert distill_lm(copy.deepcopy(teacher), teacher, _rows(), **kw)["loss"] == pytest.approx(0.0, abs=1e-6)


def test_refusals():
    teacher = _llama()
    student = copy.deepcopy(teacher)
    rows = _rows()
    with pytest.raises(DataError, match="integer tensor of shape"):
        distill_lm(student, teacher, rows.float(), steps=1)
    with pytest.raises(DataError, match="integer tensor of shape"):
        distill_lm(student, teacher, torch.tensor([1, 2, 3]), steps=1)
    with pytest.raises(DataError, match="integer tensor of shape"):
        distill_lm(student, teacher, rows.tolist(), steps=1)
    with pytest.raises(DataError, match="at least one row of 2 tokens"):
        distill_lm(student, teacher, rows[:, :1], steps=1)
    with pytest.raises(ConfigError, match="exactly one budget"):
        distill_lm(student, teacher, rows, steps=1, seconds=1.0)
    with pytest.raises(ConfigError, match="exactly one budget"):
        distill_lm(student, teacher, rows)
    with pytest.raises(ConfigError, match="must be positive"):
        distill_lm(student, teacher, rows, steps=0)
    with pytest.raises(ConfigError, match="must be positive"):
        distill_lm(student, teacher, rows, seconds=-1.0)
    with pytest.raises(ConfigError, match=r"temperature=0 must be > 0"):
        distill_lm(student, teacher, rows, steps=1, temperature=0)
    with pytest.raises(ConfigError, match=r"batch=0 must be >= 1"):
        distill_lm(student, teacher, rows, steps=1, batch=0)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        distill_lm(nn.Linear(4, 4), teacher, rows, steps=1)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        distill_lm(student, tf.LlamaModel(teacher.config), rows, steps=1)
    # nothing was trained by any refused call
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), teacher.parameters(), strict=True))


def test_seconds_budget_stops():
    teacher = _llama()
    student = _noisy(teacher)
    before = _kl(teacher, student)
    rep = distill_lm(student, teacher, _rows(), seconds=1.0, lr=1e-3, batch=2, autocast=False)
    assert rep["steps"] >= 1 and rep["tokens"] == rep["steps"] * 2 * ROW
    assert 1.0 <= rep["seconds"] < 2.5
    assert _kl(teacher, student) < before


def test_seconds_budget_excludes_the_start_evaluation():
    import time

    teacher = _llama()

    calls = []

    def slow(model):
        calls.append(1)
        time.sleep(0.6)
        return 0.0

    t0 = time.perf_counter()
    rep = distill_lm(_noisy(teacher), teacher, _rows(), seconds=0.3, lr=1e-3, batch=2, autocast=False, evaluate=slow)
    wall = time.perf_counter() - t0
    # the reported seconds leave out every evaluation (whatever the machine's load makes a step cost)
    assert rep["steps"] >= 1 and calls and rep["seconds"] <= wall - 0.6 * len(calls) + 1e-3


def test_warmup_must_be_a_step_count():
    teacher = _llama()
    with pytest.raises(ConfigError, match="warmup=-1"):
        distill_lm(_noisy(teacher), teacher, _rows(), steps=1, warmup=-1, autocast=False)
    rep = distill_lm(_noisy(teacher), teacher, _rows(), steps=2, warmup=0, batch=2, autocast=False)
    assert rep["steps"] == 2


def test_qat_lm_stores_what_it_trained_and_beats_round_to_nearest():
    from torchshrink.llm.modules import PackedLinear
    from torchshrink.llm.recover import qat_lm
    from torchshrink.llm.sequential import quantize_lm
    from torchshrink.llm.wquant import Grid

    teacher = _llama()
    with torch.no_grad():  # a random tiny model's logits are nearly uniform: sharpen them so rounding matters
        teacher.lm_head.weight.mul_(30)
    grid = Grid(4, 32, True)
    rtn_model = copy.deepcopy(teacher)
    quantize_lm(rtn_model, grid, method="rtn", pack=True)
    student = copy.deepcopy(teacher)
    rep = qat_lm(student, teacher, _rows(64), grid, steps=40, lr=1e-4, batch=4, autocast=False)
    assert rep["steps"] == 40
    packed = [m for m in student.model.layers.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 14 and not any(type(m) is nn.Linear for m in student.model.layers.modules())
    assert all(m.bits == 4 and m.group == 32 and m.sym for m in packed)
    assert _kl(teacher, student) < 0.5 * _kl(teacher, rtn_model)  # measured: 0.0048 vs 0.0158
    # refusals: a clipping grid, a model with nothing left to train
    with pytest.raises(ConfigError, match="clip=False"):
        qat_lm(copy.deepcopy(teacher), teacher, _rows(), Grid(4, 32, True, clip=True), steps=1)
    with pytest.raises(ConfigError, match="no float Linear"):
        qat_lm(student, teacher, _rows(), grid, steps=1)


def _ddp_worker(rank, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        teacher = _llama()
        student = _noisy(teacher)
        rep = distill_lm(student, teacher, _rows(), steps=4, lr=1e-3, batch=2, autocast=False, hidden_weight=0.5,
                         evaluate=lambda m: _kl(teacher, m), eval_every=2)
        torch.save({"state": student.state_dict(), "rep": rep}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_processes_take_the_steps_of_one_process_with_their_whole_batch(tmp_path):
    """Two gloo processes of 2 rows each end with the weights one process reaches with batches of 4 rows."""
    from torchshrink.recipe.distributed import _free_port

    torch.multiprocessing.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    teacher = _llama()
    single = _noisy(teacher)
    rep = distill_lm(single, teacher, _rows(), steps=4, lr=1e-3, batch=4, autocast=False, hidden_weight=0.5)
    assert r0["rep"]["processes"] == 2 and r0["rep"]["tokens"] == rep["tokens"] == 4 * 4 * ROW
    assert [p["step"] for p in r0["rep"]["curve"]] == [0, 2, 4] and r1["rep"]["curve"] == []  # the first evaluates
    for k, v in single.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k])  # identical on both processes
        assert torch.allclose(r0["state"][k], v, atol=1e-5), k  # and the one-process result
