"""Lua scripts that make each queue transition atomic in Redis.

Every transition of a job (queued -> running -> ended, running -> queued again) happens inside one
script, so that broker replicas racing for the same job or slot never both win. Scripts get every key
from `mesh.keys.Keys`; keys that depend on a value read inside the script come as a prefix in ARGV.
Times come from the Redis server's clock, the one clock all replicas share.
"""

from __future__ import annotations

# Shared helpers, prepended to each script.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function record_end(job, events, job_id, state, event, ttl_ms, maxlen)
  local id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'pb', event)
  redis.call('HSET', job, 'state', state, 'finished_ms', now_ms(), 'result', event, 'last_event_id', id)
  redis.call('PEXPIRE', job, ttl_ms)
  redis.call('PEXPIRE', events, ttl_ms)
  return id
end

local function record_queued(job, events, queue, job_id, maxlen)
  local pos = redis.call('ZRANK', queue, job_id)
  local depth = redis.call('ZCARD', queue)
  local id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'queued', pos, 'depth', depth)
  redis.call('HSET', job, 'last_event_id', id)
  return {pos, id, depth}
end

local function release(job, job_id, leases, busy, running_prefix)
  local tenant = redis.call('HGET', job, 'tenant')
  redis.call('ZREM', leases, job_id)
  redis.call('HDEL', busy, job_id)
  redis.call('SREM', running_prefix .. tenant, job_id)
  return tenant
end

local function owns(job, attempt)
  return redis.call('HGET', job, 'state') == 'running' and redis.call('HGET', job, 'attempts') == attempt
end
"""

# KEYS: job, queue, queues, deadlines, tenant_queued, tenant_running, tenant_rate, events, sequence,
#       tenant_jobs
# ARGV: job_id, spec, tenant, kind, model, priority, deadline_ms, max_depth, max_queued, max_active,
#       rate_limit, rate_window_ms, maxlen, affinity
ENQUEUE = (
    _PRELUDE
    + """
local rate_limit = tonumber(ARGV[11])
if rate_limit > 0 then
  local n = redis.call('INCR', KEYS[7])
  if n == 1 then redis.call('PEXPIRE', KEYS[7], ARGV[12]) end
  if n > rate_limit then return {'rate', redis.call('PTTL', KEYS[7])} end
end
local depth = redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[8]) then return {'depth', depth} end
local queued = redis.call('SCARD', KEYS[5])
if tonumber(ARGV[9]) > 0 and queued >= tonumber(ARGV[9]) then return {'tenant_queued', queued} end
local active = queued + redis.call('SCARD', KEYS[6])
if tonumber(ARGV[10]) > 0 and active >= tonumber(ARGV[10]) then return {'tenant_active', active} end
local seq = redis.call('INCR', KEYS[9])
local score = string.format('%.0f', (100 - tonumber(ARGV[6])) * 1e13 + seq)
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'tenant', ARGV[3], 'kind', ARGV[4], 'model', ARGV[5],
  'queue', KEYS[2], 'score', score, 'priority', ARGV[6], 'state', 'queued', 'attempts', 0,
  'created_ms', now_ms(), 'deadline_ms', ARGV[7], 'affinity', ARGV[14], 'delivered', 0, 'cancel', 0)
redis.call('ZADD', KEYS[2], score, ARGV[1])
redis.call('SADD', KEYS[3], ARGV[4] .. string.char(10) .. ARGV[5])
if tonumber(ARGV[7]) > 0 then redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1]) end
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[10], now_ms(), ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[10], 0, -101)
redis.call('PEXPIRE', KEYS[10], 86400000)
local q = record_queued(KEYS[1], KEYS[8], KEYS[2], ARGV[1], ARGV[13])
return {'ok', q[1], q[2], q[3]}
"""
)

# KEYS: queue, busy (of the worker), leases, deadlines
# ARGV: expected job id or '', slots, lease_ms, broker_id, worker_id, job prefix, tenant_queued prefix,
#       tenant_running prefix, events prefix, maxlen, affinity prefix, affinity_ttl_ms
# The job's started event is written here too, and its affinity recorded: one round trip per claim.
CLAIM = (
    _PRELUDE
    + """
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[2]) then return {'full'} end
local id = ARGV[1]
if id == '' then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #head == 0 then return {'empty'} end
  id = head[1]
elseif not redis.call('ZSCORE', KEYS[1], id) then
  return {'gone'}
end
local job = ARGV[6] .. id
local now = now_ms()
local deadline = tonumber(redis.call('HGET', job, 'deadline_ms') or '0')
if deadline > 0 and deadline <= now then return {'expired', id} end
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[4], id)
local tenant = redis.call('HGET', job, 'tenant')
local attempts = redis.call('HINCRBY', job, 'attempts', 1)
redis.call('HSET', job, 'state', 'running', 'worker', ARGV[5], 'broker', ARGV[4], 'started_ms', now,
  'delivered', 0)
redis.call('SREM', ARGV[7] .. tenant, id)
redis.call('SADD', ARGV[8] .. tenant, id)
local expiry = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[2], id, expiry)
redis.call('ZADD', KEYS[3], expiry, id)
local model = redis.call('HGET', job, 'model')
local started = redis.call('XADD', ARGV[9] .. id, 'MAXLEN', '~', ARGV[10], '*', 'started', ARGV[5],
  'model', model, 'attempt', attempts)
local affinity = redis.call('HGET', job, 'affinity') or ''
if affinity ~= '' then redis.call('SET', ARGV[11] .. affinity, ARGV[5], 'PX', ARGV[12]) end
return {'ok', id, attempts, redis.call('HGET', job, 'spec'), deadline, redis.call('ZCARD', KEYS[1]),
  affinity, started, model}
"""
)

# KEYS: job, leases, busy; ARGV: job_id, attempt, lease_ms
RENEW = (
    _PRELUDE
    + """
if not owns(KEYS[1], ARGV[2]) then return 0 end
local expiry = now_ms() + tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], expiry)
return 1
"""
)

# KEYS: job, events, leases, busy; ARGV: job_id, attempt, state, event, ttl_ms, maxlen, tenant_running prefix
FINISH = (
    _PRELUDE
    + """
if not owns(KEYS[1], ARGV[2]) then return false end
release(KEYS[1], ARGV[1], KEYS[3], KEYS[4], ARGV[7])
return record_end(KEYS[1], KEYS[2], ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""
)

_REQUEUE_BODY = """
local function requeue(job, events, leases, busy, deadlines, job_id, maxlen, running_prefix, queued_prefix)
  local tenant = release(job, job_id, leases, busy, running_prefix)
  local queue = redis.call('HGET', job, 'queue')
  redis.call('HSET', job, 'state', 'queued', 'worker', '', 'broker', '')
  redis.call('SADD', queued_prefix .. tenant, job_id)
  redis.call('ZADD', queue, redis.call('HGET', job, 'score'), job_id)
  local deadline = tonumber(redis.call('HGET', job, 'deadline_ms') or '0')
  if deadline > 0 then redis.call('ZADD', deadlines, deadline, job_id) end
  return record_queued(job, events, queue, job_id, maxlen)[2]
end
"""

# KEYS: job, events, leases, busy, deadlines
# ARGV: job_id, attempt, maxlen, tenant_running prefix, tenant_queued prefix, cancelled event, ttl_ms
# Returns the queued event's id, "cancelled:<final event id>" when a cancel came meanwhile, or nil.
REQUEUE = (
    _PRELUDE
    + _REQUEUE_BODY
    + """
if not owns(KEYS[1], ARGV[2]) then return false end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then  -- cancelled while its run failed: it ends here
  release(KEYS[1], ARGV[1], KEYS[3], KEYS[4], ARGV[4])
  return 'cancelled:' .. record_end(KEYS[1], KEYS[2], ARGV[1], 'cancelled', ARGV[6], ARGV[7], ARGV[3])
end
return requeue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[3], ARGV[4], ARGV[5])
"""
)

# Appends one event of a run to its job's stream, only while the run owns the job: a broker that stalled past
# its lease writes nothing after the job was reclaimed (and perhaps resumed) elsewhere.
# KEYS: job, events; ARGV: attempt, first output (1/0), progress ("" or bytes), maxlen, event
APPEND_EVENT = (
    _PRELUDE
    + """
if not owns(KEYS[1], ARGV[1]) then return false end
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], 'delivered', 1) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[3]) end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'pb', ARGV[5])
"""
)

# Ends a job that is still queued: cancelled, or its deadline passed (only_if_late = 1).
# KEYS: job, events, deadlines
# ARGV: job_id, state, event, ttl_ms, maxlen, tenant_queued prefix, only_if_late
END_QUEUED = (
    _PRELUDE
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return {'state', state or ''} end
if ARGV[7] == '1' then
  local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline_ms') or '0')
  if deadline == 0 or deadline > now_ms() then return {'state', 'queued'} end
end
redis.call('ZREM', redis.call('HGET', KEYS[1], 'queue'), ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', ARGV[6] .. redis.call('HGET', KEYS[1], 'tenant'), ARGV[1])
return {'ok', record_end(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])}
"""
)

# Takes back a running job whose lease expired (its broker died or stalled).
# KEYS: job, events, leases, busy, deadlines
# ARGV: job_id, max_attempts, cancelled event, unavailable event, ttl_ms, maxlen, tenant_running prefix,
#       tenant_queued prefix, resumable (1: a text job that goes on from what it delivered)
RECLAIM = (
    _PRELUDE
    + _REQUEUE_BODY
    + """
local expiry = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not expiry or tonumber(expiry) > now_ms() then return {'alive'} end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  return {'stale'}
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  release(KEYS[1], ARGV[1], KEYS[3], KEYS[4], ARGV[7])
  return {'cancelled', record_end(KEYS[1], KEYS[2], ARGV[1], 'cancelled', ARGV[3], ARGV[5], ARGV[6])}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
if (redis.call('HGET', KEYS[1], 'delivered') == '0' or ARGV[9] == '1') and attempts < tonumber(ARGV[2]) then
  local id = requeue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[6], ARGV[7], ARGV[8])
  return {'requeued', id}
end
release(KEYS[1], ARGV[1], KEYS[3], KEYS[4], ARGV[7])
return {'failed', record_end(KEYS[1], KEYS[2], ARGV[1], 'failed', ARGV[4], ARGV[5], ARGV[6])}
"""
)

# Marks a running job for cancellation; KEYS: job. Returns its state.
REQUEST_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then redis.call('HSET', KEYS[1], 'cancel', 1) end
return state or ''
"""
