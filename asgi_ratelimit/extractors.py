"""Key extractors: what a rate-limit rule counts against (a client address, a header, a verified JWT claim).

A key extractor is any callable, sync or async, that takes the request and returns a string identity, or
``None`` when the rule does not apply to the request.  It is typed to take a Starlette ``HTTPConnection``:
a ``Request`` is one, and so is a websocket handshake, which has no ``Request``.

Everything here reads values an attacker controls, so every parser is bounded, and nothing an
unauthenticated client sends is trusted unless a configured proxy vouches for it (``ClientIP``) or a
signature does (``JWTClaim``).  The engine hashes identities before they reach storage keys; these
extractors only make sure identities are honest.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from hashlib import blake2b
from inspect import isawaitable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Protocol, TypeAlias

from starlette.requests import HTTPConnection
from starlette.types import Scope

from .errors import ConfigurationError

__all__ = ["ClientIP", "FirstOf", "Header", "JWTClaim", "KeyExtractor"]

#: The key of a request that has no socket peer at all (``scope["client"] is None``).  It is shared by all
#: such requests, so they are limited together rather than escaping the limit.
UNKNOWN_CLIENT = "unknown-client"

_IPAddress: TypeAlias = "IPv4Address | IPv6Address"
_IPNetwork: TypeAlias = "IPv4Network | IPv6Network"

# Bounds on what is read from attacker-controlled headers.
_MAX_HOPS = 64  # list elements examined, counted from the right
_MAX_NODE_LENGTH = 100  # one hop; the longest legitimate one ("[v6%zone]:port") is far shorter
_MAX_CACHE = 4096  # parsed peers and hops kept; the cache is emptied when full

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2
_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")  # RFC 7239 section 6: a number or an obfuscated port
_UNQUOTED_VALUE = re.compile(r'[^\s"\\]+')  # lenient: proxies do send unquoted "[v6]:port"
_QUOTED_ESCAPE = re.compile(r"\\(.)")


class KeyExtractor(Protocol):
    """A callable that maps a request to the identity a rule counts against, or None when the rule does not apply."""

    def __call__(self, request: HTTPConnection, /) -> str | Awaitable[str | None] | None: ...


def _cap(value: str, max_length: int) -> str:
    """The value itself when short enough, else a fixed-size digest, so distinct values never share a key."""
    if len(value) <= max_length:
        return value
    return "sha:" + blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------- ClientIP


def _parse_node(text: str) -> _IPAddress | None:
    """The address in one hop ("1.2.3.4", "1.2.3.4:80", "[2001:db8::1]:80", "2001:db8::1"), or None.

    None covers malformed values and the RFC 7239 non-addresses ("unknown", "_obfuscated").
    Zone identifiers are dropped: they only mean something on the proxy's own link.
    """
    text = text.strip()
    if not text or len(text) > _MAX_NODE_LENGTH or text[0] == "_":
        return None
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not (rest[0] == ":" and _PORT.fullmatch(rest, 1)):
            return None
        if ":" not in host:  # "[1.2.3.4]" is not a thing
            return None
    else:
        colons = text.count(":")
        if colons == 1:
            host, _, port = text.partition(":")
            if not _PORT.fullmatch(port):
                return None
        else:
            host = text
    if ":" in host:
        host = host.partition("%")[0]
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(element: str) -> str | None:
    """The ``for=`` value of one RFC 7239 forwarded-element, unquoted; None if absent, repeated or malformed."""
    found: str | None = None
    for pair in element.split(";"):
        pair = pair.strip()
        if not pair:
            continue
        name, equals, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not _TOKEN.fullmatch(name):
            return None
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            inner = value[1:-1]
            if '"' in _QUOTED_ESCAPE.sub("", inner):
                return None
            value = _QUOTED_ESCAPE.sub(r"\1", inner)
        elif not _UNQUOTED_VALUE.fullmatch(value):
            return None
        if name.lower() == "for":
            if found is not None:  # RFC 7239 section 4: a parameter occurs at most once per element
                return None
            found = value
    return found


def _trusted_network(entry: object) -> _IPNetwork:
    if not isinstance(entry, str):
        raise ConfigurationError(
            f"ClientIP: invalid trusted proxy {entry!r}: give each proxy as a string, an address or a CIDR network."
        )
    try:
        network = ip_network(entry.strip(), strict=True)
    except ValueError as exc:
        raise ConfigurationError(f'ClientIP: invalid trusted proxy "{entry}": {exc}.') from exc
    if isinstance(network, IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:  # peers are normalised to IPv4, so their networks must be too
            return IPv4Network((mapped, network.prefixlen - 96))
    return network


class ClientIP:
    """The client's address: the socket peer, or the nearest untrusted hop that trusted proxies reported.

    ``trusted_proxies``: addresses or CIDR networks (IPv4 and IPv6) of the proxies in front of the app.
    Only when the socket peer is one of them are forwarding headers read; the list is walked right to
    left, skipping trusted proxies, and the first untrusted hop is the client.  If every hop is trusted,
    the leftmost is used.  A malformed, ``unknown`` or obfuscated hop stops the walk, and the last good
    address (the trusted proxy that reported it, or the peer) is used instead, so a garbage value never
    becomes a key.  At most 64 hops are examined.  Default: none, headers are never read.

    ``ipv6_prefix``: IPv6 clients are keyed by their network of this length, ``"2001:db8:1:2::/64"``, so
    one host cannot rotate through its 2**64 addresses to multiply its allowance.  1 to 128, default 64.
    IPv4-mapped IPv6 addresses are keyed as the IPv4 address.

    ``proxy_header``: the one forwarding header the proxies write, and the only one read.
    ``"x-forwarded-for"`` (the default: nginx, HAProxy, cloud load balancers, Traefik and Caddy write it);
    ``"forwarded"`` for RFC 7239 ``Forwarded``; any other header name is read as an
    ``X-Forwarded-For``-style comma-separated list (``"x-real-ip"``, ``"cf-connecting-ip"``...).  One
    header, never a choice between two: a proxy passes on the header it does not write as the client
    sent it, so reading that one would let any client pick its own key.

    A peer that is not an IP address (a unix socket path, Starlette's ``"testclient"``) is the key as it
    is; a request without a peer is keyed ``"unknown-client"``.  Never returns None.
    """

    def __init__(
        self, trusted_proxies: Iterable[str] = (), *, ipv6_prefix: int = 64, proxy_header: str = "x-forwarded-for"
    ) -> None:
        if isinstance(trusted_proxies, (str, bytes)):
            raise ConfigurationError(
                f"ClientIP: trusted_proxies must be a list of addresses or networks, not the single string "
                f"{trusted_proxies!r}; write [{trusted_proxies!r}]."
            )
        if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int) or not 1 <= ipv6_prefix <= 128:
            raise ConfigurationError(f"ClientIP: invalid ipv6_prefix {ipv6_prefix!r}: it must be an integer 1 to 128.")
        if not isinstance(proxy_header, str) or not _TOKEN.fullmatch(proxy_header):
            raise ConfigurationError(
                f"ClientIP: invalid proxy_header {proxy_header!r}: "
                'give "x-forwarded-for", "forwarded" or a header name.'
            )
        if proxy_header.lower() == "auto":
            raise ConfigurationError(
                "ClientIP: proxy_header 'auto' is not accepted: a client could send whichever of Forwarded and "
                'X-Forwarded-For the proxy does not write.  Name the one your proxies write: "x-forwarded-for" '
                '(nginx, HAProxy, cloud load balancers, Traefik, Caddy) or "forwarded".'
            )
        networks = [_trusted_network(entry) for entry in trusted_proxies]
        self._trusted_text = tuple(str(network) for network in networks)
        self._trusted_hosts: frozenset[_IPAddress] = frozenset(
            n.network_address for n in networks if n.prefixlen == n.max_prefixlen
        )
        self._trusted_v4 = tuple(n for n in networks if isinstance(n, IPv4Network) and n.prefixlen < 32)
        self._trusted_v6 = tuple(n for n in networks if isinstance(n, IPv6Network) and n.prefixlen < 128)
        self._has_trusted = bool(networks)
        self._ipv6_prefix = ipv6_prefix
        self._ipv6_mask = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
        self._proxy_header = proxy_header.lower()
        self._list_header = self._proxy_header.encode("ascii")
        self._read_forwarded = self._proxy_header == "forwarded"
        self._read_list = not self._read_forwarded
        # Peer or hop text -> (key, trusted), None for non-addresses.  Parsing an IPv6 address costs
        # microseconds; clients repeat.  Attackers can vary the text freely, hence the bound.
        self._remembered = functools.lru_cache(maxsize=_MAX_CACHE)(self._parse)

    def __repr__(self) -> str:
        return (
            f"ClientIP(trusted_proxies={list(self._trusted_text)!r}, ipv6_prefix={self._ipv6_prefix}, "
            f"proxy_header={self._proxy_header!r})"
        )

    def _key(self, address: _IPAddress) -> str:
        if isinstance(address, IPv4Address):
            return str(address)
        return f"{IPv6Address(int(address) & self._ipv6_mask)}/{self._ipv6_prefix}"

    def _is_trusted(self, address: _IPAddress) -> bool:
        if address in self._trusted_hosts:
            return True
        networks: tuple[_IPNetwork, ...] = self._trusted_v4 if isinstance(address, IPv4Address) else self._trusted_v6
        return any(address in network for network in networks)

    def _resolve(self, text: str) -> tuple[str, bool] | None:
        """(key, trusted) for an address as a peer or a hop gives it, or None when it is not an address."""
        # Long values are never addresses: remembering them would only cost memory.
        return self._remembered(text) if len(text) <= _MAX_NODE_LENGTH else self._parse(text)

    def _parse(self, text: str) -> tuple[str, bool] | None:
        address = _parse_node(text)
        return None if address is None else (self._key(address), self._is_trusted(address))

    def _hops(self, scope: Scope) -> Iterator[str]:
        """The hops reported by the configured header, at most 64, rightmost first, parsed as they are reached."""
        forwarded: list[str] = []
        listed: list[str] = []
        for name, value in scope["headers"]:
            if self._read_forwarded and name == b"forwarded":
                forwarded.append(value.decode("latin-1"))
            elif self._read_list and name == self._list_header:
                listed.append(value.decode("latin-1"))
        if self._read_forwarded and any(line.strip() for line in forwarded):
            # Elements never legitimately contain a comma (only quoted host= could), so splitting on commas
            # is exact for what a proxy writes; anything else turns into a malformed element further left.
            elements = ",".join(forwarded).rsplit(",", _MAX_HOPS)[-_MAX_HOPS:]
            # An element without a usable for= is an unknown hop: "_" makes _parse_node reject it.
            for element in reversed(elements):
                if element.strip():
                    yield (_forwarded_for(element) or "_").strip()
            return
        for part in reversed(",".join(listed).rsplit(",", _MAX_HOPS)[-_MAX_HOPS:]):
            part = part.strip()
            if part:
                yield part

    def __call__(self, request: HTTPConnection) -> str:
        return self.from_scope(request.scope)

    def from_scope(self, scope: Scope) -> str:
        """The key of the request whose ASGI scope this is (what calling the extractor returns)."""
        client = scope.get("client")
        if not client:
            return UNKNOWN_CLIENT
        host = client[0]
        if not isinstance(host, str) or not host:
            return UNKNOWN_CLIENT
        if not self._has_trusted and ":" not in host:
            return host  # IPv4, or not an address at all: nothing to normalise
        peer = self._resolve(host)
        if peer is None:
            return host  # a unix socket path, "testclient": used as it is, and never trusted
        last_good, trusted = peer
        if not trusted:
            return last_good
        for hop in self._hops(scope):
            resolved = self._resolve(hop)
            if resolved is None:
                return last_good
            key, trusted = resolved
            if not trusted:
                return key
            last_good = key
        return last_good


# ----------------------------------------------------------------------------------------------- Header


class Header:
    """The value of one request header, stripped; None when the header is absent or empty.

    ``name``: the header's name, case-insensitive.  When the header is sent more than once, the first field
    line is used, the same one ``request.headers[name]`` gives the application.

    ``max_length``: values longer than this many characters (default 256) are replaced by a fixed-size
    digest, ``"sha:<32 hex digits>"``, rather than truncated, so two long values sharing a prefix still
    get separate keys and memory stays bounded.

    The value is whatever the client sent: pair this with authentication (or key on a verified
    ``JWTClaim``) if clients must not be able to choose their own identity.
    """

    def __init__(self, name: str, *, max_length: int = 256) -> None:
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ConfigurationError(f"Header: invalid header name {name!r}: it must be a non-empty HTTP token.")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ConfigurationError(f"Header: invalid max_length {max_length!r}: it must be a positive integer.")
        self._name = name.lower()
        self._raw_name = self._name.encode("ascii")
        self._max_length = max_length

    def __repr__(self) -> str:
        return f"Header({self._name!r}, max_length={self._max_length})"

    def __call__(self, request: HTTPConnection) -> str | None:
        return self.from_scope(request.scope)

    def from_scope(self, scope: Scope) -> str | None:
        """The key of the request whose ASGI scope this is (what calling the extractor returns)."""
        for name, value in scope["headers"]:
            if name == self._raw_name:
                text = value.decode("latin-1").strip()
                return _cap(text, self._max_length) if text else None
        return None


# --------------------------------------------------------------------------------------------- JWTClaim

_MAX_TOKEN_LENGTH = 16 * 1024  # bounds the work an unauthenticated client can ask of the verifier


class JWTClaim:
    """One claim of a JSON Web Token whose signature has been verified; None for any token that fails.

    ``claim``: the claim to key on, e.g. ``"sub"``.  String values are used as they are (long ones
    digested like ``Header``'s), integers as their decimal text; other values (lists, objects, booleans,
    floats) and a missing claim give None.

    ``key``: the HMAC secret (str or bytes) or the public key (PEM text or a ``cryptography`` key object)
    that verifies signatures.  It is checked here, and never shown by ``repr``.

    ``algorithms``: the accepted algorithms, a non-empty list such as ``["HS256"]`` or ``["RS256"]``.
    ``"none"`` is refused, and so is any mix the key does not fit (an HMAC secret with RS256, say).

    ``header``: the header carrying the token, default ``"Authorization"``.  ``scheme``: the prefix before
    the token, matched case-insensitively, default ``"Bearer"``; ``None`` when the header holds the bare token.

    ``audience``, ``issuer``: when given, the ``aud`` / ``iss`` claims must match.  A token that carries
    ``aud`` is rejected when no ``audience`` is configured (PyJWT's rule).  ``leeway``: seconds of clock
    skew allowed on ``exp``, ``nbf`` and ``iat``, default 0.

    ``verify``: default True.  **``verify=False`` is unsafe**: the signature is not checked, so anyone can
    mint a token with whatever claim they like, pick their own key, escape their limit or spend another
    user's quota.  Use it only when a trusted component in front of the app has already verified the token.

    Expired, not-yet-valid, unsigned, badly signed, malformed and missing tokens all give None.  Tokens are
    never logged.  Needs PyJWT: ``pip install "asgi-ratelimit-middleware[jwt]"``.
    """

    def __init__(
        self,
        claim: str,
        *,
        key: Any,
        algorithms: Sequence[str],
        header: str = "Authorization",
        scheme: str | None = "Bearer",
        verify: bool = True,
        audience: str | Sequence[str] | None = None,
        issuer: str | None = None,
        leeway: float = 0,
    ) -> None:
        try:
            import jwt
        except ImportError as exc:
            raise ConfigurationError(
                'JWTClaim needs PyJWT, which is not installed: pip install "asgi-ratelimit-middleware[jwt]".'
            ) from exc
        if not isinstance(claim, str) or not claim:
            raise ConfigurationError(f"JWTClaim: invalid claim {claim!r}: it must be a non-empty string.")
        if isinstance(algorithms, (str, bytes)) or not isinstance(algorithms, Sequence) or not algorithms:
            raise ConfigurationError(
                f'JWTClaim: invalid algorithms {algorithms!r}: give a non-empty list, e.g. ["HS256"] or ["RS256"].'
            )
        for name in algorithms:
            if not isinstance(name, str) or name.lower() == "none":
                raise ConfigurationError(
                    f'JWTClaim: invalid algorithm {name!r}: "none" means unsigned tokens, which anyone can forge.'
                )
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise ConfigurationError(f"JWTClaim: invalid header {header!r}: it must be a non-empty HTTP token.")
        if scheme is not None and (not isinstance(scheme, str) or not _TOKEN.fullmatch(scheme)):
            raise ConfigurationError(
                f'JWTClaim: invalid scheme {scheme!r}: give a token such as "Bearer", or None for a bare token.'
            )
        if audience is not None and not (
            isinstance(audience, str)
            or (isinstance(audience, Sequence) and audience and all(isinstance(a, str) for a in audience))
        ):
            raise ConfigurationError(f"JWTClaim: invalid audience {audience!r}: give a string or a list of strings.")
        if issuer is not None and not isinstance(issuer, str):
            raise ConfigurationError(f"JWTClaim: invalid issuer {issuer!r}: give a string.")
        if not isinstance(verify, bool):
            raise ConfigurationError(f"JWTClaim: invalid verify {verify!r}: it must be True or False.")
        if isinstance(leeway, bool) or not isinstance(leeway, (int, float)) or not 0 <= leeway < float("inf"):
            raise ConfigurationError(f"JWTClaim: invalid leeway {leeway!r}: it must be a number of seconds >= 0.")

        prepared: Any = key
        if verify:
            jws = jwt.PyJWS()
            for name in algorithms:
                try:
                    algorithm = jws.get_algorithm_by_name(name)
                except NotImplementedError as exc:
                    raise ConfigurationError(
                        f'JWTClaim: unsupported algorithm "{name}" (RS*, ES*, PS* and EdDSA need the '
                        f"cryptography package)."
                    ) from exc
                try:
                    prepared = algorithm.prepare_key(key)
                except (jwt.PyJWTError, ValueError, TypeError) as exc:
                    # The message never includes the key itself.
                    raise ConfigurationError(
                        f'JWTClaim: the key does not fit algorithm "{name}": {type(exc).__name__}. Give an HMAC '
                        f"secret for HS*, a public key for RS*/PS*/ES*/EdDSA, and do not mix the two kinds."
                    ) from exc
                weakness = algorithm.check_key_length(prepared)
                if weakness:
                    raise ConfigurationError(f'JWTClaim: the key is too weak for algorithm "{name}": {weakness}')

        self._claim = claim
        self._key = prepared
        self._algorithms = list(algorithms)
        self._header = header.lower()
        self._raw_header = self._header.encode("ascii")
        self._scheme = scheme
        self._scheme_lower = scheme.lower() if scheme is not None else None
        self._verify = verify
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        # Without a signature check, still check exp, nbf, aud and iss, so verify=False only drops the signature.
        self._options: Any = {
            "verify_signature": verify,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
            "verify_aud": True,
            "verify_iss": True,
            "enforce_minimum_key_length": True,
        }
        self._decode: Callable[..., dict[str, Any]] = jwt.PyJWT().decode

    def __repr__(self) -> str:
        parts = [
            repr(self._claim),
            "key=<hidden>",
            f"algorithms={self._algorithms!r}",
            f"header={self._header!r}",
            f"scheme={self._scheme!r}",
        ]
        if not self._verify:
            parts.append("verify=False")
        if self._audience is not None:
            parts.append(f"audience={self._audience!r}")
        if self._issuer is not None:
            parts.append(f"issuer={self._issuer!r}")
        if self._leeway:
            parts.append(f"leeway={self._leeway!r}")
        return f"JWTClaim({', '.join(parts)})"

    def _token(self, scope: Scope) -> str | None:
        for name, value in scope["headers"]:
            if name == self._raw_header:
                text: str = value.decode("latin-1").strip()
                break
        else:
            return None
        if self._scheme_lower is not None:
            scheme, _, text = text.partition(" ")
            if scheme.lower() != self._scheme_lower:
                return None
            text = text.strip()
        if not text or len(text) > _MAX_TOKEN_LENGTH:
            return None
        return text

    def __call__(self, request: HTTPConnection) -> str | None:
        return self.from_scope(request.scope)

    def from_scope(self, scope: Scope) -> str | None:
        """The key of the request whose ASGI scope this is (what calling the extractor returns)."""
        token = self._token(scope)
        if token is None:
            return None
        try:
            payload = self._decode(
                token,
                key=self._key,
                algorithms=self._algorithms,
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except Exception:
            # Any failure, the library's own included (a header nested thousands deep exhausts the recursion
            # limit in some versions), means the token proves nothing: no key, never a 500.  Deliberately
            # silent: the token must never reach a log.
            return None
        value = payload.get(self._claim)
        if isinstance(value, str):
            return _cap(value, 256) if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return None


# ---------------------------------------------------------------------------------------------- FirstOf


def _kind(extractor: Callable[..., Any]) -> str:
    if isinstance(extractor, ClientIP):
        return "ip"
    if isinstance(extractor, Header):
        return f"header:{extractor._name}"
    if isinstance(extractor, JWTClaim):
        return f"jwt:{extractor._claim}"
    if isinstance(extractor, FirstOf):
        return "first"
    return "fn"


def _describe(extractor: Callable[..., Any]) -> str:
    if isinstance(extractor, (ClientIP, Header, JWTClaim, FirstOf)):
        return repr(extractor)
    # Not repr(): a partial or a closure's repr could show a secret it was built with.
    return str(getattr(extractor, "__qualname__", type(extractor).__qualname__))


class FirstOf:
    """The first identity that any of several extractors finds, tried in order; None if none applies.

    ``*extractors``: at least one key extractor, sync or async, e.g. ``FirstOf(JWTClaim(...), ClientIP())``.

    Each value is prefixed with the member's position and kind, ``"0:jwt:sub:alice"``,
    ``"1:ip:203.0.113.7"``, ``"2:fn:..."`` for plain callables, so an API key that happens to equal an
    address, or a user id from a second issuer, never shares a key with it.  Reordering members therefore
    changes the keys (the counts start afresh).

    Calling a FirstOf returns the value directly while every member answers synchronously; as soon as a
    member returns an awaitable, it returns an awaitable instead.  Callers await the result when
    ``inspect.isawaitable(result)``, as the middleware does.
    """

    def __init__(self, *extractors: KeyExtractor) -> None:
        if not extractors:
            raise ConfigurationError("FirstOf: give at least one key extractor.")
        for extractor in extractors:
            if not callable(extractor):
                raise ConfigurationError(
                    f"FirstOf: {extractor!r} is not a key extractor: give callables that take a request."
                )
        self._extractors = extractors
        self._prefixes = tuple(f"{index}:{_kind(extractor)}:" for index, extractor in enumerate(extractors))
        # Every member reads the scope alone (the built-in extractors): so does this one, see scope_reader().
        readers = [scope_reader(extractor) for extractor in extractors]
        self._scope_readers: tuple[ScopeReader, ...] | None = (
            None if None in readers else tuple(reader for reader in readers if reader is not None)
        )

    def __repr__(self) -> str:
        return f"FirstOf({', '.join(_describe(extractor) for extractor in self._extractors)})"

    def _prefixed(self, index: int, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError(
                f"key extractor {_describe(self._extractors[index])} returned {type(value).__name__}, not str"
            )
        return self._prefixes[index] + value

    def __call__(self, request: HTTPConnection) -> str | Awaitable[str | None] | None:
        for index, extractor in enumerate(self._extractors):
            result = extractor(request)
            if isawaitable(result):
                return self._finish(request, index, result)
            value = self._prefixed(index, result)
            if value is not None:
                return value
        return None

    def from_scope(self, scope: Scope) -> str | None:
        """The key of the request whose ASGI scope this is, when every member reads the scope alone."""
        if self._scope_readers is None:
            raise TypeError("FirstOf.from_scope: a member needs the request, not only its scope")
        for index, reader in enumerate(self._scope_readers):
            value = self._prefixed(index, reader(scope))
            if value is not None:
                return value
        return None

    async def _finish(self, request: HTTPConnection, index: int, pending: Awaitable[object]) -> str | None:
        value = self._prefixed(index, await pending)
        for later in range(index + 1, len(self._extractors)):
            if value is not None:
                return value
            result = self._extractors[later](request)
            value = self._prefixed(later, await result if isawaitable(result) else result)
        return value


# ----------------------------------------------------------------------------------------- scope_reader

ScopeReader: TypeAlias = "Callable[[Scope], str | None]"


def scope_reader(extractor: object) -> ScopeReader | None:
    """The extractor as a function of the ASGI scope, when that is all it reads; else None.

    True of the built-in extractors (and a FirstOf of them) as they are, not of a subclass that
    overrides ``__call__``: the middleware then builds no Request for the rule, which is a good
    part of what a limited request costs.
    """
    call = getattr(type(extractor), "__call__", None)  # noqa: B004 - the class's own, not an instance's
    if call is ClientIP.__call__ or call is Header.__call__ or call is JWTClaim.__call__:
        reader: ScopeReader = extractor.from_scope  # type: ignore[attr-defined]
        return reader
    if call is FirstOf.__call__ and isinstance(extractor, FirstOf) and extractor._scope_readers is not None:
        return extractor.from_scope
    return None
