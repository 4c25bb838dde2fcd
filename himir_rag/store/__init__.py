"""Vector storage behind one protocol: FAISS (default, CPU or GPU)."""

from himir_rag.store.base import VectorStore
from himir_rag.store.faiss import FaissStore, auto_index_kind, faiss_gpu_available

__all__ = ["VectorStore", "FaissStore", "auto_index_kind", "faiss_gpu_available"]
