-- wrk script for the benchmarks of DESIGN §15, driven by environment variables:
--   TPB_PATH     request path; "%d" is replaced by a random user id in 1..TPB_USERS
--   TPB_USERS    number of users (default 1000)
--   TPB_NOCACHE  "1": send Cache-Control: no-cache (bypass our response cache)
--   TPB_BODY     when set: POST this JSON body ("%d" = random user id) with a fresh
--                Idempotency-Key per request (writes)
-- done() prints one line for bench/lib.sh:
--   TPB requests rps p50_ms p99_ms errors     (errors: socket errors + non-2xx answers)

local path = os.getenv("TPB_PATH") or "/"
local users = tonumber(os.getenv("TPB_USERS") or "1000")
local nocache = os.getenv("TPB_NOCACHE") == "1"
local body = os.getenv("TPB_BODY")
local counter = 0
local prefix = ""

local threads = {}

function setup(thread)
    thread:set("tid", #threads + 1)
    table.insert(threads, thread)
end

function init(args)
    math.randomseed(os.time() * 100 + (tid or 0))
    prefix = string.format("k%d-%d-%d-", os.time(), tid or 0, math.random(1, 1000000000))
end

function request()
    local user = math.random(1, users)
    local p = string.gsub(path, "%%d", tostring(user))
    local headers = {}
    if nocache then
        headers["Cache-Control"] = "no-cache"
    end
    if body then
        counter = counter + 1
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = prefix .. counter
        local b = string.gsub(body, "%%d", tostring(user))
        return wrk.format("POST", p, headers, b)
    end
    return wrk.format("GET", p, headers)
end

function done(summary, latency, requests)
    local e = summary.errors
    local errors = e.connect + e.read + e.write + e.timeout + e.status
    local secs = summary.duration / 1e6
    io.write(string.format("TPB %d %.0f %.2f %.2f %d\n", summary.requests,
        summary.requests / secs, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
        errors))
end
