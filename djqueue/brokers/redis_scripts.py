"""The Redis broker's Lua scripts: every change to a queue is one atomic script call.

Key layout (``P`` is ``"<namespace>:"``, ``Q`` is ``P .. "q:<queue>:"``):

    P queues            set    every queue name ever enqueued to (for cancel without a queue)
    P heartbeats        zset   consumer id -> last heartbeat (server ms)
    P consumers         hash   consumer id -> queue name
    P c:<consumer id>   zset   that consumer's in-flight tags -> their ready score
    P cancelled:<id>    string token of the cancel() call that removed it, for a minute:
                               that call, repeated after its reply was lost, returns True
    Q ready             zset   tag -> score (-priority * 2^42 + sequence): ZPOPMIN is the next message
    Q delayed           zset   tag -> eta (ms)
    Q prio              hash   tag -> priority, for delayed messages whose priority is not 0
    Q msgs              hash   tag -> payload
    Q ids               hash   message id -> tag of its latest enqueue (cancel)
    Q deliveries        hash   tag -> deliveries that failed (its consumer died or was closed)
    Q seq               string sequence number: FIFO within a priority, and tag uniqueness
    Q notify            list   wake-up tokens for idle consumers (at most NOTIFY_MAX)
    Q consumers         set    ids of the consumers of this queue (in-flight counts)
    Q dead              zset   dead-lettered tag -> nack time (ms); expires with the TTL
    Q dead_msgs         hash   dead-lettered tag -> payload

A *tag* is ``<message id>#<sequence>``: unique per enqueue, so a retry enqueued under
the same message id while the first delivery is still in flight never shares its payload.

A message's delivery count is one more than its failed deliveries. They are counted
when a consumer that died or was closed gives the message back, not at every fetch, so
that the hot path (fetch, ack) works on whole batches with a constant number of
commands, never one command per message.

Keys are built inside the scripts from the namespace, so these scripts need a single
Redis primary (not Redis Cluster). Scores and times are formatted with ``%.0f``: Lua's
default number formatting keeps only 14 digits.
"""

from __future__ import annotations

from .redis_lua import script

# Priorities are clamped to +-PRIORITY_LIMIT, so that every score (-priority * 2^42
# + sequence) stays below 2^53, an exact double.
PRIORITY_LIMIT = 1000
# A message delivered this many times without an ack (the processes holding it died) is
# held alone: a consumer holds at most one such message at a time, so a job that kills
# its process cannot take the same innocent messages down with it again and again until
# MaxDeliveries dead-letters them too. A fetch looks past at most ISOLATE_SCAN of them.
ISOLATE_AFTER = 2
ISOLATE_SCAN = 100
SCRIPTS = ("enqueue", "fetch", "ack", "nack", "requeue", "release", "heartbeat", "stats", "cancel", "purge")

# ARGV: P, queue, then (message id, payload, priority, eta ms or 0) per message.
ENQUEUE = script(
    "fmt now_ms qkey score notify batch",
    """
local queue = ARGV[2]
local Q = qkey(queue)
local n = (#ARGV - 2) / 4
local seq = redis.call('INCRBY', Q .. 'seq', n) - n
-- A sequence starting from nothing means a queue sent to for the first time (or whose
-- keys were lost): register it for cancel() then, rather than on every send.
if seq == 0 then redis.call('SADD', P .. 'queues', queue) end
local now = nil
-- One command per key for the whole call: most of Redis's time per message was the
-- per-command overhead of three commands each.
local msgs, ids, ready, delayed, prio = {}, {}, {}, {}, {}
for i = 3, #ARGV, 4 do
  seq = seq + 1
  local mid, priority, eta = ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local tag = mid .. '#' .. fmt(seq)
  msgs[#msgs + 1] = tag
  msgs[#msgs + 1] = ARGV[i + 1]
  if mid ~= '' then
    ids[#ids + 1] = mid
    ids[#ids + 1] = tag
  end
  if eta > 0 and now == nil then now = now_ms() end
  if eta > 0 and eta > now then
    delayed[#delayed + 1] = ARGV[i + 3]
    delayed[#delayed + 1] = tag
    if priority ~= 0 then
      prio[#prio + 1] = tag
      prio[#prio + 1] = ARGV[i + 2]
    end
  else
    ready[#ready + 1] = score(priority, seq)
    ready[#ready + 1] = tag
  end
end
batch('HSET', Q .. 'msgs', msgs)
batch('HSET', Q .. 'ids', ids)
batch('ZADD', Q .. 'delayed', delayed)
batch('HSET', Q .. 'prio', prio)
batch('ZADD', Q .. 'ready', ready)
-- A new delayed message may be due before what blocked consumers wait for: wake one.
local woken = #ready / 2
if #delayed > 0 and woken == 0 then woken = 1 end
notify(Q, woken)
return n
""",
)

# ARGV: P, queue, consumer id, how many to take, whether the consumer holds a message
# delivered ISOLATE_AFTER times ('1' or '0'), then tags to ack. Returns {server now ms,
# earliest eta or '', sizes, blob}: for each message taken, ``sizes`` holds its delivery
# count, tag length and payload length (space-separated), and ``blob`` its tag then its
# payload. Four reply elements however many messages: parsing one element per message
# would cost the client more than the rest of the fetch.
FETCH = script(
    "fmt now_ms qkey notify ack promote",
    f"local ISOLATE_AFTER, ISOLATE_SCAN = {ISOLATE_AFTER}, {ISOLATE_SCAN}\n"
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
local acks = {}
for i = 6, #ARGV do acks[#acks + 1] = ARGV[i] end
ack(Q, inflight, acks)
local first = redis.call('ZRANGE', Q .. 'delayed', 0, 0, 'WITHSCORES')
if first[2] and tonumber(first[2]) <= now then
  promote(Q, now)
  first = redis.call('ZRANGE', Q .. 'delayed', 0, 0, 'WITHSCORES')
end
-- Failed deliveries are rare: most of the time there is no count to read or clear.
local any_failed = redis.call('EXISTS', Q .. 'deliveries') == 1
local taken, sizes, blob, held, skipped = 0, {}, {}, {}, {}
while taken < count and #skipped / 2 <= ISOLATE_SCAN do
  local popped = redis.call('ZPOPMIN', Q .. 'ready', count - taken)
  if #popped == 0 then break end
  local tags = {}
  for i = 1, #popped / 2 do tags[i] = popped[2 * i - 1] end
  local stored = batch('HMGET', Q .. 'msgs', tags)
  local failed = any_failed and batch('HMGET', Q .. 'deliveries', tags) or {}
  local lost = {}
  for k, tag in ipairs(tags) do
    local n = tonumber(failed[k]) or 0
    if n >= ISOLATE_AFTER and isolated then
      -- Left for other consumers, at its place (put back below).
      skipped[#skipped + 1] = popped[2 * k]
      skipped[#skipped + 1] = tag
    elseif stored[k] then
      if n >= ISOLATE_AFTER then isolated = true end
      held[#held + 1] = popped[2 * k]
      held[#held + 1] = tag
      taken = taken + 1
      sizes[#sizes + 1] = (n + 1) .. ' ' .. #tag .. ' ' .. #stored[k]
      blob[#blob + 1] = tag
      blob[#blob + 1] = stored[k]
    elseif n > 0 then
      lost[#lost + 1] = tag
    end
  end
  batch('HDEL', Q .. 'deliveries', lost)
end
-- Work is left that this consumer did not take: let an idle one know (not for what it
-- skipped, or it would wake itself for ever).
if redis.call('ZCARD', Q .. 'ready') > 0 then notify(Q, 1) end
batch('ZADD', Q .. 'ready', skipped)
batch('ZADD', inflight, held)
return {now, first[2] or '', table.concat(sizes, ' '), table.concat(blob)}
""",
)

# ARGV: P, queue, consumer id, tags to ack.
ACK = script(
    "qkey ack",
    """
local Q = qkey(ARGV[2])
local inflight = P .. 'c:' .. ARGV[3]
local acks = {}
for i = 4, #ARGV do acks[#acks + 1] = ARGV[i] end
ack(Q, inflight, acks)
return 1
""",
)

# ARGV: P, queue, consumer id, dead-letter TTL ms, tag. Returns 1 if dead-lettered.
NACK = script(
    "fmt now_ms qkey forget",
    """
local Q = qkey(ARGV[2])
local inflight = P .. 'c:' .. ARGV[3]
local ttl, tag = tonumber(ARGV[4]), ARGV[5]
if redis.call('ZREM', inflight, tag) == 0 then return 0 end
local now = now_ms()
local data = redis.call('HGET', Q .. 'msgs', tag)
forget(Q, {tag})
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
""",
)

# A graceful give-back. ARGV: P, queue, consumer id, tags. The delivery does not count as
# failed: the count is there to catch messages whose worker died, not ones handed back
# on purpose.
REQUEUE = script(
    "qkey notify",
    """
local Q = qkey(ARGV[2])
local inflight = P .. 'c:' .. ARGV[3]
local n = 0
for i = 4, #ARGV do
  local tag = ARGV[i]
  local s = redis.call('ZSCORE', inflight, tag)
  if s then
    redis.call('ZREM', inflight, tag)
    redis.call('ZADD', Q .. 'ready', s, tag)
    n = n + 1
  end
end
notify(Q, n)
return n
""",
)

# Closing a consumer. ARGV: P, queue, consumer id, number of acks, acks, then tags
# never handed out, which go back as they were. Everything else still in flight goes
# back as a failed delivery.
RELEASE = script(
    "qkey notify ack requeue_inflight unregister",
    """
local queue, cid, nacks = ARGV[2], ARGV[3], tonumber(ARGV[4])
local Q = qkey(queue)
local inflight = P .. 'c:' .. cid
local acks = {}
for i = 5, 4 + nacks do acks[#acks + 1] = ARGV[i] end
ack(Q, inflight, acks)
local n = 0
for i = 5 + nacks, #ARGV do
  local s = redis.call('ZSCORE', inflight, ARGV[i])
  if s then
    redis.call('ZREM', inflight, ARGV[i])
    redis.call('ZADD', Q .. 'ready', s, ARGV[i])
    n = n + 1
  end
end
n = n + requeue_inflight(Q, inflight)
unregister(Q, cid)
notify(Q, n)
return n
""",
)

# ARGV: P, heartbeat timeout ms (0: do not recover others), then (consumer id, queue)
# pairs to beat for. Beats first, then gives back the messages of up to 20 consumers
# whose heartbeat is older than the timeout. Returns {re-registered ids, recovered}.
HEARTBEAT = script(
    "fmt now_ms qkey notify requeue_inflight unregister",
    """
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
""",
)

# ARGV: P, queue, dead-letter TTL ms. Returns {ready, delayed, in flight, dead}.
STATS = script(
    "fmt now_ms qkey",
    """
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
""",
)

# ARGV: P, message id, then queue names (none: every known queue). Returns 1 if removed.
CANCEL = script(
    "qkey forget",
    """
local mid, token = ARGV[2], ARGV[3]
local marker = P .. 'cancelled:' .. mid
local queues = {}
for i = 4, #ARGV do queues[#queues + 1] = ARGV[i] end
if #queues == 0 then queues = redis.call('SMEMBERS', P .. 'queues') end
for _, queue in ipairs(queues) do
  local Q = qkey(queue)
  local tag = redis.call('HGET', Q .. 'ids', mid)
  if tag and (redis.call('ZREM', Q .. 'ready', tag) == 1 or redis.call('ZREM', Q .. 'delayed', tag) == 1) then
    redis.call('HDEL', Q .. 'prio', tag)
    forget(Q, {tag})
    redis.call('SET', marker, token, 'PX', 60000)
    return 1
  end
end
-- The same call repeated after its reply was lost: it did cancel the message.
if redis.call('GET', marker) == token then return 1 end
return 0
""",
)

# ARGV: P, queue, limit. Drops up to ``limit`` ready/delayed messages; once none are
# left, the dead letters too. Returns how many were dropped (call until 0).
PURGE = script(
    "qkey batch forget",
    """
local Q = qkey(ARGV[2])
local limit = tonumber(ARGV[3])
for _, name in ipairs({'ready', 'delayed'}) do
  local tags = redis.call('ZRANGE', Q .. name, 0, limit - 1)
  if #tags > 0 then
    batch('ZREM', Q .. name, tags)
    if name == 'delayed' then batch('HDEL', Q .. 'prio', tags) end
    forget(Q, tags)
    return #tags
  end
end
redis.call('DEL', Q .. 'dead', Q .. 'dead_msgs', Q .. 'notify')
return 0
""",
)
