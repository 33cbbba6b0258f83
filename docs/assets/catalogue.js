// The catalogue table: filter (family, autoregressive, masking, input, text) and sort by any
// column, all in the browser. Rows carry their values in data-* attributes.
(function () {
  function setup() {
    const table = document.getElementById("zoo-catalogue");
    if (!table || table.dataset.ready) return;
    table.dataset.ready = "1";
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const controls = document.querySelectorAll("[data-zoo-filter]");
    const count = document.getElementById("zoo-count");

    function apply() {
      const wanted = {};
      controls.forEach((c) => (wanted[c.dataset.zooFilter] = c.value.trim().toLowerCase()));
      let shown = 0;
      rows.forEach((r) => {
        const ok = Object.entries(wanted).every(([key, value]) => {
          if (!value) return true;
          if (key === "text") return r.dataset.text.includes(value);
          return r.dataset[key] === value;
        });
        r.hidden = !ok;
        shown += ok ? 1 : 0;
      });
      if (count) count.textContent = shown + " of " + rows.length + " entries";
    }
    controls.forEach((c) => c.addEventListener("input", apply));

    table.querySelectorAll("th[data-sort]").forEach((th) => {
      th.addEventListener("click", () => {
        const key = th.dataset.sort;
        const numeric = th.dataset.type === "number";
        const dir = th.dataset.dir === "asc" ? "desc" : "asc";
        table.querySelectorAll("th[data-sort]").forEach((o) => delete o.dataset.dir);
        th.dataset.dir = dir;
        const value = (r) => (numeric ? parseFloat(r.dataset[key]) : r.dataset[key]);
        rows.sort((a, b) => {
          let x = value(a), y = value(b);
          if (numeric) {
            if (isNaN(x)) x = -Infinity;
            if (isNaN(y)) y = -Infinity;
          }
          const c = x < y ? -1 : x > y ? 1 : 0;
          return dir === "asc" ? c : -c;
        });
        rows.forEach((r) => body.appendChild(r));
      });
    });
    apply();
  }
  if (typeof document$ !== "undefined") document$.subscribe(setup);
  else document.addEventListener("DOMContentLoaded", setup);
})();
