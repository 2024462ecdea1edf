// Searchkit's API (@searchkit/api), driven by tests/test_js_clients.py: InstantSearch requests in,
// one Elasticsearch _msearch out, InstantSearch results back.
//
//   node searchkit.mjs <url> < spec.json
//
// spec: {"search_settings": {...Searchkit's search_settings...}, "requests": [InstantSearch requests]}
// Prints JSON: {"results": Searchkit's InstantSearch results,
//               "exchanges": [{"request": {url, method, headers, body}, "status", "headers"}]}
// where "exchanges" records, through the global fetch Searchkit sends with, exactly what Searchkit
// sent (the _msearch body as a string) and the status and headers it got back.
import { readFileSync } from 'node:fs'
import createClient from '@searchkit/api'

const [url] = process.argv.slice(2)
const spec = JSON.parse(readFileSync(0, 'utf8'))

const exchanges = []
const fetchFn = globalThis.fetch
globalThis.fetch = async (target, init = {}) => {
  const response = await fetchFn(target, init)
  exchanges.push({
    request: { url: String(target), method: init.method, headers: init.headers, body: init.body },
    status: response.status,
    headers: Object.fromEntries(response.headers),
  })
  return response
}

try {
  const client = createClient({ connection: { host: url }, search_settings: spec.search_settings })
  const { results } = await client.handleRequest(spec.requests)
  process.stdout.write(JSON.stringify({ results, exchanges }))
} catch (err) {
  console.error(err.stack ?? String(err), JSON.stringify(exchanges))
  process.exitCode = 1
}
