-- wrk script of the failures benchmark: counts responses by status code in
-- each wrk thread and prints the whole run's counts when it ends, because
-- wrk itself only says how many were not 2xx or 3xx.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do
    io.write(string.format("dstack-status %d %d\n", status, n))
  end
  io.write("dstack-status-end\n")
end
