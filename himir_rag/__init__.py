"""himir-rag: hierarchical multi-vector image retrieval (HiMIR) for multimodal RAG.

The core imports neither LlamaIndex nor LangChain: the adapters live in
``himir_rag.llama_index`` and ``himir_rag.langchain`` (optional extras).
"""

from himir_rag.config import HiMIRConfig, Layout, parse_layout
from himir_rag.errors import (
    ConfigError,
    EmptyIndexError,
    EncoderUnavailableError,
    HiMIRError,
    ImageLoadError,
    IncompatibleIndexError,
    IndexFormatError,
)
from himir_rag.hierarchy import Level, Region, RegionTree
from himir_rag.index import BuildReport, HiMIRIndex, RegionMatch, SearchHit, SearchResult
from himir_rag.scheduler import RetrievalMode, SearchStats

__version__ = "0.1.0"

__all__ = [
    "HiMIRIndex", "HiMIRConfig", "Layout", "parse_layout", "Level", "Region", "RegionTree",
    "BuildReport", "RegionMatch", "SearchHit", "SearchResult", "RetrievalMode", "SearchStats",
    "HiMIRError", "ConfigError", "EmptyIndexError", "EncoderUnavailableError", "ImageLoadError",
    "IncompatibleIndexError", "IndexFormatError", "__version__",
]
