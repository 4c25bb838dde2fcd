"""Query decomposition: split a question into the visual sub-queries an image must match.

HiMIR scores an image by the best-matching region of *every* sub-query (late
interaction), so the split decides accuracy: "a dog on a beach next to a red bicycle"
should become ``["a dog", "a beach", "a red bicycle"]``.

Three decomposers share the :class:`QueryDecomposer` protocol:

- :class:`RuleDecomposer` — offline, no model: regular expressions split on
  conjunctions, punctuation and relations of place, and strip request filler.
- :class:`LLMDecomposer` — one prompt to a LlamaIndex ``LLM``, a LangChain chat model,
  LLM or any ``Runnable``; falls back to :class:`RuleDecomposer` when the model fails,
  times out or answers nothing usable.
- :class:`IdentityDecomposer` — ``[query]`` unchanged, the single-query baseline.

:class:`CachedDecomposer` wraps any of them in a thread-safe LRU cache, and
:func:`get_decomposer` builds one by name (for the CLI).

Plugging a model from Python
----------------------------
LlamaIndex (``pip install llama-index-llms-ollama`` or ``llama-index-llms-openai``)::

    from llama_index.llms.ollama import Ollama
    from himir_rag.decompose import LLMDecomposer

    decomposer = LLMDecomposer(Ollama(model="llama3.2", request_timeout=60.0))
    # or: from llama_index.llms.openai import OpenAI; LLMDecomposer(OpenAI(model="gpt-4o-mini"))

LangChain (``pip install langchain-ollama`` or ``langchain-openai``)::

    from langchain_ollama import ChatOllama
    from himir_rag.decompose import LLMDecomposer

    decomposer = LLMDecomposer(ChatOllama(model="llama3.2", temperature=0))
    # or: from langchain_openai import ChatOpenAI; LLMDecomposer(ChatOpenAI(model="gpt-4o-mini"))
    decomposer.decompose("a dog on a beach next to a red bicycle")

From the CLI, set ``HIMIR_LLM=ollama:llama3.2`` (or ``openai:gpt-4o-mini``) and pick the
``llm`` decomposer; :func:`get_decomposer` builds the LangChain chat model.

Layout
------
``base`` (the protocol, shared helpers, :func:`decompose_query`, :class:`IdentityDecomposer`,
:class:`CachedDecomposer`), ``rules`` (:class:`RuleDecomposer`), ``parse`` (LLM-output
parsing, :func:`parse_subqueries`), ``llm`` (:class:`LLMDecomposer`) and ``factory``
(:func:`get_decomposer`). Import from ``himir_rag.decompose``; every name above is here.
"""

from himir_rag.decompose.base import (
    CachedDecomposer,
    IdentityDecomposer,
    QueryDecomposer,
    adecompose_query,
    decompose_query,
)
from himir_rag.decompose.factory import DECOMPOSER_NAMES, get_decomposer
from himir_rag.decompose.llm import DEFAULT_DECOMPOSE_PROMPT, LLMDecomposer
from himir_rag.decompose.parse import (
    MAX_ANSWER_CHARS,
    MAX_JSON_DEPTH,
    MAX_SUBQUERY_CHARS,
    parse_subqueries,
)
from himir_rag.decompose.rules import RuleDecomposer

__all__ = [
    "DEFAULT_DECOMPOSE_PROMPT",
    "DECOMPOSER_NAMES",
    "QueryDecomposer",
    "RuleDecomposer",
    "LLMDecomposer",
    "IdentityDecomposer",
    "CachedDecomposer",
    "parse_subqueries",
    "MAX_SUBQUERY_CHARS",
    "MAX_ANSWER_CHARS",
    "MAX_JSON_DEPTH",
    "get_decomposer",
    "decompose_query",
    "adecompose_query",
]
