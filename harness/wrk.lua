-- wrk script: POST a rotation of request bodies with a bearer token; print one JSON summary line.
--   wrk -t1 -c4 -d10s --latency -s harness/wrk.lua URL -- TOKEN CONTENT_TYPE THINK_MS LIST_FILE
-- LIST_FILE names one body file per line. THINK_MS > 0 makes each connection pause for an
-- exponentially distributed time (that mean, in ms) between requests: an offered rate below saturation.

local bodies = {}
local headers = {}
local think = 0
local counter = 0

function init(args)
  headers["Authorization"] = "Bearer " .. args[1]
  headers["Content-Type"] = args[2]
  think = tonumber(args[3])
  for path in io.lines(args[4]) do
    local f = assert(io.open(path, "rb"))
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
  assert(#bodies > 0, "no request bodies in " .. args[4])
  -- threads start at different offsets so they do not send the same image in lock step
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
  counter = math.random(#bodies)
end

function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", nil, headers, bodies[counter])
end

function delay()
  if think <= 0 then
    return 0
  end
  return math.floor(-think * math.log(1 - math.random()))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}, "latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
