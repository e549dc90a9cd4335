-- Run once by the postgres image on an empty data directory, by psql as the superuser
-- (POSTGRES_USER) in the database POSTGRES_DB: the pgvector extension for collections, and the role
-- the api replicas connect as. That role is no superuser: it may connect, and create tables in the
-- public schema (collections, label sets), which it then owns; nothing else. Its password comes
-- from the container's POSTGRES_APP_PASSWORD (docker-compose.yml takes it from .env).
--
-- A data directory made before this role existed keeps its old superuser login: run the statements
-- below by hand as the superuser (psql -v app_password=... -f deploy/postgres-init.sql, without
-- the \getenv line), or start from a new volume.
CREATE EXTENSION IF NOT EXISTS vector;

\getenv app_password POSTGRES_APP_PASSWORD
\if :{?app_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'POSTGRES_APP_PASSWORD is not set: run make compose-env, which writes it into .env'; END $$;
\endif

CREATE ROLE clipserve LOGIN PASSWORD :'app_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO clipserve;
GRANT USAGE, CREATE ON SCHEMA public TO clipserve;
