"""Lua helpers shared by the Redis broker's scripts (redis_scripts.py), and the function
that puts a script together from the helpers it uses.

Each script defines only the helpers it calls: Lua builds every local function anew on
each call, so unused ones would cost every call for nothing.
"""

from __future__ import annotations

# 2^42: the sequence part of a ready score (see ``score``).
SCORE_STEP = 4398046511104
NOTIFY_MAX = 64
PROMOTE_LIMIT = 1000
# Items per command when a script passes a list (Lua's unpack() takes at most ~8,000).
UNPACK_MAX = 4000

# In definition order: a helper may call only the ones above it.
HELPERS = {
    "fmt": "local function fmt(n) return string.format('%.0f', n) end",
    "now_ms": """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end""",
    "qkey": "local function qkey(queue) return P .. 'q:' .. queue .. ':' end",
    "score": f"""
local function score(priority, seq)
  if seq >= {SCORE_STEP} then seq = {SCORE_STEP - 1} end
  return fmt(-priority * {SCORE_STEP} + seq)
end""",
    "notify": f"""
local function notify(Q, n)
  n = math.min(n, {NOTIFY_MAX} - redis.call('LLEN', Q .. 'notify'))
  if n > 0 then
    local tokens = {{}}
    for i = 1, n do tokens[i] = '1' end
    redis.call('RPUSH', Q .. 'notify', unpack(tokens))
  end
end""",
    "batch": f"""
-- One command over a list, in slices that fit Lua's unpack limit; list replies joined.
local function batch(command, key, items)
  local n = #items
  if n == 0 then return {{}} end
  if n <= {UNPACK_MAX} then return redis.call(command, key, unpack(items)) end
  local out = {{}}
  for i = 1, n, {UNPACK_MAX} do
    local reply = redis.call(command, key, unpack(items, i, math.min(i + {UNPACK_MAX - 1}, n)))
    if type(reply) == 'table' then
      for k = 1, #reply do out[#out + 1] = reply[k] end
    end
  end
  return out
end""",
    "forget": """
-- Drop the payloads and bookkeeping of messages that left the queue for good.
local function forget(Q, tags)
  batch('HDEL', Q .. 'msgs', tags)
  if redis.call('EXISTS', Q .. 'deliveries') == 1 then batch('HDEL', Q .. 'deliveries', tags) end
  local mids, owners = {}, {}
  for _, tag in ipairs(tags) do
    local mid = string.match(tag, '^(.*)#')
    if mid and mid ~= '' then
      mids[#mids + 1] = mid
      owners[#owners + 1] = tag
    end
  end
  local latest = batch('HMGET', Q .. 'ids', mids)
  local done = {}
  for k, mid in ipairs(mids) do
    if latest[k] == owners[k] then done[#done + 1] = mid end
  end
  batch('HDEL', Q .. 'ids', done)
end""",
    "ack": """
-- Only tags still in this consumer's in-flight set are settled: if the consumer was
-- presumed dead, its messages were already given to another one.
local function ack(Q, inflight, tags)
  local scores = batch('ZMSCORE', inflight, tags)
  local held = {}
  for k, tag in ipairs(tags) do
    if scores[k] then held[#held + 1] = tag end
  end
  batch('ZREM', inflight, held)
  forget(Q, held)
end""",
    "requeue_inflight": """
-- Give back everything a consumer that died or was closed still held: each of these
-- deliveries failed.
local function requeue_inflight(Q, inflight)
  local held = redis.call('ZRANGE', inflight, 0, -1, 'WITHSCORES')
  for i = 1, #held, 2 do
    redis.call('ZADD', Q .. 'ready', held[i + 1], held[i])
    redis.call('HINCRBY', Q .. 'deliveries', held[i], 1)
  end
  redis.call('DEL', inflight)
  return #held / 2
end""",
    "unregister": """
local function unregister(Q, cid)
  redis.call('ZREM', P .. 'heartbeats', cid)
  redis.call('HDEL', P .. 'consumers', cid)
  redis.call('SREM', Q .. 'consumers', cid)
end""",
    "promote": f"""
local function promote(Q, now)
  local due = redis.call('ZRANGEBYSCORE', Q .. 'delayed', '-inf', fmt(now), 'LIMIT', 0, {PROMOTE_LIMIT})
  if #due == 0 then return 0 end
  local base = redis.call('INCRBY', Q .. 'seq', #due) - #due
  for i, tag in ipairs(due) do
    local priority = tonumber(redis.call('HGET', Q .. 'prio', tag) or '0')
    redis.call('ZADD', Q .. 'ready', score(priority, base + i), tag)
  end
  redis.call('ZREM', Q .. 'delayed', unpack(due))
  redis.call('HDEL', Q .. 'prio', unpack(due))
  return #due
end""",
}
NEEDS = {"score": ("fmt",), "forget": ("batch",), "ack": ("batch", "forget"), "promote": ("fmt", "score")}


def script(uses: str, body: str) -> str:
    """``body`` after ``P`` (the key prefix, ARGV[1]) and the helpers it ``uses``."""
    wanted: set[str] = set()
    todo = uses.split()
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(NEEDS.get(name, ()))
    helpers = [code.strip() for name, code in HELPERS.items() if name in wanted]
    return "\n".join(["local P = ARGV[1]", *helpers, body.strip(), ""])
