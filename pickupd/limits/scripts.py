"""The Lua the Redis ledger runs (store.py): the arithmetic of windows.py on the server, with the
server's clock, one script a call, so each is atomic and one round trip.

KEYS are the limits' hashes (bucket -> count, `t` the tail, `s` the sum of the buckets kept)
and the pauses' strings ("<until ms>|<why>"); ARGV the windows' numbers, then the longest
pause pickupd sets (ms): a pause read from the store never holds mail longer than that, then
how far ahead the message's class may book (ms, -1: any).
"""

from __future__ import annotations

__all__ = ["ADD", "LEASE", "PAUSE", "PAUSED", "REFUND", "RESERVE"]

RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nk, np = tonumber(ARGV[1]), tonumber(ARGV[2])
-- No pause is longer than the longest pickupd sets: one in the store that is (or that does
-- not parse) was not written by pickupd, and holds mail no longer than that.
local cap = now + tonumber(ARGV[3 + 4 * nk])
local start, paused, why = now, 0, ''
for i = 1, np do
  local p = redis.call('GET', KEYS[nk + i])
  local sep = p and string.find(p, '|', 1, true)
  local untilms = sep and tonumber(string.sub(p, 1, sep - 1))
  if untilms and math.min(untilms, cap) > start then
    start, paused, why = math.min(untilms, cap), i, string.sub(p, sep + 1)
  end
end
local books, at = {}, start
for i = 1, nk do
  local base = 2 + (i - 1) * 4
  local amount, size = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local span, need = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  if need > amount then return {now, now, i, paused, why} end
  -- `s` is the sum of every bucket kept (the window's and perhaps older ones not dropped
  -- yet): while it leaves room, so does the window, and no bucket needs reading.
  local head = redis.call('HMGET', KEYS[i], 't', 's')
  local tail, sum = tonumber(head[1] or '-1'), tonumber(head[2] or '0')
  local bucket = math.max(math.floor(start / size), tail)
  local counts = nil
  if sum + need > amount then
    local flat = redis.call('HGETALL', KEYS[i])
    counts, sum = {}, 0
    for j = 1, #flat, 2 do
      if flat[j] ~= 't' and flat[j] ~= 's' then
        counts[#counts + 1] = {tonumber(flat[j]), tonumber(flat[j + 1])}
        sum = sum + tonumber(flat[j + 1])
      end
    end
    table.sort(counts, function(a, b) return a[1] < b[1] end)
    while true do
      local low, inside, first = bucket - span, 0, nil
      for _, c in ipairs(counts) do
        if c[1] > low and c[1] <= bucket then
          inside = inside + c[2]
          if first == nil then first = c[1] end
        end
      end
      if inside + need <= amount then break end
      bucket = first + span
    end
  end
  books[i] = {amount, size, span, need, tail, counts, sum}
  if bucket * size > at then at = bucket * size end
end
-- Further ahead than the message's class may book (ARGV after the pause cap; -1: any):
-- nothing is booked, and `at` says when the room is.
local ahead = tonumber(ARGV[4 + 4 * nk])
if ahead >= 0 and at > now + ahead then return {at, now, -1, paused, why} end
local out = {at, now, 0, paused, why}
for i = 1, nk do
  local b = books[i]
  local amount, size, span, need, tail, counts, sum = b[1], b[2], b[3], b[4], b[5], b[6], b[7]
  local bucket = math.floor(at / size)
  redis.call('HINCRBY', KEYS[i], bucket, need)
  if bucket > tail then
    tail = bucket
    redis.call('HSET', KEYS[i], 't', tail)
  end
  if counts ~= nil then
    -- The buckets were read: drop those no window can reach, so `s` is exact again (a span
    -- before now, not before the tail: a turn given back moves the tail back).
    local low = math.min(tail, math.floor(now / size)) - span
    for _, c in ipairs(counts) do
      if c[1] <= low then
        redis.call('HDEL', KEYS[i], c[1])
        sum = sum - c[2]
      end
    end
  end
  sum = sum + need
  redis.call('HSET', KEYS[i], 's', sum)
  redis.call('PEXPIREAT', KEYS[i], (tail + span + 1) * size)
  out[#out + 1] = bucket
  out[#out + 1] = amount - sum
end
return out
"""

REFUND = """
for i = 1, #KEYS do
  local had = tonumber(redis.call('HGET', KEYS[i], ARGV[2 * i - 1]) or '0')
  local back = math.min(had, tonumber(ARGV[2 * i]))
  if back > 0 then
    redis.call('HINCRBY', KEYS[i], 's', -back)
    if had - back > 0 then
      redis.call('HINCRBY', KEYS[i], ARGV[2 * i - 1], -back)
    else
      redis.call('HDEL', KEYS[i], ARGV[2 * i - 1])
      -- The last turn given back: the tail goes back to the last bucket still booked.
      if tonumber(redis.call('HGET', KEYS[i], 't') or '-1') == tonumber(ARGV[2 * i - 1]) then
        local tail = -1
        for _, field in ipairs(redis.call('HKEYS', KEYS[i])) do
          if field ~= 't' and field ~= 's' and tonumber(field) > tail then
            tail = tonumber(field)
          end
        end
        redis.call('HSET', KEYS[i], 't', tail)
      end
    end
  end
end
return 1
"""
ADD = """
for i = 1, #KEYS do
  local bucket, amount, expires = ARGV[3 * i - 2], ARGV[3 * i - 1], tonumber(ARGV[3 * i])
  redis.call('HINCRBY', KEYS[i], bucket, amount)
  redis.call('HINCRBY', KEYS[i], 's', amount)
  local tail = tonumber(redis.call('HGET', KEYS[i], 't') or '-1')
  if tonumber(bucket) > tail then redis.call('HSET', KEYS[i], 't', bucket) end
  if redis.call('PEXPIRETIME', KEYS[i]) < expires then redis.call('PEXPIREAT', KEYS[i], expires) end
end
return 1
"""
PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untilms = now + tonumber(ARGV[1])
local p = redis.call('GET', KEYS[1])
if p then
  local held = tonumber(string.sub(p, 1, string.find(p, '|', 1, true) - 1))
  if held >= untilms then return {held, now} end
end
redis.call('SET', KEYS[1], untilms .. '|' .. ARGV[2], 'PXAT', untilms)
return {untilms, now}
"""
PAUSED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local p = redis.call('GET', KEYS[1])
local sep = p and string.find(p, '|', 1, true)
local untilms = sep and tonumber(string.sub(p, 1, sep - 1))
if not untilms or untilms <= now then return 0 end
return math.min(untilms - now, tonumber(ARGV[1]))
"""
LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not mine and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
