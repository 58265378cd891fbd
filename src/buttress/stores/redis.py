"""``redis://`` / ``rediss://`` / ``valkey://`` / ``valkeys://``: cluster-wide state on Redis or Valkey.

A :class:`RedisStore` hands out objects that answer like the process-local core types the facades use
(``GCRA``, ``KeyedGCRA``, ``Permits``, the breaker's state) but decide on the server:

- every algorithm is ONE Lua script (EVALSHA; loaded again after NOSCRIPT) that reads the server's
  ``TIME``, so client clocks never matter;
- one round trip per decision; ``try_acquire_many`` sends its whole batch in one round trip;
- keys are ``<prefix>{<kind>:<name>}[:<key>]`` (the braces are the Redis Cluster hash tag: one limit, one
  slot) and carry TTLs, so idle state disappears;
- every store call has a ``timeout`` and goes through one buttress ``CircuitBreaker`` per store, which
  opens after 5 consecutive failed calls and probes again after ``probe`` (0.5 s) seconds; while it is
  open a decision costs one local step. No exception of the client library reaches the caller: the
  ``on_error`` policy decides instead ("local": a process-local twin of the same limit; "open": admit;
  "closed": refuse with a retry-after), and a ``store_error`` event and counter record each failure.

redis-py is imported on first use, so this module imports without it. See docs/redis.md.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from .. import _impl
from .._params import NS, check_float, check_int, check_n, emission_interval_ns, seconds_to_ns
from . import Store, canonical_settings, check_kind, check_name, settings_mismatch

__all__ = ["RedisStore", "StoreEvent", "StoreMetrics", "BreakerView", "RedisGCRA", "RedisKeyed", "RedisWindow",
           "RedisPermits", "RedisBreaker", "ON_ERROR", "SCRIPTS", "LOCAL", "REFUSED"]

log = logging.getLogger("buttress.stores.redis")

ON_ERROR = ("local", "open", "closed")
SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
DEFAULT_PREFIX = "bt:"
DEFAULT_TIMEOUT = 0.005          # s per store call
# s to set up a connection (TCP, AUTH, CLIENT SETINFO): once per thread / event loop, never part of a
# decision's `timeout` -- on a busy machine a 5 ms connect timed out, and each new event loop decided
# its first calls by the on_error policy while the server was healthy
DEFAULT_CONNECT_TIMEOUT = 1.0
BREAKER_FAILURES = 5             # consecutive failed store calls that open the store's breaker
BREAKER_PROBE = 0.5              # s the store's breaker stays open before one probe call
SETTINGS_TTL = 86400             # s a settings record lives without a process binding the name
REBIND_INTERVAL = 3600.0         # s between two refreshes of an object's settings record
BATCH = 256                      # keys per script call in try_acquire_many (all chunks: one round trip)
MAX_TAU_NS = 1 << 51             # capacity / rate on the server: exact integer ns in Lua doubles (~26 days)
MAX_WAIT_NS = 1 << 51
STATE_TTL_MS = 86400 * 1000      # a breaker's state hash, refreshed by every sync
LOCAL = -2                       # RedisBreaker.acquire(): the store is down, decide on the local core
REFUSED = -1

# ----------------------------------------------------------------------------------------------------
# Lua. Times: GCRA keeps its theoretical arrival time (TAT) as a decimal string of ns since the epoch
# and works on (sec, ns) pairs, so every number stays an exact integer in Lua's doubles; windows,
# leases and the breaker work in whole microseconds (< 2**52).

_NOW_SEC_NS = """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local ns = tonumber(t[2]) * 1000
"""

_TAT = """
local function ahead_of(s)
  if not s then return 0 end
  local d = (tonumber(string.sub(s, 1, -10)) - sec) * 1000000000 + (tonumber(string.sub(s, -9)) - ns)
  if d > 0 then return d end
  return 0
end
local function put_tat(key, rel)
  local a = ns + rel
  local q = math.floor(a / 1000000000)
  local r = a - q * 1000000000
  if r < 0 then q = q - 1; r = r + 1000000000 elseif r >= 1000000000 then q = q + 1; r = r - 1000000000 end
  local txt = string.format('%d%09d', sec + q, r)
  redis.call('SET', key, txt, 'PX', math.ceil(rel / 1000000) + 1)
  return txt
end
"""

# KEYS[1] tat; ARGV interval, tau, n, max_wait -> {wait, tat} or {-1, need}
GCRA_CLAIM = _NOW_SEC_NS + _TAT + """
local interval = tonumber(ARGV[1]); local tau = tonumber(ARGV[2])
local cost = tonumber(ARGV[3]) * interval
local ahead = ahead_of(redis.call('GET', KEYS[1]))
local wait = ahead + cost - tau
if wait < 0 then wait = 0 end
if wait > tonumber(ARGV[4]) then return {-1, ahead + cost - tau} end
return {wait, put_tat(KEYS[1], ahead + cost)}
"""

# KEYS[1] tat -> ns the TAT is ahead of now (0 = full)
GCRA_PEEK = _NOW_SEC_NS + _TAT + """
return ahead_of(redis.call('GET', KEYS[1]))
"""

# KEYS[1] tat; ARGV receipt tat, n * interval -> 1 given back, 0 a later claim built on it
GCRA_REFUND = _NOW_SEC_NS + _TAT + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local rel = ahead_of(ARGV[1]) - tonumber(ARGV[2])
if rel <= 0 then redis.call('DEL', KEYS[1]) else put_tat(KEYS[1], rel) end
return 1
"""

# KEYS one tat per key (duplicates consume in turn); ARGV interval, tau, cost -> {0|1, ...}
GCRA_MANY = _NOW_SEC_NS + _TAT + """
local tau = tonumber(ARGV[2]); local cost = tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS do
  local ahead = ahead_of(redis.call('GET', KEYS[i]))
  if ahead + cost <= tau then put_tat(KEYS[i], ahead + cost); out[i] = 1 else out[i] = 0 end
end
return out
"""

_NOW_US = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS[1] hash {window index -> count}; ARGV w_us, limit, n, sliding(0/1), claim(0/1)
# -> {admitted, idx, prev, curr, elapsed_us}
WINDOW = _NOW_US + """
local w = tonumber(ARGV[1]); local limit = tonumber(ARGV[2]); local n = tonumber(ARGV[3])
local idx = math.floor(now / w); local e = now - idx * w
if e < 0 then idx = idx - 1; e = e + w elseif e >= w then idx = idx + 1; e = e - w end
local ci = string.format('%d', idx); local pi = string.format('%d', idx - 1)
local f = redis.call('HGETALL', KEYS[1])
local curr, prev = 0, 0
for i = 1, #f, 2 do
  if f[i] == ci then curr = tonumber(f[i + 1])
  elseif f[i] == pi then prev = tonumber(f[i + 1])
  else redis.call('HDEL', KEYS[1], f[i]) end
end
local fits
if ARGV[4] == '1' then fits = prev * (w - e) + (curr + n) * w <= limit * w else fits = curr + n <= limit end
if not fits or ARGV[5] ~= '1' then return {0, idx, prev, curr, e} end
redis.call('HINCRBY', KEYS[1], ci, n)
redis.call('PEXPIRE', KEYS[1], math.ceil((2 * w - e) / 1000) + 1)
return {1, idx, prev, curr + n, e}
"""

# KEYS[1] hash; ARGV idx, n -> 1 given back
WINDOW_UNCLAIM = """
local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if c < tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
return 1
"""

# KEYS[1] zset of leases {member -> expiry us}; ARGV limit, lease_us, members... -> {granted, in_use}
LEASE_ACQUIRE = _NOW_US + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local c = redis.call('ZCARD', KEYS[1])
local n = #ARGV - 2
if c + n > tonumber(ARGV[1]) then return {0, c} end
local exp = now + tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], exp, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
return {1, c + n}
"""

# KEYS[1]; ARGV members... -> removed
LEASE_RELEASE = """
return redis.call('ZREM', KEYS[1], unpack(ARGV))
"""

# KEYS[1]; ARGV lease_us, members... -> members no longer held (expired and purged)
LEASE_RENEW = _NOW_US + """
local exp = now + tonumber(ARGV[1])
local lost = 0
for i = 2, #ARGV do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) > now then redis.call('ZADD', KEYS[1], 'XX', exp, ARGV[i]) else
    if s then redis.call('ZREM', KEYS[1], ARGV[i]) end
    lost = lost + 1
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000) + 1000) end
return lost
"""

# KEYS[1] -> leases held now
LEASE_COUNT = _NOW_US + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1] settings key; ARGV settings text, ttl s -> 1, or the other settings text
BIND = """
local have = redis.call('GET', KEYS[1])
if not have then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end
if have == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end
return have
"""

# The cluster circuit breaker. KEYS[1] state hash, KEYS[2] per-second buckets {c<sec>, f<sec>, s<sec>}.
# ARGV: op, window_size, minimum_calls, failure thr, slow thr, half_open_calls, half_open_minimum,
#       half_open_max_wait_us (-1 none), nd, open durations us for attempt 1..nd (the last repeats),
#       then the op's arguments.
# returns {state, generation, attempt, open_left_us, calls, failures, slow, granted, half_open_issued}
BREAKER = _NOW_US + """
local H, W = KEYS[1], KEYS[2]
local op = ARGV[1]
local wsize = tonumber(ARGV[2]); local minc = tonumber(ARGV[3])
local frt = tonumber(ARGV[4]); local srt = tonumber(ARGV[5])
local hoc = tonumber(ARGV[6]); local homin = tonumber(ARGV[7]); local homw = tonumber(ARGV[8])
local nd = tonumber(ARGV[9]); local p = 10 + nd
local v = redis.call('HMGET', H, 'st', 'gen', 'att', 'ou', 'he', 'hi', 'hc', 'hf', 'hs')
local st = tonumber(v[1]) or 0; local gen = tonumber(v[2]) or 0; local att = tonumber(v[3]) or 0
local ou = tonumber(v[4]) or 0; local he = tonumber(v[5]) or 0; local hi = tonumber(v[6]) or 0
local hc = tonumber(v[7]) or 0; local hf = tonumber(v[8]) or 0; local hs = tonumber(v[9]) or 0
local dirty = false
local function go(newst)
  if newst == 1 then
    att = att + 1
    local a = att; if a > nd then a = nd end
    ou = now + tonumber(ARGV[9 + a])
  elseif newst == 2 then he = now; hi = 0; hc = 0; hf = 0; hs = 0
  elseif newst == 0 then att = 0; redis.call('DEL', W)
  elseif newst == 5 then redis.call('DEL', W) end
  st = newst; gen = gen + 1; dirty = true
end
local was = st
if st == 1 and now >= ou then go(2) end
if was == 2 and homw >= 0 and now - he >= homw then go(1) end
local granted = 0
local calls, fails, slow = -1, -1, -1
if op == 'sync' then
  local sec = math.floor(now / 1000000)
  local c = tonumber(ARGV[p + 1])
  if c > 0 and (st == 0 or st == 5) and tonumber(ARGV[p]) == gen then
    redis.call('HINCRBY', W, 'c' .. sec, c)
    redis.call('HINCRBY', W, 'f' .. sec, tonumber(ARGV[p + 2]))
    redis.call('HINCRBY', W, 's' .. sec, tonumber(ARGV[p + 3]))
    redis.call('PEXPIRE', W, (wsize + 2) * 1000)
  end
  calls, fails, slow = 0, 0, 0
  local f = redis.call('HGETALL', W)
  for i = 1, #f, 2 do
    local s = tonumber(string.sub(f[i], 2))
    if s > sec - wsize and s <= sec then
      local k = string.sub(f[i], 1, 1); local x = tonumber(f[i + 1])
      if k == 'c' then calls = calls + x elseif k == 'f' then fails = fails + x else slow = slow + x end
    elseif s <= sec - wsize then redis.call('HDEL', W, f[i]) end
  end
  if st == 0 and calls > 0 and calls >= minc and (fails / calls >= frt or slow / calls >= srt) then go(1) end
elseif op == 'acquire' then
  if st == 2 then
    if hi < hoc then hi = hi + 1; granted = 1; dirty = true end
  elseif st == 0 or st == 4 or st == 5 then granted = 1 end
elseif op == 'report' then
  if st == 2 and tonumber(ARGV[p]) == gen then
    local outcome = tonumber(ARGV[p + 1])
    if outcome == 2 then
      if hi > 0 then hi = hi - 1 end
    else
      hc = hc + 1
      if outcome == 1 then hf = hf + 1 end
      if tonumber(ARGV[p + 2]) == 1 then hs = hs + 1 end
      if hc >= homin then
        if hf / hc >= frt or hs / hc >= srt then go(1) else go(0) end
      end
    end
    dirty = true
  end
elseif op == 'transition' then
  local es = tonumber(ARGV[p]); local eg = tonumber(ARGV[p + 1])
  if (es < 0 or es == st) and (eg < 0 or eg == gen) then
    if ARGV[p + 3] == '1' then att = 0 end
    go(tonumber(ARGV[p + 2]))
    granted = 1
  end
end
if dirty then
  redis.call('HSET', H, 'st', st, 'gen', gen, 'att', att, 'ou', ou, 'he', he, 'hi', hi, 'hc', hc, 'hf', hf, 'hs', hs)
end
redis.call('PEXPIRE', H, %d)
local left = -1
if st == 1 then left = ou - now end
return {st, gen, att, left, calls, fails, slow, granted, hi}
""" % STATE_TTL_MS


class _Script:
    __slots__ = ("name", "src", "sha", "shab")

    def __init__(self, name: str, src: str) -> None:
        self.name = name
        self.src = src
        self.sha = hashlib.sha1(src.encode()).hexdigest()
        self.shab = self.sha.encode()


SCRIPTS = {name: _Script(name, src) for name, src in (
    ("gcra_claim", GCRA_CLAIM), ("gcra_peek", GCRA_PEEK), ("gcra_refund", GCRA_REFUND),
    ("gcra_many", GCRA_MANY), ("window", WINDOW), ("window_unclaim", WINDOW_UNCLAIM),
    ("lease_acquire", LEASE_ACQUIRE), ("lease_release", LEASE_RELEASE), ("lease_renew", LEASE_RENEW),
    ("lease_count", LEASE_COUNT), ("bind", BIND), ("breaker", BREAKER))}


# ----------------------------------------------------------------------------------------------------
# RESP packing: the static head of each object's command is packed once; a decision appends its few
# variable arguments. Commands go out over redis-py's own connections (pool, parser, TLS, auth).

def _b(a: object) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode("utf-8")
    if isinstance(a, float):
        return repr(a).encode()
    return str(int(a)).encode()   # type: ignore[call-overload]


def _bulk(a: object) -> bytes:
    x = _b(a)
    return b"$%d\r\n%s\r\n" % (len(x), x)


class _Cmd:
    """EVALSHA <sha> <numkeys> <keys...> <static args...> | <variable args...>"""

    __slots__ = ("head", "argc", "script")

    def __init__(self, script: str, keys: Iterable[object], args: Iterable[object] = ()) -> None:
        s = SCRIPTS[script]
        keys, args = list(keys), list(args)
        self.script = s
        self.head = b"".join(_bulk(a) for a in [b"EVALSHA", s.shab, len(keys), *keys, *args])
        self.argc = 3 + len(keys) + len(args)

    def __call__(self, *args: object) -> bytes:
        return b"*%d\r\n" % (self.argc + len(args)) + self.head + b"".join(_bulk(a) for a in args)


def _pack(*args: object) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def _redis() -> Any:
    try:
        import redis
    except ImportError as exc:   # pragma: no cover - exercised in an environment without redis-py
        raise ImportError("buttress.RedisStore needs redis-py: pip install 'buttress[redis]' "
                          f"(or pip install 'redis>=5') ({exc})") from exc
    return redis


# ----------------------------------------------------------------------------------------------------
# events and metrics

@dataclass(frozen=True)
class StoreEvent:
    """What ``store.on("store_error", callback)`` listeners receive."""
    kind: str                    # "store_error"
    store: str                   # the store's URL (password masked)
    operation: str               # the script or command that failed
    exception: BaseException
    policy: str                  # the on_error policy that decided instead


@dataclass(frozen=True)
class StoreMetrics:
    """Counters of one RedisStore in this process since it was created."""
    round_trips: int             # store calls that reached the server and answered
    errors: int                  # failed or timed-out store calls (each one a store_error event)
    fallbacks: int               # decisions taken by the on_error policy (store down or its breaker open)
    breaker_state: str           # the store's own breaker: CLOSED, OPEN, HALF_OPEN


@dataclass(frozen=True)
class BreakerView:
    """The cluster breaker's shared state as this process last saw it."""
    state: int                   # buttress.State value
    generation: int
    attempt: int
    open_left_ns: int            # OPEN: ns until a probe is allowed (-1 otherwise)
    calls: int                   # the time window's counts (-1: not read by this call)
    failures: int
    slow_calls: int
    half_open_issued: int
    seen_ns: int                 # time.monotonic_ns() of the read


_INITIAL_VIEW = BreakerView(0, 0, 0, -1, 0, 0, 0, 0, 0)


# ----------------------------------------------------------------------------------------------------

def _mask(url: str) -> str:
    p = urlsplit(url)
    if p.password is None:
        return url
    netloc = p.netloc.rsplit("@", 1)
    user = p.username or ""
    return urlunsplit((p.scheme, f"{user}:***@{netloc[1]}", p.path, p.query, p.fragment))


_url_lock = threading.Lock()
_url_stores: dict[tuple[int, str], "RedisStore"] = {}


class RedisStore(Store):
    """Cluster-wide state on Redis / Valkey. See the module docstring and docs/redis.md.

    ``client``: a ``redis.Redis`` or ``redis.asyncio.Redis`` (its connection settings are used with a pool
    of this store's own, so that ``timeout`` holds and redis-py's retries never multiply it), or None with
    ``url=``. ``prefix`` comes first in every key, literally. ``on_error``: "local" (default), "open" or
    "closed". ``timeout``: seconds per store call (default 5 ms). ``connect_timeout``: seconds to set up a
    connection, once per thread or event loop (default 1 s, at least ``timeout``). ``sync_interval``: seconds between two
    flushes of a cluster breaker's local counts (and reads of its state). ``lease``: seconds a bulkhead
    permit lives on the server unless renewed (renewed every lease / 3 while held).
    """

    scheme = "redis"

    def __init__(self, client: Any = None, *, url: str | None = None, prefix: str = DEFAULT_PREFIX,
                 on_error: str = "local", timeout: float = DEFAULT_TIMEOUT, sync_interval: float = 0.1,
                 lease: float = 30.0, probe: float = BREAKER_PROBE,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r} ({type(prefix).__name__})")
        if len(prefix.encode("utf-8")) > 64 or not prefix.isprintable():
            raise ValueError(f"prefix must be a printable str of at most 64 bytes, got {prefix!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of 'local', 'open', 'closed', got {on_error!r}")
        self.timeout = check_float("timeout", timeout, minimum=0.0, min_inclusive=False, maximum=60.0)
        self.connect_timeout = check_float("connect_timeout", connect_timeout, minimum=0.0, min_inclusive=False,
                                           maximum=60.0)
        self.sync_interval = check_float("sync_interval", sync_interval, minimum=0.001, maximum=60.0)
        self.lease = check_float("lease", lease, minimum=0.01, maximum=86400.0)
        self.probe = check_float("probe", probe, minimum=0.001, maximum=1.0)
        self.prefix = prefix
        self.on_error = on_error
        self._pid = os.getpid()
        self._sync_pool: Any = None
        self._async_kwargs: dict[str, Any] | None = None
        self._async_pool_class: Any = None
        self._async_pools: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
        self._async_pipes: "weakref.WeakKeyDictionary[Any, _AsyncPipe]" = weakref.WeakKeyDictionary()
        self._sync_only_async = False
        if client is None and url is None:
            raise TypeError("RedisStore needs client= (a redis.Redis or redis.asyncio.Redis) or url=")
        if client is not None and url is not None:
            raise TypeError("RedisStore takes client= or url=, not both")
        if url is not None:
            self._init_url(url)
        else:
            self._init_client(client)
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._listeners: list[Callable[[StoreEvent], Any]] = []
        self._n_trips = self._n_errors = self._n_fallbacks = 0
        self._down_until = 0               # monotonic ns: the store's breaker is open until then
        self._loaded = False
        self._breaker = self._make_breaker()
        self._bg_objects: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._bg_thread: threading.Thread | None = None
        self._bg_tasks: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
        self._bg_stop = threading.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._seq = itertools.count(1)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisStore":
        """A store for a URL (one per URL and process: every object on it shares one store breaker).
        Query parameters prefix, on_error, timeout, sync_interval, lease are the store's; the rest go to
        redis-py. valkey:// and valkeys:// are redis:// and rediss://."""
        if kwargs:
            return cls(url=url, **kwargs)
        with _url_lock:
            key = (os.getpid(), url)
            store = _url_stores.get(key)
            if store is None:
                store = _url_stores[key] = cls(url=url)
            return store

    def _init_url(self, url: str) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {url!r} ({type(url).__name__})")
        parts = urlsplit(url)
        scheme = SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise ValueError(f"store URL {url!r}: scheme must be redis, rediss, valkey or valkeys")
        rest = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "prefix":
                self.prefix = value
            elif key == "on_error":
                if value not in ON_ERROR:
                    raise ValueError(f"store URL {url!r}: on_error must be one of 'local', 'open', 'closed', "
                                     f"got {value!r}")
                self.on_error = value
            elif key in ("timeout", "connect_timeout", "sync_interval", "lease", "probe"):
                try:
                    f = float(value)
                except ValueError:
                    raise ValueError(f"store URL {url!r}: {key} must be a number of seconds, got {value!r}") from None
                lo, hi = {"timeout": (1e-6, 60.0), "connect_timeout": (1e-6, 60.0), "sync_interval": (0.001, 60.0), "lease": (0.01, 86400.0),
                          "probe": (0.001, 1.0)}[key]
                setattr(self, key, check_float(key, f, minimum=lo, maximum=hi))
            else:
                rest.append((key, value))
        self._url = url
        redis_url = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
        self._redis_url = redis_url
        redis = _redis()
        pool = redis.ConnectionPool.from_url(redis_url, **self._conn_overrides())
        self._sync_pool = pool
        self._async_kwargs = {"url": redis_url}

    def _conn_overrides(self) -> dict[str, Any]:
        redis = _redis()
        from redis.backoff import NoBackoff
        # a new connection is set up (connect and handshake) on the connect timeout; _ready() then gives it
        # the per-call timeout before its first decision
        setup = max(self.timeout, self.connect_timeout)
        return {"socket_timeout": setup, "socket_connect_timeout": setup,
                "retry": redis.retry.Retry(NoBackoff(), 0), "health_check_interval": 0}

    def _init_client(self, client: Any) -> None:
        redis = _redis()
        import redis.asyncio as aredis
        pool = getattr(client, "connection_pool", None)
        if pool is None or not hasattr(pool, "connection_kwargs"):
            raise TypeError(f"client must be a redis.Redis or redis.asyncio.Redis, got {client!r}")
        kw = dict(pool.connection_kwargs)
        kw.update(self._conn_overrides())
        host = kw.get("host", "localhost")
        path = kw.get("path")
        db = kw.get("db", 0)
        self._url = f"unix://{path}?db={db}" if path else f"redis://{host}:{kw.get('port', 6379)}/{db}"
        if isinstance(client, aredis.Redis):
            from redis.asyncio.retry import Retry as ARetry
            from redis.backoff import NoBackoff
            kw["retry"] = ARetry(NoBackoff(), 0)
            self._async_kwargs = {"kwargs": kw, "connection_class": pool.connection_class}
            self._sync_only_async = True
        else:
            self._sync_pool = redis.ConnectionPool(connection_class=pool.connection_class,
                                                   max_connections=pool.max_connections, **kw)
            self._async_kwargs = None

    def _make_breaker(self) -> Any:
        from ..circuit_breaker import CircuitBreaker
        return CircuitBreaker(name=f"store {self.url}", window="count", window_size=BREAKER_FAILURES,
                              minimum_calls=BREAKER_FAILURES, failure_rate_threshold=1.0,
                              slow_call_duration=None, open_duration=self.probe, half_open_calls=1)

    # -- Store interface ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"RedisStore({_mask(self._url)!r}, prefix={self.prefix!r}, on_error={self.on_error!r})"

    def key(self, kind: str, name: str, sub: bytes | str | None = None) -> bytes:
        """``<prefix>{<kind>:<name>}[:<sub>]``."""
        k = f"{self.prefix}{{{kind}:{name}}}".encode("utf-8")
        if sub is None:
            return k
        return k + b":" + _b(sub)

    def close(self) -> None:
        """Stop the background thread (breaker syncs, lease renewals), give back held leases, close
        the pools."""
        self._bg_stop.set()
        for obj in list(self._bg_objects):
            release_all = getattr(obj, "_release_all", None)
            if release_all is not None:
                try:
                    release_all()
                except Exception:  # noqa: BLE001 - best effort on close
                    pass
        if self._sync_pool is not None:
            self._sync_pool.disconnect()
        with _url_lock:
            for k, v in list(_url_stores.items()):
                if v is self:
                    del _url_stores[k]

    # -- events -------------------------------------------------------------------------------------
    def on(self, event: str, callback: Callable[[StoreEvent], Any]) -> Callable[[StoreEvent], Any]:
        """``store.on("store_error", callback)``: called with a StoreEvent for each failed store call."""
        if event != "store_error":
            raise ValueError(f"event must be 'store_error', got {event!r}")
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        self._listeners.append(callback)
        return callback

    def off(self, event: str, callback: Callable[[StoreEvent], Any]) -> None:
        try:
            self._listeners.remove(callback)
        except ValueError:
            raise ValueError(f"callback {callback!r} is not listening to {event!r}") from None

    def metrics(self) -> StoreMetrics:
        return StoreMetrics(self._n_trips, self._n_errors, self._n_fallbacks, self._breaker.state.name)

    @property
    def available(self) -> bool:
        """Whether the store's breaker lets calls through now (False: decisions are the policy's)."""
        return time.monotonic_ns() >= self._down_until and self._breaker.state.name != "OPEN"

    def retry_after_ns(self) -> int:
        """For on_error="closed": ns until the store's breaker probes again (at least 1 ms)."""
        return max(1_000_000, self._down_until - time.monotonic_ns())

    def _is_down(self) -> bool:
        """True (and one fallback counted) while the store's breaker is known to be open: the caller
        decides by its policy without building a command."""
        if self._down_until and time.monotonic_ns() < self._down_until:
            self._n_fallbacks += 1
            return True
        return False

    def _error(self, operation: str, exc: BaseException) -> None:
        self._n_errors += 1
        if self._breaker.state.name == "OPEN":
            self._down_until = time.monotonic_ns() + int(self.probe * NS)
        if self._listeners:
            event = StoreEvent("store_error", _mask(self._url), operation, exc, self.on_error)
            for cb in list(self._listeners):
                try:
                    cb(event)
                except Exception:  # noqa: BLE001 - a listener never breaks the decision
                    log.exception("redis store %s: store_error listener %r failed", _mask(self._url), cb)
        log.debug("redis store %s: %s failed: %r", _mask(self._url), operation, exc)

    # -- one guarded round trip -------------------------------------------------------------------------
    def _exec(self, parts: list[bytes], op: str) -> list[Any] | None:
        """Send `parts` (packed commands) in one round trip through the store's breaker; the replies, or
        None when the store is down (the error is recorded; the caller applies the policy)."""
        if self._sync_pool is None:
            self._pool()                             # TypeError: a sync call on an asyncio-only store
        if self._down_until and time.monotonic_ns() < self._down_until:
            self._n_fallbacks += 1
            return None
        permit = self._breaker.try_acquire()
        if permit is None:
            self._n_fallbacks += 1
            return None
        try:
            replies = self._roundtrip(parts)
        except Exception as exc:   # noqa: BLE001 - no client exception ever reaches the caller
            permit.failure(exc)
            self._n_fallbacks += 1
            self._error(op, exc)
            return None
        permit.success()
        self._down_until = 0
        self._n_trips += 1
        return replies

    def _pool(self) -> Any:
        if self._sync_pool is None:
            raise TypeError(f"{self!r} was given a redis.asyncio client: use the *_async methods "
                            f"(or give the store a redis.Redis or a url=)")
        return self._sync_pool

    def _roundtrip(self, parts: list[bytes]) -> list[Any]:
        # one connection per thread, taken from the pool once and kept (the pool's get/release cost
        # ~6 us a call); given back to the pool, disconnected, on any error
        tl = self._tls
        conn = getattr(tl, "conn", None)
        pool = self._pool()
        if conn is None or tl.pid != os.getpid():
            conn = pool.get_connection()            # connected on the connect timeout, before deciding
            self._ready(conn)
            tl.conn, tl.pid = conn, os.getpid()
        try:
            replies = _send_read(conn, parts)
            if replies is None:                     # NOSCRIPT: the server lost its scripts (restart, flush)
                _send_read(conn, [_pack(b"SCRIPT", b"LOAD", s.src) for s in SCRIPTS.values()], load=True)
                replies = _send_read(conn, parts)
                if replies is None:
                    raise _redis().exceptions.NoScriptError("NOSCRIPT after SCRIPT LOAD")
        except BaseException:
            tl.conn = None
            try:
                conn.disconnect()
            finally:
                self._unready(conn)
                pool.release(conn)
            raise
        return replies

    def _ready(self, conn: Any) -> None:
        """A connection just set up gets the per-call timeout for its decisions."""
        conn.socket_timeout = self.timeout
        sock = getattr(conn, "_sock", None)
        if sock is not None and hasattr(sock, "settimeout"):
            sock.settimeout(self.timeout)

    def _unready(self, conn: Any) -> None:
        """Back to the pool: its next setup runs on the connect timeout again."""
        conn.socket_timeout = max(self.timeout, self.connect_timeout)

    async def _exec_async(self, parts: list[bytes], op: str) -> list[Any] | None:
        if self._down_until and time.monotonic_ns() < self._down_until:
            self._n_fallbacks += 1
            return None
        permit = self._breaker.try_acquire()
        if permit is None:
            self._n_fallbacks += 1
            return None
        try:
            if self._async_kwargs is None:          # a sync client: one blocking call of at most `timeout`
                replies = self._roundtrip(parts)
            else:
                replies = await self._roundtrip_async(parts)
        except Exception as exc:   # noqa: BLE001
            permit.failure(exc)
            self._n_fallbacks += 1
            self._error(op, exc)
            return None
        except asyncio.CancelledError:
            permit.release()
            raise
        permit.success()
        self._down_until = 0
        self._n_trips += 1
        return replies

    def _apool(self) -> Any:
        loop = asyncio.get_running_loop()
        pool = self._async_pools.get(loop)
        if pool is None:
            import redis.asyncio as aredis
            a = self._async_kwargs
            assert a is not None
            if "url" in a:
                from redis.asyncio.retry import Retry as ARetry
                from redis.backoff import NoBackoff
                kw = self._conn_overrides()
                kw["retry"] = ARetry(NoBackoff(), 0)
                pool = aredis.ConnectionPool.from_url(a["url"], **kw)
            else:
                pool = aredis.ConnectionPool(connection_class=a["connection_class"], **a["kwargs"])
            self._async_pools[loop] = pool
        return pool

    async def _roundtrip_async(self, parts: list[bytes]) -> list[Any]:
        loop = asyncio.get_running_loop()
        pipe = self._async_pipes.get(loop)
        if pipe is None:
            pipe = self._async_pipes[loop] = _AsyncPipe(self._apool(), self)
        return await pipe.call(parts)

    # -- objects ------------------------------------------------------------------------------------
    def gcra(self, name: str, rate: float, capacity: int, kind: str = "token_bucket",
             clock_ns: Callable[[], int] | None = None) -> "RedisGCRA":
        """A shared GCRA answering like ``_core.gcra.GCRA`` (TokenBucket; LeakyBucket is capacity 1 with
        kind="leaky_bucket")."""
        return RedisGCRA(self, kind, name, rate, capacity, clock_ns)

    def keyed(self, name: str, rate: float, capacity: int, max_keys: int = 1_000_000, idle_ns: int = 0,
              kind: str = "keyed_limiter", clock_ns: Callable[[], int] | None = None) -> "RedisKeyed":
        """A shared per-key GCRA answering like ``_core.keyed.KeyedGCRA``."""
        return RedisKeyed(self, kind, name, rate, capacity, max_keys, idle_ns, clock_ns)

    def window(self, name: str, limit: int, window_ns: int, sliding: bool, kind: str | None = None,
               clock_ns: Callable[[], int] | None = None) -> "RedisWindow":
        """A shared fixed (sliding=False) or sliding-window counter."""
        kind = kind or ("sliding_window" if sliding else "fixed_window")
        return RedisWindow(self, kind, name, limit, window_ns, sliding, clock_ns)

    def permits(self, kind: str, name: str, max_permits: int, lease: float | None = None) -> "RedisPermits":
        """Shared permits with leases, answering like ``_core.permits.Permits`` (Bulkhead, LoadShedder)."""
        return RedisPermits(self, kind, name, max_permits, self.lease if lease is None else lease)

    def breaker(self, name: str, conf: Any, on_change: Callable[[BreakerView, BreakerView], Any] | None = None,
                kind: str = "circuit_breaker") -> "RedisBreaker":
        """The shared state of a cluster CircuitBreaker (time window); ``conf`` is a BreakerConf."""
        return RedisBreaker(self, kind, name, conf, on_change)

    # -- background: breaker syncs and lease renewals -----------------------------------------------------
    def _register_bg(self, obj: Any) -> None:
        self._bg_objects.add(obj)
        if self._sync_pool is not None:
            with self._lock:
                if self._bg_thread is None or not self._bg_thread.is_alive() or self._pid != os.getpid():
                    self._pid = os.getpid()
                    self._bg_stop = threading.Event()
                    t = threading.Thread(target=self._bg_run, name=f"buttress-redis {_mask(self._url)}",
                                         daemon=True)
                    self._bg_thread = t
                    t.start()

    def _ensure_bg_async(self) -> None:
        if self._sync_pool is not None:
            return
        loop = asyncio.get_running_loop()
        task = self._bg_tasks.get(loop)
        if task is None or task.done():
            self._bg_tasks[loop] = loop.create_task(self._bg_run_async())

    def _bg_interval(self) -> float:
        iv = self.sync_interval
        for obj in list(self._bg_objects):
            iv = min(iv, obj._bg_every())
        return iv

    def _bg_tick_parts(self) -> tuple[list[bytes], list[tuple[Any, int]]]:
        parts: list[bytes] = []
        owners: list[tuple[Any, int]] = []
        now = time.monotonic_ns()
        for obj in list(self._bg_objects):
            p = obj._bg_parts(now)
            if p:
                owners.append((obj, len(p)))
                parts.extend(p)
        return parts, owners

    def _bg_done(self, replies: list[Any] | None, owners: list[tuple[Any, int]]) -> None:
        i = 0
        for obj, n in owners:
            try:
                obj._bg_done(None if replies is None else replies[i:i + n])
            except Exception:  # noqa: BLE001 - a background step never dies
                log.exception("redis store %s: background step of %r failed", _mask(self._url), obj)
            i += n

    def _bg_run(self) -> None:
        stop = self._bg_stop
        while not stop.wait(self._bg_interval()):
            if not self._bg_objects:
                continue
            parts, owners = self._bg_tick_parts()
            if parts:
                self._bg_done(self._exec(parts, "background"), owners)

    async def _bg_run_async(self) -> None:
        while not self._bg_stop.is_set():
            await asyncio.sleep(self._bg_interval())
            parts, owners = self._bg_tick_parts()
            if parts:
                self._bg_done(await self._exec_async(parts, "background"), owners)


class _AsyncPipe:
    """One connection per event loop with automatic pipelining: a decision that finds the connection
    idle makes its round trip at once; decisions arriving meanwhile (other tasks) are queued and sent
    together in the next write, so N concurrent tasks share round trips instead of queueing for pool
    connections. Each decision still costs at most one round trip."""

    def __init__(self, pool: Any, store: "RedisStore") -> None:
        self.pool = pool
        self.store = store
        self.conn: Any = None
        self.pending: list[tuple[list[bytes], Any]] = []
        self.busy = False

    async def _trip(self, parts: list[bytes]) -> list[Any]:
        if self.conn is None:
            conn = await self.pool.get_connection()     # connected on the connect timeout, before deciding
            self.store._ready(conn)
            self.conn = conn
        conn = self.conn
        try:
            replies = await _send_read_async(conn, parts)
            if replies is None:
                await _send_read_async(conn, [_pack(b"SCRIPT", b"LOAD", s.src) for s in SCRIPTS.values()], load=True)
                replies = await _send_read_async(conn, parts)
                if replies is None:
                    raise _redis().exceptions.NoScriptError("NOSCRIPT after SCRIPT LOAD")
        except BaseException:
            self.conn = None
            try:
                await conn.disconnect()
            finally:
                self.store._unready(conn)
                await self.pool.release(conn)
            raise
        return replies

    async def call(self, parts: list[bytes]) -> list[Any]:
        if self.busy:
            fut = asyncio.get_running_loop().create_future()
            self.pending.append((parts, fut))
            return await fut                          # type: ignore[no-any-return]
        self.busy = True
        try:
            return await self._trip(parts)
        finally:
            if self.pending:
                asyncio.get_running_loop().create_task(self._drain())
            else:
                self.busy = False

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                batch = [(p, f) for p, f in batch if not f.done()]
                if not batch:
                    continue
                try:
                    replies = await self._trip([x for p, _ in batch for x in p])
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter of the batch
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc if isinstance(exc, Exception) else ConnectionError(repr(exc)))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                i = 0
                for p, f in batch:
                    if not f.done():
                        f.set_result(replies[i:i + len(p)])
                    i += len(p)
        finally:
            if self.pending:                          # still busy: the next drain owns the connection
                asyncio.get_running_loop().create_task(self._drain())
            else:
                self.busy = False


def _check_replies(replies: list[Any], load: bool) -> list[Any] | None:
    redis = _redis()
    noscript = False
    for r in replies:
        if isinstance(r, redis.exceptions.NoScriptError):
            noscript = True
        elif isinstance(r, Exception):
            raise r
    return None if noscript and not load else replies


def _send_read(conn: Any, parts: list[bytes], load: bool = False) -> list[Any] | None:
    """Send packed commands at once, read every reply; None if a script was missing (NOSCRIPT)."""
    redis = _redis()
    conn.send_packed_command([b"".join(parts)], check_health=False)
    replies = []
    err = redis.exceptions.ResponseError
    for _ in parts:
        try:
            replies.append(conn.read_response())
        except err as exc:     # an error reply: the connection stays in step
            replies.append(exc)
    return _check_replies(replies, load)


async def _send_read_async(conn: Any, parts: list[bytes], load: bool = False) -> list[Any] | None:
    redis = _redis()
    await conn.send_packed_command([b"".join(parts)], check_health=False)
    replies = []
    err = redis.exceptions.ResponseError
    for _ in parts:
        try:
            replies.append(await conn.read_response())
        except err as exc:
            replies.append(exc)
    return _check_replies(replies, load)


# ----------------------------------------------------------------------------------------------------

class _Obj:
    """What every store object shares: its key, its settings record (checked on the first round trip
    and refreshed every REBIND_INTERVAL), the policy."""

    _store: RedisStore

    def _setup(self, store: RedisStore, kind: str, name: str, settings: dict[str, object]) -> None:
        if not isinstance(store, RedisStore):
            raise TypeError(f"store must be a RedisStore, got {store!r}")
        check_kind(kind)
        check_name(name, "name")
        self._store = store
        self.kind = kind
        self.name = name
        self._key = store.key(kind, name)
        self._settings = canonical_settings(settings)
        self._bind_cmd = _Cmd("bind", [store.key(kind, name, "settings")])(self._settings, SETTINGS_TTL)
        self._bind_due = 0.0
        self._policy = store.on_error
        self._lock = threading.Lock()

    def _with_bind(self, parts: list[bytes]) -> tuple[list[bytes], bool]:
        if time.monotonic() < self._bind_due:
            return parts, False
        return [self._bind_cmd, *parts], True

    def _unbind(self, replies: list[Any]) -> list[Any]:
        have = replies[0]
        if have != 1:
            self._bind_due = 0.0
            raise settings_mismatch(_mask(self._store.url), self.kind, self.name,
                                    have.decode() if isinstance(have, bytes) else str(have), self._settings)
        self._bind_due = time.monotonic() + REBIND_INTERVAL
        return replies[1:]

    def _run(self, parts: list[bytes], op: str) -> list[Any] | None:
        parts, binding = self._with_bind(parts)
        replies = self._store._exec(parts, op)
        if replies is None or not binding:
            return replies
        return self._unbind(replies)

    async def _run_async(self, parts: list[bytes], op: str) -> list[Any] | None:
        parts, binding = self._with_bind(parts)
        replies = await self._store._exec_async(parts, op)
        if replies is None or not binding:
            return replies
        return self._unbind(replies)

    def bind(self) -> bool:
        """Check (or record) this object's settings now; False when the store is down (checked on the
        first round trip that succeeds). ValueError naming the setting on a mismatch."""
        return self._run([], "bind") is not None

    def __reduce__(self) -> Any:
        raise TypeError(f"cannot pickle or copy {type(self).__name__} objects: share state with store= "
                        f"and name= instead")


def _now_arg(now: object) -> None:
    if now is not None and (isinstance(now, bool) or not isinstance(now, int)):
        raise TypeError(f"now must be an int (ns) or None, got {now!r} ({type(now).__name__})")


def _max_wait(max_wait_ns: object) -> int:
    if max_wait_ns is None:
        return MAX_WAIT_NS
    if isinstance(max_wait_ns, bool) or not isinstance(max_wait_ns, int):
        raise TypeError(f"max_wait_ns must be an int (ns) or None, got {max_wait_ns!r}")
    if max_wait_ns < 0:
        raise ValueError(f"max_wait_ns must be >= 0 (or None for no limit), got {max_wait_ns!r}")
    return min(max_wait_ns, MAX_WAIT_NS)


class _RReceipt(tuple[Any, ...]):
    """A claim decided on the server: (tat text, n)."""
    __slots__ = ()


class RedisGCRA(_Obj):
    """GCRA on the server: answers like ``_core.gcra.GCRA``. ``now`` is accepted for the same signature
    and used only by the local twin (on_error="local"); the server decides with its own TIME. Receipts
    are opaque objects (hand them back to refund())."""

    def __init__(self, store: RedisStore, kind: str, name: str, rate: float, capacity: int,
                 clock_ns: Callable[[], int] | None = None) -> None:
        r, cap, interval = emission_interval_ns(rate, capacity)
        if interval * cap > MAX_TAU_NS:
            raise ValueError(f"capacity / rate must be at most {MAX_TAU_NS / NS / 86400:.0f} days in a Redis store "
                             f"(exact integer ns in the server's Lua), got capacity={capacity!r} at rate={rate!r}")
        self._setup(store, kind, name, {"rate": r, "capacity": cap})
        self.rate, self.capacity, self.interval_ns = r, cap, interval
        self._tau = interval * cap
        self._clock_ns = clock_ns
        self._claim_cmd = _Cmd("gcra_claim", [self._key], [interval, self._tau])
        self._peek = _Cmd("gcra_peek", [self._key])()
        self._refund_cmd = _Cmd("gcra_refund", [self._key])
        self._local_core: Any = None
        self._admitted = self._rejected = 0

    @property
    def local(self) -> Any:
        """The process-local twin that decides while the store is down (on_error="local")."""
        if self._local_core is None:
            with self._lock:
                if self._local_core is None:
                    self._local_core = _impl.core("gcra").GCRA(self.rate, self.capacity, self._clock_ns)
        return self._local_core

    # claim: (wait, receipt, need); wait -1: refused, need = ns until it would fit
    def _done(self, r: list[Any] | None, k: int, now: object, mw: int) -> tuple[int, Any, int]:
        if r is None:
            return self._fallback(k, now, mw)
        wait, x = r[0]
        if wait < 0:
            self._rejected += 1
            return -1, None, x
        self._admitted += 1
        if self._policy == "local":
            # this process's consumption is carried into the local twin as it happens, so an outage
            # starts from what this process already took, never from a full bucket (it may only be
            # ahead of the server: a refused reservation errs towards refusing)
            self.local.claim(k, now, (1 << 63) - 1)     # any wait: always counted
        return wait, _RReceipt((x, k)), 0

    def _fallback(self, k: int, now: object, mw: int) -> tuple[int, Any, int]:
        p = self._policy
        if p == "local":
            loc = self.local
            wait, receipt = loc.claim(k, now, mw)
            if wait < 0:
                self._rejected += 1
                return -1, None, loc.wait_ns(k, now)
            self._admitted += 1
            return wait, receipt, 0
        if p == "open":
            self._admitted += 1
            return 0, None, 0
        self._rejected += 1
        return -1, None, self._store.retry_after_ns()

    def claim_ex(self, n: int = 1, now: int | None = None, max_wait_ns: int | None = None) -> tuple[int, Any, int]:
        """(wait_ns, receipt, 0), or (-1, None, need_ns) when refused: the refusal carries the wait it
        would have needed, so a facade needs no second round trip for retry_after."""
        k = check_n(n, self.capacity)
        _now_arg(now)
        mw = _max_wait(max_wait_ns)
        if self._store._is_down():
            return self._fallback(k, now, mw)
        return self._done(self._run([self._claim_cmd(k, mw)], "gcra_claim"), k, now, mw)

    async def claim_ex_async(self, n: int = 1, now: int | None = None,
                             max_wait_ns: int | None = None) -> tuple[int, Any, int]:
        k = check_n(n, self.capacity)
        _now_arg(now)
        mw = _max_wait(max_wait_ns)
        return self._done(await self._run_async([self._claim_cmd(k, mw)], "gcra_claim"), k, now, mw)

    def try_acquire(self, n: int = 1, now: int | None = None) -> bool:
        return self.claim_ex(n, now, 0)[0] == 0

    async def try_acquire_async(self, n: int = 1, now: int | None = None) -> bool:
        return (await self.claim_ex_async(n, now, 0))[0] == 0

    def reserve(self, n: int = 1, now: int | None = None, max_wait_ns: int | None = None) -> int:
        return self.claim_ex(n, now, max_wait_ns)[0]

    async def reserve_async(self, n: int = 1, now: int | None = None, max_wait_ns: int | None = None) -> int:
        return (await self.claim_ex_async(n, now, max_wait_ns))[0]

    def claim(self, n: int = 1, now: int | None = None, max_wait_ns: int | None = None) -> tuple[int, Any]:
        wait, receipt, _ = self.claim_ex(n, now, max_wait_ns)
        return (-1, 0) if wait < 0 else (wait, receipt)

    async def claim_async(self, n: int = 1, now: int | None = None, max_wait_ns: int | None = None) -> tuple[int, Any]:
        wait, receipt, _ = await self.claim_ex_async(n, now, max_wait_ns)
        return (-1, 0) if wait < 0 else (wait, receipt)

    def _wait_done(self, r: list[Any] | None, k: int, now: object) -> int:
        if r is None:
            p = self._policy
            if p == "local":
                local_wait: int = self.local.wait_ns(k, now)
                return local_wait
            return 0 if p == "open" else self._store.retry_after_ns()
        tat: int = r[0]
        return max(0, tat - (self._tau - k * self.interval_ns))

    def wait_ns(self, n: int = 1, now: int | None = None) -> int:
        k = check_n(n, self.capacity)
        _now_arg(now)
        return self._wait_done(self._run([self._peek], "gcra_peek"), k, now)

    async def wait_ns_async(self, n: int = 1, now: int | None = None) -> int:
        k = check_n(n, self.capacity)
        _now_arg(now)
        return self._wait_done(await self._run_async([self._peek], "gcra_peek"), k, now)

    def _avail_done(self, r: list[Any] | None, now: object) -> int:
        if r is None:
            p = self._policy
            if p == "local":
                local_avail: int = self.local.available(now)
                return local_avail
            return self.capacity if p == "open" else 0
        ahead = r[0]
        return 0 if ahead >= self._tau else (self._tau - ahead) // self.interval_ns

    def available(self, now: int | None = None) -> int:
        _now_arg(now)
        return self._avail_done(self._run([self._peek], "gcra_peek"), now)

    async def available_async(self, now: int | None = None) -> int:
        _now_arg(now)
        return self._avail_done(await self._run_async([self._peek], "gcra_peek"), now)

    def _refund_parts(self, receipt: Any) -> list[bytes] | None:
        if isinstance(receipt, _RReceipt):
            txt, k = receipt
            return [self._refund_cmd(txt, k * self.interval_ns)]
        return None

    def refund(self, receipt: Any) -> bool:
        """Give back the claim of `receipt` if no later claim built on it. A receipt from the local twin
        goes back to the local twin; one from the "open" policy (None) is a no-op."""
        if receipt is None or receipt == 0:
            return False
        parts = self._refund_parts(receipt)
        if parts is None:
            return bool(self.local.refund(receipt))
        r = self._run(parts, "gcra_refund")
        return bool(r and r[0] == 1)

    async def refund_async(self, receipt: Any) -> bool:
        if receipt is None or receipt == 0:
            return False
        parts = self._refund_parts(receipt)
        if parts is None:
            return bool(self.local.refund(receipt))
        r = await self._run_async(parts, "gcra_refund")
        return bool(r and r[0] == 1)

    def counts(self) -> tuple[int, int]:
        """(admitted, rejected) decisions of this process's object (the server keeps no counts)."""
        return self._admitted, self._rejected

    def reset(self) -> None:
        """Full bucket for every process (deletes the key); this process's counts back to zero."""
        self._run([_pack(b"DEL", self._key)], "reset")
        if self._local_core is not None:
            self._local_core.reset()
        self._admitted = self._rejected = 0

    def __repr__(self) -> str:
        return f"RedisGCRA({self.kind}:{self.name!r}, rate={self.rate!r}, capacity={self.capacity!r})"


# -- keyed ---------------------------------------------------------------------------------------------

def _key_bytes(key: object) -> bytes:
    """int / str / bytes -> the key's suffix; str and bytes (and ints) never collide."""
    if type(key) is int:
        if not -(1 << 63) <= key < (1 << 63):
            raise ValueError(f"key must be an int in the int64 range (or a str / bytes), got {key!r}")
        return b"i%d" % key
    if isinstance(key, str):
        return b"s" + key.encode("utf-8")
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, bool) or not hasattr(type(key), "__index__"):
        raise TypeError(f"key must be an int, str or bytes, got {key!r} ({type(key).__name__})")
    return _key_bytes(int(key.__index__()))  # type: ignore[attr-defined]


class RedisKeyed(_Obj):
    """One GCRA per key on the server (a key per client: ``<prefix>{keyed_limiter:<name>}:<key>``, with
    a TTL of its refill time, so idle keys vanish and ``max_keys`` is not needed there). Answers like
    ``_core.keyed.KeyedGCRA``; ``try_acquire_many`` decides a whole batch in one round trip."""

    def __init__(self, store: RedisStore, kind: str, name: str, rate: float, capacity: int,
                 max_keys: int = 1_000_000, idle_ns: int = 0, clock_ns: Callable[[], int] | None = None) -> None:
        r, cap, interval = emission_interval_ns(rate, capacity)
        if interval * cap > MAX_TAU_NS:
            raise ValueError(f"capacity / rate must be at most {MAX_TAU_NS / NS / 86400:.0f} days in a Redis store, "
                             f"got capacity={capacity!r} at rate={rate!r}")
        self.max_keys = check_int("max_keys", max_keys, minimum=1, maximum=1 << 30)
        self.idle_ns = check_int("idle_ns", idle_ns, minimum=0, maximum=1 << 58)
        self._setup(store, kind, name, {"rate": r, "capacity": cap})
        self.rate, self.capacity, self.interval_ns = r, cap, interval
        self._tau = interval * cap
        self._clock_ns = clock_ns
        self._base = self._key + b":"
        self._args = [_bulk(interval), _bulk(self._tau)]
        self._local_core: Any = None
        self._many_tail = _bulk(interval) + _bulk(self._tau)
        self._evalsha = _bulk(b"EVALSHA") + _bulk(SCRIPTS["gcra_claim"].shab) + _bulk(1)
        self._peekhead = _bulk(b"EVALSHA") + _bulk(SCRIPTS["gcra_peek"].shab) + _bulk(1)
        self._manyhead = _bulk(b"EVALSHA") + _bulk(SCRIPTS["gcra_many"].shab)

    @property
    def nslots(self) -> int:
        return 2 * self.max_keys

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def local(self) -> Any:
        if self._local_core is None:
            with self._lock:
                if self._local_core is None:
                    self._local_core = _impl.core("keyed").KeyedGCRA(self.rate, self.capacity, self.max_keys,
                                                                     self.idle_ns, self._clock_ns)
        return self._local_core

    def key_hash(self, key: int | str | bytes) -> int:
        h: int = self.local.key_hash(key)
        return h

    def redis_key(self, key: int | str | bytes) -> bytes:
        return self._base + _key_bytes(key)

    def _cmd(self, key: object, k: int) -> bytes:
        kb = self._base + _key_bytes(key)
        return (b"*8\r\n" + self._evalsha + b"$%d\r\n%s\r\n" % (len(kb), kb) + self._many_tail
                + _bulk(k) + b"$1\r\n0\r\n")

    def _fallback(self, key: object, k: int, now: object) -> bool:
        p = self._policy
        if p == "local":
            return bool(self.local.try_acquire(key, k, now))
        return p == "open"

    def try_acquire(self, key: int | str | bytes, n: int = 1, now: int | None = None) -> bool:
        k = check_n(n, self.capacity)
        if self._store._is_down():
            return self._fallback(key, k, now)
        r = self._run([self._cmd(key, k)], "gcra_claim")
        if r is None:
            return self._fallback(key, k, now)
        status: int = r[0][0]
        if status == 0 and self._policy == "local":
            self.local.try_acquire(key, k, now)     # carried into the local twin (see RedisGCRA._done)
        return status == 0

    async def try_acquire_async(self, key: int | str | bytes, n: int = 1, now: int | None = None) -> bool:
        k = check_n(n, self.capacity)
        r = await self._run_async([self._cmd(key, k)], "gcra_claim")
        if r is None:
            return self._fallback(key, k, now)
        status: int = r[0][0]
        if status == 0 and self._policy == "local":
            self.local.try_acquire(key, k, now)
        return status == 0

    def _many_parts(self, keys: Any, k: int) -> tuple[Any, list[bytes]]:
        import numpy as np
        arr = np.asarray(keys)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"keys must be a 1-d array of int64 keys, got {getattr(arr, 'dtype', type(keys))!r} "
                            f"with shape {getattr(arr, 'shape', None)!r}")
        arr = arr.astype(np.int64, copy=False)
        cost = _bulk(k * self.interval_ns)
        base = self._base
        parts = []
        for start in range(0, len(arr), BATCH):
            chunk = arr[start:start + BATCH].tolist()
            ks = [b"%si%d" % (base, x) for x in chunk]
            parts.append(b"*%d\r\n" % (3 + len(ks) + 3) + self._manyhead + _bulk(len(ks))
                         + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in ks) + self._many_tail + cost)
        return arr, parts

    def _many_done(self, arr: Any, r: list[Any] | None, k: int, now: object) -> Any:
        import numpy as np
        if r is None:
            p = self._policy
            if p == "local":
                return self.local.try_acquire_many(np.ascontiguousarray(arr), k, now)
            return np.full(len(arr), p == "open", dtype=bool)
        out = np.empty(len(arr), dtype=bool)
        i = 0
        for chunk in r:
            out[i:i + len(chunk)] = chunk
            i += len(chunk)
        if self._policy == "local" and out.any():
            self.local.try_acquire_many(np.ascontiguousarray(arr[out]), k, now)    # carried, in order
        return out

    def try_acquire_many(self, keys: Any, n: int = 1, now: int | None = None) -> Any:
        """Decide int64 `keys` in order (duplicates consume in turn): all chunks in ONE round trip."""
        k = check_n(n, self.capacity)
        arr, parts = self._many_parts(keys, k)
        if not parts:
            import numpy as np
            return np.zeros(0, dtype=bool)
        return self._many_done(arr, self._run(parts, "gcra_many"), k, now)

    async def try_acquire_many_async(self, keys: Any, n: int = 1, now: int | None = None) -> Any:
        k = check_n(n, self.capacity)
        arr, parts = self._many_parts(keys, k)
        if not parts:
            import numpy as np
            return np.zeros(0, dtype=bool)
        return self._many_done(arr, await self._run_async(parts, "gcra_many"), k, now)

    def wait_ns(self, key: int | str | bytes, n: int = 1, now: int | None = None) -> int:
        k = check_n(n, self.capacity)
        kb = self._base + _key_bytes(key)
        r = self._run([b"*4\r\n" + self._peekhead + _bulk(kb)], "gcra_peek")
        if r is None:
            p = self._policy
            if p == "local":
                return int(self.local.wait_ns(key, k, now))
            return 0 if p == "open" else self._store.retry_after_ns()
        tat: int = r[0]
        return max(0, tat - (self._tau - k * self.interval_ns))

    def purge(self, now: int | None = None) -> int:
        """Idle keys expire on the server by themselves: nothing to purge (0)."""
        if self._local_core is not None:
            return int(self._local_core.purge(now))
        return 0

    def _scan(self) -> list[bytes]:
        pool = self._store._pool()
        conn = pool.get_connection()
        found: list[bytes] = []
        try:
            cursor = b"0"
            pattern = _glob_escape(self._base) + b"*"
            while True:
                conn.send_command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                cursor, keys = conn.read_response()
                found.extend(k for k in keys if not k.endswith(b"}:settings"))
                if cursor in (b"0", 0):
                    break
        finally:
            pool.release(conn)
        return found

    def __len__(self) -> int:
        """Keys alive on the server (a SCAN: an admin call, not for hot paths; 0 when the store is down)."""
        try:
            return len(self._scan())
        except Exception:  # noqa: BLE001
            return 0

    def reset(self) -> None:
        """Every key back to full, for every process (SCAN + DEL: an admin call)."""
        try:
            keys = self._scan()
            for i in range(0, len(keys), 500):
                self._store._exec([_pack(b"DEL", *keys[i:i + 500])], "reset")
        except Exception as exc:  # noqa: BLE001
            self._store._error("reset", exc)
        if self._local_core is not None:
            self._local_core.reset()


def _glob_escape(b: bytes) -> bytes:
    out = bytearray()
    for c in b:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)


# -- windows -------------------------------------------------------------------------------------------

class _LocalWindow:
    """The process-local twin of a window counter (what decides while the store is down)."""

    def __init__(self, limit: int, w_ns: int, sliding: bool, clock_ns: Callable[[], int] | None) -> None:
        self.limit, self.w, self.sliding = limit, w_ns, sliding
        self._clock = clock_ns or time.monotonic_ns
        self._lock = threading.Lock()
        self._last: int | None = None
        self.idx = self.prev = self.curr = 0

    def _time(self) -> tuple[int, int]:
        t = self._clock()
        if self._last is not None and t < self._last:
            t = self._last
        self._last = t
        idx, e = divmod(t, self.w)
        if idx > self.idx:
            self.prev = self.curr if idx == self.idx + 1 else 0
            self.curr = 0
            self.idx = idx
        return idx, e

    def claim(self, n: int) -> tuple[bool, int, int, int, int]:
        with self._lock:
            idx, e = self._time()
            ok = _fits(self.sliding, self.limit, self.w, self.prev, self.curr, n, e)
            if ok:
                self.curr += n
            return ok, idx, self.prev, self.curr, e

    def peek(self) -> tuple[int, int, int, int]:
        with self._lock:
            idx, e = self._time()
            return idx, self.prev, self.curr, e

    def charge(self, n: int) -> None:
        """Count n the store admitted for this process (what an outage starts from)."""
        with self._lock:
            self._time()
            self.curr += n

    def unclaim(self, idx: int, n: int) -> None:
        with self._lock:
            if idx == self.idx and self.curr >= n:
                self.curr -= n
            elif idx == self.idx - 1 and self.prev >= n:
                self.prev -= n

    def reset(self) -> None:
        with self._lock:
            self.prev = self.curr = 0


def _fits(sliding: bool, limit: int, w: int, prev: int, curr: int, n: int, e: int) -> bool:
    if sliding:
        return prev * (w - e) + (curr + n) * w <= limit * w
    return curr + n <= limit


def _window_wait(sliding: bool, limit: int, w: int, prev: int, curr: int, n: int, e: int) -> int:
    """ns until n fits (the facade's formulas)."""
    if not sliding:
        return 0 if curr + n <= limit else w - e

    def first_fit(prev: int, curr: int) -> int | None:
        room = (limit - curr - n) * w
        if room < 0:
            return None
        if prev == 0:
            return 0
        x = max(0, w - room // prev)
        return x if x < w else None

    f = first_fit(prev, curr)
    if f is not None:
        return max(0, f - e)
    f = first_fit(curr, 0)
    if f is not None:
        return w - e + f
    return 2 * w - e


class RedisWindow(_Obj):
    """A fixed or sliding window counter on the server (one hash per limit: {window index -> count},
    windows aligned to the server's clock). ``claim(n)`` returns a receipt or None (the facades'
    MultiLimiter protocol), ``try_acquire(n)``, ``unclaim(n, receipt)``, ``wait_ns(n)``."""

    def __init__(self, store: RedisStore, kind: str, name: str, limit: int, window_ns: int, sliding: bool,
                 clock_ns: Callable[[], int] | None = None) -> None:
        self.limit = check_int("limit", limit, minimum=1, maximum=1 << 40)
        w = check_int("window_ns", window_ns, minimum=1000, maximum=1 << 52)
        if w % 1000:
            raise ValueError(f"window must be a whole number of microseconds in a Redis store (the server's "
                             f"TIME resolution), got {w} ns")
        self.window_ns = w
        self.sliding = bool(sliding)
        self._setup(store, kind, name, {"limit": self.limit, "window_ns": w, "sliding": self.sliding})
        self._cmd = _Cmd("window", [self._key], [w // 1000, self.limit])
        self._unclaim = _Cmd("window_unclaim", [self._key])
        self._clock_ns = clock_ns
        self._local_w: _LocalWindow | None = None
        self._admitted = self._rejected = 0

    @property
    def local(self) -> _LocalWindow:
        if self._local_w is None:
            with self._lock:
                if self._local_w is None:
                    self._local_w = _LocalWindow(self.limit, self.window_ns, self.sliding, self._clock_ns)
        return self._local_w

    def _parts(self, n: int, claim: bool) -> list[bytes]:
        return [self._cmd(n, b"1" if self.sliding else b"0", b"1" if claim else b"0")]

    def _claim_done(self, r: list[Any] | None, n: int) -> Any:
        if r is None:
            p = self._policy
            if p == "local":
                ok, idx, *_ = self.local.claim(n)
                receipt: Any = ("l", idx) if ok else None
            else:
                receipt = ("o", 0) if p == "open" else None
        else:
            ok, idx = r[0][0], r[0][1]
            receipt = ("r", idx) if ok == 1 else None
            if receipt is not None and self._policy == "local":
                self.local.charge(n)        # carried into the local twin (see RedisGCRA._done)
        if receipt is None:
            self._rejected += 1
        else:
            self._admitted += 1
        return receipt

    def claim(self, n: int = 1) -> Any:
        k = check_n(n, self.limit)
        if self._store._is_down():
            return self._claim_done(None, k)
        return self._claim_done(self._run(self._parts(k, True), "window"), k)

    async def claim_async(self, n: int = 1) -> Any:
        k = check_n(n, self.limit)
        return self._claim_done(await self._run_async(self._parts(k, True), "window"), k)

    def try_acquire(self, n: int = 1, now: int | None = None) -> bool:
        return self.claim(n) is not None

    async def try_acquire_async(self, n: int = 1, now: int | None = None) -> bool:
        return (await self.claim_async(n)) is not None

    def unclaim(self, n: int, receipt: Any) -> None:
        if not receipt:
            return
        where, idx = receipt
        if where == "l":
            self.local.unclaim(idx, n)
        elif where == "r":
            self._run([self._unclaim(idx, n)], "window_unclaim")

    def _wait_done(self, r: list[Any] | None, n: int) -> int:
        if r is None:
            p = self._policy
            if p == "local":
                _, prev, curr, e = self.local.peek()
                return _window_wait(self.sliding, self.limit, self.window_ns, prev, curr, n, e)
            return 0 if p == "open" else self._store.retry_after_ns()
        _, _, prev, curr, e_us = r[0]
        return _window_wait(self.sliding, self.limit, self.window_ns, prev, curr, n, e_us * 1000)

    def wait_ns(self, n: int = 1, now: int | None = None) -> int:
        k = check_n(n, self.limit)
        return self._wait_done(self._run(self._parts(k, False), "window"), k)

    async def wait_ns_async(self, n: int = 1, now: int | None = None) -> int:
        k = check_n(n, self.limit)
        return self._wait_done(await self._run_async(self._parts(k, False), "window"), k)

    def counts(self) -> tuple[int, int]:
        return self._admitted, self._rejected

    def reset(self) -> None:
        self._run([_pack(b"DEL", self._key)], "reset")
        if self._local_w is not None:
            self._local_w.reset()
        self._admitted = self._rejected = 0


# -- permits with leases (Bulkhead, LoadShedder) ---------------------------------------------------------

class RedisPermits(_Obj):
    """Permits on the server: a sorted set of leases {member -> expiry}; a permit of a dead host comes
    back when its lease expires (``lease`` seconds). Held leases are renewed every lease / 3 by the
    store's background thread (or task), so a long call keeps its permit. Answers like
    ``_core.permits.Permits``: try_acquire(n), try_acquire_within(limit, n), release(n), in_use,
    available, max_permits, resize(max)."""

    def __init__(self, store: RedisStore, kind: str, name: str, max_permits: int, lease: float) -> None:
        self._max = check_int("max_permits", max_permits, minimum=1, maximum=1 << 40)
        self.lease = check_float("lease", lease, minimum=0.01, maximum=86400.0)
        self._lease_us = math.ceil(self.lease * 1e6)
        self._setup(store, kind, name, {"max_permits": self._max})
        self._acq = _Cmd("lease_acquire", [self._key])
        self._rel = _Cmd("lease_release", [self._key])
        self._renew = _Cmd("lease_renew", [self._key], [self._lease_us])
        self._count = _Cmd("lease_count", [self._key])()
        self._held: list[tuple[str, Any]] = []     # LIFO of ("r", member) / ("l", None) / ("o", None)
        self._local_p: Any = None
        self.lost = 0                                # leases found expired at renewal or release
        self._renewed_ns = 0

    @property
    def max_permits(self) -> int:
        return self._max

    @property
    def local(self) -> Any:
        if self._local_p is None:
            with self._lock:
                if self._local_p is None:
                    self._local_p = _impl.core("permits").Permits(self._max)
        return self._local_p

    def _members(self, k: int) -> list[bytes]:
        st = self._store
        if st._pid != os.getpid():
            st.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            st._pid = os.getpid()
        return [f"{st.owner}:{next(st._seq)}".encode() for _ in range(k)]

    def _acq_done(self, r: list[Any] | None, members: list[bytes], limit: int, k: int) -> bool:
        entries: list[tuple[str, bytes | None]]
        if r is None:
            p = self._policy
            if p == "local":
                # the permits this process holds on the server count against the local twin too
                with self._lock:
                    on_server = sum(1 for where, _ in self._held if where == "r")
                if not self.local.try_acquire_within(max(0, limit - on_server), k):
                    return False
                entries = [("l", None)] * k
            elif p == "open":
                entries = [("o", None)] * k
            else:
                return False
        else:
            if r[0][0] != 1:
                return False
            entries = [("r", m) for m in members]
        with self._lock:
            self._held.extend(entries)
        return True

    def _check_limit(self, limit: int, n: int) -> tuple[int, int]:
        k = check_int("n", n, minimum=1, maximum=self._max)
        lim = check_int("limit", limit, minimum=0, maximum=1 << 40)
        return min(lim, self._max), k

    def try_acquire_within(self, limit: int, n: int = 1) -> bool:
        lim, k = self._check_limit(limit, n)
        if self._store._is_down():
            return self._acq_done(None, [], lim, k)
        members = self._members(k)
        ok = self._acq_done(self._run([self._acq(lim, self._lease_us, *members)], "lease_acquire"), members, lim, k)
        if ok:
            self._store._register_bg(self)
        return ok

    async def try_acquire_within_async(self, limit: int, n: int = 1) -> bool:
        lim, k = self._check_limit(limit, n)
        members = self._members(k)
        ok = self._acq_done(await self._run_async([self._acq(lim, self._lease_us, *members)], "lease_acquire"),
                            members, lim, k)
        if ok:
            self._store._bg_objects.add(self)
            self._store._ensure_bg_async()
            self._store._register_bg(self)
        return ok

    def try_acquire(self, n: int = 1) -> bool:
        return self.try_acquire_within(self._max, n)

    async def try_acquire_async(self, n: int = 1) -> bool:
        return await self.try_acquire_within_async(self._max, n)

    def _pop(self, n: int) -> tuple[list[bytes], int]:
        k = check_int("n", n, minimum=1, maximum=1 << 40)
        with self._lock:
            if k > len(self._held):
                raise ValueError(f"release(n={k}) but this process holds {len(self._held)} permit(s) of "
                                 f"{self.kind} {self.name!r}")
            taken = self._held[-k:]
            del self._held[-k:]
        members = [m for where, m in taken if where == "r"]
        local = sum(1 for where, _ in taken if where == "l")
        if local:
            self.local.release(local)
        return members, local

    def _rel_done(self, r: list[Any] | None, members: list[bytes]) -> None:
        if r is not None and r[0] < len(members):
            self.lost += len(members) - r[0]

    def release(self, n: int = 1) -> None:
        """Give back n permits held by this process (its newest acquisitions first). If the store is
        down, the leases expire on the server by themselves within `lease`."""
        members, _ = self._pop(n)
        if members:
            self._rel_done(self._run([self._rel(*members)], "lease_release"), members)

    async def release_async(self, n: int = 1) -> None:
        members, _ = self._pop(n)
        if members:
            self._rel_done(await self._run_async([self._rel(*members)], "lease_release"), members)

    def _release_all(self) -> None:
        with self._lock:
            n = len(self._held)
        if n:
            self.release(n)

    @property
    def held(self) -> int:
        """Permits this process holds (on the server and locally)."""
        return len(self._held)

    @property
    def in_use(self) -> int:
        """Leases alive on the server now, over all processes (one round trip); while the store is down,
        the local twin's count."""
        r = self._run([self._count], "lease_count")
        if r is None:
            return self.local.in_use if self._policy == "local" else self.held
        return int(r[0])

    @property
    def available(self) -> int:
        return max(0, self._max - self.in_use)

    def resize(self, max_permits: int) -> None:
        """New maximum for this process's decisions (every process should resize alike; the settings
        record follows the last resize)."""
        self._max = check_int("max_permits", max_permits, minimum=1, maximum=1 << 40)
        self._settings = canonical_settings({"max_permits": self._max})
        self._bind_cmd = _Cmd("bind", [self._store.key(self.kind, self.name, "settings")])(self._settings,
                                                                                            SETTINGS_TTL)
        self._run([_pack(b"DEL", self._store.key(self.kind, self.name, "settings"))], "resize")
        self._bind_due = 0.0
        if self._local_p is not None:
            self._local_p.resize(self._max)

    # background: renew held leases every lease / 3
    def _bg_every(self) -> float:
        return self.lease / 3

    def _bg_parts(self, now: int) -> list[bytes]:
        if now - self._renewed_ns < int(self.lease / 3 * NS) * 0.9:
            return []
        with self._lock:
            members = [m for where, m in self._held if where == "r"]
        if not members:
            return []
        self._renewed_ns = now
        return [self._renew(*members)]

    def _bg_done(self, replies: list[Any] | None) -> None:
        if replies is not None and replies[0]:
            self.lost += int(replies[0])

    def renew(self) -> int:
        """Renew this process's leases now; returns how many were already lost (expired)."""
        with self._lock:
            members = [m for where, m in self._held if where == "r"]
        if not members:
            return 0
        r = self._run([self._renew(*members)], "lease_renew")
        lost = 0 if r is None else int(r[0])
        self.lost += lost
        return lost


# -- cluster circuit breaker -------------------------------------------------------------------------------

class RedisBreaker(_Obj):
    """The shared part of a cluster CircuitBreaker (time window).

    - The state, generation, attempt, open-until and the half-open permits and counts live in one hash;
      every transition is made by the BREAKER script, so it happens once across the fleet.
    - Calls in CLOSED / METRICS_ONLY / DISABLED are admitted locally (no round trip); their outcomes are
      counted locally and flushed into the server's per-second buckets every ``sync_interval`` by the
      store's background thread (one round trip per tick for all breakers of the store), which also reads
      the state back: a state change is seen by every process within ``sync_interval`` (polling; see
      docs/redis.md for why not pub/sub).
    - HALF_OPEN permits and their outcomes are one round trip each (exactly ``half_open_calls`` across the
      fleet).

    ``acquire()`` returns a token >= 0, ``REFUSED`` (-1) or ``LOCAL`` (-2: the store is down and the
    policy is "local": decide on the process-local core). ``record(token, failed, slow, ignored)``.
    """

    def __init__(self, store: RedisStore, kind: str, name: str, conf: Any,
                 on_change: Callable[[BreakerView, BreakerView], Any] | None = None) -> None:
        if not getattr(conf, "time_window", False):
            raise ValueError("a cluster circuit breaker needs window='time' (a count window of the last N calls "
                             "has no meaning across processes)")
        self.conf = conf
        durations = self._durations(conf)
        srt = conf.slow_call_rate_threshold if conf.slow_ns >= 0 else 2.0
        hmw = -1 if conf.half_open_max_wait_ns < 0 else math.ceil(conf.half_open_max_wait_ns / 1000)
        settings = {"failure_rate_threshold": conf.failure_rate_threshold, "slow_call_rate_threshold": srt,
                    "slow_ns": conf.slow_ns, "window_size": conf.window_size, "minimum_calls": conf.minimum_calls,
                    "half_open_calls": conf.half_open_calls, "half_open_max_wait_ns": conf.half_open_max_wait_ns,
                    "open_us": durations}
        self._setup(store, kind, name, settings)
        keys = [self._key, store.key(kind, name, "w")]
        head = [conf.window_size, conf.minimum_calls, repr(conf.failure_rate_threshold), repr(srt),
                conf.half_open_calls, conf.half_open_minimum, hmw, len(durations), *durations]
        self._cmds = {op: _Cmd("breaker", keys, [op, *head]) for op in ("sync", "acquire", "report", "transition")}
        self.view = _INITIAL_VIEW
        self.on_change = on_change
        self._pending = [0, 0, 0]       # calls, failures, slow counted under self.view.generation
        self._pending_gen = 0
        self._flushing: tuple[int, int, int, int] | None = None
        store._register_bg(self)

    @staticmethod
    def _durations(conf: Any) -> list[int]:
        from .._breaker_conf import open_duration_ns
        out = []
        for attempt in range(1, 17):
            out.append(math.ceil(open_duration_ns(conf, attempt, log) / 1000))
            if conf.open_fn is None:
                break
        return out

    def _apply(self, r: list[Any]) -> BreakerView:
        st, gen, att, left, calls, fails, slow, granted, hi = r
        old = self.view
        if calls < 0:
            calls, fails, slow = old.calls, old.failures, old.slow_calls
        new = BreakerView(st, gen, att, -1 if left < 0 else left * 1000, calls, fails, slow, hi, time.monotonic_ns())
        self.view = new
        if (old.state, old.generation) != (st, gen) and self.on_change is not None:
            try:
                self.on_change(old, new)
            except Exception:  # noqa: BLE001
                log.exception("cluster breaker %r: on_change failed", self.name)
        return new

    # admission
    def _local_state(self) -> int:
        """The state this process acts on: the view, with OPEN read as due for a probe once its time
        has passed locally."""
        return self.view.state

    def acquire(self) -> int:
        v = self.view
        st = v.state
        if not self._store.available:
            return self._down()
        if st in (0, 4, 5):
            return v.generation << 1
        if st == 3:
            return REFUSED
        if st == 1 and (v.open_left_ns < 0 or time.monotonic_ns() - v.seen_ns < v.open_left_ns):
            return REFUSED
        r = self._run([self._cmds["acquire"](-1)], "breaker_acquire")
        return self._acquired(r)

    async def acquire_async(self) -> int:
        v = self.view
        st = v.state
        if not self._store.available:
            return self._down()
        self._store._ensure_bg_async()
        if st in (0, 4, 5):
            return v.generation << 1
        if st == 3:
            return REFUSED
        if st == 1 and (v.open_left_ns < 0 or time.monotonic_ns() - v.seen_ns < v.open_left_ns):
            return REFUSED
        r = await self._run_async([self._cmds["acquire"](-1)], "breaker_acquire")
        return self._acquired(r)

    def _down(self) -> int:
        p = self._policy
        return LOCAL if p == "local" else (0 if p == "open" else REFUSED)

    def _acquired(self, r: list[Any] | None) -> int:
        if r is None:
            return self._down()
        v = self._apply(r[0])
        if r[0][7] != 1:
            return REFUSED
        return (v.generation << 1) | (1 if v.state == 2 else 0)

    # outcomes
    def record(self, token: int, failed: bool, slow: bool = False, ignored: bool = False) -> None:
        """The outcome of a call admitted with `token`. CLOSED-state outcomes are counted locally (flushed
        by the next sync); HALF_OPEN outcomes go to the server now (one round trip)."""
        if token < 0:
            return
        gen, half = token >> 1, token & 1
        if half:
            outcome = 2 if ignored else (1 if failed else 0)
            r = self._run([self._cmds["report"](gen, outcome, 1 if slow else 0)], "breaker_report")
            if r is not None:
                self._apply(r[0])
            return
        if ignored:
            return
        with self._lock:
            if gen != self._pending_gen:
                if gen != self.view.generation:
                    return                   # admitted under an older generation: dropped
                self._pending = [0, 0, 0]
                self._pending_gen = gen
            p = self._pending
            p[0] += 1
            if failed:
                p[1] += 1
            if slow:
                p[2] += 1

    async def record_async(self, token: int, failed: bool, slow: bool = False, ignored: bool = False) -> None:
        if token < 0:
            return
        if token & 1:
            outcome = 2 if ignored else (1 if failed else 0)
            r = await self._run_async([self._cmds["report"](token >> 1, outcome, 1 if slow else 0)],
                                      "breaker_report")
            if r is not None:
                self._apply(r[0])
            return
        self.record(token, failed, slow, ignored)

    # sync: flush + read
    def _take_pending(self) -> tuple[int, int, int, int]:
        with self._lock:
            c, f, s = self._pending
            self._pending = [0, 0, 0]
            return self._pending_gen, c, f, s

    def _bg_every(self) -> float:
        return self._store.sync_interval

    def _bg_parts(self, now: int) -> list[bytes]:
        gen, c, f, s = self._take_pending()
        self._flushing = (gen, c, f, s)
        return [self._cmds["sync"](gen, c, f, s)]

    def _bg_done(self, replies: list[Any] | None) -> None:
        flushed = self._flushing
        self._flushing = None
        if replies is None:
            if flushed and flushed[1]:       # the store is down: keep the counts for the next flush
                with self._lock:
                    if self._pending_gen == flushed[0]:
                        p = self._pending
                        p[0] += flushed[1]
                        p[1] += flushed[2]
                        p[2] += flushed[3]
            return
        self._apply(replies[0])

    def sync(self) -> BreakerView:
        """Flush this process's counts and read the shared state now (one round trip)."""
        parts = self._bg_parts(time.monotonic_ns())
        r = self._run(parts, "breaker_sync")
        self._bg_done(r)
        return self.view

    async def sync_async(self) -> BreakerView:
        parts = self._bg_parts(time.monotonic_ns())
        r = await self._run_async(parts, "breaker_sync")
        self._bg_done(r)
        return self.view

    def transition(self, new_state: int, expect_state: int = -1, expect_gen: int = -1,
                   reset: bool = False) -> bool:
        """Move the shared state to `new_state` (a new generation) if it is still (expect_state,
        expect_gen) (-1: any); reset=True also sets the attempt count back. Returns whether it moved."""
        r = self._run([self._cmds["transition"](expect_state, expect_gen, int(new_state), 1 if reset else 0)],
                      "breaker_transition")
        if r is None:
            return False
        self._apply(r[0])
        moved: int = r[0][7]
        return moved == 1

    def __repr__(self) -> str:
        return f"RedisBreaker({self.name!r}, state={self.view.state}, generation={self.view.generation})"
