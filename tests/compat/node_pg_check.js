#!/usr/bin/env node
// Compatibility driver for node-postgres (pg) against rlsgate (run by tests/compat.rs via run.sh,
// which puts the pg module installed by install.sh on NODE_PATH).
//
// Environment: PGHOST, PGPORT, PGDATABASE, PGUSER, PGSSLMODE, TOKEN_NORTH, TOKEN_SOUTH (passwords),
// COMPAT_CLIENTS (concurrent connections, default 10), COMPAT_DIR (scratch dir, unused here).
// Optional, for running directly against Postgres without the proxy: COMPAT_USER_NORTH /
// COMPAT_USER_SOUTH (user names per tenant, default PGUSER), COMPAT_DEADLINE (seconds, default 50).
//
// Prints one JSON line per feature on stdout:
//   {"driver": "node-postgres", "feature": ..., "ok": ..., "detail": ...}
// Exit status 0 once the features ran (whatever their outcome), 2 when nothing could run.
//
// Cancelling: node-postgres has no documented cancel API, but it does implement the protocol's
// CancelRequest: Connection.prototype.cancel(processID, secretKey) writes it, and
// Client.prototype.cancel(client, query) opens a fresh Connection and sends it with the target
// client's processID/secretKey (from BackendKeyData) when `query` is the active one. Client 0
// uses the latter, client 1 the former. (query_timeout / statement_timeout are not cancels.)
'use strict'

const DRIVER = 'node-postgres'
const FEATURES = ['prepared', 'session_settings', 'cancel', 'temp_table', 'error_in_transaction', 'isolation', 'pipeline']
const EXPECTED_CUSTOMERS = { north: 3, south: 2 }
const CUSTOMER_IDS = { north: [1, 2, 3], south: [4, 5] }
const PRODUCTS_OVER_1 = { north: 4, south: 2 } // products with price > 1 per store
const PREPARED_RUNS = 25
const CANCEL_DELAYS = [500, 1000] // ms; clients 0 (north) and 1 (south)

function failEarly(msg) {
  process.stderr.write(`${DRIVER}: ${msg}\n`)
  process.exit(2)
}

let pg
try {
  pg = require('pg')
} catch (err) {
  failEarly(`cannot load pg (${err.message}); run tests/compat/install.sh and use run.sh`)
}

function env(name, dflt) {
  const v = process.env[name] || dflt
  if (v === undefined || v === '') failEarly(`environment variable ${name} is not set`)
  return v
}

const PGHOST = env('PGHOST', '127.0.0.1')
const PGPORT = parseInt(env('PGPORT'), 10)
const PGDATABASE = env('PGDATABASE')
const PGUSER = env('PGUSER', 'app')
const PGSSLMODE = env('PGSSLMODE', 'disable')
const TOKENS = { north: env('TOKEN_NORTH'), south: env('TOKEN_SOUTH') }
const USERS = {
  north: process.env.COMPAT_USER_NORTH || PGUSER,
  south: process.env.COMPAT_USER_SOUTH || PGUSER,
}
const CLIENTS = parseInt(process.env.COMPAT_CLIENTS || '10', 10)
const DEADLINE_MS = parseFloat(process.env.COMPAT_DEADLINE || '50') * 1000
const START = Date.now()

const results = {}
for (const f of FEATURES) results[f] = []
const notes = [] // connections replaced after a feature left them unusable

function record(feature, who, ok, detail) {
  results[feature].push({ who, ok: !!ok, detail: String(detail) })
}

function summary(feature, expected) {
  const items = results[feature]
  const failed = items.filter((i) => !i.ok)
  if (failed.length) {
    const text = failed.slice(0, 3).map((i) => `${i.who}: ${i.detail}`).join('; ')
    const more = failed.length > 3 ? ` (+${failed.length - 3} more)` : ''
    return [false, `${failed.length}/${items.length} failed: ${text}${more}`.slice(0, 600)]
  }
  if (items.length < expected) {
    return [false, `only ${items.length} of ${expected} connections finished this before the deadline of ${DEADLINE_MS / 1000}s`]
  }
  if (feature === 'isolation') {
    const total = items.reduce((n, i) => n + parseInt(i.detail, 10), 0)
    const extra = notes.length ? `; ${notes.slice(0, 3).join('; ')}` : ''
    return [true, `${items.length} connections, ${total} tenant checks: each saw only its own tenant (north 3 customers, south 2)${extra}`.slice(0, 600)]
  }
  const details = [...new Set(items.map((i) => i.detail))].sort()
  return [true, `${items.length}/${items.length} ok: ${details.slice(0, 3).join('; ')}`.slice(0, 600)]
}

class Check extends Error {}

function assert(cond, msg) {
  if (!cond) throw new Check(msg)
}

function describe(err) {
  if (err instanceof Check) return err.message
  const msg = String((err && err.message) || err).split('\n')[0]
  return err && err.code ? `${err.code}: ${msg}` : msg
}

function sslOption() {
  if (PGSSLMODE === 'disable') return false
  if (PGSSLMODE === 'verify-full' || PGSSLMODE === 'verify-ca') return true
  return { rejectUnauthorized: false }
}

function clientConfig(tenant, extra) {
  return {
    ...extra,
    host: PGHOST,
    port: PGPORT,
    database: PGDATABASE,
    user: USERS[tenant],
    password: TOKENS[tenant],
    ssl: sslOption(),
    connectionTimeoutMillis: 10000,
  }
}

async function connect(tenant, extra) {
  const client = new pg.Client(clientConfig(tenant, extra))
  client.lastError = null
  client.on('error', (err) => {
    client.lastError = err
  })
  // node-postgres does not keep ParameterStatus values; listen to the wire messages ourselves.
  client.paramStatus = {}
  client.connection.on('parameterStatus', (msg) => {
    client.paramStatus[msg.parameterName] = msg.parameterValue
  })
  await client.connect()
  return client
}

async function scalar(client, query, values) {
  const res = await client.query(query, values)
  return res.rows[0][res.fields[0].name]
}

async function tenantView(client) {
  const res = await client.query(
    "SELECT count(*)::int AS n, coalesce(string_agg(DISTINCT store_id, ','), '') AS stores FROM customers",
  )
  return [res.rows[0].n, res.rows[0].stores]
}

async function checkTenant(client, tenant, where) {
  const [n, stores] = await tenantView(client)
  if (n !== EXPECTED_CUSTOMERS[tenant] || stores !== tenant) {
    return `${where}: saw ${n} customers of stores '${stores}', expected ${EXPECTED_CUSTOMERS[tenant]} of '${tenant}'`
  }
  return null
}

async function feature(name, who, fn) {
  try {
    record(name, who, true, await fn())
  } catch (err) {
    record(name, who, false, describe(err))
  }
}

function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms / 1000}s`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

// The connection, or a new one when a feature left it broken (so later features still run).
async function usable(client, tenant, where, counter) {
  try {
    await withTimeout(client.query('SELECT 1'), 10000, 'SELECT 1')
    return client
  } catch (err) {
    counter.reconnects.push(where)
    client.end().catch(() => {})
    return connect(tenant)
  }
}

// Tenant check after a feature; returns the connection to go on with.
async function isolation(client, tenant, where, counter) {
  counter.checks += 1
  let problem
  try {
    client = await usable(client, tenant, where, counter)
    problem = await checkTenant(client, tenant, where)
  } catch (err) {
    problem = `${where}: ${describe(err)}`
  }
  if (problem) counter.problems.push(problem)
  return client
}

async function expectError(promise, code, what) {
  try {
    await promise
  } catch (err) {
    assert(err.code === code, `${what}: expected ${code}, got ${describe(err)}`)
    return err
  }
  throw new Check(`${what} did not fail`)
}

// ------------------------------------------------------------------------------------------------
// Features
// ------------------------------------------------------------------------------------------------

async function doPrepared(client, tenant) {
  const text = 'SELECT count(*)::int AS n FROM customers WHERE customer_id <= $1'
  const ids = CUSTOMER_IDS[tenant]
  let runs = 0
  const once = async (v) => {
    const expected = ids.filter((i) => i <= v).length
    const res = await client.query({ name: 'q1', text, values: [v] })
    runs += 1
    assert(res.rows[0].n === expected, `run ${runs}: count for id <= ${v} is ${res.rows[0].n}, expected ${expected}`)
  }
  for (let k = 0; k < PREPARED_RUNS; k++) {
    const v = k % 7
    if (k % 5 === 4) {
      await client.query('BEGIN')
      try {
        await once(v)
        await once(v)
        await client.query(k % 10 === 9 ? 'ROLLBACK' : 'COMMIT')
      } catch (err) {
        await client.query('ROLLBACK').catch(() => {})
        throw err
      }
    } else {
      await once(v)
    }
  }
  return `${runs} executions of named statement 'q1' (parsed once per client connection; autocommit, committed and rolled-back transactions), all correct`
}

async function doSessionSettings(client, tenant) {
  // Leak check: this client has not set anything yet, so it must not see other clients' settings.
  const before = await scalar(client, 'SHOW statement_timeout')
  assert(before !== '4321ms', `before SET: saw statement_timeout=${before} (another client's setting leaked)`)
  await client.query("SET statement_timeout = '4321ms'")
  await client.query('SET search_path = public')
  await client.query("SET TimeZone = 'Asia/Tokyo'")
  for (let rnd = 0; rnd < 3; rnd++) {
    await tenantView(client)
    let got = await scalar(client, 'SHOW statement_timeout')
    assert(got === '4321ms', `round ${rnd}: SHOW statement_timeout = ${got}, expected 4321ms`)
    got = await scalar(client, 'SHOW TimeZone')
    assert(got === 'Asia/Tokyo', `round ${rnd}: SHOW TimeZone = ${got}, expected Asia/Tokyo`)
    got = await scalar(client, { text: 'SHOW search_path', values: [] })
    assert(got === 'public', `round ${rnd}: SHOW search_path = ${got}, expected public`)
    await client.query('BEGIN')
    const res = await client.query("SELECT current_setting('TimeZone') AS tz, current_setting('statement_timeout') AS st")
    await client.query('COMMIT')
    const row = res.rows[0]
    assert(row.tz === 'Asia/Tokyo' && row.st === '4321ms', `round ${rnd}: in a BEGIN block saw ${row.tz}, ${row.st}`)
  }
  const status = client.paramStatus.TimeZone
  assert(status === 'Asia/Tokyo', `client-side ParameterStatus TimeZone = ${status}, expected Asia/Tokyo`)
  return 'SHOW in 9 later transactions and the ParameterStatus(TimeZone) seen by the client as set'
}

// Sends a CancelRequest through pg.Connection#cancel on a new socket.
function connectionCancel(target) {
  return new Promise((resolve, reject) => {
    const con = new pg.Connection()
    con.on('error', (err) => {
      if (err.code === 'ECONNRESET' || err.code === 'EPIPE') resolve()
      else reject(err)
    })
    con.on('connect', () => {
      con.cancel(target.processID, target.secretKey)
      con.stream.end()
      resolve()
    })
    con.connect(PGPORT, PGHOST)
  })
}

// Sends a CancelRequest through pg.Client#cancel(client, query) of a second, unconnected Client.
function clientCancel(tenant, target, query) {
  const canceller = new pg.Client(clientConfig(tenant))
  canceller.connection.on('error', () => {}) // the server closes the cancel socket
  canceller.connection.on('connect', () => setImmediate(() => canceller.connection.stream.end()))
  canceller.cancel(target, query)
}

async function doCancel(client, tenant, delay, useClientCancel) {
  const t0 = Date.now()
  let err = null
  let timer
  if (useClientCancel) {
    const query = new pg.Query('SELECT pg_sleep(10)')
    const done = new Promise((resolve) => {
      query.on('error', (e) => resolve(e))
      query.on('end', () => resolve(null))
    })
    client.query(query)
    timer = setTimeout(() => clientCancel(tenant, client, query), delay)
    err = await done
  } else {
    timer = setTimeout(() => {
      connectionCancel(client).catch((e) => {
        client.cancelError = e
      })
    }, delay)
    try {
      await client.query('SELECT pg_sleep(10)')
    } catch (e) {
      err = e
    }
  }
  clearTimeout(timer)
  const elapsed = (Date.now() - t0) / 1000
  assert(err !== null, `pg_sleep(10) was not cancelled (returned after ${elapsed.toFixed(1)}s)`)
  assert(err.code === '57014', `expected 57014, got ${describe(err)}${client.cancelError ? ` (cancel: ${client.cancelError.message})` : ''}`)
  assert(!/timeout/.test(err.message), `57014 but not from the cancel: ${err.message}`)
  assert(elapsed >= delay / 1000 - 0.05, `cancelled after ${elapsed.toFixed(2)}s, before this client's cancel at ${delay / 1000}s`)
  assert(elapsed <= delay / 1000 + 5, `cancelled only after ${elapsed.toFixed(1)}s`)
  const one = await scalar(client, 'SELECT 1 AS one')
  assert(one === 1, `SELECT 1 after the cancel returned ${one}`)
  const api = useClientCancel ? 'new pg.Client().cancel(client, query)' : 'pg.Connection#cancel(processID, secretKey)'
  return `${api} -> 57014 after ${elapsed.toFixed(2)}s, SELECT 1 ok after`
}

async function doErrorInTransaction(client, tenant) {
  // Round 1: simple protocol.
  await client.query('BEGIN')
  await expectError(client.query('SELECT 1/0'), '22012', 'SELECT 1/0')
  await expectError(client.query('SELECT 1'), '25P02', 'statement after the error')
  await client.query('ROLLBACK')
  let problem = await checkTenant(client, tenant, 'after ROLLBACK')
  assert(problem === null, problem)
  // Round 2: extended protocol (parameters), named statement after the error.
  await client.query('BEGIN')
  await expectError(client.query('SELECT 1/$1::int', [0]), '22012', 'SELECT 1/$1 with 0')
  await expectError(
    client.query({ name: 'q1', text: 'SELECT count(*)::int AS n FROM customers WHERE customer_id <= $1', values: [9] }),
    '25P02',
    'named statement after the error',
  )
  await client.query('ROLLBACK')
  problem = await checkTenant(client, tenant, 'after the second ROLLBACK')
  assert(problem === null, problem)
  const n = (await client.query({ name: 'q1', text: 'SELECT count(*)::int AS n FROM customers WHERE customer_id <= $1', values: [9] })).rows[0].n
  assert(n === EXPECTED_CUSTOMERS[tenant], `named statement after ROLLBACK counted ${n}`)
  return '22012, then 25P02, ROLLBACK, tenant view intact (simple and extended protocol)'
}

// pg's `pipeline: true` client option sends every query at once without waiting for the previous
// one's ReadyForQuery (each query still ends with its own Sync).
async function doPipeline(tenant, i) {
  const p = await connect(tenant, { pipeline: true })
  try {
    assert(p.pipeline === true, `this pg version (${require('pg/package.json').version}) has no pipeline mode`)
    const base = EXPECTED_CUSTOMERS[tenant]
    const ins = 'INSERT INTO customers (store_id, name, email) VALUES ($1, $2, $3)'
    const pq = { name: 'pq', text: 'SELECT count(*)::int AS n FROM products WHERE price > $1' }
    const steps = [
      ['customers', p.query('SELECT count(*)::int AS n FROM customers'), base],
      ['products', p.query({ ...pq, values: [1] }), PRODUCTS_OVER_1[tenant]],
      ['echo', p.query('SELECT $1::text AS n', [`x${i}`]), `x${i}`],
      ['BEGIN', p.query('BEGIN'), null],
      ['insert', p.query(ins, [tenant, 'Pipeline row', `node-${i}@${tenant}.example`]), null],
      ['customers in tx', p.query('SELECT count(*)::int AS n FROM customers'), base + 1],
      ['ROLLBACK', p.query('ROLLBACK'), null],
      ['1/0', p.query('SELECT 1/0 AS n'), '22012'],
      ['customers after', p.query('SELECT count(*)::int AS n FROM customers'), base],
      ['products again', p.query({ ...pq, values: [100] }), 0],
    ]
    const settled = await Promise.allSettled(steps.map((s) => s[1]))
    settled.forEach((r, k) => {
      const [what, , want] = steps[k]
      if (want === '22012') {
        assert(r.status === 'rejected' && r.reason.code === '22012', `${what}: expected 22012, got ${r.status === 'rejected' ? describe(r.reason) : 'a result'}`)
      } else {
        assert(r.status === 'fulfilled', `${what}: ${r.status === 'rejected' ? describe(r.reason) : ''}`)
        if (want !== null) {
          const got = r.value.rows[0].n
          assert(got === want, `${what}: got ${got}, expected ${want}`)
        }
      }
    })
    return `${steps.length} queries sent at once on a pipelined client (named statement, BEGIN/INSERT/ROLLBACK, 22012 in the middle) correct`
  } finally {
    await p.end().catch(() => {})
  }
}

async function doTempTable(n, tenant) {
  const client = await connect(tenant)
  try {
    await client.query(`CREATE TEMP TABLE scratch_${n} (x int)`)
    await client.query(`INSERT INTO scratch_${n} VALUES (1), (2), (3)`)
    await client.query('BEGIN')
    const res = await client.query(`SELECT count(*)::int AS c, sum(x)::int AS s FROM scratch_${n}`)
    await client.query('COMMIT')
    assert(res.rows[0].c === 3 && res.rows[0].s === 6, `read back (${res.rows[0].c}, ${res.rows[0].s}), expected (3, 6)`)
    await client.query(`INSERT INTO scratch_${n} VALUES ($1)`, [4])
    const s = await scalar(client, `SELECT sum(x)::int AS s FROM scratch_${n}`)
    assert(s === 10, `after a second insert sum is ${s}, expected 10`)
    const problem = await checkTenant(client, tenant, 'on the temp-table connection')
    assert(problem === null, problem)
    await client.query(`DROP TABLE scratch_${n}`)
    return `scratch_${n}: created, filled and read back in later transactions (${tenant})`
  } finally {
    await client.end().catch(() => {})
  }
}

// ------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------

async function runClient(i) {
  const tenant = i % 2 === 0 ? 'north' : 'south'
  const who = `client ${i} (${tenant})`
  const counter = { checks: 0, problems: [], reconnects: [] }
  let client
  try {
    client = await connect(tenant)
  } catch (err) {
    for (const f of ['prepared', 'session_settings', 'error_in_transaction', 'isolation', 'pipeline']) {
      record(f, who, false, `connect: ${describe(err)}`)
    }
    if (i < CANCEL_DELAYS.length) record('cancel', who, false, `connect: ${describe(err)}`)
    return
  }
  try {
    client = await isolation(client, tenant, 'after connect', counter)
    if (i < CANCEL_DELAYS.length) {
      await feature('cancel', who, () => doCancel(client, tenant, CANCEL_DELAYS[i], i === 0))
      client = await isolation(client, tenant, 'after cancel', counter)
    }
    await feature('prepared', who, () => doPrepared(client, tenant))
    client = await isolation(client, tenant, 'after prepared', counter)
    await feature('error_in_transaction', who, () => doErrorInTransaction(client, tenant))
    client = await isolation(client, tenant, 'after error_in_transaction', counter)
    await feature('pipeline', who, () => doPipeline(tenant, i)) // on a pipelined connection of its own
    await feature('session_settings', who, () => doSessionSettings(client, tenant))
    client = await isolation(client, tenant, 'at the end', counter)
  } finally {
    if (counter.problems.length) {
      record('isolation', who, false, `${counter.problems.length}/${counter.checks} checks wrong, first: ${counter.problems[0]}`)
    } else {
      record('isolation', who, true, `${counter.checks} checks`)
    }
    if (counter.reconnects.length) {
      notes.push(`${who} reconnected because the connection was unusable ${counter.reconnects.join(', ')}`)
    }
    await client.end().catch(() => {})
  }
}

function remaining() {
  return Math.max(100, DEADLINE_MS - (Date.now() - START))
}

function withDeadline(promise) {
  let timer
  const deadline = new Promise((resolve) => {
    timer = setTimeout(() => resolve('deadline'), remaining())
  })
  return Promise.race([promise.then(() => 'done'), deadline]).finally(() => clearTimeout(timer))
}

function report(timedOut) {
  const expected = {}
  for (const f of FEATURES) expected[f] = CLIENTS
  expected.cancel = Math.min(CLIENTS, CANCEL_DELAYS.length)
  expected.temp_table = 1
  for (const f of FEATURES) {
    const [ok, detail] = summary(f, expected[f])
    process.stdout.write(JSON.stringify({ driver: DRIVER, feature: f, ok, detail }) + '\n')
  }
  if (timedOut) {
    process.stderr.write(`${DRIVER}: deadline of ${DEADLINE_MS / 1000}s reached, unfinished work abandoned\n`)
    process.exit(0)
  }
}

async function main() {
  try {
    const probe = await connect('north')
    await probe.query('SELECT 1')
    await probe.end()
  } catch (err) {
    failEarly(`cannot connect to ${PGHOST}:${PGPORT}/${PGDATABASE}: ${describe(err)}`)
  }
  const clients = []
  for (let i = 0; i < CLIENTS; i++) clients.push(runClient(i))
  let outcome = await withDeadline(Promise.allSettled(clients))
  if (outcome === 'done') {
    // After the concurrent phase, so a connection pinned by a temporary table cannot starve it.
    outcome = await withDeadline(feature('temp_table', 'temp client (north)', () => doTempTable(CLIENTS, 'north')))
  }
  report(outcome !== 'done')
}

main().catch((err) => {
  process.stderr.write(`${DRIVER}: unexpected failure: ${err && err.stack ? err.stack : err}\n`)
  process.exit(2)
})
