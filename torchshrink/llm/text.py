"""Real English prose for language models, from Debian documentation packages installed by the setup
(``make llm-data`` / apt): the Debian Administrator's Handbook (each English chapter a document), the
Developer's Reference, the New Maintainers' Guide, the Debian FAQ and Debian Policy. Paragraphs of
prose only (code, tables, menus and short lines dropped). The split is by DOCUMENT, fixed by a hash of
its name, so evaluation text is never calibrated on. ``debian-reference`` is never read (it is
reserved for independent checks)."""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import re
from pathlib import Path

from torchshrink.core.errors import DataError

DOC = Path("/usr/share/doc")
PROSE_SOURCES = {  # package -> files (globs under /usr/share/doc)
    "debian-handbook": ("debian-handbook/html/en-US/*.html",),
    "developers-reference": ("developers-reference/docs/developers-reference.txt.gz",),
    "maint-guide": ("maint-guide/maint-guide.en.txt.gz",),
    "debian-faq": ("debian/FAQ/debian-faq.en.txt.gz",),
    "debian-policy": ("debian-policy/policy.txt.gz",),
}
RESERVED = "debian-reference"
INSTALL = "apt-get install debian-handbook developers-reference maint-guide debian-faq debian-policy"
EVAL_SHARE = 4  # one document in four (by name hash) is evaluation text


class _Paragraphs(html.parser.HTMLParser):
    """Text of <p> / <li> elements outside <pre>, <script>, <style>, <table> and navigation (inline <code> is
    kept: it is part of the sentence)."""

    SKIP = {"pre", "script", "style", "table", "nav", "head"}

    def __init__(self) -> None:
        super().__init__()
        self.out: list[str] = []
        self.buf: list[str] | None = None
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif tag in ("p", "li") and self.skip == 0:
            self._flush()
            self.buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in ("p", "li"):
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.buf is not None and self.skip == 0:
            self.buf.append(data)

    def _flush(self) -> None:
        if self.buf:
            self.out.append(" ".join("".join(self.buf).split()))
        self.buf = None


def is_prose(par: str) -> bool:
    """A paragraph of running English: long enough, mostly letters, ends like a sentence."""
    if len(par) < 80 or par[-1] not in ".!?:)\"'":
        return False
    letters = sum(c.isalpha() or c == " " for c in par)
    return letters / len(par) > 0.85 and len(re.findall(r"[a-z]{3,}", par)) > 10


def _text_paragraphs(raw: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", raw):
        lines = [ln.strip() for ln in block.splitlines()]
        if any(ln.startswith(("$ ", "# ", "|", "+-", "*---")) for ln in lines):
            continue
        out.append(" ".join(" ".join(lines).split()))
    return out


def read_document(path: Path) -> list[str]:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            raw = f.read()
    else:
        raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".html":
        p = _Paragraphs()
        p.feed(raw)
        p.close()
        pars = p.out
    else:
        pars = _text_paragraphs(raw)
    return [x for x in pars if is_prose(x)]


def documents(root: Path = DOC) -> dict[str, list[str]]:
    """Every prose document the installed packages hold: ``package/file`` -> paragraphs."""
    docs = {}
    for pkg, globs in PROSE_SOURCES.items():
        for g in globs:
            for path in sorted(root.glob(g)):
                if RESERVED in str(path):
                    continue
                pars = read_document(path)
                if pars:
                    docs[f"{pkg}/{path.name}"] = pars
    if not docs:
        raise DataError(f"no English prose found under {root}: {INSTALL}")
    return docs


def is_eval_document(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % EVAL_SHARE == 0


def prose_split(root: Path = DOC) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(calibration paragraphs, evaluation paragraphs, {"calibration": docs, "evaluation": docs}); no
    document contributes to both."""
    docs = documents(root)
    cal = [d for d in docs if not is_eval_document(d)]
    ev = [d for d in docs if is_eval_document(d)]
    if not cal or not ev:
        raise DataError(f"the installed documentation has too few documents to split ({len(docs)}): {INSTALL}")
    return ([p for d in cal for p in docs[d]], [p for d in ev for p in docs[d]],
            {"calibration": cal, "evaluation": ev})
