// Drives the web console in Debian's Chromium through playwright-core, like a user:
// signs in, creates an ActiveCampaign source through the form, reads the write key
// and webhook URL off the page, posts ActiveCampaign webhook bodies to that URL and
// sees the Last event box change without a reload, watches the live debugger (pause,
// "N new", resume, expand, fate), re-issues the key and sees the old one refused,
// adds a webhook destination and sees it deliver, runs a SQL query and downloads
// CSV, and opens the email report. The same flow at 1280 px and 390 px wide, and a
// keyboard-only pass (Tab/Enter/Space only, focus always visible). axe-core checks
// every page (serious and critical violations are reported); every page is
// screenshotted into OUT_DIR.
//
// Usage: node console.js TRIBUTARY_URL ADMIN_TOKEN FIXTURES_DIR OUT_DIR
// Prints one JSON object; exits non-zero when a step threw.
'use strict'

const fs = require('fs')
const path = require('path')
const http = require('http')
const { chromium } = require('playwright-core')

const [base, token, fixtures, outDir] = process.argv.slice(2)
const axeSource = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8')
fs.mkdirSync(outDir, { recursive: true })

const fixture = (name) => fs.readFileSync(path.join(fixtures, name + '.form'), 'utf8').trim()
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function waitFor(what, fn, ms = 20000) {
  const end = Date.now() + ms
  let last
  while (Date.now() < end) {
    try {
      last = await fn()
      if (last) return last
    } catch (e) { last = e }
    await sleep(200)
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`)
}

async function postForm(url, body) {
  const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body })
  return r.status
}

async function track(key, msg) {
  const r = await fetch(base + '/v1/track', {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Basic ' + Buffer.from(key + ':').toString('base64') },
    body: JSON.stringify(msg),
  })
  return r.status
}

function delivered(email) {
  return {
    anonymousId: email,
    event: 'Email Delivered',
    timestamp: '2024-02-28T13:00:00Z',
    properties: { campaign_id: '42', campaign_name: 'March newsletter', email_subject: 'Spring is here' },
    context: { traits: { email } },
  }
}

// A webhook receiver for the destination.
function receiver() {
  const got = []
  const server = http.createServer((req, res) => {
    let body = ''
    req.on('data', (c) => { body += c })
    req.on('end', () => { got.push(body); res.writeHead(200); res.end('ok') })
  })
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok({ server, got, url: `http://127.0.0.1:${server.address().port}/hook` })))
}

class Flow {
  constructor(name, page, out) {
    this.name = name
    this.page = page
    this.out = out
    out.violations = []
    out.overflow = []
    out.screenshots = []
    out.pages = []
    out.focus = []
  }

  // axe-core on the current page, no page-level horizontal scroll, a screenshot.
  async check(label) {
    const p = this.page
    await p.waitForLoadState('load')
    await p.evaluate(axeSource)
    const res = await p.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }))
    for (const v of res.violations) {
      if (v.impact === 'serious' || v.impact === 'critical') {
        this.out.violations.push({ page: label, id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 3).map((n) => n.target.join(' ')) })
      }
    }
    const wide = await p.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth)
    if (wide > 0) this.out.overflow.push({ page: label, px: wide })
    const file = path.join(outDir, `${this.name}-${label}.png`)
    await p.screenshot({ path: file, fullPage: true })
    this.out.screenshots.push(file)
    this.out.pages.push({ label, title: await p.title(), url: p.url() })
  }

  // Keyboard only: Tab until `sel` has focus; checks the focus is visible.
  async tabTo(sel, max = 80) {
    const p = this.page
    for (let i = 0; i < max; i++) {
      await p.keyboard.press('Tab')
      const hit = await p.evaluate((s) => {
        const a = document.activeElement
        if (!a || !a.matches(s)) return null
        const cs = getComputedStyle(a)
        return { visible: cs.outlineStyle !== 'none' && parseFloat(cs.outlineWidth) >= 2 }
      }, sel)
      if (hit) {
        if (!hit.visible) this.out.focus.push(sel)
        return
      }
    }
    throw new Error(`${this.name}: Tab never reached ${sel}`)
  }
}

async function mouseFlow(browser, name, width, schema, hook) {
  const ctx = await browser.newContext({ viewport: { width, height: 900 }, acceptDownloads: true })
  const page = await ctx.newPage()
  const out = { width, schema, console: [] }
  page.on('console', (m) => { if (m.type() === 'error') out.console.push(m.text()) })
  const f = new Flow(name, page, out)

  await page.goto(base + '/')
  await f.check('login')
  await page.fill('#token', token)
  await page.click('button:has-text("Sign in")')
  await page.waitForURL((u) => u.pathname === '/')
  out.afterSignIn = await page.title()
  await f.check('sources')
  await page.click('a:has-text("Add source")')
  await page.waitForURL('**/sources/new')
  await page.check('#type-activecampaign')
  await page.fill('#name', `Newsletter <b>${width}</b>`)
  await page.fill('#schema', 'Bad Name')
  out.liveValidation = await waitFor('live schema error', async () => (await page.textContent('#schema-error')).trim())
  await f.check('new-source-invalid')
  await page.fill('#schema', schema)
  await waitFor('schema error to clear', async () => (await page.textContent('#schema-error')).trim() === '')
  await page.click('button:has-text("Create source")')
  await page.waitForURL('**/sources/src_*')
  const sourceUrl = page.url().split('?')[0]
  out.sourceId = sourceUrl.split('/').pop()
  out.writeKey = await page.inputValue('#write-key')
  out.webhookUrl = await page.inputValue('#webhook-url')
  out.lastEventBefore = (await page.textContent('[data-field=last_event]')).trim()
  await f.check('overview')

  out.webhookStatus = await postForm(out.webhookUrl, fixture('open'))
  out.lastEventAfter = await waitFor('Last event box to change without a reload', async () => {
    const t = (await page.textContent('[data-field=last_event]')).trim()
    return t.startsWith('open') ? t : null
  })
  out.statusAfter = (await page.textContent('[data-field=status]')).trim()
  await f.check('overview-receiving')
  for (const who of ['ann.lee@example.com', 'bob@example.com']) await track(out.writeKey, delivered(who))
  await postForm(out.webhookUrl, fixture('click'))

  // The live debugger.
  await page.click('a:has-text("Open the debugger")')
  await waitFor('the live feed to connect', async () => (await page.textContent('#live-state')).trim() === 'Live')
  await postForm(out.webhookUrl, fixture('forward'))
  await waitFor('a live Email Forwarded row', async () => page.isVisible('#feed tbody tr[data-event="Email Forwarded"]'))
  await page.click('#pause')
  await postForm(out.webhookUrl, fixture('reply'))
  out.newCounter = await waitFor('the N new counter', async () => {
    const t = (await page.textContent('#new-count')).trim()
    return t === '1 new' ? t : null
  })
  out.rowsWhilePaused = await page.locator('#feed tbody tr[data-event="Email Replied"]').count()
  await page.click('#pause')
  await waitFor('the held row after resume', async () => page.isVisible('#feed tbody tr[data-event="Email Replied"]'))
  out.rejectedStatus = await track(out.writeKey, { event: 'No identity' })
  out.rejectedRow = await waitFor('a rejected row with its reason', async () => {
    const row = page.locator('#feed tbody tr[data-status=rejected]').first()
    return (await row.count()) ? (await row.textContent()).replace(/\s+/g, ' ') : null
  })
  const accepted = page.locator('#feed tbody tr[data-status=accepted]').first()
  await accepted.locator('summary').click()
  out.expandedJson = (await accepted.locator('pre').isVisible()) && (await accepted.locator('pre').textContent()).includes('"messageId"')
  await f.check('debugger')
  await page.fill('#event', 'Forwarded')
  out.filteredRows = await page.locator('#feed tbody tr:visible').count()
  await page.fill('#event', '')
  await page.locator('#feed tbody tr[data-event="Email Forwarded"] a:has-text("Fate")').first().click()
  await page.waitForURL('**/debugger/fate*')
  out.fate = (await page.textContent('main')).replace(/\s+/g, ' ')
  await f.check('fate')

  // Re-issue the key; the old one is refused.
  await page.goto(sourceUrl)
  await page.click('summary:has-text("Re-issue write key")')
  await page.click('button:has-text("Yes, re-issue the write key")')
  await page.waitForURL('**done=rotated')
  out.newKey = await page.inputValue('#write-key')
  out.oldKeyStatus = await track(out.writeKey, { userId: 'u', event: 'After rotation' })
  out.newKeyStatus = await track(out.newKey, { userId: 'u', event: 'After rotation' })

  // A webhook destination.
  await page.click('nav a:has-text("Destinations")')
  await f.check('destinations-empty')
  await page.click('a:has-text("Add destination")')
  await page.check('#type-webhook')
  await page.fill('#name', `Receiver ${width}`)
  await page.fill('#webhook-url', hook.url)
  await page.check(`#src-${out.sourceId}`)
  await f.check('new-destination')
  await page.click('button:has-text("Create destination")')
  await page.waitForURL('**/destinations/dst_*')
  await sleep(500)
  await track(out.newKey, { userId: 'u', event: 'For the receiver' })
  out.destinationDelivered = await waitFor('the destination to deliver (shown without reload)', async () => {
    const t = (await page.textContent('[data-field=delivered]')).trim()
    return Number(t) >= 1 ? Number(t) : null
  })
  await f.check('destination')

  // SQL and CSV.
  await page.click('nav a:has-text("Warehouse")')
  const sql = `select event_text, count(*) as n from ${schema}.tracks group by event_text order by event_text`
  await waitFor('the loaded tracks', async () => {
    await page.fill('#sql', sql)
    await page.click('button:has-text("Run query")')
    await page.waitForLoadState('load')
    const text = await page.textContent('main')
    if (text.includes('Email Opened')) return true
    out.lastSqlPage = text.replace(/\s+/g, ' ').slice(0, 2000)
    return false
  }).catch((e) => { throw new Error(e.message + ' page: ' + out.lastSqlPage) })
  out.sqlRows = await page.locator('table:has(caption:has-text("Query result")) tbody tr').count()
  await f.check('warehouse')
  const [dl] = await Promise.all([page.waitForEvent('download'), page.click('button:has-text("Download CSV")')])
  out.csv = fs.readFileSync(await dl.path(), 'utf8')

  // The email report.
  await page.click('nav a:has-text("Email report")')
  await page.selectOption('#source', out.sourceId)
  await page.click('button:has-text("Show report")')
  out.report = await waitFor('the campaign row', async () => {
    const row = page.locator('#campaigns tbody tr').first()
    if (!(await row.count())) { await page.reload(); return null }
    const cells = {}
    for (const k of ['delivered', 'bounced', 'opened', 'clicked', 'unsubscribed', 'spam']) {
      cells[k] = Number((await row.locator(`td[data-count=${k}]`).textContent()).trim())
    }
    cells.campaign = (await row.locator('th').textContent()).trim()
    return cells
  })
  out.reportHasChart = await page.isVisible('svg[role=img]')
  out.reportHasDefinitions = (await page.textContent('main')).includes('opened / delivered')
  await f.check('report')

  await page.click('button:has-text("Sign out")')
  await page.waitForURL('**/login')
  out.afterSignOut = (await page.goto(base + '/sources'), page.url())
  await ctx.close()
  return out
}

async function keyboardFlow(browser, schema) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } })
  const page = await ctx.newPage()
  const out = { width: 1280, schema, keyboard: true }
  const f = new Flow('keyboard', page, out)
  const k = page.keyboard
  await page.goto(base + '/login')
  await k.press('Tab')
  out.skipLinkFirst = await page.evaluate(() => document.activeElement.matches('a.skip') && document.activeElement.getBoundingClientRect().left >= 0)
  await f.tabTo('#token')
  await k.type(token)
  await k.press('Enter')
  await page.waitForURL('**/sources')
  await f.tabTo('a[href="/sources/new"]')
  await k.press('Enter')
  await page.waitForURL('**/sources/new')
  await f.tabTo('input[name=type]')
  await k.press('Space')
  await f.tabTo('#name')
  await k.type('Keyboard source')
  await f.tabTo('#schema')
  await k.press('Control+A')
  await k.type(schema)
  await f.tabTo('button[type=submit].primary')
  await k.press('Enter')
  await page.waitForURL('**/sources/src_*')
  out.sourceId = page.url().split('?')[0].split('/').pop()
  const oldKey = await page.inputValue('#write-key')
  await f.tabTo('summary')
  await k.press('Enter')
  await f.tabTo('button.danger')
  await k.press('Enter')
  await page.waitForURL('**done=rotated')
  out.rotated = (await page.inputValue('#write-key')) !== oldKey
  await f.tabTo('nav a[href="/destinations"]')
  await k.press('Enter')
  await page.waitForURL('**/destinations')
  await f.tabTo('a[href="/destinations/new"]')
  await k.press('Enter')
  await page.waitForURL('**/destinations/new')
  await f.tabTo('#type-webhook')
  await k.press('Space')
  await f.tabTo('#name')
  await k.type('Keyboard receiver')
  await f.tabTo('#webhook-url')
  await k.type('http://127.0.0.1:9/none')
  await f.tabTo('button[type=submit].primary')
  await k.press('Enter')
  await page.waitForURL('**/destinations/dst_*')
  out.destinationCreated = true
  await f.tabTo('nav a[href="/warehouse"]')
  await k.press('Enter')
  await page.waitForURL('**/warehouse')
  await f.tabTo('#sql')
  await k.type('select 1 as one')
  await f.tabTo('button[value=html]')
  await k.press('Enter')
  await page.waitForLoadState('load')
  out.sqlResult = (await page.textContent('main')).includes('1 rows')
  await f.tabTo('nav a[href="/reports/email"]')
  await k.press('Enter')
  await page.waitForURL('**/reports/email')
  await f.tabTo('#source')
  out.reportReached = true
  await f.tabTo('button.signout, form.signout button')
  await k.press('Enter')
  await page.waitForURL('**/login')
  out.signedOut = true
  await ctx.close()
  return out
}

async function main() {
  const hook = await receiver()
  const browser = await chromium.launch({
    executablePath: process.env.TRIBUTARY_TEST_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  })
  const result = { outDir }
  try {
    result.wide = await mouseFlow(browser, 'w1280', 1280, 'ac_wide', hook)
    result.narrow = await mouseFlow(browser, 'w390', 390, 'ac_narrow', hook)
    result.keyboard = await keyboardFlow(browser, 'ac_keys')
    result.received = hook.got.length
  } catch (e) {
    result.error = String(e && e.stack || e)
  } finally {
    await browser.close()
    hook.server.close()
  }
  console.log(JSON.stringify(result))
  process.exit(result.error ? 1 : 0)
}

main().catch((e) => {
  console.error(e && e.stack || e)
  process.exit(2)
})
