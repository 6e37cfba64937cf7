"""Flask peer of DESIGN §15: the stack the Databricks Apps guides show (Flask under
gunicorn, psycopg2), written the way a dashboard team would, minimal but fair:
one psycopg2 connection pool per gunicorn worker (created after the fork), the
dataset's own SQL file with its :params bound as driver parameters, JSON rows in
the column order of the query (like tidepool-server), and the form write done as
one transaction: idempotency-key lookup, insert of the row, its audit_log row and
the idempotency key row, then commit.

Environment: TPB_DATASET_SQL (path of sql/queries/daily_metrics.sql); libpq's PG*
variables for the database. Run: gunicorn -w 5 flask_app:app
"""
import datetime
import hashlib
import json
import os
import re

import psycopg2
import psycopg2.extras
import psycopg2.pool
from flask import Flask, Response, request

app = Flask(__name__)
_pool = None


def _load_sql(path):
    """The dataset file without its comment lines, :name turned into %(name)s."""
    with open(path, encoding="utf-8") as f:
        text = "".join(l for l in f if not l.lstrip().startswith("--"))
    return re.sub(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)", r"%(\1)s", text)


DATASET_SQL = _load_sql(os.environ["TPB_DATASET_SQL"])
PARAM_TYPES = {"user_id": int, "since": datetime.date.fromisoformat,
               "until": datetime.date.fromisoformat}


def pool():
    global _pool
    if _pool is None:  # after gunicorn's fork: one pool per worker process
        _pool = psycopg2.pool.SimpleConnectionPool(1, 2, "")
    return _pool


def _json_default(v):
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    raise TypeError(type(v).__name__)


def _dumps(v):
    return json.dumps(v, separators=(",", ":"), default=_json_default)


def _problem(status, detail):
    return Response(_dumps({"status": status, "detail": detail}), status=status,
                    mimetype="application/problem+json")


@app.get("/api/v1/datasets/daily_metrics")
def daily_metrics():
    try:
        params = {k: conv(request.args[k]) for k, conv in PARAM_TYPES.items()}
    except (KeyError, ValueError) as e:
        return _problem(422, "bad parameter: %s" % e)
    conn = pool().getconn()
    try:
        with conn.cursor() as cur:
            cur.execute(DATASET_SQL, params)
            cols = [d.name for d in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        conn.commit()
    finally:
        pool().putconn(conn)
    return Response(_dumps(rows), mimetype="application/json")


@app.post("/api/v1/tables/app.user_notes")
def post_note():
    body = request.get_data()
    try:
        row = json.loads(body)
        user_id, note = int(row["user_id"]), str(row["note"])
    except (ValueError, KeyError, TypeError) as e:
        return _problem(400, "bad body: %s" % e)
    key = request.headers.get("Idempotency-Key")
    actor = "anonymous"
    req_hash = hashlib.sha256(b"POST\n" + request.path.encode() + b"\n" + body).hexdigest()
    conn = pool().getconn()
    try:
        with conn.cursor() as cur:
            if key:
                cur.execute("SELECT request_hash, status, response FROM tidepool.idempotency_keys"
                            " WHERE actor = %s AND key = %s AND expires_at > now()", (actor, key))
                hit = cur.fetchone()
                if hit:
                    conn.rollback()
                    if hit[0] != req_hash:
                        return _problem(409, "Idempotency-Key reused with another body")
                    return Response(hit[2], status=hit[1], mimetype="application/json")
            cur.execute("INSERT INTO app.user_notes (user_id, author, note) VALUES (%s, %s, %s)"
                        " RETURNING id, user_id, author, note, created_at, updated_at, version",
                        (user_id, actor, note))
            cols = [d.name for d in cur.description]
            written = dict(zip(cols, cur.fetchone()))
            answer = _dumps(written)
            cur.execute("INSERT INTO tidepool.audit_log (actor, action, table_name, pk, after, request_id)"
                        " VALUES (%s, 'insert', 'app.user_notes', %s, %s, %s)",
                        (actor, _dumps({"id": written["id"]}), answer,
                         request.headers.get("X-Request-Id")))
            if key:
                cur.execute("INSERT INTO tidepool.idempotency_keys (actor, key, method, path, request_hash,"
                            " status, response, response_headers, expires_at)"
                            " VALUES (%s, %s, 'POST', %s, %s, 201, %s, %s, now() + interval '24 hours')",
                            (actor, key, request.path, req_hash, answer,
                             _dumps({"ETag": '"%d"' % written["version"]})))
        conn.commit()
    except psycopg2.Error as e:
        conn.rollback()
        return _problem(409 if isinstance(e, psycopg2.IntegrityError) else 503, str(e.pgerror))
    finally:
        pool().putconn(conn)
    resp = Response(answer, status=201, mimetype="application/json")
    resp.headers["ETag"] = '"%d"' % written["version"]
    return resp
