#!/usr/bin/env sh
# Install LiteLLM's proxy into its own virtualenv, for `python -m tests.benchmarks.run --litellm VENV`.
#
# A separate virtualenv because litellm[proxy] pins its own versions of fastapi, httpx, openai, pydantic...
# which must not leak into embedgate's environment. The harness writes LiteLLM's config itself
# (model `bench-embed` -> `openai/bench-embed` at the fake upstream's /v1, a master key, and
# `allowed_openai_params: [dimensions]` so the request is forwarded unchanged) and starts it as
#   LITELLM_LOCAL_MODEL_COST_MAP=True VENV/bin/litellm --config litellm.yaml --host 127.0.0.1 --port P --num_workers 1
# (LITELLM_LOCAL_MODEL_COST_MAP: use the bundled price map instead of fetching it from GitHub at start-up).
#
# Usage: tests/benchmarks/litellm_setup.sh [VENV]      (default /tmp/litellm-venv; takes a few minutes)
set -eu
VENV="${1:-/tmp/litellm-venv}"
LITELLM_VERSION="${LITELLM_VERSION:-1.82.6}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet "litellm[proxy]==${LITELLM_VERSION}"
"$VENV/bin/python" -c "import importlib.metadata as m; print('litellm', m.version('litellm'))"
echo "LiteLLM ${LITELLM_VERSION} installed in $VENV; run: python -m tests.benchmarks.run --litellm $VENV"
