"""Benchmark harness: embedgate against a direct call, a bare aiohttp ASGI proxy and LiteLLM's proxy.

Run ``python -m tests.benchmarks.run --help``; ``README.md`` here explains the method and the figures.
"""
