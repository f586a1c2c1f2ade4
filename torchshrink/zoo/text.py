"""Real English sentences from the Python standard library's docstrings, for calibration and
fidelity checks (no download: the text ships with every Python)."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
import warnings

_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "platform", "poplib", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
    "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BAD = re.compile(r"(>>>|::|==|\(\)|\[|\]|\{|\}|_\w|\w_|`|\*|/|\\|\bXXX\b|https?:)")


def _docstrings(mod_name: str) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(mod_name)
    except Exception:
        return []
    docs = [inspect.getdoc(mod) or ""]
    for _, obj in sorted(vars(mod).items()):
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for _, meth in sorted(vars(obj).items()):
                if inspect.isfunction(meth):
                    docs.append(inspect.getdoc(meth) or "")
    return docs


def _good(s: str) -> bool:
    words = s.split()
    if not (8 <= len(words) <= 40) or not s.endswith(".") or not s[0].isupper():
        return False
    if _BAD.search(s):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in s)
    return letters / len(s) > 0.9


@functools.lru_cache(maxsize=1)
def english_sentences() -> tuple[str, ...]:
    """Deduplicated sentences in a fixed order (sorted by a hash, so any prefix is a fair sample)."""
    seen: set[str] = set()
    for mod in _MODULES:
        for doc in _docstrings(mod):
            for para in doc.split("\n\n"):
                for sent in _SPLIT.split(" ".join(para.split())):
                    if _good(sent):
                        seen.add(sent)
    return tuple(sorted(seen, key=lambda s: hashlib.sha256(s.encode()).hexdigest()))


def sentence_split(n_heldout: int = 500) -> tuple[list[str], list[str]]:
    """(train, heldout): the held-out sentences are never to be used for calibration or training."""
    sents = list(english_sentences())
    return sents[n_heldout:], sents[:n_heldout]
