import os

from setuptools import setup

from aiobridge.setup_helpers import AiobridgeExtension

# PIPDEMO_BACKEND picks the backend (default: event), so that one process
# can hold this extension and another one on a different backend.
backend = os.environ.get("PIPDEMO_BACKEND", "event")
setup(ext_modules=[AiobridgeExtension("pipdemo", ["pipdemo.c"], backend=backend)])
