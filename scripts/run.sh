#!/usr/bin/env bash
# Run a command inside the project environment: the venv, the colcon install of the messages,
# DDS on loopback only, a random ROS domain, no model hub. QVL_ROS_DISTRO=kilted picks the Kilted
# venv and install tree (scripts/distro.sh); the default is Jazzy.
set -eo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/distro.sh
. "$ROOT/scripts/distro.sh"
export PATH=$VENV/bin:$PATH
export QVL_INSTALL
export VIRTUAL_ENV=$VENV
export AMENT_PREFIX_PATH=$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}
export CMAKE_PREFIX_PATH=$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
if [ -f "$QVL_INSTALL/setup.sh" ]; then
  # shellcheck disable=SC1091
  COLCON_CURRENT_PREFIX=$QVL_INSTALL . "$QVL_INSTALL/setup.sh"
fi
# The source tree comes first so that edits take effect without a rebuild; qvl_ros/__init__.py
# extends its path to find the generated qvl_ros.msg in install/.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
exec "$@"
