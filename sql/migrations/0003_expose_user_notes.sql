-- Lets a form list the caller's own notes: app.user_notes becomes readable
-- through GET /api/v1/tables/app.user_notes, scoped in SQL to rows whose
-- author is the caller (owner=author), for role reader and above.
COMMENT ON TABLE app.user_notes IS
    '@writable roles=writer read=reader owner=author touch=updated_at readonly=created_at '
    '@expose roles=reader owner=author';
