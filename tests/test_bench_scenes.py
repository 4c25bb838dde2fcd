"""Composite benchmark builder: stamp names and filters, scene/query/qrel files, determinism.

The build tests run on a tiny synthetic stamps folder (always) and on Debian's
``tuxpaint-stamps-default`` (skipped when the package is not installed).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from himir_rag.bench.scenes import (
    QUERY_TEMPLATES,
    TEMPLATE_SETS,
    StampsNotInstalledError,
    build_composite_benchmark,
    clean_stamp_name,
    english_description,
    find_stamps_dir,
    head_noun,
    load_stamp_catalog,
    read_jsonl,
)

SIZE = (160, 120)


# ---------------------------------------------------------------------------
# Names (no package needed)


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("A red apple.", "a red apple"),
        ("An albino peahen (a female peafowl, or peacock).", "an albino peahen"),
        ("A chocolate easter egg. Yum!", "a chocolate easter egg"),
        ("A spiny lobster, from the Hawaiian islands.", "a spiny lobster"),
        ("A ripe, red tomato!", "a ripe red tomato"),
        ("A \u201cFuji\u201d apple.", "a fuji apple"),
        ("A knight\u2019s helmet.", "a knight's helmet"),
        ("A ginger 'root'.", "a ginger root"),
        ("This is a mailbox.", "a mailbox"),
        ("Teddy bear.", "teddy bear"),
        ("Venus\u2014the second planet in the solar system\u2014and the most inhospitable!", "venus"),
        ("Two wild boars.", "two wild boars"),
        ("Some blueberries.", "some blueberries"),
        ("A stethoscope lets your doctor listen to your heart and lungs.", "a stethoscope"),
        ("A candy cane is a traditional Christmas treat in the United States.", "a candy cane"),
        ("An hippopotamus.", "a hippopotamus"),
        ("A european bear.", "a european bear"),
        ("Another tombstone.", "a tombstone"),
        ("George the blue groper.", "the blue groper"),
        ("A helmeted guinea fowl.", "a helmeted guinea fowl"),
    ],
)
def test_clean_stamp_name(description, expected):
    assert clean_stamp_name(description) == expected


@pytest.mark.parametrize(
    "description",
    [
        "",
        "Eat your broccoli!",
        "A US 25 cent piece ($.25) called a quarter.",
        "\u2013 Because a brain is a terrible thing to waste\u2026",
        "Remember to flush the toilet and wash your hands with soap!",
        "With a fast APC like this Stryker, you can surprise the enemy.",
        "Dead end ahead!",
        "A tough APC like this M-3 Bradley Fighting Vehicle gets you to battle.",
        "A red and white anemone flower with long leaves.",
        "\u00a5",
    ],
)
def test_clean_stamp_name_rejects_non_noun_phrases(description):
    assert clean_stamp_name(description) is None


def test_english_description_takes_untagged_line():
    text = "A frog.\nde.utf8=Ein Frosch.\nen_GB.utf8=A frog (GB).\n"
    assert english_description(text) == "A frog."


def test_english_description_falls_back_to_tagged_english():
    assert english_description("\nfr.utf8=Une grenouille.\nen_GB.utf8=A frog.\n") == "A frog."
    assert english_description("fr.utf8=Une grenouille.\n") is None


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("a red apple", "apple"),
        ("two wild boars", "boar"),
        ("a pair of cherries", "cherry"),
        ("a floppy-eared bunny", "rabbit"),
        ("a sea lion", "sea lion"),
        ("a lion", "lion"),
        ("a grave marker", "gravestone"),
    ],
)
def test_head_noun(name, head):
    assert head_noun(name) == head


@pytest.mark.parametrize("name", sorted(TEMPLATE_SETS))
def test_query_templates_are_varied(name):
    templates_by_count = TEMPLATE_SETS[name]
    assert sum(len(t) for t in templates_by_count.values()) >= 10
    for n_objects, templates in templates_by_count.items():
        for template in templates:
            assert template.format(*[f"<{i}>" for i in range(n_objects)]).count("<") == n_objects


def test_held_out_templates_share_no_phrasing_with_v1():
    v1 = {t for ts in TEMPLATE_SETS["v1"].values() for t in ts}
    v2 = {t for ts in TEMPLATE_SETS["v2"].values() for t in ts}
    assert not v1 & v2
    assert QUERY_TEMPLATES is TEMPLATE_SETS["v1"]


def test_v2_templates_phrase_the_queries_and_are_recorded(synthetic_stamps, tmp_path):
    kwargs = dict(scenes=12, queries=6, seed=0, image_size=SIZE, stamps_dir=synthetic_stamps, progress=False)
    build_composite_benchmark(tmp_path / "v1", **kwargs)
    build_composite_benchmark(tmp_path / "v2", templates="v2", **kwargs)
    v2_templates = {t for ts in TEMPLATE_SETS["v2"].values() for t in ts}
    queries = {label: read_jsonl(tmp_path / label / "queries.jsonl") for label in ("v1", "v2")}
    for row in queries["v2"]:
        names = row["objects"]
        phrasings = {t.format(*p) for t in v2_templates if t.count("{") == len(names)
                     for p in itertools.permutations(names)}
        assert row["query"] in phrasings
    assert {r["query"] for r in queries["v1"]}.isdisjoint(r["query"] for r in queries["v2"])
    manifest = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    assert manifest["query_templates"] == "v2"


def test_unknown_template_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="templates 'v9' is unknown"):
        build_composite_benchmark(tmp_path, templates="v9", progress=False)


# ---------------------------------------------------------------------------
# Stamps folders


def _write_stamp(folder: Path, stem: str, description: str, *, seed: int, flat: bool = False, side: int = 90):
    rng = np.random.default_rng(seed)
    height, width = side, int(side * 0.8)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2 <= 0.9
    colour = rng.integers(40, 216, size=3)
    noise = 0 if flat else rng.normal(0, 25, (height, width, 3))
    rgb = np.clip(colour + noise, 0, 255) * np.ones((height, width, 1))
    rgba = np.dstack([rgb, np.where(inside, 255, 0)]).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(folder / f"{stem}.png")
    (folder / f"{stem}.txt").write_text(f"{description}\nfr.utf8=Traduction.\n", encoding="utf-8")


SYNTHETIC_GOOD = {
    "animals/frog": "A green frog.",
    "animals/owl": "A brown owl.",
    "animals/cat": "A striped cat.",
    "animals/duck": "A yellow duck.",
    "food/orange": "An orange.",
    "food/pear": "A ripe pear!",
    "household/teapot_blue": "A blue teapot.",
    "household/key": "A silver key.",
    "toys/kite": "A red kite.",
    "toys/box": "A small wooden box.",
}


@pytest.fixture(scope="module")
def synthetic_stamps(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stamps")
    for seed, (stem, description) in enumerate(SYNTHETIC_GOOD.items()):
        _write_stamp(root / Path(stem).parent, Path(stem).name, description, seed=seed)
    _write_stamp(root / "household", "teapot_green", "A green teapot.", seed=20)  # same kind
    _write_stamp(root / "animals/cartoon", "dog", "A dog.", seed=21)  # clip-art folder
    _write_stamp(root / "shapes", "star", "A flat star.", seed=22, flat=True)  # flat fill
    _write_stamp(root / "food", "broccoli", "Eat your broccoli!", seed=23)  # not a name
    _write_stamp(root / "food", "bead", "A tiny bead.", seed=24, side=20)  # too small
    return root


def test_catalog_filters_and_dedupes(synthetic_stamps):
    catalog = load_stamp_catalog(synthetic_stamps, max_side=64)
    names = sorted(stamp.name for stamp in catalog)
    expected = sorted(clean_stamp_name(d) for d in SYNTHETIC_GOOD.values())
    assert names == expected
    assert {stamp.path for stamp in catalog if "teapot" in stamp.name} == {"household/teapot_blue.png"}
    for stamp in catalog:
        assert max(stamp.rgba.shape[:2]) <= 64
        assert not stamp.rgba.flags.writeable


def test_missing_stamps_raise_file_not_found_with_install_hint(tmp_path):
    with pytest.raises(StampsNotInstalledError, match="apt-get install tuxpaint-stamps-default") as info:
        build_composite_benchmark(
            tmp_path / "out", scenes=2, queries=1, stamps_dir=tmp_path / "none", progress=False
        )
    assert isinstance(info.value, FileNotFoundError)
    assert "benchmarks/install_stamps.sh" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scenes": 0}, "scenes=0; expected at least 1 scene"),
        ({"queries": 0}, "queries=0; expected at least 1 query"),
        ({"image_size": (16, 120)}, r"image_size=\(16, 120\); expected"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_composite_benchmark(tmp_path, progress=False, **kwargs)


def _tuxpaint_dir() -> Path:
    try:
        return find_stamps_dir()
    except StampsNotInstalledError:
        pytest.skip("tuxpaint-stamps-default is not installed (run benchmarks/install_stamps.sh)")


@pytest.fixture(scope="module", params=["synthetic", "tuxpaint"])
def stamps_dir(request, synthetic_stamps) -> Path:
    return synthetic_stamps if request.param == "synthetic" else _tuxpaint_dir()


@pytest.fixture(scope="module")
def builds(stamps_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for label, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        out[label] = tmp_path_factory.mktemp(f"bench_{label}")
        summary = build_composite_benchmark(
            out[label],
            scenes=12,
            queries=6,
            seed=seed,
            image_size=SIZE,
            stamps_dir=stamps_dir,
            progress=False,
        )
        assert summary.n_scenes == 12
        assert summary.n_queries == 6
        assert summary.seed == seed
    return out


# ---------------------------------------------------------------------------
# Build output


def test_files_exist(builds):
    root = builds["a"]
    for name in ("scenes.jsonl", "queries.jsonl", "qrels.jsonl", "manifest.json"):
        assert (root / name).is_file()
    scenes = read_jsonl(root / "scenes.jsonl")
    assert [s["scene_id"] for s in scenes] == [f"scene_{i:05d}" for i in range(12)]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"scene_{i:05d}.jpg" for i in range(12)]
    for scene in scenes:
        with Image.open(root / scene["path"]) as img:
            assert img.format == "JPEG"
            assert img.size == SIZE == (scene["width"], scene["height"])


def test_manifest(builds):
    manifest = json.loads((builds["a"] / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["counts"]["scenes"] == 12
    assert manifest["counts"]["queries"] == 6
    assert manifest["generator_version"]
    n_objects = sum(len(s["objects"]) for s in read_jsonl(builds["a"] / "scenes.jsonl"))
    assert manifest["counts"]["objects"] == n_objects


def test_objects_and_boxes(builds):
    width, height = SIZE
    for scene in read_jsonl(builds["a"] / "scenes.jsonl"):
        names = [o["name"] for o in scene["objects"]]
        assert 1 <= len(names) <= 6
        assert len(set(names)) == len(names)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert obj["area_frac"] == pytest.approx((x1 - x0) * (y1 - y0) / (width * height), abs=1e-6)
            assert 0.0 < obj["area_frac"] <= 0.55
            assert obj["stamp"].endswith(".png")


def test_queries_have_relevant_scenes(builds):
    scenes = {s["scene_id"]: s for s in read_jsonl(builds["a"] / "scenes.jsonl")}
    queries = read_jsonl(builds["a"] / "queries.jsonl")
    qrels = {q["query_id"]: q for q in read_jsonl(builds["a"] / "qrels.jsonl")}
    assert len({q["id"] for q in queries}) == len(queries) == len(qrels)
    assert len({frozenset(q["objects"]) for q in queries}) == len(queries)
    for query in queries:
        assert 2 <= len(query["objects"]) <= 3
        assert all(name in query["query"] for name in query["objects"])
        source_names = {o["name"] for o in scenes[query["scene_id"]]["objects"]}
        assert set(query["objects"]) <= source_names
        qrel = qrels[query["id"]]
        assert qrel["scene_ids"]
        assert query["scene_id"] in qrel["scene_ids"]
        assert qrel["paths"] == [scenes[sid]["path"] for sid in qrel["scene_ids"]]


def test_qrels_list_every_scene_with_all_named_objects(builds):
    scenes = read_jsonl(builds["a"] / "scenes.jsonl")
    qrels = {q["query_id"]: q for q in read_jsonl(builds["a"] / "qrels.jsonl")}
    for query in read_jsonl(builds["a"] / "queries.jsonl"):
        wanted = set(query["objects"])
        expected = [s["scene_id"] for s in scenes if wanted <= {o["name"] for o in s["objects"]}]
        assert qrels[query["id"]]["scene_ids"] == expected


def test_same_seed_is_byte_identical(builds):
    a, again = builds["a"], builds["a_again"]
    for name in ("scenes.jsonl", "queries.jsonl", "qrels.jsonl", "manifest.json"):
        assert (a / name).read_bytes() == (again / name).read_bytes()
    for image in sorted((a / "images").iterdir()):
        assert image.read_bytes() == (again / "images" / image.name).read_bytes()


def test_different_seed_differs(builds):
    assert (builds["a"] / "scenes.jsonl").read_bytes() != (builds["b"] / "scenes.jsonl").read_bytes()
    assert (builds["a"] / "queries.jsonl").read_bytes() != (builds["b"] / "queries.jsonl").read_bytes()


def test_rebuild_removes_stale_images(synthetic_stamps, tmp_path):
    kwargs = {"image_size": SIZE, "stamps_dir": synthetic_stamps, "progress": False}
    build_composite_benchmark(tmp_path, scenes=5, queries=2, **kwargs)
    build_composite_benchmark(tmp_path, scenes=3, queries=2, **kwargs)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"scene_{i:05d}.jpg" for i in range(3)]


def test_too_few_object_sets_writes_fewer_queries(synthetic_stamps, tmp_path, caplog):
    summary = build_composite_benchmark(
        tmp_path, scenes=2, queries=500, image_size=SIZE, stamps_dir=synthetic_stamps, progress=False
    )
    scenes = read_jsonl(tmp_path / "scenes.jsonl")
    possible = {
        frozenset(c)
        for s in scenes
        for k in (2, 3)
        for c in itertools.combinations([o["name"] for o in s["objects"]], k)
    }
    assert summary.n_queries == len(possible) < 500
    assert "distinct object sets" in caplog.text
