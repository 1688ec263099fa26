// The partners page without a build step. Without JavaScript the page works as it is (times in
// UTC, reload to refresh); with it, times show in the viewer's timezone, the cards refresh
// themselves, copy buttons copy, and revoking asks first.
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  function pad(n) { return String(n).padStart(2, "0"); }
  var zone = "local time";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || zone; } catch (e) { /* old */ }

  // <time datetime="…Z" data-local>… UTC</time> → "YYYY-MM-DD HH:MM:SS Area/City"
  function localise(root) {
    root.querySelectorAll("time[data-local]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (isNaN(d.getTime())) { return; }
      if (!t.title) { t.title = t.textContent; }
      t.textContent = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) +
        " " + pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) +
        " " + zone;
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-copy]");
    if (!button) { return; }
    var input = document.getElementById(button.getAttribute("data-copy"));
    if (!input) { return; }
    input.select();
    var label = button.textContent;
    function done(text) {
      button.textContent = text;
      setTimeout(function () { button.textContent = label; }, 2000);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(
        function () { done("Copied"); }, function () { done("Press Ctrl+C"); });
    } else {
      done("Press Ctrl+C");
    }
  });

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });

  function refresher(box) {
    var url = box.getAttribute("data-refresh");
    var every = parseInt(box.getAttribute("data-refresh-ms"), 10) || 5000;
    var served = {};  // element id → the HTML the server sent for it (before localising)
    function remember(root) {
      Array.prototype.forEach.call(root.children, function (el) {
        if (el.id) { served[el.id] = el.outerHTML; }
      });
    }
    remember(box);
    localise(box);

    function busy(el) { return el.contains(document.activeElement) && document.activeElement !== document.body; }

    function apply(fresh) {
      var ids = Array.prototype.map.call(fresh.children, function (el) { return el.id; });
      var same = ids.length === box.children.length &&
        ids.every(function (id, i) { return box.children[i].id === id; });
      if (!same) {  // a banner came or went: take the whole set, unless someone is typing
        if (busy(box)) { return; }
        box.innerHTML = fresh.innerHTML;
        served = {};
        remember(box);
        localise(box);
        return;
      }
      Array.prototype.forEach.call(fresh.children, function (el) {
        var old = document.getElementById(el.id);
        if (!old || served[el.id] === el.outerHTML || busy(old)) { return; }
        var open = Array.prototype.map.call(old.querySelectorAll("details"), function (d) { return d.open; });
        var node = document.importNode(el, true);
        node.querySelectorAll("details").forEach(function (d, i) { if (open[i]) { d.open = true; } });
        old.replaceWith(node);
        served[el.id] = el.outerHTML;
        localise(node);
      });
    }

    function tick() {
      if (document.hidden) { return; }
      fetch(url, { credentials: "same-origin", cache: "no-store", redirect: "manual" })
        .then(function (response) {
          if (response.status === 401) {
            window.location.assign(box.getAttribute("data-login"));
            return null;
          }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html === null) { return; }
          var doc = new DOMParser().parseFromString(html, "text/html");
          apply(doc.body);
        })
        .catch(function () { /* offline for a moment: try again next time */ });
    }
    setInterval(tick, every);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) { tick(); } });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("cards");
    if (box) { refresher(box); } else { localise(document); }
    var fresh = document.querySelector("[data-replace-url]");
    if (fresh && window.history && window.history.replaceState) {
      // The new key's page answers a POST: a reload must not create another key.
      window.history.replaceState(null, "", fresh.getAttribute("data-replace-url"));
    }
    var key = document.getElementById("new-key");
    if (key) { key.select(); }
  });
})();
