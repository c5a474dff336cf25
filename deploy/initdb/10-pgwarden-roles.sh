#!/bin/sh
# Quick start (compose.yaml): the roles pgwarden maps identities to. The postgres image
# runs this once, when it creates the database cluster; the passwords come from the
# environment the gateway is given too.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v readonly_password="$APP_READONLY_PASSWORD" \
    -v writer_password="$APP_WRITER_PASSWORD" <<'SQL'
create role app_readonly login password :'readonly_password';
create role app_writer login password :'writer_password';
grant pg_read_all_data to app_readonly;
grant pg_read_all_data, pg_write_all_data to app_writer;
grant create on schema public to app_writer;
SQL
