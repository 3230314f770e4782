"""The explain and concepts page's style sheet and script, as text. The script reads the
records `report.py` embeds as JSON and draws the grid (filters by prompt and method, sorting
by probability, pages) and the large view of one image; the style sheet is shared by the
shard and evaluation pages too.
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 24px 0 6px; }
.meta { color: #555; } .failed { color: #b00; }
#controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 12px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 220px; cursor: pointer; }
figure img { width: 220px; height: auto; border: 1px solid #ddd; background: #f4f4f4; }
figcaption { font-size: 12px; word-break: break-word; } .top { font-weight: bold; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
#view { position: fixed; inset: 0; background: rgba(255,255,255,.97); overflow: auto;
        padding: 24px; } #view[hidden] { display: none; }
#view .row { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0 14px; }
#view img { max-width: 320px; border: 1px solid #ddd; } #view img.sheet { max-width: 100%; }
.tokens span { padding: 1px 3px; border-radius: 3px; }
"""
SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const $ = (id) => document.getElementById(id);
let page = 0;
function option(select, values) {
  for (const v of values) { const o = document.createElement('option'); o.value = v;
    o.textContent = v; select.appendChild(o); }
}
option($('prompt'), data.prompts); option($('method'), data.methods);
function chosen() {
  const p = $('prompt').value, m = $('method').value, s = $('sort').value;
  let cards = data.cards.filter(c => (p === '' || c.prompt === p) && (m === '' || c.method === m));
  if (s === 'p-desc') cards = cards.slice().sort((a, b) => b.p - a.p);
  if (s === 'p-asc') cards = cards.slice().sort((a, b) => a.p - b.p);
  return cards;
}
function figure(src, caption, top) {
  const f = document.createElement('figure'), img = document.createElement('img');
  img.loading = 'lazy'; img.src = src; img.alt = caption;
  const c = document.createElement('figcaption'); c.textContent = caption;
  if (top) c.className = 'top';
  f.append(img, c); return f;
}
function draw() {
  const cards = chosen(), pages = Math.max(1, Math.ceil(cards.length / data.pageSize));
  page = Math.min(page, pages - 1);
  const grid = $('grid'); grid.replaceChildren();
  for (const c of cards.slice(page * data.pageSize, (page + 1) * data.pageSize)) {
    const f = figure(c.thumb, c.caption, c.top);
    f.dataset.image = c.image; f.onclick = () => show(c.image); grid.appendChild(f);
  }
  $('count').textContent = cards.length + ' overlays';
  $('page').textContent = 'page ' + (page + 1) + ' of ' + pages;
  $('prev').disabled = page === 0; $('next').disabled = page >= pages - 1;
}
function show(key) {
  const rec = data.images[key], view = $('view'); view.replaceChildren();
  const close = document.createElement('button'); close.textContent = 'close';
  close.id = 'close'; close.onclick = () => { view.hidden = true; };
  const h = document.createElement('h2'); h.textContent = key;
  view.append(close, h);
  if (rec.original) view.appendChild(figure(rec.original, 'original'));
  if (rec.sheet) { const s = document.createElement('img'); s.src = rec.sheet;
    s.className = 'sheet'; s.alt = 'comparison'; view.appendChild(s); }
  for (const p of rec.prompts) {
    const t = document.createElement('h2'); t.textContent = p.prompt + (p.p === null ? ''
      : ' — p = ' + p.p.toFixed(3)); view.appendChild(t);
    const row = document.createElement('div'); row.className = 'row';
    for (const f of p.files) row.appendChild(figure(f.src, f.caption));
    view.appendChild(row);
    if (p.tokens) { const q = document.createElement('p'); q.className = 'tokens';
      q.textContent = 'text side: ';
      for (const [tok, w] of p.tokens) { const s = document.createElement('span');
        s.textContent = tok; s.title = w.toFixed(3);
        s.style.background = 'rgba(220, 40, 40, ' + (w / p.tokenMax).toFixed(2) + ')';
        q.append(s, ' '); }
      view.appendChild(q); }
  }
  view.hidden = false; view.scrollTop = 0;
}
for (const id of ['prompt', 'method', 'sort']) $(id).onchange = () => { page = 0; draw(); };
$('prev').onclick = () => { page -= 1; draw(); }; $('next').onclick = () => { page += 1; draw(); };
draw();
"""
