"""Building a decomposer by name (for the CLI), the LLM one from ``HIMIR_LLM=provider:model``."""

from __future__ import annotations

import logging
import os
from typing import Any

from himir_rag.decompose.base import IdentityDecomposer, QueryDecomposer
from himir_rag.decompose.llm import LLMDecomposer
from himir_rag.decompose.rules import RuleDecomposer
from himir_rag.errors import ConfigError

logger = logging.getLogger("himir_rag.decompose")  # one logger for the whole package

DECOMPOSER_NAMES = ("rule", "llm", "none")

_PROVIDERS = {
    "ollama": ("langchain_ollama", "ChatOllama", "langchain-ollama"),
    "openai": ("langchain_openai", "ChatOpenAI", "langchain-openai"),
}
_HOW_TO_CONFIGURE = (
    "set HIMIR_LLM to 'ollama:MODEL' (pip install langchain-ollama) or 'openai:MODEL' "
    "(pip install langchain-openai, and set OPENAI_API_KEY), or pass llm= from Python "
    "(a LlamaIndex LLM or a LangChain chat model)"
)


def _chat_model_from_env() -> Any:
    """Build a LangChain chat model from ``HIMIR_LLM=provider:model``.

    Raises
    ------
    ConfigError
        If ``HIMIR_LLM`` is unset or malformed, or names an unknown provider.
    ImportError
        If the provider's LangChain package is not installed.
    """
    spec = os.environ.get("HIMIR_LLM", "").strip()
    if not spec:
        raise ConfigError(f"the 'llm' decomposer needs a model but HIMIR_LLM is not set; "
                          f"{_HOW_TO_CONFIGURE}")
    provider, _, model = spec.partition(":")
    if provider.lower() not in _PROVIDERS or not model.strip():
        raise ConfigError(f"HIMIR_LLM={spec!r} is not 'provider:model' with provider in "
                          f"{sorted(_PROVIDERS)}; {_HOW_TO_CONFIGURE}")
    module_name, class_name, package = _PROVIDERS[provider.lower()]
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ImportError as exc:
        raise ImportError(f"HIMIR_LLM={spec!r} needs the {package} package: pip install "
                          f"{package}; or {_HOW_TO_CONFIGURE}") from exc
    return getattr(module, class_name)(model=model.strip())


def get_decomposer(name: str, *, llm: Any = None, **kwargs: Any) -> QueryDecomposer:
    """Build a decomposer by name (used by the CLI).

    Parameters
    ----------
    name : {"rule", "llm", "none"}
        ``"rule"``: :class:`RuleDecomposer`; ``"llm"``: :class:`LLMDecomposer` around
        ``llm``, or around a LangChain chat model built from the ``HIMIR_LLM``
        environment variable (``ollama:MODEL`` or ``openai:MODEL``); ``"none"``:
        :class:`IdentityDecomposer`.
    llm : Any, optional
        The model for ``"llm"`` (see :class:`LLMDecomposer`).
    **kwargs
        Passed to the decomposer's constructor (none for ``"none"``).

    Returns
    -------
    QueryDecomposer
        The decomposer.

    Raises
    ------
    ConfigError
        If ``name`` is unknown, or ``"llm"`` has no model and ``HIMIR_LLM`` is unset.
    ImportError
        If ``HIMIR_LLM`` names a provider whose package is not installed.

    Example
    -------
    >>> get_decomposer("rule", max_subqueries=3).decompose("a cat, a dog and a bird")
    ['a cat', 'a dog', 'a bird']
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "rule":
        _warn_unused_llm(name, llm)
        return RuleDecomposer(**kwargs)
    if key == "none":
        _warn_unused_llm(name, llm)
        return IdentityDecomposer(**kwargs)
    if key == "llm":
        return LLMDecomposer(llm if llm is not None else _chat_model_from_env(), **kwargs)
    raise ConfigError(f"unknown decomposer {name!r}; valid names are {', '.join(DECOMPOSER_NAMES)}")


def _warn_unused_llm(name: str, llm: Any) -> None:
    if llm is not None:
        logger.warning("decomposer %r does not use an LLM; the llm argument is ignored", name)
