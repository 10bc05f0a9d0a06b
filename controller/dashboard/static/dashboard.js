// kvmctl dashboard: renders the snapshots the server pushes on /api/stream (Server-Sent Events,
// fed by etcd's watch). No polling, no framework, no build step; text goes in with textContent.
"use strict";

const DOWN = new Set(["Unknown", "Fencing", "Fenced"]);
const RECOVERED = new Set(["VMRecovered", "NodeOnline", "VMPlaced"]);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function shortTime(iso) {
  return iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : "-";
}

function hostBox(host) {
  const box = el("div", {
    class: DOWN.has(host.health) ? "host down" : "host",
    "data-node": host.name,
    "data-health": host.health,
  });
  box.append(el("h3", {}, host.name));
  box.append(el("div", { class: "health" }, host.health + (host.cordoned ? " (cordoned)" : "")));
  const age = host.heartbeatAgeSeconds;
  box.append(el("div", { class: "detail heartbeat", "data-age": age },
    age === null ? "no heartbeat" : `heartbeat ${Math.round(age)}s ago`));
  if (host.fence) {
    const method = host.fence.method ? ` by ${host.fence.method}` : "";
    box.append(el("div", { class: "detail" },
      `fenced: ${host.fence.how}${method} at ${shortTime(host.fence.confirmedAt)}`));
  }
  if (host.message) box.append(el("div", { class: "detail" }, host.message));
  box.append(vmList(host.vms));
  return box;
}

function vmList(names) {
  const list = el("ul");
  for (const name of names) {
    const vm = current.vms.find((v) => v.name === name);
    list.append(el("li", { class: "vm", "data-vm": name, "data-state": vm ? vm.state : null },
      vm ? `${name} (${vm.state})` : name));
  }
  return list;
}

function unplacedBox() {
  const names = current.vms.filter((vm) => !vm.node).map((vm) => vm.name);
  if (names.length === 0) return null;
  const box = el("div", { class: "host", "data-node": "" }, el("h3", {}, "not placed"));
  box.append(vmList(names));
  return box;
}

function renderLeader() {
  const leader = current.leader;
  const shown = document.getElementById("leader");
  shown.dataset.identity = leader ? leader.identity : "";
  shown.dataset.term = leader ? leader.term : "";
  shown.textContent = leader
    ? `leader ${leader.identity}${leader.node ? ` on ${leader.node}` : ""}, term ${leader.term}`
    : "no leader";
}

function renderHosts() {
  const boxes = current.nodes.map(hostBox);
  const unplaced = unplacedBox();
  if (unplaced) boxes.push(unplaced);
  if (boxes.length === 0) boxes.push(el("p", { class: "empty" }, "No ClusterNodes."));
  document.getElementById("hosts").replaceChildren(...boxes);
}

function renderVms() {
  const rows = current.vms.map((vm) =>
    el("tr", { "data-vm": vm.name }, el("td", {}, vm.name), el("td", {}, vm.node || "-"),
      el("td", {}, vm.state), el("td", {}, shortTime(vm.since)), el("td", {}, vm.runState)));
  document.getElementById("vms").replaceChildren(...rows);
}

function renderTimeline() {
  const items = current.timeline.map((event) => {
    const kind = RECOVERED.has(event.reason) ? "recovered" : event.type;
    const count = event.count > 1 ? ` (x${event.count})` : "";
    return el("li", { class: kind, "data-reason": event.reason, "data-object": event.object },
      el("time", { datetime: event.time }, shortTime(event.time)),
      el("strong", {}, `${event.reason} `), `${event.object}: ${event.message}${count}`);
  });
  if (items.length === 0) items.push(el("li", { class: "empty" }, "No failovers in the last hour."));
  document.getElementById("timeline").replaceChildren(...items);
}

function renderEvents() {
  const rows = current.events.map((event) =>
    el("tr", { class: event.type, "data-reason": event.reason },
      el("td", {}, shortTime(event.time)), el("td", {}, event.type), el("td", {}, event.reason),
      el("td", {}, `${event.kind.toLowerCase()}/${event.object}`), el("td", {}, event.count),
      el("td", {}, event.message)));
  document.getElementById("events").replaceChildren(...rows);
}

let current = { leader: null, nodes: [], vms: [], events: [], timeline: [] };

function render(snapshot) {
  current = snapshot;
  renderLeader();
  renderHosts();
  renderVms();
  renderTimeline();
  renderEvents();
  document.getElementById("revision").textContent =
    `etcd revision ${snapshot.revision}, ${shortTime(snapshot.generatedAt)}`;
  document.body.dataset.revision = snapshot.revision;
}

function connect() {
  const state = document.getElementById("connection");
  const stream = new EventSource("/api/stream");
  stream.addEventListener("snapshot", (message) => {
    render(JSON.parse(message.data));
    state.dataset.state = "live";
    state.textContent = "live";
  });
  stream.onerror = () => {  // EventSource reconnects by itself; say so meanwhile
    state.dataset.state = "lost";
    state.textContent = "reconnecting";
  };
}

document.addEventListener("DOMContentLoaded", connect);
