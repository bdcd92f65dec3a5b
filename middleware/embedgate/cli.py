"""The ``embedgate`` command: ``serve``, ``check-config``, ``hash-key``."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .config import BUDGET_SCOPES, Config, ConfigError, hash_key, header_safe, load_config

__all__ = ["factory_config", "main"]


def _invalid(path: str, errors: list[str]) -> None:
    """Tells a config's errors on stderr, one a line under the file's name."""
    print(f"{path}: invalid configuration", *errors, sep="\n  ", file=sys.stderr, flush=True)


def _check(path: str, *, serving: bool = False) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _invalid(path, exc.errors)
        return 1
    ok = (f"{path}: ok ({len(config.providers)} providers, {len(config.models)} models, {len(config.keys)} keys, "
          f"{len(config.budgets)} budgets)")  # fmt: skip
    if serving:
        # Written past Python's buffer: a stdout that takes nothing (a full disk, a reader gone) loses the line, and
        # does not stop the server (a traceback and exit status 1, read as a bad config), nor fail its exit.
        try:
            sys.stdout.flush()
            os.write(sys.stdout.fileno(), ok.encode() + b"\n")
        except (OSError, ValueError, AttributeError):  # (AttributeError: no stdout at all, sys.stdout None)
            pass
    else:
        print(ok)
    if not config.keys:
        print("warning: no keys are configured; every embedding request will get 401", file=sys.stderr)
    return 0


def factory_config() -> Config:
    """The config of ``uvicorn 'embedgate:create_app' --factory``: the file ``EMBEDGATE_CONFIG`` names. When it is
    not set, or the file is invalid, the errors are told as ``embedgate serve`` tells them, and the process exits 1
    (raised from the factory, a ``ConfigError`` came with 17 lines of uvicorn's traceback)."""
    path = os.environ.get("EMBEDGATE_CONFIG", "")
    if not path:
        _invalid("embedgate", ["<env>: EMBEDGATE_CONFIG is not set (the path of the YAML config)"])
        raise SystemExit(1)
    try:
        return load_config(path)
    except ConfigError as exc:
        _invalid(path, exc.errors)
        raise SystemExit(1) from None


def _open_stdio() -> None:
    """A closed stdout or stderr (``>&-``) onto /dev/null: uvicorn's log setup failed on it (a traceback, exit 1), and a
    socket opened later took its descriptor, so that log lines went to a client."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", closefd=False))  # the process's own, for good


def _serve(args: argparse.Namespace) -> int:
    _open_stdio()
    if _check(args.config, serving=True) != 0:
        return 1
    config = load_config(args.config)
    if args.workers > 1 and config.budgets and not config.redis_url:
        # Each worker is a process with its own memory store: N workers would admit N budgets' worth.
        print(
            f"error: --workers {args.workers} with budgets needs redis_url, so that the workers share one budget",
            file=sys.stderr,
        )
        return 1
    import uvicorn

    from .serve_protocol import GatewayHttpProtocol

    os.environ["EMBEDGATE_CONFIG"] = os.path.abspath(args.config)
    metrics_dir = None
    given_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if given_dir and not (os.path.isdir(given_dir) and os.access(given_dir, os.W_OK | os.X_OK)):
        # Every worker would fail to build its metrics, and be started again, for ever.
        print(f"error: PROMETHEUS_MULTIPROC_DIR={given_dir} is not a writable directory", file=sys.stderr)
        return 1
    if args.workers > 1 and not given_dir:
        # Each worker is a process: /metrics sums them through prometheus_client's multiprocess mode, which
        # must be set up before any worker imports prometheus_client. Removed when the server stops.
        import tempfile

        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="embedgate-metrics-")
    try:
        return _run(args, uvicorn, GatewayHttpProtocol)
    finally:
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


STARTUP_FAILURE = 3  # uvicorn's exit status for a server that could not start
_SERVING = "EMBEDGATE_SERVE_SERVING"  # set by the supervisor once a worker serves; workers started later inherit it


def served_app() -> Any:
    """The app ``embedgate serve`` runs in each worker. A failure to build it (the config changed on disk since
    the check, say) before the server has served is a startup failure, which stops the server: uvicorn's
    supervisor would start a worker that raised anything else again and again, and the server would never serve
    nor exit. Once it has served, such a worker (replacing one that died) is started again while the others serve."""
    from .app import create_app

    _stop_with_supervisor()
    path = os.environ.get("EMBEDGATE_CONFIG", "")  # (set by `embedgate serve`)
    try:
        if not path:
            raise ConfigError(["<env>: EMBEDGATE_CONFIG is not set (the path of the YAML config)"])
        return create_app(path)  # a path: create_app() without one tells a bad config itself, and exits 1
    except Exception as exc:
        errors = exc.errors if isinstance(exc, ConfigError) else [f"{type(exc).__name__}: {exc}"]
        print("error: embedgate could not be built:", *errors, sep="\n  ", file=sys.stderr, flush=True)
        sys.exit(1 if os.environ.get(_SERVING) else STARTUP_FAILURE)


def _stop_with_supervisor() -> None:
    """With ``--workers N``, a worker whose supervisor is gone (SIGKILL, the OOM killer) drains and exits as on
    SIGTERM, with its span-export helper, instead of serving on unsupervised and holding the port (a restarted
    server could not bind it: uvicorn's workers never look at their parent)."""
    import multiprocessing
    import threading
    import time

    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:  # one worker: the server's own process
        return
    supervisor = parent.pid

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="embedgate-supervisor-watch", daemon=True).start()


def _stopped(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _kept_serving(signum: int, frame: Any) -> None:
    """SIGHUP, SIGTTIN or SIGTTOU with one worker: their default actions ended the process at once (SIGHUP,
    requests in flight and all) or stopped it (SIGTTIN, SIGTTOU), where ``--workers N`` replaces, adds or removes
    workers."""
    import logging

    if signum == signal.SIGHUP:
        what = ("there is no worker to replace, so the server goes on with the config it started with (restart it"
                " to read the file again; with --workers 2 or more, SIGHUP replaces the workers one by one, each"
                " reading the file)")  # fmt: skip
    else:
        what = "workers are added and removed only with --workers 2 or more; the server goes on"
    logging.getLogger("uvicorn.error").warning("Received %s: with --workers 1 %s", signal.Signals(signum).name, what)


def _run(args: argparse.Namespace, uvicorn: Any, protocol: type) -> int:
    """Serve until stopped: 0 after a graceful stop (SIGTERM or SIGINT), 3 if the gateway could not start."""
    config = uvicorn.Config(
        "embedgate.cli:served_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        # embedgate's compiled HTTP/1.1 protocol (embedgate.serve_protocol), or uvicorn's own ("httptools", "h11").
        http=protocol if args.http == "embedgate" else args.http,
        # "auto" would take an error at startup (an unusable proxy URL, say) for a lifespan-less app, log it at info
        # and serve anyway, answering every request 500: with "on", the server says why and exits instead.
        lifespan="on",
        access_log=False,  # the gateway writes its own JSON access line per request
        proxy_headers=False,  # the gateway reads no client address: skip the per-request X-Forwarded-* parsing
        server_header=False,
        log_level=args.log_level,
        # On SIGTERM, requests in flight get this long to finish; past it, each is answered 503 (code
        # gateway_stopping) in its route's shape.
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
    )
    if args.workers == 1:
        # Once the server is down, uvicorn raises again the signal that stopped it, under the handler found
        # before it started: the process would end by SIGTERM itself (status 143) where --workers N exits 0.
        # (SIGINT is raised again as a KeyboardInterrupt.)
        previous = signal.signal(signal.SIGTERM, _stopped)
        kept = {sig: signal.signal(sig, _kept_serving) for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)}
        server = uvicorn.Server(config)
        try:
            server.run()  # exits 3 if the gateway cannot start
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            for sig, handler in kept.items():
                signal.signal(sig, handler)
        return 0 if server.started else STARTUP_FAILURE
    supervisor = _supervisor_class()(config, sockets=[config.bind_socket()])
    try:
        supervisor.run()
    except KeyboardInterrupt:
        pass
    return STARTUP_FAILURE if supervisor.failed else 0


def _supervisor_class() -> type:
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's supervisor of worker processes, which tells a worker's startup failure (uvicorn's own
        stops the workers and exits 0) and stops taking connections as soon as it is told to stop."""

        failed = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for sig in (signal.SIGINT, signal.SIGTERM):  # stop at once, not at the loop's next look (0.5 s)
                signal.signal(sig, self._stop)

        def _stop(self, sig: int, frame: Any) -> None:
            self.signal_queue.append(sig)
            self.should_exit.set()

        def keep_subprocess_alive(self) -> None:
            if not os.environ.get(_SERVING) and any(p.process.is_alive() and p.is_ready(1) for p in self.processes):
                os.environ[_SERVING] = "1"
            super().keep_subprocess_alive()

        def run(self) -> None:
            super().run()
            # A worker that failed to start is kept in the list (not replaced), with its exit status.
            self.failed = any(p.exitcode == STARTUP_FAILURE for p in self.processes)

        def terminate_all(self) -> None:
            # The supervisor's copy of the listening socket kept it open until the last worker had drained:
            # the kernel went on accepting connections that no worker would ever read (held, then reset).
            # Each worker closes its own copy as its shutdown begins.
            for sock in self.sockets:
                sock.close()
            self.handle_signals()  # logs the signal that stopped it
            super().terminate_all()

    return Supervisor


def _admin(args: argparse.Namespace, path: str, params: dict[str, str]) -> int:
    import httpx

    key = args.admin_key or os.environ.get("EMBEDGATE_ADMIN_KEY", "")
    if not key:
        print("error: give --admin-key or set EMBEDGATE_ADMIN_KEY", file=sys.stderr)
        return 2
    where = _without_userinfo(args.url)
    try:
        r = httpx.get(args.url.rstrip("/") + path, params=params, headers={"authorization": f"Bearer {key}"},
                      timeout=10)  # fmt: skip
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # ValueError: a key that is not ASCII, say
        print(f"error: cannot reach {where}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"error: {r.status_code} {r.text[:2000]}", file=sys.stderr)
        return 1
    try:
        data = r.json()["data"]
    except (ValueError, KeyError, TypeError):
        print(f"error: {where} answered 200 with no embedgate admin data (is it the gateway?)", file=sys.stderr)
        return 1
    try:
        print(json.dumps(data, indent=2), flush=True)
    except BrokenPipeError:  # its reader is gone (`| head`): no traceback; the rest goes nowhere, not at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _without_userinfo(url: str) -> str:
    """``url`` as it may be printed: without a user and password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # A password may hold '/' (unencoded, as typed): the user info ends at the last '@' before any '?' or '#'.
    authority = rest.split("?", 1)[0].split("#", 1)[0]
    if "@" not in authority:
        return url
    return f"{scheme}{sep}{rest[authority.rindex('@') + 1 :]}"


def _ranged(lo: int, hi: int) -> Any:
    def number(text: str) -> int:
        value = int(text)  # a ValueError: argparse says "invalid number value"
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, got {text}")
        return value

    number.__name__ = "number"
    return number


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:  # argparse's own message named this function: "invalid _seconds value: 'abc'"
        value = math.nan
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embedgate`` console script."""
    parser = argparse.ArgumentParser(prog="embedgate", description="An edge reverse proxy for embedding requests.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the gateway under uvicorn")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_ranged(1, 65535), default=8080)
    serve.add_argument("--workers", type=_ranged(1, 1024), default=1)
    serve.add_argument("--http", choices=("embedgate", "httptools", "h11"), default="embedgate",
                       help="the HTTP/1.1 protocol: embedgate's compiled one (default), or uvicorn's")  # fmt: skip
    serve.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug",
                       "trace"), help="uvicorn's own log level (default: warning)")  # fmt: skip
    serve.add_argument("--timeout-graceful-shutdown", type=_seconds, default=10.0, metavar="SECONDS",
                       help="on SIGTERM, how long requests in flight may take to finish (default: 10)")  # fmt: skip
    check = sub.add_parser("check-config", help="validate a config file; prints every error with its YAML path")
    check.add_argument("config")
    hk = sub.add_parser("hash-key", help="print the sha256 form of a key, for `keys[].sha256` in the config")
    hk.add_argument("key", nargs="?", help="the key; '-' or none (stdin not a terminal): one line read from stdin, "
                    "kept out of `ps` and the shell's history")  # fmt: skip
    for name, helptext in (
        ("usage", "print current usage of every budget (GET /admin/usage)"),
        ("identities", "print the identities seen, most recent first (GET /admin/identities)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--url", default="http://127.0.0.1:8080", help="the running gateway (with its path prefix)")
        p.add_argument("--admin-key", default=None, help="the admin key (default: $EMBEDGATE_ADMIN_KEY)")
        if name == "usage":
            p.add_argument("--scope", default=None, choices=BUDGET_SCOPES, help="only budgets of this scope")
            p.add_argument("--id", default=None, help="only budgets that count this id (e.g. an identity's)")
        else:
            p.add_argument("--limit", type=_ranged(1, 10_000), default=100, help="at most this many (default: 100)")
            p.add_argument("--id", default=None, help="only this identity")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check(args.config)
    if args.command == "usage":
        params = {"scope": args.scope, "id": args.id}
        return _admin(args, "/admin/usage", {k: v for k, v in params.items() if v is not None})
    if args.command == "identities":
        params = {"limit": str(args.limit)} if args.id is None else {"id": args.id}
        return _admin(args, "/admin/identities", params)
    return _hash_key(args.key)


#: At most how much of stdin ``hash-key`` reads (``< /dev/zero`` would never end): no key is anywhere near.
_MAX_KEY_BYTES = 64 * 1024


def _hash_key(key: str | None) -> int:
    """``embedgate hash-key``: 0 when the hash is printed, 2 when the key is refused."""
    if key is None and (sys.stdin is None or sys.stdin.isatty()):
        print("embedgate hash-key: give the key, or '-' to read it from stdin", file=sys.stderr)
        return 2
    if key is None or key == "-":
        data = sys.stdin.buffer.read(_MAX_KEY_BYTES + 1) if sys.stdin is not None else b""
        key = data.decode("utf-8", "surrogateescape").removesuffix("\n")
        why = ("is empty" if not key else "is more than one line" if "\n" in key
               else f"is longer than {_MAX_KEY_BYTES} bytes" if len(data) > _MAX_KEY_BYTES else None)  # fmt: skip
        if why is not None:
            print(f"embedgate hash-key: the key read from stdin {why}", file=sys.stderr)
            return 2
    if not key or not header_safe(key):  # as the config's keys: what an HTTP header carries
        print("embedgate hash-key: a key is visible ASCII characters (no spaces, no accents)", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
