"""More real English for sentence-encoder distillation, with no download: the docstrings of every
Python source file of the standard library and of the installed packages, read with ``ast`` (no
module is imported), split into sentences with the same rules as :mod:`torchshrink.zoo.text`.

Sentences that share any 8-word run with an excluded set (the held-out evaluation sentences) are
dropped, so the held-out sentences stay unseen even where a docstring is repeated with small edits.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from torchshrink.core.errors import DataError
from torchshrink.zoo.text import _SPLIT, _good, sentence_split

log = logging.getLogger(__name__)
SHINGLE = 8  # words in a run shared with a held-out sentence that excludes a training sentence


def _words(s: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in s).split()


def shingles(sentence: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    """The ``n``-word runs of a sentence (lower case, punctuation removed); a shorter sentence is one run."""
    w = _words(sentence)
    if len(w) <= n:
        return {tuple(w)}
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def source_roots() -> list[Path]:
    """The standard library and site-packages folders of the running interpreter."""
    paths = sysconfig.get_paths()
    roots = {Path(paths[k]) for k in ("stdlib", "purelib", "platlib") if k in paths}
    return sorted(r for r in roots if r.is_dir())


def _file_docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def docstring_sentences(roots: Iterable[Path], max_files: int | None = None) -> list[str]:
    """Distinct good sentences from the docstrings of the ``.py`` files under ``roots``, in a fixed
    order (sorted by hash, so any prefix is a fair sample)."""
    seen: set[str] = set()
    files = sorted(p for r in roots for p in r.rglob("*.py") if "test" not in p.name)
    for path in files[:max_files]:
        for doc in _file_docstrings(path):
            for para in doc.split("\n\n"):
                for sent in _SPLIT.split(" ".join(para.split())):
                    if _good(sent):
                        seen.add(sent)
    return sorted(seen, key=lambda s: hashlib.sha256(s.encode()).hexdigest())


def _cache_file(roots: Sequence[Path], max_files: int | None) -> Path:
    from torchshrink.core.cache import cache_dir

    h = hashlib.sha256()
    h.update(f"v1 {sys.version} {max_files}".encode())
    for r in roots:  # the installed distributions (names carry versions) stand for the files
        h.update(str(r).encode())
        h.update("\n".join(sorted(os.listdir(r))).encode())
    return cache_dir() / f"docstring-sentences-{h.hexdigest()[:12]}.json"


def cached_docstring_sentences(roots: Sequence[Path] | None = None, max_files: int | None = None) -> list[str]:
    """:func:`docstring_sentences`, kept in the torchshrink cache (reading every source file of a
    large environment takes minutes); rebuilt when the installed packages change."""
    roots = list(roots) if roots is not None else source_roots()
    path = _cache_file(roots, max_files)
    if path.is_file():
        try:
            return list(json.loads(path.read_text()))
        except (OSError, ValueError):
            log.warning("ignoring the unreadable sentence cache %s", path)
    sents = docstring_sentences(roots, max_files=max_files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(sents))
    tmp.replace(path)
    return sents


def exclude_overlaps(sentences: Iterable[str], excluded: Sequence[str], n: int = SHINGLE) -> list[str]:
    """``sentences`` without any that share an ``n``-word run (or all words) with an excluded one."""
    banned: set[tuple[str, ...]] = set()
    for s in excluded:
        banned |= shingles(s, n)
    return [s for s in sentences if not (shingles(s, n) & banned)]


def check_disjoint(train: Sequence[str], heldout: Sequence[str], n: int = SHINGLE) -> None:
    """Raise :class:`DataError` if a training sentence overlaps a held-out one."""
    banned: set[tuple[str, ...]] = set()
    for s in heldout:
        banned |= shingles(s, n)
    bad = [s for s in train if shingles(s, n) & banned]
    if bad:
        raise DataError(f"{len(bad)} training sentences overlap the held-out set, e.g. {bad[0]!r}")


def crops(sentences: Sequence[str], n: int, *, min_words: int = 5, seed: int = 0) -> list[str]:
    """``n`` random contiguous word crops (at least ``min_words`` long) of the given sentences: an
    augmentation that teaches the student the teacher's embeddings of shorter inputs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(sentences).split()
        if len(w) <= min_words:
            out.append(" ".join(w))
            continue
        k = rng.randint(min_words, len(w) - 1)
        i = rng.randint(0, len(w) - k)
        out.append(" ".join(w[i:i + k]))
    return out


def distill_corpus(n_heldout: int = 500, max_files: int | None = None) -> tuple[list[str], list[str]]:
    """(train, heldout): the zoo's train sentences plus every other docstring sentence of the
    installed Python, minus anything overlapping the zoo's held-out sentences (checked)."""
    train, held = sentence_split(n_heldout)
    extra = cached_docstring_sentences(max_files=max_files)
    have = set(train)
    train = train + [s for s in exclude_overlaps(extra, held) if s not in have]
    train = exclude_overlaps(train, held)
    check_disjoint(train, held)
    log.info("distillation corpus: %d train sentences, %d held out", len(train), len(held))
    return train, held
