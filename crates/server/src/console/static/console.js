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
        if (v[f + '_class']) el.className = v[f + '_class']
      })
    } catch (e) { /* keep the last shown value */ }
  }
  setInterval(tick, 2000)
})
