// Drives analytics.js (@segment/analytics-next from npm) in Debian's Chromium through
// playwright-core, against a running Tributary.
//
// Usage: node drive.js TRIBUTARY_URL WRITE_KEY
// (playwright-core and @segment/analytics-next are found through NODE_PATH; Chromium
// at TRIBUTARY_TEST_CHROMIUM, default /usr/bin/chromium.)
//
// Serves page.html and the package's dist/umd build from a static server on another
// 127.0.0.1 port (another origin than Tributary), opens the page, which calls only
// AnalyticsBrowser.load({writeKey, cdnURL: TRIBUTARY_URL}) and then page, track and
// identify. Prints one JSON line: the messageIds the browser generated, every request
// the page made and every console error. Exits non-zero when the page failed.
'use strict'

const http = require('http')
const fs = require('fs')
const path = require('path')
const { chromium } = require('playwright-core')

const [tributary, writeKey] = process.argv.slice(2)
const umd = path.join(
  path.dirname(require.resolve('@segment/analytics-next/package.json')),
  'dist/umd'
)
const page = fs.readFileSync(path.join(__dirname, 'page.html'))

function serve() {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x')
    if (url.pathname === '/') {
      res.writeHead(200, { 'content-type': 'text/html' })
      return res.end(page)
    }
    const m = url.pathname.match(/^\/analytics-next\/([\w.-]+\.js)$/)
    if (m && fs.existsSync(path.join(umd, m[1]))) {
      res.writeHead(200, { 'content-type': 'application/javascript' })
      return res.end(fs.readFileSync(path.join(umd, m[1])))
    }
    res.writeHead(404)
    res.end()
  })
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok(server)))
}

async function main() {
  const server = await serve()
  const origin = `http://127.0.0.1:${server.address().port}`
  const browser = await chromium.launch({
    executablePath: process.env.TRIBUTARY_TEST_CHROMIUM || '/usr/bin/chromium',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  })
  const out = { origin, requests: [], console: [] }
  try {
    const tab = await browser.newPage()
    tab.on('console', (m) => {
      if (m.type() === 'error' || m.type() === 'warning') out.console.push(m.text())
    })
    tab.on('requestfinished', async (r) => {
      const resp = await r.response()
      out.requests.push(`${r.method()} ${r.url()} ${resp ? resp.status() : '-'}`)
    })
    tab.on('requestfailed', (r) => out.requests.push(`${r.method()} ${r.url()} failed: ${r.failure().errorText}`))
    const q = new URLSearchParams({ writeKey, cdnURL: tributary })
    await tab.goto(`${origin}/?${q}`)
    await tab.waitForFunction(() => window.__result || window.__error, null, { timeout: 30000 })
    out.result = await tab.evaluate(() => window.__result || null)
    out.error = await tab.evaluate(() => window.__error || null)
  } finally {
    await browser.close()
    server.close()
  }
  console.log(JSON.stringify(out))
  process.exit(out.error || !out.result || out.result.failed.length ? 1 : 0)
}

main().catch((e) => {
  console.error(e && e.stack || e)
  process.exit(2)
})
