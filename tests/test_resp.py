"""The budget store's Redis client (embedgate.resp) against the real Redis, and against sockets that misbehave."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from embedgate.resp import LeanRedis, RespError, Script, pack, parse, parse_url
from tests.redis_util import require_programs, require_redis

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client() -> AsyncIterator[LeanRedis]:
    redis = LeanRedis(require_redis(), timeout=2.0)
    try:
        yield redis
    finally:
        await redis.aclose()


def key() -> str:
    return f"eg:test:resp:{uuid.uuid4().hex}"


async def test_concurrent_commands_share_one_pipelined_connection(client: LeanRedis) -> None:
    counter = key()
    try:
        results = await asyncio.gather(*(client.execute("INCR", counter) for _ in range(300)))
        assert sorted(results) == list(range(1, 301))  # every caller got its own reply
        ids = await asyncio.gather(*(client.execute("CLIENT", "ID") for _ in range(20)))
        assert len(set(ids)) == 1
        assert await client.execute("GET", counter) == b"300"
        assert await client.execute("GET", key()) is None
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.execute("DEL", counter)


async def test_error_reply_raises_and_the_connection_stays_usable(client: LeanRedis) -> None:
    name = key()
    try:
        await client.execute("SADD", name, "a", "b")
        with pytest.raises(RespError, match="WRONGTYPE"):
            await client.execute("INCR", name)
        assert sorted(await client.execute("SMEMBERS", name)) == [b"a", b"b"]
    finally:
        await client.execute("DEL", name)


async def test_evalsha_loads_a_script_the_server_forgot(client: LeanRedis) -> None:
    script = Script(f"return {{ARGV[1] + 1, KEYS[1]}} -- {uuid.uuid4().hex}")  # a script Redis has not seen
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
    assert await client.evalsha(script, ["k"], [41]) == [42, b"k"]
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
    with pytest.raises(RespError, match="attempt to perform arithmetic"):
        await client.evalsha(Script("return ARGV[1] + {}"), [], [1])


async def test_a_killed_connection_is_reopened_by_the_next_command(client: LeanRedis) -> None:
    first = await client.execute("CLIENT", "ID")
    killer = LeanRedis(require_redis())
    try:
        assert await killer.execute("CLIENT", "KILL", "ID", first) == 1
    finally:
        await killer.aclose()
    await asyncio.sleep(0.05)  # the close reaches the client
    assert await client.execute("CLIENT", "ID") != first


async def test_user_password_and_database_from_the_url() -> None:
    url = require_redis()
    admin = LeanRedis(url)
    user, password = f"eg-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await admin.execute("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    try:
        host = url.split("//", 1)[1].split("/", 1)[0]
        scoped = LeanRedis(f"redis://{user}:{password}@{host}/3")
        try:
            assert await scoped.execute("ACL", "WHOAMI") == user.encode()
            assert b"db=3" in await scoped.execute("CLIENT", "INFO")
        finally:
            await scoped.aclose()
        wrong = LeanRedis(f"redis://{user}:not-{password}@{host}/0")
        with pytest.raises(RespError) as refused:
            await wrong.execute("PING")
        assert password not in str(refused.value)
        await wrong.aclose()
    finally:
        await admin.execute("ACL", "DELUSER", user)
        await admin.aclose()


async def test_an_empty_password_is_none_and_a_user_without_one_is_authenticated() -> None:
    # "redis://:@host" (a template's empty password) sent AUTH "" and every command failed, where redis-py (the
    # identities' client, on the same URL) connected; a user without a password was not authenticated at all.
    url = require_redis()
    host = url.split("//", 1)[1].split("/", 1)[0]
    assert parse_url(f"redis://:@{host}/0").password is None
    empty = LeanRedis(f"redis://:@{host}/0")
    try:
        assert await empty.execute("PING") == b"PONG"
    finally:
        await empty.aclose()
    admin = LeanRedis(url)
    user = f"eg-test-{uuid.uuid4().hex[:8]}"
    await admin.execute("ACL", "SETUSER", user, "on", "nopass", "~*", "+@all")
    try:
        alone = LeanRedis(f"redis://{user}@{host}/0")
        try:
            assert await alone.execute("ACL", "WHOAMI") == user.encode()
        finally:
            await alone.aclose()
    finally:
        await admin.execute("ACL", "DELUSER", user)
        await admin.aclose()


async def test_a_connect_left_by_a_cancelled_caller_is_not_the_next_callers() -> None:
    # The cancelled caller's connect went on, failed (its AUTH unanswered), and the next command, Redis answering
    # again, was handed that old TimeoutError.
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await asyncio.sleep(2)  # the first connection never answers its AUTH
            return
        while data := await reader.read(65536):
            writer.write(b"+OK\r\n" * data.count(b"*"))  # one answer for each command
            await writer.drain()

    server = await _server(handle)
    port = server.sockets[0].getsockname()[1]
    client = LeanRedis(f"redis://:secret@127.0.0.1:{port}/0", timeout=0.3)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.execute("PING"), 0.05)  # cancelled while it connects
        await asyncio.sleep(0.5)  # that connect times out meanwhile
        assert await client.execute("PING") == b"OK"
    finally:
        await client.aclose()
        server.close()


async def _server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]) -> asyncio.Server:
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)  # type: ignore[misc]
        finally:
            writer.close()

    return await asyncio.start_server(run, "127.0.0.1", 0)


async def test_a_connection_that_never_completes_says_so() -> None:
    # TLS to a Redis that speaks none: the handshake never ends, and asyncio.timeout's TimeoutError has no message,
    # so the budget store's log line and /readyz read "TimeoutError: ".
    host = require_redis().split("//", 1)[1].split("/", 1)[0]
    client = LeanRedis(f"rediss://{host}/0?ssl_cert_reqs=none", timeout=0.3)
    try:
        with pytest.raises(TimeoutError, match=r"no connection to Redis within 0\.3 s"):
            await client.execute("PING")
    finally:
        await client.aclose()


async def test_a_silent_server_times_out_every_waiting_command_and_drops_the_connection() -> None:
    connections = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.read(4096):
            pass

    server = await _server(silent)
    port = server.sockets[0].getsockname()[1]
    client = LeanRedis(f"redis://127.0.0.1:{port}", timeout=0.2)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(client.execute("PING") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert 0.15 < time.monotonic() - started < 1.5
        with pytest.raises(TimeoutError):
            await client.execute("PING")  # a new connection, silent too
        assert connections == 2
    finally:
        await client.aclose()
        server.close()


async def test_an_unreadable_reply_fails_the_command() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read(4096)

    server = await _server(garbage)
    client = LeanRedis(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(ConnectionError, match="unreadable"):
            await client.execute("PING")
    finally:
        await client.aclose()
        server.close()


async def test_unreachable_server_and_closed_client() -> None:
    free = await _server(lambda r, w: asyncio.sleep(0))
    port = free.sockets[0].getsockname()[1]
    free.close()
    await free.wait_closed()
    client = LeanRedis(f"redis://127.0.0.1:{port}")
    with pytest.raises(OSError):
        await client.execute("PING")
    await client.aclose()
    with pytest.raises(ConnectionError, match="closed"):
        await client.execute("PING")
    with pytest.raises(OSError):
        await LeanRedis("unix:///nonexistent/embedgate-test.sock?db=2").execute("PING")


def test_urls_that_are_not_redis_are_refused() -> None:
    with pytest.raises(ValueError, match="redis://"):
        LeanRedis("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="database"):
        LeanRedis("redis://127.0.0.1:6379/zero")


def test_pack_and_parse() -> None:
    assert pack(("SET", b"k", 12, 1.5)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$3\r\n1.5\r\n"
    with pytest.raises(TypeError):
        pack(("SET", None))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pack(("SET", True))
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    assert pack((Level.HIGH, 0.25)) == b"*2\r\n$1\r\n3\r\n$4\r\n0.25\r\n"
    reply = b"*4\r\n:1\r\n$3\r\nabc\r\n$-1\r\n*2\r\n+OK\r\n-ERR no\r\n"
    value, end = parse(reply, 0)  # type: ignore[misc]
    assert end == len(reply)
    assert value[:3] == [1, b"abc", None] and value[3][0] == b"OK" and isinstance(value[3][1], RespError)
    for cut in range(len(reply)):  # a reply cut anywhere is not complete yet
        assert parse(reply[:cut], 0) is None


def test_a_client_moves_to_a_new_event_loop() -> None:
    client = LeanRedis(require_redis())
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        id_first = first.run_until_complete(client.execute("CLIENT", "ID"))
        # Used from another loop (a reloaded app, a test's): a connection of its own, the old one closed.
        assert second.run_until_complete(client.execute("CLIENT", "ID")) != id_first
        first.run_until_complete(asyncio.sleep(0))  # the old connection's close runs on its own loop
        second.run_until_complete(client.aclose())
    finally:
        first.close()
        second.close()


async def test_execute_many_sends_commands_together_and_waits_for_every_reply(client: LeanRedis) -> None:
    a, b = key(), key()
    try:
        assert await client.execute_many([("SET", a, b"1", "EX", 60), ("INCR", a), ("TTL", a)]) == [b"OK", 2, 60]
        await client.execute("SADD", b, "x")
        with pytest.raises(RespError, match="WRONGTYPE"):
            await client.execute_many([("INCR", b), ("INCR", a)])
        assert await client.execute("GET", a) == b"3"  # the command after the failed one ran, and was read
        assert await client.execute_many([]) == []
    finally:
        await client.execute("DEL", a, b)


class _Wire:
    """A transport that records what the protocol writes."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        pass


async def test_replies_cut_anywhere_reach_their_callers_in_order() -> None:
    import random

    from embedgate.resp import _Pipe

    big = [bytes([i]) * (6000 + i) for i in range(40)]  # an MGET reply of ~250 KB
    replies = [
        b"*40\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in big),
        b":7\r\n",
        b"*2\r\n$1\r\n0\r\n*3\r\n$1\r\na\r\n$-1\r\n*0\r\n",  # nested, nil, empty array (a SCAN-like reply)
        b"-ERR boom\r\n",
        b"+OK\r\n",
    ]
    stream = b"".join(replies)
    rng = random.Random(7)
    for cuts in ([1] * 64, [3, 5, 7], [4096], [65536], [len(stream)], [rng.randint(1, 9000) for _ in range(50)]):
        pipe = _Pipe(asyncio.get_running_loop(), timeout=5.0)
        pipe.connection_made(_Wire())  # type: ignore[arg-type]
        futures = pipe.call_many([b"x"] * len(replies))
        pos, i = 0, 0
        while pos < len(stream):
            size = cuts[i % len(cuts)]
            pipe.data_received(stream[pos : pos + size])
            pos, i = pos + size, i + 1
        assert await futures[0] == big
        assert await futures[1] == 7
        assert await futures[2] == [b"0", [b"a", None, []]]
        with pytest.raises(RespError, match="boom"):
            await futures[3]
        assert await futures[4] == b"OK"
        assert not pipe.closed


def test_a_unix_socket_url_with_a_database(tmp_path: Path) -> None:
    require_programs("redis-server")  # a private instance, on a unix socket
    sock = tmp_path / "my redis.sock"  # percent-encoded in the URL, as redis-py reads it (it was not decoded)
    command = ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"]
    server = subprocess.Popen([*command, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        async def check() -> None:
            client = LeanRedis(f"unix://{quote(str(sock))}?db=2")
            try:
                assert b"db=2" in await client.execute("CLIENT", "INFO")
                assert await client.execute("PING") == b"PONG"
            finally:
                await client.aclose()

        asyncio.run(check())
    finally:
        server.kill()
        server.wait(timeout=10)


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 it signed (made with the openssl command)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=embedgate-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


def test_tls_with_the_url_s_ca_file_or_without_verification(tmp_path: Path) -> None:
    require_programs("redis-server", "openssl")  # a private instance with a CA of its own
    ca, cert, key = _tls_files(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
               "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--dir", str(tmp_path)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None:
                    pytest.skip("this redis-server was built without TLS")
                time.sleep(0.05)

        async def ping(url: str) -> bytes:
            client = LeanRedis(url, timeout=2.0)
            try:
                reply: bytes = await client.execute("PING")
                return reply
            finally:
                await client.aclose()

        base = f"rediss://127.0.0.1:{port}/0"
        assert asyncio.run(ping(f"{base}?ssl_ca_certs={ca}")) == b"PONG"
        assert asyncio.run(ping(f"{base}?ssl_cert_reqs=none")) == b"PONG"
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(ping(base))  # the system's CAs do not know this one
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("redis://127.0.0.1:6379/0?db=5", 5),  # the query wins, as in redis-py (the path won: two databases)
        ("redis://127.0.0.1:6379/4", 4),
        ("redis://127.0.0.1:6379?db=6", 6),
        ("redis://127.0.0.1:6379", 0),
        ("unix:///run/redis.sock?db=2", 2),
        # a blank db (a template's empty variable) is none, and the first of two counts: the path's 3 was lost
        # (budgets and the cache in db 0, identities in db 3), and the second db was taken
        ("redis://127.0.0.1:6379/3?db=", 3),
        ("redis://127.0.0.1:6379/0?db=1&db=2", 1),
    ],
)
def test_the_database_is_read_as_redis_py_reads_it(url: str, db: int) -> None:
    assert parse_url(url).db == db
    assert redis.ConnectionPool.from_url(url).connection_kwargs.get("db", 0) == db
