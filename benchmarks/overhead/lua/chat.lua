-- Fixed non-stream chat body, max_tokens 16. WRK_AUTH (optional): the Authorization value.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("WRK_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"Say hello to the gateway overhead benchmark, please."}],"max_tokens":16}'
