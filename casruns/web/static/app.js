/* casruns pages: the live parts. The pages work without this file; it only keeps them current.
   Data comes from data-* attributes and the JSON API; text is only ever set with textContent. */
"use strict";
(function () {
  var TYPES = ["created", "status", "cancel_requested", "salvaged", "promoted", "unpromoted", "retention_changed", "removed", "updated"];
  var TERMINAL = ["succeeded", "failed", "timed_out", "cancelled"];

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function listen(url, onEvent) {
    if (!window.EventSource || !url) return null;
    var es = new EventSource(url);
    TYPES.forEach(function (t) {
      es.addEventListener(t, function (m) {
        var ev;
        try { ev = JSON.parse(m.data); } catch (e) { return; }
        if (ev && typeof ev === "object") onEvent(ev, es);
      });
    });
    es.addEventListener("error", function () { document.body.setAttribute("data-live", "reconnecting"); });
    es.addEventListener("open", function () { document.body.setAttribute("data-live", "open"); });
    return es;
  }

  function badge(status) { return el("span", "badge status-" + String(status).replace(/[^a-z_]/g, ""), status); }

  /* -- the runs page ------------------------------------------------------------------------ */
  function runsPage(table) {
    var tbody = table.tBodies[0];
    var insert = table.getAttribute("data-live-insert") === "1";
    var seen = {};
    var fresh = 0;
    function rowOf(id) {
      var rows = tbody.rows;
      for (var i = 0; i < rows.length; i++) if (rows[i].getAttribute("data-run") === id) return rows[i];
      return null;
    }
    function bump(status, by) {
      var c = document.querySelector('[data-count="' + String(status).replace(/[^a-z_]/g, "") + '"]');
      if (c) c.textContent = String(Math.max(0, (parseInt(c.textContent, 10) || 0) + by));
    }
    function setStatus(row, status) {
      var old = row.getAttribute("data-status");
      if (old === status) return;
      bump(old, -1); bump(status, 1);
      row.setAttribute("data-status", status);
      var cell = row.querySelector("td.status");
      cell.textContent = "";
      cell.appendChild(badge(status));
    }
    function newRow(ev) {
      var run = ev.run || {};
      var tr = el("tr", "fresh");
      tr.setAttribute("data-run", ev.run_id);
      tr.setAttribute("data-status", run.status || ev.new_status);
      var td = el("td", "mono");
      var a = el("a", null, ev.run_id);
      a.href = "/runs/" + encodeURIComponent(ev.run_id);
      td.appendChild(a);
      tr.appendChild(td);
      var st = el("td", "status"); st.appendChild(badge(run.status || ev.new_status)); tr.appendChild(st);
      tr.appendChild(el("td", "time", run.created_at || ev.time));
      tr.appendChild(el("td", null, ""));
      tr.appendChild(el("td", null, run.provider || ""));
      var labels = el("td", "labels");
      var keys = Object.keys(run.labels || {}).sort();
      keys.forEach(function (k) { labels.appendChild(el("span", "label", k + "=" + run.labels[k])); labels.appendChild(document.createTextNode(" ")); });
      tr.appendChild(labels);
      tr.appendChild(el("td", "promoted", run.promoted ? "yes" : ""));
      tr.appendChild(el("td", "exit", ev.exit_code === null || ev.exit_code === undefined ? "" : ev.exit_code));
      return tr;
    }
    listen(table.getAttribute("data-events"), function (ev) {
      var key = ev.run_id + "#" + ev.incarnation + "#" + ev.seq;
      if (seen[key]) return;
      seen[key] = true;
      var row = rowOf(ev.run_id);
      var status = (ev.run && ev.run.status) || ev.new_status;
      if (row) {
        if (ev.type === "removed") { bump(row.getAttribute("data-status"), -1); row.parentNode.removeChild(row); return; }
        if (status) setStatus(row, status);
        if (ev.run && "promoted" in ev.run) row.querySelector("td.promoted").textContent = ev.run.promoted ? "yes" : "";
        if (ev.exit_code !== null && ev.exit_code !== undefined) row.querySelector("td.exit").textContent = String(ev.exit_code);
      } else if (ev.type === "created") {
        if (insert) {
          tbody.insertBefore(newRow(ev), tbody.firstChild);
          bump(status, 1);
          var total = document.getElementById("total");
          if (total) total.textContent = String((parseInt(total.textContent, 10) || 0) + 1);
        } else {
          fresh += 1;
          var note = document.getElementById("live-note");
          document.getElementById("new-runs").textContent = fresh + " new run" + (fresh === 1 ? "" : "s") + " since this page was loaded —";
          note.hidden = false;
        }
      }
    });
  }

  /* -- a run's page ------------------------------------------------------------------------- */
  function runPage(root) {
    var runId = root.getAttribute("data-run");
    var status = document.getElementById("run-status");
    var timeline = document.getElementById("timeline");
    var live = document.getElementById("live-state");
    var terminal = root.getAttribute("data-terminal") === "1";
    var seen = {};
    listen(terminal ? null : root.getAttribute("data-events"), function (ev, es) {
      var key = ev.incarnation + "#" + ev.seq;
      if (ev.run_id !== runId || seen[key]) return;
      seen[key] = true;
      var li = el("li");
      li.appendChild(el("span", "time", ev.time));
      li.appendChild(document.createTextNode(" "));
      li.appendChild(el("strong", null, ev.type === "status" ? ev.new_status : ev.type));
      timeline.appendChild(li);
      var s = (ev.run && ev.run.status) || ev.new_status;
      if (s) {
        status.textContent = s;
        status.className = "badge status-" + String(s).replace(/[^a-z_]/g, "");
      }
      if (s && TERMINAL.indexOf(s) >= 0) {
        es.close();
        live.textContent = "finished — reload for the exit code and artifacts";
        live.hidden = false;
      }
    });
    if (!terminal) tail(root);
  }

  function tail(root) {
    var pre = document.getElementById("log");
    var state = document.getElementById("tail-state");
    var offset = parseInt(root.getAttribute("data-offset"), 10) || 0;
    if (!window.fetch || !window.TextDecoder || !pre) return;
    var decoder = new TextDecoder("utf-8");
    function append(text) {
      if (!text) return;
      var stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      pre.appendChild(document.createTextNode(text));
      if (stick) pre.scrollTop = pre.scrollHeight;
    }
    function go(tries) {
      state.textContent = "live: following the log";
      fetch(root.getAttribute("data-log") + "?offset=" + offset + "&follow=1", { credentials: "same-origin", cache: "no-store" })
        .then(function (resp) {
          if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
          var reader = resp.body.getReader();
          function pump() {
            return reader.read().then(function (r) {
              if (r.done) { append(decoder.decode()); state.textContent = "end of log"; return; }
              offset += r.value.byteLength;
              append(decoder.decode(r.value, { stream: true }));
              return pump();
            });
          }
          return pump();
        })
        .catch(function (e) {
          if (tries < 5) { state.textContent = "live tail interrupted; retrying"; setTimeout(function () { go(tries + 1); }, 1000 * (tries + 1)); }
          else state.textContent = "live tail unavailable (" + e.message + "): reload for more";
        });
    }
    go(0);
  }

  function start() {
    var runs = document.getElementById("runs");
    if (runs) runsPage(runs);
    var run = document.getElementById("run");
    if (run) runPage(run);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
