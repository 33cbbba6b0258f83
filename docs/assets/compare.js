// The comparison table: sort by a header, filter by the controls, tick up to three rows to see
// their cards side by side. The state lives in the address (?sort=speedup&dir=desc&family=kernel
// &q=linear&pick=performer,linformer), so a view can be linked and survives a reload.
(function () {
  function setup() {
    const table = document.getElementById("zoo-compare");
    if (!table || table.dataset.ready) return;
    table.dataset.ready = "1";
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const controls = document.querySelectorAll("[data-zoo-for=zoo-compare] [data-zoo-filter]");
    const count = document.querySelector("[data-zoo-for=zoo-compare] .zoo-count");
    const side = document.getElementById("zoo-side");
    const boxes = Array.from(table.querySelectorAll("[data-zoo-pick]"));
    const params = new URLSearchParams(window.location.search);
    const state = { sort: params.get("sort") || "", dir: params.get("dir") || "asc",
                    pick: (params.get("pick") || "").split(",").filter(Boolean).slice(0, 3) };
    controls.forEach((c) => {
      const key = c.dataset.zooFilter === "text" ? "q" : c.dataset.zooFilter;
      if (params.get(key)) c.value = params.get(key);
    });

    function save() {
      const p = new URLSearchParams();
      controls.forEach((c) => {
        const key = c.dataset.zooFilter === "text" ? "q" : c.dataset.zooFilter;
        if (c.value.trim()) p.set(key, c.value.trim());
      });
      if (state.sort) { p.set("sort", state.sort); p.set("dir", state.dir); }
      if (state.pick.length) p.set("pick", state.pick.join(","));
      const query = p.toString();
      history.replaceState(null, "", window.location.pathname + (query ? "?" + query : ""));
    }

    function filter() {
      let shown = 0;
      rows.forEach((r) => {
        const ok = Array.from(controls).every((c) => {
          const value = c.value.trim().toLowerCase();
          if (!value) return true;
          if (c.dataset.zooFilter === "text") return r.dataset.text.includes(value);
          return r.dataset[c.dataset.zooFilter] === value;
        });
        r.hidden = !ok;
        shown += ok ? 1 : 0;
      });
      if (count) count.textContent = shown + " of " + rows.length + " entries";
    }

    function sort() {
      table.querySelectorAll("th[data-sort]").forEach((th) => {
        if (th.dataset.sort === state.sort) th.dataset.dir = state.dir;
        else delete th.dataset.dir;
      });
      if (!state.sort) return;
      const th = table.querySelector(`th[data-sort="${state.sort}"]`);
      if (!th) return;
      const numeric = th.dataset.type === "number";
      const value = (r) => (numeric ? parseFloat(r.dataset[state.sort]) : r.dataset[state.sort]);
      rows.sort((a, b) => {
        const x = value(a), y = value(b);
        // unmeasured values go last whichever the direction
        if (numeric && (isNaN(x) || isNaN(y))) return isNaN(x) - isNaN(y);
        const c = x < y ? -1 : x > y ? 1 : 0;
        return state.dir === "asc" ? c : -c;
      });
      rows.forEach((r) => body.appendChild(r));
    }

    function showPicks() {
      boxes.forEach((b) => (b.checked = state.pick.includes(b.dataset.zooPick)));
      side.replaceChildren();
      state.pick.forEach((id) => {
        const card = document.querySelector(`[data-card="${id}"]`);
        if (!card) return;
        const copy = card.cloneNode(true);
        copy.hidden = false;
        side.appendChild(copy);
      });
      side.hidden = state.pick.length === 0;
    }

    controls.forEach((c) => c.addEventListener("input", () => { filter(); save(); }));
    table.querySelectorAll("th[data-sort]").forEach((th) => {
      th.addEventListener("click", () => {
        state.dir = state.sort === th.dataset.sort && state.dir === "asc" ? "desc" : "asc";
        state.sort = th.dataset.sort;
        sort();
        save();
      });
    });
    boxes.forEach((b) => b.addEventListener("change", () => {
      const id = b.dataset.zooPick;
      state.pick = state.pick.filter((x) => x !== id);
      if (b.checked) state.pick = [...state.pick, id].slice(-3);
      showPicks();
      save();
    }));
    filter();
    sort();
    showPicks();
  }
  if (typeof document$ !== "undefined") document$.subscribe(setup);
  else document.addEventListener("DOMContentLoaded", setup);
})();
