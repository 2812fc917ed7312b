-- wrk script for loadtests/wrk.py: POST the JSON bodies of a file (one per line) in turn,
-- count the answers by status code, sum the server's own timing headers (x-queue-time,
-- x-inference-time, x-total-time, in ms; absent from servers that do not send them), and print
-- one JSON line (prefixed WRK_JSON) at the end.
--   WRK_BODIES=bodies.jsonl WRK_PATH=/classify wrk -t1 -c32 -d10s -s loadtests/wrk_post.lua URL

local bodies = {}
local next_body = 0
statuses = {}  -- global: done() reads each thread's copy with thread:get
timing = {queue = 0, inference = 0, total = 0, answers = 0}  -- sums of the timing headers
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
  local total = headers["x-total-time"]
  if total then
    timing.total = timing.total + tonumber(total)
    timing.queue = timing.queue + (tonumber(headers["x-queue-time"] or "0") or 0)
    timing.inference = timing.inference + (tonumber(headers["x-inference-time"] or "0") or 0)
    timing.answers = timing.answers + 1
  end
end

function done(summary, latency, requests)
  local counts = {}
  local sums = {queue = 0, inference = 0, total = 0, answers = 0}
  for _, thread in ipairs(threads) do
    local thread_timing = thread:get("timing")
    for name, value in pairs(thread_timing) do
      sums[name] = sums[name] + value
    end
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
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, ' ..
    '"server_ms": {"answers": %d, "queue": %.3f, "inference": %.3f, "total": %.3f}}\n',
    summary.requests, summary.duration, table.concat(parts, ", "),
    errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    sums.answers, sums.queue, sums.inference, sums.total))
end
