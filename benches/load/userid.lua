-- wrk script: every request carries a different X-User-ID.
-- A pool of pre-formatted requests (distinct random user ids) is built once
-- per thread so the client spends as little CPU as possible per request;
-- the pool is far larger than the connection count, so consecutive requests
-- on a connection hash to unrelated slots.
local pool = {}
local pool_size = 16384
local i = 0

function init(args)
  math.randomseed(20240601)  -- same keys for every target and run
  for n = 1, pool_size do
    wrk.headers["X-User-ID"] = string.format("user-%d-%d", n, math.random(1, 1000000000))
    pool[n] = wrk.format("GET", "/")
  end
end

function request()
  i = i % pool_size + 1
  return pool[i]
end
