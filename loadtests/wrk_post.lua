-- wrk script for loadtests/wrk.py: POST the JSON bodies of a file (one per line) in turn,
-- count the answers by status code, and print one JSON line (prefixed WRK_JSON) at the end.
--   WRK_BODIES=bodies.jsonl WRK_PATH=/classify wrk -t1 -c32 -d10s -s loadtests/wrk_post.lua URL

local bodies = {}
local next_body = 0
statuses = {}  -- global: done() reads each thread's copy with thread:get
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(os.getenv("WRK_BODIES")) do
    bodies[#bodies + 1] = line
  end
  next_body = math.random(#bodies)  -- threads start at different bodies
  wrk.method = "POST"
  wrk.path = os.getenv("WRK_PATH")
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_body])
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local thread_statuses = thread:get("statuses")
    for status, n in pairs(thread_statuses) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do
    parts[#parts + 1] = string.format('"%s": %d', status, n)
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "statuses": {%s}, "errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, table.concat(parts, ", "),
    errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
