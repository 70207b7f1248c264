"""
The Lua scripts of :class:`~modelslab_async.stores.RedisStore`.

Every script works on one account's keys, which share the hash tag
``{<account>}`` and so one cluster slot. ``ARGV[1]`` is always the
account's key prefix (``mla:{<account>}:``), ``ARGV[2]`` the retention in
milliseconds and ``ARGV[3]`` the calling journal's id; the keys a script
reaches besides ``KEYS[1]`` are made from the prefix. Every clock reading
is the server's ``TIME``: a client's clock is never trusted with a lease.

Only commands Redis 6.2 has: no functions, no hash-field expiry.
"""

from __future__ import annotations

from typing import Final


__all__ = [
    "ABANDON",
    "ADOPT",
    "CLAIM",
    "FIND",
    "KICK",
    "LEAVE",
    "RECORD",
    "RESTORE",
]

# What every script shares. `wake` hands a freed slot to the first waiting
# journal that is still alive; dead ones are dropped from the queue.
# A journal in the queue has left an offer (`offer:<journal>`): the claim
# of its oldest waiting submit, as the claim script would write it. `wake`
# grants that claim there and then (the job's record, its slot) and tells
# the journal through its inbox stream, so the waiter resolves on reading
# it, without a claim of its own: one round trip less per hand-off. A
# journal without an offer (or whose offered track_id was taken meanwhile)
# gets the slot held for it instead, by a placeholder member of `slots`
# named after it (`~<journal>:<n>`, lapsing with the journal's presence),
# until its claim comes: a claim another process sends meanwhile finds
# the cap full and queues behind, rather than taking the slot in the
# milliseconds the woken journal needs to claim it, every time. When the
# woken journal is the caller, nothing is written to its inbox: the
# script returns the grant (`=<nonce>:<track_id>`) or the held slot.
_PRELUDE: Final = """
local P = ARGV[1]
local RET = tonumber(ARGV[2])
local ME = ARGV[3]
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local SLOTS = P .. 'slots'
local PROCS = P .. 'procs'
local WAITQ = P .. 'waitq'
local MAXLEN = '1000'

local function touch(key)
  redis.call('PEXPIRE', key, RET)
end

local function finished(phase)
  return phase == 'succeeded' or phase == 'failed'
end

-- An uncertain job may be queued on the server: it keeps its slot until
-- its webhook, or its client's hold, settles it.
local function holds_slot(phase)
  return phase == 'submitting' or phase == 'queued' or phase == 'uncertain'
end

local function notify(proc, fields)
  local inbox = P .. 'inbox:' .. proc
  local id = redis.call('XADD', inbox, 'MAXLEN', '~', MAXLEN, '*',
    unpack(fields))
  touch(inbox)
  return id
end

-- Whether stream entry id `a` comes after `b`.
local function after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then
    return false
  end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end

-- The last entry of `proc`'s inbox handed to its reader (its consumer
-- group says), or nil: no inbox (it left), or no group.
local function delivered(proc)
  local groups = redis.pcall('XINFO', 'GROUPS', P .. 'inbox:' .. proc)
  if type(groups) ~= 'table' or groups.err then
    return nil
  end
  for _, group in ipairs(groups) do
    for i = 1, #group - 1, 2 do
      if group[i] == 'last-delivered-id' then
        return group[i + 1]
      end
    end
  end
  return nil
end

-- Whether `proc` has not been handed its inbox entry `id` yet. No inbox:
-- it left, and may have read it.
local function unread(proc, id)
  local last = delivered(proc)
  return last ~= nil and after(id, last)
end

local function enqueue(proc, front)
  if not redis.call('LPOS', WAITQ, proc) then
    if front then
      redis.call('LPUSH', WAITQ, proc)
    else
      redis.call('RPUSH', WAITQ, proc)
    end
    touch(WAITQ)
  end
end

-- Grant the claim `proc` offered, if its track_id is still free: the
-- grant, or nil (then the slot is held for `proc` instead).
local function grant(proc)
  local offer = P .. 'offer:' .. proc
  local o = redis.call('HMGET', offer, 't', 's', 'p', 'n', 'h', 'l', 'm')
  if not o[1] then
    return nil
  end
  redis.call('DEL', offer)
  local job = P .. 'job:' .. o[1]
  if redis.call('EXISTS', job) == 1 then
    return nil
  end
  redis.call('HSET', job, 's', o[2], 'p', o[3], 'o', proc, 'n', o[4])
  touch(job)
  redis.call('ZADD', SLOTS, NOW + tonumber(o[6]), o[1])
  touch(SLOTS)
  if o[5] ~= '' then
    redis.call('SET', o[5], o[1], 'PX', RET)
  end
  redis.call('SET', P .. 'epoch', '1', 'PX', RET)
  if o[7] == '1' then
    enqueue(proc, false)
  end
  if proc == ME then
    return '=' .. o[4] .. ':' .. o[1]
  end
  -- The grant's inbox entry, kept with the job: until the journal has
  -- read it, the journal cannot have sent anything for the job.
  local id = notify(proc, {'k', 'g', 't', o[1], 'n', o[4]})
  redis.call('HSET', job, 'g', id)
  return ''
end

local function wake(skip_self)
  while true do
    local proc = redis.call('LPOP', WAITQ)
    if not proc then
      return ''
    end
    local alive = redis.call('ZSCORE', PROCS, proc)
    local granted = nil
    if alive and tonumber(alive) >= NOW and
        not (skip_self and proc == ME) then
      granted = grant(proc)
    else
      -- Gone, or leaving: its offer goes with it.
      redis.call('DEL', P .. 'offer:' .. proc)
    end
    if granted then
      return granted
    elseif alive and tonumber(alive) >= NOW and
        not (skip_self and proc == ME) then
      local seq = P .. 'seq'
      local held = '~' .. proc .. ':' .. redis.call('INCR', seq)
      touch(seq)
      redis.call('ZADD', SLOTS, alive, held)
      if proc ~= ME then
        notify(proc, {'k', 'w', 'r', held})
      end
      return held
    end
  end
end

local function release(track_id)
  if redis.call('ZREM', SLOTS, track_id) == 1 then
    return wake(false)
  end
  return ''
end

-- Undo a claim nothing was sent for: its record, its callback's key and
-- its slot.
local function withdraw(track_id, job)
  local ok, data = pcall(cjson.decode, redis.call('HGET', job, 's'))
  if ok and type(data) == 'table' and type(data.webhook_id) == 'string' then
    redis.call('DEL', P .. 'hook:' .. data.webhook_id)
  end
  redis.call('DEL', job)
  return release(track_id)
end
"""

#: Take a slot and journal a job: a compare-and-set on its track_id.
#: KEYS: job. ARGV[4..]: track_id, state, phase, nonce, cap (-1: none),
#: lease ms, mode ("try" or "next": woken, so back to the queue's front),
#: more ("1": other claims of this journal wait), hook key ("" for none),
#: recovery window ms, the slot held for this journal by `wake` that the
#: claim takes ("" for none), offer ("1": when full, leave this claim as
#: the journal's offer, for `wake` to grant).
#: Returns {"won", granted, woke}, {"known", state, woke}, {"full",
#: offer replaced} or {"wait", ms}. "granted" is the grant's inbox entry
#: when `wake` granted this very claim to this journal from another one
#: before, else "". "woke": when the claim finds its track_id journaled,
#: the slot held for it (if any) is passed on, and "woke" is what `wake`
#: returned. "offer replaced" is the
#: nonce of the offer this one replaced, which can no longer be granted
#: ("" for none), or absent when no offer was left. "wait": the account
#: has no keys on a server younger than the recovery window (a restart
#: without persistence looks like this), so live journals get the time of
#: one heartbeat to put their jobs back before anyone takes a slot.
CLAIM: Final = (
    _PRELUDE
    + """
local job = KEYS[1]
local track_id, state, phase, nonce = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local cap, lease = tonumber(ARGV[8]), tonumber(ARGV[9])
local mode, more, hook = ARGV[10], ARGV[11], ARGV[12]
local window, held, offers = tonumber(ARGV[13]), ARGV[14], ARGV[15]
local known = redis.call('HMGET', job, 's', 'n', 'g')
if known[1] then
  -- A slot held for this claim that it does not need goes to the next in
  -- line.
  local woke = ''
  if held ~= '' and redis.call('ZREM', SLOTS, held) == 1 then
    woke = wake(false)
  end
  if known[2] == nonce then
    if known[3] then
      redis.call('HSET', job, 'd', '1')
    end
    return {'won', known[3] or '', woke}
  end
  return {'known', known[1], woke}
end
local offer = P .. 'offer:' .. ME
local epoch = P .. 'epoch'
if cap >= 0 then
  if redis.call('EXISTS', epoch) == 0 then
    local info = redis.call('INFO', 'server')
    local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
    local left = window - up * 1000
    if left > 0 then
      return {'wait', tostring(left)}
    end
  end
  if held ~= '' then
    redis.call('ZREM', SLOTS, held)
  end
  if redis.call('ZCARD', SLOTS) >= cap then
    enqueue(ME, mode == 'next')
    if offers ~= '1' then
      return {'full'}
    end
    local replaced = redis.call('HGET', offer, 'n') or ''
    redis.call('HSET', offer, 't', track_id, 's', state, 'p', phase,
      'n', nonce, 'h', hook, 'l', lease, 'm', more)
    touch(offer)
    return {'full', replaced}
  end
end
if redis.call('HGET', offer, 'n') == nonce then
  redis.call('DEL', offer)
end
redis.call('HSET', job, 's', state, 'p', phase, 'o', ME, 'n', nonce)
touch(job)
redis.call('ZADD', SLOTS, NOW + lease, track_id)
touch(SLOTS)
if hook ~= '' then
  redis.call('SET', hook, track_id, 'PX', RET)
end
redis.call('SET', epoch, '1', 'PX', RET)
if more == '1' then
  enqueue(ME, false)
end
return {'won', '', ''}
"""
)

#: Journal a later state; a finished one is never replaced. A finished
#: state also frees the job's slot (it left the queue), and reaches the
#: job's owner, when that is another journal, through its inbox.
#: KEYS: job. ARGV[4..]: track_id, state, phase, release ("1": free the
#: slot whatever the phase: settle), hook key ("" for none).
#: Returns {stored state if a finished one won, else "", slot held for
#: the journal woken ("" for none)}.
RECORD: Final = (
    _PRELUDE
    + """
local job = KEYS[1]
local track_id, state, phase = ARGV[4], ARGV[5], ARGV[6]
local free, hook = ARGV[7], ARGV[8]
local cur = redis.call('HMGET', job, 's', 'p', 'o')
local kept = ''
if finished(cur[2]) then
  kept = cur[1]
else
  redis.call('HSET', job, 's', state, 'p', phase)
  touch(job)
  if hook ~= '' then
    redis.call('SET', hook, track_id, 'PX', RET)
  end
  local owner = cur[3]
  if finished(phase) and owner and owner ~= ME and
      redis.call('ZSCORE', PROCS, owner) then
    notify(owner, {'k', 's', 's', state})
  end
end
local woke = ''
if free == '1' or finished(phase) or kept ~= '' then
  woke = release(track_id)
end
return {kept, woke}
"""
)

#: Give back a refused submit's slot and forget its claim, when the claim
#: is this one (its nonce; "" for any claim).
#: KEYS: job. ARGV[4..]: track_id, nonce.
#: Returns the slot held for the journal woken ("" for none).
ABANDON: Final = (
    _PRELUDE
    + """
local job = KEYS[1]
local track_id, nonce = ARGV[4], ARGV[5]
local offer = P .. 'offer:' .. ME
if nonce ~= '' and redis.call('HGET', offer, 'n') == nonce then
  redis.call('DEL', offer)
end
local cur = redis.call('HMGET', job, 'p', 'n')
-- Only this claim's slot: one that came back known (another process's
-- job, still queued) is not this claim's to free.
if nonce ~= '' and cur[2] ~= nonce then
  return ''
end
if cur[1] == 'submitting' then
  return withdraw(track_id, job)
end
return release(track_id)
"""
)

#: The state of the job a callback's registration id names.
#: KEYS: hook. Returns the state, or nil.
FIND: Final = """
local track_id = redis.call('GET', KEYS[1])
if not track_id then
  return false
end
return redis.call('HGET', ARGV[1] .. 'job:' .. track_id, 's')
"""

#: The journal's heartbeat, one call per lease/3 for all its jobs: renew
#: its presence and the leases of the jobs it owns, trim what it read of
#: its inbox, take over lapsed jobs of other journals (a compare-and-set
#: of their owner: the slot stays taken), and hand a free slot to a
#: waiting journal whose wake-up was lost.
#: KEYS: slots. ARGV[4..]: lease ms, inbox id read up to ("" for none),
#: jobs to adopt at most (0: none), cap (-1: none), owned track_ids...
#: Returns {missing, lost, adopted states, slots held for this journal,
#: ms until the next lease of another journal lapses (-1: none within a
#: lease, or not adopting)}: owned jobs the store no longer has (restore
#: them), owned jobs another journal took, and the slots `wake` held for
#: this very journal (others learn theirs from their inboxes). A lapsed
#: `~` member is a held slot whose journal died before claiming it: it is
#: freed like a job's. A live journal renews every third of a lease, so
#: a lapse due sooner than that is a journal that stopped renewing: the
#: caller comes back for its jobs the moment they lapse.
ADOPT: Final = (
    _PRELUDE
    + """
local lease, read_to = tonumber(ARGV[4]), ARGV[5]
local limit, cap = tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('ZADD', PROCS, NOW + lease, ME)
redis.call('ZREMRANGEBYSCORE', PROCS, '-inf', '(' .. (NOW - RET))
touch(PROCS)
if redis.call('EXISTS', P .. 'epoch') == 1 then
  touch(P .. 'epoch')
end
local mine, missing, lost, adopted = {}, {}, {}, {}
for i = 8, #ARGV do
  local track_id = ARGV[i]
  mine[track_id] = true
  local job = P .. 'job:' .. track_id
  local cur = redis.call('HMGET', job, 'o', 'p')
  if not cur[2] then
    table.insert(missing, track_id)
  elseif cur[1] ~= ME then
    table.insert(lost, track_id)
  else
    touch(job)
    if holds_slot(cur[2]) then
      redis.call('ZADD', SLOTS, NOW + lease, track_id)
    end
  end
end
local inbox = P .. 'inbox:' .. ME
if read_to ~= '' then
  redis.call('XTRIM', inbox, 'MINID', read_to)
end
if redis.call('EXISTS', inbox) == 1 then
  touch(inbox)
end
local woke = {}
local mark = '~' .. ME .. ':'
local function woken(held)
  if string.sub(held, 1, #mark) == mark or string.sub(held, 1, 1) == '=' then
    table.insert(woke, held)
  end
end
if limit > 0 then
  local lapsed = redis.call(
    'ZRANGEBYSCORE', SLOTS, '-inf', '(' .. NOW, 'LIMIT', 0, limit)
  for _, track_id in ipairs(lapsed) do
    if not mine[track_id] then
      local job = P .. 'job:' .. track_id
      local cur = redis.call('HMGET', job, 's', 'o', 'p', 'g', 'd')
      if not cur[1] or not holds_slot(cur[3]) then
        -- Nothing left to watch: the record is gone, or the job ended.
        woken(release(track_id))
      elseif cur[3] == 'submitting' and cur[4] and not cur[5] and
          unread(cur[2], cur[4]) then
        -- Granted to a journal that died before reading its grant: it
        -- sent nothing. The grant goes, so it never reads it after all.
        redis.call('XDEL', P .. 'inbox:' .. cur[2], cur[4])
        woken(withdraw(track_id, job))
      else
        -- Another journal's, or one this journal lost track of (its
        -- caller never listed it): adopted, so someone watches it again.
        redis.call('HSET', job, 'o', ME)
        -- A grant's entry is in its first owner's inbox only.
        redis.call('HDEL', job, 'g', 'd')
        touch(job)
        redis.call('ZADD', SLOTS, NOW + lease, track_id)
        table.insert(adopted, cur[1])
      end
    end
  end
end
if redis.call('EXISTS', SLOTS) == 1 then
  touch(SLOTS)
end
if cap >= 0 and redis.call('ZCARD', SLOTS) < cap then
  woken(wake(false))
end
local soon = -1
if limit > 0 then
  -- This journal's own deadlines are NOW + lease, the latest there are.
  local first = redis.call('ZRANGE', SLOTS, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) < NOW + lease then
    soon = math.max(0, tonumber(first[2]) - NOW)
  end
end
return {missing, lost, adopted, woke, soon}
"""
)

#: Put back jobs this journal owns that the store lost (a restart without
#: persistence): their slots too, so the cap counts them again.
#: KEYS: slots. ARGV[4..]: lease ms, then per job: track_id, state, phase,
#: nonce, hook key ("" for none).
RESTORE: Final = (
    _PRELUDE
    + """
local lease = tonumber(ARGV[4])
for i = 5, #ARGV, 5 do
  local track_id, state, phase = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local nonce, hook = ARGV[i + 3], ARGV[i + 4]
  local job = P .. 'job:' .. track_id
  if redis.call('EXISTS', job) == 0 then
    redis.call('HSET', job, 's', state, 'p', phase, 'o', ME, 'n', nonce)
    touch(job)
    if hook ~= '' then
      redis.call('SET', hook, track_id, 'PX', RET)
    end
    if holds_slot(phase) then
      redis.call('ZADD', SLOTS, NOW + lease, track_id)
      touch(SLOTS)
    end
  end
end
return 0
"""
)

#: Pass on a wake-up this journal has no use for: give back the slot held
#: for it and hand the free slot to the next waiting journal.
#: KEYS: slots. ARGV[4..]: cap, the slot held ("" for none).
#: Returns the slot held for the journal woken ("" for none).
KICK: Final = (
    _PRELUDE
    + """
if ARGV[5] ~= '' then
  redis.call('ZREM', SLOTS, ARGV[5])
end
if redis.call('ZCARD', SLOTS) < tonumber(ARGV[4]) then
  return wake(true)
end
return ''
"""
)

#: A journal closes: it leaves the waiting queue and the live set, drops
#: its inbox and its offer, passes on the slots held for it, undoes the
#: claims `wake` granted it that it never took (the grant's entry was
#: never handed to its reader, or the journal lists the claim: its submit
#: was gone), and hands its unfinished jobs over at once (their
#: leases end now, so a live journal adopts them on its next heartbeat).
#: KEYS: slots. ARGV[4..]: the number of owned track_ids, the owned
#: track_ids, then track_id, nonce of each claim offered and not taken.
LEAVE: Final = (
    _PRELUDE
    + """
redis.call('ZREM', PROCS, ME)
redis.call('LREM', WAITQ, 0, ME)
redis.call('DEL', P .. 'offer:' .. ME)
-- Grants still in the inbox, never handed to the reader: nothing was sent.
local inbox = P .. 'inbox:' .. ME
local last = delivered(ME)
if last then
  for _, entry in ipairs(redis.call('XRANGE', inbox, '(' .. last, '+')) do
    local f = {}
    for i = 1, #entry[2] - 1, 2 do
      f[entry[2][i]] = entry[2][i + 1]
    end
    if f.k == 'g' and f.t and f.n then
      local job = P .. 'job:' .. f.t
      local cur = redis.call('HMGET', job, 'n', 'p', 'd')
      if cur[1] == f.n and cur[2] == 'submitting' and not cur[3] then
        withdraw(f.t, job)
      end
    end
  end
end
redis.call('DEL', inbox)
local owned = tonumber(ARGV[4])
for i = 5 + owned, #ARGV, 2 do
  local track_id, nonce = ARGV[i], ARGV[i + 1]
  local job = P .. 'job:' .. track_id
  if redis.call('HGET', job, 'n') == nonce and
      redis.call('HGET', job, 'p') == 'submitting' then
    withdraw(track_id, job)
  end
end
local mark = '~' .. ME .. ':'
for _, member in ipairs(redis.call('ZRANGE', SLOTS, 0, -1)) do
  if string.sub(member, 1, #mark) == mark then
    redis.call('ZREM', SLOTS, member)
    wake(true)
  end
end
for i = 5, 4 + owned do
  local track_id = ARGV[i]
  if redis.call('HGET', P .. 'job:' .. track_id, 'o') == ME then
    redis.call('ZADD', SLOTS, 'XX', 0, track_id)
  end
end
return 0
"""
)
