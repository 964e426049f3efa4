-- wrk script for bench/run.sh: POSTs one OpenAI chat completion request per call.
--
-- Usage:  wrk -t1 -c1 -d10s -s bench/chat.lua http://HOST:PORT/v1/chat/completions [-- stream]
--
-- With the argument "stream" the body asks for a streamed (SSE) answer. wrk counts a
-- request as done when the whole response (for SSE: the final chunk of the chunked body)
-- has arrived, so latency is "time to the last byte".
--
-- done() prints one machine-readable line, parsed by run.sh:
--   BENCH p50_us=<int> p99_us=<int> rps=<float> requests=<int> non2xx=<int> socket_errors=<int>

local BODY_PLAIN  = '{"model":"bench","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'
local BODY_STREAM = '{"model":"bench","messages":[{"role":"user","content":"Hello"}],"max_tokens":16,"stream":true}'

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = BODY_PLAIN

-- Every thread has its own Lua state; setup() runs in the main state and keeps a handle
-- on each thread so done() can read the threads' counters.
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

-- Runs in each thread's state, before wrk builds the (static) request from wrk.*.
function init(args)
   if args[1] == "stream" then
      wrk.body = BODY_STREAM
   end
   non2xx = 0
end

-- wrk's own summary.errors.status only counts status > 399; count every non-2xx here.
function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local non2xx_total = 0
   for _, t in ipairs(threads) do
      non2xx_total = non2xx_total + (t:get("non2xx") or 0)
   end
   local e = summary.errors
   local socket_errors = e.connect + e.read + e.write + e.timeout
   local seconds = summary.duration / 1e6
   io.write(string.format(
      "BENCH p50_us=%d p99_us=%d rps=%.1f requests=%d non2xx=%d socket_errors=%d\n",
      latency:percentile(50), latency:percentile(99),
      summary.requests / seconds, summary.requests, non2xx_total, socket_errors))
end
