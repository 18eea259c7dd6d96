// Live refresh: every data-refresh-ms, fetch this page again and swap in each [data-live] region
// that changed. Forms live outside those regions, so nothing a person is typing is replaced.
(function () {
  "use strict";
  var every = Number(document.body.dataset.refreshMs || 0);
  if (!every || !document.querySelector("[data-live]")) return;
  function tick() {
    fetch(location.href, { credentials: "same-origin", headers: { "X-Console-Refresh": "1" } })
      .then(function (r) { return r.ok && !r.redirected ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (region) {
          var next = fresh.getElementById(region.id);
          if (next && next.innerHTML !== region.innerHTML) region.innerHTML = next.innerHTML;
        });
        document.body.dataset.refreshedAt = String(Date.now());
      })
      .catch(function () {})
      .then(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
