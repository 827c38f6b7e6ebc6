// Tributary console: progressive enhancement only. Every page works without this
// script except the live debugger. Loaded with `defer` from 'self' (strict CSP).
'use strict'
document.documentElement.classList.add('js')

function $(sel, root) { return (root || document).querySelector(sel) }
function $all(sel, root) { return Array.from((root || document).querySelectorAll(sel)) }
async function getJSON(url) {
  const r = await fetch(url, { headers: { accept: 'application/json' }, credentials: 'same-origin' })
  if (!r.ok) throw new Error('HTTP ' + r.status)
  return r.json()
}

// Copy buttons: <button data-copy="ELEMENT_ID">, result announced in #ELEMENT_ID-copied.
$all('button[data-copy]').forEach((b) => {
  b.hidden = false
  b.addEventListener('click', async () => {
    const el = document.getElementById(b.dataset.copy)
    const text = el.value !== undefined ? el.value : el.textContent
    const out = document.getElementById(b.dataset.copy + '-copied')
    try {
      await navigator.clipboard.writeText(text)
      if (out) out.textContent = 'Copied.'
    } catch (e) {
      if (el.select) el.select()
      if (out) out.textContent = 'Selected: press Ctrl+C to copy.'
    }
  })
})

// Live validation: <input data-check="URL"> asks the server's rule as you type.
$all('input[data-check]').forEach((input) => {
  const err = document.getElementById(input.id + '-error')
  let timer = null
  let seq = 0
  input.addEventListener('input', () => {
    clearTimeout(timer)
    timer = setTimeout(async () => {
      const mine = ++seq
      try {
        const v = await getJSON(input.dataset.check + '?' + new URLSearchParams({ [input.name]: input.value }))
        if (mine !== seq) return
        if (v.ok) { input.removeAttribute('aria-invalid'); err.textContent = '' }
        else { input.setAttribute('aria-invalid', 'true'); err.textContent = v.message }
      } catch (e) { /* the server checks again on submit */ }
    }, 250)
  })
})

// Source type cards: the schema suggestion follows the chosen type until edited.
$all('input[name=type][data-schema]').forEach((r) => {
  r.addEventListener('change', () => {
    const schema = $('#schema')
    if (schema && !schema.dataset.touched) {
      schema.value = r.dataset.schema
      schema.dispatchEvent(new Event('input'))
      schema.dataset.touched = ''
      delete schema.dataset.touched
    }
  })
})
$all('#schema').forEach((s) => s.addEventListener('keydown', () => { s.dataset.touched = '1' }))

// Destination types: only the chosen type's settings are shown and sent.
function showType() {
  const chosen = $('input[name=type]:checked[data-dest]')
  $all('fieldset[data-type]').forEach((f) => {
    const on = !chosen || f.dataset.type === chosen.value
    f.hidden = !on
    f.disabled = !on
  })
}
if ($('input[data-dest]')) {
  $all('input[data-dest]').forEach((r) => r.addEventListener('change', showType))
  showType()
}

// Polling boxes: <section data-poll="URL"> with [data-field=NAME] children, filled from
// the JSON answer's fields of the same name, every two seconds.
$all('[data-poll]').forEach((box) => {
  async function tick() {
    try {
      const v = await getJSON(box.dataset.poll)
      $all('[data-field]', box.closest('[data-poll-scope]') || box).forEach((el) => {
        const f = el.dataset.field
        if (v[f] === undefined || v[f] === null) return
        if (el.textContent !== String(v[f])) el.textContent = String(v[f])
        if (v[f + '_class']) (el.closest('.badge') || el).className = v[f + '_class']
      })
    } catch (e) { /* keep the last shown value */ }
  }
  setInterval(tick, 2000)
})

// The live debugger: server-sent events (the browser resumes with Last-Event-ID on
// reconnect), Pause with an "N new" counter, the filter form applied as you type,
// each row expandable to its JSON, and a link to its fate.
const live = $('#live[data-stream]')
if (live) {
  const tbody = $('#feed tbody')
  const pauseBtn = $('#pause')
  const stateEl = $('#live-state')
  const countEl = $('#new-count')
  const fateUrl = live.dataset.fate
  const seen = new Set($all('tr.feed-row', tbody).map((r) => r.dataset.mid).filter(Boolean))
  let paused = false
  let held = []
  const MAX_ROWS = 500
  const form = $('form.filters')
  const filters = () => {
    const f = new FormData(form)
    return { event: (f.get('event') || '').toLowerCase(), type: f.get('type') || '', who: (f.get('who') || '').toLowerCase(), status: f.get('status') || '' }
  }
  function matches(row, f) {
    const d = row.dataset
    return (!f.event || (d.event || '').toLowerCase().includes(f.event)) &&
      (!f.type || d.type === f.type) &&
      (!f.who || (d.who || '').toLowerCase().includes(f.who)) &&
      (!f.status || d.status === f.status)
  }
  function applyFilters() {
    const f = filters()
    $all('tr.feed-row', tbody).forEach((r) => {
      r.hidden = !matches(r, f)
    })
  }
  // The server filters too, before its cap of events per second per stream, so a
  // view of one user sees all of that user's events under load: a changed filter
  // reopens the stream after the last id seen.
  let lastId = ''
  let reopen
  form.addEventListener('input', () => {
    applyFilters()
    clearTimeout(reopen)
    reopen = setTimeout(connect, 400)
  })
  function el(tag, text, cls) {
    const e = document.createElement(tag)
    if (text !== undefined) e.textContent = text
    if (cls) e.className = cls
    return e
  }
  function badgeEl(kind) {
    const cls = kind === 'accepted' ? 'ok' : kind === 'rejected' ? 'bad' : 'warn'
    const b = el('span', undefined, 'badge badge-' + cls)
    const sym = el('span', (cls === 'ok' ? '●' : cls === 'bad' ? '✕' : '◐') + ' ')
    sym.setAttribute('aria-hidden', 'true')
    b.append(sym, kind)
    return b
  }
  function rowOf(e) {
    const tr = el('tr', undefined, 'feed-row')
    const who = [e.user_id, e.email, e.anonymous_id].filter(Boolean).join(' · ')
    const type = e.kind === 'unmapped' ? 'webhook' : (e.call_type || '')
    Object.assign(tr.dataset, { status: e.kind, type, event: e.event || '', who: who + ' ' + (e.message_id || ''), mid: e.message_id || '' })
    const at = new Date(e.at)
    tr.append(el('td', isNaN(at) ? e.at : at.toISOString().replace('T', ' ').slice(0, 19) + ' UTC'))
    const st = el('td'); st.append(badgeEl(e.kind)); tr.append(st)
    tr.append(el('td', type), el('td', e.event || ''), el('td', who))
    const det = el('td')
    if (e.reason) det.append(el('p', e.reason.code + ': ' + e.reason.message))
    const d = el('details')
    const sum = el('summary', 'JSON')
    d.append(sum, el('pre', JSON.stringify(e.body, null, 2)))
    det.append(d)
    if (e.kind === 'accepted' && e.message_id) {
      const a = el('a', 'Fate')
      a.href = fateUrl + '?' + new URLSearchParams({ message_id: e.message_id })
      det.append(a)
    }
    tr.append(det)
    tr.hidden = !matches(tr, filters())
    return tr
  }
  function show(e) {
    if (e.message_id && e.kind === 'accepted' && seen.has(e.message_id)) return
    if (e.message_id) seen.add(e.message_id)
    const empty = $('#feed-empty')
    if (empty) empty.remove()
    tbody.prepend(rowOf(e))
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1)
  }
  function onEntry(msg) {
    if (msg.lastEventId) lastId = msg.lastEventId
    let e
    try { e = JSON.parse(msg.data) } catch (err) { return }
    if (paused) {
      held.push(e)
      countEl.textContent = held.length + ' new'
    } else show(e)
  }
  pauseBtn.addEventListener('click', () => {
    paused = !paused
    pauseBtn.setAttribute('aria-pressed', String(paused))
    pauseBtn.textContent = paused ? 'Resume' : 'Pause'
    if (!paused) {
      held.forEach(show)
      held = []
      countEl.textContent = ''
    }
  })
  const skippedEl = $('#skipped-count')
  let skipped = 0
  function onSkipped(msg) {
    if (msg.lastEventId) lastId = msg.lastEventId
    let s
    try { s = JSON.parse(msg.data) } catch (err) { return }
    skipped += s.skipped
    skippedEl.textContent = skipped + ' events not shown (over ' + s.cap + '/s)'
  }
  let src
  function connect() {
    if (src) src.close()
    const f = filters()
    const q = new URLSearchParams()
    Object.entries(f).forEach(([k, v]) => { if (v) q.set(k, v) })
    if (lastId) q.set('after', lastId)
    src = new EventSource(live.dataset.stream + (q.toString() ? '?' + q : ''))
    ;['accepted', 'rejected', 'unmapped'].forEach((k) => src.addEventListener(k, onEntry))
    src.addEventListener('skipped', onSkipped)
    src.onopen = () => { stateEl.textContent = 'Live' }
    src.onerror = () => { stateEl.textContent = 'Reconnecting…' }
  }
  connect()
}
