-- wrk script for the fixed-rate run: requests are paced to a global schedule
-- of RATE requests/s (wrk is closed-loop; this turns it into a paced client).
--
-- wrk calls delay() each time a connection is ready to send its next request
-- and waits that many milliseconds first.  Every call takes the next slot of a
-- schedule (start + i / RATE) and returns the time until that slot, rounded
-- to whole milliseconds at random (so the mean is exact and arrivals are
-- jittered by < 1 ms).  As long as more connections are open than are busy
-- (connections > RATE × (latency + 1 ms)), requests leave at RATE on
-- average; when the target falls behind, the schedule is late and the
-- achieved rate drops, which the report shows.  wrk's latencies are measured
-- from the moment a request is written (service time, not corrected for
-- coordinated omission).
--
-- Usage: wrk -t1 -cN -dD --latency -s paced.lua URL -- RATE
local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_nsec; } cg_timespec;
  int clock_gettime(int clk_id, cg_timespec *tp);
]]
local ts = ffi.new("cg_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local pool = {}
local pool_size = 16384
local i = 0
local interval_ms = nil
local next_due = nil

function init(args)
  local rate = tonumber(args[1])
  assert(rate and rate > 0, "paced.lua: pass the rate: -- <requests per second>")
  interval_ms = 1000 / rate
  math.randomseed(20240601)  -- same keys as userid.lua
  for n = 1, pool_size do
    wrk.headers["X-User-ID"] = string.format("user-%d-%d", n, math.random(1, 1000000000))
    pool[n] = wrk.format("GET", "/")
  end
end

function request()
  i = i % pool_size + 1
  return pool[i]
end

function delay()
  local now = now_ms()
  if next_due == nil then next_due = now end
  local wait = next_due - now
  next_due = next_due + interval_ms
  if wait <= 0 then return 0 end
  local whole = math.floor(wait)
  if math.random() < wait - whole then whole = whole + 1 end
  return whole
end
