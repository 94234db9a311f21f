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

SCRIPTS = {
    "publish": PUBLISH,
    "forward": FORWARD,
    "ack": ACK,
    "dead_letter": DEAD_LETTER,
    "replay": REPLAY,
    "prune_consumer": PRUNE_CONSUMER,
    "record_latency": RECORD_LATENCY,
}
