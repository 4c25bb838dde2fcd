"""Multimodal RAG with LangChain: HiMIR finds the photos, a chat model looks at them.

The chain is ``retriever | format | chat_model``::

    {"context": HiMIRRetriever, "question": RunnablePassthrough()}
        | image_prompt()          # one HumanMessage: question, then (description, photo) pairs
        | chat_model
        | StrOutputParser()

Runs offline as it is: without ``--index`` it indexes the demo photos (shipped inside
installed wheels) with the offline encoder, and answers with a fake chat model that
only reports what it was shown. Set ``HIMIR_LLM`` for a real multimodal model::

    python examples/langchain_chain.py "a cat next to a cup of coffee"
    python examples/langchain_chain.py --index my_index -k 3 "a red bicycle"
    HIMIR_LLM=ollama:llava python examples/langchain_chain.py "a cat next to a cup of coffee"
    HIMIR_LLM=openai:gpt-4o-mini python examples/langchain_chain.py "an astronaut"

(``pip install langchain-ollama`` or ``langchain-openai`` for those.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnablePassthrough

from himir_rag.errors import ConfigError
from himir_rag.index import HiMIRIndex
from himir_rag.langchain import HiMIRRetriever, image_prompt

ENCODER: Any = None  # None: the index's own encoder when loading, "offline" when building
_PROVIDERS = {"ollama": ("langchain_ollama", "ChatOllama"), "openai": ("langchain_openai", "ChatOpenAI")}


class ShownImagesChatModel(BaseChatModel):
    """Offline stand-in for a multimodal chat model: it answers with what it received."""

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        blocks = [b for m in messages for b in m.content_blocks]
        images = sum(1 for b in blocks if b.get("type") == "image")
        texts = [b["text"].splitlines()[0] for b in blocks if b.get("type") == "text"]
        answer = f"(fake chat model) I was shown {images} photo(s):\n" + "\n".join(texts[1:])
        return ChatResult(generations=[ChatGeneration(message=AIMessage(answer))])

    @property
    def _llm_type(self) -> str:
        return "himir-shown-images"


def chat_model_from_env() -> BaseChatModel | None:
    """The chat model named by ``HIMIR_LLM=provider:model`` (ollama, openai), or None when unset."""
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
        raise ImportError(f"HIMIR_LLM={spec!r} needs {module_name.replace('_', '-')}: pip install it") from exc
    return getattr(module, class_name)(model=model)


def default_chat_model() -> BaseChatModel:
    """``HIMIR_LLM``'s model, else the offline fake."""
    return chat_model_from_env() or ShownImagesChatModel()


def build_chain(retriever: HiMIRRetriever, chat_model: BaseChatModel) -> Runnable[str, str]:
    """question -> photos (retriever) -> multimodal message (format) -> answer (chat model)."""
    return {"context": retriever, "question": RunnablePassthrough()} | image_prompt() | chat_model | StrOutputParser()


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
    parser.add_argument("-k", type=int, default=2, help="photos shown to the chat model")
    args = parser.parse_args(argv)

    retriever = HiMIRRetriever(index=load_index(args.index), k=args.k)
    for document in retriever.invoke(args.question):
        print(f"{document.metadata['score']:.3f}  {document.metadata['file_name']}")
    print(build_chain(retriever, default_chat_model()).invoke(args.question))
    return 0


if __name__ == "__main__":
    sys.exit(main())
