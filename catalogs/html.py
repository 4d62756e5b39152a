"""One self-contained HTML page of the catalog: a sortable, filterable table (inline CSS and JS)."""
from __future__ import annotations

import html
from datetime import date
from typing import Optional

from .card import Card
from .present import human_count, licence_label, status_label

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
.controls{display:flex;flex-wrap:wrap;gap:.8em;align-items:center;margin:.8em 0}
.controls input[type=search]{min-width:18em;padding:.3em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num{text-align:right;white-space:nowrap}
tr.withdrawn td{color:#888}
.tag{display:inline-block;padding:0 .4em;border-radius:.3em;font-size:.85em}
.available{background:#dff3df}.gated{background:#fff2cc}.withdrawn{background:#f6d5d5}.unknown{background:#eee}
.small{font-size:.85em;color:#555}
#count{color:#555}
"""

_JS = """
(function(){
  const table=document.getElementById('catalog');
  const body=table.tBodies[0];
  const rows=Array.from(body.rows);
  const q=document.getElementById('q'), mod=document.getElementById('modality'),
        st=document.getElementById('status'), com=document.getElementById('commercial'),
        min=document.getElementById('minsamples'), count=document.getElementById('count');
  function apply(){
    const text=q.value.trim().toLowerCase(), m=mod.value, s=st.value, c=com.checked,
          n=parseFloat(min.value)||0;
    let shown=0;
    rows.forEach(r=>{
      const ok=(!text||r.dataset.search.includes(text))&&(!m||r.dataset.modality===m)&&
        (!s||r.dataset.status===s)&&(!c||r.dataset.commercial==='yes')&&
        (!n||parseFloat(r.dataset.samples||'0')>=n*1e6);
      r.hidden=!ok; if(ok) shown++;
    });
    count.textContent=shown+' of '+rows.length+' datasets';
  }
  [q,mod,st,com,min].forEach(e=>e.addEventListener('input',apply));
  Array.from(table.tHead.rows[0].cells).forEach((th,i)=>th.addEventListener('click',()=>{
    const asc=!th.classList.contains('asc');
    Array.from(table.tHead.rows[0].cells).forEach(h=>h.classList.remove('asc','desc'));
    th.classList.add(asc?'asc':'desc');
    const numeric=th.dataset.type==='num';
    rows.sort((a,b)=>{
      let x=a.cells[i].dataset.value??a.cells[i].textContent, y=b.cells[i].dataset.value??b.cells[i].textContent;
      if(numeric){x=x===''?-Infinity:parseFloat(x);y=y===''?-Infinity:parseFloat(y);return asc?x-y:y-x;}
      return asc?x.localeCompare(y):y.localeCompare(x);
    });
    rows.forEach(r=>body.appendChild(r));
  }));
  apply();
})();
"""

COLUMNS = [("Dataset", "text"), ("Modality", "text"), ("Samples", "num"), ("Hours", "num"), ("Year", "num"),
           ("Licence", "text"), ("Commercial", "text"), ("Status", "text"), ("Metadata", "text"),
           ("Media", "text"), ("Reader", "text"), ("Paper", "text"), ("Verified", "text")]


def render(cards: list[Card], title: str = "mmcurate dataset catalog", generated: Optional[str] = None) -> str:
    e = html.escape
    generated = generated or date.today().isoformat()
    head = "".join(f'<th data-type="{t}">{e(n)}</th>' for n, t in COLUMNS)
    body = "\n".join(_row(c) for c in cards)
    modalities = sorted({c.modality for c in cards})
    options = "".join(f'<option value="{e(m)}">{e(m)}</option>' for m in modalities)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<p class="small">{len(cards)} datasets, generated {e(generated)} from the YAML cards. Empty cells are facts
that could not be confirmed from a primary source. Click a column header to sort.</p>
<div class="controls">
<input id="q" type="search" placeholder="search name, description, licence, repo..." aria-label="search">
<label>modality <select id="modality"><option value="">any</option>{options}</select></label>
<label>status <select id="status"><option value="">any</option><option>available</option><option>gated</option>
<option>withdrawn</option><option value="unconfirmed">unconfirmed</option></select></label>
<label><input id="commercial" type="checkbox"> commercial use allowed (licence, not withdrawn, not research-only)</label>
<label>min samples (millions) <input id="minsamples" type="number" min="0" step="any" style="width:6em"></label>
<span id="count"></span>
</div>
<table id="catalog"><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
<script>{_JS}</script>
</body></html>
"""


def _row(card: Card) -> str:
    e = html.escape
    status = card.status.state or "unconfirmed"
    search = " ".join([card.name, card.title, *card.aliases, card.description, card.modality,
                       card.license.name or "", card.metadata.hf_repo or "", status]).lower()
    samples = card.size.samples
    loc = card.metadata.location()
    link = card.metadata.urls[0] if card.metadata.urls else (
        f"https://huggingface.co/datasets/{card.metadata.hf_repo}" if card.metadata.hf_repo else None)
    paper = card.paper.link()
    paper_text = f"arXiv {card.paper.arxiv}" if card.paper.arxiv else ("paper" if paper else "")
    cells = [
        f'<td data-value="{e(card.name)}"><b>{e(card.title)}</b><br><span class="small">{e(card.name)}</span></td>',
        f"<td>{e(card.modality)}</td>",
        f'<td class="num" data-value="{samples if samples is not None else ""}">'
        f'{e(human_count(samples))}<br><span class="small">{e(card.size.unit)}</span></td>',
        f'<td class="num" data-value="{card.size.hours if card.size.hours is not None else ""}">'
        f'{e(human_count(card.size.hours))}</td>',
        f'<td class="num" data-value="{card.year or ""}">{card.year or ""}</td>',
        f"<td>{e(licence_label(card))}</td>",
        f'<td title="{e(card.commercial()[1])}">{e(card.commercial_label)}</td>',
        f'<td data-value="{e(status)}"><span class="tag {e(status if card.status.state else "unknown")}">'
        f'{e(status_label(card))}</span></td>',
        f'<td>{_link(link, loc or "")}</td>',
        f"<td>{e(card.metadata.media)}</td>",
        f"<td>{'yes' if card.reader else 'no'}</td>",
        f"<td>{_link(paper, paper_text)}</td>",
        f"<td>{e(card.verified)}</td>",
    ]
    attrs = (f'data-modality="{e(card.modality)}" data-status="{e(status)}" '
             f'data-commercial="{e(card.commercial_label)}" data-samples="{samples if samples is not None else ""}" '
             f'data-search="{e(search)}"')
    cls = ' class="withdrawn"' if card.status.state == "withdrawn" else ""
    return f'<tr{cls} id="{e(card.name)}" {attrs}>' + "".join(cells) + "</tr>"


def _link(url: Optional[str], text: str) -> str:
    if not url:
        return html.escape(text)
    return f'<a href="{html.escape(url)}" rel="noopener">{html.escape(text or url)}</a>'
