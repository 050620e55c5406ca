/* ota: draws the report's time series with uPlot from the JSON the page carries.
   window.otaCharts.draw(root) (re)draws every [data-chart] element under root. */
(function () {
  "use strict";
  var COLOURS = { installed: "#264653", active: "#2a9d8f", used: "#3d6fb6", failed: "#c0392b",
                  reverted: "#8d99ae", exposed: "#3d6fb6", holdout: "#b7791f" };
  var PALETTE = ["#3d6fb6", "#2a9d8f", "#b7791f", "#8e44ad", "#c0392b", "#264653", "#7f8c8d"];
  var live = [];

  var INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400, 172800, 604800];
  function zeroBased(u, min, max) { return [0, max > 0 ? max * 1.08 : 1]; }
  // One point alone still gets a minute either side, not a range of years.
  function xRange(u, min, max) { return min === max ? [min - 60, max + 60] : [min, max]; }

  function markersPlugin(markers) {
    // Audit events as dashed lines with their number; a number is left out where it
    // would overlap the previous one (the audit table lists them all by number).
    return { hooks: { draw: function (u) {
      var ctx = u.ctx, top = u.bbox.top, height = u.bbox.height, lastX = -1e9;
      ctx.save();
      ctx.font = (11 * devicePixelRatio) + "px system-ui, sans-serif";
      ctx.fillStyle = "#5b6475"; ctx.strokeStyle = "#9aa3b2";
      ctx.setLineDash([4 * devicePixelRatio, 4 * devicePixelRatio]);
      markers.forEach(function (m) {
        var x = u.valToPos(m.t, "x", true);
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
        ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
        if (x - lastX >= 16 * devicePixelRatio) {
          ctx.fillText(String(m.n), x + 2 * devicePixelRatio, top + 11 * devicePixelRatio);
          lastX = x;
        }
      });
      ctx.restore();
    } } };
  }

  function size(el) {
    var w = Math.max(260, Math.floor(el.clientWidth || el.parentNode.clientWidth || 300));
    return { width: w, height: w < 500 ? 220 : 280 };
  }

  function plot(el, t, named, opts) {
    el.innerHTML = "";
    if (!t.length) {
      var empty = document.createElement("div");
      empty.className = "empty"; empty.textContent = "no data yet";
      el.appendChild(empty);
      return;
    }
    var keys = Object.keys(named);
    var stepped = opts.stepped && uPlot.paths && uPlot.paths.stepped;
    var series = [{}].concat(keys.map(function (k, i) {
      var s = { label: k, stroke: COLOURS[k] || PALETTE[i % PALETTE.length], width: 2,
                spanGaps: true, points: { show: t.length < 3 } };
      if (stepped) s.paths = uPlot.paths.stepped({ align: 1 });
      return s;
    }));
    var data = [t].concat(keys.map(function (k) { return named[k]; }));
    var s = size(el);
    var u = new uPlot({
      width: s.width, height: s.height, series: series,
      scales: { x: { time: true, range: xRange }, y: { range: opts.range || zeroBased } },
      // Whole seconds at the finest: a curve has at most one point per second.
      axes: [{ space: 80, incrs: INCRS }, { label: opts.yLabel || "", size: 50 }],
      cursor: { drag: { x: false, y: false } },
      plugins: opts.markers ? [markersPlugin(opts.markers)] : [],
      legend: { live: false }
    }, data, el);
    live.push({ el: el, u: u });
  }

  function draw(root) {
    live = live.filter(function (p) {
      if (root.contains(p.el)) { p.u.destroy(); return false; }
      return true;
    });
    var holder = root.querySelector("script[data-charts]");
    if (!holder) return;
    var data = JSON.parse(holder.textContent);
    root.querySelectorAll("[data-chart]").forEach(function (el) {
      var kind = el.getAttribute("data-chart");
      if (kind === "curve") {
        plot(el, data.curve.t, data.curve.series,
             { markers: data.markers, yLabel: "devices", stepped: true });
      } else if (kind === "usage") {
        plot(el, data.usage.t, { exposed: data.usage.exposed, holdout: data.usage.holdout },
             { yLabel: "% of samples", range: function () { return [0, 100]; } });
      } else if (kind === "versions") {
        plot(el, data.versions.t, data.versions.series, { yLabel: "devices", stepped: true });
      }
    });
  }

  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () {
      live.forEach(function (p) { p.u.setSize(size(p.el)); });
    }, 150);
  });
  window.otaCharts = { draw: draw };
  document.addEventListener("DOMContentLoaded", function () { draw(document); });
})();
