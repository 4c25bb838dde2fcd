"""The on-disk cache of class-prompt embeddings: computed once, keyed, atomic, never trusted blindly."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from himir_rag.encoders.prompt_cache import CACHE_ENV, cache_dir, cache_path, cached_sentence_embeddings

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a cup"]


class CountingEncoder:
    """Deterministic unit vectors per text; counts the calls that reach it."""

    def __init__(self, dim: int = 4) -> None:
        self.dim, self.calls = dim, 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        rng = np.random.default_rng([len(t) for t in texts])
        vectors = rng.normal(size=(len(texts), self.dim))
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_computed_once_then_read_from_the_user_cache(cache):
    encode = CountingEncoder()
    first = cached_sentence_embeddings("model==1", PROMPTS, dim=4, encode=encode)
    second = cached_sentence_embeddings("model==1", PROMPTS, dim=4, encode=encode)
    assert encode.calls == 1
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float32 and second.shape == (3, 4)
    path = cache_path("model==1", PROMPTS)
    assert path.parent == cache and path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind


def test_the_key_is_the_model_and_the_prompts(cache):
    encode = CountingEncoder()
    cached_sentence_embeddings("model==1", PROMPTS, dim=4, encode=encode)
    cached_sentence_embeddings("model==2", PROMPTS, dim=4, encode=encode)
    cached_sentence_embeddings("model==1", PROMPTS[:2], dim=4, encode=encode)
    assert encode.calls == 3
    assert len({cache_path("model==1", PROMPTS), cache_path("model==2", PROMPTS),
                cache_path("model==1", PROMPTS[:2])}) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "not_unit", "pickled_objects"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(cache, damage, caplog):
    encode = CountingEncoder()
    good = cached_sentence_embeddings("model==1", PROMPTS, dim=4, encode=encode)
    path = cache_path("model==1", PROMPTS)
    if damage == "garbage":
        path.write_bytes(b"not an npy file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "wrong_shape":
        np.save(path, good[:2])
    elif damage == "not_unit":
        np.save(path, good * 3)
    else:  # an object array needs pickle: np.load(allow_pickle=False) must refuse it, never unpickle
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with caplog.at_level(logging.WARNING, logger="himir_rag.encoders.prompt_cache"):
        again = cached_sentence_embeddings("model==1", PROMPTS, dim=4, encode=encode)
    assert encode.calls == 2
    np.testing.assert_array_equal(again, good)
    assert "ignoring" in caplog.text and str(path) in caplog.text
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), good)  # rewritten


def test_an_unwritable_cache_only_costs_the_recomputation(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be created under a file")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    encode = CountingEncoder()
    with caplog.at_level(logging.WARNING, logger="himir_rag.encoders.prompt_cache"):
        vectors = cached_sentence_embeddings("model==1", PROMPTS, dim=4, encode=encode)
    assert vectors.shape == (3, 4) and encode.calls == 1
    assert "cannot write the prompt-embedding cache" in caplog.text and CACHE_ENV in caplog.text


def test_default_location_is_the_platform_user_cache_dir(monkeypatch):
    import platformdirs

    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert str(cache_dir()) == platformdirs.user_cache_dir("himir-rag")
    monkeypatch.setenv(CACHE_ENV, "~/elsewhere")
    assert "~" not in str(cache_dir()) and cache_dir().name == "elsewhere"


def test_the_offline_encoder_uses_the_cache(offline_encoder):
    """The session's encoder wrote its class texts' embeddings where HIMIR_CACHE_DIR points, and a
    class stands for the unit mean of its texts' embeddings."""
    from himir_rag.encoders.offline import class_text_groups, sentence_model_key

    offline_encoder.load()
    groups = class_text_groups(offline_encoder.class_texts)
    texts = [text for group in groups for text in group]
    path = cache_path(sentence_model_key(), texts)
    assert path.is_file()
    cached = np.load(path, allow_pickle=False)
    assert cached.shape == (len(texts), 384)
    start = sum(len(group) for group in groups[:285])
    np.testing.assert_allclose(cached[start], offline_encoder.embed_texts([groups[285][0]])[0], atol=1e-5)
    mean = offline_encoder.embed_texts(groups[285]).mean(axis=0)
    np.testing.assert_allclose(offline_encoder._class_embeddings[285], mean / np.linalg.norm(mean), atol=1e-5)
