"""Chunking and text extraction of training documents (cmp.documents), no services needed."""

from __future__ import annotations

import pytest

from cmp.documents import MAX_TEXT_CHARS, chunk_text, extract_text
from cmp.errors import InvalidInput, TooLarge


def test_a_short_text_is_one_chunk() -> None:
    assert chunk_text("Opening hours: nine to five.") == ["Opening hours: nine to five."]


def test_headings_start_chunks_and_are_repeated_in_long_sections() -> None:
    long_section = " ".join(f"word{i}" for i in range(700))
    text = f"# Intro\n\nHello.\n\n## Returns\n\n{long_section}\n\n## Shipping\nShip fast."
    chunks = chunk_text(text, size=1200, overlap=200)
    assert chunks[0] == "# Intro\n\nHello."
    returns = [c for c in chunks if c.startswith("## Returns")]
    assert len(returns) >= 4  # the long section is split, each part keeps its heading
    assert chunks[-1] == "## Shipping\n\nShip fast."
    assert all(len(c) <= 1200 for c in chunks)
    # Consecutive parts of a section overlap, so no word is only ever cut at a boundary.
    for before, after in zip(returns, returns[1:], strict=False):
        assert before.split()[-1] in after


@pytest.mark.parametrize("size", [300, 800, 1200])
def test_chunks_never_exceed_the_size_even_without_spaces(size: int) -> None:
    text = "# " + "H" * 500 + "\n\n" + "x" * 5000 + "\n\n" + "short words " * 300
    chunks = chunk_text(text, size=size, overlap=size // 5)
    assert chunks and all(len(c) <= size for c in chunks)
    assert "".join(chunks).count("x") >= 5000


def test_every_word_lands_in_some_chunk() -> None:
    words = [f"w{i}" for i in range(3000)]
    paragraphs = "\n\n".join(" ".join(words[i:i + 37]) for i in range(0, len(words), 37))
    seen = set(" ".join(chunk_text(paragraphs)).split())
    assert seen == set(words)


def test_extraction() -> None:
    assert extract_text("\ufeffa\r\nb\x00c".encode(), "text/markdown") == "a\nbc"
    with pytest.raises(InvalidInput):
        extract_text(b"\xff\xfe", "text/plain")
    with pytest.raises(InvalidInput):
        extract_text(b"  \n ", "text/plain")
    with pytest.raises(TooLarge):
        extract_text(b"a" * (MAX_TEXT_CHARS + 1), "text/plain")
