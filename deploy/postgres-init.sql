-- Runs once, when the compose Postgres volume is created (docker-entrypoint-initdb.d).
-- An example application table for the change feed (PG_TABLES=public.todos on moai-a).
-- moai creates its own schemas itself: moai_storage (storage) and moai_sync (the feed).
CREATE TABLE IF NOT EXISTS public.todos (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id   text        NOT NULL,
    title      text        NOT NULL,
    done       boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
