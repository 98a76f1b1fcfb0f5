-- The role pgdso connects as, with the least privileges it needs. The postgres image runs this
-- file with psql, as the superuser, in database $POSTGRES_DB (ar), once, on an empty data
-- directory. pgdso itself does NOT need a superuser: everything below is granted once by one.
\set ON_ERROR_STOP on

-- The password comes from the container's environment (compose sets PGDSO_PASSWORD).
\getenv pgdso_password PGDSO_PASSWORD
\if :{?pgdso_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'PGDSO_PASSWORD is not set'; END $$;
\endif

-- LOGIN; REPLICATION: the walsender connection (replication=database, START_REPLICATION)
-- and pg_create_logical_replication_slot() of `pgdso forms enable`.
CREATE ROLE pgdso LOGIN REPLICATION PASSWORD :'pgdso_password';

-- CREATE on the database: `pgdso migrate` creates the schema pgdso and the publication pgdso.
SELECT current_database() AS dbname \gset
GRANT CREATE ON DATABASE :"dbname" TO pgdso;

-- Replication origins (PostgreSQL 14+: revoked from PUBLIC, grantable; before 14 superuser
-- only). pgdso's apply lanes create an origin and bind their session to it (the origin tags
-- the engine's writes; the lane's position is kept in pgdso.apply_progress). The ownership guard (pgdso.row_guard(), SECURITY
-- DEFINER, owned by pgdso) asks pg_replication_origin_session_is_setup(): without it every
-- UPDATE and DELETE of an enabled form fails. Never grant these to application roles: an
-- origin session is what lets the engine past the guard on read-only copies.
GRANT EXECUTE ON FUNCTION
  pg_catalog.pg_replication_origin_create(text),
  pg_catalog.pg_replication_origin_session_setup(text),
  pg_catalog.pg_replication_origin_session_is_setup()
TO pgdso;

-- The forms: pgdso must be a member of each form's owner role (GRANT app TO pgdso), because
-- `pgdso forms enable` adds columns, a trigger and REPLICA IDENTITY FULL (ALTER TABLE) and
-- adds the table to its publication; TRIGGER alone is not enough. See 20-repair-request.sql.
