"""CLIP-family encoders through transformers (CLIP, SigLIP...): a local directory, or a Hugging Face hub id.

Hub models download on first use like every Hugging Face tool, unless downloads are off:
``HF_HUB_OFFLINE=1`` in the environment, ``himir ... --offline``, or ``allow_download=False``.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
from PIL import Image

from himir_rag.encoders.base import inference_threads, l2_normalize, resolve_device
from himir_rag.errors import EncoderUnavailableError

__all__ = ["ClipEncoder", "DEFAULT_CLIP_MODEL", "downloads_allowed", "resolve_device"]

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


def downloads_allowed() -> bool:
    """False when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value, as Hugging Face reads it."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return False
    return True




class ClipEncoder:
    """A transformers CLIP-family dual encoder.

    Parameters
    ----------
    model : str
        Hub id (downloaded into the Hugging Face cache on first use) or a local
        directory holding the model and processor files.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``. fp16 is used on GPU.
    allow_download : bool, optional
        Let transformers fetch missing files from the hub (needs network). Default:
        yes, unless ``HF_HUB_OFFLINE=1`` (see :func:`downloads_allowed`).

    Raises
    ------
    EncoderUnavailableError
        When the checkpoint is neither a local directory, nor in the HF cache, nor
        downloadable (no network, unknown id, or downloads off).

    Notes
    -----
    It embeds crops only: it has no ``embed_regions``, so an index with
    ``region_encoding="roi"`` refuses it with a one-line error (use ``crops``).

    Example
    -------
    >>> enc = ClipEncoder("openai/clip-vit-base-patch32")  # doctest: +SKIP
    >>> enc.embed_texts(["a dog"]).shape  # doctest: +SKIP
    (1, 512)
    """

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, *, device: str = "cpu",
                 allow_download: bool | None = None, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoProcessor

        self.device = resolve_device(device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        if allow_download is None:
            allow_download = downloads_allowed()
        local_only = not allow_download or os.path.isdir(model)
        try:
            self._model = AutoModel.from_pretrained(model, dtype=dtype, local_files_only=local_only)
            self._processor = AutoProcessor.from_pretrained(model, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            how = ("downloads are off (HF_HUB_OFFLINE=1, --offline or allow_download=False): put the model in the "
                   "Hugging Face cache first, or allow downloads" if not allow_download and not os.path.isdir(model)
                   else "check the model id or directory and the network")
            raise EncoderUnavailableError(
                f"cannot load CLIP checkpoint {model!r} ({exc}); {how}, or pass a local directory "
                "(--encoder clip:/path/to/model)"
            ) from exc
        self._model.eval().to(self.device)
        self._dtype, self.threads = dtype, threads
        self._lock = threading.Lock()
        basename = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model
        self.name = f"clip:{basename}"
        self.dim = int(self._model.config.projection_dim)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB images -> (n, dim) float32, L2-normalised."""
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        inputs = self._processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, dtype=self._dtype)
        with self._lock, inference_threads(self.device, self.threads), torch.inference_mode():
            features = self._model.get_image_features(pixel_values=pixels)
        return _to_numpy(features)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts -> (n, dim) float32, L2-normalised (truncated to the model's max length)."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        max_length = int(getattr(self._model.config, "text_config", self._model.config).max_position_embeddings)
        inputs = self._processor(text=list(texts), return_tensors="pt", padding=True, truncation=True,
                                 max_length=max_length)
        if inputs["input_ids"].shape[1] >= max_length:
            logger.warning("a text reached the model's limit of %d tokens and was truncated", max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with self._lock, inference_threads(self.device, self.threads), torch.inference_mode():
            features = self._model.get_text_features(**inputs)
        return _to_numpy(features)


def _to_numpy(features) -> np.ndarray:
    """transformers 4 returns a tensor, 5 a ModelOutput whose pooler_output is projected."""
    tensor = features if hasattr(features, "float") else features.pooler_output
    return l2_normalize(tensor.float().cpu().numpy())
