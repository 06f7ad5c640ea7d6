"""Redis state store: the shared backend, exact across hosts through one Lua script per change."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from candela_mitm.errors import StoreUnavailable
from candela_mitm.state.ports import (
    RECALLS_KEPT,
    ActiveReservation,
    DayTotals,
    GrantRow,
    JobRecord,
    KeyRecord,
    Lease,
    LoopAdmissionStore,
    NewReservation,
    RateHit,
    RateTake,
    ReserveResult,
    SettleResult,
    SliceRecall,
    SpendPart,
    SpendRow,
    StateStore,
    StoreUnreachable,
    TenantRecord,
    TokenAdmit,
    UserRecord,
)

# Budget period rows only serve the current period's arithmetic (history lives in the spend
# hashes); keep them a little longer than the longest period (a month) plus any open reservation.
DAY_TTL_S = 40 * 24 * 3600

_ACTIVE_FIELDS = (
    "owner", "user_id", "tenant", "day", "amount", "request_id", "model", "provider", "settled",
    "parts",
)
_SEP = "\x1f"  # between the parts of a spend field: user, tenant, model, provider

# Layout under the prefix P (every key of one deployment shares it):
#   P user:<id>            hash: record (JSON), deleted (0/1), deleted_at
#   P users                set of user ids
#   P day:<user>:<period>  hash: spent, from_grants, reserved (nano-dollars); period: a UTC day
#                          or a period key (governance/periods.py)
#   P tday:<tenant>:<period> hash: spent, reserved (a tenant's budget row)
#   P kday:<key id>:<period> hash: spent, reserved (an API key's budget row, by its lineage)
#   P tenant:<id>          string: the tenant's record (JSON); P tenants: set of tenant ids
#   P grants:<user>        zset: grant id scored by expiry (us)
#   P grant:<id>           hash: user_id, amount, used, held, expires_us, reason, actor, created_us
#   P res:<id>             hash: the reservation, its holds as gh:<grant id> fields
#   P active / P finished  zsets of reservation ids by creation / finish time (us)
#   P spend:<day>          hash: c|i|o|n <SEP> user <SEP> tenant <SEP> model <SEP> provider
#   P spenddays            zset of days (score 0, read by lex range)
#   P rate:<key>           zset: one member per counted request, scored by its time (us) or its
#                          block's stamp; it expires a second past its newest entry + the window
#   P tok:<key>            zset: token entries scored by time; P tokamt:<key> hash: their amounts
#   P lease:<key>          zset: leases scored by expiry; P leaseown:<key> hash: their owners;
#   P leasekeys            set of keys with leases
#   P apikey:<key id>      string: the key's record (JSON, its digest, never the key)
#   P apikeydigest:<sha256> string: the key id; P apikeys: set of key ids
#   P alert:<scope> SEP <id> SEP <period> SEP <threshold>  string: when the alert was claimed
#                          (SET NX; it expires after its period's end)


#   P job:<provider>:<job id> hash: an async job's owner, budget rows and creation charge
#   P jobobj:<provider>:<key> string: a job's input or output object (JSON): owner, estimate
# Scripts touch keys they derive from the prefix: fine on one Redis server or a replica set,
# not on Redis Cluster (keys of one user would have to share a hash slot).

_RESERVE = """
local amount = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local P = ARGV[4]
local d = redis.call('HMGET', KEYS[1], 'spent', 'from_grants', 'reserved')
local spent = tonumber(d[1]) or 0
local from_grants = tonumber(d[2]) or 0
local reserved = tonumber(d[3]) or 0
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[3], '+inf')
local free = {}
local grants_free = 0
for i, gid in ipairs(ids) do
  local g = redis.call('HMGET', P .. 'grant:' .. gid, 'amount', 'used', 'held')
  free[i] = (tonumber(g[1]) or 0) - (tonumber(g[2]) or 0) - (tonumber(g[3]) or 0)
  if free[i] > 0 then grants_free = grants_free + free[i] end
end
local daily_free = budget - (spent - from_grants) - reserved
if amount > 0 and daily_free + grants_free < amount then
  return {0, 0, spent, from_grants, reserved, grants_free, 'user', 0, 0, 0, 0, 0, 0}
end
-- a tenant's or key's row: its spent and reserved, and whether `budget` ('' for none) cannot
-- hold the amount, as tenant_admits (key_admits is the same rule)
local function row_refuses(key, budget)
  local t = redis.call('HMGET', key, 'spent', 'reserved')
  local row_spent = tonumber(t[1]) or 0
  local row_reserved = tonumber(t[2]) or 0
  return row_spent, row_reserved,
    budget ~= '' and amount > 0 and tonumber(budget) - row_spent - row_reserved < amount
end
-- the tenant's row (ARGV[15] its period key, '' when no tenant is named)
local t_spent, t_reserved, t_hold, refused = 0, 0, 0, false
if ARGV[15] ~= '' then
  t_spent, t_reserved, refused = row_refuses(KEYS[5], ARGV[14])
  if refused then
    return {0, 0, spent, from_grants, reserved, grants_free, 'tenant', t_spent, t_reserved, 0,
      0, 0, 0}
  end
  t_hold = amount
end
-- the key's row (ARGV[18] its period key, '' when no key budget is named)
local k_spent, k_reserved, k_hold = 0, 0, 0
if ARGV[18] ~= '' then
  k_spent, k_reserved, refused = row_refuses(KEYS[6], ARGV[17])
  if refused then
    return {0, 0, spent, from_grants, reserved, grants_free, 'key', t_spent, t_reserved, 0,
      k_spent, k_reserved, 0}
  end
  k_hold = amount
end
local daily = math.min(amount, math.max(0, daily_free))
local rest = amount - daily
local out = {1, daily, spent, from_grants, reserved, grants_free, 'user', t_spent, t_reserved,
  t_hold, k_spent, k_reserved, k_hold}
local fields = {'user_id', ARGV[6], 'tenant', ARGV[7], 'day', ARGV[8], 'amount', ARGV[1],
  'budget', ARGV[2], 'daily_hold', daily, 'request_id', ARGV[9], 'owner', ARGV[10],
  'created_us', ARGV[3], 'status', 'active', 'model', ARGV[12], 'provider', ARGV[13],
  'period', ARGV[16], 'tenant_period', ARGV[15], 'tenant_hold', t_hold,
  'key_id', ARGV[19], 'key_period', ARGV[18], 'key_hold', k_hold}
for i, gid in ipairs(ids) do
  if rest <= 0 then break end
  local take = math.min(rest, math.max(0, free[i]))
  if take > 0 then
    redis.call('HINCRBY', P .. 'grant:' .. gid, 'held', take)
    table.insert(fields, 'gh:' .. gid)
    table.insert(fields, take)
    table.insert(out, gid)
    table.insert(out, take)
    rest = rest - take
  end
end
if daily > 0 then
  redis.call('HINCRBY', KEYS[1], 'reserved', daily)
  redis.call('EXPIRE', KEYS[1], ARGV[11])
end
if t_hold > 0 then
  redis.call('HINCRBY', KEYS[5], 'reserved', t_hold)
  redis.call('EXPIRE', KEYS[5], ARGV[11])
end
if k_hold > 0 then
  redis.call('HINCRBY', KEYS[6], 'reserved', k_hold)
  redis.call('EXPIRE', KEYS[6], ARGV[11])
end
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[5])
return out
"""

# Shared by settle and release: read a reservation hash into fields and its grant holds.
_READ_RESERVATION = """
local function read_reservation(key)
  local h = redis.call('HGETALL', key)
  local r = {}
  local own = {}
  local own_ids = {}
  for i = 1, #h, 2 do
    local k = h[i]
    if string.sub(k, 1, 3) == 'gh:' then
      local gid = string.sub(k, 4)
      own[gid] = tonumber(h[i + 1])
      table.insert(own_ids, gid)
    else
      r[k] = h[i + 1]
    end
  end
  return r, own, own_ids
end
"""

# Shared by settle and settle_part: the grants a settle draws on, in order: those this
# reservation holds that have expired since (their expiry sorts before any unexpired one),
# earliest expiry first, then every grant unexpired at `after` (ARGV's string, as sent).
_GRANT_ORDER = """
local function grant_order(gkey, own_ids, now, after)
  local expired_own = {}
  for _, gid in ipairs(own_ids) do
    local s = tonumber(redis.call('ZSCORE', gkey, gid)) or 0
    if s <= now then table.insert(expired_own, {s, gid}) end
  end
  table.sort(expired_own, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  local order = {}
  for _, e in ipairs(expired_own) do table.insert(order, e[2]) end
  for _, gid in ipairs(redis.call('ZRANGEBYSCORE', gkey, '(' .. after, '+inf')) do
    table.insert(order, gid)
  end
  return order
end
"""

# Shared by settle and settle_part. settle_draw: read an active (or reclaimed) reservation and
# draw `cost` on it as plan_settle_held does: the allowance first (its own hold counts as free
# to it), then grants in grant_order (each with its own hold of it), the rest overdrawn on the
# allowance; `on_draw(gid, take, hold)`, when given, runs after each grant's draw (hold: the
# reservation's own of that grant). Returns nil for a reservation unknown, settled or released;
# else s: r, own (grant holds), own_daily, active, daykey, drawn (from grants) and out ({1, from
# the allowance, grant id, take, ...}: the script's answer). A reclaimed reservation holds
# nothing any more. book_settle: the spend on the user's, tenant's and key's rows, each row's
# reservation given back `*_back` of what was held on it.
_SETTLE_DRAW = (
    _READ_RESERVATION
    + _GRANT_ORDER
    + """
local function settle_draw(key, cost, now, after, P, on_draw)
  local r, own, own_ids = read_reservation(key)
  if r.status ~= 'active' and r.status ~= 'reclaimed' then return nil end
  local active = r.status == 'active'
  -- a reclaimed reservation gave its holds back already; its spend still counts
  if not active then own = {}; own_ids = {} end
  local own_daily = 0
  if active then own_daily = tonumber(r.daily_hold) end
  local period = r.period
  if period == nil or period == '' then period = r.day end
  local daykey = P .. 'day:' .. r.user_id .. ':' .. period
  local gkey = P .. 'grants:' .. r.user_id
  local d = redis.call('HMGET', daykey, 'spent', 'from_grants', 'reserved')
  local spent = tonumber(d[1]) or 0
  local from_grants = tonumber(d[2]) or 0
  local reserved = tonumber(d[3]) or 0
  local daily_free = tonumber(r.budget) - (spent - from_grants) - (reserved - own_daily)
  local order = grant_order(gkey, own_ids, now, after)
  local daily = math.min(cost, math.max(0, daily_free))
  local rest = cost - daily
  local drawn = 0
  local out = {1, 0}
  for _, gid in ipairs(order) do
    if rest <= 0 then break end
    local g = redis.call('HMGET', P .. 'grant:' .. gid, 'amount', 'used', 'held')
    local f = (tonumber(g[1]) or 0) - (tonumber(g[2]) or 0) - (tonumber(g[3]) or 0)
      + (own[gid] or 0)
    local take = math.min(rest, math.max(0, f))
    if take > 0 then
      redis.call('HINCRBY', P .. 'grant:' .. gid, 'used', take)
      if on_draw then on_draw(gid, take, own[gid] or 0) end
      table.insert(out, gid)
      table.insert(out, take)
      drawn = drawn + take
      rest = rest - take
    end
  end
  out[2] = daily + rest
  return {r = r, own = own, own_daily = own_daily, active = active, daykey = daykey,
    drawn = drawn, out = out}
end

-- one budget row: `cost` spent on it, `back` of what the reservation held on it given back
local function book_row(key, cost, back, ttl)
  redis.call('HINCRBY', key, 'spent', cost)
  if back ~= 0 then redis.call('HINCRBY', key, 'reserved', -back) end
  redis.call('EXPIRE', key, ttl)
end

local function book_settle(s, P, cost, daily_back, tenant_back, key_back, ttl)
  local r = s.r
  if s.drawn ~= 0 then redis.call('HINCRBY', s.daykey, 'from_grants', s.drawn) end
  book_row(s.daykey, cost, daily_back, ttl)
  if r.tenant_period ~= nil and r.tenant_period ~= '' then
    book_row(P .. 'tday:' .. r.tenant .. ':' .. r.tenant_period, cost, tenant_back, ttl)
  end
  if r.key_period ~= nil and r.key_period ~= '' then
    book_row(P .. 'kday:' .. r.key_id .. ':' .. r.key_period, cost, key_back, ttl)
  end
end
"""
)

_SETTLE = (
    _SETTLE_DRAW
    + """
local P = ARGV[7]
local cost = tonumber(ARGV[1])
local s = settle_draw(KEYS[1], cost, tonumber(ARGV[6]), ARGV[6], P, nil)
if s == nil then return {0} end
local r = s.r
-- every hold it has left goes back
for gid, hold in pairs(s.own) do
  redis.call('HINCRBY', P .. 'grant:' .. gid, 'held', -hold)
end
local t_back, k_back = 0, 0
if s.active then
  t_back = tonumber(r.tenant_hold or '0')
  k_back = tonumber(r.key_hold or '0')
end
book_settle(s, P, cost, s.own_daily, t_back, k_back, ARGV[9])
redis.call('HSET', KEYS[1], 'status', 'settled', 'cost', ARGV[1], 'finished_us', ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[8])
local skey = P .. 'spend:' .. r.day
local row = r.user_id .. '\\31' .. r.tenant .. '\\31' .. ARGV[4] .. '\\31' .. ARGV[5]
redis.call('HINCRBY', skey, 'c\\31' .. row, cost)
redis.call('HINCRBY', skey, 'i\\31' .. row, ARGV[2])
redis.call('HINCRBY', skey, 'o\\31' .. row, ARGV[3])
redis.call('HINCRBY', skey, 'n\\31' .. row, 1)
redis.call('ZADD', P .. 'spenddays', 0, r.day)
return s.out
"""
)

# A budget slice's spend, recorded while it stays held (settle_part): the settle's draw, the
# holds shrunk by what was drawn from them. ARGV: now, prefix, day TTL, then per part: model,
# provider, cost, tokens in, tokens out, requests.
_SETTLE_PART = (
    _SETTLE_DRAW
    + """
local P = ARGV[2]
local cost, requests = 0, 0
for i = 4, #ARGV, 6 do
  cost = cost + tonumber(ARGV[i + 2])
  requests = requests + tonumber(ARGV[i + 5])
end
-- a grant's draw comes out of the reservation's own hold of it first
local function shrink_hold(gid, take, hold)
  local used = math.min(hold, take)
  if used > 0 then
    redis.call('HINCRBY', P .. 'grant:' .. gid, 'held', -used)
    if (hold - used) > 0 then
      redis.call('HSET', KEYS[1], 'gh:' .. gid, hold - used)
    else
      redis.call('HDEL', KEYS[1], 'gh:' .. gid)
    end
  end
end
local s = settle_draw(KEYS[1], cost, tonumber(ARGV[1]), ARGV[1], P, shrink_hold)
if s == nil then return {0} end
local r = s.r
local used_daily = math.min(s.own_daily, s.out[2])
local t_used, k_used = 0, 0
if s.active and r.tenant_period ~= nil and r.tenant_period ~= '' then
  t_used = math.min(tonumber(r.tenant_hold or '0'), cost)
end
if s.active and r.key_period ~= nil and r.key_period ~= '' then
  k_used = math.min(tonumber(r.key_hold or '0'), cost)
end
book_settle(s, P, cost, used_daily, t_used, k_used, ARGV[3])
if used_daily ~= 0 then redis.call('HINCRBY', KEYS[1], 'daily_hold', -used_daily) end
if t_used ~= 0 then redis.call('HINCRBY', KEYS[1], 'tenant_hold', -t_used) end
if k_used ~= 0 then redis.call('HINCRBY', KEYS[1], 'key_hold', -k_used) end
redis.call('HINCRBY', KEYS[1], 'settled', cost)
redis.call('HINCRBY', KEYS[1], 'parts', requests)
local skey = P .. 'spend:' .. r.day
for i = 4, #ARGV, 6 do
  local row = r.user_id .. '\\31' .. r.tenant .. '\\31' .. ARGV[i] .. '\\31' .. ARGV[i + 1]
  redis.call('HINCRBY', skey, 'c\\31' .. row, ARGV[i + 2])
  redis.call('HINCRBY', skey, 'i\\31' .. row, ARGV[i + 3])
  redis.call('HINCRBY', skey, 'o\\31' .. row, ARGV[i + 4])
  redis.call('HINCRBY', skey, 'n\\31' .. row, ARGV[i + 5])
end
redis.call('ZADD', P .. 'spenddays', 0, r.day)
return s.out
"""
)

_RELEASE = (
    _READ_RESERVATION
    + """
local r, own = read_reservation(KEYS[1])
if r.status ~= 'active' then return 0 end
local P = ARGV[3]
local hold = tonumber(r.daily_hold)
local period = r.period
if period == nil or period == '' then period = r.day end
if hold ~= 0 then
  redis.call('HINCRBY', P .. 'day:' .. r.user_id .. ':' .. period, 'reserved', -hold)
end
local t_hold = tonumber(r.tenant_hold or '0')
if r.tenant_period ~= nil and r.tenant_period ~= '' and t_hold ~= 0 then
  redis.call('HINCRBY', P .. 'tday:' .. r.tenant .. ':' .. r.tenant_period, 'reserved', -t_hold)
end
local k_hold = tonumber(r.key_hold or '0')
if r.key_period ~= nil and r.key_period ~= '' and k_hold ~= 0 then
  redis.call('HINCRBY', P .. 'kday:' .. r.key_id .. ':' .. r.key_period, 'reserved', -k_hold)
end
for gid, h in pairs(own) do
  redis.call('HINCRBY', P .. 'grant:' .. gid, 'held', -h)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_us', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[4])
return 1
"""
)

# Record a job under its creation's reservation: its user, tenant and budget rows are the
# reservation's. A job known already, or a reservation unknown, records nothing.
_RECORD_JOB = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local r = redis.call('HMGET', KEYS[2], 'user_id', 'tenant', 'day', 'period', 'tenant_period',
  'request_id')
if not r[1] then return 0 end
local period = r[4]
if period == nil or period == false or period == '' then period = r[3] end
redis.call('HSET', KEYS[1], 'provider', ARGV[1], 'job_id', ARGV[2], 'user_id', r[1],
  'tenant', r[2] or '', 'model', ARGV[3], 'reservation_id', ARGV[4], 'charged', ARGV[5],
  'tokens_in', ARGV[6], 'tokens_out', ARGV[7], 'created_us', ARGV[8], 'day', r[3],
  'period', period, 'tenant_period', r[5] or '', 'request_id', r[6] or '')
return 1
"""

# Once per job: the difference between the real cost and the creation's charge, on the rows the
# charge landed on. Returns the job's fields as they were, or {} (unknown, or trued up already).
_TRUE_UP_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
if redis.call('HEXISTS', KEYS[1], 'trued_up_us') == 1 then return {} end
local before = redis.call('HGETALL', KEYS[1])
local j = {}
for i = 1, #before, 2 do j[before[i]] = before[i + 1] end
local P = ARGV[5]
local delta = tonumber(ARGV[1]) - tonumber(j.charged)
redis.call('HSET', KEYS[1], 'cost', ARGV[1], 'trued_up_us', ARGV[4])
local daykey = P .. 'day:' .. j.user_id .. ':' .. j.period
if redis.call('EXISTS', daykey) == 1 then redis.call('HINCRBY', daykey, 'spent', delta) end
if j.tenant_period ~= '' then
  local tkey = P .. 'tday:' .. j.tenant .. ':' .. j.tenant_period
  if redis.call('EXISTS', tkey) == 1 then redis.call('HINCRBY', tkey, 'spent', delta) end
end
local skey = P .. 'spend:' .. j.day
local row = j.user_id .. '\\31' .. j.tenant .. '\\31' .. j.model .. '\\31' .. j.provider
if redis.call('HEXISTS', skey, 'c\\31' .. row) == 1 then
  redis.call('HINCRBY', skey, 'c\\31' .. row, delta)
  redis.call('HINCRBY', skey, 'i\\31' .. row, tonumber(ARGV[2]) - tonumber(j.tokens_in))
  redis.call('HINCRBY', skey, 'o\\31' .. row, tonumber(ARGV[3]) - tonumber(j.tokens_out))
end
return before
"""

_DELETE_USER = """
if redis.call('HGET', KEYS[1], 'deleted') ~= '0' then return 0 end
redis.call('HSET', KEYS[1], 'deleted', '1', 'deleted_at', ARGV[1])
redis.call('INCR', KEYS[2])
return 1
"""

# A plain check: ARGV now, window, limit, member. Returns {allowed, count, oldest}. This and
# _RATE_TAKE set the window key's TTL from its newest entry (its highest score: a rate block's,
# stamped ahead, up to an idle block's lifetime; governance/rate_leases.py): the key lives a
# second past that entry's stamp + the window, never less (a TTL of now + the window would drop
# entries stamped later while they still count: under-counting, over-admission).
_RATE_HIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  count = count + 1
  allowed = 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then
  local ttl = math.floor((tonumber(newest[2]) - tonumber(ARGV[1]) + tonumber(ARGV[2])) / 1000)
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
return {allowed, count, oldest[2] or ''}
"""


def _as_function(name: str, script: str) -> str:
    """A script's text as a Lua function of its own KEYS and ARGV (its `return` answers the
    function): scripts composed of others run their very text, so they answer alike."""
    return f"local function {name}(KEYS, ARGV)\n{script}\nend\n"


# An idle request's admission in one round trip (issue 21): _RATE_HIT then, only when it
# admitted, _RESERVE, their own text. KEYS: the rate window's, then _RESERVE's six. ARGV:
# _RATE_HIT's four, then _RESERVE's. Returns {the rate hit's answer} or {it, the reserve's}.
_RATE_HIT_RESERVE = (
    _as_function("rate_hit", _RATE_HIT)
    + _as_function("reserve", _RESERVE)
    + """
local hit = rate_hit({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4]})
if hit[1] == 0 then return {hit} end
return {hit, reserve({unpack(KEYS, 2)}, {unpack(ARGV, 5)})}
"""
)

# A rate lease: ARGV now, window, limit, n, stamp, member prefix. Returns {granted, count, oldest}.
_RATE_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
local count = redis.call('ZCARD', KEYS[1])
local granted = math.max(0, math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) - count))
for i = 1, granted do
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[6] .. i)
end
count = count + granted
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then
  local ttl = math.floor((tonumber(newest[2]) - tonumber(ARGV[1]) + tonumber(ARGV[2])) / 1000)
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
return {granted, count, oldest[2] or ''}
"""

# A lease's unused part: ARGV stamp, n. Entries of one stamp are alike: any n of them go.
_RATE_RETURN = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
"""

# KEYS: per check, the zset then the amounts hash. ARGV: now, window, entry id, ttl ms, then
# per check its limit and amount. Returns {1, used...} or {0, used..., refused index, fits_at}
# (fits_at as token_fits_at: '' when the amount alone exceeds the limit).
_TOKEN_ADMIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = #KEYS / 2
local used = {}
for i = 1, n do
  local z, h = KEYS[2 * i - 1], KEYS[2 * i]
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - window)
  for _, id in ipairs(old) do
    redis.call('ZREM', z, id)
    redis.call('HDEL', h, id)
  end
  local total = 0
  for _, v in ipairs(redis.call('HVALS', h)) do total = total + tonumber(v) end
  used[i] = total
  local limit = tonumber(ARGV[3 + 2 * i])
  local amount = tonumber(ARGV[4 + 2 * i])
  if amount > 0 and total + amount > limit then
    local out = {0}
    for j = 1, i do table.insert(out, used[j]) end
    local fits = ''
    if amount <= limit then
      local excess = total + amount - limit
      local ids = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
      for k = 1, #ids, 2 do
        excess = excess - tonumber(redis.call('HGET', h, ids[k]) or '0')
        if excess <= 0 then
          fits = tostring(tonumber(ids[k + 1]) + window)
          break
        end
      end
    end
    table.insert(out, i)
    table.insert(out, fits)
    return out
  end
end
for i = 1, n do
  local z, h = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('ZADD', z, now, ARGV[3])
  redis.call('HSET', h, ARGV[3], ARGV[4 + 2 * i])
  redis.call('PEXPIRE', z, ARGV[4])
  redis.call('PEXPIRE', h, ARGV[4])
end
local out = {1}
for i = 1, n do table.insert(out, used[i]) end
return out
"""

_TOKEN_CORRECT = """
for i = 1, #KEYS / 2 do
  if redis.call('ZSCORE', KEYS[2 * i - 1], ARGV[1]) then
    redis.call('HSET', KEYS[2 * i], ARGV[1], ARGV[1 + i])
  end
end
return 1
"""

# KEYS: the lease zset, its owners hash, the set of lease keys. ARGV: now, lease id, limit,
# owner, expiry, the key (for the set)
_LEASE_ACQUIRE = """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(old) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[3]) then return {0, held} end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[6])
return {1, held + 1}
"""

_LEASE_RELEASE = """
local n = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return n
"""

# KEYS: the lease zset. ARGV: now, lease id, new expiry. A lease past its expiry is not renewed
# (an acquire may already have counted its place free).
_LEASE_RENEW = """
local at = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not at or tonumber(at) <= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[2])
return 1
"""

# A hash: `record` (the JSON written at minting, never rewritten) and `revoked_us`, set once.
_REVOKE_KEY = """
local rec = redis.call('HGET', KEYS[1], 'record')
if not rec then return false end
local before = redis.call('HGET', KEYS[1], 'revoked_us') or ''
if redis.call('HSETNX', KEYS[1], 'revoked_us', ARGV[1]) == 1 then redis.call('INCR', KEYS[2]) end
return {rec, before}
"""

# `expires_us` beside `record` overrides the record's own expiry, only ever earlier
_EXPIRE_KEY = """
local rec = redis.call('HGET', KEYS[1], 'record')
if not rec then return false end
local before = redis.call('HGET', KEYS[1], 'expires_us') or ''
local at = tonumber(ARGV[1])
local current = tonumber(before) or tonumber(ARGV[2])
if current == nil or at < current then
  redis.call('HSET', KEYS[1], 'expires_us', ARGV[1])
  redis.call('INCR', KEYS[2])
end
return {rec, redis.call('HGET', KEYS[1], 'revoked_us') or '', before}
"""

_PURGE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
for _, rid in ipairs(ids) do
  redis.call('DEL', ARGV[2] .. 'res:' .. rid)
  redis.call('ZREM', KEYS[1], rid)
end
return #ids
"""


# a slice recall mark (SliceRecallStore): numbered by a counter, kept in a list of
# "seq|at_us|scope|name" (the newest ARGV[4]); read: the counter, and the marks past ARGV[1]
_RECALL = """
local n = redis.call('INCR', KEYS[1])
redis.call('RPUSH', KEYS[2], n .. '|' .. ARGV[3] .. '|' .. ARGV[1] .. '|' .. ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
return n
"""

_RECALLS = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local after = tonumber(ARGV[1])
if n <= after then return {n} end
local out = {n}
for _, m in ipairs(redis.call('LRANGE', KEYS[2], -math.min(n - after, tonumber(ARGV[2])), -1)) do
  out[#out + 1] = m
end
return out
"""


LOOP_CONNECTIONS_MAX = 8  # the event loop's asyncio client (rate_hit_reserve_async)


def _int(value: Any) -> int:
    """Redis answers numbers as integers or as strings (scores may read like '1.7e+15')."""
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        return int(float(value))


def _rate_args(limit: int, window_us: int, now_us: int) -> list[Any]:
    """_RATE_HIT's ARGV: its member is the time and a random part (requests in the same
    microsecond stay apart)."""
    return [now_us, window_us, limit, f"{now_us}:{uuid.uuid4().hex[:12]}"]


def _rate_result(out: Sequence[Any]) -> RateHit:
    allowed, count, oldest = out
    return RateHit(bool(allowed), _int(count), _int(oldest) if oldest else None)


def _reserve_result(out: Sequence[Any]) -> ReserveResult:
    """_RESERVE's answer: ok, the allowance's hold, the user's row, the scope, the tenant's and
    the key's rows, then the grant holds (id, amount) pairs."""
    holds = {out[i]: _int(out[i + 1]) for i in range(13, len(out), 2)}
    ok, daily, spent, from_grants, reserved, grants_free = (_int(v) for v in out[:6])
    t_spent, t_reserved, t_hold = (_int(v) for v in out[7:10])
    k_spent, k_reserved, k_hold = (_int(v) for v in out[10:13])
    return ReserveResult(
        bool(ok), daily, holds, spent, from_grants, reserved, grants_free,
        scope=str(out[6]), tenant_spent=t_spent, tenant_reserved=t_reserved, tenant_hold=t_hold,
        key_spent=k_spent, key_reserved=k_reserved, key_hold=k_hold,
    )


class RedisStateStore(StateStore):
    """State in one Redis (several hosts share it); every change is one Lua script (EVALSHA)."""

    def __init__(self, url: str, prefix: str = "candela:", timeout_ms: int = 2000):
        self.prefix = prefix
        # a plain counter: INCR by every change to users, tenants, grants and API keys
        self._generation_key = prefix + "settings_generation"
        self._url_for_errors = url.split("@")[-1]  # never echo a password from the URL
        self._url = url  # the asyncio client's (never in an error or a log line)
        self._timeout_s = timeout_ms / 1000
        # the asyncio client of the event loop that uses it (_on_loop)
        self._loop_client: tuple[asyncio.AbstractEventLoop, Any] | None = None
        try:
            # Any: redis-py's return types are unions over decode_responses; ours is True.
            self._r: Any = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=timeout_ms / 1000,
                socket_connect_timeout=timeout_ms / 1000,
                # No retries: a script whose reply was lost may have run, and running a reserve
                # twice would hold money twice. The request fails closed instead.
                retry=Retry(NoBackoff(), 0),
            )
            self._reserve = self._r.register_script(_RESERVE)
            self._settle = self._r.register_script(_SETTLE)
            self._settle_part = self._r.register_script(_SETTLE_PART)
            self._release = self._r.register_script(_RELEASE)
            self._delete_user = self._r.register_script(_DELETE_USER)
            self._rate_hit = self._r.register_script(_RATE_HIT)
            self._rate_hit_reserve = self._r.register_script(_RATE_HIT_RESERVE)
            self._rate_take = self._r.register_script(_RATE_TAKE)
            self._rate_return = self._r.register_script(_RATE_RETURN)
            self._purge = self._r.register_script(_PURGE)
            self._recall = self._r.register_script(_RECALL)
            self._recalls = self._r.register_script(_RECALLS)
            self._token_admit = self._r.register_script(_TOKEN_ADMIT)
            self._revoke_key = self._r.register_script(_REVOKE_KEY)
            self._expire_key = self._r.register_script(_EXPIRE_KEY)
            self._token_correct = self._r.register_script(_TOKEN_CORRECT)
            self._lease_acquire = self._r.register_script(_LEASE_ACQUIRE)
            self._lease_release = self._r.register_script(_LEASE_RELEASE)
            self._lease_renew = self._r.register_script(_LEASE_RENEW)
            self._record_job = self._r.register_script(_RECORD_JOB)
            self._true_up_job = self._r.register_script(_TRUE_UP_JOB)
        except (redis.RedisError, ValueError) as e:
            raise StoreUnavailable(f"Redis state store {self._url_for_errors}: {e}") from e
        self.ping()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnreachable(f"Redis state store {self._url_for_errors}: {e}") from e
        except redis.RedisError as e:
            raise StoreUnavailable(f"Redis state store {self._url_for_errors}: {e}") from e

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def ping(self) -> None:
        with self._guard():
            self._r.ping()

    def close(self) -> None:
        # the asyncio client is forgotten, not closed: closing awaits, on its own loop (its
        # sockets close with the loop's transports, or the process)
        self._loop_client = None
        with self._guard():
            self._r.close()

    # -- users ---------------------------------------------------------------------------------
    def _user_from_hash(self, h: list[Any]) -> UserRecord | None:
        record, deleted, deleted_at = h
        if record is None:
            return None
        data = json.loads(record)
        data["deleted"] = deleted == "1"
        data["deleted_at"] = int(deleted_at) if deleted_at else None
        return UserRecord.from_json(data)

    def get_user(self, user_id: str, include_deleted: bool = False) -> UserRecord | None:
        with self._guard():
            h = self._r.hmget(self._k("user", user_id), ["record", "deleted", "deleted_at"])
        record = self._user_from_hash(h)
        if record is None or (record.deleted and not include_deleted):
            return None
        return record

    def put_user(self, record: UserRecord) -> None:
        data = json.dumps({**record.to_json(), "deleted": False, "deleted_at": None})
        with self._guard():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(
                self._k("user", record.user_id),
                mapping={"record": data, "deleted": "0", "deleted_at": ""},
            )
            pipe.sadd(self._k("users"), record.user_id)
            pipe.incr(self._generation_key)
            pipe.execute()

    def delete_user(self, user_id: str, now_us: int) -> bool:
        with self._guard():
            return bool(
                self._delete_user(
                    keys=[self._k("user", user_id), self._generation_key], args=[now_us]
                )
            )

    def list_users(self, include_deleted: bool = False) -> list[UserRecord]:
        with self._guard():
            ids = sorted(self._r.smembers(self._k("users")))
            pipe = self._r.pipeline(transaction=False)
            for user_id in ids:
                pipe.hmget(self._k("user", user_id), ["record", "deleted", "deleted_at"])
            hashes = pipe.execute()
        users = [self._user_from_hash(h) for h in hashes]
        return [u for u in users if u is not None and (include_deleted or not u.deleted)]

    # -- ledger --------------------------------------------------------------------------------
    def reserve(self, new: NewReservation) -> ReserveResult:
        with self._guard():
            out = self._reserve(keys=self._reserve_keys(new), args=self._reserve_args(new))
        return _reserve_result(out)

    def _reserve_keys(self, new: NewReservation) -> list[str]:
        return [
            self._k("day", new.user_id, new.user_period),
            self._k("grants", new.user_id),
            self._k("res", new.reservation_id),
            self._k("active"),
            self._k("tday", new.tenant, new.tenant_period if new.tenant else ""),
            self._k("kday", new.key_id, new.key_period if new.key_id else ""),
        ]

    def _reserve_args(self, new: NewReservation) -> list[Any]:
        return [
            new.amount,
            new.budget,
            new.now_us,
            self.prefix,
            new.reservation_id,
            new.user_id,
            new.tenant,
            new.day,
            new.request_id,
            new.owner,
            DAY_TTL_S,
            new.model,
            new.provider,
            "" if new.tenant_budget is None else new.tenant_budget,
            new.tenant_period if new.tenant else "",
            new.user_period,
            "" if new.key_budget is None else new.key_budget,
            new.key_period if new.key_id else "",
            new.key_id,
        ]

    def settle(
        self,
        reservation_id: str,
        cost: int,
        tokens_in: int,
        tokens_out: int,
        model: str,
        provider: str,
        now_us: int,
    ) -> SettleResult:
        with self._guard():
            out = self._settle(
                keys=[self._k("res", reservation_id), self._k("active"), self._k("finished")],
                args=[
                    cost,
                    tokens_in,
                    tokens_out,
                    model,
                    provider,
                    now_us,
                    self.prefix,
                    reservation_id,
                    DAY_TTL_S,
                ],
            )
        if not _int(out[0]):
            return SettleResult(False)
        draws = {out[i]: _int(out[i + 1]) for i in range(2, len(out), 2)}
        return SettleResult(True, cost, _int(out[1]), draws)

    def settle_part(
        self, reservation_id: str, parts: Sequence[SpendPart], now_us: int
    ) -> SettleResult:
        args: list[Any] = [now_us, self.prefix, DAY_TTL_S]
        for p in parts:
            args += [p.model, p.provider, p.cost, p.tokens_in, p.tokens_out, p.requests]
        with self._guard():
            out = self._settle_part(keys=[self._k("res", reservation_id)], args=args)
        if not _int(out[0]):
            return SettleResult(False)
        draws = {out[i]: _int(out[i + 1]) for i in range(2, len(out), 2)}
        return SettleResult(True, sum(p.cost for p in parts), _int(out[1]), draws)

    def release(self, reservation_id: str, now_us: int, reclaim: bool = False) -> bool:
        with self._guard():
            return bool(
                self._release(
                    keys=[self._k("res", reservation_id), self._k("active"), self._k("finished")],
                    args=[
                        now_us,
                        "reclaimed" if reclaim else "released",
                        self.prefix,
                        reservation_id,
                    ],
                )
            )

    def active_reservations(self) -> list[ActiveReservation]:
        with self._guard():
            entries = self._r.zrange(self._k("active"), 0, -1, withscores=True)
            pipe = self._r.pipeline(transaction=False)
            for rid, _ in entries:
                pipe.hmget(self._k("res", rid), _ACTIVE_FIELDS)
            rows = pipe.execute()
        out = []
        for (rid, score), row in zip(entries, rows, strict=True):
            owner, user_id, tenant, day, amount, request_id, model, provider, settled, parts = (
                v or "" for v in row
            )
            out.append(
                ActiveReservation(
                    rid, owner, _int(score), user_id, tenant, day, _int(amount or 0),
                    request_id, model, provider, _int(settled or 0), _int(parts or 0),
                )
            )
        return out

    def purge_finished(self, before_us: int) -> int:
        with self._guard():
            return _int(self._purge(keys=[self._k("finished")], args=[before_us, self.prefix]))

    def add_grant(self, grant: GrantRow) -> None:
        with self._guard():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(
                self._k("grant", grant.grant_id),
                mapping={
                    "user_id": grant.user_id,
                    "amount": grant.amount,
                    "used": grant.used,
                    "held": grant.held,
                    "expires_us": grant.expires_us,
                    "reason": grant.reason,
                    "actor": grant.actor,
                    "created_us": grant.created_us,
                },
            )
            pipe.zadd(self._k("grants", grant.user_id), {grant.grant_id: grant.expires_us})
            pipe.incr(self._generation_key)
            pipe.execute()

    def grants(self, user_id: str) -> list[GrantRow]:
        fields = ["amount", "used", "held", "expires_us", "reason", "actor", "created_us"]
        with self._guard():
            ids = self._r.zrange(self._k("grants", user_id), 0, -1)
            pipe = self._r.pipeline(transaction=False)
            for gid in ids:
                pipe.hmget(self._k("grant", gid), fields)
            rows = pipe.execute()
        return [
            GrantRow(gid, user_id, _int(a), _int(u), _int(h), _int(e), reason, actor, _int(c))
            for gid, (a, u, h, e, reason, actor, c) in zip(ids, rows, strict=True)
            if a is not None
        ]

    def day_totals(self, user_id: str, day: str) -> DayTotals:
        with self._guard():
            spent, from_grants, reserved = self._r.hmget(
                self._k("day", user_id, day), ["spent", "from_grants", "reserved"]
            )
        return DayTotals(_int(spent or 0), _int(from_grants or 0), _int(reserved or 0))

    def tenant_totals(self, tenant: str, period: str) -> DayTotals:
        with self._guard():
            spent, reserved = self._r.hmget(self._k("tday", tenant, period), ["spent", "reserved"])
        return DayTotals(_int(spent or 0), 0, _int(reserved or 0))

    def key_totals(self, key_id: str, period: str) -> DayTotals:
        with self._guard():
            spent, reserved = self._r.hmget(self._k("kday", key_id, period), ["spent", "reserved"])
        return DayTotals(_int(spent or 0), 0, _int(reserved or 0))

    # -- tenants -------------------------------------------------------------------------------
    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._guard():
            data = self._r.get(self._k("tenant", tenant_id))
        return None if data is None else TenantRecord.from_json(json.loads(data))

    def put_tenant(self, record: TenantRecord) -> None:
        with self._guard():
            pipe = self._r.pipeline(transaction=True)
            pipe.set(self._k("tenant", record.tenant_id), json.dumps(record.to_json()))
            pipe.sadd(self._k("tenants"), record.tenant_id)
            pipe.incr(self._generation_key)
            pipe.execute()

    def list_tenants(self) -> list[TenantRecord]:
        with self._guard():
            ids = sorted(self._r.smembers(self._k("tenants")))
            values = self._r.mget([self._k("tenant", t) for t in ids]) if ids else []
        return [TenantRecord.from_json(json.loads(v)) for v in values if v is not None]

    def spend_rows(
        self,
        since_day: str | None = None,
        until_day: str | None = None,
        user_id: str | None = None,
        tenant: str | None = None,
    ) -> list[SpendRow]:
        with self._guard():
            days = self._r.zrangebylex(
                self._k("spenddays"),
                f"[{since_day}" if since_day else "-",
                f"[{until_day}" if until_day else "+",
            )
            pipe = self._r.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(self._k("spend", day))
            hashes = pipe.execute()
        rows: list[SpendRow] = []
        for day, h in zip(days, hashes, strict=True):
            metrics: dict[tuple[str, ...], dict[str, int]] = {}
            for fieldname, value in h.items():
                metric, row_user, row_tenant, model, provider = fieldname.split(_SEP)
                key = (row_user, row_tenant, model, provider)
                metrics.setdefault(key, {})[metric] = _int(value)
            for (row_user, row_tenant, model, provider), m in sorted(metrics.items()):
                if user_id is not None and row_user != user_id:
                    continue
                if tenant is not None and row_tenant != tenant:
                    continue
                rows.append(
                    SpendRow(
                        day,
                        row_user,
                        row_tenant,
                        model,
                        provider,
                        m.get("c", 0),
                        m.get("i", 0),
                        m.get("o", 0),
                        m.get("n", 0),
                    )
                )
        return rows

    # -- rate windows --------------------------------------------------------------------------
    # -- asynchronous jobs ---------------------------------------------------------------------
    @staticmethod
    def _job_from(fields: dict[str, str]) -> JobRecord:
        def opt(name: str) -> int | None:
            v = fields.get(name)
            return None if v in (None, "") else _int(v)

        return JobRecord(
            provider=fields["provider"],
            job_id=fields["job_id"],
            user_id=fields["user_id"],
            tenant=fields.get("tenant", ""),
            model=fields.get("model", ""),
            reservation_id=fields.get("reservation_id", ""),
            charged=_int(fields["charged"]),
            tokens_in=_int(fields.get("tokens_in", 0)),
            tokens_out=_int(fields.get("tokens_out", 0)),
            created_us=_int(fields.get("created_us", 0)),
            day=fields.get("day", ""),
            period=fields.get("period", ""),
            tenant_period=fields.get("tenant_period", ""),
            cost=opt("cost"),
            trued_up_us=opt("trued_up_us"),
            request_id=fields.get("request_id", ""),
        )

    def record_job(self, job: JobRecord) -> bool:
        with self._guard():
            return bool(
                self._record_job(
                    keys=[self._k("job", job.provider, job.job_id), self._k("res", job.reservation_id)],
                    args=[
                        job.provider,
                        job.job_id,
                        job.model,
                        job.reservation_id,
                        job.charged,
                        job.tokens_in,
                        job.tokens_out,
                        job.created_us,
                    ],
                )
            )

    def job(self, provider: str, job_id: str) -> JobRecord | None:
        with self._guard():
            fields = self._r.hgetall(self._k("job", provider, job_id))
        return self._job_from(fields) if fields else None

    def put_job_object(self, provider: str, key: str, record: Mapping[str, Any]) -> bool:
        with self._guard():
            return bool(
                self._r.set(self._k("jobobj", provider, key), json.dumps(dict(record)), nx=True)
            )

    def job_object(self, provider: str, key: str) -> dict[str, Any] | None:
        with self._guard():
            raw = self._r.get(self._k("jobobj", provider, key))
        return json.loads(raw) if raw else None

    def true_up_job(
        self, provider: str, job_id: str, cost: int, tokens_in: int, tokens_out: int, now_us: int
    ) -> JobRecord | None:
        with self._guard():
            out = self._true_up_job(
                keys=[self._k("job", provider, job_id)],
                args=[cost, tokens_in, tokens_out, now_us, self.prefix],
            )
        if not out:
            return None
        return self._job_from({out[i]: out[i + 1] for i in range(0, len(out), 2)})

    def rate_hit(self, key: str, limit: int, window_us: int, now_us: int) -> RateHit:
        with self._guard():
            out = self._rate_hit(keys=[self._k("rate", key)], args=_rate_args(limit, window_us, now_us))
        return _rate_result(out)

    def rate_hit_reserve(
        self, key: str, limit: int, window_us: int, now_us: int, new: NewReservation
    ) -> tuple[RateHit, ReserveResult | None]:
        """One script, one round trip (the port's default makes two: ~100 µs of loopback and
        the pool thread's wake-up each)."""
        with self._guard():
            out = self._rate_hit_reserve(
                keys=[self._k("rate", key), *self._reserve_keys(new)],
                args=[*_rate_args(limit, window_us, now_us), *self._reserve_args(new)],
            )
        return _rate_result(out[0]), _reserve_result(out[1]) if len(out) > 1 else None

    def loop_admission(self) -> LoopAdmissionStore:
        return self

    async def rate_hit_reserve_async(
        self, key: str, limit: int, window_us: int, now_us: int, new: NewReservation
    ) -> tuple[RateHit, ReserveResult | None]:
        """The same script awaited on the event loop by redis-py's asyncio client: no hand-off
        to a pool thread and back (a wake-up and a GIL handover or two each way). The store's
        timeout bounds the whole call (connect, send, reply), as one timer: the client's own
        socket timeouts cost a task (wait_for) and a timer each per call, on the loop. No retry
        (a reply lost may be a reserve that ran); a cancelled call closes its connection.
        EVALSHA straight, not through redis-py's Script (its checks cost the loop ~10% of the
        call); NOSCRIPT (a flushed or restarted Redis ran nothing) loads it and sends it again."""
        client = self._on_loop()
        keys = [self._k("rate", key), *self._reserve_keys(new)]
        argv = [*_rate_args(limit, window_us, now_us), *self._reserve_args(new)]
        sha = self._rate_hit_reserve.sha
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    out = await client.execute_command("EVALSHA", sha, len(keys), *keys, *argv)
                except redis.exceptions.NoScriptError:
                    await client.script_load(_RATE_HIT_RESERVE)
                    out = await client.execute_command("EVALSHA", sha, len(keys), *keys, *argv)
        except (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError) as e:
            raise StoreUnreachable(f"Redis state store {self._url_for_errors}: {e!r}") from e
        except redis.RedisError as e:
            raise StoreUnavailable(f"Redis state store {self._url_for_errors}: {e}") from e
        return _rate_result(out[0]), _reserve_result(out[1]) if len(out) > 1 else None

    def _on_loop(self) -> Any:
        """The asyncio client of the running event loop. Its connections belong to the loop
        that opened them: another loop (after a fork, or a test's next asyncio.run) gets a
        client of its own."""
        loop = asyncio.get_running_loop()
        held = self._loop_client
        if held is None or held[0] is not loop:
            client = redis.asyncio.Redis.from_url(
                self._url,
                decode_responses=True,
                retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
                # bounded: its callers are (addons/ratelimit.py LOOP_ADMISSIONS_MAX); past it
                # a call fails closed rather than opening connections without end
                max_connections=LOOP_CONNECTIONS_MAX,
            )
            held = (loop, client)
            self._loop_client = held
        return held[1]

    def rate_take(
        self, key: str, limit: int, n: int, window_us: int, now_us: int, stamp_us: int
    ) -> RateTake:
        prefix = f"{stamp_us}:l{uuid.uuid4().hex[:12]}:"  # members of one lease stay apart
        with self._guard():
            granted, count, oldest = self._rate_take(
                keys=[self._k("rate", key)],
                args=[now_us, window_us, limit, n, stamp_us, prefix],
            )
        return RateTake(_int(granted), _int(count), _int(oldest) if oldest else None)

    def rate_return(self, key: str, stamp_us: int, n: int) -> int:
        if n <= 0:
            return 0
        with self._guard():
            return _int(self._rate_return(keys=[self._k("rate", key)], args=[stamp_us, n]))

    # -- token windows -------------------------------------------------------------------------
    def token_admit(
        self, entry_id: str, checks: Sequence[tuple[str, int, int]], window_us: int, now_us: int
    ) -> TokenAdmit:
        keys: list[str] = []
        args: list[Any] = [now_us, window_us, entry_id, window_us // 1000 + 1000]
        for key, limit, amount in checks:
            keys += [self._k("tok", key), self._k("tokamt", key)]
            args += [limit, amount]
        with self._guard():
            out = self._token_admit(keys=keys, args=args)
        if _int(out[0]):
            return TokenAdmit(True, {k: _int(u) for (k, _l, _a), u in zip(checks, out[1:], strict=True)})
        *used, index, fits = out[1:]
        return TokenAdmit(
            False,
            {k: _int(u) for (k, _l, _a), u in zip(checks, used, strict=False)},
            checks[_int(index) - 1][0],
            _int(fits) if fits else None,
        )

    def token_correct(self, entry_id: str, amounts: Mapping[str, int]) -> None:
        keys: list[str] = []
        for key in amounts:
            keys += [self._k("tok", key), self._k("tokamt", key)]
        with self._guard():
            self._token_correct(keys=keys, args=[entry_id, *amounts.values()])

    # -- concurrency leases --------------------------------------------------------------------
    def lease_acquire(
        self, key: str, lease_id: str, limit: int, owner: str, now_us: int, ttl_us: int
    ) -> tuple[bool, int]:
        with self._guard():
            taken, held = self._lease_acquire(
                keys=[self._k("lease", key), self._k("leaseown", key), self._k("leasekeys")],
                args=[now_us, lease_id, limit, owner, now_us + ttl_us, key],
            )
        return bool(taken), _int(held)

    def lease_release(self, key: str, lease_id: str) -> bool:
        with self._guard():
            return bool(
                self._lease_release(
                    keys=[self._k("lease", key), self._k("leaseown", key)], args=[lease_id]
                )
            )

    def lease_renew(self, key: str, lease_id: str, now_us: int, ttl_us: int) -> bool:
        with self._guard():
            return bool(
                self._lease_renew(keys=[self._k("lease", key)], args=[now_us, lease_id,
                                                                      now_us + ttl_us])
            )

    def leases(self) -> list[Lease]:
        with self._guard():
            keys = sorted(self._r.smembers(self._k("leasekeys")))
            pipe = self._r.pipeline(transaction=False)
            for key in keys:
                pipe.zrange(self._k("lease", key), 0, -1, withscores=True)
                pipe.hgetall(self._k("leaseown", key))
            got = pipe.execute()
        out: list[Lease] = []
        for i, key in enumerate(keys):
            entries, owners = got[2 * i], got[2 * i + 1]
            for lease_id, score in entries:
                out.append(Lease(key, lease_id, owners.get(lease_id, ""), _int(score)))
        return out

    # -- budget alerts -------------------------------------------------------------------------
    def claim_alert(
        self, scope: str, scope_id: str, period: str, threshold: int, now_us: int, expires_us: int
    ) -> bool:
        key = self._k("alert", _SEP.join((scope, scope_id, period, str(threshold))))
        ttl_ms = max(1, (expires_us - now_us) // 1000)
        with self._guard():
            return bool(self._r.set(key, now_us, nx=True, px=ttl_ms))

    # -- settings generation -------------------------------------------------------------------
    def settings_generation(self) -> int:
        with self._guard():
            return _int(self._r.get(self._generation_key) or 0)

    # -- slice recalls -------------------------------------------------------------------------
    def recall_slices(self, scope: str, name: str, now_us: int) -> int:
        keys = [self.prefix + "slice_recalls:seq", self.prefix + "slice_recalls"]
        with self._guard():
            return _int(self._recall(keys=keys, args=[scope, name, now_us, RECALLS_KEPT]))

    def slice_recalls(self, after: int) -> tuple[int, list[SliceRecall]]:
        keys = [self.prefix + "slice_recalls:seq", self.prefix + "slice_recalls"]
        with self._guard():
            out = self._recalls(keys=keys, args=[after, RECALLS_KEPT])
        marks = []
        for m in out[1:]:
            seq, at_us, scope, name = str(m).split("|", 3)
            if int(seq) > after:
                marks.append(SliceRecall(int(seq), scope, name, int(at_us)))
        return _int(out[0]), marks

    # -- API keys ------------------------------------------------------------------------------
    @staticmethod
    def _key_record(
        record: str | None, revoked: str | None, expires: str | None = None
    ) -> KeyRecord | None:
        if record is None:
            return None
        data = json.loads(record)
        data["revoked_us"] = int(revoked) if revoked else None
        if expires:
            data["expires_us"] = int(expires)
        return KeyRecord.from_json(data)

    def put_api_key(self, record: KeyRecord) -> None:
        with self._guard():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(self._k("apikey", record.key_id), "record", json.dumps(record.to_json()))
            pipe.set(self._k("apikeydigest", record.sha256), record.key_id)
            pipe.sadd(self._k("apikeys"), record.key_id)
            pipe.incr(self._generation_key)
            pipe.execute()

    def api_key(self, sha256: str) -> KeyRecord | None:
        with self._guard():
            key_id = self._r.get(self._k("apikeydigest", sha256))
            if not key_id:
                return None
            record, revoked, expires = self._r.hmget(
                self._k("apikey", key_id), ["record", "revoked_us", "expires_us"]
            )
        return self._key_record(record, revoked, expires)

    def api_keys(self, user_id: str | None = None) -> list[KeyRecord]:
        with self._guard():
            ids = sorted(self._r.smembers(self._k("apikeys")))
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self._k("apikey", i), ["record", "revoked_us", "expires_us"])
            rows = pipe.execute()
        keys = [k for r, v, e in rows if (k := self._key_record(r, v, e)) is not None]
        keys = [k for k in keys if user_id is None or k.user_id == user_id]
        return sorted(keys, key=lambda k: (k.created_us, k.key_id))

    def revoke_api_key(self, key_id: str, now_us: int) -> KeyRecord | None:
        with self._guard():
            out = self._revoke_key(
                keys=[self._k("apikey", key_id), self._generation_key], args=[now_us]
            )
            expires = self._r.hget(self._k("apikey", key_id), "expires_us") if out else None
        return None if not out else self._key_record(out[0], out[1], expires)

    def expire_api_key(self, key_id: str, expires_us: int) -> KeyRecord | None:
        with self._guard():
            record = self._r.hget(self._k("apikey", key_id), "record")
            own = None if record is None else json.loads(record).get("expires_us")
            out = self._expire_key(
                keys=[self._k("apikey", key_id), self._generation_key],
                args=[expires_us, "" if own is None else own],
            )
        return None if not out else self._key_record(out[0], out[1], out[2])
