-- The form of examples/routing (rules/routing.json), the same on sf, chicago and chicago_uph.
-- `pgdso forms enable` adds the dso_* columns, the ownership guard and replica identity.
\set ON_ERROR_STOP on

CREATE TABLE public.repair_request (
  id               text PRIMARY KEY,
  item             text NOT NULL,
  needs_upholstery boolean NOT NULL DEFAULT false,
  status           text NOT NULL DEFAULT 'new',
  site             text,
  description      text
);

-- pgdso alters the table (enable) and writes every copy (transfers): it owns the form here.
-- For a table owned by an application role instead:  GRANT <owner role> TO pgdso;
ALTER TABLE public.repair_request OWNER TO pgdso;
