"""Shared fixtures: a tiny deterministic colour encoder and small synthetic photo sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _prompt_cache_in_tmp(tmp_path_factory):
    """Tests never read or write the user's cache of class-prompt embeddings (HIMIR_CACHE_DIR)."""
    os.environ["HIMIR_CACHE_DIR"] = str(tmp_path_factory.mktemp("himir-cache"))

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
}
_NAMES = list(COLORS)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)


class ColorEncoder:
    """Fast, deterministic stand-in encoder: a crop embeds as its colour histogram over
    eight named colours; a text embeds as the colour words it names. Same space, so
    "a red square and a blue square" finds the photo holding both."""

    name = "test:color"
    dim = len(COLORS) + 1

    def __init__(self) -> None:
        self.image_calls = 0
        self.text_calls = 0

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        self.image_calls += 1
        out = np.zeros((len(images), self.dim), np.float32)
        for i, img in enumerate(images):
            pixels = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32).reshape(-1, 3)
            nearest = np.linalg.norm(pixels[:, None, :] - _PALETTE[None], axis=-1).argmin(axis=1)
            out[i, : len(COLORS)] = np.bincount(nearest, minlength=len(COLORS)) / len(pixels)
            out[i, -1] = 0.05
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.text_calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for j, name in enumerate(_NAMES):
                if name in text.lower():
                    out[i, j] = 1.0
            out[i, -1] = 0.05
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class RegionColorEncoder(ColorEncoder):
    """The colour encoder with an ``embed_regions`` that crops: enough to exercise the roi plumbing
    (``region_calls`` counts its calls: one per chunk of photos)."""

    name = "test:color-regions"

    def __init__(self) -> None:
        super().__init__()
        self.region_calls = 0

    def embed_regions(self, images, boxes):
        self.region_calls += 1
        return self.embed_images([im.crop(tuple(int(v) for v in box)) for im, bs in zip(images, boxes) for box in bs])


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` L2-normalised, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def plant_queries(vectors: list[np.ndarray], rng: np.random.Generator, *, n_queries: int, n_subs: int,
                  noise: float, first_id: int = 1) -> tuple[list[np.ndarray], list[set[int]]]:
    """Plant each query's ``n_subs`` random sub-queries in distinct fine segments (rows 5-20 of a
    1+4+16 tree) of 2 target images, in place; returns the queries and their target image ids."""
    n_images, dim = len(vectors), vectors[0].shape[1]
    queries, targets = [], []
    for _ in range(n_queries):
        subs = unit(rng.normal(size=(n_subs, dim)))
        chosen = rng.choice(n_images, 2, replace=False)
        for image in chosen:
            for s, seg in enumerate(rng.choice(np.arange(5, 21), n_subs, replace=False)):
                vectors[image][seg] = unit(subs[s] + rng.normal(size=dim) * noise)
        queries.append(subs)
        targets.append(set((chosen + first_id).tolist()))
    return queries, targets


def make_scene(path: Path, squares: list[tuple[str, tuple[int, int, int, int]]], *, size=(160, 120),
               background: str = "white") -> Path:
    """Save a PNG of coloured rectangles ``(colour, (x0, y0, x1, y1))`` on a background."""
    img = Image.new("RGB", size, COLORS[background])
    for colour, box in squares:
        img.paste(COLORS[colour], box)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def color_encoder() -> ColorEncoder:
    return ColorEncoder()


@pytest.fixture
def scene_dir(tmp_path: Path) -> Path:
    """Six photos: single colours and two-object scenes in different corners."""
    root = tmp_path / "photos"
    make_scene(root / "red_blue.png", [("red", (5, 5, 50, 45)), ("blue", (100, 70, 150, 115))])
    make_scene(root / "red_green.png", [("red", (100, 5, 150, 45)), ("green", (5, 70, 55, 115))])
    make_scene(root / "all_red.png", [("red", (0, 0, 160, 120))])
    make_scene(root / "all_blue.png", [("blue", (0, 0, 160, 120))])
    make_scene(root / "sub" / "yellow_purple.png", [("yellow", (10, 10, 60, 60)), ("purple", (90, 60, 150, 110))])
    make_scene(root / "sub" / "orange.png", [("orange", (40, 30, 120, 90))])
    return root


@pytest.fixture(scope="session")
def offline_encoder():
    """The real offline encoder (loaded once per test session; ~15 s)."""
    from himir_rag.encoders.offline import OfflineEncoder

    return OfflineEncoder()


STORE_KINDS = ["faiss", "qdrant"]


def make_store(kind: str, dim: int, folder: Path):
    """None for the default in-memory/FAISS store; a Qdrant store in embedded local mode."""
    if kind == "faiss":
        return None
    from himir_rag.store.qdrant import QdrantImageStore

    return QdrantImageStore.open(f"photos-{folder.name}", dim=dim, path=str(folder / "qdrant"))


@pytest.fixture(params=STORE_KINDS)
def store_kind(request) -> str:
    """Runs a test once per store backend (the same retrieval contract for each)."""
    return request.param


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The demo photos indexed with the real offline encoder, saved: (index dir, {stem: photo}).

    Built once per session (~30 s) for the photo-query and ``himir serve`` tests.
    """
    from himir_rag.demo import write_demo_photos
    from himir_rag.index import HiMIRIndex

    root = tmp_path_factory.mktemp("demo-index")
    photos = {p.stem: p for p in write_demo_photos(root / "photos")}
    HiMIRIndex.build(root / "photos", encoder="offline", progress=False).save(root / "index")
    return root / "index", photos


def save_format_1(index, directory: Path) -> Path:
    """Write ``index`` into ``directory`` as himir-rag wrote every version before format 2 (one
    ``vectors.npy`` + ``catalog.sqlite`` per version); returns the version directory, named by ``CURRENT``."""
    import json
    import time
    import uuid

    from himir_rag.manifest import FORMAT_NAME

    snapshot = index.snapshot
    version = directory / f"v{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    version.mkdir(parents=True)
    np.save(version / "vectors.npy", np.asarray(snapshot.vectors), allow_pickle=False)
    snapshot.write_catalog(version / "catalog.sqlite", skipped=index.skipped)
    index.sync_candidate_stores()
    index.candidate_stores.save(version, snapshot)
    manifest = {
        "format": FORMAT_NAME, "format_version": 1,
        "encoder": {"name": index.encoder.name, "dim": snapshot.dim, "spec": index.encoder_spec},
        "config": index.config.to_dict(), "next_image_id": max(snapshot.images, default=0) + 1,
        "vectors": {"dtype": str(snapshot.vectors.dtype), "shape": list(snapshot.vectors.shape)},
        "counts": {"images": len(snapshot), "regions": len(snapshot.levels), **snapshot.level_counts()},
        "files": {p.name: p.stat().st_size for p in version.iterdir()}, "store": {"kind": "faiss"},
        "root": index.root,
    }
    (version / "manifest.json").write_text(json.dumps(manifest))
    (directory / "CURRENT").write_text(version.name + "\n")
    return version
