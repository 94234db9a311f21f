"""The queue's Lua scripts: each runs atomically on the server, so a crash between two of
its commands cannot leave a group counted but not queued, or acknowledged but not
forwarded."""

from __future__ import annotations

# KEYS: stream, stats; ARGV: payload, counter ('' for none).
PUBLISH = """
local id = redis.call('XADD', KEYS[1], '*', 'data', ARGV[1])
if ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
return id
"""

# KEYS: source, target, stats; ARGV: consumer group, message id, payload, counter, second
# counter ('' for none). Only the consumer whose acknowledgement succeeds publishes.
FORWARD = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  local id = redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
  if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[5], 1) end
  return id
end
return false
"""

# KEYS: stream, stats; ARGV: consumer group, counter ('' for none), message ids...
ACK = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
if ARGV[2] ~= '' and n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], n) end
return n
"""

# KEYS: stream, dead letters, stats; ARGV: consumer group, message id, reason, source name.
# The payload is copied as is (it may be what could not be decoded); fields are a flat list.
# Only the consumer whose acknowledgement succeeds parks the message, so a retried call (its
# reply lost with the connection) does not park it twice.
DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local payload = ''
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entries > 0 then
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'data' then payload = fields[i + 1] end
  end
end
redis.call('XADD', KEYS[2], '*', 'data', payload, 'source', ARGV[4], 'id', ARGV[2],
           'reason', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'dead', 1)
return 1
"""

# KEYS: dead letters, stats, then the stream of each source name; ARGV: dead-letter id,
# then the source names in the order of their keys. Puts the payload back on the stream it
# came from and removes the dead letter: the group is queued again, no longer dead.
REPLAY = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entries == 0 then return false end
local fields, data, source = entries[1][2], nil, nil
for i = 1, #fields, 2 do
  if fields[i] == 'data' then data = fields[i + 1] end
  if fields[i] == 'source' then source = fields[i + 1] end
end
for i = 2, #ARGV do
  if ARGV[i] == source and data ~= nil then
    local id = redis.call('XADD', KEYS[i + 1], '*', 'data', data)
    redis.call('XDEL', KEYS[1], ARGV[1])
    redis.call('HINCRBY', KEYS[2], 'dead', -1)
    redis.call('HINCRBY', KEYS[2], 'replayed', 1)
    return id
  end
end
return false
"""

# KEYS: stream; ARGV: consumer group, consumer. Deleting a consumer drops its pending
# entries, so it is deleted only if it holds none, checked in the same atomic step.
# Returns 1 when deleted.
PRUNE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: latency list; ARGV: milliseconds, samples kept.
RECORD_LATENCY = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
"""

# The server's clock, in milliseconds: every process judges expiry by the same clock.
# (Redis < 7 refuses writes after TIME unless the script replicates its effects.)
NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: the role's sorted set, its records hash; ARGV: url, record, time to live (ms).
# Both keys expire with the longest-lived record (never sooner), so a run whose servers
# are all gone leaves none behind.
HEARTBEAT = (
    NOW_MS
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""
)

# KEYS: the role's sorted set, its records hash. Forgets the servers whose heartbeat is
# overdue and returns the records of the others.
LIVE_SERVERS = (
    NOW_MS
    + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
if #live == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(live))
"""
)

# KEYS: a counter; ARGV: a value. Sets the counter to the value unless it is above already.
RAISE_TO = """
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[1])
if wanted > now then redis.call('SET', KEYS[1], wanted); return wanted end
return now
"""

SCRIPTS = {
    "publish": PUBLISH,
    "forward": FORWARD,
    "ack": ACK,
    "dead_letter": DEAD_LETTER,
    "replay": REPLAY,
    "prune_consumer": PRUNE_CONSUMER,
    "record_latency": RECORD_LATENCY,
    "heartbeat": HEARTBEAT,
    "live_servers": LIVE_SERVERS,
    "raise_to": RAISE_TO,
}
