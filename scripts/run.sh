#!/usr/bin/env bash
# Run one command inside the project environment (scripts/env.sh: the venv, the colcon install of
# the messages, DDS on loopback only, a random ROS domain, no model hub).
set -eo pipefail
# shellcheck disable=SC1091
. "$(cd "$(dirname "$0")" && pwd)/env.sh"
exec "$@"
