"""The Lua scripts of RedisStreamStorage: each runs atomically on the server.

Why scripts: a bound must be checked and the batch added in one step, or two producers could
both see room for the last message; deleting an entry must be checked against every group in
the same step, or another group's consumer could read it in between; and a batch of adds in one
call costs one command on the client instead of one per message. Entries that a consumer
acknowledged and died before deleting are swept from the head by the next ``CLEANUP`` of any
consumer (an exact ``XTRIM MINID`` below what every group still needs).

Stream IDs are compared as ``(milliseconds, sequence)`` numbers: Lua's numbers are doubles,
exact up to 2**53, which covers every ID that ``XADD *`` generates.

Replies go through RESP2: ``XINFO GROUPS`` gives each group as a flat list of field names and
values; a nil becomes ``false`` in Lua.
"""

import hashlib

__all__ = ["ADD", "CLEANUP", "COUNT", "PEEK", "Script"]

_HELPERS = """
local function field(list, name)
  for i = 1, #list, 2 do
    if list[i] == name then return list[i + 1] end
  end
  return nil
end

local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function id_after(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  if am ~= bm then return am > bm end
  return as > bs
end

local function id_next(id)
  local ms, seq = id_parts(id)
  return string.format('%d-%d', ms, seq + 1)
end

-- The entries a group still needs: its pending list plus those not yet delivered to it.
local function needed_by_group(key, info)
  local lag = field(info, 'lag')
  if not lag then  -- the server cannot tell (deletions after its last delivered entry): count
    lag = #redis.call('XRANGE', key, '(' .. field(info, 'last-delivered-id'), '+')
  end
  return field(info, 'pending') + lag
end

-- Whether some group other than `except` still needs entry `id`.
local function needed(key, groups, id, except)
  for _, info in ipairs(groups) do
    local name = field(info, 'name')
    if name ~= except and (id_after(id, field(info, 'last-delivered-id'))
        or #redis.call('XPENDING', key, name, id, id, 1) > 0) then
      return true
    end
  end
  return false
end

-- Trim what no group needs from the head: below every group's oldest pending entry and at or
-- before every group's last delivered one (exact MINID, never approximate).
local function sweep(key, groups)
  if #groups == 0 then return end
  local safe = nil
  for _, info in ipairs(groups) do
    local limit = id_next(field(info, 'last-delivered-id'))
    local oldest = redis.call('XPENDING', key, field(info, 'name'), '-', '+', 1)[1]
    if oldest and id_after(limit, oldest[1]) then limit = oldest[1] end
    if safe == nil or id_after(safe, limit) then safe = limit end
  end
  redis.call('XTRIM', key, 'MINID', '=', safe)
end

local function in_chunks(command, key, prefix, ids)
  for start = 1, #ids, 1000 do
    local last = math.min(start + 999, #ids)
    local chunk = {}
    for i = start, last do chunk[#chunk + 1] = ids[i] end
    if prefix then
      redis.call(command, key, prefix, unpack(chunk))
    else
      redis.call(command, key, unpack(chunk))
    end
  end
end
"""


class Script:
    """A Lua script and its SHA1, as ``EVALSHA`` names it."""

    def __init__(self, name: str, body: str) -> None:
        """Keep ``body`` (the helpers are prepended) under ``name`` for error messages."""
        self.name = name
        self.source = _HELPERS + body
        self.sha = hashlib.sha1(self.source.encode("utf-8"), usedforsecurity=False).hexdigest()


#: KEYS[1] the stream; ARGV[1] max_messages (0: unbounded), ARGV[2] the overflow policy, then a
#: field name and a value per message. Returns ``{accepted, dropped_oldest, dropped_newest}``
#: (with drop_oldest every message is accepted, the oldest of the batch maybe dropped at once), or
#: ``{-1, pending, max}`` when ``overflow="raise"`` refuses the batch (nothing was added).
#: The bound counts the entries the most behind group still needs (acknowledged entries not yet
#: deleted do not count). drop_oldest acknowledges what it drops in every group before deleting
#: it, so no pending list keeps an entry of a deleted message.
ADD = Script(
    "add",
    """
local key = KEYS[1]
local max = tonumber(ARGV[1])
local policy = ARGV[2]
local first = 3
local n = (#ARGV - 2) / 2
local accepted = n
local dropped_old, dropped_new = 0, 0
if max > 0 then
  local groups = redis.call('XINFO', 'GROUPS', key)
  local pending = 0
  if #groups == 0 then pending = redis.call('XLEN', key) end
  for _, info in ipairs(groups) do pending = math.max(pending, needed_by_group(key, info)) end
  local excess = pending + n - max
  if excess > 0 then
    if policy == 'raise' then return {-1, pending, max} end
    if policy == 'drop_newest' then
      local room = math.max(max - pending, 0)
      dropped_new = n - room
      n = room
      accepted = room
    else
      sweep(key, groups)
      local from_stream = math.min(excess, pending)
      local doomed = {}
      local start = '-'
      while #doomed < from_stream do
        local batch = redis.call('XRANGE', key, start, '+', 'COUNT', 100)
        if #batch == 0 then break end
        local garbage = {}
        for _, entry in ipairs(batch) do
          if #doomed < from_stream and needed(key, groups, entry[1], nil) then
            doomed[#doomed + 1] = entry[1]
          elseif #doomed < from_stream then
            garbage[#garbage + 1] = entry[1]  -- acknowledged everywhere, not yet deleted
          end
        end
        if #garbage > 0 then in_chunks('XDEL', key, nil, garbage) end
        start = '(' .. batch[#batch][1]
      end
      if #doomed > 0 then
        for _, info in ipairs(groups) do in_chunks('XACK', key, field(info, 'name'), doomed) end
        in_chunks('XDEL', key, nil, doomed)
      end
      local skip = math.min(excess - #doomed, n)
      first = first + 2 * skip
      n = n - skip
      dropped_old = excess
    end
  end
end
for i = 0, n - 1 do
  redis.call('XADD', key, '*', ARGV[first + 2 * i], ARGV[first + 2 * i + 1])
end
return {accepted, dropped_old, dropped_new}
""",
)

#: KEYS[1] the stream; ARGV[1] the group, ARGV[2] how many IDs follow to acknowledge, then
#: those IDs, then IDs acknowledged already. Acknowledges the first ones in the group, deletes
#: every one that no other group still needs (not yet delivered to it, or in its pending list),
#: then sweeps the head (see ``sweep``: what a consumer that died between its acknowledgements
#: and their deletion left). Returns how many were acknowledged.
CLEANUP = Script(
    "cleanup",
    """
local key, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local to_ack = tonumber(ARGV[2])
local acks, ids = {}, {}
for i = 3, #ARGV do
  ids[#ids + 1] = ARGV[i]
  if i < 3 + to_ack then acks[#acks + 1] = ARGV[i] end
end
local acked = 0
if #acks > 0 then acked = redis.call('XACK', key, group, unpack(acks)) end
local groups = redis.call('XINFO', 'GROUPS', key)
local gone = {}
for _, id in ipairs(ids) do
  if not needed(key, groups, id, group) then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('XDEL', key, unpack(gone)) end
sweep(key, groups)
return acked
""",
)

#: KEYS[1] the stream; ARGV[1] the group. Returns ``{length, group pending, lag, groups}``;
#: ``{length, -1, -1, groups}`` if the group does not exist. The lag is the server's, or counted
#: when the server cannot tell (deletions after the group's last delivered entry).
COUNT = Script(
    "count",
    """
local key, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', key) == 0 then return {0, -1, -1, 0} end
local length = redis.call('XLEN', key)
local groups = redis.call('XINFO', 'GROUPS', key)
for _, info in ipairs(groups) do
  if field(info, 'name') == group then
    local pending = field(info, 'pending')
    return {length, pending, needed_by_group(key, info) - pending, #groups}
  end
end
return {length, -1, -1, #groups}
""",
)

#: KEYS[1] the stream; ARGV[1] the group, ARGV[2] an entry ID (exclusive) to start after, ARGV[3]
#: how many. Returns up to that many ``{id, fields}`` entries the group has not acknowledged
#: (not yet delivered, or in its pending list), in stream order: a look that changes nothing.
PEEK = Script(
    "peek",
    """
local key, group, start, want = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', key) == 0 then return {} end
local last = nil
for _, info in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  if field(info, 'name') == group then last = field(info, 'last-delivered-id') end
end
if last == nil then return {} end
local found = {}
while #found < want do
  local batch = redis.call('XRANGE', key, '(' .. start, '+', 'COUNT', 100)
  if #batch == 0 then break end
  for _, entry in ipairs(batch) do
    if #found < want and (id_after(entry[1], last)
        or #redis.call('XPENDING', key, group, entry[1], entry[1], 1) > 0) then
      found[#found + 1] = entry
    end
  end
  start = batch[#batch][1]
end
return found
""",
)
