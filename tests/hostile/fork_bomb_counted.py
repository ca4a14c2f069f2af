# expect: passed
# Counts how many processes a job may create: RLIMIT_NPROC must stop it well before 1000.
import posix
import time

children = 0
try:
    for _ in range(1000):
        if posix.fork() == 0:
            time.sleep(60)
            posix._exit(0)
        children += 1
except OSError:
    pass
print("forked", children)
assert children < 100, children
