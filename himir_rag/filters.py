"""Metadata filters: one evaluator for ``HiMIRIndex.search``, both adapters and the Qdrant store.

A filter is a dict in the LangChain / Chroma style, or a callable::

    {"album": "holiday"}                                  # equality
    {"year": [2020, 2021]}                                # any of these values
    {"year": {"$gte": 2021}, "width": {"$gt": 1000}}      # operators; keys are ANDed
    {"$or": [{"album": "holiday"}, {"tags": "beach"}]}    # logic
    lambda view: view["width"] > view["height"]           # any predicate

It is checked against the photo's *filter view*: the user's metadata plus the built-in
fields :data:`BUILTIN_FIELDS` (``file_name``, ``path``, ``width``, ``height``), which
take precedence over user metadata of the same name (as in the adapters' metadata).

Rules (MongoDB's, which Chroma and LangChain follow):

- a metadata value that is a list matches when any element matches (``{"tags": "red"}``
  matches ``tags=["red", "blue"]``); ``$ne`` and ``$nin`` are the negations, so they
  match when no element does;
- a missing key matches only ``$ne``, ``$nin``, ``$exists: false`` and ``$empty: true``;
- ``True`` is not ``1``: booleans only equal booleans;
- comparisons (``$gt``...) hold between numbers or between strings; other pairs
  (``"3" > 2``) do not match.

Operators: ``$eq $ne $in $nin $gt $gte $lt $lte`` (values), ``$contains`` (a list
holding the value, or a string holding it as a substring), ``$icontains`` (the same,
ignoring case), ``$all`` (a list holding every value), ``$exists`` and ``$empty``
(true/false), and ``$and $or $not`` over sub-filters. Anything else is a ``ConfigError``
naming what is accepted.

Example
-------
>>> keep = compile_filter({"year": {"$gte": 2021}, "tags": ["beach", "sea"]})
>>> keep({"year": 2022, "tags": ["sea", "dog"]}), keep({"year": 2020, "tags": "beach"})
(True, False)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from himir_rag.catalog import ImageRecord
from himir_rag.errors import ConfigError

__all__ = ["BUILTIN_FIELDS", "FIELD_OPERATORS", "LOGIC_OPERATORS", "Filter", "Predicate", "compile_filter",
           "filter_view", "matching_ids"]

BUILTIN_FIELDS = ("file_name", "path", "width", "height")
FIELD_OPERATORS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$contains", "$icontains", "$all",
                   "$exists", "$empty")
LOGIC_OPERATORS = ("$and", "$or", "$not")
MAX_DEPTH = 32  # nesting of $and / $or / $not; deeper filters are refused, never recursed into

Filter = Mapping[str, Any] | Callable[[Mapping[str, Any]], bool]
Predicate = Callable[[Mapping[str, Any]], bool]
_SETS = (list, tuple, set, frozenset)
_ACCEPTED = ("a filter is a dict such as {'album': 'holiday'}, {'year': [2020, 2021]} or "
             "{'year': {'$gte': 2021}}, or a callable view -> bool")


def filter_view(record: ImageRecord) -> Mapping[str, Any]:
    """What a filter sees of one photo: its user metadata plus the built-in fields (which win).

    A read-only mapping over the record (nothing is copied per photo and query).

    Example
    -------
    >>> view = filter_view(ImageRecord(1, "/p/a.jpg", 640, 480, metadata={"album": "x"}))
    >>> view["file_name"], view["width"], view["album"], "path" in view
    ('a.jpg', 640, 'x', True)
    """
    return _RecordView(record)


class _RecordView(Mapping):
    """The filter view of one :class:`ImageRecord` (see :func:`filter_view`)."""

    __slots__ = ("_record",)

    def __init__(self, record: ImageRecord) -> None:
        self._record = record

    def __getitem__(self, key: str) -> Any:
        record = self._record
        if key == "file_name":
            return os.path.basename(record.path)
        if key == "path":
            return record.path
        if key == "width":
            return int(record.width)
        if key == "height":
            return int(record.height)
        return record.metadata[key]

    def __contains__(self, key: object) -> bool:
        return key in BUILTIN_FIELDS or key in self._record.metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        yield from (key for key in self._record.metadata if key not in BUILTIN_FIELDS)
        yield from BUILTIN_FIELDS

    def __len__(self) -> int:
        return len(self._record.metadata.keys() - set(BUILTIN_FIELDS)) + len(BUILTIN_FIELDS)


def matching_ids(records: Iterable[ImageRecord], filters: Filter) -> list[int]:
    """Ids of the records whose :func:`filter_view` passes ``filters`` (in the records' order).

    Raises
    ------
    ConfigError
        If ``filters`` is malformed (see :func:`compile_filter`).
    """
    keep = compile_filter(filters)
    return [r.image_id for r in records if keep is None or keep(filter_view(r))]


def compile_filter(filters: Filter | None) -> Predicate | None:
    """Validate ``filters`` once and return a predicate over a filter view (None for no filter).

    Parameters
    ----------
    filters : dict, callable or None
        See the module docstring.

    Returns
    -------
    callable or None
        ``predicate(view) -> bool``.

    Raises
    ------
    ConfigError
        If the filter is not a dict or callable, uses an unknown operator, gives an
        operator a value of the wrong kind, or nests deeper than :data:`MAX_DEPTH`.

    Example
    -------
    >>> compile_filter({"n": True})({"n": 1})
    False
    """
    if filters is None:
        return None
    if isinstance(filters, Mapping):
        return _compile_all(filters, depth=0)
    if callable(filters):
        return lambda view: bool(filters(view))
    raise ConfigError(f"filter {_short(filters)} of type {type(filters).__name__} is not accepted; {_ACCEPTED}")


# -- compiling ---------------------------------------------------------------------------------------
def _compile_all(filters: Mapping[str, Any], *, depth: int) -> Predicate:
    """Every key of ``filters`` must hold (field conditions and logic operators)."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"filter nests $and/$or/$not deeper than {MAX_DEPTH} levels; flatten it")
    return _all_of([_compile_key(key, value, depth=depth) for key, value in filters.items()])


def _all_of(tests: list[Predicate]) -> Predicate:
    if len(tests) == 1:
        return tests[0]
    return lambda view: all(test(view) for test in tests)


def _compile_key(key: Any, value: Any, *, depth: int) -> Predicate:
    if not isinstance(key, str):
        raise ConfigError(f"filter key {key!r} is not a string; {_ACCEPTED}")
    if key in ("$and", "$or"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} takes a list of filters, got {_short(value)}")
        parts = [_compile_all(_sub_filter(key, part), depth=depth + 1) for part in value]
        if key == "$and":
            return lambda view: all(part(view) for part in parts)
        return lambda view: any(part(view) for part in parts)
    if key == "$not":
        inner = _compile_all(_sub_filter(key, value), depth=depth + 1)
        return lambda view: not inner(view)
    if key.startswith("$"):
        raise ConfigError(f"filter operator {key!r} is not supported at the top level; use a field name or one of "
                          f"{', '.join(LOGIC_OPERATORS)}")
    return _compile_field(key, value)


def _sub_filter(operator: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{operator} takes filters (dicts), got {_short(value)}")
    return value


def _compile_field(key: str, condition: Any) -> Predicate:
    """The test of one field: a value, a list of values, or a dict of operators."""
    if isinstance(condition, Mapping):
        if not condition:
            raise ConfigError(f"filter on {key!r} is an empty dict; give a value or operators such as "
                              "{'$eq': value}")
        tests = []
        for operator, operand in condition.items():
            if not (isinstance(operator, str) and operator.startswith("$")):
                raise ConfigError(f"filter on {key!r}: {operator!r} is not an operator; to match a dict value "
                                  f"write {{'$eq': {{...}}}}, else use one of {', '.join(FIELD_OPERATORS)}")
            tests.append(_compile_operator(key, operator, operand))
        return _all_of(tests)
    if isinstance(condition, _SETS):
        return _compile_operator(key, "$in", condition)
    return _compile_operator(key, "$eq", condition)


def _compile_operator(key: str, operator: str, operand: Any) -> Predicate:
    if operator in ("$eq", "$ne"):
        _check_value(key, operator, operand)
        negate = operator == "$ne"
        return lambda view: (key in view and _equal_any(view[key], operand)) != negate
    if operator in ("$in", "$nin", "$all"):
        wanted = _value_set(key, operator, operand)
        if operator == "$all":
            return lambda view: key in view and all(_equal_any(view[key], value) for value in operand)
        negate = operator == "$nin"
        return lambda view: (key in view and wanted.holds_any(view[key])) != negate
    if operator in _COMPARISONS:
        _check_comparable(key, operator, operand)
        compare = _COMPARISONS[operator]
        return lambda view: key in view and any(_comparable(v, operand) and compare(v, operand)
                                                for v in _elements(view[key]))
    if operator in ("$contains", "$icontains"):
        fold = operator == "$icontains"
        if fold and not isinstance(operand, str):
            raise ConfigError(f"filter on {key!r}: $icontains takes a string, got {_short(operand)}")
        _check_value(key, operator, operand)
        return lambda view: key in view and _contains(view[key], operand, fold=fold)
    if operator in ("$exists", "$empty"):
        if not isinstance(operand, bool):
            raise ConfigError(f"filter on {key!r}: {operator} takes true or false, got {_short(operand)}")
        if operator == "$exists":
            return lambda view: (key in view) == operand
        return lambda view: _is_empty(view.get(key)) == operand
    raise ConfigError(f"filter on {key!r}: operator {operator!r} is not supported; use one of "
                      f"{', '.join(FIELD_OPERATORS)}")


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b, "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b,
}


def _check_value(key: str, operator: str, value: Any, *, depth: int = 0) -> None:
    """``value`` must be JSON data (str, finite number, bool, None, lists and dicts of those)."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"filter on {key!r}: the {operator} value nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"filter on {key!r}: {operator} value {value!r} is not a finite number")
        return
    if isinstance(value, _SETS):
        for item in value:
            _check_value(key, operator, item, depth=depth + 1)
        return
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_value(key, operator, item, depth=depth + 1)
        return
    raise ConfigError(f"filter on {key!r}: {operator} value {_short(value)} of type {type(value).__name__} is "
                      "not JSON data; use str, int, float, bool, None or lists of them")


def _check_comparable(key: str, operator: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (isinstance(value, str) or (number and math.isfinite(value))):
        raise ConfigError(f"filter on {key!r}: {operator} compares with a number or a string, got {_short(value)}")


def _value_set(key: str, operator: str, values: Any) -> _ValueSet:
    if not isinstance(values, _SETS):
        raise ConfigError(f"filter on {key!r}: {operator} takes a list of values, got {_short(values)}")
    _check_value(key, operator, values)
    return _ValueSet(values)


# -- evaluating --------------------------------------------------------------------------------------
def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def _elements(value: Any) -> list[Any]:
    """A list value's elements, or the value itself: a list matches when any element does."""
    return value if isinstance(value, list) else [value]


def _same(a: Any, b: Any) -> bool:
    """JSON equality in which booleans equal only booleans (``True`` is not ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, Mapping)) or isinstance(b, (list, tuple, Mapping)):
        return False
    return a == b


def _equal_any(value: Any, wanted: Any) -> bool:
    """``value`` equals ``wanted``, or is a list one of whose elements does."""
    return _same(value, wanted) or (isinstance(value, list) and any(_same(v, wanted) for v in value))


def _comparable(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    return (isinstance(a, (int, float)) and isinstance(b, (int, float))) or (isinstance(a, str) and isinstance(b, str))


def _contains(value: Any, wanted: Any, *, fold: bool) -> bool:
    if isinstance(value, str) and isinstance(wanted, str):
        return wanted.casefold() in value.casefold() if fold else wanted in value
    if isinstance(value, list):
        if fold:
            return any(isinstance(v, str) and v.casefold() == wanted.casefold() for v in value)
        return any(_same(v, wanted) for v in value)
    return False


class _ValueSet:
    """The values of ``$in`` / ``$nin``: hashable scalars in a set (bools kept apart), others in a list."""

    def __init__(self, values: Iterable[Any]) -> None:
        self.scalars: set[tuple[bool, Any]] = set()
        self.others: list[Any] = []
        for value in values:
            if isinstance(value, (str, int, float)) or value is None:
                self.scalars.add((isinstance(value, bool), value))
            else:
                self.others.append(value)

    def holds(self, value: Any) -> bool:
        if isinstance(value, (str, int, float)) or value is None:
            if (isinstance(value, bool), value) in self.scalars:
                return True
        return any(_same(value, other) for other in self.others)

    def holds_any(self, value: Any) -> bool:
        """The value, or one of its elements when it is a list, is in the set."""
        return self.holds(value) or (isinstance(value, list) and any(self.holds(v) for v in value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
