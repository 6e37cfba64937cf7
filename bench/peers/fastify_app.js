// Fastify peer of DESIGN §15: Node with node-postgres, written the way a dashboard team
// would, minimal but fair: one process, a pg Pool of 16 connections, the dataset's own
// SQL file with its :params bound as $n, JSON rows in the query's column order with the
// same value types as tidepool-server (bigint as a number, date as "YYYY-MM-DD").
// Fastify and pg are installed by bench/reads into a temp dir (NODE_PATH), never committed.
// Environment: TPB_PORT, TPB_DATASET_SQL, libpq-style PGHOST/PGPORT/PGUSER/PGDATABASE.
'use strict';
const fs = require('fs');
const pg = require('pg');
const fastify = require('fastify')({ logger: false });

pg.types.setTypeParser(20, (v) => parseInt(v, 10));  // int8 -> number (steps)
pg.types.setTypeParser(1082, (v) => v);              // date -> "YYYY-MM-DD"

const names = [];
const sql = fs.readFileSync(process.env.TPB_DATASET_SQL, 'utf8')
  .split('\n').filter((l) => !l.trimStart().startsWith('--')).join('\n')
  .replace(/(?<!:):([A-Za-z_][A-Za-z0-9_]*)/g, (m, name) => {
    let i = names.indexOf(name);
    if (i < 0) { names.push(name); i = names.length - 1; }
    return '$' + (i + 1);
  });

const pool = new pg.Pool({ max: 16 });  // PGHOST etc. from the environment

fastify.get('/api/v1/datasets/daily_metrics', async (req, reply) => {
  const q = req.query;
  const userId = Number.parseInt(q.user_id, 10);
  const dateRe = /^\d{4}-\d{2}-\d{2}$/;
  if (!Number.isInteger(userId) || !dateRe.test(q.since || '') || !dateRe.test(q.until || '')) {
    reply.code(422).type('application/problem+json');
    return { status: 422, detail: 'bad parameter' };
  }
  const values = names.map((n) => (n === 'user_id' ? userId : q[n]));
  const res = await pool.query({ name: 'daily_metrics', text: sql, values });
  reply.type('application/json');
  return res.rows;
});

fastify.listen({ port: Number(process.env.TPB_PORT), host: '127.0.0.1' }, (err) => {
  if (err) { console.error(err); process.exit(1); }
});
