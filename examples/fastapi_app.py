"""Mount embedgate into an existing FastAPI app: the app keeps its routes and lifespan.

EMBEDGATE_CONFIG=examples/embedgate.yaml uvicorn examples.fastapi_app:app --port 8080
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from embedgate import EmbeddingGateway, load_config


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    print("host app starting")  # the gateway opens its own upstream client and stores alongside
    yield
    print("host app stopping")


app = FastAPI(lifespan=lifespan)


@app.get("/hello")
async def hello() -> dict[str, str]:
    """A route of the host app: embedgate passes it through untouched."""
    return {"message": "hello from the host app"}


app.add_middleware(EmbeddingGateway, config=load_config(os.environ.get("EMBEDGATE_CONFIG", "examples/embedgate.yaml")))
