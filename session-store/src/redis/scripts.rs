//! The Lua scripts that keep each client's keys consistent. Every script touches the keys of one
//! client only (one hash tag, so one Cluster slot) and runs atomically.

use std::sync::LazyLock;

use redis::Script;

/// KEYS: session, queue, counter, watermark. ARGV: max length, entry, shard, log position
/// (shard '' = no log).
///
/// Entries start with their origin (`shard@position`, see `queue_value`), so a replay — a log
/// position at or below the shard's watermark for this client — finds the copy queued the
/// first time and returns its queue position instead of queueing it again. Returns the queue
/// position, -1 if the session does not exist, -2 if its queue is full, -3 if a replayed
/// position is no longer queued (it was delivered and acknowledged). An offline session's keys
/// expire together: new keys get the session's TTL.
///
/// Queue positions never repeat for a client, even across its keys being deleted (a clean
/// session ended, a session expired): a new counter starts at Redis time in microseconds, as
/// connection epochs do, so an acknowledgement retried late by an earlier session's connection
/// cannot remove a newer session's message. (Below 2^53, so exact as a Lua number; written
/// with `%d`, since Lua's own number formatting would round it.)
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'rec') == 0 then return -1 end
local shard = ARGV[3]
local pos = tonumber(ARGV[4])
if shard ~= '' then
  local last = redis.call('HGET', KEYS[4], shard)
  if last then
    local lpos, lseq = string.match(last, '(%d+):(%d+)')
    lpos = tonumber(lpos)
    if pos == lpos then
      if redis.call('HEXISTS', KEYS[2], lseq) == 1 then return tonumber(lseq) end
      return -3
    end
    if pos < lpos then
      local origin = shard .. '@' .. ARGV[4] .. '\n'
      local fields = redis.call('HGETALL', KEYS[2])
      for i = 1, #fields, 2 do
        if string.sub(fields[i + 1], 1, #origin) == origin then return tonumber(fields[i]) end
      end
      return -3
    end
  end
end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[1]) then return -2 end
local seq
if redis.call('EXISTS', KEYS[3]) == 1 then
  seq = string.format('%d', redis.call('INCR', KEYS[3]))
else
  local t = redis.call('TIME')
  seq = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('SET', KEYS[3], seq)
end
redis.call('HSET', KEYS[2], seq, ARGV[2])
if shard ~= '' then redis.call('HSET', KEYS[4], shard, pos .. ':' .. seq) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
return tonumber(seq)
"#,
    )
});

/// KEYS: the client's six keys. ARGV: record, epoch, ttl ms (0: none), session expiry interval
/// in ms (0: never expires).
/// Refuses (returns 0) a record from an older connection epoch than the stored one: a proxy that
/// lost the session to another cannot overwrite it (fencing). Returns 1 when written. The
/// expiry interval is kept beside the record so that whoever orphans the session (its proxy
/// died) can start its expiry without decoding the record.
pub static PUT_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local epoch = tonumber(ARGV[2])
if stored and stored > epoch then return 0 end
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'epoch', epoch, 'expiry_ms', ARGV[4])
local ttl = tonumber(ARGV[3])
for i = 1, 6 do
  if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
end
return 1
"#,
    )
});

/// KEYS: the client's six keys. ARGV: epoch.
/// Ends a session's stored state — record, queue, markers, will — unless a newer connection
/// owns it (returns 0). Ownership (owner, epoch) stays: the caller may still hold the claim.
pub static DROP_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
if stored and stored > tonumber(ARGV[1]) then return 0 end
redis.call('HDEL', KEYS[1], 'rec', 'will', 'will_delay_ms', 'expiry_ms')
for i = 2, 6 do redis.call('DEL', KEYS[i]) end
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 1
"#,
    )
});

/// KEYS: session. ARGV: epoch, will (empty: none), delay in ms.
/// Records the will of the connection with this epoch, where any proxy can find it if this
/// one dies. Returns 0 if a newer connection owns the session.
pub static SET_WILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
if stored and stored ~= tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'will', 'will_delay_ms')
else
  redis.call('HSET', KEYS[1], 'will', ARGV[2], 'will_delay_ms', ARGV[3])
end
return 1
"#,
    )
});

// === wills: each published exactly once ===
//
// Every will of a cluster is published through one record, the wills-taken hash (`wt:`, field:
// the epoch of the connection the will belongs to):
// - `intent\n<proxy>\n<will>`: that proxy took the will and is publishing it. If it dies first,
//   the settlement of it hands the intent to the settling proxy (`ORPHAN`), which publishes it.
// - `published\n<shard>@<token>`: a shard accepted it (`ACCEPT_WILL`, run by the shard after the
//   will is in its log and before anyone receives it); nobody publishes it again.
// - `discarded`: the connection ended with a normal DISCONNECT [MQTT-3.1.2-10].
// - `scheduled`: a delayed will left in the session by a settlement, for `TAKE_WILL`.
// The hash lives 10 minutes after its last change: far longer than any retry of a will.

/// KEYS: session, wills taken, replaced connections. ARGV: epoch, proxy id, will. The
/// connection with `epoch` ended and its proxy is about to publish its will: records the
/// intent (1), unless someone else already holds the will (0: a dead-proxy settlement took it,
/// its proxy having been only paused or cut off). The will is removed from the session if the
/// connection still owns it.
pub static WITHDRAW_WILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HSETNX', KEYS[2], ARGV[1], 'intent\n' .. ARGV[2] .. '\n' .. ARGV[3]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[2], 600000)
redis.call('HDEL', KEYS[3], ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'epoch')) == tonumber(ARGV[1]) then
  redis.call('HDEL', KEYS[1], 'will', 'will_delay_ms')
end
return 1
"#,
    )
});

/// KEYS: wills taken. ARGV: epoch, proxy id, `<shard>@<token>`. Run by the shard that holds
/// a will in its log, before it routes it: 1 if the will is to be published — the proxy's
/// intent is recorded (or no record exists: it was published without one, or long ago), or
/// this same acceptance is asked again (a replay of the shard's log after a crash) — else 0:
/// another shard or log entry published it already, or the intent belongs to another proxy
/// now (the sender was taken for dead and settled).
pub static ACCEPT_WILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local done = 'published\n' .. ARGV[3]
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v == done then return 1 end
if v and string.match(v, '^intent\n([^\n]*)\n') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], done)
redis.call('PEXPIRE', KEYS[1], 600000)
return 1
"#,
    )
});

/// KEYS: the client's six keys, then its wills-taken and replaced-connections hashes. ARGV: the
/// dead proxy's id, the settling proxy's id.
/// Settles what the dead proxy held of this client id; every will it owed becomes the settling
/// proxy's intent (see above), handed out once:
/// - wills the dead proxy had taken and not seen accepted by a shard (it died publishing);
/// - connections of the dead proxy that newer ones replaced before it could publish their
///   wills: a will without delay was due when the connection ended, whatever followed
///   [MQTT-3.1.3-9], so every such will is owed — all of them, not only the latest (a proxy
///   can die holding several replaced connections of one client that never learnt they were
///   replaced); a delayed one was cancelled by the reconnect;
/// - if the dead proxy holds the session's current connection, the session loses it: a clean
///   session ends (its will is due now); a persistent one goes offline and starts expiring,
///   and a will with a delay is left in place for the will timer (the delay capped by the
///   session expiry, MQTT 5 §3.1.2.5).
///
/// Returns { 1 if the session went offline else 0, delay ms of a will left for the timer (0:
/// none), then epoch, will for each will owed now }, or { -1 } if there is nothing to do.
pub static ORPHAN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local owed = {}
local mine = 'intent\n' .. ARGV[2] .. '\n'
local function owe(epoch, will)
  redis.call('HSET', KEYS[7], epoch, mine .. will)
  redis.call('PEXPIRE', KEYS[7], 600000)
  table.insert(owed, epoch); table.insert(owed, will)
end
local taken = redis.call('HGETALL', KEYS[7])
local dead = 'intent\n' .. ARGV[1] .. '\n'
for i = 1, #taken, 2 do
  if string.sub(taken[i + 1], 1, #dead) == dead then owe(taken[i], string.sub(taken[i + 1], #dead + 1)) end
end
local entries = redis.call('HGETALL', KEYS[8])
for i = 1, #entries, 2 do
  local owner, delay, will = string.match(entries[i + 1], '^([^\n]*)\n([^\n]*)\n(.*)$')
  if owner == ARGV[1] then
    redis.call('HDEL', KEYS[8], entries[i])
    if redis.call('HEXISTS', KEYS[7], entries[i]) == 0 then
      if will ~= '' and tonumber(delay) == 0 then owe(entries[i], will) else redis.call('HSET', KEYS[7], entries[i], 'discarded') end
    end
  end
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  if #owed == 0 then return { -1 } end
  return { 0, 0, unpack(owed) }
end
redis.call('HDEL', KEYS[1], 'owner')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
local will = ''
if redis.call('HEXISTS', KEYS[7], epoch) == 0 then will = redis.call('HGET', KEYS[1], 'will') or '' end
local delay = tonumber(redis.call('HGET', KEYS[1], 'will_delay_ms') or '0')
if will == '' then delay = 0 end
if redis.call('HEXISTS', KEYS[1], 'rec') == 0 then
  delay = 0
  for i = 1, 6 do redis.call('DEL', KEYS[i]) end
else
  local expiry = tonumber(redis.call('HGET', KEYS[1], 'expiry_ms') or '0')
  if expiry > 0 then
    for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], expiry) end
    if delay > expiry then delay = expiry end
  end
end
if will ~= '' and delay == 0 then
  redis.call('HDEL', KEYS[1], 'will', 'will_delay_ms')
  owe(epoch, will)
elseif will ~= '' then
  redis.call('HSET', KEYS[7], epoch, 'scheduled')
  redis.call('PEXPIRE', KEYS[7], 600000)
end
return { 1, delay, unpack(owed) }
"#,
    )
});

/// KEYS: session, wills taken. ARGV: proxy id. Takes the delayed will of a session without a
/// connection, exactly once, as this proxy's intent: { epoch, will }, or nil if the session
/// has an owner again (a reconnect cancels the will) or the will was taken.
pub static TAKE_WILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], 'owner') == 1 then return false end
local will = redis.call('HGET', KEYS[1], 'will')
if not will then return false end
redis.call('HDEL', KEYS[1], 'will', 'will_delay_ms')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
redis.call('HSET', KEYS[2], epoch, 'intent\n' .. ARGV[1] .. '\n' .. will)
redis.call('PEXPIRE', KEYS[2], 600000)
return { epoch, will }
"#,
    )
});

/// KEYS: the client's six keys, then its replaced-connections hash. ARGV: proxy id. Takes
/// ownership of a client id for a new connection: bumps the epoch, records the owner, stops
/// the session from expiring, cancels a pending delayed will (the client is back, MQTT 5
/// §3.1.2.5). A connection still owning the id is recorded as replaced, with its will: if its
/// proxy is dead rather than about to be told, the settlement publishes it (`ORPHAN`).
/// Returns { previous owner or '', new epoch, has record (0/1) }.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local previous = redis.call('HGET', KEYS[1], 'owner') or ''
local last = redis.call('HGET', KEYS[1], 'epoch') or '0'
if previous ~= '' then
  local will = redis.call('HGET', KEYS[1], 'will') or ''
  local delay = redis.call('HGET', KEYS[1], 'will_delay_ms') or '0'
  redis.call('HSET', KEYS[7], last, previous .. '\n' .. delay .. '\n' .. will)
  redis.call('PEXPIRE', KEYS[7], 600000)
end
-- Epochs grow for ever, even across the session hash being deleted (a clean session ends, a
-- settlement): Redis time in microseconds, or one more than the last, whichever is larger.
-- Kept as decimal strings: Lua's own number formatting would round them.
local t = redis.call('TIME')
local epoch = tonumber(t[1]) * 1000000 + tonumber(t[2])
if tonumber(last) >= epoch then epoch = tonumber(last) + 1 end
epoch = string.format('%d', epoch)
redis.call('HSET', KEYS[1], 'epoch', epoch)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('HDEL', KEYS[1], 'will', 'will_delay_ms')
for i = 1, 6 do redis.call('PERSIST', KEYS[i]) end
return { previous, tonumber(epoch), redis.call('HEXISTS', KEYS[1], 'rec') }
"#,
    )
});

/// KEYS: session, wills taken, replaced connections. ARGV: proxy id, epoch, will discarded
/// (0/1). Gives up ownership if still held by this connection; a session without a record
/// (clean) disappears with it. Returns 1 if released.
///
/// A connection that ended with a normal DISCONNECT discards its will [MQTT-3.1.2-10]: that
/// is recorded first, whoever owns the session now, so that no settlement publishes it later
/// from the session or from the replaced-connections record a takeover left behind.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[3] == '1' then
  if redis.call('HSETNX', KEYS[2], ARGV[2], 'discarded') == 1 then redis.call('PEXPIRE', KEYS[2], 600000) end
  redis.call('HDEL', KEYS[3], ARGV[2])
  if tonumber(redis.call('HGET', KEYS[1], 'epoch')) == tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], 'will', 'will_delay_ms')
  end
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'epoch')) ~= tonumber(ARGV[2]) then return 0 end
if redis.call('HEXISTS', KEYS[1], 'rec') == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('HDEL', KEYS[1], 'owner')
end
return 1
"#,
    )
});

/// KEYS: queue, queue state. ARGV: position, state. Records delivery progress of an entry
/// that still exists.
pub static SET_STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return 1
"#,
    )
});

/// KEYS: session, inbound, inbound_by. ARGV: packet id, who marks (the accepting log position),
/// then refused acceptances whose marks may be taken over. A QoS 2 marker, expiring with the
/// session: 1 if the id is now this acceptance's (new, marked by this same acceptance before —
/// a retried write — or by one of the refused ones), 0 if another acceptance marked it (this
/// copy is a resend of an accepted message).
pub static MARK_INBOUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local added = redis.call('SADD', KEYS[2], ARGV[1])
if added == 0 then
  local holder = redis.call('HGET', KEYS[3], ARGV[1])
  local ours = holder == ARGV[2]
  for i = 3, #ARGV do
    if holder == ARGV[i] then ours = true end
  end
  if not ours then return 0 end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return 1
"#,
    )
});

/// KEYS: inbound ids set, inbound holders hash. ARGV: packet id, acceptance. Unmarks the
/// packet id if that acceptance holds it (a refused acceptance giving its mark back); a mark
/// another acceptance took over stays. Returns 1 if it was unmarked.
pub static UNMARK_INBOUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"#,
    )
});

// === membership (keys tagged {m}: one slot) ===

/// KEYS: members hash. ARGV: member, value suffix ('' for proxies, the link address for shards).
/// Records a heartbeat as "<Redis time in ms>|<suffix>": liveness is judged by one clock,
/// Redis's, whatever the members' clocks say. Returns 1 if the member was registered before
/// (0: it is new, or it was taken for dead and removed since its last beat).
pub static BEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local known = redis.call('HEXISTS', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2])
return known
"#,
    )
});

/// KEYS: members hash. ARGV: silence in ms after which a member is dead, remove (1: delete the
/// dead ones and return them, each to exactly one caller; 0: return the live ones).
/// Returns a flat list of member, suffix.
pub static MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local beat, suffix = string.match(all[i + 1], '^(%d+)|(.*)$')
  local dead = beat == nil or now - tonumber(beat) > limit
  if ARGV[2] == '1' and dead then
    redis.call('HDEL', KEYS[1], all[i])
    table.insert(out, all[i]); table.insert(out, suffix or '')
  elseif ARGV[2] == '0' and not dead then
    table.insert(out, all[i]); table.insert(out, suffix)
  end
end
return out
"#,
    )
});

// === the ring (key tagged {m}) ===

/// KEYS: ring. ARGV: the epoch the proposer saw, the proposed members (comma-separated).
/// Starts a change of membership unless another is under way or the ring moved on; returns the
/// epoch the change will have, or 0.
pub static RING_PROPOSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch ~= tonumber(ARGV[1]) then return 0 end
if redis.call('HEXISTS', KEYS[1], 'next') == 1 then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'next', ARGV[2], 'next_epoch', epoch + 1, 'next_since', t[1])
return epoch + 1
"#,
    )
});

/// KEYS: ring. ARGV: the epoch of the change, commit (1) or abort (0).
/// Ends the change under way with that epoch; returns 1 if it did.
pub static RING_END: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if tonumber(redis.call('HGET', KEYS[1], 'next_epoch') or '-1') ~= tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'members', redis.call('HGET', KEYS[1], 'next'), 'epoch', ARGV[1])
end
redis.call('HDEL', KEYS[1], 'next', 'next_epoch', 'next_since')
return 1
"#,
    )
});

/// A token bucket on Redis's clock. KEYS[1] the bucket; ARGV rate per second, burst, tokens
/// wanted. Returns the tokens granted (all wanted if available, else what there is). Idle
/// buckets expire once full again.
pub static TAKE_TOKENS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at_ms')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local granted = math.min(want, math.floor(tokens))
if granted < 0 then granted = 0 end
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at_ms', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return granted
",
    )
});
