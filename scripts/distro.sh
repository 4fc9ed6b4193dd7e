# Sourced by scripts/setup.sh and scripts/env.sh (so scripts/run.sh): which ROS 2 distribution's pinned set, and the
# venv, colcon build and install folders that belong to it.
#   QVL_ROS_DISTRO=jazzy (default): scripts/requirements.txt, .venv, build, install
#   QVL_ROS_DISTRO=kilted:          scripts/requirements-kilted.txt, .venv-kilted, build-kilted,
#                                   install-kilted
# QVL_ROS2_EXTRA names the folder of the ROS 2 packages no registry serves (launch, launch_ros,
# launch_pytest, the ros2 command, message_filters; vision_msgs and composition_interfaces
# sources); default ../shared/ros2-extra beside the checkout.
# Needs QVL_ROOT (the checkout); sets QVL_VENV, QVL_BUILD, QVL_INSTALL, QVL_LOG, QVL_REQUIREMENTS.
QVL_ROS_DISTRO=${QVL_ROS_DISTRO:-jazzy}
case "$QVL_ROS_DISTRO" in
  jazzy)  QVL_SUFFIX="" ;        QVL_REQUIREMENTS=$QVL_ROOT/scripts/requirements.txt ;;
  kilted) QVL_SUFFIX="-kilted" ; QVL_REQUIREMENTS=$QVL_ROOT/scripts/requirements-kilted.txt ;;
  *) echo "QVL_ROS_DISTRO must be jazzy or kilted, got '$QVL_ROS_DISTRO'" >&2
     return 2 2>/dev/null || exit 2 ;;
esac
QVL_VENV=$QVL_ROOT/.venv$QVL_SUFFIX
QVL_BUILD=$QVL_ROOT/build$QVL_SUFFIX
QVL_INSTALL=$QVL_ROOT/install$QVL_SUFFIX
QVL_LOG=$QVL_ROOT/log$QVL_SUFFIX
QVL_ROS2_EXTRA=${QVL_ROS2_EXTRA:-$QVL_ROOT/../shared/ros2-extra}
export QVL_ROS_DISTRO QVL_INSTALL
