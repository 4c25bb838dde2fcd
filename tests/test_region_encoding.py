"""Region encoding "crops" vs "roi": shapes and unit norms for every layout and odd photo, RoI-align
pooling, the config field and its manifest round trip, the CLI option and the CPU thread default."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from himir_rag.config import HiMIRConfig
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import get_decomposer
from himir_rag.index import HiMIRIndex
from himir_rag.ingest import cut, encode_crops, encode_views, view_boxes
from tests.conftest import ColorEncoder, RegionColorEncoder

ODD_PHOTOS = {"1x1": (1, 1), "10000x3": (10000, 3), "3x10000": (3, 10000), "2x2": (2, 2), "640x480": (640, 480)}
LAYOUTS = ["1+1+1", "1+4+16", "1+9+36"]


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


def _unit_rows(vectors: np.ndarray, rows: int) -> None:
    assert vectors.shape == (rows, 384) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_roi_and_crops_give_unit_vectors_for_every_layout_and_odd_photo(offline_encoder, layout):
    decomposer = get_decomposer("grid", layout)
    for name, size in ODD_PHOTOS.items():
        image = _photo(size)
        tree, crops, work = cut(image, decomposer, min_region_frac=0.0)
        _unit_rows(encode_views([work], [tree], offline_encoder), len(tree))
        if layout != "1+9+36":  # crops of the biggest layout cost seconds and test nothing more
            _unit_rows(encode_crops(crops, offline_encoder, batch_size=4), len(tree))


@pytest.mark.slow
def test_roi_handles_tiny_and_degenerate_boxes_and_batches_photos_alike(offline_encoder):
    photos = [_photo((640, 480), 1), _photo((640, 480), 2), _photo((300, 900), 3)]
    boxes = [np.array([[0, 0, 640, 480], [10, 10, 11, 11], [639, 479, 640, 480], [5, 5, 5, 5]]),
             np.array([[100, 50, 400, 300]]), np.array([[0, 0, 300, 900], [-50, -50, 2000, 2000]])]
    together = offline_encoder.embed_regions(photos, boxes, photos_per_batch=4)
    _unit_rows(together, 7)
    one_by_one = np.concatenate([offline_encoder.embed_regions([p], [b], photos_per_batch=1)
                                 for p, b in zip(photos, boxes)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)
    # a box beyond the photo is clipped to it: the same as the whole photo
    np.testing.assert_allclose(together[6], together[5], atol=1e-5)
    assert offline_encoder.embed_regions([], []).shape == (0, 384)
    with pytest.raises(ValueError, match="2 photos but 1 box arrays"):
        offline_encoder.embed_regions(photos[:2], boxes[:1])


@pytest.mark.slow
def test_a_scale_pyramid_pools_each_box_at_the_scale_nearest_the_classifier_input(offline_encoder):
    from himir_rag.encoders.offline import OfflineEncoder

    pyramid = OfflineEncoder(roi_sides=(224, 448, 672))
    photo = _photo((640, 480), 4)
    tree, _, work = cut(photo, get_decomposer("grid", "1+4+16"), min_region_frac=0.0)
    vectors = encode_views([work], [tree], pyramid)
    _unit_rows(vectors, len(tree))
    boxes = view_boxes(tree, work.size)
    # the whole photo is nearest 224 px at the 224 scale, a 160x120 segment at the 672 scale
    np.testing.assert_allclose(vectors[0], OfflineEncoder(roi_sides=(224,)).embed_regions([work], [boxes[:1]])[0],
                               atol=1e-5)
    np.testing.assert_allclose(vectors[-1], OfflineEncoder(roi_sides=(672,)).embed_regions([work], [boxes[-1:]])[0],
                               atol=1e-5)
    for name, size in ODD_PHOTOS.items():
        image = _photo(size)
        tree, _, work = cut(image, get_decomposer("grid", "1+4+16"), min_region_frac=0.0)
        _unit_rows(encode_views([work], [tree], pyramid), len(tree))
    with pytest.raises(ValueError, match="roi_sides"):
        OfflineEncoder(roi_sides=(16,))


@pytest.mark.slow
def test_roi_global_view_names_the_photo_like_its_crop(offline_encoder):
    from skimage import data

    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    texts = offline_encoder.embed_texts(["a cat", "a cup of coffee"])
    whole = [np.array([[0, 0, p.width, p.height]]) for p in photos]
    roi = offline_encoder.embed_regions(photos, whole)
    assert (texts @ roi.T).argmax(axis=1).tolist() == [0, 1]
    crops = offline_encoder.embed_images(photos)
    assert np.einsum("ij,ij->i", roi, crops).min() > 0.7


def test_roi_align_pools_the_right_part_of_the_map():
    import torch

    from himir_rag.encoders.offline import roi_align_mean

    features = torch.zeros(1, 3, 4, 6)
    features[0, 0, :, :3] = 1.0  # left half
    features[0, 1, :2, :] = 1.0  # top half
    features[0, 2] = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 0.5]])
    pooled = roi_align_mean(features, [boxes])
    assert pooled.shape == (4, 3)
    torch.testing.assert_close(pooled[0], features[0].mean(dim=(1, 2)))  # whole map = average pooling
    top_left, bottom_right, top_right = pooled[1], pooled[2], pooled[3]
    assert top_left[0] > 0.9 and top_left[1] > 0.9
    assert bottom_right[0] < 0.1 and bottom_right[1] < 0.1
    assert top_right[0] < 0.1 and top_right[1] > 0.9
    assert roi_align_mean(features, [torch.zeros(0, 4)]).shape == (0, 3)


def test_view_boxes_match_the_crops_cut():
    image = _photo((2000, 1000))
    tree, crops, work = cut(image, get_decomposer("grid", "1+4+16"), min_region_frac=0.0)
    boxes = view_boxes(tree, work.size)
    assert boxes.shape == (len(tree), 4) and work.size == (1024, 512)
    assert [tuple(int(v) for v in (b[2] - b[0], b[3] - b[1])) for b in boxes] == [c.size for c in crops]


def test_an_encoder_without_embed_regions_is_refused_in_one_line():
    image = _photo((64, 48))
    tree, _, work = cut(image, get_decomposer("grid", "1+4+16"), min_region_frac=0.0)
    with pytest.raises(ConfigError, match="'test:color' cannot encode all regions.*use --region-encoding crops"):
        encode_views([work], [tree], ColorEncoder())


def test_config_field_is_validated_and_old_manifests_mean_crops():
    from himir_rag.manifest import parse_config

    assert HiMIRConfig().region_encoding == "crops"
    assert HiMIRConfig(region_encoding="roi").region_encoding == "roi"
    with pytest.raises(ConfigError, match="region_encoding 'pooled' is unknown; use one of crops, roi"):
        HiMIRConfig(region_encoding="pooled")
    saved_before_the_field = {k: v for k, v in HiMIRConfig(region_encoding="roi").to_dict().items()
                              if k != "region_encoding"}
    assert HiMIRConfig.from_dict(saved_before_the_field).region_encoding == "crops"
    assert parse_config({"config": saved_before_the_field}, where="test").region_encoding == "crops"
    assert parse_config({"config": HiMIRConfig(region_encoding="roi").to_dict()}, where="t").region_encoding == "roi"


def test_roi_index_round_trips_and_encodes_photo_queries_the_same_way(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, color in enumerate([(220, 30, 30), (30, 60, 220), (30, 180, 40)]):
        image = Image.new("RGB", (96, 64), color)
        image.paste((240, 220, 30), (0, 0, 40, 30))
        image.save(folder / f"p{i}.png")
    encoder = RegionColorEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(region_encoding="roi"))
    report = index.add(folder, progress=False)
    assert report.added == 3 and report.crops_encoded == 3 * 21 and encoder.region_calls >= 1
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=encoder)
    assert loaded.config.region_encoding == "roi"
    calls = encoder.region_calls
    hits = loaded.search(image=folder / "p1.png", k=3).hits
    assert encoder.region_calls == calls + 1 and hits[0].path.endswith("p1.png")
    with pytest.raises(ConfigError, match="use --region-encoding crops"):
        HiMIRIndex(ColorEncoder(), HiMIRConfig(region_encoding="roi")).add(folder, progress=False)
    with pytest.raises(ConfigError, match="region_encoding and segment_work_size are fixed at index time"):
        loaded.set_config(loaded.config.replace(region_encoding="crops"))


def test_inference_threads_default_to_one_and_respect_the_user(monkeypatch):
    import torch

    from himir_rag.encoders.base import inference_threads, set_inference_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        with inference_threads("cpu", None):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with inference_threads("cpu", 3):
            assert torch.get_num_threads() == 3
        with inference_threads("cuda", None):
            assert torch.get_num_threads() == 2
        set_inference_threads(2)
        with inference_threads("cpu", None):
            assert torch.get_num_threads() == 2
        set_inference_threads(None)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        with inference_threads("cpu", None):
            assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="int >= 1"):
            set_inference_threads(0)
    finally:
        set_inference_threads(None)
        torch.set_num_threads(before)


@pytest.mark.slow
def test_cli_region_encoding_is_saved_and_kept(tmp_path):
    from typer.testing import CliRunner

    from himir_rag.cli import app

    folder = tmp_path / "photos"
    folder.mkdir()
    _photo((320, 240)).save(folder / "a.png")
    runner = CliRunner()
    target = tmp_path / "idx"
    result = runner.invoke(app, ["index", str(folder), "--index", str(target), "--no-progress",
                                 "--region-encoding", "roi"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(next(target.glob("v*/manifest.json")).read_text())
    assert manifest["config"]["region_encoding"] == "roi"
    result = runner.invoke(app, ["index", str(folder), "--index", str(target), "--no-progress",
                                 "--region-encoding", "crops"])
    assert result.exit_code == 1 and "built with --region-encoding roi, asked for crops" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["index", str(folder), "--index", str(target), "--no-progress"])
    assert result.exit_code == 0, result.output  # no option: the index's own encoding
    result = runner.invoke(app, ["index", str(folder), "--index", str(target), "--no-progress",
                                 "--segment-work-size", "64"])
    assert result.exit_code == 1 and "built with --segment-work-size 128, asked for 64" in result.output
    objects = tmp_path / "objects"
    result = runner.invoke(app, ["index", str(folder), "--index", str(objects), "--no-progress",
                                 "--decomposer", "objects", "--segment-work-size", "64"])
    assert result.exit_code == 0, result.output
    assert json.loads(next(objects.glob("v*/manifest.json")).read_text())["config"]["segment_work_size"] == 64
    loaded = HiMIRIndex.load(objects)
    with pytest.raises(ConfigError, match="segment_work_size are fixed at index time"):
        loaded.set_config(loaded.config.replace(segment_work_size=256))
    result = runner.invoke(app, ["index", str(folder), "--index", str(tmp_path / "new"), "--no-progress",
                                 "--region-encoding", "pooled"])
    assert result.exit_code == 1 and "region_encoding 'pooled' is unknown" in result.output
