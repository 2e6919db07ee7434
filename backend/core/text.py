"""The one validation of names and free text, used by the API, the CLI and folder ingestion, and bounded
echoes of client-supplied text in messages."""

import os
import unicodedata

NAME_MAX = 100  # category names
TEXT_MAX = 2000  # descriptions
ECHO_MAX = 80  # characters of client text repeated in an error message

# The same rules as JSON-schema patterns, so the OpenAPI schema tells clients what is accepted.
_CONTROL = r"\x00-\x1f\x7f-\x9f\ud800-\udfff"
NAME_PATTERN = rf"^[^{_CONTROL}]*[^\s{_CONTROL}][^{_CONTROL}]*$"  # something besides spaces, no control chars
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]*$"  # line breaks and tabs allowed

# Whitespace a description may contain; every other control character, and lone surrogates (which
# PostgreSQL cannot store and JSON cannot encode), is refused.
_TEXT_WHITESPACE = {"\n", "\r", "\t"}


def _bad_characters(value: str, allowed: set[str]) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in allowed for ch in value)


def clean_name(value: str, what: str = "category name") -> str:
    """Trimmed, non-empty, at most NAME_MAX characters, no control characters; ValueError otherwise."""
    name = value.strip()
    if not name:
        raise ValueError(f"{what} must not be empty")
    if len(name) > NAME_MAX:
        raise ValueError(f"{what} is longer than {NAME_MAX} characters")
    if _bad_characters(name, set()):
        raise ValueError(f"{what} must not contain control characters")
    return name


def clean_text(value: str | None, what: str = "description", max_length: int = TEXT_MAX) -> str | None:
    """Trimmed free text: None when empty; at most `max_length` characters; line breaks and tabs allowed."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if len(text) > max_length:
        raise ValueError(f"{what} is longer than {max_length} characters")
    if _bad_characters(text, _TEXT_WHITESPACE):
        raise ValueError(f"{what} must not contain control characters other than line breaks and tabs")
    return text


def echo(value: object, limit: int = ECHO_MAX) -> str:
    """Client-supplied text made safe to repeat in a message: printable, and at most `limit` characters."""
    text = "".join(ch if unicodedata.category(ch) not in ("Cc", "Cs") else "?" for ch in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def echo_list(values: list[str], limit: int = 10) -> str:
    """At most `limit` items of a list, then how many more."""
    shown = ", ".join(echo(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def decode_filename(name: str) -> str:
    """A file name as read from the disk (undecodable bytes are surrogate-escaped by Python) turned into
    text that can be stored and shown: undecodable bytes become U+FFFD."""
    return os.fsencode(name).decode("utf-8", errors="replace")
