"""Standalone use: ``create_app(config)`` wraps the gateway around a tiny app that answers 404 in JSON."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

import orjson

from .config import Config, load_config
from .gateway import EmbeddingGateway, Receive, Send

__all__ = ["create_app"]


async def _not_found(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = orjson.dumps(
        {
            "error": {
                "message": f"No route {scope['method']} {scope['path']}",
                "type": "invalid_request_error",
                "param": None,
                "code": "not_found",
            }
        }
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(config: Config | str | os.PathLike[str] | None = None) -> EmbeddingGateway:
    """The gateway as a standalone ASGI app; with no argument, the config path comes from ``EMBEDGATE_CONFIG``.

    ``uvicorn 'embedgate:create_app' --factory``
    """
    if config is None:  # uvicorn's factory: a bad config is told as `embedgate serve` tells it, and exits 1
        from .cli import factory_config

        config = factory_config()
    elif not isinstance(config, Config):  # a path, str or PathLike
        config = load_config(config)
    return EmbeddingGateway(_not_found, config=config, standalone=True)
