-- wrk script: POST chat completions, configured from the environment by load.py.
--   WRK_HEAD, WRK_TAIL   the body is HEAD .. TAIL, or HEAD .. <counter> .. TAIL when WRK_UNIQUE=1
--   WRK_AUTH             optional bearer token
--   WRK_CACHE_CONTROL    optional Cache-Control header
--   WRK_STOP_AFTER       optional: exit after this many responses (one thread only)
local head = os.getenv("WRK_HEAD")
local tail = os.getenv("WRK_TAIL")
local unique = os.getenv("WRK_UNIQUE") == "1"
local stop_after = tonumber(os.getenv("WRK_STOP_AFTER") or "")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("WRK_AUTH") then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_AUTH")
end
if os.getenv("WRK_CACHE_CONTROL") then
  wrk.headers["Cache-Control"] = os.getenv("WRK_CACHE_CONTROL")
end
wrk.body = head .. tail

if unique then
  local counter = 0
  function request()
    counter = counter + 1
    return wrk.format(nil, nil, nil, head .. counter .. tail)
  end
end

if stop_after then
  -- wrk's own thread:stop() leaves the process sleeping until -d runs out, so the script ends
  -- the run itself once it has seen enough responses, printing the summary done() would have
  local seen, bad = 0, 0
  function response(status, headers, body)
    seen = seen + 1
    if status > 399 then
      bad = bad + 1
    end
    if seen >= stop_after then
      io.write(string.format('BENCHJSON {"requests":%d,"status_errors":%d}\n', seen, bad))
      io.flush()
      os.exit(0)
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
