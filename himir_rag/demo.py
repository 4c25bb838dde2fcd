"""The newcomer's demo: a small real photo collection that needs no download.

Photos come from the sample images shipped inside the scikit-image, scikit-learn and
matplotlib wheels, plus a few multi-object scenes composed from them (a cat beside a
cup of coffee...), which show what matching sub-queries against regions buys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["DEMO_QUESTIONS", "write_demo_photos"]

logger = logging.getLogger(__name__)

DEMO_QUESTIONS = [
    "a cat",
    "an astronaut",
    "a cup of coffee",
    "a motorcycle",
    "a cat next to a cup of coffee",
    "a rocket and a motorcycle",
]


@dataclass(frozen=True)
class _Source:
    name: str
    package: str
    relative: str


_SOURCES = [
    _Source("astronaut", "skimage", "data/astronaut.png"),
    _Source("cat", "skimage", "data/chelsea.png"),
    _Source("coffee", "skimage", "data/coffee.png"),
    _Source("rocket", "skimage", "data/rocket.jpg"),
    _Source("motorcycle", "skimage", "data/motorcycle_left.png"),
    _Source("cameraman", "skimage", "data/camera.png"),
    _Source("coins", "skimage", "data/coins.png"),
    _Source("galaxies", "skimage", "data/hubble_deep_field.jpg"),
    _Source("retina", "skimage", "data/retina.jpg"),
    _Source("moon", "skimage", "data/moon.png"),
    _Source("brick_wall", "skimage", "data/brick.png"),
    _Source("grass", "skimage", "data/grass.png"),
    _Source("china_temple", "sklearn", "datasets/images/china.jpg"),
    _Source("flower", "sklearn", "datasets/images/flower.jpg"),
    _Source("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]


def _package_file(package: str, relative: str) -> Path:
    module = __import__(package)
    return Path(module.__file__).parent / relative


def _compose(background: Image.Image, objects: list[Image.Image], size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Paste ``objects`` side by side, each about a third of the frame, on a background."""
    canvas = background.convert("RGB").resize(size)
    width, height = size
    slot = width // len(objects)
    for i, obj in enumerate(objects):
        obj = obj.convert("RGB")
        scale = min(slot * 0.9 / obj.width, height * 0.6 / obj.height)
        thumb = obj.resize((max(1, int(obj.width * scale)), max(1, int(obj.height * scale))))
        canvas.paste(thumb, (i * slot + (slot - thumb.width) // 2, (height - thumb.height) // 2))
    return canvas


def write_demo_photos(target: str | Path) -> list[Path]:
    """Copy the bundled sample photos (and three composed scenes) into ``target`` as JPEG.

    Returns
    -------
    list of Path
        The files written.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, Image.Image] = {}
    for source in _SOURCES:
        path = _package_file(source.package, source.relative)
        if not path.exists():
            logger.warning("sample photo %s not found in the %s wheel; skipped", path, source.package)
            continue
        with Image.open(path) as img:
            loaded[source.name] = img.convert("RGB")
    scenes = {
        "scene_cat_and_coffee": ("grass", ["cat", "coffee"]),
        "scene_rocket_and_motorcycle": ("brick_wall", ["rocket", "motorcycle"]),
        "scene_flower_and_coins": ("grass", ["flower", "coins"]),
    }
    written = []
    for name, image in loaded.items():
        written.append(_save(image, target / f"{name}.jpg"))
    for name, (background, parts) in scenes.items():
        if background in loaded and all(p in loaded for p in parts):
            written.append(_save(_compose(loaded[background], [loaded[p] for p in parts]), target / f"{name}.jpg"))
    return written


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path, quality=92)
    return path

