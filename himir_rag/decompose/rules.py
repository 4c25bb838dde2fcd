"""The offline, rule-based query decomposer: regular expressions, no model."""

from __future__ import annotations

import re
from typing import Any

from himir_rag.decompose.base import (
    DecomposerOptions,
    dedup,
    validate_query,
    with_full_query,
)

_COLOURS = (
    "black|white|red|green|blue|yellow|orange|purple|pink|brown|grey|gray|golden|gold"
    "|silver|beige|tan|navy|teal|dark|light"
)
_COMPOUNDS = ("black and white", "salt and pepper", "fish and chips", "bread and butter",
              "rock and roll", "knife and fork", "cup and saucer")

_FILLERS = (
    r"(?:please\s+)?(?:can|could|would|will)\s+you\s+(?:please\s+)?"
    r"(?:find|show|get|give|fetch|retrieve|search\s+for|look\s+for)(?:\s+me)?",
    r"(?:i'?m|i\s+am|we'?re|we\s+are)\s+(?:looking|searching)\s+for",
    r"(?:looking|searching)\s+for",
    r"(?:i|we)\s+(?:want|need|would\s+like)(?:\s+to\s+(?:see|find))?",
    r"(?:i|we)'d\s+like(?:\s+to\s+(?:see|find))?",
    r"(?:do\s+you\s+have|is\s+there|are\s+there|got)(?:\s+any)?",
    r"(?:please\s+)?(?:find|show|get|give|fetch|retrieve|search\s+for|look\s+for)(?:\s+me)?",
    r"(?:which|what)\s+(?:photo|picture|image|pic|shot)s?\s+"
    r"(?:has|have|shows?|contains?|depicts?|includes?|features?)",
    r"(?:(?:a|an|the|any|some|all|one)\s+)?"
    r"(?:(?:black\s+and\s+white|colou?r|old|vintage|aerial|close-?up|recent)\s+)?"
    r"(?:photo(?:graph)?|picture|image|pic|shot|snapshot|scene|close-?up|view)s?\s+"
    r"(?:of|showing|with|where|in\s+which|containing|featuring|depicting"
    r"|including|(?:that|which)\s+(?:shows?|has|have|contains?|includes?))",
    r"there\s+(?:is|are)|there's",
    r"where|with",
)
_LEADING_FILLER = re.compile(r"^(?:(?:" + "|".join(_FILLERS) + r")\b\s*)+")

_SEPARATORS = (
    # conjunctions
    "and", "and also", "as well as", "along with", "together with", "alongside", "plus",
    "while", "whereas", "where",
    # relations of place
    "next to", "close to", "near to", "near", "nearby", "beside", "by", "with", "behind",
    "in front of", "on top of", "under", "underneath", "beneath", "above", "below", "over",
    "on", "onto", "in", "inside", "into", "within", "at", "outside", "between", "among",
    "amongst", "against", "across", "along", "around", "through", "full of",
    "to the left of", "to the right of", "on the left of", "on the right of",
    "in the middle of", "in the center of", "in the centre of", "in the corner of",
    "at the top of", "at the bottom of", "at the edge of", "on the edge of",
    # relations of action or possession
    "holding", "carrying", "wearing", "riding", "pulling", "pushing", "chasing", "eating",
    "drinking", "watching", "feeding", "using", "that has", "which has", "who has",
    "that have", "which have", "who have", "having", "has", "have",
)
_SEPARATOR_ALTERNATION = "|".join(
    re.escape(s).replace(r"\ ", r"\s+") for s in sorted(set(_SEPARATORS), key=len, reverse=True)
)
_SPLIT = re.compile(rf"\s*(?:[,;:!?&]+|\.(?!\d)|\b(?:{_SEPARATOR_ALTERNATION})\b)\s*")
_COMPOUND_ALTERNATION = "|".join(re.escape(c).replace(r"\ ", r"\s+") for c in _COMPOUNDS)
_PROTECTED = re.compile(
    rf"\b(?:{_COMPOUND_ALTERNATION}|(?:{_COLOURS})\s+and\s+(?:{_COLOURS}))\b"
)
_NOISE_CHARS = re.compile(r"[\"“”‘`()\[\]{}<>*#|~^_+=\\]")

_STOPWORDS = frozenset(
    "a an the some any is are was were be being been it its it's this that these those "
    "there here one ones each other another something thing things both also either "
    "of to and or me i we you they them their photo photos picture pictures image images "
    "pic pics shot scene where which who while with very too please find show also "
    "just only".split()
)
_EDGE_NOISE = frozenset(
    "is are was were be being been that which who where while it its there and also both "
    "either then together of to sitting standing lying laying parked placed perched "
    "resting hanging located positioned seen shown visible surrounded covered filled "
    "playing sleeping".split()
)
_ARTICLES = frozenset({"a", "an", "the", "some", "any"})
_LEADING_NOISE = _EDGE_NOISE - _ARTICLES


def _protect(text: str) -> str:
    """Join compounds like "red and white" with underscores so splitting keeps them."""
    return _PROTECTED.sub(lambda m: "_".join(m.group(0).split()), text)


def _normalise(query: str) -> str:
    """Lower-case, unify apostrophes, drop symbols that carry no meaning here."""
    text = query.casefold().replace("’", "'").replace("‘", "'")
    text = _NOISE_CHARS.sub(" ", text)
    return " ".join(text.split())


def _trim_edges(words: list[str]) -> list[str]:
    """Drop dangling auxiliaries, pronouns and pose verbs at both ends of a fragment."""
    start, end = 0, len(words)
    while start < end and words[start] in _LEADING_NOISE:
        start += 1
    while end > start and (words[end - 1] in _EDGE_NOISE or words[end - 1] in _ARTICLES):
        end -= 1
    return words[start:end]


def _clean_fragment(fragment: str) -> str:
    """Turn one split piece into a sub-query, or "" if it names nothing."""
    fragment = _LEADING_FILLER.sub("", fragment.replace("_", " ").strip(" '-/"))
    words = _trim_edges(fragment.split())
    if all(w.strip("'") in _STOPWORDS for w in words):
        return ""
    return " ".join(words)


class RuleDecomposer(DecomposerOptions):
    """Offline, deterministic query decomposer built from regular expressions.

    Splits on conjunctions ("and", "as well as", "plus", "&"), punctuation and relations
    ("next to", "on top of", "holding", "wearing"...); strips request filler ("show me",
    "a photo of", "can you find"...); keeps adjective + noun groups ("a red bicycle") and
    colour pairs ("a red and white bus") together; lower-cases; drops fragments made of
    stop words only; removes duplicates; caps the count.

    Parameters
    ----------
    max_subqueries : int, default 5
        Largest number of sub-queries returned (the full query, if added, comes on top).
    include_full_query : bool, default False
        Append the whole query (whitespace-normalised, lower-cased) as a last sub-query
        when it is not already one. It is not counted against ``max_subqueries``.

    Raises
    ------
    ConfigError
        If ``max_subqueries`` is not a positive int.

    Example
    -------
    >>> RuleDecomposer().decompose("A photo of a dog on a beach next to a red bicycle")
    ['a dog', 'a beach', 'a red bicycle']
    """

    def __repr__(self) -> str:
        return (
            f"RuleDecomposer(max_subqueries={self.max_subqueries}, "
            f"include_full_query={self.include_full_query})"
        )

    def decompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Split ``query`` into sub-queries.

        Parameters
        ----------
        query : str
            The user's description of the image(s) to find.
        callbacks : Any, optional
            Ignored (accepted so every decomposer can be called the same way).

        Returns
        -------
        list[str]
            One to ``max_subqueries`` lower-cased sub-queries (plus the full query when
            ``include_full_query``). A query that names a single object gives one.

        Raises
        ------
        ValueError
            If ``query`` is empty or whitespace.
        """
        raw = validate_query(query)
        text = _normalise(raw) or raw
        stripped = _LEADING_FILLER.sub("", text)
        fragments = [_clean_fragment(f) for f in _SPLIT.split(_protect(stripped))]
        subqueries = dedup(fragments, max_subqueries=self.max_subqueries)
        if not subqueries:
            # Only filler or symbols ("show me", "+"): matching the words beats failing.
            subqueries = [text.strip(" ?.!,;:") or text]
        return with_full_query(subqueries, text, self.include_full_query)

    async def adecompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Async variant of :meth:`decompose` (pure CPU work, microseconds)."""
        return self.decompose(query)
