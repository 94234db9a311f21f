"""The Redis queue of the pipeline; no other package names a key or sends a command.

keys.py (every key), streams.py (the streams and their consumer groups), state.py (counters,
trainer state, teacher latencies), readings.py (the monitor's read-only figures), lua.py
(the atomic scripts), runner.py (blocking or asyncio I/O for all of them), queues.py
(`GroupQueue`, `AsyncQueue`, `QueueReader`: what the processes use), access.py (the
password, TLS and what to fix when Redis refuses a client) and connection.py (every client).
"""
