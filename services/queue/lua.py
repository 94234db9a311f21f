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

# KEYS: source, target, stats; ARGV: consumer group, message id, payload, counter.
# Only the consumer whose acknowledgement succeeds publishes.
FORWARD = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  local id = redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
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

# KEYS: stream, dead letters, stats; ARGV: consumer group, message id, reason.
# The payload is copied as is (it may be what could not be decoded); fields are a flat list.
DEAD_LETTER = """
local payload = ''
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entries > 0 then
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'data' then payload = fields[i + 1] end
  end
end
redis.call('XADD', KEYS[2], '*', 'data', payload, 'source', KEYS[1], 'id', ARGV[2],
           'reason', ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'dead', 1)
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
    "record_latency": RECORD_LATENCY,
}
