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

-- The form belongs to the application's role, as on a live database; pgdso is a member of it
-- (the README's recipe), which lets `forms enable` alter the table and the engine write its
-- copies, while the application keeps its own privileges.
CREATE ROLE app NOLOGIN;
ALTER TABLE public.repair_request OWNER TO app;
GRANT app TO pgdso;
