// Drives the official Segment Node SDK (@segment/analytics-node) against a server.
//
// Usage: node node_client.js URL WRITE_KEY < calls.json
// (URL and WRITE_KEY may instead come from TRIBUTARY_URL and TRIBUTARY_WRITE_KEY; the SDK
// is found through NODE_PATH.)
//
// stdin is a JSON array of Segment calls in wire naming, e.g.
// {"type": "track", "userId": "u1", "event": "Signed Up", "properties": {...}, "context": {...}}.
// Each is handed to the SDK's own method; the SDK batches them (small flushAt) and posts to
// URL/v1/batch. After closeAndFlush() the script prints one JSON line per call:
// {"index": i, "messageId": "<what the SDK generated>"}. Exits non-zero if any call's
// delivery failed.
'use strict'

const { Analytics } = require('@segment/analytics-node')

const url = process.argv[2] || process.env.TRIBUTARY_URL
const writeKey = process.argv[3] || process.env.TRIBUTARY_WRITE_KEY

async function main() {
  const chunks = []
  for await (const c of process.stdin) chunks.push(c)
  const calls = JSON.parse(Buffer.concat(chunks).toString('utf8'))

  const analytics = new Analytics({
    writeKey,
    host: url,
    flushAt: 5,
    flushInterval: 200,
    maxRetries: 3,
    httpRequestTimeout: 10000,
  })
  const errors = []
  analytics.on('error', (e) => errors.push(e))

  const sent = new Array(calls.length)
  calls.forEach((call, index) => {
    const done = (err, ctx) => {
      if (err) errors.push(err)
      sent[index] = { index, messageId: ctx && ctx.event.messageId }
    }
    const { type, ...params } = call
    switch (type) {
      case 'track':
      case 'identify':
      case 'page':
      case 'screen':
      case 'group':
      case 'alias':
        analytics[type](params, done)
        break
      default:
        throw new Error(`unknown call type ${type}`)
    }
  })

  await analytics.closeAndFlush({ timeout: 30000 })

  if (errors.length > 0) {
    for (const e of errors) console.error('delivery error:', e)
    process.exit(1)
  }
  for (const line of sent) {
    if (!line || !line.messageId) {
      console.error('a call was never acknowledged by the SDK')
      process.exit(1)
    }
    console.log(JSON.stringify(line))
  }
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
