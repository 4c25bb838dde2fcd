"""Parsing an LLM's answer into sub-queries, with limits on its size and JSON nesting."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from himir_rag.decompose.base import DEFAULT_MAX_SUBQUERIES, dedup, validate_max_subqueries

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•·+>]|\(?\d{1,2}[.):]|\(?[a-z][.)])\s+")
_REFUSAL = re.compile(
    r"^\W*(?:i'?m\s+sorry|sorry|i\s+(?:can(?:no|')t|am\s+unable|won'?t)|as\s+an\s+ai)",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(?:sure|okay|ok|here\s+(?:is|are)|certainly|the\s+sub-?queries)\b",
                       re.IGNORECASE)
_ITEM_EDGES = " \t\"'`“”‘’*_.,;:!?[](){}"
_LIST_KEYS = ("subqueries", "sub_queries", "queries", "entities", "phrases", "items")
_MAX_WORDS = 12
MAX_SUBQUERY_CHARS = 512  # a longer item of an LLM answer is no short noun phrase: dropped
MAX_ANSWER_CHARS = 65_536  # a longer LLM answer is unusable (fallback), never parsed
MAX_JSON_DEPTH = 32  # JSON nested deeper is not parsed (json.loads would recurse into it)


def _json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether brackets in ``text`` nest at most ``limit`` deep (strings skipped); iterative, no recursion."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def _loads(text: str) -> Any:
    """``json.loads`` of text nested at most :data:`MAX_JSON_DEPTH` deep; ValueError otherwise."""
    if not _json_depth_ok(text):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except RecursionError as exc:  # belt and braces: the depth check above should make this unreachable
        raise ValueError("JSON nested too deeply") from exc


def _json_candidates(text: str) -> list[str]:
    """Pieces of ``text`` that may hold JSON: fenced blocks, the text, bracketed spans."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for opener, closer in (("[", "]"), ("{", "}")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    return candidates


def _list_in(value: Any) -> list[Any] | None:
    """The list inside a JSON value: the value itself, or a list under a known key."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for key in (*_LIST_KEYS, *value.keys()):
            found = value.get(key)
            if isinstance(found, list):
                return found
    return None


def _items_from_json(text: str) -> list[str] | None:
    """The string items of the first JSON list found in ``text``, or None."""
    for candidate in _json_candidates(text):
        try:
            found = _list_in(_loads(candidate))
        except (ValueError, TypeError):
            continue
        if found is not None:
            return [item for item in map(_item_text, found) if item]
    return None


def _is_json_without_list(text: str) -> bool:
    """True when the whole answer (fences aside) is valid JSON that holds no list."""
    body = _FENCE.sub(lambda m: m.group(1), text).strip()
    try:
        _loads(body)
    except (ValueError, TypeError):
        return False
    return True


def _item_text(item: Any) -> str:
    """Text of one JSON list item: a string, or an object's first string (numbers are no sub-query)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return next((v for v in item.values() if isinstance(v, str)), "")
    return ""


def _items_from_lines(text: str) -> list[str]:
    """Items of a bulleted, numbered or one-per-line answer (or one comma-separated line)."""
    text = _FENCE.sub(lambda m: m.group(1), text)
    lines = [line for line in text.splitlines() if line.strip()]
    marked = [line for line in lines if _LIST_MARKER.match(line)]
    if marked:
        lines = marked
    else:
        lines = [ln for ln in lines if not ln.rstrip().endswith(":") and not _PREAMBLE.match(ln)]
    if len(lines) == 1 and not marked:
        lines = re.split(r"[;,]", lines[0])
    return [_LIST_MARKER.sub("", line) for line in lines]


def _clean_item(item: str) -> str:
    """Strip quotes, markup and trailing punctuation; "" if no word is left or too long."""
    if any(unicodedata.category(ch) == "Cc" for ch in item if ch not in "\t\n\r"):
        return ""  # control characters: binary garbage, not a description
    if len(item) > 4 * MAX_SUBQUERY_CHARS:
        return ""  # no short phrase: do not even normalise it
    item = " ".join(item.split()).strip(_ITEM_EDGES)
    if len(item) > MAX_SUBQUERY_CHARS:
        return ""
    if not re.search(r"[^\W\d_]", item) or len(item.split()) > _MAX_WORDS:
        return ""  # needs a letter: "42" or "-" is no sub-query
    return item


def parse_subqueries(
    text: str | None, *, max_subqueries: int = DEFAULT_MAX_SUBQUERIES
) -> list[str]:
    """Parse an LLM answer into sub-queries; never raises on a bad answer.

    Understands a JSON list (bare, inside ```json fences or with text around it), a JSON
    object holding a list (``{"subqueries": [...]}``), numbered or bulleted lists, one
    item per line, or a single comma-separated line. Strips quotes, markup and trailing
    punctuation, drops empty, over-long (more than 12 words or :data:`MAX_SUBQUERY_CHARS`
    characters) and case-insensitively repeated items, and keeps the first
    ``max_subqueries``. An answer longer than :data:`MAX_ANSWER_CHARS` characters, or JSON
    nested deeper than :data:`MAX_JSON_DEPTH` levels, is not parsed (no recursion on the
    model's output): it gives no sub-query, so the caller falls back.

    Parameters
    ----------
    text : str or None
        The raw model output.
    max_subqueries : int, default 5
        Largest number of sub-queries returned.

    Returns
    -------
    list[str]
        The sub-queries; empty when nothing usable was found (including refusals).

    Example
    -------
    >>> parse_subqueries('Sure: ["a dog", "A dog", "a red bicycle."]')
    ['a dog', 'a red bicycle']
    """
    validate_max_subqueries(max_subqueries)
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_ANSWER_CHARS or _REFUSAL.match(text):
        return []
    items = _items_from_json(text)
    if items is None:
        if _is_json_without_list(text):
            return []  # e.g. {"subqueries": 5} or 42: structured, but no list of descriptions
        items = _items_from_lines(text)
    return dedup([_clean_item(item) for item in items], max_subqueries=max_subqueries)

