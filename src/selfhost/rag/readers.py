"""Turn a file on disk into plain text, one reader per format.

Each reader returns text with blank lines between blocks (paragraphs, HTML
block elements, PDF pages) because the chunker splits on those first.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable

from selfhost.errors import InvalidParameterError


def read_plain(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


class _HTMLText(HTMLParser):
    """Collects visible text; block elements become paragraph breaks."""

    _BLOCKS = {
        "p", "div", "section", "article", "header", "footer", "li", "ul", "ol", "table", "tr",
        "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "br", "hr", "title", "main",
    }
    _HIDDEN = {"script", "style", "noscript", "template", "svg", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._hidden_depth:
            self.parts.append(data)


def read_html(path: Path) -> str:
    parser = _HTMLText()
    parser.feed(read_plain(path))
    parser.close()
    text = "".join(parser.parts)
    # Collapse the whitespace HTML source carries, but keep the block breaks.
    blocks = (re.sub(r"\s+", " ", block).strip() for block in re.split(r"\n\s*\n", text))
    return "\n\n".join(block for block in blocks if block)


def read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except PdfReadError as err:
        raise InvalidParameterError(f"cannot read PDF {path}: {err}") from err
    return "\n\n".join(page.strip() for page in pages if page.strip())


READERS: dict[str, Callable[[Path], str]] = {
    ".txt": read_plain,
    ".text": read_plain,
    ".md": read_plain,
    ".markdown": read_plain,
    ".rst": read_plain,
    ".html": read_html,
    ".htm": read_html,
    ".pdf": read_pdf,
}


def is_readable(path: Path) -> bool:
    return path.suffix.lower() in READERS


def read_document(path: Path) -> str:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InvalidParameterError(
            f"cannot read {path}: unsupported suffix {path.suffix!r}; supported: {', '.join(sorted(READERS))}"
        )
    return reader(path)


def find_documents(paths: Iterable[Path]) -> list[Path]:
    """Readable files under the given files and folders, resolved and sorted; hidden entries skipped."""
    found: set[Path] = set()
    for path in paths:
        path = path.expanduser().resolve()
        if path.is_file():
            if not is_readable(path):
                raise InvalidParameterError(
                    f"cannot index {path}: unsupported suffix {path.suffix!r}; supported: {', '.join(sorted(READERS))}"
                )
            found.add(path)
        elif path.is_dir():
            for child in path.rglob("*"):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if child.is_file() and not hidden and is_readable(child):
                    found.add(child)
        else:
            raise InvalidParameterError(f"cannot index {path}: no such file or folder")
    return sorted(found)
