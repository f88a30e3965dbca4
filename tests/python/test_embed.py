"""Programs that embed Python and own main (aiobridge/embed.h) and the async
test harness (aiobridge/testing.h), driven as a user drives them: command
lines, exit statuses, Ctrl-C. The binaries come from the environment
(AIOB_HARNESS_SELFTEST, AIOB_EMBED_SIGINT); AIOBRIDGE_BACKEND and
AIOBRIDGE_LOOP pass through to them."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

SELFTEST = os.environ.get("AIOB_HARNESS_SELFTEST")
SIGINT_PROG = os.environ.get("AIOB_EMBED_SIGINT")
# Per wait on a process; generous for a loaded machine (they take about a
# second), and well under ctest's timeout for the whole file, so that a
# hang fails its own test with what the process printed.
TIMEOUT = 60


def communicate(p):
    """p's (stdout, stderr) once it ends; a process still running after
    TIMEOUT is aborted (SIGABRT: a core and, with faulthandler on, the
    Python stacks) and fails the test with its output."""
    try:
        return p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        out, err = p.communicate()
        raise AssertionError("%s hung for %ss\nstdout:\n%s\nstderr:\n%s"
                             % (p.args, TIMEOUT, out, err))


def run_program(cmd, env=None):
    """cmd's CompletedProcess (text stdout and stderr), as communicate."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env) as p:
        out, err = communicate(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run(*args, env=None):
    p = run_program([SELFTEST, *args], env=env)
    return p.returncode, p.stdout + p.stderr


@unittest.skipUnless(SELFTEST, "AIOB_HARNESS_SELFTEST is not set")
class Harness(unittest.TestCase):
    def test_filter_selects_by_pattern(self):
        rc, out = run("pass_*")
        self.assertEqual(rc, 0, out)
        self.assertIn("[       OK ] pass_sleep", out)
        self.assertIn("[       OK ] pass_await", out)
        self.assertNotIn("fail_", out)

    def test_list(self):
        rc, out = run("--list", "fail_*")
        self.assertEqual(rc, 0, out)
        self.assertEqual(out.split(), ["fail_assert", "fail_errno", "fail_python"])

    def test_each_failure_is_reported_through_cmocka(self):
        rc, out = run("fail_*")
        self.assertEqual(rc, 1, out)
        for name in ("fail_assert", "fail_errno", "fail_python"):
            self.assertIn(f"[  FAILED  ] {name}", out)
        self.assertRegex(out, r"harness_selftest\.c:\d+: answer == 42")
        self.assertIn("FileNotFoundError", out)
        self.assertIn("LookupError: raised by the awaited factory", out)
        self.assertIn("3 FAILED TEST(S)", out)

    def test_timeout_cancels_the_test(self):
        rc, out = run("--timeout", "0.5", "hang", "pass_sleep")
        self.assertEqual(rc, 1, out)
        self.assertIn("timed out after 0.5 s", out)
        self.assertIn("[       OK ] pass_sleep", out)

    def test_jobs_runs_that_many_at_once(self):
        rc, out = run("--jobs", "3", "conc_*")
        self.assertEqual(rc, 0, out)
        counts = [int(n) for n in re.findall(r"conc: (\d+) running", out)]
        self.assertEqual(len(counts), 6, out)
        self.assertEqual(max(counts), 3, out)

    def test_jobs_is_a_limit(self):
        # conc_* wait until 3 run at once. With 2 slots, conc_1 and conc_2
        # wait in vain and time out (cancelled, they still count as
        # running), then conc_3 starts and makes 3.
        rc, out = run("--jobs", "2", "--timeout", "1", "conc_1", "conc_2", "conc_3")
        self.assertEqual(rc, 1, out)
        self.assertEqual(out.count("timed out after 1 s"), 2, out)
        self.assertIn("[  FAILED  ] conc_1", out)
        self.assertIn("[  FAILED  ] conc_2", out)
        self.assertIn("[       OK ] conc_3", out)

    def test_bad_command_lines(self):
        for args in (["--jobs", "0"], ["--timeout", "-1"], ["--bogus"]):
            rc, out = run(*args)
            self.assertEqual(rc, 2, (args, out))
            self.assertIn("usage:", out)
        rc, out = run("no_such_test")
        self.assertEqual(rc, 1, out)
        self.assertIn("no test matches", out)


@unittest.skipUnless(SIGINT_PROG, "AIOB_EMBED_SIGINT is not set")
class MainProgram(unittest.TestCase):
    def test_ctrl_c_cancels_the_main_task_and_ends_by_sigint(self):
        p = subprocess.Popen([SIGINT_PROG], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            ready = threading.Event()
            lines = []

            def read():
                for line in p.stdout:
                    lines.append(line.strip())
                    if line.strip() == "ready":
                        ready.set()
            reader = threading.Thread(target=read)
            reader.start()
            self.assertTrue(ready.wait(TIMEOUT), "the program never got ready")
            p.send_signal(signal.SIGINT)
            try:
                p.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGABRT)
                p.wait()
                reader.join(TIMEOUT)
                self.fail("still running %ss after SIGINT; it printed %s; "
                          "stderr:\n%s" % (TIMEOUT, lines, p.stderr.read()))
            reader.join(TIMEOUT)
            err = p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        self.assertEqual(p.returncode, -signal.SIGINT, err)
        self.assertIn("main task dropped", lines)
        self.assertIn("KeyboardInterrupt", err)

    def test_bad_loop_choice_is_a_clear_error(self):
        env = dict(os.environ, AIOBRIDGE_LOOP="nope")
        p = run_program([SIGINT_PROG], env=env)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("AIOBRIDGE_LOOP=nope: use uvloop or asyncio", p.stderr)
        self.assertIn("main task dropped", p.stdout)  # its state, released

    def test_missing_uvloop_is_a_clear_error(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "uvloop.py"), "w") as f:
                f.write("raise ImportError('no uvloop in this test')\n")
            env = dict(os.environ, AIOBRIDGE_LOOP="uvloop",
                       PYTHONPATH=d + os.pathsep + os.environ.get("PYTHONPATH", ""))
            p = run_program([SIGINT_PROG], env=env)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("uvloop was asked for but cannot be imported", p.stderr)
        self.assertIn("python3-uvloop", p.stderr)


if __name__ == "__main__":
    unittest.main()
