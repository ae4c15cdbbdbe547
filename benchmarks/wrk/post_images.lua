-- wrk script: POST /v1/predict multipart uploads cycling through the image files listed in args[1];
-- done() prints one JSON line (requests, seconds, p50/p99 ms, error counts) for benchmarks/serve_load.py.
local boundary = "finegrainboundary7d1f"
local bodies = {}
init = function(args)
  for line in io.lines(args[1]) do
    local f = io.open(line, "rb"); local data = f:read("*a"); f:close()
    bodies[#bodies + 1] = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n" ..
      "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
end
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "mean_ms": %f, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.mean / 1e3, e.connect, e.read, e.write, e.status, e.timeout))
end
