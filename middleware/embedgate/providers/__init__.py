"""Provider adapters: one upstream API each, behind the :class:`Adapter` protocol."""

from __future__ import annotations

import httpx

from ..config import ProviderConfig
from .base import Adapter, Embeddings, make_http_client
from .openai import OpenAIAdapter

__all__ = ["Adapter", "Embeddings", "OpenAIAdapter", "build_adapter", "make_http_client"]


def build_adapter(provider: ProviderConfig, client: httpx.AsyncClient) -> Adapter:
    """The adapter for a configured provider (``type`` was validated with the config)."""
    # openai and openai_compatible speak the same wire format; they differ only in which extras the upstream
    # accepts, which the upstream itself tells us with a 400.
    return OpenAIAdapter(provider, client)
