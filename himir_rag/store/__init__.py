"""Image stores behind one contract (:mod:`himir_rag.store.base`): in memory with FAISS (default), or Qdrant."""

from himir_rag.store.base import Candidates, ImageStore, RegionView, VectorStore
from himir_rag.store.faiss import FaissStore, auto_index_kind, faiss_gpu_available
from himir_rag.store.memory import MemoryStore

__all__ = ["ImageStore", "VectorStore", "Candidates", "RegionView", "MemoryStore", "FaissStore", "auto_index_kind",
           "faiss_gpu_available"]
