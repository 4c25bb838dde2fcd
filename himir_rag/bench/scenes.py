"""Composite photo benchmark: real photo cut-outs pasted on texture photos, with queries and qrels.

The cut-outs come from Debian's ``tuxpaint-stamps-default`` package (GPL-2), read at run
time from the installed package; the project ships none of them. Each scene holds 1-6
objects at scales from a few percent to half of the frame; each query names 2-3 objects
of one scene and its relevant set is every scene that holds all the named objects.
About a third of the scenes reuse 2-3 objects of an earlier scene, so that about half of
the queries have several relevant scenes.

Output layout under ``out_dir``::

    images/scene_00000.jpg ...
    scenes.jsonl    {"scene_id", "path", "width", "height", "background",
                     "objects": [{"name", "stamp", "bbox", "area_frac"}, ...]}
    queries.jsonl   {"id", "query", "objects", "scene_id"}  (scene_id: the source scene)
    qrels.jsonl     {"query_id", "scene_ids", "paths"}  (every relevant scene, sorted)
    manifest.json   seed, counts, generator version, stamp catalog fingerprint

Paths are relative to ``out_dir``. ``bbox`` is ``[x0, y0, x1, y1]`` in pixels, right and
bottom exclusive: the tight box of the object's alpha mask, clipped to the frame.
``area_frac`` is the box area over the frame area. Objects are listed in painting order,
largest first; a name denotes one stamp and appears at most once per scene.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage  # installed with scikit-image
from tqdm.auto import tqdm

from himir_rag.errors import HiMIRError

__all__ = [
    "GENERATOR_VERSION",
    "DEFAULT_STAMPS_DIRS",
    "QUERY_TEMPLATES",
    "QUERY_TEMPLATES_V2",
    "TEMPLATE_SETS",
    "StampsNotInstalledError",
    "Stamp",
    "BenchmarkSummary",
    "build_composite_benchmark",
    "clean_stamp_name",
    "english_description",
    "find_stamps_dir",
    "head_noun",
    "load_stamp_catalog",
    "read_jsonl",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
DEFAULT_STAMPS_DIRS = (
    Path("/usr/share/tuxpaint/stamps"),
    Path("/usr/local/share/tuxpaint/stamps"),
)
_INSTALL_HINT = (
    "install it with `sudo apt-get install tuxpaint-stamps-default` "
    "or run `benchmarks/install_stamps.sh`, or pass stamps_dir"
)

QUERY_TEMPLATES: dict[int, tuple[str, ...]] = {
    2: (
        "a photo with {0} and {1}",
        "{0} next to {1}",
        "which photo has {0} and {1}?",
        "{0} with {1}",
        "show me {0} near {1}",
        "a picture of {0} and {1}",
        "find the image where {0} appears together with {1}",
        "{0} and {1} in the same picture",
        "an image showing {0} beside {1}",
        "looking for a shot that contains {0} as well as {1}",
        "is there a photo of {0} and {1}?",
        "{1} and {0}",
    ),
    3: (
        "find the picture showing {0}, {1} and {2}",
        "a photo with {0}, {1} and {2}",
        "{0}, {1} and {2} together",
        "which image contains {0}, {1} and {2}?",
        "show me {0} near {1} and {2}",
        "a scene with {0} next to {1}, plus {2}",
        "{0} with {1} and {2}",
        "is there a photo of {0}, {1} and {2}?",
        "picture containing {0}, {1}, {2}",
        "I need the photo that has {0} and {1} and also {2}",
    ),
}

# A second, independent set of phrasings ("v2"), written for the held-out benchmark of the
# accuracy issue: no template shares its wording with QUERY_TEMPLATES, so a setting chosen on
# "v1" queries cannot be fitted to their phrasing.
QUERY_TEMPLATES_V2: dict[int, tuple[str, ...]] = {
    2: (
        "{0} beside {1}",
        "I remember a shot of {0} close to {1}",
        "where did I see {0} and {1}",
        "the one with {0} plus {1}",
        "can you find {0} together with {1}",
        "photo: {0}, {1}",
        "get me the picture including {0} and {1}",
        "{0} alongside {1}",
        "somewhere there is {0} and also {1}",
        "an image in which {0} and {1} both appear",
    ),
    3: (
        "{0}, {1}, {2}",
        "the shot with {0}, {1} as well as {2}",
        "can you find {0} plus {1} plus {2}",
        "I remember {0} and {1} with {2} nearby",
        "where are {0}, {1} and {2} together",
        "get me the picture including {0}, {1} and {2}",
        "an image in which {0}, {1} and {2} all appear",
        "{0} alongside {1} and {2}",
    ),
}
TEMPLATE_SETS: dict[str, dict[int, tuple[str, ...]]] = {"v1": QUERY_TEMPLATES, "v2": QUERY_TEMPLATES_V2}

# Stamp quality thresholds (pixels of the tight alpha box at source resolution).
_ALPHA_ON = 128
_MIN_LONG_SIDE = 48
_MIN_OPAQUE_PIXELS = 1000
_MIN_FILL = 0.08  # opaque share of the tight box; below: thin wisps, outlines
_MAX_FILL = 0.985  # above: a rectangle with no cut-out
_MAX_SOFT_ALPHA = 0.5  # share of translucent pixels; above: glass, smoke, fire
_MAX_FLAT_SHARE = 0.2  # share of interior pixels with a zero Laplacian; clip-art is flat
_MAX_UPSCALE = 4.0

# Scene layout.
_MAX_OBJECTS = 6
_MIN_AREA_FRAC = 0.02
_MAX_AREA_FRAC = 0.5
_MAX_OVERLAP = 0.2  # intersection / smaller box area
_OUTSIDE_MARGIN = 0.1  # share of a box allowed past each frame edge
_SHARE_PROB = 0.35  # chance a scene reuses 2-3 objects of an earlier scene
_MULTI_RELEVANT_SHARE = 0.5  # target share of queries with >= 2 relevant scenes
_JPEG_QUALITY = 92

_TEXTURE_TINTS = {
    "brick": (1.0, 0.62, 0.50),
    "grass": (0.62, 0.95, 0.42),
    "gravel": (0.95, 0.90, 0.82),
}


class StampsNotInstalledError(HiMIRError, FileNotFoundError):
    """The ``tuxpaint-stamps-default`` package (photo cut-outs) is not installed."""


@dataclass(frozen=True, eq=False)
class Stamp:
    """One usable photo cut-out.

    Attributes
    ----------
    name : str
        Short noun phrase from the English description, e.g. ``"a red apple"``.
    path : str
        PNG path relative to the stamps directory.
    rgba : np.ndarray
        Read-only uint8 pixels cropped to the tight alpha box, shape (h, w, 4).
    mirrorable : bool
        False when the package says the stamp must not be mirrored (text, coins).
    """

    name: str
    path: str
    rgba: np.ndarray
    mirrorable: bool

    @property
    def head(self) -> str:
        """The kind of thing the stamp shows (see :func:`head_noun`)."""
        return head_noun(self.name)


@dataclass(frozen=True)
class BenchmarkSummary:
    """What :func:`build_composite_benchmark` wrote.

    Attributes
    ----------
    out_dir, images_dir, scenes_path, queries_path, qrels_path, manifest_path : Path
        Output locations.
    n_scenes, n_queries, n_objects, n_stamps : int
        Scenes written, queries written, objects placed over all scenes, usable stamps.
    seed : int
        The seed the benchmark was built with.
    """

    out_dir: Path
    images_dir: Path
    scenes_path: Path
    queries_path: Path
    qrels_path: Path
    manifest_path: Path
    n_scenes: int
    n_queries: int
    n_objects: int
    n_stamps: int
    seed: int


# ---------------------------------------------------------------------------
# Names


_LANG_TAG = re.compile(r"^(?P<lang>[a-z]{2,3}(?:_[A-Z]{2})?(?:@\w+)?)\.utf8=(?P<text>.*)$")
_FILLER_PREFIX = re.compile(r"^(?:this is|these are|it is|it's|here is|here's|that is)\s+")
_ARTICLES = frozenset({"a", "an", "the", "some"})
# A description often goes on after its noun phrase: "A stethoscope lets your doctor...".
_VERB_CUT = re.compile(
    r"\s+(?:is|are|was|were|means|lets|resembles|gets|carries|carry|used|called|covered|"
    r"hatched|made|making|stands|must|should|will)\b.*$"
)
_NOT_NOUN_PHRASE = frozenset(
    {
        "this", "these", "we", "you", "your", "it", "our", "there", "because", "no", "ahead",
        "boom", "eat", "remember", "enter", "put", "give", "drive", "stop", "go", "take",
    }
)  # fmt: skip
_PREPOSITIONS = frozenset({"with", "from", "for", "in", "on", "at", "to", "of", "by"})
_CLAUSE_START = frozenset(
    {"from", "also", "which", "or", "a", "an", "the", "called", "with", "and", "that", "like"}
)
_NAME_CHARS = re.compile(r"^[a-z][a-z' -]*$")
_MAX_NAME_WORDS = 4
# Head nouns that name the same kind of thing; one stamp per kind keeps qrels unambiguous.
_HEAD_SYNONYMS = {
    "bunny": "rabbit", "drake": "duck", "doe": "deer", "dromedary": "camel", "lamb": "sheep",
    "hen": "chicken", "rooster": "chicken", "seagull": "gull", "headstone": "gravestone",
    "tombstone": "gravestone", "marker": "gravestone", "stone": "gravestone",
}  # fmt: skip
# Heads whose modifier makes a different kind: a sea lion is no lion, a fire truck no garbage truck.
_COMPOUND_HEADS = frozenset({"ball", "bin", "crossing", "fruit", "tree", "truck", "lion", "turkey"})


def english_description(text: str) -> str | None:
    """Return the English description from a Tux Paint stamp ``.txt`` file.

    The untagged first line is English; translations follow as ``xx.utf8=...``.
    When no untagged line exists, an ``en*.utf8=`` line is used.

    Parameters
    ----------
    text : str
        The whole file content.

    Returns
    -------
    str or None
        The description, stripped; None when the file has no English text.

    Example
    -------
    >>> english_description("A frog.\\nfr.utf8=Une grenouille.")
    'A frog.'
    """
    tagged_english = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        match = _LANG_TAG.match(line)
        if match is None:
            return line
        if tagged_english is None and match["lang"].startswith("en"):
            tagged_english = match["text"].strip() or None
    return tagged_english


def clean_stamp_name(description: str) -> str | None:
    """Reduce a stamp description to a short lower-case noun phrase.

    Keeps the first sentence, drops parentheticals, quotes, dash asides, trailing
    clauses and verb phrases, and "This is" openings; fixes "a"/"an". Bare nouns
    ("Teddy bear.") stay bare, since many are proper names ("Venus").

    Parameters
    ----------
    description : str
        English description, e.g. ``"A spiny lobster, from the Hawaiian islands."``.

    Returns
    -------
    str or None
        The name (1-4 words after the article), or None when the description is not
        a short noun phrase (an instruction, digits, symbols...).

    Example
    -------
    >>> clean_stamp_name("An albino peahen (a female peafowl, or peacock).")
    'an albino peahen'
    >>> clean_stamp_name("Eat your broccoli!") is None
    True
    """
    text = _FILLER_PREFIX.sub("", _first_phrase(description))
    text = _VERB_CUT.sub("", text)
    if not text or not _NAME_CHARS.match(text):
        return None
    words = text.split()
    if words[0] == "another":
        words[0] = "a"
    if _NOT_NOUN_PHRASE.intersection(words) or words[0] in _PREPOSITIONS:
        return None
    if len(words) > 2 and words[1] == "the":
        words = words[1:]  # "George the blue groper"
    content = words[1:] if words[0] in _ARTICLES else words
    if not 1 <= len(content) <= _MAX_NAME_WORDS:
        return None
    if words[0] in ("a", "an"):
        words[0] = _indefinite_article(words[1])
    return " ".join(words)


def _first_phrase(description: str) -> str:
    """Normalise quotes and cut the description down to its first plain phrase."""
    text = unicodedata.normalize("NFKC", description)
    text = text.translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'}))
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", text)
    text = re.split(r"\s*[\u2014\u2013:;]\s*|\s+-\s+|\u2026", text)[0]
    text = re.split(r"[.!?](?:\s|$)|[.!?]$", text.strip())[0]
    text = text.replace('"', " ").replace("\u00ab", " ").replace("\u00bb", " ")
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text.lower())
    parts = [p.strip() for p in text.split(",")]
    kept = [parts[0]]
    for part in parts[1:]:
        if not part or part.split()[0] in _CLAUSE_START:
            break
        kept.append(part)
    return " ".join(" ".join(kept).split())


def _indefinite_article(word: str) -> str:
    vowel_sound = word[0] in "aeiou" and not word.startswith(("eu", "uni", "uk", "us", "one"))
    return "an" if vowel_sound or word.startswith(("hour", "honest")) else "a"


def _singular(word: str) -> str:
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    return word[:-1]


def head_noun(name: str) -> str:
    """The kind of thing a name denotes: its singular last word, synonyms merged.

    Parameters
    ----------
    name : str
        A cleaned stamp name.

    Returns
    -------
    str

    Example
    -------
    >>> head_noun("two wild boars"), head_noun("a floppy-eared bunny"), head_noun("a sea lion")
    ('boar', 'rabbit', 'sea lion')
    """
    words = name.split()
    content = words[1:] if words[0] in _ARTICLES else words
    word = _singular(content[-1])
    if word in _COMPOUND_HEADS and len(content) > 1:
        return f"{content[-2]} {word}"
    return _HEAD_SYNONYMS.get(word, word)


# ---------------------------------------------------------------------------
# Stamp catalog


def find_stamps_dir(stamps_dir: Path | None = None) -> Path:
    """Locate the installed Tux Paint stamps.

    Parameters
    ----------
    stamps_dir : Path, optional
        Explicit directory; default: the Debian install locations.

    Returns
    -------
    Path
        A directory holding the stamp PNG and description files.

    Raises
    ------
    StampsNotInstalledError
        If the directory is missing or holds no PNG stamps.

    Example
    -------
    >>> find_stamps_dir()  # doctest: +SKIP
    PosixPath('/usr/share/tuxpaint/stamps')
    """
    candidates = [Path(stamps_dir)] if stamps_dir is not None else list(DEFAULT_STAMPS_DIRS)
    for candidate in candidates:
        if candidate.is_dir() and next(candidate.rglob("*.png"), None) is not None:
            return candidate
    where = ", ".join(str(c) for c in candidates)
    raise StampsNotInstalledError(
        f"no Tux Paint photo stamps found in {where}; the benchmark needs Debian's "
        f"tuxpaint-stamps-default package: {_INSTALL_HINT}"
    )


def load_stamp_catalog(stamps_dir: Path | None = None, *, max_side: int = 640) -> tuple[Stamp, ...]:
    """Load every usable photo cut-out with a clean, unique name.

    A stamp is kept when it is a raster PNG with a real alpha cut-out, photo-like
    colours (not clip-art), large enough, not in a ``cartoon`` or ``symbols`` folder,
    not a recolourable template, and its description cleans to a short noun phrase.
    When names collide the first stamp in sorted path order is kept. Results are cached
    per directory and ``max_side``.

    Parameters
    ----------
    stamps_dir : Path, optional
        Stamps directory; default: :func:`find_stamps_dir`.
    max_side : int
        Cut-outs whose longer side exceeds this are downscaled to it.

    Returns
    -------
    tuple of Stamp
        Sorted by stamp path.

    Raises
    ------
    StampsNotInstalledError
        If the stamps are not installed or none is usable.

    Example
    -------
    >>> catalog = load_stamp_catalog()  # doctest: +SKIP
    >>> catalog[0].name, catalog[0].rgba.shape  # doctest: +SKIP
    ('a frog', (200, 171, 4))
    """
    root = find_stamps_dir(stamps_dir).resolve()
    catalog = _cached_catalog(str(root), int(max_side))
    if not catalog:
        raise StampsNotInstalledError(f"{root}: no usable photo stamp found; {_INSTALL_HINT}")
    return catalog


@functools.lru_cache(maxsize=4)
def _cached_catalog(root: str, max_side: int) -> tuple[Stamp, ...]:
    root_path = Path(root)
    pngs = sorted(root_path.rglob("*.png"), key=lambda p: p.relative_to(root_path).as_posix())
    reasons: Counter[str] = Counter()
    usable = []
    for png in pngs:
        stamp, reason = _load_stamp(png, root_path, max_side=max_side)
        if stamp is None:
            reasons[reason] += 1
        else:
            usable.append(stamp)
    catalog = _one_per_kind(usable)
    reasons["same kind as another stamp"] += len(usable) - len(catalog)
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()) if n)
    logger.info("kept %d of %d PNG stamps in %s (skipped: %s)", len(catalog), len(pngs), root, skipped)
    return catalog


def _one_per_kind(stamps: Sequence[Stamp]) -> tuple[Stamp, ...]:
    """Keep one stamp per head noun, preferring the plainest name.

    "a red apple" and "a green apple" in different scenes would make a query for one
    of them ambiguous, so only one apple stays.
    """
    best: dict[str, Stamp] = {}
    for stamp in stamps:  # sorted by path, so ties keep the first path
        current = best.get(stamp.head)
        if current is None or _name_rank(stamp) < _name_rank(current):
            best[stamp.head] = stamp
    return tuple(sorted(best.values(), key=lambda s: s.path))


def _name_rank(stamp: Stamp) -> tuple[int, bool]:
    """Shorter names first; then names ending in the kind itself ("a duck" over "a drake")."""
    words = stamp.name.split()
    return len(words), _singular(words[-1]) != stamp.head.split()[-1]


def _load_stamp(png: Path, root: Path, *, max_side: int) -> tuple[Stamp | None, str]:
    """Load one stamp, or return None and the reason it is unusable."""
    rel = png.relative_to(root).as_posix()
    options = _stamp_options(png)
    reason = _path_rejection(png, rel, options)
    if reason is not None:
        return None, reason
    description = english_description(png.with_suffix(".txt").read_text("utf-8", "replace"))
    name = clean_stamp_name(description or "")
    if name is None:
        return None, "name not a short noun phrase"
    try:
        with Image.open(png) as img:
            rgba = np.asarray(img.convert("RGBA"))
    except OSError as exc:
        logger.debug("%s: unreadable (%s)", png, exc)
        return None, "unreadable"
    reason = _pixel_rejection(rgba)
    if reason is not None:
        return None, reason
    cut = _downscaled(_crop_to_alpha(rgba), max_side=max_side)
    cut.setflags(write=False)
    return Stamp(name=name, path=rel, rgba=cut, mirrorable="nomirror" not in options), ""


def _path_rejection(png: Path, rel: str, options: frozenset[str]) -> str | None:
    parts = rel.split("/")
    if parts[0] == "symbols" or "cartoon" in parts[:-1]:
        return "clip-art folder"
    if not png.with_suffix(".txt").is_file():
        return "no description"
    if "colorable" in options or "tintable" in options:
        return "recolourable template"
    return None


def _stamp_options(png: Path) -> frozenset[str]:
    dat = png.with_suffix(".dat")
    if not dat.is_file():
        return frozenset()
    return frozenset(re.findall(r"[a-z]+", dat.read_text("utf-8", "replace").lower()))


def _pixel_rejection(rgba: np.ndarray) -> str | None:
    """Reason a decoded RGBA stamp is not a usable photo cut-out, or None."""
    alpha = rgba[..., 3]
    opaque = alpha >= _ALPHA_ON
    if alpha.min() >= 250 or not opaque.any():
        return "no alpha cut-out"
    ys, xs = np.nonzero(opaque)
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    n_opaque = int(opaque.sum())
    if max(box_h, box_w) < _MIN_LONG_SIDE or n_opaque < _MIN_OPAQUE_PIXELS:
        return "too small"
    fill = n_opaque / float(box_h * box_w)
    if not _MIN_FILL <= fill <= _MAX_FILL:
        return "alpha mask not a cut-out"
    visible = alpha > 0
    if np.count_nonzero(visible & (alpha < 255)) > _MAX_SOFT_ALPHA * np.count_nonzero(visible):
        return "translucent"
    if not _photo_like(rgba):
        return "flat clip-art"
    return None


def _photo_like(rgba: np.ndarray) -> bool:
    """Photos have texture and noise everywhere; clip-art has flat fills (zero Laplacian).

    Colour counts would reject grey photos (the moon, gravestones), so this looks at
    luminance curvature inside the opaque mask, away from its anti-aliased edge.
    """
    interior = ndimage.binary_erosion(rgba[..., 3] >= 250, iterations=2)
    if np.count_nonzero(interior) < 200:
        return False
    luminance = rgba[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    flat = np.abs(ndimage.laplace(luminance))[interior] < 0.5
    return float(flat.mean()) <= _MAX_FLAT_SHARE


def _crop_to_alpha(rgba: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(rgba[..., 3] >= _ALPHA_ON)
    return rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _downscaled(rgba: np.ndarray, *, max_side: int) -> np.ndarray:
    h, w = rgba.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return np.ascontiguousarray(rgba)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgba, "RGBA").resize(size, Image.Resampling.LANCZOS))


# ---------------------------------------------------------------------------
# Backgrounds


@functools.cache
def _texture(name: str) -> np.ndarray | None:
    """A grey texture photo from scikit-image, or None where it would need a download."""
    try:
        import skimage.data

        gray = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
    except Exception as exc:  # fetch errors differ across scikit-image versions
        logger.warning("scikit-image texture %r unavailable offline (%s); not used", name, exc)
        return None
    if gray.ndim != 2:
        return None
    gray.setflags(write=False)
    return gray


def _background_kinds() -> tuple[tuple[str, ...], np.ndarray]:
    """Available background kinds and their probabilities (textures 60%, plain/gradient 40%)."""
    textures = tuple(name for name in sorted(_TEXTURE_TINTS) if _texture(name) is not None)
    kinds = (*textures, "plain", "gradient")
    if not textures:
        return kinds, np.array([0.5, 0.5])
    probs = np.array([0.6 / len(textures)] * len(textures) + [0.2, 0.2])
    return kinds, probs


def _render_background(kind: str, rng: np.random.Generator, *, size: tuple[int, int]) -> np.ndarray:
    """Background pixels, float32 of shape (height, width, 3) in [0, 255]."""
    width, height = size
    if kind == "plain":
        colour = rng.uniform(50, 230, size=3)
        canvas = np.broadcast_to(colour, (height, width, 3)) + rng.normal(0, 3, (height, width, 1))
    elif kind == "gradient":
        start, stop = rng.uniform(30, 240, size=(2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1.0) / 2.0
        canvas = start + t[..., None] * (stop - start)
    else:
        canvas = _texture_background(kind, rng, size=size)
    return np.clip(canvas, 0, 255).astype(np.float32)


def _texture_background(kind: str, rng: np.random.Generator, *, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    gray = _texture(kind)
    src_h, src_w = gray.shape
    zoom = min(src_w / width, src_h / height) * rng.uniform(0.5, 1.0)  # a crop of the frame's shape
    crop_w, crop_h = max(1, int(width * zoom)), max(1, int(height * zoom))
    x0 = int(rng.integers(0, src_w - crop_w + 1))
    y0 = int(rng.integers(0, src_h - crop_h + 1))
    patch = Image.fromarray(gray[y0 : y0 + crop_h, x0 : x0 + crop_w])
    patch = patch.resize((width, height), Image.Resampling.BILINEAR)
    tex = np.asarray(patch, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        tex = tex[:, ::-1]
    tint = np.asarray(_TEXTURE_TINTS[kind]) * rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.8, 1.2)
    return tex[..., None] * tint * 255.0


# ---------------------------------------------------------------------------
# Scene composition and rendering


@dataclass(frozen=True)
class _Placed:
    stamp: int
    bbox: tuple[int, int, int, int]


def _compose_scenes(n_stamps: int, n_scenes: int, rng: np.random.Generator) -> list[list[int]]:
    """Pick the stamps of every scene; some scenes reuse 2-3 stamps of an earlier one.

    Reuse makes object sets recur, so that some queries have several relevant scenes.
    """
    scenes: list[list[int]] = []
    for _ in range(n_scenes):
        n_objects = int(rng.integers(1, min(_MAX_OBJECTS, n_stamps) + 1))
        chosen: list[int] = []
        donors = [s for s in scenes if len(s) >= 2]
        if donors and rng.random() < _SHARE_PROB:
            donor = donors[int(rng.integers(len(donors)))]
            k = int(rng.integers(2, min(3, len(donor)) + 1))
            chosen = [int(i) for i in rng.choice(donor, size=k, replace=False)]
            n_objects = max(n_objects, k)
        fresh = [int(i) for i in rng.permutation(n_stamps) if int(i) not in chosen]
        scenes.append(chosen + fresh[: n_objects - len(chosen)])
    return scenes


def _render_scene(
    stamps: Sequence[Stamp], rng: np.random.Generator, *, size: tuple[int, int], background: str
) -> tuple[np.ndarray, list[_Placed]]:
    """Paste the stamps, largest first, at random non-overlapping spots.

    Returns the uint8 image, shape (height, width, 3), and the placed objects with the
    tight box of their visible alpha; stamps that find no free spot are left out.
    """
    canvas = _render_background(background, rng, size=size)
    max_area = min(_MAX_AREA_FRAC, 1.2 / len(stamps))
    targets = np.exp(rng.uniform(np.log(_MIN_AREA_FRAC), np.log(max_area), size=len(stamps)))
    order = np.argsort(-targets, kind="stable")
    boxes: list[tuple[float, float, float, float]] = []
    placed: list[_Placed] = []
    for i in order:
        stamp = stamps[int(i)]
        box = _find_spot(stamp.rgba.shape[:2], float(targets[i]), boxes, rng, size=size)
        if box is None:
            logger.debug("no free spot for %s; left out of the scene", stamp.name)
            continue
        tight = _paste(canvas, stamp, box, rng)
        if tight is None:
            continue
        boxes.append(box)
        placed.append(_Placed(stamp=int(i), bbox=tight))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), placed


def _find_spot(
    shape: tuple[int, int],
    area_frac: float,
    boxes: Sequence[tuple[float, float, float, float]],
    rng: np.random.Generator,
    *,
    size: tuple[int, int],
    tries: int = 30,
) -> tuple[float, float, float, float] | None:
    """A box (x0, y0, x1, y1) of about ``area_frac`` of the frame overlapping little with ``boxes``."""
    width, height = size
    h, w = shape
    scale = np.sqrt(area_frac * width * height / (w * h))
    scale = min(scale, 0.95 * width / w, 0.95 * height / h, _MAX_UPSCALE)
    for _ in range(4):
        bw, bh = w * scale, h * scale
        if min(bw, bh) < 4:
            return None
        for _ in range(tries):
            x0 = rng.uniform(-_OUTSIDE_MARGIN * bw, width - (1 - _OUTSIDE_MARGIN) * bw)
            y0 = rng.uniform(-_OUTSIDE_MARGIN * bh, height - (1 - _OUTSIDE_MARGIN) * bh)
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(_overlap(box, other) <= _MAX_OVERLAP for other in boxes):
                return box
        scale *= 0.75
    return None


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _paste(
    canvas: np.ndarray, stamp: Stamp, box: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int] | None:
    """Alpha-blend ``stamp`` into ``box`` in place; return the tight visible box or None."""
    height, width = canvas.shape[:2]
    x0, y0 = round(box[0]), round(box[1])
    bw, bh = max(1, round(box[2] - box[0])), max(1, round(box[3] - box[1]))
    pixels = Image.fromarray(stamp.rgba, "RGBA").resize((bw, bh), Image.Resampling.LANCZOS)
    rgba = np.asarray(pixels, dtype=np.float32)
    if stamp.mirrorable and rng.random() < 0.5:
        rgba = rgba[:, ::-1]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + bw, width), min(y0 + bh, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    part = rgba[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    alpha = part[..., 3:] / 255.0
    colour = np.clip(part[..., :3] * rng.uniform(0.9, 1.1), 0, 255)
    region = canvas[cy0:cy1, cx0:cx1]
    region *= 1.0 - alpha
    region += alpha * colour
    ys, xs = np.nonzero(part[..., 3] >= _ALPHA_ON)
    if ys.size == 0:
        return None
    return (cx0 + int(xs.min()), cy0 + int(ys.min()), cx0 + int(xs.max()) + 1, cy0 + int(ys.max()) + 1)


# ---------------------------------------------------------------------------
# Queries


def _select_queries(
    scene_names: Sequence[Sequence[str]], n_queries: int, rng: np.random.Generator
) -> list[tuple[int, tuple[str, ...], list[int]]]:
    """Choose (source scene, named objects, relevant scenes) triples.

    Aims for about half the queries with several relevant scenes (object sets that
    recur across scenes) and half with one; every object set is used once.
    """
    holders: dict[str, set[int]] = {}
    for scene, names in enumerate(scene_names):
        for name in names:
            holders.setdefault(name, set()).add(scene)
    seen: set[frozenset[str]] = set()
    multi: list[tuple[int, tuple[str, ...], list[int]]] = []
    single: list[tuple[int, tuple[str, ...], list[int]]] = []
    for scene, names in enumerate(scene_names):
        for k in (2, 3):
            for combo in itertools.combinations(names, k):
                if frozenset(combo) in seen:
                    continue
                seen.add(frozenset(combo))
                relevant = sorted(set.intersection(*(holders[n] for n in combo)))
                (multi if len(relevant) > 1 else single).append((scene, combo, relevant))
    n_multi = min(len(multi), round(n_queries * _MULTI_RELEVANT_SHARE))
    n_single = min(len(single), n_queries - n_multi)
    n_multi = min(len(multi), n_queries - n_single)
    chosen = _spread_pick(multi, n_multi, rng) + _spread_pick(single, n_single, rng)
    if len(chosen) < n_queries:
        logger.warning(
            "only %d distinct object sets of 2-3 objects; writing %d queries, not %d",
            len(chosen),
            len(chosen),
            n_queries,
        )
    order = rng.permutation(len(chosen))
    return [chosen[int(i)] for i in order]


def _spread_pick(pool: list, count: int, rng: np.random.Generator) -> list:
    """``count`` random items of ``pool``, preferring ones from source scenes not yet used."""
    shuffled = [pool[int(i)] for i in rng.permutation(len(pool))]
    used: set[int] = set()
    first, rest = [], []
    for item in shuffled:
        (rest if item[0] in used else first).append(item)
        used.add(item[0])
    return (first + rest)[:count]


def _phrase_query(names: Sequence[str], rng: np.random.Generator, *, templates: str = "v1") -> str:
    ordered = [names[int(i)] for i in rng.permutation(len(names))]
    templates = TEMPLATE_SETS[templates][len(ordered)]
    return templates[int(rng.integers(len(templates)))].format(*ordered)


# ---------------------------------------------------------------------------
# Build


def build_composite_benchmark(
    out_dir: Path,
    *,
    scenes: int = 400,
    queries: int = 150,
    seed: int = 0,
    image_size: tuple[int, int] = (640, 480),
    stamps_dir: Path | None = None,
    progress: bool = True,
    templates: str = "v1",
) -> BenchmarkSummary:
    """Build the composite photo benchmark: scene images, queries and qrels.

    Parameters
    ----------
    out_dir : Path
        Output directory; created if missing. Existing benchmark files are replaced.
    scenes : int
        Number of scene images.
    queries : int
        Number of queries; fewer are written (with a warning) when the scenes do not
        hold that many distinct sets of 2-3 objects.
    seed : int
        Seed of every random choice; the same seed on the same stamps gives
        byte-identical jsonl files and identical images.
    image_size : tuple of int
        ``(width, height)`` of every scene image.
    stamps_dir : Path, optional
        Tux Paint stamps directory; default: the installed package.
    progress : bool
        Show a progress bar on stderr.
    templates : {"v1", "v2"}
        Which set of query phrasings (:data:`TEMPLATE_SETS`); ``v2`` is the held-out set
        whose wording no ``v1`` template shares. Recorded in the manifest.

    Returns
    -------
    BenchmarkSummary
        Counts and output paths.

    Raises
    ------
    StampsNotInstalledError
        If ``tuxpaint-stamps-default`` is not installed (a ``FileNotFoundError``).
    ValueError
        If a count or the image size is out of range.

    Example
    -------
    >>> summary = build_composite_benchmark(Path("bench"), scenes=40, queries=10)  # doctest: +SKIP
    >>> summary.n_scenes  # doctest: +SKIP
    40
    """
    width, height = _validate(scenes=scenes, queries=queries, image_size=image_size)
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates {templates!r} is unknown; use one of {', '.join(TEMPLATE_SETS)}")
    catalog = load_stamp_catalog(stamps_dir, max_side=max(width, height))
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    compose_seq, render_seq, query_seq = np.random.SeedSequence(seed).spawn(3)
    composition = _compose_scenes(len(catalog), scenes, np.random.default_rng(compose_seq))
    records = _render_all(
        catalog, composition, render_seq.spawn(scenes), out_dir, size=(width, height), progress=progress
    )
    _remove_stale_images(images_dir, keep={Path(r["path"]).name for r in records})
    query_rows, qrel_rows = _make_queries(records, queries, np.random.default_rng(query_seq), templates=templates)
    manifest = _manifest(seed=seed, size=(width, height), catalog=catalog, records=records, qrels=qrel_rows)
    manifest["query_templates"] = templates
    paths = _write_outputs(out_dir, scenes=records, queries=query_rows, qrels=qrel_rows, manifest=manifest)
    n_objects = manifest["counts"]["objects"]
    logger.info(
        "wrote %d scenes (%d objects) and %d queries to %s", len(records), n_objects, len(query_rows), out_dir
    )
    return BenchmarkSummary(
        out_dir=out_dir,
        images_dir=images_dir,
        scenes_path=paths["scenes"],
        queries_path=paths["queries"],
        qrels_path=paths["qrels"],
        manifest_path=paths["manifest"],
        n_scenes=len(records),
        n_queries=len(query_rows),
        n_objects=n_objects,
        n_stamps=len(catalog),
        seed=seed,
    )


def _validate(*, scenes: int, queries: int, image_size: tuple[int, int]) -> tuple[int, int]:
    if scenes < 1:
        raise ValueError(f"scenes={scenes}; expected at least 1 scene")
    if queries < 1:
        raise ValueError(f"queries={queries}; expected at least 1 query")
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"image_size={image_size!r}; expected (width, height), each at least 32 pixels")
    return int(image_size[0]), int(image_size[1])


def _render_all(
    catalog: Sequence[Stamp],
    composition: Sequence[Sequence[int]],
    seeds: Sequence[np.random.SeedSequence],
    out_dir: Path,
    *,
    size: tuple[int, int],
    progress: bool,
) -> list[dict[str, Any]]:
    """Render and save every scene; return the scenes.jsonl records."""
    kinds, probs = _background_kinds()
    records = []
    bar = tqdm(
        total=len(composition), desc="rendering scenes", unit="scene", file=sys.stderr, disable=not progress
    )
    with bar:
        for index, (stamp_ids, seq) in enumerate(zip(composition, seeds, strict=True)):
            rng = np.random.default_rng(seq)
            background = str(kinds[int(rng.choice(len(kinds), p=probs))])
            stamps = [catalog[i] for i in stamp_ids]
            pixels, placed = _render_scene(stamps, rng, size=size, background=background)
            rel = f"images/scene_{index:05d}.jpg"
            Image.fromarray(pixels, "RGB").save(out_dir / rel, format="JPEG", quality=_JPEG_QUALITY)
            records.append(_scene_record(index, rel, size, background, stamps, placed))
            bar.update(1)
    return records


def _scene_record(
    index: int,
    rel: str,
    size: tuple[int, int],
    background: str,
    stamps: Sequence[Stamp],
    placed: Sequence[_Placed],
) -> dict[str, Any]:
    width, height = size
    objects = []
    for item in placed:
        x0, y0, x1, y1 = item.bbox
        stamp = stamps[item.stamp]
        area = (x1 - x0) * (y1 - y0) / float(width * height)
        objects.append(
            {"name": stamp.name, "stamp": stamp.path, "bbox": [x0, y0, x1, y1], "area_frac": round(area, 6)}
        )
    return {
        "scene_id": f"scene_{index:05d}",
        "path": rel,
        "width": width,
        "height": height,
        "background": background,
        "objects": objects,
    }


def _make_queries(
    records: Sequence[dict[str, Any]], n_queries: int, rng: np.random.Generator, *, templates: str = "v1"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    scene_names = [[obj["name"] for obj in r["objects"]] for r in records]
    query_rows, qrel_rows = [], []
    for number, (source, names, relevant) in enumerate(_select_queries(scene_names, n_queries, rng)):
        query_id = f"q{number:05d}"
        query_rows.append(
            {
                "id": query_id,
                "query": _phrase_query(names, rng, templates=templates),
                "objects": list(names),
                "scene_id": records[source]["scene_id"],
            }
        )
        qrel_rows.append(
            {
                "query_id": query_id,
                "scene_ids": [records[i]["scene_id"] for i in relevant],
                "paths": [records[i]["path"] for i in relevant],
            }
        )
    return query_rows, qrel_rows


def _remove_stale_images(images_dir: Path, *, keep: set[str]) -> None:
    """Delete scene images left by an earlier, larger build in the same directory."""
    stale = [p for p in sorted(images_dir.glob("scene_*.jpg")) if p.name not in keep]
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d stale scene images from %s", len(stale), images_dir)


def _write_outputs(
    out_dir: Path, *, manifest: dict[str, Any], **tables: list[dict[str, Any]]
) -> dict[str, Path]:
    """Write ``<name>.jsonl`` for each table and ``manifest.json``; return their paths by name."""
    paths = {name: out_dir / f"{name}.jsonl" for name in tables}
    for name, rows in tables.items():
        _write_jsonl(paths[name], rows)
    paths["manifest"] = out_dir / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _manifest(
    *,
    seed: int,
    size: tuple[int, int],
    catalog: Sequence[Stamp],
    records: Sequence[dict[str, Any]],
    qrels: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    fingerprint = hashlib.sha256("\n".join(f"{s.path}\t{s.name}" for s in catalog).encode()).hexdigest()
    n_relevant = [len(q["scene_ids"]) for q in qrels]
    n_objects = sum(len(r["objects"]) for r in records)
    return {
        "generator": "himir_rag.bench.scenes",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": list(size),
        "counts": {
            "scenes": len(records),
            "queries": len(qrels),
            "objects": n_objects,
            "stamps": len(catalog),
            "queries_with_several_relevant": sum(n > 1 for n in n_relevant),
            "max_relevant": max(n_relevant, default=0),
        },
        "stamps": {"package": "tuxpaint-stamps-default", "license": "GPL-2.0", "catalog_sha256": fingerprint},
        "files": {
            "images": "images/",
            "scenes": "scenes.jsonl",
            "queries": "queries.jsonl",
            "qrels": "qrels.jsonl",
        },
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a jsonl file written by the benchmark builder.

    Parameters
    ----------
    path : Path
        ``scenes.jsonl``, ``queries.jsonl`` or ``qrels.jsonl``.

    Returns
    -------
    list of dict
        One dict per non-empty line, in file order.

    Example
    -------
    >>> qrels = read_jsonl(Path("bench/qrels.jsonl"))  # doctest: +SKIP
    """
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
