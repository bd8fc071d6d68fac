"use strict";
// The directory's status page. It long-polls `/?format=json` (answered at
// once when the snapshot changes, else after `wait`) and redraws.
// Every string shown comes from the network: it is set with textContent,
// never parsed as HTML.
(function () {
  const WAIT = "2s";
  let held = { epoch: 0, index: 0 };
  let failures = 0;

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function ago(ms) {
    if (ms < 10000) return (ms / 1000).toFixed(1) + " s ago";
    if (ms < 120000) return Math.round(ms / 1000) + " s ago";
    if (ms < 7200000) return Math.round(ms / 60000) + " min ago";
    return Math.round(ms / 3600000) + " h ago";
  }

  function duration(s) {
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " days";
  }

  function pct(x) {
    return (Math.round(x * 10) / 10).toFixed(1) + "%";
  }

  function short(commit) {
    return commit ? commit.slice(0, 12) : "none";
  }

  function bar(kind, percent, label) {
    const b = el("div", "bar " + kind);
    b.title = label;
    const fill = el("span");
    fill.style.width = Math.max(0, Math.min(100, percent)) + "%";
    b.appendChild(fill);
    return b;
  }

  function item(term, value, note) {
    const d = el("div");
    d.appendChild(el("dt", null, term));
    const dd = el("dd", null, value);
    if (note) dd.appendChild(el("small", null, note));
    d.appendChild(dd);
    return d;
  }

  function renderSummary(p) {
    document.getElementById("name").textContent = p.name;
    document.title = "dstack directory " + p.name;
    const items = [];
    const r = p.routes;
    if (r) {
      const commit = r.commit ? short(r.commit) : "none yet";
      const c = item("commit in force", commit, r.summary || r.branch + " of " + r.repo);
      c.id = "commit";
      items.push(c);
    } else {
      items.push(item("routes", "no repo", "every service splits equally"));
    }
    items.push(item("snapshot", "#" + p.index, (p.warming ? "warming, " : "") + "epoch " + p.epoch));
    items.push(item("instances", p.instances, p.services.length + " services"));
    items.push(item("sherlocks", p.sherlocks.length, p.sherlocks.filter((s) => s.lag === 0).length + " in sync"));
    items.push(item("up", duration(p.uptime_s), p.address || null));
    document.getElementById("summary").replaceChildren(...items);
  }

  function renderRejected(p) {
    const box = document.getElementById("rejected");
    const rej = p.routes && p.routes.rejected;
    if (!rej) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const parts = [el("h2", null, "Commit " + short(rej.commit) + " rejected (" + rej.kind + ")")];
    parts.push(el("div", null, "“" + rej.summary + "”, at " + rej.at + ". The commit in force stays."));
    const list = el("ul");
    for (const e of rej.errors) list.appendChild(el("li", null, e));
    parts.push(list);
    box.replaceChildren(...parts);
    box.hidden = false;
  }

  function renderWarnings(p) {
    const list = document.getElementById("warnings");
    list.replaceChildren(...p.warnings.map((w) => el("li", null, w)));
    document.getElementById("warnings-section").hidden = p.warnings.length === 0;
  }

  function renderInstance(i) {
    const row = el("div", "instance");
    row.dataset.id = i.id;
    const health = i.healthy ? ["ok", "● healthy"] : ["late", "● late"];
    row.appendChild(el("span", "health " + health[0], health[1]));
    row.appendChild(el("span", "url mono", i.url));
    row.appendChild(el("span", "beat", ago(i.last_heartbeat_ms)));
    row.appendChild(el("span", "ishare", i.published ? pct(i.share) : "new"));
    row.title = "id " + i.id + ", ttl " + i.ttl_ms + " ms";
    return row;
  }

  function renderService(s) {
    const card = el("article", "service");
    card.dataset.service = s.name;
    const h = el("h3", null, s.name);
    h.appendChild(el("span", "tag", s.routed ? "routed" : "no route: equal split"));
    if (s.clients.length) h.appendChild(el("span", "tag", "own split for " + s.clients.join(", ")));
    card.appendChild(h);
    for (const v of s.versions) {
      const box = el("div", "version");
      box.dataset.version = v.version;
      const head = el("div", "vhead");
      head.appendChild(el("span", "vname", v.version));
      const desired = v.desired === null ? "no weight" : "desired " + v.desired + "%";
      head.appendChild(el("span", "nums", desired + " · now " + pct(v.share)));
      box.appendChild(head);
      const bars = el("div", "bars");
      if (v.desired !== null) bars.appendChild(bar("desired", v.desired, "desired weight " + v.desired + "%"));
      bars.appendChild(bar("share", v.share, "effective share " + pct(v.share)));
      box.appendChild(bars);
      if (v.instances.length === 0) {
        const none = el("div", "instance");
        none.appendChild(el("span", "health none", "● none"));
        none.appendChild(el("span", "url", "no live instance"));
        box.appendChild(none);
      }
      for (const i of v.instances) box.appendChild(renderInstance(i));
      if (v.unlisted > 0) box.appendChild(el("div", "more", "and " + v.unlisted + " more (dw route list lists all)"));
      card.appendChild(box);
    }
    return card;
  }

  function renderServices(p) {
    const root = document.getElementById("services");
    if (p.services.length === 0) {
      root.replaceChildren(el("div", "empty", "No routes and no instances yet."));
      return;
    }
    root.replaceChildren(...p.services.map(renderService));
  }

  function renderSherlocks(p) {
    const root = document.getElementById("sherlocks");
    if (p.sherlocks.length === 0) {
      root.replaceChildren(el("div", "empty", "No sherlock has asked for a snapshot yet."));
      return;
    }
    const list = el("div", "sherlock-list");
    for (const s of p.sherlocks) {
      const row = el("div", "sherlock");
      row.dataset.name = s.name;
      row.appendChild(el("span", "sname", s.name + (s.client ? " (client " + s.client + ")" : "")));
      row.appendChild(el("span", "applied", "applied #" + s.applied));
      let lag;
      if (s.lag === null) lag = el("span", "lag late", "previous run");
      else if (s.lag === 0) lag = el("span", "lag ok", "in sync");
      else lag = el("span", "lag late", s.lag + " behind");
      row.appendChild(lag);
      row.appendChild(el("span", "seen", "seen " + ago(s.last_seen_ms)));
      row.appendChild(el("span", "peer mono", s.peer));
      list.appendChild(row);
    }
    root.replaceChildren(list);
  }

  function render(p) {
    renderSummary(p);
    renderRejected(p);
    renderWarnings(p);
    renderServices(p);
    renderSherlocks(p);
    document.body.dataset.index = p.index;
  }

  function setLive(state, text) {
    const live = document.getElementById("live");
    live.className = "live " + state;
    live.textContent = text;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async function poll() {
    for (;;) {
      // The origin alone: never a user:password the address bar may hold.
      const url = new URL("/", location.origin);
      url.searchParams.set("format", "json");
      url.searchParams.set("epoch", held.epoch);
      url.searchParams.set("index", held.index);
      url.searchParams.set("wait", WAIT);
      try {
        const resp = await fetch(url, { cache: "no-store", credentials: "same-origin" });
        if (!resp.ok) {
          let why = "HTTP " + resp.status;
          try {
            why += ": " + (await resp.json()).error;
          } catch (_) {
            // not JSON: the status alone
          }
          throw new Error(why);
        }
        const page = await resp.json();
        held = { epoch: page.epoch, index: page.index };
        render(page);
        failures = 0;
        setLive("ok", "live · " + new Date().toLocaleTimeString());
      } catch (e) {
        failures += 1;
        setLive("down", "reconnecting (" + e.message + ")");
        await sleep(Math.min(10000, 500 * 2 ** Math.min(failures, 5)));
      }
    }
  }

  poll();
})();
