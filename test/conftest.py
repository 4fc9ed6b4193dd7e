"""Shared pytest set-up: keep DDS on this machine, in a domain of its own, and never reach a
model hub. scripts/run.sh sets the same variables; these defaults cover a bare `pytest`."""
import os
import random

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
