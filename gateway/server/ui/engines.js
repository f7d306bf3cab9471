// One card per model: its engine's state diagram with the current state lit, what runs,
// and the buttons that load a variant or unload the engine.

import { bytes, clockTime, element, gatewayNow, seconds } from "./dom.js";

const PHASES = { draining: "drain", stopping: "stop", starting: "start" };
const RUNNING = new Set(["starting", "ready", "draining"]);
const TRANSITIONS_SHOWN = 6;

let machine = null; // the state diagram the gateway draws from its machine

export async function loadMachine() {
  const response = await fetch("/gateway/ui/machine.svg");
  machine = new DOMParser().parseFromString(await response.text(), "image/svg+xml").documentElement;
}

// How long the engine spent in each phase the last time it went through it (its last
// swap: drain, stop, start), from its transitions' timestamps.
export function lastPhases(history) {
  const took = {};
  for (let i = 1; i < history.length; i += 1) {
    const entered = history[i - 1];
    const phase = PHASES[entered.to];
    if (phase && history[i].from === entered.to) took[phase] = history[i].monotonic - entered.monotonic;
  }
  return took;
}

function idleEngine(model, history) {
  return { model, state: "idle", variant: null, pid: null, in_flight: 0, memory: null, history };
}

function withEdge(history, edge) {
  const known = history.some((r) => r.monotonic === edge.monotonic && r.to === edge.to);
  return known ? history : [...history, edge];
}

export class Cards {
  constructor(container, actions) {
    this.container = container;
    this.actions = actions; // load(model, context), unload(model)
    this.models = new Map(); // by name: the configured model
    this.engines = new Map(); // by model: its engine, as /gateway/state shows it
    this.cards = new Map();
    this.queue = {};
  }

  reset(models, state, queue) {
    this.models = new Map(models.map((model) => [model.name, model]));
    this.engines = new Map(state.engines.map((engine) => [engine.model, engine]));
    for (const name of this.models.keys()) {
      if (!this.engines.has(name)) this.engines.set(name, idleEngine(name, state.history.filter((r) => r.model === name)));
    }
    this.queue = queue;
    this.container.replaceChildren();
    this.cards.clear();
    for (const name of this.engines.keys()) this.render(name);
  }

  // A transition names states only: `engine` is the engine as it was when it was sent.
  transition({ engine, ...edge }) {
    const known = this.engines.get(edge.model) ?? idleEngine(edge.model, []);
    const now = engine ?? idleEngine(edge.model, withEdge(known.history, edge));
    this.engines.set(edge.model, { ...now, state: edge.to });
    this.render(edge.model);
  }

  inFlight(model, count) {
    const engine = this.engines.get(model);
    if (!engine) return;
    engine.in_flight = count;
    this.fill(model);
  }

  queued(queue) {
    this.queue = queue;
    for (const name of this.cards.keys()) this.fill(name);
  }

  tick() {
    for (const name of this.cards.keys()) this.fill(name);
  }

  running() {
    return [...this.engines.values()].filter((engine) => engine.state !== "idle");
  }

  render(name) {
    const card = this.cards.get(name) ?? this.create(name);
    const engine = this.engines.get(name);
    card.dataset.state = engine.state;
    card.querySelector(".badge").textContent = engine.state;
    card.querySelector(".engine-type").textContent = engine.engine ?? this.models.get(name)?.engine ?? "";
    card.querySelector(".unload").disabled = engine.state === "idle";
    this.light(card, engine);
    this.fill(name);
    this.listTransitions(card, engine.history);
  }

  create(name) {
    const card = document.getElementById("card-template").content.firstElementChild.cloneNode(true);
    card.dataset.model = name;
    card.querySelector(".model").textContent = name;
    if (machine) card.querySelector(".diagram").append(document.importNode(machine, true));
    const choice = card.querySelector(".variant-choice");
    for (const variant of this.models.get(name)?.variants ?? []) {
      choice.append(new Option(`context ${variant.context}`, variant.context));
    }
    choice.disabled = !choice.options.length;
    card.querySelector(".load").disabled = !choice.options.length;
    card.querySelector(".load").addEventListener("click", () => this.actions.load(name, Number(choice.value)));
    card.querySelector(".unload").addEventListener("click", () => this.actions.unload(name));
    this.cards.set(name, card);
    this.container.append(card);
    return card;
  }

  light(card, engine) {
    const last = engine.history.at(-1);
    for (const node of card.querySelectorAll(".machine .state")) {
      node.classList.toggle("lit", node.dataset.state === engine.state);
    }
    for (const edge of card.querySelectorAll(".machine .edge")) {
      const taken = last && edge.dataset.from === last.from && edge.dataset.to === last.to;
      edge.classList.toggle("taken", Boolean(taken && edge.dataset.trigger === last.trigger));
    }
  }

  fill(name) {
    const card = this.cards.get(name);
    const engine = this.engines.get(name);
    const facts = {
      variant: engine.variant ? `context ${engine.variant.context}` : null,
      pid: engine.pid,
      uptime: this.uptime(engine),
      in_flight: engine.in_flight ?? 0,
      queued: this.queue[name]?.count ?? 0,
      memory: this.memory(engine, card),
      swap: swapText(lastPhases(engine.history)),
    };
    for (const [fact, value] of Object.entries(facts)) {
      card.querySelector(`[data-fact="${fact}"]`).textContent = value ?? "–";
    }
  }

  uptime(engine) {
    const started = engine.history.findLast((r) => r.to === "starting");
    return RUNNING.has(engine.state) && started ? seconds(gatewayNow() - started.at) : null;
  }

  memory(engine, card) {
    if (engine.memory) {
      const measured = engine.memory.measured === null ? "not measured" : `${bytes(engine.memory.measured)} measured`;
      return `${bytes(engine.memory.estimate)} estimated · ${measured}`;
    }
    const chosen = Number(card.querySelector(".variant-choice").value);
    const variant = this.models.get(engine.model)?.variants.find((v) => v.context === chosen);
    return variant ? `${bytes(variant.memory.estimate)} estimated (not running)` : null;
  }

  listTransitions(card, history) {
    const list = card.querySelector(".transitions");
    list.replaceChildren(
      ...history
        .slice(-TRANSITIONS_SHOWN)
        .reverse()
        .map((r) => {
          const item = element("li", `to-${r.to}`, `${clockTime(r.at)} ${r.from} → ${r.to} (${r.trigger})`);
          item.title = r.reason;
          return item;
        }),
    );
  }
}

function swapText(took) {
  const parts = Object.values(PHASES)
    .filter((phase) => phase in took)
    .map((phase) => `${phase} ${seconds(took[phase])}`);
  return parts.length ? parts.join(" · ") : null;
}
