"""The statistics behind bench_bridge.py's contention verdicts (not a
benchmark: nothing is timed). Runs without the extension."""
import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_bridge as bb  # noqa: E402


class TestMannWhitney(unittest.TestCase):
    def test_complete_separation_is_the_smallest_p(self):
        on, off = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
        self.assertAlmostEqual(bb.mann_whitney_below(on, off), 1 / math.comb(10, 5))
        # The other way round, every split has U at most the observed one.
        self.assertEqual(bb.mann_whitney_below(off, on), 1.0)

    def test_interleaved_samples_are_not_significant(self):
        p = bb.mann_whitney_below([1, 3, 5, 7, 9], [2, 4, 6, 8, 10])
        self.assertGreater(p, 0.3)
        self.assertLess(p, 0.7)

    def test_one_overlap(self):
        # U = 1: the splits with U <= 1 are the complete separation and the
        # one that swaps the two middle values.
        p = bb.mann_whitney_below([1, 2, 3, 4, 7], [6, 8, 9, 10, 11])
        self.assertAlmostEqual(p, 2 / math.comb(10, 5))

    def test_ties_count_half(self):
        self.assertEqual(bb.mann_whitney_below([5, 5, 5], [5, 5, 5]), 1.0)
        p = bb.mann_whitney_below([1, 5, 5], [5, 5, 9])
        self.assertGreater(p, 1 / math.comb(6, 3))
        self.assertLess(p, 0.5)

    def test_large_samples_use_the_normal_approximation(self):
        on = list(range(0, 30))
        off = list(range(20, 50))
        p = bb.mann_whitney_below(on, off)
        self.assertLess(p, 1e-4)
        self.assertGreater(bb.mann_whitney_below(off, on), 0.999)

    def test_empty_group(self):
        self.assertEqual(bb.mann_whitney_below([], [1, 2]), 1.0)


class TestSpinVerdict(unittest.TestCase):
    def test_not_worse_within_the_noise_share(self):
        self.assertEqual(bb.spin_verdict([95, 91, 99], [100, 100, 100]), "not worse")
        self.assertEqual(bb.spin_verdict([200], [100]), "not worse")

    def test_worse_when_every_round_is_below(self):
        v = bb.spin_verdict([50, 52, 48, 51, 49], [100, 98, 102, 99, 101])
        self.assertEqual(v, "WORSE (p 0.004)")

    def test_within_noise_when_processes_spread(self):
        # Bimodal processes: the medians differ, the rounds overlap.
        v = bb.spin_verdict([8, 50, 9, 49, 40], [7, 55, 52, 10, 48])
        self.assertTrue(v.startswith("within noise (p "), v)

    def test_too_few_rounds(self):
        self.assertEqual(bb.spin_verdict([50], [100]), "too few rounds")
        self.assertEqual(bb.spin_verdict([50, 51, 52], [100, 99, 98]), "too few rounds")

    def test_not_measured(self):
        self.assertEqual(bb.spin_verdict([], [100]), "n/a")


if __name__ == "__main__":
    unittest.main()
