"""The one validation of names and text, and bounded echoes."""

import re

import pytest

from backend.core.text import NAME_PATTERN, TEXT_PATTERN, clean_name, clean_text, decode_filename, echo, echo_list


@pytest.mark.parametrize("bad", ["", "   ", "\t\n", "a\x00b", "\x1b[31mred", "x" * 101, "a\ud800", "bell\x07"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        clean_name(bad)
    assert not (re.fullmatch(NAME_PATTERN, bad) and len(bad) <= 100 and bad.strip())  # the schema says the same


@pytest.mark.parametrize("good", ["cat", "  cat ", "ankle boot", "t-shirt/top", "café", "猫", "x" * 100])
def test_good_names_are_trimmed(good: str) -> None:
    assert clean_name(good) == good.strip()
    assert re.fullmatch(NAME_PATTERN, good)


def test_text_allows_line_breaks_only() -> None:
    assert clean_text("  two\nlines\tand a tab \r\n") == "two\nlines\tand a tab"
    assert clean_text("   ") is None and clean_text(None) is None
    assert re.fullmatch(TEXT_PATTERN, "two\nlines\tand a tab")
    for bad in ("nul\x00", "esc\x1b", "x" * 2001, "\ud83d"):
        with pytest.raises(ValueError):
            clean_text(bad)


def test_echoes_are_bounded_and_printable() -> None:
    shown = echo("\x00\x1b[31m" + "n" * 500)
    assert len(shown) == 80 and "\x00" not in shown and "\x1b" not in shown
    assert echo("a\ud800b") == "a?b"  # encodable as JSON
    assert echo_list([f"c{i}" for i in range(25)]) == ", ".join(f"c{i}" for i in range(10)) + " and 15 more"


def test_undecodable_file_names_become_replacement_characters() -> None:
    raw = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # how Python hands a Latin-1 name over
    assert decode_filename(raw) == "caf\ufffd.png"
    assert decode_filename("plain.png") == "plain.png"
