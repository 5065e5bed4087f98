#!/usr/bin/env bash
# Prints the pg_config of a PostgreSQL major: Debian's package for 15, PG_PREFIX/MAJOR for the
# majors scripts/postgres.sh builds from source. Usage: pg-config.sh PG_PREFIX MAJOR
if [ "$2" = 15 ]; then echo /usr/lib/postgresql/15/bin/pg_config; else echo "$1/$2/bin/pg_config"; fi
