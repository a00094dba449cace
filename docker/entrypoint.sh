#!/bin/sh
# Entry point of the imagen image, run by tini as PID 1's only child.
#
# Without arguments it runs `imagen up`; any other command (`imagen migrate`,
# `imagen consume`, `ray start ...`) runs as given. Before `imagen up` it
# checks that a database is configured and, when IMAGEN_MIGRATE_ON_START is
# true, applies the migrations. It then execs the command, so SIGTERM from
# `docker stop` reaches the Python process with no shell in between.
set -eu

if [ "$#" -eq 0 ]; then
    set -- imagen up
fi

if [ "$1" = "imagen" ] && [ "${2:-}" = "up" ]; then
    # Without a URL, imagen would start an embedded PostgreSQL inside the
    # container that the web UI never writes to: the service would look
    # healthy and never receive a job.
    if [ -z "${IMAGEN_WORKER_DATABASE_URL:-}" ]; then
        echo "imagen-entrypoint: IMAGEN_WORKER_DATABASE_URL is not set; put it in the env file" \
            "(IMAGEN_ENV_FILE in compose.yaml) or pass it with -e" >&2
        exit 64
    fi

    case "${IMAGEN_MIGRATE_ON_START:-0}" in
        1 | true | yes | on)
            echo "imagen-entrypoint: applying migrations (IMAGEN_MIGRATE_ON_START=${IMAGEN_MIGRATE_ON_START})" >&2
            imagen migrate
            ;;
        0 | false | no | off | "") ;;
        *)
            echo "imagen-entrypoint: IMAGEN_MIGRATE_ON_START must be 1 or 0, got '${IMAGEN_MIGRATE_ON_START}'" >&2
            exit 64
            ;;
    esac
fi

exec "$@"
