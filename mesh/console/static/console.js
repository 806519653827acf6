// Live rows for the console (no library): one EventSource per page that has a
// [data-live-src] element; each server-sent event carries a row the server rendered (and
// escaped), inserted at the top of every element whose data-live names its kind.
(function () {
  "use strict";
  var source = document.querySelector("[data-live-src]");
  if (!source || !window.EventSource) return;
  var state = document.getElementById("live-state");
  var es = new EventSource(source.getAttribute("data-live-src"));
  function say(text) { if (state) state.textContent = text; }
  function insert(kind, html) {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      if (el.getAttribute("data-live").split(" ").indexOf(kind) < 0) return;
      var none = el.querySelector(".none");
      if (none) none.remove();
      el.insertAdjacentHTML("afterbegin", html);
      while (el.children.length > 200) el.lastElementChild.remove();
    });
  }
  es.addEventListener("ready", function () { say("live: new events and decisions appear here"); });
  ["event", "decision", "dead_letter"].forEach(function (kind) {
    es.addEventListener(kind, function (e) { insert(kind, e.data); });
  });
  es.onerror = function () { say("live updates interrupted; retrying…"); };
})();
