/* ota dashboard: the rollout page follows the rollout over server-sent events.
   Each "report" event carries the re-rendered report; it replaces the old one. */
(function () {
  "use strict";
  var root = document.getElementById("report");
  var status = document.getElementById("live");
  if (!root || !root.dataset.stream || !window.EventSource) return;
  var source = new EventSource(root.dataset.stream);
  source.addEventListener("open", function () {
    status.textContent = "live"; status.className = "live on";
  });
  source.addEventListener("report", function (e) {
    root.innerHTML = e.data;
    root.dataset.updates = String(Number(root.dataset.updates || "0") + 1);
    window.otaCharts.draw(root);
  });
  source.addEventListener("error", function () {
    status.textContent = "reconnecting…"; status.className = "live";
  });
})();
