"""The Lua scripts of RedisStreamStorage: each runs atomically on the server.

Why scripts: a bound must be checked and the batch added in one step, or two producers could
both see room for the last message; an acknowledgement and the deletion of what no group needs
any more must be one step, or a crash between them leaves entries that nobody deletes; and a
batch of adds in one call costs one command on the client instead of one per message.

Stream IDs are compared as ``(milliseconds, sequence)`` numbers: Lua's numbers are doubles,
exact up to 2**53, which covers every ID that ``XADD *`` generates.

Replies go through RESP2: ``XINFO GROUPS`` gives each group as a flat list of field names and
values; a nil becomes ``false`` in Lua.
"""

import hashlib

__all__ = ["ACK", "ADD", "COUNT", "Script"]

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
#: ``{-1, length, max}`` when ``overflow="raise"`` refuses the batch (nothing was added).
#: drop_oldest acknowledges what it drops in every group before deleting it, so no pending list
#: keeps an entry of a deleted message.
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
  local len = redis.call('XLEN', key)
  local excess = len + n - max
  if excess > 0 then
    if policy == 'raise' then return {-1, len, max} end
    if policy == 'drop_newest' then
      local room = math.max(max - len, 0)
      dropped_new = n - room
      n = room
      accepted = room
    else
      local from_stream = math.min(excess, len)
      if from_stream > 0 then
        local ids = {}
        for i, entry in ipairs(redis.call('XRANGE', key, '-', '+', 'COUNT', from_stream)) do
          ids[i] = entry[1]
        end
        for _, group in ipairs(redis.call('XINFO', 'GROUPS', key)) do
          in_chunks('XACK', key, field(group, 'name'), ids)
        end
        in_chunks('XDEL', key, nil, ids)
      end
      local skip = excess - from_stream
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

#: KEYS[1] the stream; ARGV[1] the group, ARGV[2...] entry IDs. Acknowledges the IDs in the
#: group, then deletes those that no other group still needs (not yet delivered to it, or in
#: its pending list). Returns how many were acknowledged.
ACK = Script(
    "ack",
    """
local key, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
local acked = redis.call('XACK', key, group, unpack(ids))
local others = {}
for _, info in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local name = field(info, 'name')
  if name ~= group then
    others[#others + 1] = {name, field(info, 'last-delivered-id')}
  end
end
local gone = {}
for _, id in ipairs(ids) do
  local needed = false
  for _, other in ipairs(others) do
    if id_after(id, other[2]) or #redis.call('XPENDING', key, other[1], id, id, 1) > 0 then
      needed = true
      break
    end
  end
  if not needed then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('XDEL', key, unpack(gone)) end
return acked
""",
)

#: KEYS[1] the stream; ARGV[1] the group. Returns ``{length, group pending, lag, groups}``;
#: ``{length, -1, -1, groups}`` if the group does not exist. With one group every entry is in
#: its pending list or not yet delivered (acknowledged entries are deleted), so the lag is the
#: length minus the pending count; with several the server's lag is used, or counted when the
#: server cannot tell (deletions after the group's last delivered entry).
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
    local lag
    if #groups == 1 then
      lag = math.max(length - pending, 0)
    else
      lag = field(info, 'lag')
      if not lag then
        lag = #redis.call('XRANGE', key, '(' .. field(info, 'last-delivered-id'), '+')
      end
    end
    return {length, pending, lag, #groups}
  end
end
return {length, -1, -1, #groups}
""",
)
