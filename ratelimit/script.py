"""The Lua script that checks and consumes both buckets of a request in one atomic step."""

from __future__ import annotations

import hashlib

from ratelimit.buckets import BucketLimit
from ratelimit.pipe import bulk, encode_command

# Why each choice:
# - Time comes from Redis (TIME), so every gateway and worker shares one clock.
# - A bucket is a hash {tokens, ts}: its level at ts, in microseconds of Redis time. A missing
#   bucket is full, so a bucket may expire once it would have refilled; nothing is lost.
# - Numbers are written with string.format: Lua's default number-to-string keeps 14 digits,
#   which would round a microsecond timestamp, and Redis truncates Lua numbers in replies to
#   integers, so levels go back as strings too.
# - A refusal writes nothing: the stored level and ts still describe the bucket exactly.
# - TIME before writes needs effects replication (the default since Redis 5, the only mode in 7).
BUCKETS_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local cost = tonumber(ARGV[5])

local function level(key, rate, burst)
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(state[1]), tonumber(state[2])
  if tokens == nil or ts == nil then
    return burst
  end
  -- A clock that went backwards (failover to a lagging replica) refills nothing.
  local elapsed = math.max(now - ts, 0)
  return math.min(burst, tokens + elapsed * rate / 1000000)
end

local function store(key, tokens, rate, burst)
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens),
             'ts', string.format('%d', now))
  local full_in_ms = math.ceil((burst - tokens) / rate * 1000)
  redis.call('PEXPIRE', key, string.format('%d', full_in_ms + 1000))
end

local tenant_rate, tenant_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local key_rate, key_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local tenant_level = level(KEYS[1], tenant_rate, tenant_burst)
local key_level = level(KEYS[2], key_rate, key_burst)
local allowed = 0
if tenant_level >= cost and key_level >= cost then
  allowed = 1
  tenant_level = tenant_level - cost
  key_level = key_level - cost
  store(KEYS[1], tenant_level, tenant_rate, tenant_burst)
  store(KEYS[2], key_level, key_rate, key_burst)
end
return {allowed, string.format('%.17g', tenant_level), string.format('%.17g', key_level)}
"""

BUCKETS_SHA = hashlib.sha1(BUCKETS_LUA.encode()).hexdigest()

# Checks are sent as pre-encoded RESP rather than through redis-py's command packing, which
# encodes every argument in Python and was most of the client's CPU per check. The command is
# EVALSHA sha 2 tenant-key key-key tenant-rate tenant-burst key-rate key-burst cost.
_EVALSHA_HEAD = b"*10\r\n$7\r\nEVALSHA\r\n$40\r\n" + BUCKETS_SHA.encode() + b"\r\n$1\r\n2\r\n"


LOAD_COMMAND = encode_command(b"SCRIPT", b"LOAD", BUCKETS_LUA.encode())


def encode_limits(tenant_limit: BucketLimit, key_limit: BucketLimit, cost: float) -> bytes:
    """The script's ARGV in RESP; the same for every request to one agent, so worth caching."""
    values = (tenant_limit.rate, tenant_limit.burst, key_limit.rate, key_limit.burst, cost)
    # repr of a float reads back exactly (Lua's tonumber parses "1e-06" and "0.1" alike).
    return b"".join(bulk(repr(float(value)).encode()) for value in values)


def encode_call(tenant_key: str, key_key: str, limits: bytes) -> bytes:
    """One EVALSHA of the bucket script in RESP, ready to be written to the socket."""
    return b"".join((_EVALSHA_HEAD, bulk(tenant_key.encode()), bulk(key_key.encode()), limits))


_EVAL_HEAD = b"*10\r\n$4\r\nEVAL\r\n" + bulk(BUCKETS_LUA.encode()) + b"$1\r\n2\r\n"


def encode_eval(tenant_key: str, key_key: str, limits: bytes) -> bytes:
    """The same call as EVAL with the script's text: for a node that may not have loaded it
    (a Redis Cluster node importing a slot, asked once through ASKING)."""
    return b"".join((_EVAL_HEAD, bulk(tenant_key.encode()), bulk(key_key.encode()), limits))
