--[[
hit.lua: decide one hit against one or more policies, all or nothing, in one call.

KEYS[i]   the state key of entry i (on a cluster every key of one call shares a hash tag).
ARGV[1]   now, in integer microseconds since the epoch, or "" to use the server clock (TIME).
ARGV[2..] four values per entry i, starting at ARGV[4*(i-1)+2]:
            code   1 token bucket, 2 sliding-window log, 3 GCRA, 4 fixed window,
                   5 sliding-window counter, 6 concurrency slot (asgi_ratelimit/policies.py)
            cost   whole units this hit takes (>= 1)
            p1,p2  the policy's parameters, as policies.py formats them:
                   token bucket    p1 = refill rate (micro-tokens per microsecond), p2 = capacity
                   sliding log     p1 = limit, p2 = window (us)
                   GCRA            p1 = emission interval (us), p2 = burst
                   fixed window    p1 = limit, p2 = window (us)
                   window counter  p1 = limit, p2 = window (us)
                   concurrency     p1 = limit (slots), p2 = lease (us); cost is 1
                   charge ledger   p1 = how long (us) the ledger remembers a charge's token; cost is 1
ARGV[4*#KEYS+2]  the token: this request's name for its slots (a concurrency entry), or for its charge.
ARGV[4*#KEYS+3]  the mode: "" (or absent) a hit; "check" decides every entry and writes nothing;
                 "charge" takes every entry's cost even past its limit (into debt), once per token; a
                 cost below 0 is a refund, down to a full allowance at most (a sliding log keeps all):
                 the last KEY is then the identity's charge ledger (code 7), which remembers the token,
                 so the same charge sent again (a retry after a lost reply) takes nothing more; an
                 empty token is remembered nowhere (for a charge that is never sent twice).
Returns   a flat array, four integers per entry:
            allowed (1 or 0: this policy's own verdict), retry_after (us; -1 = never),
            remaining, reset_after (us); after the hit when every entry allowed, else before it.
            A check answers with the state as it stands; a charge with the state after it, as a
            check of one unit would see it (remaining below 0 is a debt), one entry per state key.

Every entry is decided first, without writing; the writes run only when all entries allow,
so a denied hit consumes from none of its policies, and takes no slot; a slot refused takes
nothing from the rate limits either.  All values stay integers below 2^53,
and numbers are formatted with %.17g where they become strings, so nothing is truncated.
Every written key gets a TTL in whole milliseconds, rounded up, at least 1.
]]

local SCALE = 1000000  -- micro-tokens per token

local function ttl_ms(us)
  local ms = math.ceil(us / 1000)
  if ms < 1 then ms = 1 end
  return ms
end

-- The index of the window holding `now`; corrected so that rounding in the division
-- can never put `now` in the wrong window.
local function window_index(now, window)
  local index = math.floor(now / window)
  if (index + 1) * window <= now then
    index = index + 1
  elseif index * window > now then
    index = index - 1
  end
  return index
end

-- The fewest whole microseconds after which the refill, floor(elapsed * rate), reaches
-- `deficit`.  It is searched on the same double arithmetic the refill uses: ceil(deficit / rate)
-- alone can fall a microsecond short (a retry at retry_after denied again, a key expiring
-- before its bucket is full), or overshoot by one.
local function refill_time(deficit, rate)
  if deficit <= 0 then
    return 0
  end
  local elapsed = math.ceil(deficit / rate)
  while math.floor(elapsed * rate) < deficit do
    elapsed = elapsed + 1
  end
  while elapsed > 0 and math.floor((elapsed - 1) * rate) >= deficit do
    elapsed = elapsed - 1
  end
  return elapsed
end

local function token_bucket(key, now, cost, rate, capacity, force)
  local full = capacity * SCALE
  local state = redis.call('HMGET', key, 't', 'ts')
  local stored = tonumber(state[1])
  local stamp = tonumber(state[2])
  if stored == nil or stamp == nil then
    stored = full
    stamp = now
  end
  local tokens = stored
  if now > stamp then
    tokens = math.min(full, stored + math.floor((now - stamp) * rate))
  end
  local need = cost * SCALE
  local remaining = math.floor(tokens / SCALE)
  -- Waits are counted from the stored stamp, as the refill is, so that they are exact.
  local reset = 0
  if tokens < full then
    reset = stamp + refill_time(full - stored, rate) - now
  end
  if need > full and not force then
    return 0, -1, remaining, reset
  end
  if tokens < need and not force then
    return 0, stamp + refill_time(need - stored, rate) - now, remaining, reset
  end
  local left = tokens - need
  if left > full then
    left = full  -- a refund (a charge below its estimate) fills the bucket no further than full
  end
  local reset_after = refill_time(full - left, rate)
  return 1, 0, remaining, reset, math.floor(left / SCALE), reset_after, function()
    redis.call('HSET', key, 't', string.format('%.17g', left), 'ts', string.format('%.17g', now))
    redis.call('PEXPIRE', key, ttl_ms(reset_after))
  end
end

local function sliding_window(key, now, cost, limit, window, force)
  local oldest_live = string.format('(%.17g', now - window)
  local count = redis.call('ZCOUNT', key, oldest_live, '+inf')
  local reset = 0
  if count > 0 then
    local newest = redis.call('ZREVRANGEBYSCORE', key, '+inf', oldest_live, 'WITHSCORES', 'LIMIT', 0, 1)
    reset = math.max(0, tonumber(newest[2]) + window - now)
  end
  if force and cost > limit then
    -- A charge past the limit: `limit` units at `now` already refuse the key until they expire
    -- together, which more units at the same time would too; the log stays bounded by the limit.
    cost = limit
  elseif force and cost < 0 then
    cost = 0  -- a refund: the log keeps what was spent (which entries to take back is not known)
  end
  if cost > limit then
    return 0, -1, limit - count, reset
  end
  if count + cost > limit and not force then
    -- The hit fits once the (count + cost - limit)-th oldest live entry has expired.
    local nth = redis.call('ZRANGEBYSCORE', key, oldest_live, '+inf', 'WITHSCORES', 'LIMIT', count + cost - limit - 1, 1)
    return 0, math.max(1, tonumber(nth[2]) + window - now), limit - count, reset
  end
  return 1, 0, limit - count, reset, limit - count - cost, window, function()
    redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.17g', now - window))
    -- Each admitted unit needs its own member.  The members of one score are always
    -- "<score>-1" .. "<score>-n" (a score's members are added together and removed together),
    -- so numbering on from how many share this score keeps them unique whatever order the
    -- clocks of several clients run in; the live count alone could repeat a member.
    local score = string.format('%.17g', now)
    local same = redis.call('ZCOUNT', key, score, score)
    local args = {}
    for unit = 1, cost do
      args[#args + 1] = score
      args[#args + 1] = string.format('%s-%d', score, same + unit)
      if #args >= 200 or unit == cost then
        redis.call('ZADD', key, unpack(args))
        args = {}
      end
    end
    redis.call('PEXPIRE', key, ttl_ms(window))
  end
end

local function gcra(key, now, cost, interval, burst, force)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local tolerance = burst * interval
  local available = math.floor((tolerance - (tat - now)) / interval)
  if cost > burst and not force then
    return 0, -1, available, tat - now
  end
  local new_tat = tat + cost * interval
  if new_tat < now then
    new_tat = now  -- a refund gives back no more than a full allowance
  end
  if new_tat - now > tolerance and not force then
    return 0, new_tat - now - tolerance, available, tat - now
  end
  local reset = new_tat - now
  return 1, 0, available, tat - now, math.floor((tolerance - reset) / interval), reset, function()
    redis.call('SET', key, string.format('%.17g', new_tat), 'PX', ttl_ms(reset))
  end
end

local function fixed_window(key, now, cost, limit, window, force)
  local index = window_index(now, window)
  local state = redis.call('HMGET', key, 'w', 'c')
  local count = 0
  if tonumber(state[1]) == index then
    count = tonumber(state[2]) or 0
  end
  local ends = (index + 1) * window - now
  local reset = 0
  if count > 0 then
    reset = ends
  end
  if cost > limit and not force then
    return 0, -1, limit - count, reset
  end
  if count + cost > limit and not force then
    return 0, ends, limit - count, reset
  end
  return 1, 0, limit - count, reset, limit - count - cost, ends, function()
    redis.call('HSET', key, 'w', string.format('%.17g', index), 'c', math.max(0, count + cost))
    redis.call('PEXPIRE', key, ttl_ms(ends))
  end
end

local function window_counter(key, now, cost, limit, window, force)
  local index = window_index(now, window)
  local elapsed = now - index * window
  local state = redis.call('HMGET', key, 'w', 'c', 'p')
  local stored = tonumber(state[1])
  local current, previous = 0, 0
  if stored == index then
    current = tonumber(state[2]) or 0
    previous = tonumber(state[3]) or 0
  elseif stored == index - 1 then
    previous = tonumber(state[2]) or 0
  end
  local weighted = previous * (window - elapsed) / window
  local reset = 0
  if current > 0 then
    reset = 2 * window - elapsed
  elseif previous > 0 then
    reset = window - elapsed
  end
  local remaining = math.max(0, math.floor(limit - weighted - current))
  if cost > limit and not force then
    return 0, -1, remaining, reset
  end
  if weighted + current + cost > limit and not force then
    local spare = limit - current - cost
    local wait
    if spare >= 0 then
      -- The previous window's weight fades enough later in this window.
      wait = math.ceil(window - spare * window / previous - elapsed)
    else
      -- Only the next window can take it, once this window's count has faded enough.
      wait = window - elapsed + math.max(0, math.ceil(window - (limit - cost) * window / current))
    end
    return 0, math.max(1, wait), remaining, reset
  end
  local after = math.max(0, current + cost)  -- a refund takes the count down to 0 at most
  local reset_after = 2 * window - elapsed
  return 1, 0, remaining, reset, math.max(0, math.floor(limit - weighted - after)), reset_after, function()
    redis.call('HSET', key, 'w', string.format('%.17g', index), 'c', after, 'p', previous)
    redis.call('PEXPIRE', key, ttl_ms(reset_after))
  end
end

-- The most a refused slot tells a client to wait (us): a slot frees whenever a request in flight
-- ends, which nobody can predict; the oldest lease's end is only the latest moment.
local SLOT_RETRY = 1000000
local TOKEN = ARGV[4 * #KEYS + 2]

-- A slots key is a sorted set of tokens.  A slot taken is scored by the end of its lease (> 0).
-- A token released before its acquire ran (the request stopped waiting; the acquire was still
-- on its way) is kept as a tombstone scored by minus the end of its lease: the late acquire
-- then takes nothing.  release.lua writes the tombstones.
local function concurrency(key, now, cost, limit, lease)
  redis.call('ZREMRANGEBYSCORE', key, 0, string.format('%.17g', now))
  redis.call('ZREMRANGEBYSCORE', key, string.format('%.17g', -now), '(0')
  local in_use = redis.call('ZCOUNT', key, '(0', '+inf')
  local mine = tonumber(redis.call('ZSCORE', key, TOKEN))
  if mine ~= nil and mine < 0 then
    return 0, SLOT_RETRY, math.max(0, limit - in_use), 0
  end
  if mine ~= nil then
    -- The same call sent again (a retry after a lost connection): the slot is this request's already.
    in_use = in_use - 1
  end
  if in_use >= limit then
    local oldest = redis.call('ZRANGEBYSCORE', key, '(0', '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    return 0, math.max(1, math.min(SLOT_RETRY, tonumber(oldest[2]) - now)), 0, 0
  end
  return 1, 0, limit - in_use, 0, limit - in_use - 1, 0, function()
    redis.call('ZADD', key, string.format('%.17g', now + lease), TOKEN)
    redis.call('PEXPIRE', key, ttl_ms(lease))
  end
end

local ALGORITHMS = { token_bucket, sliding_window, gcra, fixed_window, window_counter, concurrency }

local now = tonumber(ARGV[1])
if now == nil then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local MODE = ARGV[4 * #KEYS + 3]

if MODE == 'charge' then
  local ledger = KEYS[#KEYS]
  local remember = tonumber(ARGV[4 * #KEYS])
  redis.call('ZREMRANGEBYSCORE', ledger, '-inf', string.format('%.17g', now))
  -- A token in the ledger was charged already: this call is a retry, and takes nothing more.
  -- An empty token is remembered nowhere: its charge is never sent twice.
  local fresh = TOKEN == '' or not redis.call('ZSCORE', ledger, TOKEN)
  local results = {}
  for i = 1, #KEYS - 1 do
    local base = 4 * (i - 1) + 1
    local decide = ALGORITHMS[tonumber(ARGV[base + 1])]
    local p1, p2 = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
    if fresh then
      local verdict = { decide(KEYS[i], now, tonumber(ARGV[base + 2]), p1, p2, true) }
      verdict[7]()
    end
    -- What the key's next request of one unit would meet.
    local after = { decide(KEYS[i], now, 1, p1, p2, false) }
    for k = 1, 4 do
      results[#results + 1] = after[k]
    end
  end
  if fresh and TOKEN ~= '' then
    redis.call('ZADD', ledger, string.format('%.17g', now + remember), TOKEN)
    if redis.call('PTTL', ledger) < ttl_ms(remember) then
      redis.call('PEXPIRE', ledger, ttl_ms(remember))
    end
  end
  return results
end

-- Each algorithm returns: allowed, retry_after, remaining and reset_after as they stand before
-- the hit, and, when it allows, remaining and reset_after once the hit is taken, and the write.
local decided = {}
local all_allowed = true
for i = 1, #KEYS do
  local base = 4 * (i - 1) + 1
  local decide = ALGORITHMS[tonumber(ARGV[base + 1])]
  local verdict = { decide(KEYS[i], now, tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])) }
  decided[i] = verdict
  if verdict[1] == 0 or MODE == 'check' then
    all_allowed = false  -- a check writes nothing, and reports every policy as it stands
  end
end

local results = {}
for i = 1, #decided do
  local v = decided[i]
  results[#results + 1] = v[1]
  results[#results + 1] = v[2]
  if all_allowed then
    -- Every entry allowed: take the hit everywhere, and report what is left after it.
    v[7]()
    results[#results + 1] = v[5]
    results[#results + 1] = v[6]
  else
    -- A denied hit consumes nothing: report every policy as it stands.
    results[#results + 1] = v[3]
    results[#results + 1] = v[4]
  end
end
return results
