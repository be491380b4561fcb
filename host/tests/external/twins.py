"""Test fixture: the example inventory plugin, but its reflection lists a
second application service too, so the node cannot tell which to mount."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../examples/plugins"))
import inventory  # noqa: E402

inventory.run(also_listed=("inventory.v1.Twin",))
