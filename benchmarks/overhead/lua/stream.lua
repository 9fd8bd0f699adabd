-- Streaming chat body (SSE); wrk times the whole stream. WRK_TOKENS: max_tokens (default 64).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("WRK_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
local tokens = os.getenv("WRK_TOKENS") or "64"
wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"Stream a reply for the gateway overhead benchmark."}],"max_tokens":' .. tokens .. ',"stream":true,"stream_options":{"include_usage":true}}'
