"""Child interpreters for the Python suites: a test runs Python source in a
fresh process of the same interpreter and environment, in its own session,
so that a hang kills it and anything it forked, and fails the test."""
import json
import os
import signal
import subprocess
import sys


def run(source, env=None, timeout=60, python_args=()):
    """Runs `source` with `env` added to this process's environment; the
    CompletedProcess (text stdout and stderr). A child that outlives
    `timeout` seconds is killed and raises AssertionError with its output."""
    cmd = [sys.executable, "-X", "faulthandler", *python_args, "-c", source]
    full_env = dict(os.environ)
    full_env.update(env or {})
    with subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(
                "child hung for %ss\nstdout:\n%s\nstderr:\n%s" % (timeout, out, err))
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def last_json(p):
    """The JSON summary a child printed last, or None."""
    lines = p.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None
