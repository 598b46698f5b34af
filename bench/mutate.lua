-- wrk: each request a one-change transaction creating a new Todo in g1.
-- Run as: wrk ... -s bench/mutate.lua URL -- PREFIX [PATH]   (PREFIX keeps ids unique across runs;
-- PATH is /mutate unless given, as for the floor endpoint that only validates)

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  prefix = (args[1] or "bench") .. "-" .. thread_number .. "-"
  path = args[2] or "/mutate"
  counter = 0
end

function request()
  counter = counter + 1
  local id = prefix .. counter
  local body = '{"transactionId":"' .. id .. '","changes":[{"action":"create","modelName":"Todo","modelId":"'
    .. id .. '","data":{"id":"' .. id .. '","text":"Benchmark","authorId":"a1","groupId":"g1","isDone":false,"likeCount":0}}]}'
  return wrk.format("POST", path, nil, body)
end
