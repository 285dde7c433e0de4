-- Replays prebuilt HTTP requests (the file bench/load.py writes, passed after `--`), one picked
-- at random per request, so every scenario runs through this one script. Counts responses by
-- status and prints one machine-readable line for bench/load.py.
-- File format: "<byte length>\n<raw request>" repeated.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("id", #threads)
end

function init(args)
   local file = assert(io.open(args[1], "rb"))
   local data = file:read("*a")
   file:close()
   requests = {}
   local pos = 1
   while pos <= #data do
      local newline = data:find("\n", pos, true)
      local length = tonumber(data:sub(pos, newline - 1))
      table.insert(requests, data:sub(newline + 1, newline + length))
      pos = newline + length + 1
   end
   statuses = {}
   math.randomseed(os.time() * 100 + id)
end

function request()
   return requests[math.random(#requests)]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local codes = {}
   for _, thread in ipairs(threads) do
      for code, count in pairs(thread:get("statuses")) do
         codes[code] = (codes[code] or 0) + count
      end
   end
   local parts = {}
   for code, count in pairs(codes) do
      table.insert(parts, string.format('"%d": %d', code, count))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "seconds": %.6f, "p50_ms": %.3f, "p99_ms": %.3f, ' ..
      '"socket_errors": %d, "statuses": {%s}}\n',
      summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
      latency:percentile(99) / 1e3, e.connect + e.read + e.write + e.timeout,
      table.concat(parts, ", ")))
end
