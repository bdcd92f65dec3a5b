"""The request pipeline: small stages over one typed :class:`Call`, in one readable list.

    normalize -> auth -> cache (lookup) -> budget (reserve) -> routing -> (cache store; budget settle/release)

The cache is looked up before the budget is reserved, so that only the items that go upstream are estimated
and reserved (a cache hit charges requests-per-minute only). A full cache hit leaves routing nothing to do: every
stage still runs (and shows in the trace), so the budget counts the hit. Follow-up work registered in
``call.finish`` runs after the response is built, in order, whether the route succeeded or not.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import anyio
import structlog

from .budgets import BudgetEngine, Reservation, Subject, cost_usd, estimate_tokens, model_price, tighter_headers
from .cache import CachedItem, Coalescer, VectorCache
from .cache_keys import item_keys
from .config import Config, KeyConfig, hash_key
from .errors import (
    BudgetExceeded,
    Dialect,
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
    Spent,
    Unauthorized,
    UpstreamError,
)
from .identities import IdentityStore
from .logs import bind_more
from .providers import Embeddings
from .request import EmbeddingRequest, parse_request
from .routing import Attempts, ResolvedModel, Router, RouteResult
from .telemetry import Telemetry

log = structlog.get_logger("embedgate.budgets")

_NONE_SKIPPED: frozenset[int] = frozenset()
#: What a model id keeps as is in a header value: printable ASCII but the list's comma and quote's own "%".
_HEADER_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ",%")

__all__ = ["TWO_AUTHORIZATIONS", "Call", "KeyIndex", "Pipeline", "one_authorization"]

#: What a request's ``Authorization`` is taken as when it sent two different ones (no header value holds a newline).
TWO_AUTHORIZATIONS: Final = "\n"


def one_authorization(first: str, second: str) -> str:
    """What two ``Authorization`` lines of one request amount to: the first, when both carry the same credentials
    (the scheme's case and the blanks aside, as :meth:`KeyIndex.authenticate` reads them: a proxy that repeats the
    client's), else :data:`TWO_AUTHORIZATIONS` (whose key is it?)."""
    return first if _credentials(first) == _credentials(second) else TWO_AUTHORIZATIONS


def _credentials(authorization: str) -> tuple[str, str]:
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower(), token.strip()


@dataclass(init=False, slots=True)
class Call:
    """Everything one embedding request carries through the stages.

    ``__init__`` written out: a dataclass's generated one stays interpreted in the compiled build (~3 us here)."""

    dialect: Dialect
    body: bytes
    request_id: str
    authorization: str | None = None
    identity_header: str | None = None
    identity_header_name: str = "x-orq-identity-id"  # the header it came from, as errors name it
    cache_control: str | None = None  # the request's Cache-Control header: its no-store / no-cache opt out
    started: float = field(default_factory=time.perf_counter)
    request: EmbeddingRequest | None = None
    key: KeyConfig | None = None
    chain: list[ResolvedModel] = field(default_factory=list)
    # results, one slot per input item
    vectors: list[bytes | None] = field(default_factory=list)
    b64: list[bytes | memoryview | None] = field(default_factory=list)  # the upstream's own base64 text, if any
    item_tokens: list[int] = field(default_factory=list)
    served_model: str = ""
    prompt_tokens: int = 0  # tokens reported to the client (cache hits report the recorded tokens)
    billed_tokens: int = 0  # tokens actually spent upstream by this request
    cost_usd: float = 0.0
    # Of those, the ones paid for work the answer does not use (see _bill_spent): (model id, tokens, cost)
    spent: list[tuple[str, int, float]] = field(default_factory=list)
    cache_status: str = "bypass"
    refresh: bool = False  # Cache-Control: no-cache: embedded afresh (not another request's answer) and stored
    cache_ttl: int | None = None
    cache_keys: list[str] = field(default_factory=list)
    lookup_model: str = ""  # the model the cache keys are looked up under: the first of the chain that may serve
    served_place: int = -1  # the place in the chain of the model that served what this request fetched
    key_input_type: str | None = None  # the input_type the cache keys hold: as the upstream gets it (see cache_lookup)
    attempts: int = 0
    deployment: str = ""
    budget_decision: str = "none"
    reservation: Reservation | None = None  # what the budget stage reserved for the upstream work, if anything
    items_fetched: int = 0  # items this request itself sent upstream (or repeats of them in its batch)
    deadline: float | None = None  # routing's overall deadline, set by the first upstream call: later ones share it
    headers: dict[str, str] = field(default_factory=dict)
    finish: list[Callable[[Call, GatewayError | None], Awaitable[None]]] = field(default_factory=list)
    span: Any = None
    skipped: frozenset[int] = frozenset()  # places in the chain not tried: fallbacks whose own budget is spent
    skipped_refusals: dict[int, GatewayError] | None = None  # their budgets' refusals, by place
    # Providers not to spend at, by place in the chain: their own provider budget refused (see Pipeline._reserve_chain)
    refused_providers: dict[int, dict[str, GatewayError]] | None = None
    # What each provider charged, when provider budgets may hold a reservation: (model id, provider, tokens, cost)
    charges: list[tuple[str, str, int, float]] | None = None
    # What the budget stage reserved beside ``reservation``: (model id, None) a fallback's own budgets, (model id,
    # provider) a provider's that serves that model under another id
    held: list[tuple[str, str | None, Reservation]] | None = None

    def __init__(
        self,
        *,
        dialect: Dialect,
        body: bytes,
        request_id: str,
        authorization: str | None = None,
        identity_header: str | None = None,
        identity_header_name: str = "x-orq-identity-id",
        cache_control: str | None = None,
    ) -> None:
        self.dialect = dialect
        self.body = body
        self.request_id = request_id
        self.authorization = authorization
        self.identity_header = identity_header
        self.identity_header_name = identity_header_name
        self.cache_control = cache_control
        self.started = time.perf_counter()
        self.request = None
        self.key = None
        self.chain = []
        self.vectors = []
        self.b64 = []
        self.item_tokens = []
        self.served_model = ""
        self.prompt_tokens = 0
        self.billed_tokens = 0
        self.cost_usd = 0.0
        self.spent = []
        self.cache_status = "bypass"
        self.refresh = False
        self.cache_ttl = None
        self.cache_keys = []
        self.lookup_model = ""
        self.served_place = -1
        self.key_input_type = None
        self.attempts = 0
        self.deployment = ""
        self.budget_decision = "none"
        self.reservation = None
        self.deadline = None
        self.items_fetched = 0
        self.headers = {}
        self.finish = []
        self.span = None
        self.skipped = _NONE_SKIPPED
        self.skipped_refusals = None
        self.refused_providers = None
        self.charges = None
        self.held = None

    def missing(self) -> list[int]:
        """Positions of the items that still have no vector."""
        return [i for i, v in enumerate(self.vectors) if v is None]


class KeyIndex:
    """Client keys by sha256, with each key's model grants compiled once."""

    def __init__(self, keys: tuple[KeyConfig, ...]) -> None:
        # By sha256 only: a key matched is not remembered by its text either (a dump of the process's memory
        # holds no client key; its sha256, ~1 us, runs on every request).
        self._by_digest = {k.sha256: k for k in keys}
        self._grants: dict[str, re.Pattern[str] | None] = {
            k.id: None if k.models is None else re.compile("|".join(fnmatch.translate(g) for g in k.models) or "(?!)")
            for k in keys
        }

    def authenticate(self, authorization: str | None) -> KeyConfig:
        """The key of a ``Bearer`` header, or 401."""
        if not authorization:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'", param="authorization")
        if authorization == TWO_AUTHORIZATIONS:
            raise Unauthorized("Two different Authorization headers: send one, 'Bearer <key>'", param="authorization")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'", param="authorization")
        key = self._by_digest.get(hash_key(token))
        if key is None:
            raise Unauthorized("Invalid API key", param="authorization")
        return key

    def allows(self, key: KeyConfig, model: str) -> bool:
        """Whether ``key`` is granted ``model`` (globs; no list means every model)."""
        grant = self._grants.get(key.id)
        return grant is None or grant.fullmatch(model) is not None


Stage = Callable[[Call], Awaitable[None]]


class Pipeline:
    """Runs the stages of one request in order; stage objects hold only precomputed, per-process state."""

    def __init__(
        self,
        config: Config,
        router: Router,
        cache: VectorCache,
        budgets: BudgetEngine,
        identities: IdentityStore,
        telemetry: Telemetry,
        *,
        bind_key_id: bool = True,
    ) -> None:
        self._config = config
        self._router = router
        self._cache = cache
        self._budgets = budgets
        self._identities = identities
        self._telemetry = telemetry
        self._has_budgets = bool(config.budgets)
        # Mounted, the host's log lines within a request carry its key id (SPEC 8); standalone no host code runs
        # in a request, and the access line names the key itself.
        self._bind_key_id = bind_key_id
        self._subjects: dict[tuple[str, str, str | None], Subject] = {}
        self._dearest_prices: dict[str, float] = {}
        self._counts_providers = any(b.scope == "provider" for b in config.budgets)
        self._serving: dict[str, tuple[str, ...]] = {}  # per model id, see _serving_providers
        # Misses coalesce only among requests routed alike: one whose fallbacks, retries, timeout, provider
        # preferences or user differ gets its own call (another's failure, or a model outside its chain, a
        # fallback its key is not granted, is not its answer).
        # A coalesced item: the model that served it, its vector and tokens, and the TTL its fetch stores it for
        # (one list per fetch, which a waiter asking for longer raises: see _merge_and_store).
        self._coalescers: dict[tuple[object, ...], Coalescer[tuple[str, CachedItem, list[int]]]] = {}
        self._keys = KeyIndex(config.keys)
        self._unknown = config.server.unknown_fields
        self._default_retry = config.routing.default_retry
        self._cache_cfg = config.cache
        # normalize runs first, on its own: the request's name names the trace that spans the other stages. The
        # flag: whether the stage's span is made current, for the spans started within it (routing's attempts).
        self.stages: list[tuple[str, Stage, bool]] = [
            ("auth", self.authenticate, False),
            ("cache", self.cache_lookup, False),
            ("budget", self.budget, False),
            ("routing", self.route, True),
        ]

    @property
    def keys(self) -> KeyIndex:
        """The key index (also used by ``/v1/models``)."""
        return self._keys

    async def run(self, call: Call) -> None:
        """Run the stages after ``normalize``, each in its own span; a stage with nothing to do is skipped, span
        and all (``cache`` when the request bypasses the cache, ``routing`` when the cache answered every item)."""
        telemetry = self._telemetry
        for name, stage, current in self.stages:
            if name == "routing" and call.cache_status == "hit":
                continue
            if name == "cache" and self._bypasses_cache(call):
                continue
            with telemetry.stage(name, current=current):
                await stage(call)

    def _bypasses_cache(self, call: Call) -> bool:
        req = call.request
        assert req is not None
        if req.cache is None and not self._cache_cfg.enabled_by_default:
            return True
        return call.cache_control is not None and "no-store" in _directives(call.cache_control)

    async def normalize(self, call: Call) -> None:
        """Parse, validate and normalize the body (400 naming the parameter)."""
        call.request = parse_request(
            call.body,
            identity_header=call.identity_header,
            identity_header_name=call.identity_header_name,
            unknown_fields=self._unknown,
            default_retry=self._default_retry,
        )

    def check_key(self, call: Call) -> None:
        """The request's key (401), before its body is parsed: a client without a valid key costs no parse (an 8 MiB
        body of small values took ~0.5 s and ~30x its size in memory), and its body names no trace."""
        call.key = self._keys.authenticate(call.authorization)

    async def authenticate(self, call: Call) -> None:
        """Key (401, unless ``check_key`` ran), models resolvable (404) and granted (403), item count within the
        model's limit (400)."""
        req = call.request
        assert req is not None  # normalize ran
        key = call.key
        if key is None:
            call.key = key = self._keys.authenticate(call.authorization)
        if self._bind_key_id:
            bind_more(key_id=key.id)
        call.chain = chain = self._router.chain(req)  # before the grants: a 403 is counted under its model too
        named = [(req.model, "model")] if not req.load_balancer else []
        named += [
            (m, req.param(f"load_balancer.models[{i}].model")) for i, (m, _) in enumerate(req.load_balancer or ())
        ]
        named += [(m, req.param(f"fallbacks[{i}].model")) for i, m in enumerate(req.fallbacks)]
        for model, param in named:
            if not self._keys.allows(key, model):
                raise Forbidden(f"The key '{key.id}' is not allowed to use the model '{model}'", param=param)
        limit = chain[0].max_request_inputs
        if len(req.items) > limit:
            raise InvalidRequest(
                f"Too many inputs: {len(req.items)} items, at most {limit} for '{chain[0].id}'", param="input"
            )
        # Checked here, not in the cache stage: a request that bypasses the cache (no-store) is told too.
        if req.cache is not None and req.cache.ttl is not None and req.cache.ttl > self._cache_cfg.max_ttl:
            param = req.param("cache.ttl")
            raise InvalidRequest(f"Invalid '{param}': {req.cache.ttl} s is above the maximum of "
                                 f"{self._cache_cfg.max_ttl} s", param=param)  # fmt: skip
        call.vectors = [None] * len(req.items)
        call.b64 = [None] * len(req.items)
        call.item_tokens = [0] * len(req.items)

    async def cache_lookup(self, call: Call) -> None:
        """Answer what the exact-match cache holds, per item; ``x-embedgate-cache`` tells the outcome."""
        req = call.request
        assert req is not None and call.key is not None
        cfg = self._cache_cfg
        if self._bypasses_cache(call):
            return
        if req.input_type is not None:
            # Keyed by the input_type the upstream gets (it changes the vector): none where every provider that may
            # serve leaves it out; and not cached where that depends on the deployment (a vector made without it
            # would be kept, and found, as one made with it).
            sends = self._router.sends_input_type(call.chain, req)
            if sends is None:
                return
            call.key_input_type = req.input_type if sends else None
        # Looked up under the model that serves the request while no upstream fails: the chain's first may take no
        # part (its deployments excluded by the request's provider preferences, none multimodal), and the router
        # passes it over; a vector of it is then never this request's answer, and its fallback's is kept under the
        # fallback. None can take it: not cached (routing answers why: 404 no_allowed_providers, 400).
        lookup = self._router.first_servable(call.chain, req)
        if lookup is None:
            return
        call.lookup_model = lookup.id
        call.cache_ttl = req.cache.ttl if req.cache is not None and req.cache.ttl is not None else cfg.default_ttl
        call.cache_keys = self._item_keys(call, lookup.id)
        if call.cache_control is not None and "no-cache" in _directives(call.cache_control):
            call.cache_status = "miss"  # embedded afresh, and stored: a refresh
            call.refresh = True
            return
        found = await self._cache.get_many(call.cache_keys)
        # The size a vector of this request has: the dimensions asked, else the model's as its answers showed it.
        # An item of another size was cached before the model changed its dimension count (the key has none when
        # the request asks for none), or is no vector of this model's (a foreign value in a shared Redis): a miss.
        dims = req.dimensions if req.dimensions is not None else self._router.known_dimensions(lookup.id)
        width = -1 if dims is None else 4 * dims
        hits = 0
        for i, item in enumerate(found):
            if item is not None:
                if width >= 0 and len(item.vector) != width:
                    found[i] = None
                    continue
                call.vectors[i] = item.vector
                call.item_tokens[i] = item.tokens
                hits += 1
        if hits == len(found) > 1 and len({len(item.vector) for item in found if item is not None}) > 1:
            # Cached before the model changed its dimension count (the key has none when the request asks for
            # none): one answer never mixes vector sizes, so every item is embedded afresh.
            call.vectors = [None] * len(found)
            call.item_tokens = [0] * len(found)
            hits = 0
        call.cache_status = "hit" if hits == len(found) else "partial" if hits else "miss"
        if hits == len(found):
            call.served_model = lookup.id
            call.prompt_tokens = sum(call.item_tokens)

    def _item_keys(self, call: Call, model: str, positions: list[int] | None = None) -> list[str]:
        req = call.request
        assert req is not None and call.key is not None
        items = req.items if positions is None else [req.items[p] for p in positions]
        return item_keys(workspace=call.key.workspace, model=model, dimensions=req.dimensions,
                         input_type=call.key_input_type, items=items)  # fmt: skip

    async def budget(self, call: Call) -> None:
        """Reserve the estimated tokens and cost of what goes upstream on every applicable budget (429 if not)."""
        req, key = call.request, call.key
        assert req is not None and key is not None
        identity = req.identity["id"] if req.identity else None
        if req.identity:
            await self._identities.touch(req.identity, key.workspace)
        if not self._has_budgets:
            return
        model = call.chain[0]
        subject = self._subjects.get((key.id, model.id, identity))
        if subject is None:  # one per key, model and identity, not one per request
            if len(self._subjects) >= 10_000:
                self._subjects.clear()
            subject = self._subjects[key.id, model.id, identity] = Subject(
                workspace=key.workspace, project=key.project, api_key=key.id, provider=model.id.partition("/")[0],
                model=model.id, identity=identity)  # fmt: skip
        missing = call.missing()
        gating: list[Reservation] = []
        if not missing:  # a full cache hit counts against requests per minute only
            reservation = await self._budgets.reserve(subject, tokens=0, cost_usd=0.0, cached=True)
        else:
            # A fallback serving a partial hit embeds the cached items again (one answer never mixes models):
            # with fallbacks, every item may be charged.
            counted: Sequence[int] = missing if len(call.chain) == 1 else range(len(req.items))
            keys = call.cache_keys
            if keys and len(counted) > 1:  # an item repeated in the batch goes upstream once: estimated once
                seen: set[str] = set()
                once: list[int] = []
                for i in counted:
                    if keys[i] not in seen:
                        seen.add(keys[i])
                        once.append(i)
                counted = once
            tokens = estimate_tokens([req.items[i] for i in counted])
            # the dearest deployment of the chain's models bounds what a fallback may cost
            price = max([self._dearest(m) for m in call.chain], default=0.0)
            reservation = await self._budgets.reserve(subject, tokens=tokens, cost_usd=cost_usd(tokens, price))
            call.reservation = reservation
            budgets = self._budgets
            # The fallbacks' own, by model id (provider None); the providers' that serve a model under another id, by
            # (model id, provider).
            held: list[tuple[str, str | None, Reservation]] = []

            async def settle(call: Call, error: GatewayError | None) -> None:
                if call.billed_tokens or error is None:
                    await budgets.settle(reservation, tokens=call.billed_tokens, cost_usd=call.cost_usd)
                else:
                    await budgets.release(reservation)
                settled: set[tuple[str, str | None]] = set()
                for model_id, provider, own in held:
                    # all a model (or a provider, for that model) charged, on its first reservation (a model named
                    # twice holds two: the other released)
                    if (model_id, provider) in settled:
                        spent_tokens, spent_cost = 0, 0.0
                    elif provider is None:
                        spent_tokens, spent_cost = _charged_by(call, model_id)
                    else:
                        spent_tokens, spent_cost = _charged_at(call, model_id, provider)
                    settled.add((model_id, provider))
                    if spent_tokens:
                        await budgets.settle(own, tokens=spent_tokens, cost_usd=spent_cost)
                    else:
                        await budgets.release(own)

            call.finish.append(settle)  # (before the other reserves: whatever they do, this one is undone)
            if reservation.decision != "fail_open" and (len(call.chain) > 1 or self._counts_providers):
                gating = await self._reserve_chain(call, reservation, held, tokens)  # (store down: not asked again)
            if call.skipped:
                # (a client's own model ids: any character a header value cannot hold is percent-encoded)
                names = dict.fromkeys([call.chain[place].id for place in sorted(call.skipped)])
                call.headers["x-embedgate-fallbacks-skipped"] = ", ".join([quote(m, safe=_HEADER_SAFE) for m in names])
        call.budget_decision = reservation.decision
        headers = reservation.headers()
        for own in gating:  # the providers serving the requested model gate it too: the headers name the tightest
            tighter_headers(headers, own.headers())
        call.headers.update(headers)

    async def _reserve_chain(self, call: Call, reservation: Reservation,
                             held: list[tuple[str, str | None, Reservation]], tokens: int
                             ) -> list[Reservation]:  # fmt: skip
        """Reserve, in the chain's order (an earlier model's budget is not taken by a later one's reservation), what
        the request's own reservation does not count:

        - each fallback's own ``model`` and ``provider`` budgets (a fallback may embed every item). One whose budget
          refuses is not tried (its place in ``Call.skipped``; the others keep theirs): a client naming a capped
          model as its fallback (behind a model that fails, or with its own ``fallback_on_codes``) spent it past its
          budget. A model named twice is reserved twice (each turn may embed every item: one that embedded chunks of
          a split batch before failing, then served, charged both).
        - the budgets of each provider that serves a model under another model id (``acme/embed`` on ``azure``),
          among the deployments the request may use. One that refuses is not used there (``Call.refused_providers``);
          a fallback none of whose usable deployments is then left is skipped, as one whose own budget refused.

        The reservations made for the provider serving the requested model (the chain's first) when it alone does,
        which gate it as its own budgets do.
        """
        req = call.request
        assert req is not None
        call.held = held
        gating: list[Reservation] = []
        if self._counts_providers:
            call.charges = []  # what each provider charged (see _take): it settles the providers' reservations
        for place, model in enumerate(call.chain):
            cost = cost_usd(tokens, self._dearest(model))
            if place:
                outcome = await self._hold(held, model, None, reservation, tokens, cost)
                if outcome is None:  # the store went down: the rest are admitted too, without a wait each
                    return gating
                if isinstance(outcome, BudgetExceeded):
                    log.info("fallback not tried: its budget is spent", fallback=model.id, scope=outcome.scope_kind,
                             target=outcome.scope_target_id, dimension=outcome.dimension)  # fmt: skip
                    _skip(call, place, outcome)
                    continue
            if not self._counts_providers:
                continue
            providers = self._serving_providers(model)
            if not providers:
                continue
            usable = self._router.usable(model, req)  # what its provider preferences and input leave
            at = {d.provider for d in usable}
            refusals: dict[str, GatewayError] = {}
            alone = not place and len(at) == 1  # it alone serves the requested model: it counts the request too
            for provider in providers:
                if provider not in at:
                    continue
                outcome = await self._hold(held, model, provider, reservation, tokens, cost, alone)
                if outcome is None:
                    return gating
                if isinstance(outcome, BudgetExceeded):
                    log.info("provider not used: its budget is spent", model=model.id, provider=provider,
                             scope=outcome.scope_kind, target=outcome.scope_target_id,
                             dimension=outcome.dimension)  # fmt: skip
                    refusals[provider] = outcome
                elif alone and outcome.decision == "reserved":
                    gating.append(outcome)  # its budget gates the request: the headers may name it
            if not refusals:
                continue
            if call.refused_providers is None:
                call.refused_providers = {}
            call.refused_providers[place] = refusals
            if place and usable and all(d.provider in refusals for d in usable):
                _skip(call, place, next(iter(refusals.values())))
        return gating

    async def _hold(self, held: list[tuple[str, str | None, Reservation]], model: ResolvedModel, provider: str | None,
                    reservation: Reservation, tokens: int, cost: float, request: bool = False
                    ) -> Reservation | BudgetExceeded | None:  # fmt: skip
        """Reserve on the budgets of a fallback ``model`` (``provider`` None), or of a ``provider`` serving ``model``
        under another id (with ``request``, counting the request against its ``requests_per_minute`` too), what
        ``reservation`` does not hold; kept in ``held`` when reserved. The reservation, the refusal, or None when the
        store went down (and ``fail_open`` admitted the request)."""
        try:
            if provider is None:
                own = await self._budgets.reserve_fallback(model.id, reservation, tokens=tokens, cost_usd=cost)
            else:
                own = await self._budgets.reserve_provider(provider, reservation, tokens=tokens, cost_usd=cost,
                                                           request=request)  # fmt: skip
        except BudgetExceeded as refused:
            return refused
        if own.decision == "reserved":
            held.append((model.id, provider, own))
        return None if own.decision == "fail_open" else own

    def _serving_providers(self, model: ResolvedModel) -> tuple[str, ...]:
        """The providers with a budget that serve ``model`` under another name than its id's prefix (``acme/embed``
        served by ``azure``): what is spent there counts on their budgets too, whichever model id the request named.
        Once per model id."""
        providers = self._serving.get(model.id)
        if providers is None:
            prefix = model.id.partition("/")[0]
            named = [d.provider for d in model.deployments if d.provider != prefix]
            providers = tuple([p for p in dict.fromkeys(named) if self._budgets.counts_provider(p)])
            if len(self._serving) >= 10_000:  # made-up <provider>/<name> ids: bounded
                self._serving.clear()
            self._serving[model.id] = providers
        return providers

    def _price(self, model_id: str) -> float:
        return model_price(model_id, self._config.models) or 0.0

    def _dearest(self, model: ResolvedModel) -> float:
        """The highest price any deployment of ``model`` may charge (a deployment's own, else the model's)."""
        price = self._dearest_prices.get(model.id)
        if price is None:
            models = self._config.models
            price = max([model_price(model.id, models, d) or 0.0 for d in model.deployments], default=0.0)
            price = max(price, self._price(model.id))
            if len(self._dearest_prices) >= 10_000:  # made-up <provider>/<name> ids: bounded
                self._dearest_prices.clear()
            self._dearest_prices[model.id] = price
        return price

    async def route(self, call: Call) -> None:
        """Embed the items still missing, through the router (and the miss coalescer when caching)."""
        req = call.request
        assert req is not None
        positions = call.missing()
        if not positions:
            return
        if call.cache_ttl is None:
            result = await self._embed(call, positions, call.chain)
            self._take(call, positions, result)
            return
        keys = [call.cache_keys[p] for p in positions]
        kept_for = [call.cache_ttl]  # what this request's fetch stores its items for (waiters may raise it)
        fetched_here: set[int] = set()
        paid: set[int] = set()  # every item this request's own calls embedded (fetched_here: of the serving model)

        async def fetch(idx: list[int]) -> list[tuple[str, CachedItem, list[int]]]:
            own = [positions[i] for i in idx]
            result = await self._embed(call, own, call.chain)
            if fetched_here and result.model != call.served_model:
                # An earlier round (before an owner this request waited on was cancelled) was served by another
                # model: what it fetched is kept under that model and charged to it, then embedded again by this
                # one as another model's (one answer, one model; stored under this one, it served the wrong vector)
                ttl_kept = max(call.cache_ttl or 0, kept_for[0])
                await self._store(call, call.served_model, sorted(fetched_here), ttl_kept)
                _supersede(call, call.served_model)
                fetched_here.clear()
            fetched_here.update(own)
            paid.update(own)
            self._take(call, own, result)
            return [(result.model, CachedItem(vector=call.vectors[p], tokens=call.item_tokens[p]), kept_for)  # type: ignore[arg-type]
                    for p in own]  # fmt: skip

        # (and the fallbacks not tried: a request whose fallback's budget is spent shares no upstream call with one
        # whose is not, and the models keep their places, which an error's param names)
        refused = call.refused_providers
        unused = None if refused is None else frozenset([(k, p) for k, ps in refused.items() for p in ps])
        policy = (tuple([m.id for m in call.chain]), call.skipped, req.retry, req.fallback_on_codes, req.timeout_ms,
                  req.provider, req.user, unused)  # fmt: skip
        if call.refresh:  # a refresh takes no other request's answer, in flight or just fetched
            first: dict[str, int] = {}  # an item repeated in the batch goes upstream once
            for i, key in enumerate(keys):
                first.setdefault(key, i)
            unique = list(first.values())
            got = dict(zip([keys[i] for i in unique], await fetch(unique), strict=True))
            await self._merge_and_store(call, positions, [got[key] for key in keys], fetched_here, kept_for, paid)
        else:
            coalescer = self._coalescers.get(policy)
            if coalescer is None:
                # an input the upstream rejected is the owner's own error: its waiters ask for their items
                coalescer = self._coalescers[policy] = Coalescer(private=(InvalidRequest,), shared=_as_shared)
            # What this request fetched stays in flight, answered, until it is in the cache: a request that reaches
            # this point meanwhile takes it rather than fetching it again.
            held: list[tuple[str, asyncio.Future[tuple[str, CachedItem, list[int]]]]] = []
            if call.deadline is None:  # (its deadline bounds its waits on other requests' calls too)
                call.deadline = self._router.deadline()
            deadline = call.deadline
            coalescer.users += 1
            try:
                failure: BaseException | None = None
                try:
                    results = await coalescer.run(keys, fetch, held, lambda: self._router.left(deadline))
                except GatewayError as exc:
                    failure = exc  # acted on below, outside the handler (no await in one: see embedgate._native)
                except TimeoutError:  # its deadline passed while it waited on another request's call
                    failure = self._router.deadline_reached()
                except asyncio.CancelledError as exc:  # (the server stopping, a host's timeout, its client gone)
                    failure = exc
                if failure is not None:
                    # Another request's item this one waited on failed, or the request ended while it waited: what
                    # it fetched was paid for, and is kept in the cache all the same (the same key asking again is
                    # not charged twice).
                    if fetched_here and call.served_model:
                        with anyio.CancelScope(shield=True):  # a host's anyio scope, cancelling, would cancel it
                            await self._store(
                                call, call.served_model, sorted(fetched_here), max(call.cache_ttl, kept_for[0])
                            )
                    raise failure
                await self._merge_and_store(call, positions, results, fetched_here, kept_for, paid)
            finally:  # the last request of a policy removes its coalescer (no await here: see embedgate._native)
                coalescer.release(held)
                coalescer.users -= 1
                if not coalescer.users and not coalescer.in_flight() and self._coalescers.get(policy) is coalescer:
                    del self._coalescers[policy]
        # An item repeated in the batch waits on its first occurrence's fetch: a miss too, not a cache hit (and so
        # is a cached item a fallback embedded again, with its repeats).
        # (every item its own calls embedded: one of a round whose model another round's superseded too)
        missed = len(paid)
        if missed < len(req.items):
            ours = {call.cache_keys[p] for p in paid}
            missed += sum(1 for p, key in enumerate(call.cache_keys) if p not in paid and key in ours)
        call.items_fetched = missed
        call.cache_status = "hit" if not missed else "miss" if missed == len(req.items) else "partial"
        call.prompt_tokens = sum(call.item_tokens)

    async def _merge_and_store(self, call: Call, positions: list[int], results: list[tuple[str, CachedItem, list[int]]],
                               fetched_here: set[int], kept_for: list[int], paid: set[int]) -> None:  # fmt: skip
        """Take the coalesced results, embed again what another model answered, and store what was fetched for
        the longest TTL asked of it (``kept_for``, which waiters raise), and what another request fetched, if it
        keeps it for less time than this one asks (it may have stored it already)."""
        req, ttl = call.request, call.cache_ttl
        assert req is not None and ttl is not None
        longer: list[int] = []  # stored for less than this request asks: by it too (its fetch may have stored)
        shorter: list[list[int]] = []
        for pos, (model, item, stored_for) in zip(positions, results, strict=True):
            if pos not in fetched_here:  # coalesced: another request paid for it
                call.vectors[pos] = item.vector
                call.item_tokens[pos] = item.tokens
                if not call.served_model:
                    call.served_model = model
                if stored_for[0] < ttl:
                    longer.append(pos)
                    shorter.append(stored_for)
        for stored_for in shorter:  # and a fetch still to store keeps them that long
            stored_for[0] = max(stored_for[0], ttl)
        served = call.served_model
        # Vectors of different models live in different spaces: one response never mixes them. When a fallback
        # served the misses, the items answered for another model are embedded again by the one that served.
        foreign = [p for p, (m, _, _) in zip(positions, results, strict=True) if m != served]
        missing = set(positions)
        if call.cache_status in ("hit", "partial") and served != call.lookup_model:
            foreign += [p for p in range(len(req.items)) if p not in missing]
        elif call.cache_status == "partial":
            # Cached before the model changed its dimension count (the cache key has none when the request asks
            # for none): embedded again, as one answer never mixes vector sizes. (The missing items' vectors are
            # this request's own or another's, fetched just now.)
            width = len(call.vectors[positions[0]] or b"")
            foreign += [p for p in range(len(req.items)) if p not in missing and len(call.vectors[p] or b"") != width]
        if foreign:
            first: dict[str, int] = {}  # an item repeated in the batch is embedded again once
            for p in sorted(set(foreign)):
                first.setdefault(call.cache_keys[p], p)
            unique = list(first.values())
            cached = [req.items[p] for p in unique if p not in missing]
            # Without fallbacks the budget reserved only the missing items (see budget): the cached ones embedded
            # again are reserved now (a 429 if they do not fit), or they would overshoot it. With fallbacks it
            # reserved every item once: those this request paid for already (an earlier round's) are reserved again.
            extra = cached if len(call.chain) == 1 else [req.items[p] for p in unique if p in paid]
            if extra:
                refused = await self._extend(call, extra, providers=len(call.chain) == 1)
                if refused is not None:
                    # The missing items were embedded, and paid for: kept in the cache all the same (another key
                    # of the workspace, or this one once its budget allows, finds them), then the 429 (or 503).
                    await self._store_fetched(call, served, fetched_here, longer, foreign, max(ttl, kept_for[0]))
                    raise refused
            # The model that served, then the fallbacks after it, as routing tries them: embedding the items again on
            # the model that served alone, its failure was the request's error where a later fallback would have
            # served it, as it does without the cache. Its place: where it served this request's own fetch, else
            # (items of another request's call alone) its first place in the chain.
            place = call.served_place
            if place < 0 or place >= len(call.chain) or call.chain[place].id != served:
                place = next((i for i, m in enumerate(call.chain) if m.id == served), -1)
            ttl_kept = max(ttl, kept_for[0])
            while True:
                chain = call.chain[place:] if place >= 0 else [self._router.resolve(served)]
                failed: GatewayError | None = None
                try:
                    again = await self._embed(call, unique, chain, max(place, 0))
                except GatewayError as exc:
                    failed = exc  # acted on below, outside the handler (no await in one: see embedgate._native)
                if failed is not None:  # so too when embedding them again fails: what was paid for is kept
                    await self._store_fetched(call, served, fetched_here, longer, foreign, ttl_kept)
                    raise failed
                moved = again.model != served  # a later place served them (a model named twice: its own vectors)
                if moved:
                    # What the model before it fetched is kept under it, and charged to it (its budgets, metrics)
                    await self._store_fetched(call, served, fetched_here, longer, foreign, ttl_kept)
                    _supersede(call, served)
                self._take(call, unique, again)
                for p in foreign:
                    q = first[call.cache_keys[p]]
                    if q != p:
                        call.vectors[p], call.b64[p] = call.vectors[q], call.b64[q]
                        call.item_tokens[p] = call.item_tokens[q]
                fetched_here.update(foreign)
                paid.update(foreign)
                if not moved:
                    break
                # ... and the rest of the answer is embedded again by the one that served: one answer, one model.
                # Its place is later than the one before (each round goes on down the chain, so they end).
                served, place = again.model, again.place
                done = set(foreign)
                foreign = [p for p in range(len(req.items)) if p not in done]
                if not foreign:
                    break
                first = {}
                for p in foreign:
                    first.setdefault(call.cache_keys[p], p)
                unique = list(first.values())
                # Paid for twice (by the model before, and now this one): beyond the estimate, reserved now (the
                # cached and coalesced ones are paid for once, within it)
                twice = [req.items[p] for p in unique if p in paid]
                refused = await self._extend(call, twice) if twice else None
                if refused is not None:
                    await self._store_fetched(call, served, fetched_here, longer, foreign, ttl_kept)
                    raise refused
        fresh = sorted(fetched_here.union(longer))  # (the status counts only what this request fetched)
        await self._store(call, served, fresh, max(ttl, kept_for[0]))

    async def _extend(self, call: Call, items: list[Any], providers: bool = False) -> GatewayError | None:
        """Reserve the estimate of ``items`` more on the request's budgets (with ``providers``, on those of the
        providers serving its one model under another id too): work its estimate did not cover. Their refusal (a
        429, or a 503), if any. (With fallbacks, each fallback's and provider's own budgets hold the whole estimate
        already, for the items it embeds once.)"""
        if call.reservation is None:
            return None
        tokens = estimate_tokens(items)
        # the dearest deployment of the chain's models bounds what it may cost, as for the estimate
        cost = cost_usd(tokens, max([self._dearest(m) for m in call.chain], default=0.0))
        refused: GatewayError | None = None
        try:
            await self._budgets.extend(call.reservation, tokens=tokens, cost_usd=cost)
            for _, provider, own in call.held or () if providers else ():
                if provider is not None:
                    await self._budgets.extend(own, tokens=tokens, cost_usd=cost)
        except GatewayError as exc:
            refused = exc
        return refused

    async def _store_fetched(self, call: Call, model: str, fetched_here: set[int], longer: list[int],
                             foreign: list[int], ttl: int) -> None:  # fmt: skip
        """Keep what this request fetched (and what it keeps longer), but the items of another model (``foreign``),
        whose embedding again did not come: the request fails, but its missing items were embedded and paid for."""
        again_of = set(foreign)
        await self._store(call, model, sorted(p for p in fetched_here.union(longer) if p not in again_of), ttl)

    async def _store(self, call: Call, model: str, positions: list[int], ttl: int) -> None:
        """Keep the vectors at ``positions`` under ``model``'s keys for ``ttl`` seconds."""
        if positions:
            keys = self._item_keys(call, model, positions)
            await self._cache.set_many(
                [(k, CachedItem(vector=call.vectors[p], tokens=call.item_tokens[p]))  # type: ignore[arg-type]
                 for k, p in zip(keys, positions, strict=True)],
                ttl,
            )  # fmt: skip

    async def _embed(self, call: Call, positions: list[int], chain: list[ResolvedModel],
                     first_index: int = 0) -> RouteResult:  # fmt: skip
        assert call.request is not None
        if call.deadline is None:
            call.deadline = self._router.deadline()
        attempts = Attempts()
        failure: BaseException | None = None
        try:
            result = await self._router.embed(call.request, positions, chain, call.deadline, attempts, first_index,
                                              call.skipped, call.refused_providers)  # fmt: skip
        except BaseException as exc:
            # Failed, or cancelled (the server stopping, a host's timeout): the attempts it made are the request's,
            # and so is what they were paid for (a chunk embedded before another failed), in its budgets and cost.
            call.attempts += attempts.count
            self._bill_spent(call, attempts.spent)
            failure = exc  # raised below, outside the handler (no await in one: see embedgate._native)
            refusals = call.skipped_refusals
            if refusals is not None and attempts.count == 0 and isinstance(exc, (NotFound, InvalidRequest)):
                # No model could be tried (the provider preferences exclude them, none takes a multimodal input) but
                # a skipped fallback that could have: its budget is why none served (a 404 said no retry could help,
                # a 400 blamed the input).
                refusal = self._servable_refusal(call, refusals)
                if refusal is not None:
                    refusal.__suppress_context__ = True
                    failure = refusal
        if attempts.embedded and call.cache_ttl is not None:
            if isinstance(failure, asyncio.CancelledError):  # (its client gone, say: it will ask again)
                with anyio.CancelScope(shield=True):  # a host's anyio scope, cancelling, would cancel this too
                    await self._keep_embedded(call, attempts.embedded)
            else:
                await self._keep_embedded(call, attempts.embedded)
        if failure is not None:
            raise failure
        return result

    async def _keep_embedded(self, call: Call, embedded: list[tuple[str, list[int], Embeddings]]) -> None:
        """Keep in the cache the chunks of a split batch a model embedded before it failed on another: paid for,
        but not in the answer (another model served it, or none did); asked again, that model's items are hits."""
        req = call.request
        assert req is not None and call.cache_ttl is not None
        for model, chunk, emb in embedded:
            shares = apportion(emb.prompt_tokens, [weight(req.items[p]) for p in chunk])
            keys = self._item_keys(call, model, chunk)
            await self._cache.set_many(
                [(key, CachedItem(vector=vector, tokens=tokens))
                 for key, vector, tokens in zip(keys, emb.vectors, shares, strict=True)],
                call.cache_ttl,
            )  # fmt: skip

    def _servable_refusal(self, call: Call, refusals: dict[int, GatewayError]) -> GatewayError | None:
        """The budget refusal of the first skipped fallback that could have taken the request, if any."""
        assert call.request is not None
        for place in sorted(refusals):
            if self._router.first_servable([call.chain[place]], call.request) is not None:
                return refusals[place]
        return None

    def _take(self, call: Call, positions: list[int], result: RouteResult) -> None:
        req = call.request
        assert req is not None
        for pos, vec in zip(positions, result.vectors, strict=True):
            call.vectors[pos] = vec
        texts = result.b64 or [None] * len(positions)
        for pos, text in zip(positions, texts, strict=True):
            call.b64[pos] = text
        items = req.items
        picked = [items[p] for p in positions]
        # strings (the usual batch) weigh their length; the general rule for the rest
        weights = ([len(i) or 1 for i in picked] if all(type(i) is str for i in picked)
                   else [weight(i) for i in picked])  # fmt: skip
        shares = apportion(result.prompt_tokens, weights)
        for pos, tokens in zip(positions, shares, strict=True):
            call.item_tokens[pos] = tokens
        call.served_model = result.model
        call.served_place = result.place
        call.billed_tokens += result.prompt_tokens
        call.prompt_tokens = sum(call.item_tokens)
        call.attempts += result.attempts
        call.deployment = result.deployment
        price = result.price_per_million_tokens
        if price is None:
            price = self._price(result.model)
        call.cost_usd += cost_usd(result.prompt_tokens, price)
        if call.charges is not None:
            for provider, tokens, each in result.charges:
                call.charges.append((result.model, provider, tokens, cost_usd(tokens, price if each is None else each)))
        if result.spent:
            self._bill_spent(call, result.spent)

    def _bill_spent(self, call: Call, spent: Sequence[Spent]) -> None:
        """Tokens and cost the upstreams charged for work the answer does not use (``RouteResult.spent``): the
        request's budgets, usage metrics and cost count them, its ``usage.prompt_tokens`` does not."""
        for model_id, tokens, price, provider in spent:
            cost = cost_usd(tokens, price if price is not None else self._price(model_id))
            call.billed_tokens += tokens
            call.cost_usd += cost
            call.spent.append((model_id, tokens, cost))  # its usage metrics are the spending model's
            if call.charges is not None:
                call.charges.append((model_id, provider, tokens, cost))


def _as_shared(error: Exception) -> Exception:
    """An owner's failure as a request that waited on its call gets it: an upstream's error answer without the
    upstream's words, which may quote the owner's batch (its other items are not the waiter's to read)."""
    if not isinstance(error, GatewayError):
        return error
    own = error.own_part
    status = error.upstream_status if isinstance(error, UpstreamError) else None
    if own is None and status is None:
        return error
    shared = copy.copy(error)
    if own is not None:
        shared.message = (f"{own} (as the upstream answered the call that was embedding these items for another "
                          f"request that asked for them at the same time)")  # fmt: skip
    else:
        shared.message = (f"The upstream answered {status} to the call that was embedding these items (for another "
                          f"request that asked for them at the same time)")  # fmt: skip
    shared.args = (shared.message,)
    shared.headers = dict(error.headers)
    return shared


def _supersede(call: Call, model_id: str) -> None:
    """``model_id`` served part of the answer, which a later fallback now embeds again: what it charged (all that is
    billed but what other models spent) becomes spent, charged to it, not to the model that will serve."""
    tokens, cost = call.billed_tokens, call.cost_usd
    for _, t, c in call.spent:
        tokens -= t
        cost -= c
    if tokens > 0 or cost > 0:
        call.spent.append((model_id, tokens, cost))


def _charged_by(call: Call, model_id: str) -> tuple[int, float]:
    """The tokens and cost ``model_id`` charged for the request: its answer's, if it served, and the chunks of a split
    batch it embedded before it failed (``Call.spent``)."""
    tokens, cost = 0, 0.0
    spent_tokens, spent_cost = 0, 0.0
    for spender, t, c in call.spent:
        spent_tokens += t
        spent_cost += c
        if spender == model_id:
            tokens += t
            cost += c
    if call.served_model == model_id:  # what the answer charged: all billed but what other models spent
        tokens += call.billed_tokens - spent_tokens
        cost += call.cost_usd - spent_cost
    return tokens, max(cost, 0.0)


def _charged_at(call: Call, model_id: str, provider: str) -> tuple[int, float]:
    """The tokens and cost the deployments of ``provider`` charged while serving ``model_id`` (``Call.charges``)."""
    tokens, cost = 0, 0.0
    for model, at, t, c in call.charges or ():
        if model == model_id and at == provider:
            tokens += t
            cost += c
    return tokens, cost


def _skip(call: Call, place: int, refused: GatewayError) -> None:
    """Leave the fallback at ``place`` untried, as its budget (or its providers') refused it."""
    call.skipped = call.skipped | {place}
    if call.skipped_refusals is None:
        call.skipped_refusals = {}
    call.skipped_refusals.setdefault(place, refused)


def weight(item: Any) -> int:
    """A size measure of one item, to apportion a batch's token count among its items."""
    if isinstance(item, str):
        return max(1, len(item))
    if isinstance(item, tuple):
        return max(1, len(item))
    return max(1, len(str(item)))


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` with integer shares that sum exactly to ``total``; each share
    is at least 1 when ``total`` allows it (a cache hit on a short item reported 0 tokens)."""
    if not weights:
        return []
    floor = 1 if total >= len(weights) else 0
    total -= floor * len(weights)
    whole = sum(weights)
    raw = [total * w / whole for w in weights]
    shares = [int(r) + floor for r in raw]
    rest = total - sum(shares) + floor * len(weights)
    if rest == 0:
        return shares
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    for i in by_remainder[:rest]:
        shares[i] += 1
    return shares


def _directives(header: str) -> set[str]:
    """The directive names of a ``Cache-Control`` header, lowercase (``no-cache="x"`` is ``no-cache``)."""
    return {part.partition("=")[0].strip().lower() for part in header.split(",")}
