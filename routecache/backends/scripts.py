"""Lua scripts: each keeps one tenant's entry, exact key, tag sets, recency and expiry sets
and the replica sync stream consistent in one atomic step. All keys they touch share the
tenant's hash tag (one Redis Cluster slot); they are derived from the `base` argument."""

from __future__ import annotations

# ARGV[1] = tenant key base, ARGV[2] = sync stream max length, ARGV[3] = origin replica id.
_UNLINK = """
local base = ARGV[1]
local sync_maxlen = ARGV[2]
local origin = ARGV[3]

local function unlink(eid, removed)
  local ekey = base .. 'e:' .. eid
  local data = redis.call('HGETALL', ekey)
  redis.call('ZREM', base .. 'lru', eid)
  redis.call('ZREM', base .. 'exp', eid)
  if #data == 0 then return end
  local f = {}
  for i = 1, #data, 2 do f[data[i]] = data[i + 1] end
  redis.call('DEL', ekey)
  if redis.call('GET', f['xr']) == eid then redis.call('DEL', f['xr']) end
  for _, tag in ipairs(cjson.decode(f['tags'])) do
    redis.call('SREM', base .. 'tag:' .. tag, eid)
  end
  redis.call('XADD', base .. 'sync', 'MAXLEN', '~', sync_maxlen, '*',
             'op', 'del', 'id', eid, 'scope', f['scope'], 'o', origin)
  table.insert(removed, data)
end

local function purge_expired(now, limit, removed)
  local ids = redis.call('ZRANGEBYSCORE', base .. 'exp', '-inf', now, 'LIMIT', 0, limit)
  for _, eid in ipairs(ids) do unlink(eid, removed) end
end

-- The least recently used entries while the tenant is over max_entries, at most `limit`: a
-- bound lowered far below the entries held is reached a batch a call, since one call
-- unlinking all of them blocked Redis for seconds (every replica marked it down).
local function evict_over(max_entries, limit, removed)
  local over = math.min(redis.call('ZCARD', base .. 'lru') - max_entries, limit)
  if over <= 0 then return end
  for _, eid in ipairs(redis.call('ZRANGE', base .. 'lru', 0, over - 1)) do
    unlink(eid, removed)
  end
end
"""

# ARGV[4..]: now, max_entries, evict_batch (the most entries over the bound evicted besides
# the one this entry displaces), grace_ms, id, exact redis key, purge_at (expires_at plus the
# stale grace: until then the entry may still be served stale), scope, ntags,
# tags..., then the entry's hash fields as name/value pairs.
PUT = (
    _UNLINK
    + """
local now = ARGV[4]
local max_entries = tonumber(ARGV[5])
local evict_batch = tonumber(ARGV[6])
local grace_ms = tonumber(ARGV[7])
local eid = ARGV[8]
local xr = ARGV[9]
local purge_at = ARGV[10]
local scope = ARGV[11]
local ntags = tonumber(ARGV[12])
local removed = {}
-- Redis checks memory only at a script's first write, and only if that command may grow it;
-- unlink's ZREM and DEL may not, and a script that has written goes on. This SETRANGE of
-- nothing to a key that does not exist changes nothing, but is checked: out of memory under
-- `noeviction`, the PUT is refused here, before it stored a new entry past `maxmemory`.
redis.call('SETRANGE', base .. 'oom-check', 0, '')
unlink(eid, removed)
local old = redis.call('GET', xr)
if old then unlink(old, removed) end
local ekey = base .. 'e:' .. eid
-- Redis expiry is only a backstop: purge_expired unlinks on time and tells the replicas.
local expire_ms = math.floor(tonumber(purge_at) * 1000) + grace_ms
redis.call('HSET', ekey, unpack(ARGV, 13 + ntags))
redis.call('PEXPIREAT', ekey, expire_ms)
redis.call('SET', xr, eid, 'PXAT', expire_ms)
local now_ms = math.floor(tonumber(now) * 1000)
for i = 1, ntags do
  local tk = base .. 'tag:' .. ARGV[12 + i]
  redis.call('SADD', tk, eid)
  local ttl = redis.call('PTTL', tk)
  if ttl < 0 or now_ms + ttl < expire_ms then redis.call('PEXPIREAT', tk, expire_ms) end
end
redis.call('ZADD', base .. 'lru', now, eid)
redis.call('ZADD', base .. 'exp', purge_at, eid)
redis.call('XADD', base .. 'sync', 'MAXLEN', '~', sync_maxlen, '*',
           'op', 'add', 'id', eid, 'scope', scope, 'o', origin)
purge_expired(now, 64, removed)
evict_over(max_entries, evict_batch + 1, removed)
return removed
"""
)

# ARGV[4..]: entry ids.
DELETE = (
    _UNLINK
    + """
local removed = {}
for i = 4, #ARGV do unlink(ARGV[i], removed) end
return removed
"""
)

# ARGV[4], ARGV[5], ARGV[6]: now, the most entries to unlink in this call, max_entries. Expired
# entries first, then the least recently used over the bound (one lowered since they were
# stored, which puts alone would reach only as fast as new entries come).
PURGE = (
    _UNLINK
    + """
local removed = {}
local limit = tonumber(ARGV[5])
purge_expired(ARGV[4], limit, removed)
evict_over(tonumber(ARGV[6]), limit - #removed, removed)
return #removed
"""
)

# ARGV: base, exact redis key.
GET_EXACT = """
local eid = redis.call('GET', ARGV[2])
if not eid then return false end
return redis.call('HGETALL', ARGV[1] .. 'e:' .. eid)
"""

# ARGV: base, id, now → 1, or 0 when the entry is gone (the hit must not be served), or
# {error} when the entry is there but Redis refused to record the hit. Recency feeds eviction;
# hit counts feed the policy's statistics.
RECORD_HIT = """
local ekey = ARGV[1] .. 'e:' .. ARGV[2]
if redis.call('EXISTS', ekey) == 0 then return 0 end
-- Out of memory under `noeviction`, Redis refuses a script's first write. The entry was read
-- and is still there: it is served, only its hit goes uncounted, so the refusal is answered
-- (not raised, which would fail the lookup: a miss, and a paid model call, for every repeat).
local counted = redis.pcall('HINCRBY', ekey, 'hits', 1)
if type(counted) == 'table' and counted.err then return {counted.err} end
redis.call('HSET', ekey, 'last_hit', ARGV[3])
redis.call('ZADD', ARGV[1] .. 'lru', 'XX', ARGV[3], ARGV[2])
return 1
"""

# ARGV: base, ids... → scope, embedding, expires_at for each id (false where it is gone).
# One call per batch instead of one HMGET each: a rebuild is bound by per-command overhead.
INDEX_ROWS = """
local rows = {}
for i = 2, #ARGV do
  local row = redis.call('HMGET', ARGV[1] .. 'e:' .. ARGV[i], 'scope', 'emb', 'expires')
  rows[#rows + 1] = row[1] or false
  rows[#rows + 1] = row[2] or false
  rows[#rows + 1] = row[3] or false
end
return rows
"""

# KEYS: one tenant's buckets. ARGV: now, mode ('take' or 'debit'), then per bucket its refill
# per second, capacity and amount. 'take' takes every amount or none: it returns {wait, index}
# of the bucket that must refill longest ({'0', 0} when taken). A bucket needs its amount, or
# to be full for an amount over its capacity. 'debit' takes without asking (may go below 0).
TAKE_BUCKETS = """
local now = tonumber(ARGV[1])
local debit = ARGV[2] == 'debit'
local tokens, rates, caps, amounts, stamps = {}, {}, {}, {}, {}
local wait, worst = 0, 0
for i = 1, #KEYS do
  local rate = tonumber(ARGV[3 * i])
  local cap = tonumber(ARGV[3 * i + 1])
  local amount = tonumber(ARGV[3 * i + 2])
  local b = redis.call('HMGET', KEYS[i], 't', 'u')
  local t = tonumber(b[1]) or cap
  local updated = tonumber(b[2]) or now
  t = math.min(cap, t + math.max(0, now - updated) * rate)
  tokens[i], rates[i], caps[i], amounts[i] = t, rate, cap, amount
  -- The refill is counted up to the later of the two times. Stamping `now` when it is
  -- earlier (a replica whose clock is behind) would let the next caller refill again.
  stamps[i] = math.max(updated, now)
  local needed = math.min(amount, cap)
  if not debit and t < needed and (needed - t) / rate > wait then
    wait, worst = (needed - t) / rate, i
  end
end
for i = 1, #KEYS do
  if wait == 0 then tokens[i] = tokens[i] - amounts[i] end
  redis.call('HSET', KEYS[i], 't', string.format('%.17g', tokens[i]),
             'u', string.format('%.17g', stamps[i]))
  local refill_ms = math.ceil((caps[i] - tokens[i]) / rates[i] * 1000)
  redis.call('PEXPIRE', KEYS[i], refill_ms + 1000)
end
return {string.format('%.17g', wait), worst}
"""

# ARGV: tenant key base, now, reservation id, amount, its lifetime in seconds, end user, then
# per cap: its spend key suffix, '1' for a per-user cap, the limit. Drops expired reservations,
# then holds this one only if spent + reserved + amount fits every cap. Returns
# {1, 0, committed...} or {0, the refusing cap's number, its committed amount}. Expiry is
# relative (PEXPIRE), so a replica clock apart from Redis' cannot drop the hash at once.
RESERVE = """
local base, now, rid = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local amount, ttl, user = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local expires = now + ttl
local resv = base .. 'resv'
local held = redis.call('HGETALL', resv)
local tenant_held, user_held = 0, 0
for i = 1, #held, 2 do
  local r = cjson.decode(held[i + 1])
  if r.e <= now then
    redis.call('HDEL', resv, held[i])
  else
    tenant_held = tenant_held + r.a
    if r.u == user then user_held = user_held + r.a end
  end
end
local committed = {}
for i = 7, #ARGV, 3 do
  local spent = tonumber(redis.call('HGET', base .. ARGV[i], 'cost')) or 0
  local reserved = tenant_held
  if ARGV[i + 1] == '1' then reserved = user_held end
  if spent + reserved + amount > tonumber(ARGV[i + 2]) + 1e-12 then
    return {0, (i - 7) / 3 + 1, string.format('%.17g', spent + reserved)}
  end
  committed[#committed + 1] = string.format('%.17g', spent + reserved)
end
redis.call('HSET', resv, rid, cjson.encode({a = amount, u = user, e = expires}))
redis.call('PEXPIRE', resv, math.ceil(ttl * 1000))
return {1, 0, unpack(committed)}
"""

# ARGV: tenant key base, reservation id ('' for none), cost, prompt tokens, completion tokens,
# saved, calls, routing saved, settle id ('' for none), that id's lifetime in seconds, then per
# spend key: its suffix, its lifetime in seconds. Adds the usage to every key and returns, per
# key in the keys' order, its cost before and after this settle, then its cost, prompt tokens,
# completion tokens, saved, calls and routing saved now. A settle id already seen adds nothing:
# the try whose answer was lost had added it. That try's costs before are kept in `settled:<id>`
# (space-separated) and returned again with before + cost: the caller never heard that move,
# and a soft budget the try crossed is crossed for it now, once. An id kept as '1' (before this
# was kept) answers the current costs as both.
SETTLE = """
local base = ARGV[1]
local out = {}
local FIELDS = {'cost', 'prompt_tokens', 'completion_tokens', 'saved', 'calls', 'routing_saved'}
local function report(key, before, after)
  out[#out + 1] = before
  out[#out + 1] = after
  local now = redis.call('HMGET', key, unpack(FIELDS))
  for j = 1, #FIELDS do out[#out + 1] = now[j] or '0' end
end
local settled = base .. 'settled:' .. ARGV[9]
local seen = ARGV[9] ~= '' and redis.call('GET', settled)
if seen then
  local befores = {}
  for cost in string.gmatch(seen, '%S+') do befores[#befores + 1] = cost end
  for i = 11, #ARGV, 2 do
    local key = base .. ARGV[i]
    local before = befores[(i - 9) / 2]
    if seen ~= '1' and before then
      report(key, before, string.format('%.17g', tonumber(before) + tonumber(ARGV[3])))
    else
      local cost = redis.call('HGET', key, 'cost') or '0'
      report(key, cost, cost)
    end
  end
  return out
end
local befores = {}
for i = 11, #ARGV, 2 do
  local key = base .. ARGV[i]
  local before = redis.call('HGET', key, 'cost') or '0'
  local after = redis.call('HINCRBYFLOAT', key, 'cost', ARGV[3])
  redis.call('HINCRBY', key, 'prompt_tokens', ARGV[4])
  redis.call('HINCRBY', key, 'completion_tokens', ARGV[5])
  redis.call('HINCRBYFLOAT', key, 'saved', ARGV[6])
  redis.call('HINCRBY', key, 'calls', ARGV[7])
  redis.call('HINCRBYFLOAT', key, 'routing_saved', ARGV[8])
  redis.call('EXPIRE', key, ARGV[i + 1])
  befores[#befores + 1] = before
  report(key, before, after)
end
-- After the adds: Redis checks memory at a script's first write only if it may grow memory,
-- which HINCRBYFLOAT may and HDEL may not (out of memory, the settle is refused whole).
if ARGV[2] ~= '' then redis.call('HDEL', base .. 'resv', ARGV[2]) end
if ARGV[9] ~= '' then redis.call('SET', settled, table.concat(befores, ' '), 'EX', ARGV[10]) end
return out
"""
