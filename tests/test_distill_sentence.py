import pytest
import torch

from torchshrink.core.errors import DataError
from torchshrink.distill import drop_layers
from torchshrink.distill.corpus import (
    cached_docstring_sentences,
    check_disjoint,
    crops,
    docstring_sentences,
    exclude_overlaps,
    shingles,
)
from torchshrink.distill.sentence import distill_sentence_encoder, freeze_word_embeddings, layer_pairs, length_batches
from torchshrink.measure.quality import fidelity

HELD = ["The quick brown fox jumps over the lazy dog near the river bank today."]
SOURCE = '''"""Open the file at the given path and return a readable stream of its bytes.

Short."""


class Reader:
    """A reader keeps the current position of a stream between calls to read.

    The quick brown fox jumps over the lazy dog near the river bank every single day.
    """

    def close(self):
        """Close the stream and release every resource that the reader holds now."""
'''


def test_shingles_and_overlap_exclusion():
    assert ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy") in shingles(HELD[0])
    assert shingles("Two words.") == {("two", "words")}
    near = "A quick brown fox jumps over the lazy dog near the river bank, said the report."
    far = "Return the number of bytes that were written to the stream before it closed."
    assert exclude_overlaps([near, far, HELD[0].upper()], HELD) == [far]
    check_disjoint([far], HELD)
    with pytest.raises(DataError, match="overlap the held-out set"):
        check_disjoint([far, near], HELD)


def test_docstring_sentences_read_without_import_and_cache(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "mod.py").write_text(SOURCE)
    (src / "broken.py").write_text("def f(:\n")  # unparsable files are skipped
    got = docstring_sentences([src])
    assert sorted(got) == sorted([
        "Open the file at the given path and return a readable stream of its bytes.",
        "A reader keeps the current position of a stream between calls to read.",
        "The quick brown fox jumps over the lazy dog near the river bank every single day.",
        "Close the stream and release every resource that the reader holds now.",
    ])
    monkeypatch.setenv("TORCHSHRINK_CACHE", str(tmp_path / "cache"))
    assert cached_docstring_sentences([src]) == got
    (src / "mod.py").write_text('"""Nothing here is a sentence"""')
    assert cached_docstring_sentences([src]) == got  # served from the cache
    assert len(list((tmp_path / "cache").glob("docstring-sentences-*.json"))) == 1
    assert exclude_overlaps(got, HELD) == [s for s in got if "fox" not in s]


def test_crops_are_contiguous_word_runs():
    src = ["one two three four five six seven eight nine ten eleven twelve."]
    out = crops(src, 50, min_words=5, seed=1)
    assert len(out) == 50 and out == crops(src, 50, min_words=5, seed=1)
    for c in out:
        assert 5 <= len(c.split()) < 12 and c in src[0]


class _Tok:
    """A whitespace tokenizer with the call signature of a Hugging Face tokenizer."""

    def __call__(self, texts, padding=False, truncation=True, max_length=128, return_tensors=None):
        ids = [[1] + [2 + (hash(w) % 90) for w in t.split()][: max_length - 2] + [3] for t in texts]
        if not padding:
            return {"input_ids": ids}
        n = max(len(i) for i in ids)
        pad = torch.tensor([i + [0] * (n - len(i)) for i in ids])
        return {"input_ids": pad, "attention_mask": (pad != 0).long()}


def _tiny_encoder(layers: int = 4):
    from transformers import BertConfig, BertModel

    from torchshrink.zoo.minilm import SentenceEncoder

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return SentenceEncoder(BertModel(cfg)).eval()


def test_length_batches_group_similar_lengths():
    sents = [" ".join(["w"] * n) for n in (3, 20, 4, 21, 5, 22)]
    batches = length_batches(sents, _Tok(), batch_size=2, seed=0)
    widths = sorted(b["input_ids"].shape[1] for b in batches)
    assert widths == [6, 22, 24] and all(b["attention_mask"].shape == b["input_ids"].shape for b in batches)
    assert sorted(int(b["attention_mask"].sum()) for b in batches) == [5 + 6, 7 + 22, 23 + 24]
    with pytest.raises(DataError, match="no sentences"):
        length_batches([], _Tok())


def test_distill_sentence_encoder_improves_fidelity_and_guards_heldout():
    teacher = _tiny_encoder(4)
    student = drop_layers(teacher, [0, 3])
    assert layer_pairs(student) == [("encoder.encoder.layer.0", "encoder.encoder.layer.0"),
                                    ("encoder.encoder.layer.1", "encoder.encoder.layer.3")]
    with torch.no_grad():  # start far from the teacher: noisy copies of its blocks
        for p in student.encoder.encoder.layer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    g = torch.Generator().manual_seed(0)
    train = [" ".join(words[i] for i in torch.randint(0, 16, (int(n),), generator=g)) for n in torch.randint(4, 12, (64,), generator=g)]
    held = [" ".join(words[i] for i in torch.randint(0, 16, (9,), generator=g)) for _ in range(16)]
    held = [h for h in held if h not in train]
    tok = _Tok()
    held_b = [(b["input_ids"], b["attention_mask"]) for b in length_batches(held, tok, batch_size=8)]
    before = fidelity(student, teacher, held_b)["cosine_mean"]
    embed = student.encoder.embeddings.word_embeddings.weight.detach().clone()
    hist = distill_sentence_encoder(teacher, student, train, tok, heldout=held, epochs=4, lr=3e-3, batch_size=16)
    after = fidelity(student, teacher, held_b)["cosine_mean"]
    assert hist[-1]["loss"] < hist[0]["loss"] and after > before + 0.01, (before, after)
    assert torch.equal(student.encoder.embeddings.word_embeddings.weight, embed)  # frozen token table
    with pytest.raises(DataError, match="overlap the held-out set"):
        distill_sentence_encoder(teacher, drop_layers(teacher, [0, 3]), train + held[:1], tok, heldout=held)
    with pytest.raises(DataError, match="drop_layers"):
        layer_pairs(teacher)


def test_freeze_word_embeddings_counts_only_token_tables():
    enc = _tiny_encoder(2)
    assert freeze_word_embeddings(enc) == 1100 * 32
    assert not enc.encoder.embeddings.word_embeddings.weight.requires_grad
    assert enc.encoder.embeddings.position_embeddings.weight.requires_grad


def test_relation_kl_matches_relations_across_widths():
    from torchshrink.distill.losses import relation_kl

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 7, 48, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    assert float(relation_kl(t.clone(), t, mask, heads=4)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 7, 32, generator=g, requires_grad=True)  # a narrower (head-pruned) student
    loss = relation_kl(s, t, mask, heads=4)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert s.grad is not None and float(s.grad[1, 5:].abs().max()) == 0.0  # padded tokens take no part
    t2 = t.clone()
    t2[1, 5:] = 100.0  # padding's values do not matter
    assert float(relation_kl(s, t2, mask, heads=4)) == pytest.approx(float(loss), rel=1e-6)
    # by hand: the mean over heads and query tokens of sum_j p_t log(p_t / p_s)
    kls = []
    for h in range(4):
        a, c = t[0, :, 12 * h:12 * (h + 1)], s[0, :, 8 * h:8 * (h + 1)].detach()
        pt, ps = torch.softmax(a @ a.T / 12 ** 0.5, -1), torch.softmax(c @ c.T / 8 ** 0.5, -1)
        kls.append((pt * (pt.log() - ps.log())).sum(-1))
    assert float(relation_kl(s[:1], t[:1], None, heads=4)) == pytest.approx(float(torch.stack(kls).mean()), rel=1e-5)
    with pytest.raises(DataError, match="does not split into 5 relation heads"):
        relation_kl(s, t, mask, heads=5)
    with pytest.raises(DataError, match="same B and T"):
        relation_kl(s[:, :6], t, None)


def test_distiller_relation_pairs_train_the_projections():
    from torchshrink.distill import Distiller

    teacher = _tiny_encoder(2)
    student = drop_layers(teacher, [0])
    name = "encoder.encoder.layer.{}.attention.self.query"
    d = Distiller(teacher, student, output_loss="none", features=[(name.format(0), name.format(1), "relation")])
    b = _Tok()(["alpha beta gamma", "delta epsilon zeta eta theta"], padding=True)
    loss = d.loss(student, (b["input_ids"], b["attention_mask"]), None)
    assert float(loss) > 0
    loss.backward()
    assert student.encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert student.encoder.encoder.layer[0].attention.self.value.weight.grad is None  # untouched by a query relation


def test_cached_teacher_outputs_under_bf16_autocast():
    teacher = _tiny_encoder(2)
    student = drop_layers(teacher, [0])
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    g = torch.Generator().manual_seed(0)
    train = [" ".join(words[i] for i in torch.randint(0, 8, (6,), generator=g)) for _ in range(32)]
    # epoch 2 reads the float16 cache inside autocast: it must not trip autocast's dtype rules
    hist = distill_sentence_encoder(teacher, student, train, _Tok(), epochs=2, lr=1e-3, batch_size=16, autocast="bf16")
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert all(p.dtype == torch.float32 for p in student.parameters())
