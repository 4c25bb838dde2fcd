"""Multimodal question answering with LlamaIndex: HiMIR finds the photos, a chat LLM looks at them.

``RetrieverQueryEngine.from_args(retriever, llm=chat_llm, multimodal=True)`` turns every
retrieved ``ImageNode`` into chat content blocks (its metadata and match description as
``TextBlock`` s, the photo as an ``ImageBlock``) and sends them to the LLM's ``chat``.

Runs offline as it is: without ``--index`` it indexes the demo photos (shipped inside
installed wheels) with the offline encoder, and answers with a fake chat LLM that only
reports what it was shown. Set ``HIMIR_LLM`` for a real multimodal model::

    python examples/llamaindex_qa.py "a cat next to a cup of coffee"
    python examples/llamaindex_qa.py --index my_index -k 3 --regions "a red bicycle"
    HIMIR_LLM=ollama:llava python examples/llamaindex_qa.py "a cat next to a cup of coffee"
    HIMIR_LLM=openai:gpt-4o-mini python examples/llamaindex_qa.py "an astronaut"

(``pip install llama-index-llms-ollama`` or ``llama-index-llms-openai`` for those.)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.query_engine import RetrieverQueryEngine

from himir_rag.errors import ConfigError
from himir_rag.index import HiMIRIndex
from himir_rag.llama_index import HiMIRRetriever

ENCODER: Any = None  # None: the index's own encoder when loading, "offline" when building
_PROVIDERS = {"ollama": ("llama_index.llms.ollama", "Ollama"), "openai": ("llama_index.llms.openai", "OpenAI")}


class ShownImagesLLM(CustomLLM):
    """Offline stand-in for a multimodal chat LLM: it answers with what it received."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="shown-images", is_chat_model=True, context_window=128_000)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        images = sum(1 for m in messages for b in m.blocks if b.block_type == "image")
        texts = " ".join(b.text for m in messages for b in m.blocks if b.block_type == "text")
        described = re.findall(r'(?:Photo|Region|Segment) [^"]*"([^"]+)"', texts)
        answer = f"(fake chat LLM) I was shown {images} photo(s) or crop(s), described as: {', '.join(described)}"
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=answer))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self.chat(messages, **kwargs)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="(fake chat LLM) text only")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        yield self.complete(prompt)


def llm_from_env() -> Any:
    """The LLM named by ``HIMIR_LLM=provider:model`` (ollama, openai), or None when unset."""
    spec = os.environ.get("HIMIR_LLM", "").strip()
    if not spec:
        return None
    provider, _, model = spec.partition(":")
    if provider.lower() not in _PROVIDERS or not model:
        raise ConfigError(f"HIMIR_LLM={spec!r} is not 'provider:model' with provider in {sorted(_PROVIDERS)}")
    module_name, class_name = _PROVIDERS[provider.lower()]
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ImportError as exc:
        package = module_name.replace(".", "-").replace("_", "-")
        raise ImportError(f"HIMIR_LLM={spec!r} needs {package}: pip install {package}") from exc
    return getattr(module, class_name)(model=model)


def build_query_engine(retriever: HiMIRRetriever, llm: Any) -> RetrieverQueryEngine:
    """A query engine whose synthesizer sends the retrieved photos to ``llm`` (a chat LLM)."""
    return RetrieverQueryEngine.from_args(retriever, llm=llm, multimodal=True)


def load_index(index_dir: str | None) -> HiMIRIndex:
    """The index in ``index_dir``, or a fresh one over the demo photos."""
    if index_dir:
        return HiMIRIndex.load(index_dir, encoder=ENCODER)
    from himir_rag.demo import write_demo_photos

    photos = write_demo_photos(tempfile.mkdtemp(prefix="himir-demo-"))
    index = HiMIRIndex(ENCODER or "offline")
    index.add(photos, progress=True)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="a cat next to a cup of coffee")
    parser.add_argument("--index", help="index directory (default: index the demo photos)")
    parser.add_argument("-k", type=int, default=2, help="photos shown to the LLM")
    parser.add_argument("--regions", action="store_true", help="also send the matched region crops")
    args = parser.parse_args(argv)

    llm = llm_from_env() or ShownImagesLLM()
    retriever = HiMIRRetriever(load_index(args.index), similarity_top_k=args.k, return_region_nodes=args.regions)
    response = build_query_engine(retriever, llm).query(args.question)
    for source in response.source_nodes:
        print(f"{source.score:.3f}  {source.node.node_id}  {source.node.metadata['file_name']}")
    print(response.response)
    return 0


if __name__ == "__main__":
    sys.exit(main())
