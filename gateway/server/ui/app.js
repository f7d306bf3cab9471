// The dashboard: follows /gateway/events and applies each event in place.

import { bytes, syncClock } from "./dom.js";
import { Cards, loadMachine } from "./engines.js";
import { EventFeed, forgetKey, post, storeKey } from "./stream.js";
import { Activity, Log, Queue, Selections } from "./tables.js";

const $ = (id) => document.getElementById(id);
const NOTICE_SHOWN = 8000; // ms

const cards = new Cards($("engines"), { load, unload });
const activity = new Activity($("activity"));
const selections = new Selections($("selections"));
const queue = new Queue($("queue"), $("queue-empty"));
const log = new Log($("log"), $("log-source"), $("log-filter"));
let memory = {}; // the budget, from the last state

const apply = {
  state(data) {
    syncClock(data.now);
    memory = data.state.memory;
    cards.reset(data.models, data.state, data.queue);
    queue.set(data.queue);
    activity.reset(data.activity);
    selections.reset(data.state.selections, data.evictions);
    log.reset(data.logs);
    $("dashboard").hidden = false;
  },
  transition: (data) => cards.transition(data),
  grant: (data) => cards.inFlight(data.model, data.in_flight),
  release: (data) => cards.inFlight(data.model, data.in_flight),
  queue(data) {
    queue.set(data.models);
    cards.queued(data.models);
  },
  completion: (data) => activity.add(data),
  selection: (data) => selections.add(data),
  eviction: (data) => selections.addEviction(data),
  log: (data) => log.add(data),
  lost: () => feed.resync(),
};

const feed = new EventFeed({
  frame(frame) {
    apply[frame.kind]?.(frame.data);
    summarize();
  },
  status(status, detail) {
    const shown = $("connection");
    shown.dataset.status = status;
    shown.textContent = status;
    shown.title = detail ?? "";
  },
  key(refused, message) {
    forgetKey(); // a refused key is not sent again
    $("connection").dataset.status = "key";
    $("connection").textContent = "key needed";
    $("key-error").textContent = refused ? `The gateway refused this key: ${message}` : "";
    $("key-error").hidden = !refused;
    $("key-form").hidden = false;
    $("key").focus();
  },
});

function summarize() {
  const running = cards.running();
  const inFlight = running.reduce((sum, engine) => sum + (engine.in_flight ?? 0), 0);
  const waiting = Object.values(queue.models).reduce((sum, entry) => sum + entry.count, 0);
  const parts = [`${running.length} engine${running.length === 1 ? "" : "s"} up`, `${inFlight} in flight`, `${waiting} waiting`];
  if (memory.max_engines) parts.push(`at most ${memory.max_engines} at once`);
  if (memory.budget) {
    const reserved = running.reduce((sum, engine) => sum + (engine.memory?.reserved ?? 0), 0);
    parts.push(`${bytes(reserved)} of ${bytes(memory.budget)} reserved`);
  }
  $("summary").textContent = parts.join(" · ");
}

function notify(text, failed = false) {
  const notice = $("notice");
  notice.textContent = text;
  notice.classList.toggle("error", failed);
  notice.hidden = false;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => (notice.hidden = true), NOTICE_SHOWN);
}

async function load(model, context) {
  notify(`Loading ${model} with context ${context}…`);
  try {
    const loaded = await post("/gateway/load", { model, context });
    notify(`${loaded.model} is ready with context ${loaded.context} (pid ${loaded.pid ?? "–"}).`);
  } catch (error) {
    notify(`Load of ${model} failed: ${error.message}`, true);
  }
}

async function unload(model) {
  notify(`Unloading ${model}…`);
  try {
    await post("/gateway/unload", { model });
    notify(`${model} is unloaded.`);
  } catch (error) {
    notify(`Unload of ${model} failed: ${error.message}`, true);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault(); // the key goes in a header, never in a URL or a form post
  storeKey($("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  feed.connect();
});

setInterval(() => {
  cards.tick();
  queue.tick();
}, 1000);

await loadMachine();
feed.connect();
