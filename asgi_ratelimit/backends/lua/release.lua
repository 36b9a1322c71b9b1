--[[
release.lua: give back a request's concurrency slots, or bar them if its acquire has not run yet.

KEYS[i]     the slots key of claim i (a sorted set, see the concurrency entry of hit.lua).
ARGV[1]     now, in integer microseconds since the epoch, or "" to use the server clock (TIME).
ARGV[2]     the request's slot token.
ARGV[2+i]   the lease of claim i, in microseconds.
Returns     the number of slots given back.

A token that is not there was never taken, has expired, or belongs to an acquire still on its way
(abandoned at the time budget while Redis stalled, it may run later).  It is written as a
tombstone, scored by minus the end of one lease from now, so that the late acquire takes nothing;
the tombstone goes once that lease has passed.  Releasing twice is harmless.
]]

local now = tonumber(ARGV[1])
if now == nil then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local token = ARGV[2]

local released = 0
for i = 1, #KEYS do
  if redis.call('ZREM', KEYS[i], token) == 1 then
    released = released + 1
  else
    local lease = tonumber(ARGV[2 + i])
    redis.call('ZADD', KEYS[i], string.format('%.17g', -(now + lease)), token)
    -- Every slot in the key ends within one lease from now: the TTL outlives them all.
    redis.call('PEXPIRE', KEYS[i], math.max(1, math.ceil(lease / 1000)))
  end
end
return released
