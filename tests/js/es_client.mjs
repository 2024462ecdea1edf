// The official Elasticsearch JavaScript client, driven by tests/test_js_clients.py.
//
//   node es_client.mjs <url> <major: 8 or 9> < spec.json
//
// spec: {"op": "search" | "msearch", "params": {...}}: one API call with { meta: true };
//       {"op": "helper", "operations": N, "searches": [[header, body], ...]}: client.helpers.msearch,
//       which batches the searches into _msearch requests of N; each search resolves on its own.
// Prints JSON: {"status", "headers", "body"} for a call, {"items": [that, ...]} for the helper, and
// "client_version", the version of the client package that ran (so a wrong install cannot pass).
// Headers come as the client exposes them (lower-case names). Any error: its details on stderr, exit 1.
import { readFileSync } from 'node:fs'

const [url, major] = process.argv.slice(2)
const spec = JSON.parse(readFileSync(0, 'utf8'))
const pkg = major === '9' ? 'es9' : '@elastic/elasticsearch'
const { Client } = await import(pkg)
const clientVersion = JSON.parse(readFileSync(new URL(`node_modules/${pkg}/package.json`, import.meta.url))).version
const client = new Client({ node: url, maxRetries: 0, requestTimeout: 60000 })

const answer = (result) => ({ status: result.statusCode, headers: result.headers, body: result.body })

try {
  let out
  if (spec.op === 'helper') {
    const m = client.helpers.msearch({ operations: spec.operations, flushInterval: 60000 })
    const results = await Promise.all(spec.searches.map(([header, body]) => m.search(header, body)))
    m.stop()
    await m
    out = { items: results.map(answer) }
  } else {
    out = answer(await client[spec.op](spec.params, { meta: true }))
  }
  process.stdout.write(JSON.stringify({ ...out, client_version: clientVersion }))
} catch (err) {
  console.error(err.stack ?? String(err), JSON.stringify(err.meta?.body ?? null))
  process.exitCode = 1
} finally {
  await client.close()
}
