#!/bin/sh
# Set up mosquitto's dynamic security for slmops (see dynsec.conf), in two steps:
#   1. before mosquitto starts:  dynsec-init.sh file /var/lib/mosquitto/dynamic-security.json
#      writes the plugin's file with one admin client ($SLMOPS_DYNSEC_ADMIN, default "admin") that may only
#      administer dynamic security;
#   2. with mosquitto running:   dynsec-init.sh roles [host [port]]
#      refuses every topic by default, creates the role slmops-fleet (publish to slmops/v1/devices/+/cmd, read
#      every device's status, telemetry and presence) and the client "fleet" with that role.
# Devices are not listed here: the fleet enrols and revokes them (fleet/dynsec.py), each with its own role.
# Passwords come from the environment: SLMOPS_DYNSEC_ADMIN_PASSWORD and SLMOPS_FLEET_BROKER_PASSWORD (make them
# with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'). mosquitto_ctrl takes them on its command
# line: run this where no other user can list processes, or over TLS with --cafile (SLMOPS_DYNSEC_CTRL_OPTS).
set -eu
admin=${SLMOPS_DYNSEC_ADMIN:-admin}
: "${SLMOPS_DYNSEC_ADMIN_PASSWORD:?set SLMOPS_DYNSEC_ADMIN_PASSWORD}"

case "${1:-}" in
file)
    [ -n "${2:-}" ] || { echo "usage: $0 file PATH" >&2; exit 2; }
    [ ! -e "$2" ] || { echo "$2 exists; remove it first to start over" >&2; exit 2; }
    umask 077
    mosquitto_ctrl dynsec init "$2" "$admin" "$SLMOPS_DYNSEC_ADMIN_PASSWORD"
    ;;
roles)
    : "${SLMOPS_FLEET_BROKER_PASSWORD:?set SLMOPS_FLEET_BROKER_PASSWORD}"
    h=${2:-127.0.0.1}
    p=${3:-1883}
    # shellcheck disable=SC2086
    run() { mosquitto_ctrl ${SLMOPS_DYNSEC_CTRL_OPTS:-} -h "$h" -p "$p" -u "$admin" -P "$SLMOPS_DYNSEC_ADMIN_PASSWORD" dynsec "$@"; }
    run setDefaultACLAccess publishClientSend deny
    run setDefaultACLAccess publishClientReceive deny
    run setDefaultACLAccess subscribe deny
    run createRole slmops-fleet
    run addRoleACL slmops-fleet publishClientSend 'slmops/v1/devices/+/cmd' allow
    for ch in status telemetry presence; do
        run addRoleACL slmops-fleet subscribeLiteral "slmops/v1/devices/+/$ch" allow
        run addRoleACL slmops-fleet publishClientReceive "slmops/v1/devices/+/$ch" allow
    done
    run createClient fleet -p "$SLMOPS_FLEET_BROKER_PASSWORD"
    run addClientRole fleet slmops-fleet
    ;;
*)
    echo "usage: $0 file PATH | $0 roles [host [port]]" >&2
    exit 2
    ;;
esac
