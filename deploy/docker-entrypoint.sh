#!/bin/sh
# Entry point of the spine-triage image: the first argument is the role.
#
#   node      the DICOM node: C-ECHO/C-STORE service, study completion, the scheduler that
#             wakes workers and re-sends lost work (the sweeper), REST API, worklist, metrics
#   worker    a Celery worker; add --queues triage (GPU: inference) or --queues delivery
#             (CPU: sending results); default: both queues
#   migrate   upgrade the database schema to this release (run before node and workers)
#
# There is no "beat" or "sweeper" role: the node runs its own scheduler and sweeper, so no
# Celery beat process is needed (and none must run). Anything else is passed to the
# spine-triage command line, e.g. `deliveries retry` or `config show`.
set -eu

role="${1:-node}"
[ "$#" -gt 0 ] && shift

case "$role" in
  node)
    exec spine-triage node "$@"
    ;;
  worker)
    exec spine-triage worker "$@"
    ;;
  migrate)
    exec spine-triage db upgrade "$@"
    ;;
  beat|sweeper)
    echo "spine-triage has no '$role' role: the node runs the scheduler and the sweeper" \
         "itself; start the 'node' role (once) instead." >&2
    exit 64
    ;;
  *)
    exec spine-triage "$role" "$@"
    ;;
esac
