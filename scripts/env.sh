# Source this file (bash or zsh) to work in the project environment in the current shell:
#   source scripts/env.sh
# the venv's Python and commands (qvl-ros, qvl_node, ros2 where installed; QVL_ROS_DISTRO=kilted:
# the Kilted venv and install tree, scripts/distro.sh), the colcon install of
# the messages (ros2 run qvl_ros ...), DDS on this machine only, a random ROS domain unless one is
# set, no model hub. scripts/run.sh runs one command in the same environment.
if [ -n "${BASH_SOURCE:-}" ]; then _qvl_here=${BASH_SOURCE[0]}; else _qvl_here=${(%):-%x}; fi
QVL_ROOT=$(cd "$(dirname "$_qvl_here")/.." && pwd)
unset _qvl_here
# shellcheck source=scripts/distro.sh
. "$QVL_ROOT/scripts/distro.sh" || return 2 2>/dev/null || exit 2  # QVL_ROS_DISTRO: jazzy (default) or kilted
if [ ! -x "$QVL_VENV/bin/python" ]; then
  echo "qvl_ros: no environment yet in $QVL_VENV; run 'make demo' or 'make test' (or scripts/setup.sh) first" >&2
  return 1 2>/dev/null || exit 1
fi
export VIRTUAL_ENV=$QVL_VENV
export PATH=$VIRTUAL_ENV/bin:$PATH
export AMENT_PREFIX_PATH=$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}
export CMAKE_PREFIX_PATH=$VIRTUAL_ENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
if [ -f "$QVL_INSTALL/setup.sh" ]; then
  # shellcheck disable=SC1091
  COLCON_CURRENT_PREFIX=$QVL_INSTALL . "$QVL_INSTALL/setup.sh"
fi
# The source tree comes first so that edits take effect without a rebuild; qvl_ros/__init__.py
# extends its path to find the generated qvl_ros.msg in install/.
export PYTHONPATH=$QVL_ROOT${PYTHONPATH:+:$PYTHONPATH}
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
