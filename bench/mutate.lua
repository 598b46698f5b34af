-- wrk: each request a one-change transaction creating a new Todo in g1.
-- Run as: wrk ... -s bench/mutate.lua URL -- PREFIX [PATH]   (PREFIX keeps ids unique across runs;
-- PATH is /mutate unless given, as for the floor endpoint that only validates)
-- Prints "Status N: COUNT" for each status answered: wrk itself only counts non-2xx, and a 503
-- (the database too busy, retry later) is told apart from other failures.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

function init(args)
  prefix = (args[1] or "bench") .. "-" .. thread_number .. "-"
  path = args[2] or "/mutate"
  counter = 0
  statuses = {}
end

function request()
  counter = counter + 1
  local id = prefix .. counter
  local body = '{"transactionId":"' .. id .. '","changes":[{"action":"create","modelName":"Todo","modelId":"'
    .. id .. '","data":{"id":"' .. id .. '","text":"Benchmark","authorId":"a1","groupId":"g1","isDone":false,"likeCount":0}}]}'
  return wrk.format("POST", path, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  for status, count in pairs(total) do
    io.write(string.format("Status %d: %d\n", status, count))
  end
end
