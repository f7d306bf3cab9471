-- Post-script run by python-lua-helper after the user's config.
-- It validates `server` and `models`, fills in defaults and replaces both globals
-- with normalized tables, so the Python side only maps plain values to dataclasses.
-- Every failure is error(msg, 0): the message names the key and the bad value.

local source = loader.exec or "config"

-- Invalid UTF-8 bytes as \xNN: Python reads the message as UTF-8 text.
local function printable(s)
  local out, i = {}, 1
  while true do
    local ok, bad = utf8.len(s, i)
    if ok then
      out[#out + 1] = s:sub(i)
      return table.concat(out)
    end
    out[#out + 1] = s:sub(i, bad - 1) .. string.format("\\x%02X", s:byte(bad))
    i = bad + 1
  end
end

local function fail(path, fmt, ...)
  error(printable(string.format("%s: %s: " .. fmt, source, path, ...)), 0)
end

local function show(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

local function is_integer(v)
  return type(v) == "number" and v == math.floor(v) and v > -math.huge and v < math.huge
end

local function check_type(path, v, want)
  if type(v) ~= want then fail(path, "must be a %s (got %s %s)", want, type(v), show(v)) end
  return v
end

local function positive_number(path, v)
  check_type(path, v, "number")
  if not (v > 0 and v < math.huge) then fail(path, "must be a positive number (got %s)", show(v)) end
  return v
end

local function non_negative_number(path, v)
  check_type(path, v, "number")
  if not (v >= 0 and v < math.huge) then fail(path, "must be zero or a positive number (got %s)", show(v)) end
  return v
end

local function positive_integer(path, v)
  if not is_integer(v) or v <= 0 then fail(path, "must be a positive integer (got %s)", show(v)) end
  return math.tointeger and math.tointeger(v) or v
end

-- llama-server reads token counts (max_tokens, n_predict, n, ...) as 32-bit integers.
local ENGINE_INT_MAX = 2147483647

local function engine_count(path, v)
  positive_integer(path, v)
  if v > ENGINE_INT_MAX then
    fail(path, "must be at most %d: llama-server reads it as a 32-bit integer (got %s)", ENGINE_INT_MAX, show(v))
  end
  return math.tointeger and math.tointeger(v) or v
end

-- Sizes in bytes: a positive number of bytes, or a string "<number><unit>" with a decimal
-- (KB, MB, GB, TB: powers of 1000) or binary (KiB, MiB, GiB, TiB: powers of 1024) unit or
-- B, e.g. "20GiB", "1.5GiB", "800MB", "4096". The result is a whole number of bytes.
-- Every size key (server.memory_budget, server.max_body_bytes, a model's or variant's
-- memory) goes through this one parser.
local SIZE_UNITS = {
  b = 1, kb = 1000, mb = 1000 ^ 2, gb = 1000 ^ 3, tb = 1000 ^ 4,
  kib = 1024, mib = 1024 ^ 2, gib = 1024 ^ 3, tib = 1024 ^ 4,
}
local SIZE_MAX = 2 ^ 53 -- bytes; exact in a double, and far beyond any machine's memory
local SIZE_EXAMPLES = "like \"20GiB\", \"512MiB\", \"1.5GiB\" or \"800MB\" (KB/MB/GB/TB: "
  .. "powers of 1000, KiB/MiB/GiB/TiB: of 1024), or a positive number of bytes"

local function size(path, v)
  local bytes
  if type(v) == "number" then
    bytes = v
  elseif type(v) == "string" then
    local number, unit = v:match("^%s*(%d*%.?%d*)%s*(%a*)%s*$")
    local multiplier = unit and SIZE_UNITS[unit:lower()]
    if unit == "" then multiplier = 1 end
    if number == nil or not number:find("%d") or multiplier == nil then
      fail(path, "must be a size %s (got %s)", SIZE_EXAMPLES, show(v))
    end
    bytes = math.floor(tonumber(number) * multiplier + 0.5)
  elseif type(v) == "boolean" then
    fail(path, "must be a size %s (got %s)", SIZE_EXAMPLES, show(v))
  else
    fail(path, "must be a size %s (got a %s)", SIZE_EXAMPLES, type(v))
  end
  if not is_integer(bytes) or bytes < 1 then
    fail(path, "must be a size %s (got %s)", SIZE_EXAMPLES, show(v))
  end
  if bytes > SIZE_MAX then fail(path, "is too large: at most 2^53 bytes (8 PiB) (got %s)", show(v)) end
  return math.tointeger(bytes)
end

local function non_empty_string(path, v)
  check_type(path, v, "string")
  if v == "" then fail(path, "must not be empty") end
  return v
end

-- A Lua sequence 1..n with no other keys; nil gives an empty list.
-- A nil inside the list (often an undefined variable) is an error: `#` and ipairs would
-- silently drop everything after it.
local function sequence(path, v)
  if v == nil then return {} end
  check_type(path, v, "table")
  local count, last = 0, 0
  for k in pairs(v) do
    if not (is_integer(k) and k >= 1) then
      fail(path, "must be a list {...} (found key %s)", show(k))
    end
    count = count + 1
    if k > last then last = k end
  end
  if last > count then -- then one of 1..count+1 is missing
    for i = 1, count + 1 do
      if v[i] == nil then
        fail(string.format("%s[%d]", path, i), "is nil (a hole in the list; an undefined variable?)")
      end
    end
  end
  return v
end

local function only_keys(path, tbl, allowed)
  for k in pairs(tbl) do
    if type(k) ~= "string" or not allowed[k] then
      fail(path, "unknown key %s", show(k))
    end
  end
end

local function set_of(...)
  local s = {}
  for _, k in ipairs({ ... }) do s[k] = true end
  return s
end

-- Listen addresses ------------------------------------------------------------

local function valid_port(p)
  local n = tonumber(p)
  return n ~= nil and n >= 1 and n <= 65535
end

local function valid_v4_host(host)
  local a, b, c, d = host:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return false end
  for _, octet in ipairs({ a, b, c, d }) do
    if #octet > 3 or tonumber(octet) > 255 then return false end
  end
  return true
end

local function valid_v4(addr)
  local host, port = addr:match("^([%d%.]+):(%d+)$")
  return host ~= nil and valid_v4_host(host) and valid_port(port)
end

-- The number of 1-4 digit hex groups in "a:b:c", or nil if one is malformed.
local function hex_groups(s)
  if s == "" then return 0 end
  local n = 0
  for group in (s .. ":"):gmatch("([^:]*):") do
    if not group:match("^%x%x?%x?%x?$") then return nil end
    n = n + 1
  end
  return n
end

-- RFC 4291 text form: eight groups, or fewer around one "::", optionally ending in an
-- IPv4 address, optionally followed by a zone ("%eth0").
local function valid_v6_host(host)
  host = host:gsub("%%[%w_.-]+$", "", 1)
  local v4 = host:match(":(%d+%.%d+%.%d+%.%d+)$")
  if v4 then
    if not valid_v4_host(v4) then return false end
    host = host:sub(1, #host - #v4) .. "0:0"
  end
  local head, tail = host:match("^(.-)::(.*)$")
  if head == nil then return hex_groups(host) == 8 end
  if tail:find("::", 1, true) then return false end
  local a, b = hex_groups(head), hex_groups(tail)
  return a ~= nil and b ~= nil and a + b <= 7
end

local function valid_v6(addr)
  local host, port = addr:match("^%[([^%]]+)%]:(%d+)$")
  return host ~= nil and valid_v6_host(host) and valid_port(port)
end

local function listen_list(path, v, default, valid, example)
  if v == nil then v = default end
  if v == "none" then return {} end
  if type(v) == "string" then v = { v } end
  local list = sequence(path, v)
  for i, addr in ipairs(list) do
    local p = string.format("%s[%d]", path, i)
    check_type(p, addr, "string")
    if not valid(addr) then fail(p, "is not a listen address like %s (got %s)", example, show(addr)) end
  end
  return list
end

-- Engine arguments --------------------------------------------------------------

-- A list of strings (numbers become strings); what the flags mean is the engine type's
-- business (see engine_parser).
local function arg_list(path, v)
  local out = {}
  for i, a in ipairs(sequence(path, v)) do
    local p = string.format("%s[%d]", path, i)
    if type(a) == "number" then a = tostring(math.tointeger and math.tointeger(a) or a) end
    out[i] = check_type(p, a, "string")
  end
  return out
end

-- Each engine type has a Lua file next to its Python adapter (gateway/engine/) that checks
-- a variant's arguments and returns the values the gateway reads from them.
-- The other types' arguments are the engine's own business (false: no file).
local engine_types = { ["llama.cpp"] = "llamacpp.lua", openai = false, remote = false }
local engine_dir = (loader.postexec:match("^(.*[/\\])") or "./") .. "../engine/"
local engine_parsers = {}

local function engine_parser(engine)
  if engine_parsers[engine] == nil then
    engine_parsers[engine] = dofile(engine_dir .. engine_types[engine])(fail, show)
  end
  return engine_parsers[engine]
end

-- An openai or remote engine's variant: nothing read from arguments; it answers as `served_name`.
local function upstream_engine(up)
  return function()
    return { kv_unified = false, embeddings = false, reranking = false, cache_type_k = "f16",
      cache_type_v = "f16", alias = up.served_name }
  end
end

-- The arguments a variant's engine gets (the model's, then the variant's), each with its key.
local function variant_args(model_path, model_args, variant_path, args)
  local out = {}
  for i, a in ipairs(model_args) do out[#out + 1] = { path = string.format("%s.args[%d]", model_path, i), text = a } end
  for i, a in ipairs(args) do out[#out + 1] = { path = string.format("%s.args[%d]", variant_path, i), text = a } end
  return out
end

-- The environment a model's engines get: the model's env over the gateway's own.
local function engine_env(model_path, env)
  return function(name)
    if env[name] ~= nil then return { name = name, path = model_path .. ".env." .. name, text = env[name] } end
    local inherited = os.getenv(name)
    if inherited ~= nil then return { name = name, path = "environment variable " .. name, text = inherited } end
  end
end

local function string_map(path, v)
  if v == nil then return {} end
  check_type(path, v, "table")
  local out = {}
  for k, val in pairs(v) do
    if type(k) ~= "string" then fail(path, "keys must be strings (got %s)", show(k)) end
    if type(val) == "number" then val = tostring(val) end
    check_type(path .. "." .. k, val, "string")
    out[k] = val
  end
  return out
end

-- A value that maps to JSON: strings, finite numbers, booleans, and tables whose keys are
-- strings or integers (a list, or an object). Functions and the like cannot be exported.
local function json_value(path, v, open)
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then fail(path, "must be a finite number (got %s)", show(v)) end
  elseif t == "table" then
    open = open or {}
    if open[v] then fail(path, "contains itself (%s)", open[v]) end
    open[v] = path
    for k, val in pairs(v) do
      if type(k) ~= "string" and not is_integer(k) then
        fail(path, "keys must be strings or integers (got %s)", show(k))
      end
      json_value(type(k) == "string" and path .. "." .. k or string.format("%s[%s]", path, show(k)), val, open)
    end
    open[v] = nil
  elseif t ~= "string" and t ~= "boolean" then
    fail(path, "must be a string, number, boolean or table (got a %s)", t)
  end
  return v
end

-- Fields the gateway reads from the client's request to route and size it: a rule that
-- set or removed them would break every request.
local request_owned = set_of("model", "messages", "prompt", "input")
-- Fields the gateway reads to size a request: a rule's value must pass the checks a
-- client's value must, or every request would be refused as the client's fault.
local request_checks = {
  max_tokens = engine_count,
  max_completion_tokens = engine_count,
  max_output_tokens = engine_count,
  n_predict = engine_count,
  n = engine_count,
  n_cmpl = engine_count,
  stream = function(path, v) return check_type(path, v, "boolean") end,
}

local function rule_fields(path, fields)
  json_value(path, check_type(path, fields, "table"))
  for name in pairs(fields) do
    if type(name) ~= "string" then
      fail(path, "must be a map of request fields { name = value } (found key %s)", show(name))
    end
  end
  for name, value in pairs(fields) do
    local p = path .. "." .. tostring(name)
    if request_owned[name] then fail(p, "the gateway reads %s from the client's request; a rule may not set it", name) end
    if request_checks[name] then fields[name] = request_checks[name](p, value) end
  end
  return fields
end

-- Request rewriting rules: defaults and force are JSON-like tables, strip a list of names.
local function request_rules(path, v)
  if v == nil then v = {} end
  check_type(path, v, "table")
  only_keys(path, v, set_of("defaults", "force", "strip"))
  local out = {
    defaults = rule_fields(path .. ".defaults", v.defaults or {}),
    force = rule_fields(path .. ".force", v.force or {}),
    strip = {},
  }
  for i, name in ipairs(sequence(path .. ".strip", v.strip)) do
    local p = string.format("%s.strip[%d]", path, i)
    out.strip[i] = non_empty_string(p, name)
    if request_owned[name] then fail(p, "the gateway reads %s from every request; it cannot be stripped", show(name)) end
  end
  return out
end

-- Timeouts: server values are the defaults, a model overrides them, a variant overrides its model.
local timeout_keys = {
  health_check_timeout = positive_number,
  engine_startup_timeout = positive_number,
  drain_timeout = non_negative_number,
  stop_timeout = positive_number,
  engine_idle_timeout = non_negative_number,
}

local function resolve_timeouts(path, tbl, inherited)
  local out = {}
  for key, check in pairs(timeout_keys) do
    if tbl[key] ~= nil then
      out[key] = check(path .. "." .. key, tbl[key])
    else
      out[key] = inherited[key]
    end
  end
  return out
end

-- server ------------------------------------------------------------------------

local server_defaults = {
  health_check_timeout = 5,
  engine_startup_timeout = 60,
  engine_idle_timeout = 0,
  drain_timeout = 30,
  stop_timeout = 10,
  queue_limit = 256,
  max_body_bytes = 8 * 1024 * 1024,
  max_start_failures = 3,
  loading_keepalive = true,
  config_timeout = 10,
  max_engines = 1,
  shutdown_delay = 2,
}

-- A reload runs the config file within config_timeout: too short a limit stops every
-- later reload (the run alone takes tens of milliseconds), too long one holds reloads up.
local CONFIG_TIMEOUT_MIN, CONFIG_TIMEOUT_MAX = 1, 600

-- API keys: a list, or the path of a file with one key a line (# comments).
local function api_keys(path, v)
  if v == nil then return {} end
  if type(v) == "string" then
    local file = v
    if file:sub(1, 1) ~= "/" then file = loader.workdir .. file end
    local handle = io.open(file, "r")
    if handle == nil then fail(path, "cannot read the key file %s", show(file)) end
    local keys = {}
    for line in handle:lines() do
      local key = line:match("^%s*(.-)%s*$")
      if key ~= "" and key:sub(1, 1) ~= "#" then keys[#keys + 1] = key end
    end
    handle:close()
    if #keys == 0 then fail(path, "the key file %s holds no key", show(file)) end
    return keys
  end
  local keys = {}
  for i, key in ipairs(sequence(path, v)) do
    keys[i] = non_empty_string(string.format("%s[%d]", path, i), key)
  end
  return keys
end

-- Engines at once: each is a process with its own port and memory; more than this is a typo.
local MAX_ENGINES = 1024

-- Saved KV caches of llama.cpp engines (kept across swaps): on by default, in a folder of
-- the system's temporary directory; false turns it off.
local PROMPT_CACHE_MAX_SIZE = 2 * 1024 ^ 3

local function prompt_cache(path, v)
  if v == false then return { enabled = false } end
  if v == nil or v == true then v = {} end
  check_type(path, v, "table")
  only_keys(path, v, set_of("dir", "max_size"))
  local out = { enabled = true, max_size = math.tointeger(PROMPT_CACHE_MAX_SIZE) }
  if v.dir ~= nil then
    out.dir = non_empty_string(path .. ".dir", v.dir)
    if out.dir:sub(1, 1) ~= "/" then out.dir = loader.workdir .. out.dir end
  end
  if v.max_size ~= nil then out.max_size = size(path .. ".max_size", v.max_size) end
  return out
end

-- Seconds /health answers 503 before the listening sockets close: a load balancer's few
-- health checks need seconds; more is a typo that would hold every stop up.
local SHUTDOWN_DELAY_MAX = 600

local function validate_server(s)
  if s == nil then s = {} end
  check_type("server", s, "table")
  only_keys("server", s, set_of(
    "listen_v4", "listen_v6", "queue_limit", "max_body_bytes", "max_start_failures",
    "loading_keepalive", "health_check_timeout", "engine_startup_timeout",
    "engine_idle_timeout", "drain_timeout", "stop_timeout", "api_keys", "admin_key", "preload", "config_timeout",
    "max_engines", "memory_budget", "shutdown_delay", "prompt_cache"))
  local out = resolve_timeouts("server", s, server_defaults)
  out.listen_v4 = listen_list("server.listen_v4", s.listen_v4, "127.0.0.1:7777", valid_v4, "\"127.0.0.1:7777\"")
  out.listen_v6 = listen_list("server.listen_v6", s.listen_v6, "none", valid_v6, "\"[::1]:7777\"")
  if #out.listen_v4 + #out.listen_v6 == 0 then
    fail("server.listen_v4", "no listen address: listen_v4 and listen_v6 are both \"none\"")
  end
  out.queue_limit = positive_integer("server.queue_limit", s.queue_limit or server_defaults.queue_limit)
  out.max_body_bytes = size("server.max_body_bytes", s.max_body_bytes or server_defaults.max_body_bytes)
  out.max_engines = positive_integer("server.max_engines", s.max_engines or server_defaults.max_engines)
  if out.max_engines > MAX_ENGINES then
    fail("server.max_engines", "must be at most %d (got %s)", MAX_ENGINES, show(s.max_engines))
  end
  -- Absent: no memory limit. "auto" is resolved by the Python loader (GPU or RAM, less 10%).
  if s.memory_budget ~= nil then
    out.memory_budget = s.memory_budget == "auto" and "auto" or size("server.memory_budget", s.memory_budget)
  end
  out.max_start_failures = positive_integer("server.max_start_failures",
    s.max_start_failures or server_defaults.max_start_failures)
  out.loading_keepalive = server_defaults.loading_keepalive
  if s.loading_keepalive ~= nil then
    out.loading_keepalive = check_type("server.loading_keepalive", s.loading_keepalive, "boolean")
  end
  out.config_timeout = s.config_timeout or server_defaults.config_timeout
  if type(out.config_timeout) ~= "number" or not (out.config_timeout >= CONFIG_TIMEOUT_MIN
      and out.config_timeout <= CONFIG_TIMEOUT_MAX) then
    fail("server.config_timeout", "must be a number of seconds from %d to %d (got %s)",
      CONFIG_TIMEOUT_MIN, CONFIG_TIMEOUT_MAX, show(out.config_timeout))
  end
  out.prompt_cache = prompt_cache("server.prompt_cache", s.prompt_cache)
  out.shutdown_delay = non_negative_number("server.shutdown_delay",
    s.shutdown_delay or server_defaults.shutdown_delay)
  if out.shutdown_delay > SHUTDOWN_DELAY_MAX then
    fail("server.shutdown_delay", "must be at most %d seconds (got %s)", SHUTDOWN_DELAY_MAX, show(s.shutdown_delay))
  end
  out.api_keys = api_keys("server.api_keys", s.api_keys)
  if s.admin_key ~= nil then out.admin_key = non_empty_string("server.admin_key", s.admin_key) end
  out.preload = s.preload
  return out
end

-- preload: a model name, or { model = name, context = N }; checked once models are known.
local function validate_preload(p, ms)
  if p == nil then return nil end
  local path = "server.preload"
  if type(p) == "string" then p = { model = p } end
  check_type(path, p, "table")
  only_keys(path, p, set_of("model", "context"))
  local name = non_empty_string(path .. ".model", p.model)
  for _, m in ipairs(ms) do
    local known = m.name == name
    for _, alias in ipairs(m.aliases) do known = known or alias == name end
    if known then
      if p.context == nil then
        local smallest = m.variants[1].context
        for _, v in ipairs(m.variants) do smallest = math.min(smallest, v.context) end
        return { model = m.name, context = smallest }
      end
      local context = positive_integer(path .. ".context", p.context)
      for _, v in ipairs(m.variants) do
        if v.context == context then return { model = m.name, context = context } end
      end
      fail(path .. ".context", "%d is not a context of model %s", context, show(m.name))
    end
  end
  fail(path .. ".model", "no model is named %s", show(name))
end

-- models ------------------------------------------------------------------------

local model_keys = set_of("name", "aliases", "engine", "binary", "args", "env", "default_max_tokens",
  "variants", "request", "health_check_timeout", "engine_startup_timeout", "drain_timeout",
  "stop_timeout", "engine_idle_timeout", "memory", "keep_loaded", "command", "health", "count",
  "served_name", "url", "api_key_env", "max_in_flight", "health_interval")
local variant_keys = set_of("context", "args", "binary", "health_check_timeout",
  "engine_startup_timeout", "drain_timeout", "stop_timeout", "engine_idle_timeout", "memory")

-- The keys only some engine types read (a model's or a variant's); any other key is
-- every type's. A key given to a type that does not read it is refused, naming those that do.
local LOCAL = { ["llama.cpp"] = true, openai = true }
local UPSTREAM = { openai = true, remote = true }
local type_keys = {
  binary = { ["llama.cpp"] = true },
  args = LOCAL,
  env = LOCAL,
  memory = LOCAL,
  command = { openai = true },
  health = UPSTREAM,
  count = UPSTREAM,
  served_name = UPSTREAM,
  max_in_flight = UPSTREAM,
  url = { remote = true },
  api_key_env = { remote = true },
  health_interval = { remote = true },
}

local function only_type_keys(path, tbl, engine)
  for key, readers in pairs(type_keys) do
    if tbl[key] ~= nil and not readers[engine] then
      local names = {}
      for name in pairs(readers) do names[#names + 1] = string.format("%q", name) end
      table.sort(names)
      fail(path .. "." .. key, "is not read by engine = %s (only by %s)", show(engine), table.concat(names, ", "))
    end
  end
end

-- engine = "openai": the command's placeholders, substituted when the gateway starts it.
local PLACEHOLDERS = set_of("PORT", "HOST", "CONTEXT", "MODEL")

local function placeholders(path, list)
  local seen = {}
  for i, a in ipairs(list) do
    for name in a:gmatch("%${([^}]*)}") do
      if not PLACEHOLDERS[name] then
        fail(string.format("%s[%d]", path, i), "unknown placeholder ${%s} (known: ${PORT}, ${HOST}, "
          .. "${CONTEXT}, ${MODEL})", name)
      end
      seen[name] = true
    end
  end
  return seen
end

local COUNT_METHODS = set_of("none", "llama.cpp", "vllm", "tabby")

-- What the gateway needs to start or reach an engine of type openai or remote.
local function upstream(path, m, engine)
  local out = { health = "/health", count = "none", health_interval = 5 }
  if m.health ~= nil then
    out.health = non_empty_string(path .. ".health", m.health)
    if out.health:sub(1, 1) ~= "/" then fail(path .. ".health", "must be a path starting with / (got %s)", show(m.health)) end
  end
  if m.count ~= nil then
    check_type(path .. ".count", m.count, "string")
    if not COUNT_METHODS[m.count] then
      fail(path .. ".count", "unknown count method %s (known: \"none\", \"llama.cpp\", \"vllm\", \"tabby\")", show(m.count))
    end
    out.count = m.count
  end
  if m.served_name ~= nil then out.served_name = non_empty_string(path .. ".served_name", m.served_name) end
  if m.max_in_flight ~= nil then out.max_in_flight = positive_integer(path .. ".max_in_flight", m.max_in_flight) end
  if engine == "openai" then
    if m.command == nil then
      fail(path .. ".command", "is missing: engine = \"openai\" starts its engine with a command like "
        .. "{ \"vllm\", \"serve\", \"/models/m\", \"--port\", \"${PORT}\" }")
    end
    out.command = arg_list(path .. ".command", m.command)
    if #out.command == 0 then fail(path .. ".command", "is empty: give the program and its arguments") end
    if not placeholders(path .. ".command", out.command).PORT then
      fail(path .. ".command", "has no ${PORT}: the engine must listen on the free port the gateway "
        .. "picks (e.g. \"--port\", \"${PORT}\")")
    end
  else
    if m.url == nil then fail(path .. ".url", "is missing: engine = \"remote\" needs the upstream's url, "
      .. "e.g. \"http://10.0.0.5:7777\"") end
    out.url = non_empty_string(path .. ".url", m.url)
    if not out.url:match("^https?://[^/%s]+[^%s]*$") then
      fail(path .. ".url", "must be an http:// or https:// URL like \"http://10.0.0.5:7777\" (got %s)", show(m.url))
    end
    local authority = out.url:match("^https?://([^/]+)")
    if authority:find("@", 1, true) then -- (its value is not shown: it holds a password)
      fail(path .. ".url", "must not hold credentials: name the variable with the key in api_key_env")
    end
    if out.url:find("[?#]") then
      fail(path .. ".url", "must have no query or fragment: the request paths are appended to it (got %s)", show(m.url))
    end
    local port = authority:match(":(%d+)$")
    if port and not valid_port(port) then fail(path .. ".url", "has no valid port (got %s)", show(m.url)) end
    out.url = out.url:gsub("/+$", "")
    if m.api_key_env ~= nil then
      out.api_key_env = non_empty_string(path .. ".api_key_env", m.api_key_env)
      if not out.api_key_env:match("^[%a_][%w_]*$") then
        fail(path .. ".api_key_env", "must name an environment variable (got %s); the key itself is "
          .. "never written in the config", show(m.api_key_env))
      end
    end
    if m.health_interval ~= nil then out.health_interval = positive_number(path .. ".health_interval", m.health_interval) end
  end
  return out
end

-- model_out: the model's validated values (timeouts and memory are inherited from it).
local function validate_variant(path, v, model_out)
  check_type(path, v, "table")
  only_keys(path, v, variant_keys)
  only_type_keys(path, v, model_out.engine)
  if v.context == nil then fail(path .. ".context", "is missing (every variant needs a context size)") end
  local out = resolve_timeouts(path, v, model_out)
  out.context = positive_integer(path .. ".context", v.context)
  out.args = arg_list(path .. ".args", v.args)
  if v.binary ~= nil then out.binary = non_empty_string(path .. ".binary", v.binary) end
  if model_out.upstream and model_out.upstream.command then
    placeholders(path .. ".args", out.args)
  end
  -- A declared footprint replaces the estimate; a variant inherits its model's.
  if v.memory ~= nil then out.memory = size(path .. ".memory", v.memory) else out.memory = model_out.memory end
  return out
end

local function validate_model(path, m, server_out, names)
  check_type(path, m, "table")
  only_keys(path, m, model_keys)
  if m.name == nil then fail(path .. ".name", "is missing") end
  local out = resolve_timeouts(path, m, server_out)
  out.name = non_empty_string(path .. ".name", m.name)
  if names[out.name] then fail(path .. ".name", "%s is already used by %s", show(out.name), names[out.name]) end
  names[out.name] = path
  out.aliases = {}
  for i, alias in ipairs(sequence(path .. ".aliases", m.aliases)) do
    local p = string.format("%s.aliases[%d]", path, i)
    non_empty_string(p, alias)
    if names[alias] then fail(p, "%s is already used by %s", show(alias), names[alias]) end
    names[alias] = p
    out.aliases[i] = alias
  end
  out.engine = m.engine or "llama.cpp"
  check_type(path .. ".engine", out.engine, "string")
  if engine_types[out.engine] == nil then
    fail(path .. ".engine", "unknown engine type %s (known: \"llama.cpp\", \"openai\", \"remote\")",
      show(out.engine))
  end
  only_type_keys(path, m, out.engine)
  if UPSTREAM[out.engine] then out.upstream = upstream(path, m, out.engine) end
  if m.binary ~= nil then out.binary = non_empty_string(path .. ".binary", m.binary) end
  out.args = arg_list(path .. ".args", m.args)
  if out.upstream and out.upstream.command then placeholders(path .. ".args", out.args) end
  out.env = string_map(path .. ".env", m.env)
  out.default_max_tokens = engine_count(path .. ".default_max_tokens", m.default_max_tokens or 512)
  out.request = request_rules(path .. ".request", m.request)
  if m.memory ~= nil then out.memory = size(path .. ".memory", m.memory) end
  out.keep_loaded = false
  if m.keep_loaded ~= nil then out.keep_loaded = check_type(path .. ".keep_loaded", m.keep_loaded, "boolean") end
  local variants = sequence(path .. ".variants", m.variants)
  if #variants == 0 then fail(path .. ".variants", "is empty: a model needs at least one variant { context = N }") end
  out.variants = {}
  local contexts = {}
  local parse = engine_types[out.engine] and engine_parser(out.engine) or upstream_engine(out.upstream)
  for i, v in ipairs(variants) do
    local vp = string.format("%s.variants[%d]", path, i)
    local vo = validate_variant(vp, v, out)
    if contexts[vo.context] then
      fail(vp .. ".context", "%d is already the context of %s", vo.context, contexts[vo.context])
    end
    contexts[vo.context] = vp
    vo.engine = parse(variant_args(path, out.args, vp, vo.args), engine_env(path, out.env), out.name, path .. ".name")
    out.variants[i] = vo
  end
  return out
end

local function validate_models(ms, server_out)
  if ms == nil then fail("models", "is missing: define models = { { name = ..., variants = {...} } }") end
  local list = sequence("models", ms)
  if #list == 0 then fail("models", "is empty: define at least one model") end
  local names, out = {}, {}
  for i, m in ipairs(list) do
    out[i] = validate_model(string.format("models[%d]", i), m, server_out, names)
  end
  return out
end

-- The loader hands every string to Python as UTF-8; name the key of one that is not.
local function check_utf8(path, v)
  if type(v) == "string" and utf8.len(v) == nil then
    fail(path, "is not valid UTF-8 text (got %s)", show(v))
  elseif type(v) == "table" then
    for k, val in pairs(v) do
      if type(k) == "string" and utf8.len(k) == nil then
        fail(path, "has a key that is not valid UTF-8 text (got %s)", show(k))
      end
      check_utf8(type(k) == "string" and path .. "." .. k or string.format("%s[%s]", path, show(k)), val)
    end
  end
end

server = validate_server(server)
models = validate_models(models, server)
server.preload = validate_preload(server.preload, models)
check_utf8("server", server)
check_utf8("models", models)
