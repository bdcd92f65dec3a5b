"""Call a running embedgate with the three SDKs, unmodified: openai-python, orq-ai-sdk, OpenRouter.

python -m tests.fake_upstream --port 9000 &
embedgate serve --config examples/embedgate.yaml &
python examples/clients.py
"""

from __future__ import annotations

import os

from openai import OpenAI
from openrouter import OpenRouter
from orq_ai_sdk import Orq

BASE = os.environ.get("EMBEDGATE_URL", "http://127.0.0.1:8080")
KEY = os.environ.get("EMBEDGATE_DEV_KEY", "sk-embedgate-dev")
MODEL = os.environ.get("EMBEDGATE_MODEL", "local/embed")
TEXTS = ["The food was delicious", "and the waiter was friendly"]

with OpenAI(api_key=KEY, base_url=f"{BASE}/v1") as openai_client:
    res = openai_client.embeddings.create(model=MODEL, input=TEXTS)  # base64 on the wire, floats for you
    print("openai-python:", res.model, [len(d.embedding) for d in res.data], res.usage)

with Orq(api_key=KEY, server_url=BASE) as orq:
    res2 = orq.router.embeddings.create(
        input=TEXTS,
        model=MODEL,
        name="example-orq",  # the trace's name
        cache={"type": "exact_match", "ttl": 3600},
        retry={"count": 2, "on_codes": [429, 500, 502, 503, 504]},
        orq={"identity": {"id": "user-42", "display_name": "Jane Doe"}},  # the SDK sends identity in the orq block
    )
    print("orq-ai-sdk:", res2.model, [len(d.embedding) for d in res2.data])

with OpenRouter(api_key=KEY, server_url=f"{BASE}/api/v1") as router:
    res3 = router.embeddings.generate(input=TEXTS, model=MODEL, provider={"order": ["local"]})
    print("openrouter:", res3.model, res3.usage)
