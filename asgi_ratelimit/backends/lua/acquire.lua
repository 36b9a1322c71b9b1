--[[
acquire.lua: take one concurrency slot for a key, unless all of them are in use.

KEYS[1]   the slots key: a sorted set of slot tokens scored by their expiry (us).
ARGV[1]   now, in integer microseconds since the epoch, or "" to use the server clock (TIME).
ARGV[2]   limit: the most slots in use at once.
ARGV[3]   timeout: microseconds after which a slot nobody released (a crashed process) expires.
ARGV[4]   token: this request's unique slot name, used to release it.
Returns   {acquired (1 or 0), slots in use after the call, microseconds until the oldest slot expires}

Slots past their expiry are dropped first, so a crashed process's slots come back on their own.
The key's TTL is the timeout (whole milliseconds, rounded up): it outlives every slot in it.
]]

local now = tonumber(ARGV[1])
if now == nil then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local limit = tonumber(ARGV[2])
local timeout = tonumber(ARGV[3])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now))
local in_use = redis.call('ZCARD', KEYS[1])
if in_use >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return { 0, in_use, tonumber(oldest[2]) - now }
end
redis.call('ZADD', KEYS[1], string.format('%.17g', now + timeout), ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(timeout / 1000)))
return { 1, in_use + 1, 0 }
