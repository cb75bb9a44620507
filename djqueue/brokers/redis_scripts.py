"""The Redis broker's Lua scripts: every change to a queue is one atomic script call.

Key layout (``P`` is ``"<namespace>:"``, ``Q`` is ``P .. "q:<queue>:"``):

    P queues            set    every queue name ever enqueued to (for cancel without a queue)
    P heartbeats        zset   consumer id -> last heartbeat (server ms)
    P consumers         hash   consumer id -> queue name
    P c:<consumer id>   zset   that consumer's in-flight tags -> their ready score
    Q ready             zset   tag -> score (-priority * 2^42 + sequence): ZPOPMIN is the next message
    Q delayed           zset   tag -> eta (ms)
    Q prio              hash   tag -> priority, for delayed messages whose priority is not 0
    Q msgs              hash   tag -> payload
    Q ids               hash   message id -> tag of its latest enqueue (cancel)
    Q deliveries        hash   tag -> times delivered
    Q seq               string sequence number: FIFO within a priority, and tag uniqueness
    Q notify            list   wake-up tokens for idle consumers (at most NOTIFY_MAX)
    Q consumers         set    ids of the consumers of this queue (in-flight counts)
    Q dead              zset   dead-lettered tag -> nack time (ms); expires with the TTL
    Q dead_msgs         hash   dead-lettered tag -> payload

A *tag* is ``<message id>#<sequence>``: unique per enqueue, so a retry enqueued under
the same message id while the first delivery is still in flight never shares its payload.

Keys are built inside the scripts from the namespace, so these scripts need a single
Redis primary (not Redis Cluster). Scores and times are formatted with ``%.0f``: Lua's
default number formatting keeps only 14 digits.
"""

from __future__ import annotations

# 2^42: priorities are clamped to +-PRIORITY_LIMIT, so every score stays an exact double.
SCORE_STEP = 4398046511104
PRIORITY_LIMIT = 1000
NOTIFY_MAX = 64
# A message delivered this many times without an ack (the processes holding it died) is
# held alone: a consumer holds at most one such message at a time, so a job that kills
# its process cannot take the same innocent messages down with it again and again until
# MaxDeliveries dead-letters them too. A fetch looks past at most ISOLATE_SCAN of them.
ISOLATE_AFTER = 2
ISOLATE_SCAN = 100
PROMOTE_LIMIT = 1000
SCRIPTS = ("enqueue", "fetch", "ack", "nack", "requeue", "release", "heartbeat", "stats", "cancel", "purge")

PRELUDE = f"""
local P = ARGV[1]
local STEP = {SCORE_STEP}
local function fmt(n) return string.format('%.0f', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function qkey(queue) return P .. 'q:' .. queue .. ':' end
local function score(priority, seq)
  if seq >= STEP then seq = STEP - 1 end
  return fmt(-priority * STEP + seq)
end
local function notify(Q, n)
  local room = {NOTIFY_MAX} - redis.call('LLEN', Q .. 'notify')
  if n > room then n = room end
  for _ = 1, n do redis.call('RPUSH', Q .. 'notify', '1') end
end
-- Drop a message's payload and bookkeeping once it has left the queue for good.
local function forget(Q, tag)
  redis.call('HDEL', Q .. 'msgs', tag)
  redis.call('HDEL', Q .. 'deliveries', tag)
  local mid = string.match(tag, '^(.*)#')
  if mid and mid ~= '' and redis.call('HGET', Q .. 'ids', mid) == tag then
    redis.call('HDEL', Q .. 'ids', mid)
  end
end
-- Only a tag still in this consumer's in-flight set is settled: if the consumer was
-- presumed dead, its messages were already given to another one.
local function ack(Q, inflight, tag)
  if redis.call('ZREM', inflight, tag) == 1 then forget(Q, tag) end
end
-- A message given back without being handed to an actor does not count as delivered.
local function undeliver(Q, tag)
  if redis.call('HINCRBY', Q .. 'deliveries', tag, -1) <= 0 then
    redis.call('HDEL', Q .. 'deliveries', tag)
  end
end
local function requeue_inflight(Q, inflight)
  local held = redis.call('ZRANGE', inflight, 0, -1, 'WITHSCORES')
  for i = 1, #held, 2 do redis.call('ZADD', Q .. 'ready', held[i + 1], held[i]) end
  redis.call('DEL', inflight)
  return #held / 2
end
local function unregister(Q, cid)
  redis.call('ZREM', P .. 'heartbeats', cid)
  redis.call('HDEL', P .. 'consumers', cid)
  redis.call('SREM', Q .. 'consumers', cid)
end
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
end
"""

# ARGV: P, queue, then (message id, payload, priority, eta ms or 0) per message.
ENQUEUE = (
    PRELUDE
    + """
local queue = ARGV[2]
local Q = qkey(queue)
local n = (#ARGV - 2) / 4
redis.call('SADD', P .. 'queues', queue)
local seq = redis.call('INCRBY', Q .. 'seq', n) - n
local now = nil
local ready, delayed = 0, 0
for i = 3, #ARGV, 4 do
  seq = seq + 1
  local mid, priority, eta = ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local tag = mid .. '#' .. fmt(seq)
  redis.call('HSET', Q .. 'msgs', tag, ARGV[i + 1])
  if mid ~= '' then redis.call('HSET', Q .. 'ids', mid, tag) end
  if eta > 0 and now == nil then now = now_ms() end
  if eta > 0 and eta > now then
    redis.call('ZADD', Q .. 'delayed', ARGV[i + 3], tag)
    if priority ~= 0 then redis.call('HSET', Q .. 'prio', tag, ARGV[i + 2]) end
    delayed = delayed + 1
  else
    redis.call('ZADD', Q .. 'ready', score(priority, seq), tag)
    ready = ready + 1
  end
end
-- A new delayed message may be due before what blocked consumers wait for: wake one.
if delayed > 0 and ready == 0 then ready = 1 end
notify(Q, ready)
return n
"""
)

# ARGV: P, queue, consumer id, how many to take, whether the consumer holds a message
# delivered ISOLATE_AFTER times ('1' or '0'), then tags to ack.
# Returns {server now ms, earliest eta or '', {tag, payload, delivery count, ...}}.
FETCH = (
    PRELUDE
    + f"local ISOLATE_AFTER, ISOLATE_SCAN = {ISOLATE_AFTER}, {ISOLATE_SCAN}\n"
    + """
local queue, cid, count = ARGV[2], ARGV[3], tonumber(ARGV[4])
local isolated = ARGV[5] == '1'
local Q = qkey(queue)
local inflight = P .. 'c:' .. cid
local now = now_ms()
if redis.call('ZADD', P .. 'heartbeats', fmt(now), cid) == 1 then
  redis.call('HSET', P .. 'consumers', cid, queue)
  redis.call('SADD', Q .. 'consumers', cid)
end
for i = 6, #ARGV do ack(Q, inflight, ARGV[i]) end
promote(Q, now)
local out = {}
local skipped = 0  -- much-delivered messages left at the head for other consumers
local taken = 0
while taken < count and skipped <= ISOLATE_SCAN do
  local head = redis.call('ZRANGE', Q .. 'ready', skipped, skipped + count - taken - 1, 'WITHSCORES')
  if #head == 0 then break end
  local gone = {}
  for i = 1, #head, 2 do
    local tag = head[i]
    local n = tonumber(redis.call('HGET', Q .. 'deliveries', tag) or '0')
    if n >= ISOLATE_AFTER and isolated then
      skipped = skipped + 1
    else
      gone[#gone + 1] = tag
      local data = redis.call('HGET', Q .. 'msgs', tag)
      if data then
        if n >= ISOLATE_AFTER then isolated = true end
        redis.call('ZADD', inflight, head[i + 1], tag)
        out[#out + 1] = tag
        out[#out + 1] = data
        out[#out + 1] = redis.call('HINCRBY', Q .. 'deliveries', tag, 1)
        taken = taken + 1
      else
        redis.call('HDEL', Q .. 'deliveries', tag)
      end
    end
  end
  if #gone > 0 then redis.call('ZREM', Q .. 'ready', unpack(gone)) end
end
-- Work is left that this consumer did not take: let an idle one know (not for what it
-- skipped, or it would wake itself for ever).
if redis.call('ZCARD', Q .. 'ready') > skipped then notify(Q, 1) end
local first = redis.call('ZRANGE', Q .. 'delayed', 0, 0, 'WITHSCORES')
return {now, first[2] or '', out}
"""
)

# ARGV: P, queue, consumer id, tags to ack.
ACK = (
    PRELUDE
    + """
local Q = qkey(ARGV[2])
local inflight = P .. 'c:' .. ARGV[3]
for i = 4, #ARGV do ack(Q, inflight, ARGV[i]) end
return 1
"""
)

# ARGV: P, queue, consumer id, dead-letter TTL ms, tag. Returns 1 if dead-lettered.
NACK = (
    PRELUDE
    + """
local Q = qkey(ARGV[2])
local inflight = P .. 'c:' .. ARGV[3]
local ttl, tag = tonumber(ARGV[4]), ARGV[5]
if redis.call('ZREM', inflight, tag) == 0 then return 0 end
local now = now_ms()
local data = redis.call('HGET', Q .. 'msgs', tag)
forget(Q, tag)
if data then
  redis.call('ZADD', Q .. 'dead', fmt(now), tag)
  redis.call('HSET', Q .. 'dead_msgs', tag, data)
end
-- Trim what outlived the TTL (bounded work per call), and let the keys expire
-- altogether if no message is dead-lettered for a whole TTL.
local expired = redis.call('ZRANGEBYSCORE', Q .. 'dead', '-inf', fmt(now - ttl), 'LIMIT', 0, 100)
if #expired > 0 then
  redis.call('ZREM', Q .. 'dead', unpack(expired))
  redis.call('HDEL', Q .. 'dead_msgs', unpack(expired))
end
redis.call('PEXPIRE', Q .. 'dead', ttl)
redis.call('PEXPIRE', Q .. 'dead_msgs', ttl)
return 1
"""
)

# A graceful give-back. ARGV: P, queue, consumer id, tags. The delivery is undone: the
# count is there to catch messages whose worker died, not ones handed back on purpose.
REQUEUE = (
    PRELUDE
    + """
local Q = qkey(ARGV[2])
local inflight = P .. 'c:' .. ARGV[3]
local n = 0
for i = 4, #ARGV do
  local tag = ARGV[i]
  local s = redis.call('ZSCORE', inflight, tag)
  if s then
    redis.call('ZREM', inflight, tag)
    redis.call('ZADD', Q .. 'ready', s, tag)
    undeliver(Q, tag)
    n = n + 1
  end
end
notify(Q, n)
return n
"""
)

# Closing a consumer. ARGV: P, queue, consumer id, number of acks, acks, then tags
# never handed out. Everything else still in flight goes back to the queue.
RELEASE = (
    PRELUDE
    + """
local queue, cid, nacks = ARGV[2], ARGV[3], tonumber(ARGV[4])
local Q = qkey(queue)
local inflight = P .. 'c:' .. cid
for i = 5, 4 + nacks do ack(Q, inflight, ARGV[i]) end
for i = 5 + nacks, #ARGV do
  if redis.call('ZSCORE', inflight, ARGV[i]) then undeliver(Q, ARGV[i]) end
end
local n = requeue_inflight(Q, inflight)
unregister(Q, cid)
notify(Q, n)
return n
"""
)

# ARGV: P, heartbeat timeout ms (0: do not recover others), then (consumer id, queue)
# pairs to beat for. Beats first, then gives back the messages of up to 20 consumers
# whose heartbeat is older than the timeout. Returns {re-registered ids, recovered}.
HEARTBEAT = (
    PRELUDE
    + """
local timeout = tonumber(ARGV[2])
local now = now_ms()
local missing = {}
for i = 3, #ARGV, 2 do
  local cid, queue = ARGV[i], ARGV[i + 1]
  if redis.call('ZADD', P .. 'heartbeats', fmt(now), cid) == 1 then
    redis.call('HSET', P .. 'consumers', cid, queue)
    redis.call('SADD', qkey(queue) .. 'consumers', cid)
    missing[#missing + 1] = cid
  end
end
local recovered = 0
if timeout > 0 then
  local dead = redis.call('ZRANGEBYSCORE', P .. 'heartbeats', '-inf', fmt(now - timeout), 'LIMIT', 0, 20)
  for _, cid in ipairs(dead) do
    local queue = redis.call('HGET', P .. 'consumers', cid)
    local inflight = P .. 'c:' .. cid
    if queue then
      local Q = qkey(queue)
      local n = requeue_inflight(Q, inflight)
      notify(Q, n)
      recovered = recovered + n
      unregister(Q, cid)
    else
      redis.call('ZREM', P .. 'heartbeats', cid)
    end
  end
end
return {missing, recovered}
"""
)

# ARGV: P, queue, dead-letter TTL ms. Returns {ready, delayed, in flight, dead}.
STATS = (
    PRELUDE
    + """
local Q = qkey(ARGV[2])
local now = now_ms()
local due = redis.call('ZCOUNT', Q .. 'delayed', '-inf', fmt(now))
local delayed = redis.call('ZCARD', Q .. 'delayed') - due
local ready = redis.call('ZCARD', Q .. 'ready') + due
local inflight = 0
for _, cid in ipairs(redis.call('SMEMBERS', Q .. 'consumers')) do
  inflight = inflight + redis.call('ZCARD', P .. 'c:' .. cid)
end
local dead = redis.call('ZCOUNT', Q .. 'dead', fmt(now - tonumber(ARGV[3])), '+inf')
return {ready, delayed, inflight, dead}
"""
)

# ARGV: P, message id, then queue names (none: every known queue). Returns 1 if removed.
CANCEL = (
    PRELUDE
    + """
local mid = ARGV[2]
local queues = {}
for i = 3, #ARGV do queues[#queues + 1] = ARGV[i] end
if #queues == 0 then queues = redis.call('SMEMBERS', P .. 'queues') end
for _, queue in ipairs(queues) do
  local Q = qkey(queue)
  local tag = redis.call('HGET', Q .. 'ids', mid)
  if tag and (redis.call('ZREM', Q .. 'ready', tag) == 1 or redis.call('ZREM', Q .. 'delayed', tag) == 1) then
    redis.call('HDEL', Q .. 'prio', tag)
    forget(Q, tag)
    return 1
  end
end
return 0
"""
)

# ARGV: P, queue, limit. Drops up to ``limit`` ready/delayed messages; once none are
# left, the dead letters too. Returns how many were dropped (call until 0).
PURGE = (
    PRELUDE
    + """
local Q = qkey(ARGV[2])
local limit = tonumber(ARGV[3])
for _, name in ipairs({'ready', 'delayed'}) do
  local tags = redis.call('ZRANGE', Q .. name, 0, limit - 1)
  if #tags > 0 then
    redis.call('ZREM', Q .. name, unpack(tags))
    if name == 'delayed' then redis.call('HDEL', Q .. 'prio', unpack(tags)) end
    for _, tag in ipairs(tags) do forget(Q, tag) end
    return #tags
  end
end
redis.call('DEL', Q .. 'dead', Q .. 'dead_msgs', Q .. 'notify')
return 0
"""
)
