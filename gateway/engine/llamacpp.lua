-- llama.cpp's llama-server: what the gateway reads in an engine's arguments, and what
-- it relies on them not to change. gateway/config/validate.lua loads this file for
-- models of engine "llama.cpp" and calls it once per variant, at load time; the values
-- it returns become typed fields of the variant, so nothing parses arguments later.
--
-- How llama-server reads its command line (common/arg.cpp, build b11434): a flag's value
-- is the next argument ("-np", "2"; there is no "--flag=value" form); "--a_b" means
-- "--a-b"; the last occurrence of a flag wins; an environment variable (LLAMA_ARG_...)
-- applies when the flag is not given, and engines inherit the gateway's environment.

return function(fail, show)
  local HOST_PORT = "is set by the gateway (every engine gets a free loopback port); remove it"
  local API_KEY = "would make the engine answer the gateway's own calls with 401; engines listen on "
    .. "loopback only (protect the gateway with server.api_keys)"

  -- The log level of the "listening on" line the gateway waits for (LOG_LEVEL_INFO).
  local INFO_VERBOSITY = 3

  local function integer_text(s)
    return s:match("^%s*[+-]?%d+%s*$") ~= nil
  end

  local function positive_integer(path, flag, s)
    if not integer_text(s) or tonumber(s) < 1 then
      fail(path, "%s must be a positive integer (got %s)", flag, show(s))
    end
    return math.tointeger(tonumber(s))
  end

  local function log_verbosity(path, flag, s)
    if not integer_text(s) then fail(path, "%s must be an integer (got %s)", flag, show(s)) end
    if tonumber(s) < INFO_VERBOSITY then
      fail(path, "%s %s hides the \"listening on\" line the gateway waits for (use %d or more)",
        flag, s, INFO_VERBOSITY)
    end
  end

  -- llama-server splits --alias at commas into several names, trims them, and answers
  -- with the alphabetically first: the name the gateway expects back must be one name.
  local function served_name(path, what, s)
    if s == "" then fail(path, "%s must not be empty", what) end
    if s:find(",", 1, true) then
      fail(path, "%s %s has a comma: llama-server's --alias would split it into several names "
        .. "(give one name; the model's `aliases` add more)", what, show(s))
    end
    if s:match("^%s") or s:match("%s$") then
      fail(path, "%s %s starts or ends with a space, which llama-server's --alias drops", what, show(s))
    end
    return s
  end

  local function alias(path, flag, s) return served_name(path, flag, s) end

  local function text(path, flag, s)
    if s == "" then fail(path, "%s must not be empty", flag) end
    return s
  end

  -- The KV cache types llama-server accepts (`llama-server --help`, b11434); it compares
  -- the name exactly, so "Q8_0" is refused too. The memory estimate needs to know them.
  local CACHE_TYPES = { "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1" }
  local cache_type_set = {}
  for _, t in ipairs(CACHE_TYPES) do cache_type_set[t] = true end

  local function cache_type(path, flag, s)
    if not cache_type_set[s] then
      fail(path, "%s must be one of %s (got %s)", flag, table.concat(CACHE_TYPES, ", "), show(s))
    end
    return s
  end

  -- Every option the gateway reads or must refuse. `key`: the variant field it sets;
  -- `value`: parses the flag's value (flags without one are switches, true when given,
  -- false for a `negated` form); `env`: the variable llama-server reads instead;
  -- `refuse`: why it may not be given at all; `needed`: why a switch may not end up off;
  -- `equals_passes`: a "--flag=value" form is not read (nor refused) but passed on.
  local options = {
    { "-c", "--ctx-size", refuse = "sets the context size, which the variant's `context` does "
      .. "(the gateway passes --ctx-size); remove it" },
    { "--host", refuse = HOST_PORT },
    { "--port", refuse = HOST_PORT },
    { "--api-key", env = "LLAMA_API_KEY", refuse = API_KEY },
    { "--api-key-file", env = "LLAMA_ARG_API_KEY_FILE", refuse = API_KEY },
    { "--api-prefix", env = "LLAMA_ARG_API_PREFIX",
      refuse = "moves the endpoints the gateway calls (/health, /tokenize, ...); remove it" },
    { "--log-disable", refuse = "hides the \"listening on\" line the gateway waits for; remove it" },
    { "--slots", negated = { "--no-slots" }, env = "LLAMA_ARG_ENDPOINT_SLOTS",
      needed = "hides /slots, where the gateway sees which requests the engine still runs; remove it" },
    { "--kv-unified-per-slot", env = "LLAMA_ARG_KV_UNIFIED_PER_SLOT",
      refuse = "caps each slot's context, whose size the variant's `context` and -np set (the gateway "
        .. "sizes requests by them); remove it" },
    { "-lv", "--verbosity", "--log-verbosity", env = "LLAMA_ARG_LOG_VERBOSITY", value = log_verbosity },
    { "-np", "--parallel", env = "LLAMA_ARG_N_PARALLEL", key = "slots", value = positive_integer },
    { "-kvu", "--kv-unified", negated = { "-no-kvu", "--no-kv-unified" }, env = "LLAMA_ARG_KV_UNIFIED",
      key = "kv_unified" },
    { "-a", "--alias", key = "alias", value = alias },
    { "-m", "--model", env = "LLAMA_ARG_MODEL", key = "model_file", value = text },
    -- Read for the memory estimate only: "--mmproj=FILE", which llama-server refuses when
    -- the engine starts, is passed on as it stands (and not counted).
    { "-mm", "--mmproj", env = "LLAMA_ARG_MMPROJ", key = "mmproj_file", value = text, equals_passes = true },
    { "-ctk", "--cache-type-k", env = "LLAMA_ARG_CACHE_TYPE_K", key = "cache_type_k", value = cache_type },
    { "-ctv", "--cache-type-v", env = "LLAMA_ARG_CACHE_TYPE_V", key = "cache_type_v", value = cache_type },
    { "--embedding", "--embeddings", env = "LLAMA_ARG_EMBEDDINGS", key = "embeddings" },
    { "--rerank", "--reranking", env = "LLAMA_ARG_RERANKING", key = "reranking" },
  }

  local by_flag = {} -- flag -> { option, the value a switch sets }
  for _, option in ipairs(options) do
    for _, flag in ipairs(option) do by_flag[flag] = { option, true } end
    for _, flag in ipairs(option.negated or {}) do by_flag[flag] = { option, false } end
  end

  local function lookup(arg)
    if arg:sub(1, 2) == "--" then arg = arg:gsub("_", "-") end
    return by_flag[arg]
  end

  -- One option's setting, from an argument or an environment variable.
  -- A switch the gateway needs is checked once its last setting is known (the last wins).
  local function apply(values, option, path, flag, value)
    if option.refuse then fail(path, "%s %s", flag, option.refuse) end
    if option.value then value = option.value(path, flag, value) end
    if option.key then values[option.key] = value end
    if option.needed then values[option] = value == false and { path = path, flag = flag } or nil end
  end

  -- llama-server's reading of a switch's variable: "on", "enabled", "true" or "1" set it,
  -- "off", "disabled", "false" or "0" clear it; a switch without a negated form only sets.
  local truthy = { on = true, enabled = true, ["true"] = true, ["1"] = true }
  local falsey = { off = true, disabled = true, ["false"] = true, ["0"] = true }

  local function apply_env(values, env, option)
    if option.negated then -- LLAMA_ARG_NO_X, set to anything, is the negated flag
      local off = env((option.env:gsub("^LLAMA_ARG_", "LLAMA_ARG_NO_")))
      if off then return apply(values, option, off.path, off.name, false) end
    end
    local value = env(option.env)
    if value == nil then return end
    if option.value or option.refuse then return apply(values, option, value.path, value.name, value.text) end
    if truthy[value.text] then return apply(values, option, value.path, value.name, true) end
    if not option.negated then return end -- llama-server ignores anything else for a plain switch
    if not falsey[value.text] then
      fail(value.path, "must be on/off, enabled/disabled, true/false or 1/0 (got %s)", show(value.text))
    end
    apply(values, option, value.path, string.format("%s = %s", value.name, show(value.text)), false)
  end

  -- args: the variant's engine arguments in order, each { path = "models[1].args[3]", text = "-np" };
  -- env(name): the { name, path, text } of an environment variable the engine gets, or nil;
  -- name, name_path: the model's name, which the gateway passes as --alias unless the args set one.
  -- Returns { slots, kv_unified, alias, model_file, mmproj_file, cache_type_k, cache_type_v,
  -- embeddings, reranking } (nil when unset).
  return function(args, env, name, name_path)
    local values = {
      kv_unified = false, embeddings = false, reranking = false, cache_type_k = "f16", cache_type_v = "f16",
    }
    for _, option in ipairs(options) do
      if option.env then apply_env(values, env, option) end
    end
    local i = 1
    while i <= #args do
      local arg = args[i]
      local flag, eq = arg.text:match("^(%-[^=]*)(=)")
      local found = lookup(flag or arg.text)
      if found and eq and found[1].equals_passes then
        found = nil -- left to llama-server, which refuses it at start
      elseif found and eq then
        if found[1].refuse then fail(arg.path, "%s %s", flag, found[1].refuse) end
        fail(arg.path, "llama-server takes no %s=value form: write %s and its value as two arguments",
          flag, show(flag))
      end
      if found and found[1].value then
        local value = args[i + 1]
        if value == nil then fail(arg.path, "%s needs a value", arg.text) end
        apply(values, found[1], value.path, arg.text, value.text)
        i = i + 2
      else
        if found then apply(values, found[1], arg.path, arg.text, found[2]) end
        i = i + 1
      end
    end
    for _, option in ipairs(options) do
      local off = option.needed and values[option]
      if off then fail(off.path, "%s %s", off.flag, option.needed) end
      values[option] = nil
    end
    if values.alias == nil then served_name(name_path, "the name", name) end
    return values
  end
end
