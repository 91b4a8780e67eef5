"""The ledger's Lua scripts: each move of a request between pending, leased and done is atomic.

Every script gets the same KEYS (see keys.SCRIPT_KEY_NAMES) and ARGV[1] = the job's key
prefix, for the per-lease and per-segment keys (same hash tag, so Cluster-safe).

Times (lease expiry, state changes) are Redis's own clock (TIME), so a client whose clock is
off cannot reap live leases or keep dead ones; a test may pass its own "now" instead.

A request is always in exactly one place: never claimed (index >= cursor), the retry list,
the suspects list, one lease's set, or done (its bit set). The done bit is set once, by whoever commits first;
that commit "wins" the request, and only the winner's record reaches the merged output.
"""

PRELUDE = """
local K_META, K_DONE, K_RETRY, K_LEASES, K_OWNERS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_ATTEMPTS, K_COUNTERS, K_DEAD, K_SEGMENTS, K_PARTIAL = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_SUSPECTS, K_CRASHES, K_SOLO = KEYS[11], KEYS[12], KEYS[13]
local PREFIX = ARGV[1]

-- Seconds since the epoch: the caller's `given` time (tests), or the server's clock ('').
local function clock(given)
  if given ~= nil and given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function max_attempts()
  return tonumber(redis.call('HGET', K_META, 'max_attempts') or '1')
end

local function give_up(i, code)
  redis.call('SETBIT', K_DONE, i, 1)
  redis.call('HSET', K_DEAD, i, code)
  redis.call('HDEL', K_PARTIAL, i)
  redis.call('HINCRBY', K_COUNTERS, 'failed', 1)
  redis.call('HINCRBY', K_COUNTERS, 'dead', 1)
end

-- Unfinished requests go back to pending. A failed attempt (lease expired, nack) counts
-- towards max_attempts; a voluntary release (yield, drain) does not.
local function requeue(indices, failed_attempt)
  local limit = max_attempts()
  local back = 0
  for _, i in ipairs(indices) do
    if redis.call('GETBIT', K_DONE, i) == 0 then
      local dead = false
      if failed_attempt then
        redis.call('HINCRBY', K_COUNTERS, 'failed_attempts', 1)
        if redis.call('HINCRBY', K_ATTEMPTS, i, 1) >= limit then
          give_up(i, 'max_attempts_exceeded')
          dead = true
        end
      end
      if not dead then
        redis.call('RPUSH', K_RETRY, i)
        back = back + 1
      end
    end
  end
  return back
end

-- A crash (the engine died with them in it) ended these requests' attempt.
-- Which of them caused it is unknown, so none is charged an attempt: they become suspects,
-- each retried alone in a lease of its own. A crash that ends such a solo lease is its
-- request's doing; the second one dead-letters it.
local function suspect(indices, solo)
  local back = 0
  for _, i in ipairs(indices) do
    if redis.call('GETBIT', K_DONE, i) == 0 then
      if solo and redis.call('HINCRBY', K_CRASHES, i, 1) >= 2 then
        give_up(i, 'request_crashed_engine')
      else
        redis.call('RPUSH', K_SUSPECTS, i)
        back = back + 1
      end
    end
  end
  return back
end

local function drop_lease(id)
  redis.call('DEL', PREFIX .. 'lease:' .. id)
  redis.call('ZREM', K_LEASES, id)
  redis.call('HDEL', K_OWNERS, id)
  redis.call('SREM', K_SOLO, id)
end

-- A lease that expired: its worker died or lost touch (killed, preempted, an outage), which is
-- rarely its requests' doing. They go back at once, charged nothing; a request whose lease was
-- lost LOST_LEASES times becomes a suspect (retried alone), so one that kills its worker cannot
-- take the others down with it forever. A solo lease that expired is a crash of its request.
local LOST_LEASES = 3
local function lost(indices)
  for _, i in ipairs(indices) do
    if redis.call('GETBIT', K_DONE, i) == 0 then
      if redis.call('HINCRBY', K_CRASHES, 'lost:' .. i, 1) >= LOST_LEASES then
        redis.call('RPUSH', K_SUSPECTS, i)
      else
        redis.call('RPUSH', K_RETRY, i)
      end
    end
  end
end

local function reap(now)
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 256)
  for _, id in ipairs(expired) do
    local members = redis.call('SMEMBERS', PREFIX .. 'lease:' .. id)
    if redis.call('SISMEMBER', K_SOLO, id) == 1 then suspect(members, true) else lost(members) end
    drop_lease(id)
  end
  return #expired
end

local function owned(id, worker)
  return redis.call('HGET', K_OWNERS, id) == worker
end
"""

# ARGV: prefix, worker, max_count, now ('' = server clock), lease seconds, idle ('1': the worker
# holds nothing, so it may take a suspect alone)
# -> {lease_id (0: none), state, indices, failed attempts so far (both packed big-endian
# uint32), solo (1: a suspect, to be run with nothing else beside it)}
CLAIM = (
    PRELUDE
    + """
local state = redis.call('HGET', K_META, 'state') or ''
if state ~= 'in_progress' or redis.call('HGET', K_META, 'closed') == '1' then
  return {0, state, '', '', 0}
end
local now = clock(ARGV[4])
reap(now)
local want = tonumber(ARGV[3])
local picked = {}
local solo = 0
if ARGV[6] == '1' then
  while true do
    local i = redis.call('LPOP', K_SUSPECTS)
    if not i then break end
    if redis.call('GETBIT', K_DONE, i) == 0 then
      picked[1], want, solo = i, 1, 1
      break
    end
  end
end
while #picked < want do
  local batch = redis.call('LPOP', K_RETRY, want - #picked)
  if not batch then break end
  for _, i in ipairs(batch) do
    if redis.call('GETBIT', K_DONE, i) == 0 then picked[#picked + 1] = i end
  end
end
local cursor = tonumber(redis.call('HGET', K_META, 'cursor') or '0')
local total = tonumber(redis.call('HGET', K_META, 'total') or '0')
while #picked < want and cursor < total do
  if redis.call('GETBIT', K_DONE, cursor) == 0 then picked[#picked + 1] = tostring(cursor) end
  cursor = cursor + 1
end
redis.call('HSET', K_META, 'cursor', cursor)
if #picked == 0 then return {0, state, '', '', 0} end
local id = redis.call('HINCRBY', K_META, 'lease_seq', 1)
if solo == 1 then redis.call('SADD', K_SOLO, id) end
local packed_indices, packed_attempts = {}, {}
for s = 1, #picked, 1000 do
  local last = math.min(s + 999, #picked)
  redis.call('SADD', PREFIX .. 'lease:' .. id, unpack(picked, s, last))
  for k, a in ipairs(redis.call('HMGET', K_ATTEMPTS, unpack(picked, s, last))) do
    packed_indices[#packed_indices + 1] = struct.pack('>I4', tonumber(picked[s + k - 1]))
    packed_attempts[#packed_attempts + 1] = struct.pack('>I4', tonumber(a or '0'))
  end
end
redis.call('ZADD', K_LEASES, now + tonumber(ARGV[5]), id)
redis.call('HSET', K_OWNERS, id, ARGV[2])
return {id, state, table.concat(packed_indices), table.concat(packed_attempts), solo}
"""
)

# ARGV: prefix, worker, lease_id, now ('' = server clock), lease seconds -> 1 renewed, 0 lost
RENEW = (
    PRELUDE
    + """
if not owned(ARGV[3], ARGV[2]) then return 0 end
local now = clock(ARGV[4])
local score = redis.call('ZSCORE', K_LEASES, ARGV[3])
if not score or tonumber(score) < now then return 0 end
redis.call('ZADD', K_LEASES, 'XX', now + tonumber(ARGV[5]), ARGV[3])
return 1
"""
)

# ARGV: prefix, worker, lease_id -> requests returned to pending (-1: not our lease)
RELEASE = (
    PRELUDE
    + """
if not owned(ARGV[3], ARGV[2]) then return -1 end
local back = requeue(redis.call('SMEMBERS', PREFIX .. 'lease:' .. ARGV[3]), false)
drop_lease(ARGV[3])
return back
"""
)

# ARGV: prefix, worker, lease_id, how ('1' a failed attempt, '0' not the request's fault,
# 'crash' the engine died with them in it), index... -> requests returned (-1: not our lease)
NACK = (
    PRELUDE
    + """
local lease_key = PREFIX .. 'lease:' .. ARGV[3]
if not owned(ARGV[3], ARGV[2]) then return -1 end
local mine = {}
for k = 5, #ARGV do
  if redis.call('SREM', lease_key, ARGV[k]) == 1 then mine[#mine + 1] = ARGV[k] end
end
if ARGV[4] == 'crash' then return suspect(mine, redis.call('SISMEMBER', K_SOLO, ARGV[3]) == 1) end
return requeue(mine, ARGV[4] == '1')
"""
)

# ARGV: prefix, lease_id ('' for none), segment_id, outcomes: packed big-endian records of
# (index u32, flags u8 (1 failed, 2 resumed), prompt u32, completion u32, cached u32)
# -> {requests won (-1: ledger closed), state}
COMMIT = (
    PRELUDE
    + """
local state = redis.call('HGET', K_META, 'state') or ''
if (state ~= 'validating' and state ~= 'in_progress' and state ~= 'cancelling')
    or redis.call('HGET', K_META, 'closed') == '1' then
  return {-1, state}
end
-- Done requests stay in their lease's set: every requeue skips done requests, and the set
-- goes when the lease is released or reaped. ARGV[2] (the lease) is informational.
local has_partials = redis.call('EXISTS', K_PARTIAL) == 1
local won = {}
local completed, failed, resumed, prompt, completion, cached = 0, 0, 0, 0, 0, 0
local blob = ARGV[4]
for at = 1, #blob, 17 do
  local i, flags, p, c, ca = struct.unpack('>I4BI4I4I4', blob, at)
  if redis.call('SETBIT', K_DONE, i, 1) == 0 then
    won[#won + 1] = struct.pack('>I4', i)
    if flags % 2 == 1 then failed = failed + 1 else completed = completed + 1 end
    if math.floor(flags / 2) % 2 == 1 then resumed = resumed + 1 end
    prompt = prompt + p
    completion = completion + c
    cached = cached + ca
    if has_partials then redis.call('HDEL', K_PARTIAL, i) end
  end
end
if #won > 0 then
  redis.call('APPEND', PREFIX .. 'segwon:' .. ARGV[3], table.concat(won))
  redis.call('RPUSH', K_SEGMENTS, ARGV[3])
  redis.call('HINCRBY', K_COUNTERS, 'completed', completed)
  redis.call('HINCRBY', K_COUNTERS, 'failed', failed)
  redis.call('HINCRBY', K_COUNTERS, 'prompt_tokens', prompt)
  redis.call('HINCRBY', K_COUNTERS, 'completion_tokens', completion)
  redis.call('HINCRBY', K_COUNTERS, 'cached_tokens', cached)
  if resumed > 0 then redis.call('HINCRBY', K_COUNTERS, 'resumed', resumed) end
end
return {#won, state}
"""
)

# ARGV: prefix, now ('' = server clock) -> leases reaped
REAP = (
    PRELUDE
    + """
return reap(clock(ARGV[2]))
"""
)

# ARGV: prefix, target, now ('' = server clock), source... -> {1, target} moved, {0, current} refused
TRANSITION = (
    PRELUDE
    + """
local state = redis.call('HGET', K_META, 'state') or ''
for k = 4, #ARGV do
  if state == ARGV[k] then
    redis.call('HSET', K_META, 'state', ARGV[2], 'at:' .. ARGV[2], clock(ARGV[3]))
    if ARGV[2] == 'finalizing' then redis.call('HSET', K_META, 'closed', '1') end
    return {1, ARGV[2]}
  end
end
return {0, state}
"""
)

# ARGV: prefix, index, value, index, value, ... -> partials written
# A checkpoint can reach Redis after its request's commit (they travel separately); one for a
# done request, or once the ledger is closed, is dropped rather than left behind forever.
SAVE_PARTIALS = (
    PRELUDE
    + """
if redis.call('HGET', K_META, 'closed') == '1' then return 0 end
local written = 0
for k = 2, #ARGV, 2 do
  if redis.call('GETBIT', K_DONE, tonumber(ARGV[k])) == 0 then
    redis.call('HSET', K_PARTIAL, ARGV[k], ARGV[k + 1])
    written = written + 1
  end
end
return written
"""
)

# KEYS: meta, counters, leases of each job in turn -> {meta fields, counter fields, lease count}
# of each: a pool cycle's progress reads in one command (a pipeline of three commands a job cost
# the client five times as much).
# KEYS: meta, counters, leases of each job; ARGV: most fields, most bytes of a hash ->
# {fields, fields, leases} per job. A key of the wrong type or over the bounds answers a string
# saying so (a tenant's pods can write their job's keys: one job's keys must not fail the read of
# every job, nor make the operator hold whatever they were filled with).
PROGRESS_MAX_FIELDS = 256
PROGRESS_MAX_BYTES = 256 << 10
PROGRESS_MANY = """
local most_fields, most_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local function hash(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then return {} end
  if kind ~= 'hash' then return 'a ' .. kind .. ', not a hash' end
  local count = redis.call('HLEN', key)
  if count > most_fields then return count .. ' fields, over ' .. most_fields end
  local fields = redis.call('HKEYS', key)
  local size = 0
  for _, field in ipairs(fields) do
    size = size + #field + redis.call('HSTRLEN', key, field)
    if size > most_bytes then return 'over ' .. most_bytes .. ' bytes' end
  end
  return redis.call('HGETALL', key)
end
local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = hash(KEYS[i])
  out[#out + 1] = hash(KEYS[i + 1])
  local kind = redis.call('TYPE', KEYS[i + 2])['ok']
  if kind == 'zset' or kind == 'none' then
    out[#out + 1] = redis.call('ZCARD', KEYS[i + 2])
  else
    out[#out + 1] = 'a ' .. kind .. ', not a sorted set'
  end
end
return out
"""

# ARGV: prefix -> 1 closed (no result is committed after this returns)
CLOSE = (
    PRELUDE
    + """
redis.call('HSET', K_META, 'closed', '1')
return 1
"""
)

# KEYS: meta; ARGV: field, value, ... -> 1 created, 0 it exists (nothing written)
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: the digest buckets' key prefix; ARGV: bucket, digest, bucket, digest, ... -> one byte
# per digest: 1 new, 0 seen before (the buckets are keys under the job's hash tag).
NEW_CUSTOM_IDS = """
local flags = {}
for k = 1, #ARGV, 2 do
  flags[#flags + 1] = redis.call('HSETNX', KEYS[1] .. ARGV[k], ARGV[k + 1], '') == 1 and '1' or '0'
end
return table.concat(flags)
"""

# KEYS: meta; ARGV: now, why -> 1. The job's ledger holds what no writer of ours writes: the job
# fails whatever its state says (and whatever type its meta key was made), and accepts no result.
CONDEMN = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'state', 'failed', 'closed', '1', 'at:failed', ARGV[1], 'corrupt', ARGV[2])
return 1
"""
