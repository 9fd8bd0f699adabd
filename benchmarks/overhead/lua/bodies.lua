-- Cycles through pre-built request bodies, one JSON body per line of the file WRK_BODIES
-- (written by benchmarks/overhead/workload.py: ~8k-token prompts, a shared prefix per group).
-- Each wrk thread starts at a different offset so the threads do not send the same sequence.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("WRK_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
local bodies = {}
for line in io.lines(os.getenv("WRK_BODIES")) do bodies[#bodies + 1] = line end
local counter = 0
local reqs = {}

function init(args)
  counter = math.random(#bodies)
  for i, b in ipairs(bodies) do reqs[i] = wrk.format(nil, nil, nil, b) end
end

function request()
  counter = counter % #bodies + 1
  return reqs[counter]
end
