"""Key extractors: client addresses behind proxies, headers, verified JWT claims, and FirstOf."""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import HTTPConnection, Request

from asgi_ratelimit.errors import ConfigurationError
from asgi_ratelimit.extractors import UNKNOWN_CLIENT, ClientIP, FirstOf, Header, JWTClaim, KeyExtractor, scope_reader

Headers = Sequence[tuple[str, str]]


def make_request(
    headers: Headers = (),
    client: tuple[str, int] | None = ("203.0.113.7", 4711),
) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        "client": client,
    }
    return Request(scope)


def resolve(value: str | Awaitable[str | None] | None) -> str | None:
    if inspect.isawaitable(value):

        async def wait() -> str | None:
            return await value

        return asyncio.run(wait())
    return value


# ------------------------------------------------------------------------------------------ ClientIP table

PROXIES = ["10.0.0.0/8", "192.0.2.1", "2001:db8:ffff::/48"]
XFF = "x-forwarded-for"
FWD = "forwarded"
V6 = "2001:db8:1:2:3:4:5:6"

# (id, trusted proxies, peer, headers, expected key)
CLIENT_IP_CASES: list[tuple[str, list[str], str | None, Headers, str]] = [
    # --- the peer itself
    ("no proxies, IPv4 peer", [], "203.0.113.7", [], "203.0.113.7"),
    ("no proxies, XFF ignored", [], "203.0.113.7", [(XFF, "1.1.1.1")], "203.0.113.7"),
    ("no proxies, Forwarded ignored", [], "203.0.113.7", [(FWD, "for=1.1.1.1")], "203.0.113.7"),
    ("untrusted peer, XFF ignored", PROXIES, "203.0.113.7", [(XFF, "1.1.1.1")], "203.0.113.7"),
    ("untrusted peer, Forwarded ignored", PROXIES, "203.0.113.7", [(FWD, "for=1.1.1.1")], "203.0.113.7"),
    ("trusted peer, no header", PROXIES, "10.1.2.3", [], "10.1.2.3"),
    ("trusted peer, blank header", PROXIES, "10.1.2.3", [(XFF, "  ")], "10.1.2.3"),
    ("testclient peer", PROXIES, "testclient", [(XFF, "1.1.1.1")], "testclient"),
    ("testclient peer, no proxies", [], "testclient", [], "testclient"),
    ("unix socket peer", PROXIES, "/run/app.sock", [(XFF, "1.1.1.1")], "/run/app.sock"),
    ("unix socket peer with a colon", [], "/run/a:b.sock", [], "/run/a:b.sock"),
    ("no client", PROXIES, None, [(XFF, "1.1.1.1")], UNKNOWN_CLIENT),
    ("empty client host", [], "", [], UNKNOWN_CLIENT),
    # --- X-Forwarded-For walked right to left
    ("trusted peer, one hop", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9")], "198.51.100.9"),
    ("spoofed leftmost ignored", PROXIES, "10.1.2.3", [(XFF, "6.6.6.6, 198.51.100.9")], "198.51.100.9"),
    (
        "trusted hops skipped",
        PROXIES,
        "10.1.2.3",
        [(XFF, "6.6.6.6, 198.51.100.9, 10.9.9.9, 192.0.2.1")],
        "198.51.100.9",
    ),
    (
        "multiple field lines joined",
        PROXIES,
        "10.1.2.3",
        [(XFF, "6.6.6.6"), (XFF, "198.51.100.9, 10.0.0.2")],
        "198.51.100.9",
    ),
    (
        "spoof in the first field line",
        PROXIES,
        "10.1.2.3",
        [(XFF, "6.6.6.6, 10.0.0.5"), (XFF, "198.51.100.9")],
        "198.51.100.9",
    ),
    ("all hops trusted: leftmost", PROXIES, "10.1.2.3", [(XFF, "10.0.0.1, 10.0.0.2, 192.0.2.1")], "10.0.0.1"),
    ("CIDR trust", ["10.0.0.0/8"], "10.200.1.1", [(XFF, "198.51.100.9, 10.3.3.3")], "198.51.100.9"),
    ("single address trust is exact", ["192.0.2.1"], "192.0.2.1", [(XFF, "198.51.100.9, 192.0.2.2")], "192.0.2.2"),
    ("ports stripped", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9:5678")], "198.51.100.9"),
    ("bracketed IPv6 with port", PROXIES, "10.1.2.3", [(XFF, f"[{V6}]:443")], "2001:db8:1:2::/64"),
    ("bare IPv6 hop", PROXIES, "10.1.2.3", [(XFF, V6)], "2001:db8:1:2::/64"),
    ("IPv4-mapped hop", PROXIES, "10.1.2.3", [(XFF, "::ffff:198.51.100.9")], "198.51.100.9"),
    ("empty elements ignored", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9,, ,")], "198.51.100.9"),
    ("whitespace tolerated", PROXIES, "10.1.2.3", [(XFF, " 6.6.6.6 ,\t198.51.100.9 ")], "198.51.100.9"),
    # --- malformed hops: never the key; the nearest proxy-validated hop is used instead
    ("malformed rightmost: peer", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9, not-an-ip")], "10.1.2.3"),
    ("malformed after trusted hop", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9, garbage, 10.0.0.7")], "10.0.0.7"),
    ("malformed left of client unseen", PROXIES, "10.1.2.3", [(XFF, "garbage, 198.51.100.9")], "198.51.100.9"),
    ("out-of-range octet", PROXIES, "10.1.2.3", [(XFF, "1.2.3.256")], "10.1.2.3"),
    ("leading zeros refused", PROXIES, "10.1.2.3", [(XFF, "010.1.2.3")], "10.1.2.3"),
    ("unknown hop", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9, unknown")], "10.1.2.3"),
    ("bad port", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9:http")], "10.1.2.3"),
    ("empty port", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9:")], "10.1.2.3"),
    ("unclosed bracket", PROXIES, "10.1.2.3", [(XFF, "[2001:db8::1")], "10.1.2.3"),
    ("junk after bracket", PROXIES, "10.1.2.3", [(XFF, "[2001:db8::1]x")], "10.1.2.3"),
    ("bracketed IPv4", PROXIES, "10.1.2.3", [(XFF, "[198.51.100.9]")], "10.1.2.3"),
    ("over-long hop", PROXIES, "10.1.2.3", [(XFF, "1" * 500)], "10.1.2.3"),
    ("IPv4 with zone refused", PROXIES, "10.1.2.3", [(XFF, "198.51.100.9%eth0")], "10.1.2.3"),
    ("IPv6 zone dropped", PROXIES, "10.1.2.3", [(XFF, "fe80::1%eth0")], "fe80::/64"),
    # --- hop bounds
    (
        "65 hops: client beyond the window",
        PROXIES,
        "10.1.2.3",
        [(XFF, ", ".join(["198.51.100.9"] + ["10.0.0.1"] * 64))],
        "10.0.0.1",
    ),
    (
        "64 hops: all read",
        PROXIES,
        "10.1.2.3",
        [(XFF, ", ".join(["198.51.100.9"] + ["10.0.0.1"] * 63))],
        "198.51.100.9",
    ),
    (
        "huge padding left of the client",
        PROXIES,
        "10.1.2.3",
        [(XFF, "6.6.6.6, " * 5000 + "198.51.100.9")],
        "198.51.100.9",
    ),
    # --- Forwarded (RFC 7239)
    ("Forwarded, plain", PROXIES, "10.1.2.3", [(FWD, "for=198.51.100.9")], "198.51.100.9"),
    ("Forwarded, quoted", PROXIES, "10.1.2.3", [(FWD, 'for="198.51.100.9"')], "198.51.100.9"),
    ("Forwarded, quoted with port", PROXIES, "10.1.2.3", [(FWD, 'for="198.51.100.9:4711"')], "198.51.100.9"),
    ("Forwarded, IPv6 with port", PROXIES, "10.1.2.3", [(FWD, f'for="[{V6}]:4711"')], "2001:db8:1:2::/64"),
    ("Forwarded, IPv6 unquoted", PROXIES, "10.1.2.3", [(FWD, f"for=[{V6}]")], "2001:db8:1:2::/64"),
    ("Forwarded, obfuscated port", PROXIES, "10.1.2.3", [(FWD, 'for="198.51.100.9:_p1"')], "198.51.100.9"),
    ("Forwarded, empty pairs", PROXIES, "10.1.2.3", [(FWD, "for=198.51.100.9;;proto=https;")], "198.51.100.9"),
    ("Forwarded, FOR case-insensitive", PROXIES, "10.1.2.3", [(FWD, "For=198.51.100.9")], "198.51.100.9"),
    (
        "Forwarded, other parameters",
        PROXIES,
        "10.1.2.3",
        [(FWD, "for=198.51.100.9;proto=https;by=10.1.2.3;host=example.com")],
        "198.51.100.9",
    ),
    (
        "Forwarded, spoofed leftmost",
        PROXIES,
        "10.1.2.3",
        [(FWD, "for=6.6.6.6, for=198.51.100.9;proto=https, for=10.0.0.4")],
        "198.51.100.9",
    ),
    (
        "Forwarded, field lines joined",
        PROXIES,
        "10.1.2.3",
        [(FWD, "for=6.6.6.6"), (FWD, "for=198.51.100.9")],
        "198.51.100.9",
    ),
    ("Forwarded, obfuscated client", PROXIES, "10.1.2.3", [(FWD, "for=_hidden, for=10.0.0.4")], "10.0.0.4"),
    ("Forwarded, unknown client", PROXIES, "10.1.2.3", [(FWD, "for=unknown")], "10.1.2.3"),
    ("Forwarded, no for", PROXIES, "10.1.2.3", [(FWD, "proto=https")], "10.1.2.3"),
    ("Forwarded, for repeated in an element", PROXIES, "10.1.2.3", [(FWD, "for=6.6.6.6;for=198.51.100.9")], "10.1.2.3"),
    ("Forwarded, unclosed quote", PROXIES, "10.1.2.3", [(FWD, 'for="198.51.100.9')], "10.1.2.3"),
    ("Forwarded, quote inside quote", PROXIES, "10.1.2.3", [(FWD, 'for="198.51"100.9"')], "10.1.2.3"),
    ("Forwarded, no equals", PROXIES, "10.1.2.3", [(FWD, "198.51.100.9")], "10.1.2.3"),
    (
        "Forwarded, unbalanced quote left of client",
        PROXIES,
        "10.1.2.3",
        [(FWD, 'for="6.6.6.6, for=198.51.100.9')],
        "198.51.100.9",
    ),
    ("Forwarded, all trusted", PROXIES, "10.1.2.3", [(FWD, "for=10.0.0.9, for=10.0.0.4")], "10.0.0.9"),
    # --- the default reads X-Forwarded-For only: a Forwarded header the client wrote itself is ignored
    (
        "a client's own Forwarded is ignored by default",
        PROXIES,
        "10.1.2.3",
        [(FWD, "for=6.6.6.6"), (XFF, "198.51.100.9")],
        "198.51.100.9",
    ),
    (
        "a client's Forwarded without for= is ignored by default",
        PROXIES,
        "10.1.2.3",
        [(FWD, "proto=x"), (XFF, "198.51.100.9")],
        "198.51.100.9",
    ),
    # --- IPv6 peers
    ("IPv6 peer grouped by /64", [], V6, [], "2001:db8:1:2::/64"),
    ("IPv6 peer, same /64", [], "2001:db8:1:2:ffff::1", [], "2001:db8:1:2::/64"),
    ("IPv6 loopback peer", [], "::1", [], "::/64"),
    ("IPv4-mapped peer", [], "::ffff:203.0.113.7", [], "203.0.113.7"),
    ("IPv4-mapped trusted peer", PROXIES, "::ffff:10.1.2.3", [(XFF, "198.51.100.9")], "198.51.100.9"),
    ("trusted IPv6 peer", PROXIES, "2001:db8:ffff::1", [(XFF, "198.51.100.9")], "198.51.100.9"),
    ("untrusted IPv6 peer", PROXIES, V6, [(XFF, "198.51.100.9")], "2001:db8:1:2::/64"),
    ("trusted IPv6 hop skipped", PROXIES, "10.1.2.3", [(XFF, f"{V6}, 2001:db8:ffff::9")], "2001:db8:1:2::/64"),
]


@pytest.mark.parametrize(
    ("trusted", "peer", "headers", "expected"),
    [case[1:] for case in CLIENT_IP_CASES],
    ids=[case[0] for case in CLIENT_IP_CASES],
)
def test_client_ip(trusted: list[str], peer: str | None, headers: Headers, expected: str) -> None:
    # Proxies that write Forwarded are configured so; every other case uses the default.
    writes_forwarded = any(name == FWD for name, _ in headers) and not any(name == XFF for name, _ in headers)
    extractor = ClientIP(trusted, proxy_header="forwarded") if writes_forwarded else ClientIP(trusted)
    request = make_request(headers, None if peer is None else (peer, 4711))
    assert extractor(request) == expected
    assert extractor(request) == expected  # and again, from the peer cache


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [(64, "2001:db8:1:2::/64"), (48, "2001:db8:1::/48"), (56, "2001:db8:1::/56"), (128, f"{V6}/128"), (1, "::/1")],
)
def test_ipv6_prefix(prefix: int, expected: str) -> None:
    assert ClientIP(ipv6_prefix=prefix)(make_request(client=(V6, 1))) == expected


def test_ipv6_prefix_applies_to_forwarded_hops() -> None:
    extractor = ClientIP(["10.0.0.0/8"], ipv6_prefix=48)
    assert extractor(make_request([(XFF, V6)], ("10.0.0.1", 1))) == "2001:db8:1::/48"


def test_ipv4_mapped_trusted_proxy_entry_matches_mapped_peer() -> None:
    extractor = ClientIP(["::ffff:10.0.0.0/104"])
    assert "10.0.0.0/8" in repr(extractor)
    assert extractor(make_request([(XFF, "198.51.100.9")], ("::ffff:10.1.1.1", 1))) == "198.51.100.9"
    assert extractor(make_request([(XFF, "198.51.100.9")], ("10.1.1.1", 1))) == "198.51.100.9"


@pytest.mark.parametrize(
    ("proxy_header", "headers", "expected"),
    [
        ("x-forwarded-for", [(FWD, "for=6.6.6.6"), (XFF, "198.51.100.9")], "198.51.100.9"),
        ("X-Forwarded-For", [(FWD, "for=6.6.6.6")], "10.1.2.3"),
        ("forwarded", [(FWD, "for=198.51.100.9"), (XFF, "6.6.6.6")], "198.51.100.9"),
        ("forwarded", [(XFF, "6.6.6.6")], "10.1.2.3"),
        ("x-real-ip", [(XFF, "6.6.6.6"), ("x-real-ip", "198.51.100.9")], "198.51.100.9"),
        ("cf-connecting-ip", [("cf-connecting-ip", "2001:db8:1:2::77")], "2001:db8:1:2::/64"),
    ],
)
def test_proxy_header_choice(proxy_header: str, headers: Headers, expected: str) -> None:
    extractor = ClientIP(["10.0.0.0/8"], proxy_header=proxy_header)
    assert extractor(make_request(headers, ("10.1.2.3", 1))) == expected


def test_client_ip_peer_cache_is_bounded() -> None:
    extractor = ClientIP()
    for n in range(1, 10_001):
        assert extractor(make_request(client=(f"2001:db8:{n:x}::1", 1))) == f"2001:db8:{n:x}::/64"
    assert extractor._remembered.cache_info().currsize <= 4096


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"trusted_proxies": ["10.0.0.300"]}, '"10.0.0.300"'),
        ({"trusted_proxies": ["10.0.0.0/33"]}, '"10.0.0.0/33"'),
        ({"trusted_proxies": ["10.0.0.1/8"]}, '"10.0.0.1/8"'),  # host bits set: probably a typo
        ({"trusted_proxies": ["proxy.internal"]}, '"proxy.internal"'),
        ({"trusted_proxies": ["*"]}, '"*"'),
        ({"trusted_proxies": [""]}, '""'),
        ({"trusted_proxies": [10]}, "10"),
        ({"trusted_proxies": "10.0.0.1"}, "'10.0.0.1'"),
        ({"ipv6_prefix": 0}, "0"),
        ({"ipv6_prefix": 129}, "129"),
        ({"ipv6_prefix": True}, "True"),
        ({"ipv6_prefix": "64"}, "'64'"),
        ({"proxy_header": "x forwarded"}, "'x forwarded'"),
        ({"proxy_header": "auto"}, "'auto'"),
    ],
)
def test_client_ip_bad_configuration(kwargs: dict[str, Any], quoted: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^ClientIP: ") as info:
        ClientIP(**kwargs)
    assert quoted in str(info.value)


def test_client_ip_repr() -> None:
    assert repr(ClientIP(["10.0.0.0/8", "2001:db8::1"])) == (
        "ClientIP(trusted_proxies=['10.0.0.0/8', '2001:db8::1/128'], ipv6_prefix=64, proxy_header='x-forwarded-for')"
    )


def test_client_ip_fast_path_skips_parsing() -> None:
    extractor = ClientIP()
    extractor(make_request(client=("203.0.113.7", 1)))
    extractor(make_request(client=("testclient", 1)))
    assert extractor._remembered.cache_info().currsize == 0  # IPv4 and names are returned without being parsed


header_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=120)
header_line = st.one_of(
    header_text,
    st.lists(
        st.one_of(
            st.ip_addresses().map(str),
            st.ip_addresses(v=6).map(lambda a: f"[{a}]:80"),
            st.sampled_from(["unknown", "_hidden", '"', "[", "]", ":", ";", "=", "for=", '\\"', ",,"]),
            header_text,
        ),
        max_size=80,
    ).map(", ".join),
    st.lists(st.one_of(st.ip_addresses().map(lambda a: f'for="{a}"'), header_text), max_size=80).map(", ".join),
)


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.tuples(st.sampled_from([XFF, FWD, "x-real-ip"]), header_line), max_size=6),
    peer=st.sampled_from(["10.1.2.3", "203.0.113.7", "::ffff:10.0.0.1", "2001:db8:ffff::1", "testclient", None]),
    proxy_header=st.sampled_from(["forwarded", "x-forwarded-for", "x-real-ip"]),
)
def test_client_ip_never_raises(lines: Headers, peer: str | None, proxy_header: str) -> None:
    extractor = ClientIP(["10.0.0.0/8", "2001:db8:ffff::/48"], proxy_header=proxy_header)
    key = extractor(make_request(lines, None if peer is None else (peer, 1)))
    assert isinstance(key, str)
    assert 0 < len(key) <= 45
    assert key == key.strip()
    assert "," not in key and '"' not in key


# ------------------------------------------------------------------------------------------------ Header


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("x-api-key", "abc123")], "abc123"),
        ([("X-API-Key", "  abc123 \t")], "abc123"),
        ([], None),
        ([("x-api-key", "")], None),
        ([("x-api-key", "   ")], None),
        ([("x-other", "abc123")], None),
        ([("x-api-key", "first"), ("x-api-key", "second")], "first"),
        ([("x-api-key", "k" * 256)], "k" * 256),
        ([("x-api-key", "caf\xe9")], "caf\xe9"),
    ],
)
def test_header(headers: Headers, expected: str | None) -> None:
    assert Header("X-Api-Key")(make_request(headers)) == expected


def test_header_over_long_values_are_digested_not_truncated() -> None:
    extractor = Header("x-api-key", max_length=16)
    a = extractor(make_request([("x-api-key", "p" * 16 + "a")]))
    b = extractor(make_request([("x-api-key", "p" * 16 + "b")]))
    assert a is not None and b is not None
    assert a != b
    assert a.startswith("sha:") and len(a) == 36
    assert a == extractor(make_request([("x-api-key", "p" * 16 + "a")]))
    assert extractor(make_request([("x-api-key", "x" * 100_000)])) is not None
    assert len(extractor(make_request([("x-api-key", "x" * 100_000)])) or "") == 36


@pytest.mark.parametrize(
    ("args", "kwargs", "quoted"),
    [
        (("",), {}, "''"),
        (("x api key",), {}, "'x api key'"),
        ((b"x-api-key",), {}, "b'x-api-key'"),
        (("x-api-key",), {"max_length": 0}, "0"),
        (("x-api-key",), {"max_length": True}, "True"),
    ],
)
def test_header_bad_configuration(args: tuple[Any, ...], kwargs: dict[str, Any], quoted: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^Header: ") as info:
        Header(*args, **kwargs)
    assert quoted in str(info.value)


def test_header_repr() -> None:
    assert repr(Header("X-Api-Key", max_length=64)) == "Header('x-api-key', max_length=64)"


# ---------------------------------------------------------------------------------------------- JWTClaim

SECRET = "s3cret-that-is-long-enough-for-hs256!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_PUBLIC_PEM = EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str, scheme: str = "Bearer") -> Headers:
    return [("authorization", f"{scheme} {token}")]


def unsigned(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, "", algorithm="none")


NOW = int(time.time())

JWT_CASES: list[tuple[str, Headers, str | None]] = [
    ("valid", bearer(hs256({"sub": "alice"})), "alice"),
    ("scheme case-insensitive", bearer(hs256({"sub": "alice"}), "bearer"), "alice"),
    ("scheme upper case", bearer(hs256({"sub": "alice"}), "BEARER"), "alice"),
    ("extra spaces", [("authorization", "Bearer   " + hs256({"sub": "alice"}) + "  ")], "alice"),
    # The table is built at collection time, minutes before a long suite reaches it: generous margins.
    ("valid with exp and nbf", bearer(hs256({"sub": "alice", "exp": NOW + 86_400, "nbf": NOW - 60})), "alice"),
    ("bad signature", bearer(hs256({"sub": "alice"}, "another-secret-that-is-long-enough!!")), None),
    ("alg none", bearer(unsigned({"sub": "alice"})), None),
    ("expired", bearer(hs256({"sub": "alice", "exp": NOW - 60})), None),
    ("not yet valid", bearer(hs256({"sub": "alice", "nbf": NOW + 600})), None),
    ("issued in the future", bearer(hs256({"sub": "alice", "iat": NOW + 600})), None),
    ("missing header", [], None),
    ("empty header", [("authorization", "")], None),
    ("scheme only", [("authorization", "Bearer")], None),
    ("scheme and spaces", [("authorization", "Bearer   ")], None),
    ("wrong scheme", bearer(hs256({"sub": "alice"}), "Basic"), None),
    ("no scheme", [("authorization", hs256({"sub": "alice"}))], None),
    ("garbage", [("authorization", "Bearer not.a.jwt")], None),
    ("garbage base64", [("authorization", "Bearer eyJhbGciOi.eyJzdWIi.x")], None),
    ("over-long token", [("authorization", "Bearer " + "a" * 20_000)], None),
    ("missing claim", bearer(hs256({"uid": 1})), None),
    ("audience in token, none configured", bearer(hs256({"sub": "alice", "aud": "api"})), None),
    ("tampered payload", bearer(hs256({"sub": "alice"}).replace(".", ".e30", 1)), None),
]


@pytest.mark.parametrize(("headers", "expected"), [c[1:] for c in JWT_CASES], ids=[c[0] for c in JWT_CASES])
def test_jwt_claim(headers: Headers, expected: str | None) -> None:
    assert JWTClaim("sub", key=SECRET, algorithms=["HS256"])(make_request(headers)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("u-1", "u-1"), (42, "42"), (0, "0"), ("", None), (True, None), (1.5, None), ([1], None), ({"a": 1}, None)],
)
def test_jwt_claim_value_types(value: object, expected: str | None) -> None:
    extractor = JWTClaim("uid", key=SECRET, algorithms=["HS256"])
    assert extractor(make_request(bearer(hs256({"uid": value})))) == expected


def test_jwt_claim_long_value_digested() -> None:
    extractor = JWTClaim("uid", key=SECRET, algorithms=["HS256"])
    key = extractor(make_request(bearer(hs256({"uid": "u" * 1000}))))
    assert key is not None and key.startswith("sha:") and len(key) == 36


def test_jwt_claim_rs256_and_es256() -> None:
    rs = JWTClaim("sub", key=RSA_PUBLIC_PEM, algorithms=["RS256"])
    es = JWTClaim("sub", key=EC_PUBLIC_PEM.decode(), algorithms=["ES256"])
    rs_token = jwt.encode({"sub": "bob"}, RSA_KEY, algorithm="RS256")
    es_token = jwt.encode({"sub": "carol"}, EC_KEY, algorithm="ES256")
    assert rs(make_request(bearer(rs_token))) == "bob"
    assert es(make_request(bearer(es_token))) == "carol"
    assert rs(make_request(bearer(es_token))) is None
    assert es(make_request(bearer(rs_token))) is None
    # Algorithm confusion: an HS256 token signed with the public key as the secret must not pass.
    forged = jwt.api_jws.PyJWS()
    hmac = forged.get_algorithm_by_name("HS256")
    signing_input = b".".join(
        [jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}'), jwt.utils.base64url_encode(b'{"sub":"eve"}')]
    )
    signature = hmac.sign(signing_input, RSA_PUBLIC_PEM)
    confused = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    assert rs(make_request(bearer(confused))) is None


def test_jwt_claim_accepts_key_objects() -> None:
    extractor = JWTClaim("sub", key=RSA_KEY.public_key(), algorithms=["RS256", "RS512"])
    assert extractor(make_request(bearer(jwt.encode({"sub": "bob"}, RSA_KEY, algorithm="RS512")))) == "bob"


def test_jwt_claim_plain_header_without_scheme() -> None:
    extractor = JWTClaim("sub", key=SECRET, algorithms=["HS256"], header="X-Token", scheme=None)
    assert extractor(make_request([("x-token", hs256({"sub": "alice"}))])) == "alice"
    assert extractor(make_request([("x-token", "Bearer " + hs256({"sub": "alice"}))])) is None
    assert extractor(make_request(bearer(hs256({"sub": "alice"})))) is None


def test_jwt_claim_audience_issuer_leeway() -> None:
    extractor = JWTClaim("sub", key=SECRET, algorithms=["HS256"], audience="api", issuer="https://idp", leeway=30)
    good = {"sub": "alice", "aud": "api", "iss": "https://idp"}
    now = int(time.time())  # not the module's NOW: this test may run long after collection
    assert extractor(make_request(bearer(hs256(good)))) == "alice"
    assert extractor(make_request(bearer(hs256({**good, "exp": now - 10})))) == "alice"  # within leeway
    assert extractor(make_request(bearer(hs256({**good, "exp": now - 120})))) is None
    assert extractor(make_request(bearer(hs256({**good, "aud": "other"})))) is None
    assert extractor(make_request(bearer(hs256({**good, "iss": "https://evil"})))) is None
    assert extractor(make_request(bearer(hs256({"sub": "alice", "iss": "https://idp"})))) is None
    assert repr(extractor).endswith("audience='api', issuer='https://idp', leeway=30)")


def test_jwt_claim_verify_false_reads_unverified_tokens() -> None:
    extractor = JWTClaim("sub", key="", algorithms=["HS256"], verify=False)
    assert extractor(make_request(bearer(hs256({"sub": "mallory"}, "any-secret-at-all-long-enough-32b")))) == "mallory"
    assert extractor(make_request(bearer(unsigned({"sub": "mallory"})))) == "mallory"
    # Only the signature check is dropped: time claims still apply.
    assert extractor(make_request(bearer(hs256({"sub": "mallory", "exp": NOW - 60})))) is None
    assert extractor(make_request(bearer("garbage"))) is None
    assert "verify=False" in repr(extractor)


def test_jwt_claim_repr_hides_the_key() -> None:
    extractor = JWTClaim("sub", key=SECRET, algorithms=["HS256"], audience="api")
    text = repr(extractor)
    assert SECRET not in text
    assert text == (
        "JWTClaim('sub', key=<hidden>, algorithms=['HS256'], header='authorization', scheme='Bearer', audience='api')"
    )
    rs = JWTClaim("sub", key=RSA_PUBLIC_PEM, algorithms=["RS256"])
    assert "BEGIN" not in repr(rs)


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"algorithms": []}, "[]"),
        ({"algorithms": "HS256"}, "'HS256'"),
        ({"algorithms": ["none"]}, "'none'"),
        ({"algorithms": ["HS256", "None"]}, "'None'"),
        ({"algorithms": ["HS999"]}, '"HS999"'),
        ({"claim": ""}, "''"),
        ({"header": "bad header"}, "'bad header'"),
        ({"scheme": "Bear er"}, "'Bear er'"),
        ({"verify": "no"}, "'no'"),
        ({"leeway": -1}, "-1"),
        ({"leeway": float("nan")}, "nan"),
        ({"audience": 3}, "3"),
        ({"issuer": ["a"]}, "['a']"),
    ],
)
def test_jwt_claim_bad_configuration(kwargs: dict[str, Any], quoted: str) -> None:
    arguments: dict[str, Any] = {"claim": "sub", "key": SECRET, "algorithms": ["HS256"], **kwargs}
    with pytest.raises(ConfigurationError, match=r"^JWTClaim: ") as info:
        JWTClaim(**arguments)
    assert quoted in str(info.value)


@pytest.mark.parametrize(
    ("key", "algorithms"),
    [
        (RSA_PUBLIC_PEM, ["HS256"]),  # a public key used as an HMAC secret: algorithm confusion
        (SECRET, ["RS256"]),
        (RSA_PUBLIC_PEM, ["RS256", "HS256"]),
        (RSA_PUBLIC_PEM, ["ES256"]),
        ("short", ["HS256"]),  # below RFC 7518's 256 bits
    ],
)
def test_jwt_claim_key_must_fit_every_algorithm(key: Any, algorithms: list[str]) -> None:
    with pytest.raises(ConfigurationError, match=r"^JWTClaim: the key") as info:
        JWTClaim("sub", key=key, algorithms=algorithms)
    assert SECRET not in str(info.value)
    assert "BEGIN" not in str(info.value)


def test_jwt_claim_without_pyjwt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jwt", None)
    with pytest.raises(ConfigurationError, match=r"pip install \"asgi-ratelimit-middleware\[jwt\]\""):
        JWTClaim("sub", key=SECRET, algorithms=["HS256"])


# ----------------------------------------------------------------------------------------------- FirstOf

JWT_OR_IP = FirstOf(JWTClaim("sub", key=SECRET, algorithms=["HS256"]), ClientIP())


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (bearer(hs256({"sub": "alice"})), "0:jwt:sub:alice"),
        (bearer(hs256({"sub": "alice"}, "forged-secret-that-is-long-enough!!")), "1:ip:203.0.113.7"),
        (bearer(unsigned({"sub": "alice"})), "1:ip:203.0.113.7"),
        ([], "1:ip:203.0.113.7"),
    ],
    ids=["verified", "forged falls back to IP", "unsigned falls back to IP", "anonymous"],
)
def test_first_of_jwt_then_ip(headers: Headers, expected: str) -> None:
    assert JWT_OR_IP(make_request(headers)) == expected


def test_first_of_values_from_different_members_never_collide() -> None:
    extractor = FirstOf(Header("x-api-key"), ClientIP())
    with_key = extractor(make_request([("x-api-key", "203.0.113.7")]))
    without = extractor(make_request())
    assert with_key == "0:header:x-api-key:203.0.113.7"
    assert without == "1:ip:203.0.113.7"
    two_issuers = FirstOf(Header("x-a"), Header("x-a"))
    assert two_issuers(make_request([("x-a", "1")])) == "0:header:x-a:1"


def test_first_of_none_when_nothing_applies() -> None:
    assert FirstOf(Header("x-a"), Header("x-b"))(make_request()) is None


def sync_none(request: HTTPConnection) -> str | None:
    return None


def sync_user(request: HTTPConnection) -> str | None:
    return request.headers.get("x-user")


async def async_none(request: HTTPConnection) -> str | None:
    await asyncio.sleep(0)
    return None


async def async_user(request: HTTPConnection) -> str | None:
    await asyncio.sleep(0)
    return request.headers.get("x-user")


@pytest.mark.parametrize(
    ("members", "headers", "expected", "awaitable"),
    [
        ((sync_user,), [("x-user", "u")], "0:fn:u", False),
        ((sync_none, sync_user), [("x-user", "u")], "1:fn:u", False),
        ((sync_none, async_user), [("x-user", "u")], "1:fn:u", True),
        ((async_none, sync_user), [("x-user", "u")], "1:fn:u", True),
        ((async_none, async_none, sync_user), [("x-user", "u")], "2:fn:u", True),
        ((async_user, sync_user), [("x-user", "u")], "0:fn:u", True),
        ((sync_user, async_user), [("x-user", "u")], "0:fn:u", False),  # never reaches the async member
        ((async_none, sync_none), [], None, True),
        ((sync_none, async_none), [], None, True),
    ],
)
def test_first_of_sync_async_mixes(
    members: tuple[KeyExtractor, ...], headers: Headers, expected: str | None, awaitable: bool
) -> None:
    result = FirstOf(*members)(make_request(headers))
    assert inspect.isawaitable(result) is awaitable
    assert resolve(result) == expected


def test_first_of_nested() -> None:
    inner = FirstOf(Header("x-a"), ClientIP())
    outer = FirstOf(Header("x-b"), inner)
    assert outer(make_request()) == "1:first:1:ip:203.0.113.7"


def test_first_of_member_returning_a_non_string_is_a_bug() -> None:
    with pytest.raises(TypeError, match="returned int"):
        FirstOf(lambda request: 5)(make_request())  # type: ignore[arg-type]


def test_first_of_bad_configuration() -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        FirstOf()
    with pytest.raises(ConfigurationError, match="'x-api-key' is not a key extractor"):
        FirstOf("x-api-key")  # type: ignore[arg-type]


def test_first_of_repr_never_shows_secrets() -> None:
    import functools

    def lookup(request: Request, token: str) -> str | None:
        return None

    extractor = FirstOf(JWTClaim("sub", key=SECRET, algorithms=["HS256"]), functools.partial(lookup, token=SECRET))
    assert SECRET not in repr(extractor)
    assert repr(extractor).startswith("FirstOf(JWTClaim('sub', key=<hidden>")


def test_extractors_satisfy_the_protocol() -> None:
    extractors: list[KeyExtractor] = [ClientIP(), Header("x-a"), JWT_OR_IP, sync_user, async_user]
    request = make_request([("x-a", "1"), ("x-user", "u")])
    assert [resolve(e(request)) for e in extractors] == ["203.0.113.7", "1", "1:ip:203.0.113.7", "u", "u"]


def test_websocket_handshake_connections_work() -> None:
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"x-forwarded-for", b"198.51.100.9"), (b"x-api-key", b"k")],
        "client": ("10.0.0.1", 1),
    }
    connection = HTTPConnection(scope)
    assert ClientIP(["10.0.0.0/8"])(connection) == "198.51.100.9"
    assert Header("x-api-key")(connection) == "k"
    assert FirstOf(Header("x-none"), ClientIP())(connection) == "1:ip:10.0.0.1"


# -- scope readers: what the middleware calls instead of building a Request -------------------------


class LoggedClientIP(ClientIP):
    """A subclass with its own __call__: the middleware must call it, with a Request."""

    def __call__(self, request: HTTPConnection) -> str:
        return "logged:" + super().__call__(request)


class RenamedHeader(Header):
    """A subclass that changes from_scope only: the reader is its own from_scope."""

    def from_scope(self, scope: Any) -> str | None:
        value = super().from_scope(scope)
        return None if value is None else value.upper()


def test_scope_readers_of_the_built_in_extractors() -> None:
    request = make_request([("x-a", "abc"), *bearer(hs256({"sub": "alice"}))])
    extractors: list[KeyExtractor] = [
        ClientIP(),
        Header("x-a"),
        JWTClaim("sub", key=SECRET, algorithms=["HS256"]),
        JWT_OR_IP,
        RenamedHeader("x-a"),
    ]
    values = []
    for extractor in extractors:
        reader = scope_reader(extractor)
        assert reader is not None
        assert reader(request.scope) == extractor(request)
        values.append(reader(request.scope))
    assert values == ["203.0.113.7", "abc", "alice", "0:jwt:sub:alice", "ABC"]


@pytest.mark.parametrize(
    "extractor",
    [sync_user, async_user, LoggedClientIP(), FirstOf(ClientIP(), sync_user), FirstOf(Header("x"), LoggedClientIP())],
    ids=["function", "async function", "subclass with its own __call__", "FirstOf with a function", "nested subclass"],
)
def test_extractors_that_need_the_request_have_no_scope_reader(extractor: KeyExtractor) -> None:
    assert scope_reader(extractor) is None
    if isinstance(extractor, FirstOf):
        with pytest.raises(TypeError, match="needs the request"):
            extractor.from_scope(make_request().scope)


@settings(max_examples=200, deadline=None)
@given(
    api_key=st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=300),
    forwarded=st.none() | st.sampled_from(["198.51.100.9", "10.0.0.2, 198.51.100.9", "garbage", "2001:db8::1"]),
    peer=st.sampled_from(["10.0.0.1", "203.0.113.7", "::ffff:10.0.0.1", "2001:db8:1:2::9", "testclient"]),
)
def test_first_of_reads_the_scope_as_it_reads_the_request(
    api_key: str | None, forwarded: str | None, peer: str
) -> None:
    extractor = FirstOf(Header("x-api-key", max_length=64), FirstOf(Header("x-b"), ClientIP(["10.0.0.0/8"])))
    headers = [("x-api-key", api_key)] if api_key is not None else []
    if forwarded is not None:
        headers.append(("x-forwarded-for", forwarded))
    request = make_request(headers, client=(peer, 1))
    reader = scope_reader(extractor)
    assert reader is not None
    assert reader(request.scope) == extractor(request)


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        # A header whose JSON nests 5,000 deep: some PyJWT versions recurse past Python's limit parsing it.
        _b64(b'{"alg":"HS256","x":' + b"[" * 5000 + b"]" * 5000 + b"}") + "." + _b64(b'{"sub":"a"}') + ".c2ln",
        _b64(b'{"alg":"HS256"}') + "." + _b64(b"[" * 5000 + b"]" * 5000) + ".c2ln",
        _b64(b"\xff\xfe") + "." + _b64(b"{}") + ".c2ln",
        "a.b.c",
    ],
    ids=["deep header", "deep payload", "header not UTF-8", "not base64 JSON"],
)
def test_a_token_that_breaks_the_jwt_library_is_no_key(token: str) -> None:
    extractor = JWTClaim("sub", key=SECRET, algorithms=["HS256"])
    assert extractor(make_request([("authorization", f"Bearer {token}")])) is None
    unverified = JWTClaim("sub", key=SECRET, algorithms=["HS256"], verify=False)
    assert unverified(make_request([("authorization", f"Bearer {token}")])) is None
